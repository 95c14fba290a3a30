"""P3's block-diagonal recurrences run as G independent products
(``RecurrentLayer(recurrent_modules=G)``) against the masked dense layer with the same
params and masks (``recurrent_mask_init=block_diagonal(G)``, ``recurrent_modules=1``), whose
numbers tests/test_cells.py checks against PyTorch and against dense weights zeroed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bsrnn import blocks, cells, pruning, train
from bsrnn.models import lm


def layers(cell, hidden, modules, **kwargs):
    """(block-diagonal layer, masked dense reference) with the same params and masks."""
    fast = cells.RNN(cell, hidden, recurrent_modules=modules, **kwargs)
    dense = cells.RNN(cell, hidden, recurrent_mask_init=blocks.block_diagonal(modules), **kwargs)
    return fast, dense


def prune_inside_blocks(masks, key):
    """Prune about 40% of every mask at random: recurrent masks stay within the diagonal."""
    leaves, treedef = jax.tree_util.tree_flatten(masks)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([m & jax.random.bernoulli(k, 0.6, m.shape)
                              for k, m in zip(keys, leaves, strict=True)])


def test_diagonal_blocks_and_off_diagonal_count_by_hand():
    w = jnp.arange(24.0).reshape(4, 6)  # G = 2: blocks rows 0:2 x cols 0:3, rows 2:4 x 3:6
    np.testing.assert_array_equal(
        blocks.diagonal_blocks(w, 2), [[[0, 1, 2], [6, 7, 8]], [[15, 16, 17], [21, 22, 23]]]
    )
    mask = blocks.block_diagonal(2)((4, 6))
    assert int(blocks.off_diagonal_count(mask, 2)) == 0
    mask[0, 5] = mask[3, 1] = True
    mask[1, 1] = False  # pruning inside a block is allowed
    assert int(blocks.off_diagonal_count(mask, 2)) == 2
    with pytest.raises(ValueError, match=r"x \(4x6\) keeps 2 entries outside its 2 diagonal"):
        blocks.check_block_diagonal(mask, 2, "x")
    with pytest.raises(ValueError, match="cannot split a 4x6 matrix into 4"):
        blocks.diagonal_blocks(w, 4)


@pytest.mark.parametrize("cell,modules", [("gru", 4), ("lstm", 2), ("rnn", 8),
                                          ("rnn_clipped_relu", 4)])
def test_same_variables_outputs_and_gradients_as_the_masked_dense_layer(cell, modules):
    hidden = 8
    fast, dense = layers(cell, hidden, modules, bidirectional=True)
    x = jax.random.normal(jax.random.key(0), (3, 7, 5))
    lengths = jnp.array([7, 3, 5])
    variables = dense.init(jax.random.key(1), x, lengths)
    # Same params and masks, names and shapes (checkpoints move between the two).
    fast_variables = fast.init(jax.random.key(1), x, lengths)
    assert jax.tree_util.tree_structure(fast_variables) == jax.tree_util.tree_structure(variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, fast_variables, variables)
    masks = prune_inside_blocks(variables["masks"], jax.random.key(2))
    params = variables["params"]
    target = jax.random.normal(jax.random.key(3), (3, 7, 2 * hidden))

    def loss(model, params, x):
        y = model.apply({"params": params, "masks": masks}, x, lengths)
        return jnp.sum(jnp.tanh(y) * target), y

    grad = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    (g_params, g_x), y = grad(fast, params, x)
    (g_params_ref, g_x_ref), y_ref = grad(dense, params, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(y))) > 0.1
    np.testing.assert_allclose(g_x, g_x_ref, rtol=1e-5, atol=1e-6)
    # Kept entries: the masked dense gradient. Pruned entries: 0, not the straight-through
    # gradient apply_mask passes to the dense layer's pruned weights.
    flat_masks = dict(jax.tree_util.tree_flatten_with_path(masks)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(g_params)[0]:
        ref = dict(jax.tree_util.tree_flatten_with_path(g_params_ref)[0])[path]
        if path in flat_masks and "recurrent" in jax.tree_util.keystr(path):
            kept = np.asarray(flat_masks[path])
            np.testing.assert_allclose(np.where(kept, g, 0), np.where(kept, ref, 0),
                                       rtol=1e-5, atol=1e-6)
            off = ~np.asarray(blocks.block_diagonal(modules)(g.shape))
            assert np.all(np.asarray(g)[off] == 0) and np.any(np.asarray(ref)[off] != 0)
        else:
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


def test_an_adam_step_updates_the_same_params():
    # With keep_masked the pruned weights' updates are zeroed, so one optimizer step moves
    # the params of the two layers alike (no global-norm clipping: it would see the
    # straight-through gradients of the dense layer's pruned weights).
    fast, dense = layers("gru", 12, 3)
    x = jax.random.normal(jax.random.key(4), (2, 6, 4))
    variables = dense.init(jax.random.key(5), x)
    tx = optax.chain(optax.adam(1e-2), pruning.keep_masked())

    @functools.partial(jax.jit, static_argnums=0)
    def updated(model, params, masks):
        grads = jax.grad(lambda p: jnp.sum(
            model.apply({"params": p, "masks": masks}, x) ** 2))(params)
        updates, _ = tx.update(grads, tx.init(params), params, masks=masks)
        return optax.apply_updates(params, updates)

    params, masks = variables["params"], variables["masks"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                           updated(fast, params, masks), updated(dense, params, masks))


def test_initial_and_final_carry_and_reverse():
    fast = cells.RecurrentLayer("lstm", 6, reverse=True, recurrent_modules=3)
    dense = cells.RecurrentLayer("lstm", 6, reverse=True,
                                 recurrent_mask_init=blocks.block_diagonal(3))
    x = jax.random.normal(jax.random.key(6), (2, 5, 3))
    lengths = jnp.array([5, 2])
    carry = (jax.random.normal(jax.random.key(7), (2, 6)),
             jax.random.normal(jax.random.key(8), (2, 6)))
    variables = dense.init(jax.random.key(9), x, lengths)
    (y, (h, c)) = fast.apply(variables, x, lengths, carry)
    (y_ref, (h_ref, c_ref)) = dense.apply(variables, x, lengths, carry)
    for a, b in ((y, y_ref), (h, h_ref), (c, c_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_lm_model_runs_its_recurrent_modules_block_diagonal():
    # The LM with G = 4 against the same network written out with masked dense layers.
    model = lm.Model(11, cell="gru", features=8, num_layers=2, embed_dim=5,
                     recurrent_modules=4)
    tokens = jax.random.randint(jax.random.key(10), (2, 6), 0, 11)
    variables = model.init(jax.random.key(11), tokens)
    params, masks = variables["params"], variables["masks"]
    logits, _ = jax.jit(model.apply)(variables, tokens)
    x = params["embed"]["embedding"][tokens]
    for i in range(2):
        layer = cells.RecurrentLayer("gru", 8, recurrent_mask_init=blocks.block_diagonal(4))
        x, _ = layer.apply({"params": params[f"layer_{i}"], "masks": masks[f"layer_{i}"]}, x)
    out = params["output"]
    expected = x @ jnp.where(masks["output"]["kernel"], out["kernel"], 0) + out["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_masks_off_the_diagonal_are_caught_not_dropped():
    fast, _ = layers("gru", 8, 4)
    x = jax.random.normal(jax.random.key(12), (2, 3, 4))
    variables = fast.init(jax.random.key(13), x)
    masks = jax.tree_util.tree_map(lambda m: m, variables["masks"])
    wrong = np.array(masks["layer_0"]["recurrent_z"]["kernel"])
    wrong[0, 7] = True
    masks["layer_0"]["recurrent_z"]["kernel"] = jnp.asarray(wrong)
    bad = {"params": variables["params"], "masks": masks}
    with pytest.raises(ValueError, match=r"layer_0/recurrent_z \(8x8\) keeps 1 entries outside"):
        fast.apply(bad, x)
    y = jax.jit(fast.apply)(bad, x)  # traced masks: NaN, never a wrong number
    assert np.all(np.isnan(np.asarray(y)))
    assert np.all(np.isfinite(np.asarray(jax.jit(fast.apply)(variables, x))))
    with pytest.raises(ValueError, match="recurrent_mask_init's mask.*keeps 16 entries"):
        cells.RecurrentLayer("gru", 8, recurrent_modules=4,
                             recurrent_mask_init=blocks.block_diagonal(2)).init(
                                 jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"the restored mask layer_0/recurrent_z/kernel"):
        train._check_recurrent_modules(masks, 4)


@pytest.mark.parametrize("modules", [3, 0, 2.0])
def test_modules_must_divide_the_hidden_size(modules):
    with pytest.raises(ValueError, match=f"recurrent_modules={modules!r} must be a positive "
                                         "int that divides features=8"):
        cells.RecurrentLayer("gru", 8, recurrent_modules=modules).init(
            jax.random.key(0), jnp.ones((1, 2, 3)))
