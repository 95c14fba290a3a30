"""Masked cells and recurrent layers against PyTorch, a dense computation with the pruned
weights zeroed, and per-example runs without padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsrnn import blocks, cells


def random_masks(masks, key, keep=0.5):
    leaves, treedef = jax.tree_util.tree_flatten(masks)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.bernoulli(k, keep, m.shape) for k, m in zip(keys, leaves, strict=True)]
    )


def zero_pruned(params, masks):
    """Params with every pruned weight set to 0 (a plain dense model, no masks needed)."""
    flat_m = dict(jax.tree_util.tree_flatten_with_path(masks)[0])
    return jax.tree_util.tree_map_with_path(
        lambda path, w: jnp.where(flat_m[path], w, 0.0) if path in flat_m else w, params
    )


def ones(masks):
    return jax.tree_util.tree_map(lambda m: jnp.ones(m.shape, bool), masks)


@pytest.mark.parametrize("cell", list(cells.GATES))
def test_masked_equals_dense_with_pruned_weights_zeroed(cell):
    model = cells.RNN(cell, 12, num_layers=2, bidirectional=True)
    x = jax.random.normal(jax.random.key(0), (3, 9, 7))
    lengths = jnp.array([9, 4, 6])
    variables = model.init(jax.random.key(1), x, lengths)
    masks = random_masks(variables["masks"], jax.random.key(2))
    params = variables["params"]
    masked = model.apply({"params": params, "masks": masks}, x, lengths)
    dense = model.apply({"params": zero_pruned(params, masks), "masks": ones(masks)}, x, lengths)
    np.testing.assert_array_equal(masked, dense)
    # The masks matter: with all-ones masks the output differs.
    unmasked = model.apply({"params": params, "masks": ones(masks)}, x, lengths)
    assert float(jnp.max(jnp.abs(unmasked - masked))) > 1e-3


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn_clipped_relu"])
def test_padding_changes_nothing(cell):
    model = cells.RNN(cell, 10, num_layers=2, bidirectional=True)
    x = jax.random.normal(jax.random.key(3), (3, 8, 4))
    lengths = jnp.array([8, 5, 2])
    variables = model.init(jax.random.key(4), x, lengths)
    variables = {"params": variables["params"],
                 "masks": random_masks(variables["masks"], jax.random.key(5), keep=0.7)}
    out = model.apply(variables, x, lengths)
    garbage = jax.random.normal(jax.random.key(6), x.shape) * 100
    valid = (jnp.arange(8)[None, :] < lengths[:, None])[..., None]
    out_garbage = model.apply(variables, jnp.where(valid, x, garbage), lengths)
    np.testing.assert_array_equal(out, out_garbage)
    assert np.all(np.asarray(out)[~np.asarray(valid[..., 0])] == 0.0)
    # Each example alone, truncated to its length, with no padding at all:
    for b, n in enumerate(np.asarray(lengths)):
        alone = model.apply(variables, x[b:b + 1, :n], None)
        np.testing.assert_allclose(out[b, :n], alone[0], rtol=1e-5, atol=1e-6)


def test_final_carry_is_the_state_at_each_length():
    layer = cells.RecurrentLayer("lstm", 6)
    x = jax.random.normal(jax.random.key(7), (2, 5, 3))
    lengths = jnp.array([5, 2])
    variables = layer.init(jax.random.key(8), x, lengths)
    out, (h, c) = layer.apply(variables, x, lengths)
    np.testing.assert_allclose(h, out[jnp.arange(2), lengths - 1], rtol=1e-6)
    _, (h_alone, c_alone) = layer.apply(variables, x[1:, :2], None)
    np.testing.assert_allclose(c[1], c_alone[0], rtol=1e-6)


def copy_from_torch(torch_rnn, cell, num_layers, bidirectional):
    """Our params tree from a PyTorch nn.RNN/GRU/LSTM (weights (gates·H, D), gate order as
    ours)."""
    params = {}
    for i in range(num_layers):
        for suffix, name in [("", "fwd"), ("_reverse", "bwd")][: 1 + bidirectional]:
            layer = {}
            for kind, short in [("input", "ih"), ("recurrent", "hh")]:
                w, b = (getattr(torch_rnn, f"{n}_{short}_l{i}{suffix}").detach().numpy()
                        for n in ("weight", "bias"))
                gates = cells.GATES[cell]
                for g, wg, bg in zip(gates, np.split(w, len(gates)), np.split(b, len(gates)),
                                     strict=True):
                    layer[f"{kind}_{g}"] = {"kernel": jnp.asarray(wg.T), "bias": jnp.asarray(bg)}
            params[f"layer_{i}_{name}" if bidirectional else f"layer_{i}"] = layer
    return params


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_matches_pytorch(cell, bidirectional):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    hidden, layers, features = 16, 2, 5
    make = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM, "rnn": torch.nn.RNN}[cell]
    reference = make(features, hidden, num_layers=layers, bidirectional=bidirectional,
                     batch_first=True).double()
    x = np.random.default_rng(1).standard_normal((3, 11, features))
    lengths = np.array([11, 7, 3])
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        torch.from_numpy(x), torch.from_numpy(lengths), batch_first=True, enforce_sorted=False
    )
    expected, _ = torch.nn.utils.rnn.pad_packed_sequence(reference(packed)[0], batch_first=True,
                                                         total_length=11)
    model = cells.RNN(cell, hidden, num_layers=layers, bidirectional=bidirectional)
    variables = model.init(jax.random.key(0), jnp.asarray(x, jnp.float32), jnp.asarray(lengths))
    params = copy_from_torch(reference, cell, layers, bidirectional)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        variables["params"]
    )
    got = model.apply({"params": params, "masks": variables["masks"]},
                      jnp.asarray(x, jnp.float32), jnp.asarray(lengths))
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_clipped_relu_is_ds2s():
    layer = cells.RecurrentLayer("rnn_clipped_relu", 4)
    x = jax.random.normal(jax.random.key(9), (1, 3, 2)) * 30
    variables = layer.init(jax.random.key(10), x)
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    h, expected = np.zeros(4), []
    for t in range(3):
        pre = (x[0, t] @ p["input_h"]["kernel"] + p["input_h"]["bias"]
               + h @ p["recurrent_h"]["kernel"] + p["recurrent_h"]["bias"])
        h = np.minimum(np.maximum(pre, 0.0), 20.0)
        expected.append(h)
    out, _ = layer.apply(variables, x)
    np.testing.assert_allclose(out[0], np.stack(expected), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(out)) == 20.0


def test_straight_through_gradient():
    """The gradient w.r.t. a masked kernel is the gradient w.r.t. the effective (zeroed)
    kernel, at pruned positions too."""
    model = cells.RNN("gru", 6)
    x = jax.random.normal(jax.random.key(11), (2, 4, 3))
    variables = model.init(jax.random.key(12), x)
    masks = random_masks(variables["masks"], jax.random.key(13))

    def loss(params, masks):
        return jnp.sum(model.apply({"params": params, "masks": masks}, x) ** 2)

    masked_grad = jax.grad(loss)(variables["params"], masks)
    dense_grad = jax.grad(loss)(zero_pruned(variables["params"], masks), ones(masks))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), masked_grad,
        dense_grad,
    )
    kernel_grad = masked_grad["layer_0"]["recurrent_z"]["kernel"]
    pruned = ~np.asarray(masks["layer_0"]["recurrent_z"]["kernel"])
    assert np.any(np.asarray(kernel_grad)[pruned] != 0.0)


def test_block_diagonal_recurrence_keeps_modules_independent():
    # P3 with G = H = 4 (IndRNN-like): the recurrent kernel of every gate is diagonal, so with
    # zero inputs unit j's state depends only on its own initial state.
    layer = cells.RecurrentLayer("gru", 4, recurrent_mask_init=blocks.block_diagonal(4))
    x = jnp.zeros((1, 6, 2))
    variables = layer.init(jax.random.key(14), x)
    for gate in "rzn":
        np.testing.assert_array_equal(variables["masks"][f"recurrent_{gate}"]["kernel"],
                                      np.eye(4, dtype=bool))
    h0 = jax.random.normal(jax.random.key(15), (1, 4))
    _, h = layer.apply(variables, x, None, h0)
    _, h_changed = layer.apply(variables, x, None, h0.at[0, 2].set(5.0))
    changed = np.asarray(h_changed != h)[0]
    np.testing.assert_array_equal(changed, [False, False, True, False])


def test_bad_inputs():
    layer = cells.RecurrentLayer("gru", 4)
    x = jnp.ones((1, 2, 3))
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="has no mask: apply the model with both collections"):
        layer.apply({"params": variables["params"]}, x)
    with pytest.raises(ValueError, match="unknown cell 'gruu'"):
        cells.RecurrentLayer("gruu", 4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="cannot split a 4x4 matrix into 3"):
        cells.RecurrentLayer("gru", 4, recurrent_mask_init=blocks.block_diagonal(3)).init(
            jax.random.key(0), x
        )
