"""The NNX layers against the Linen ones (same weights and masks: same outputs, carries and
gradients), against a dense computation with the pruned weights zeroed, and the conversion
of Linen variables to and from the NNX model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bsrnn import cells, pruning
from bsrnn import nnx as bnnx
from bsrnn.blocks import block_diagonal
from bsrnn.schedules import CubicSparsity
from tests.test_cells import ones, zero_pruned

B, T, D, H = 3, 6, 5, 4


def random_variables(abstract, seed, keep=0.6, modules=1):
    """Linen variables for the shapes in ``abstract``: normal params (Linen's biases start
    at zero, which would hide a bias dropped or swapped) and masks with about 1 - keep
    zeros, recurrent ones within P3's diagonal blocks when ``modules`` > 1. NumPy draws:
    no JAX program to compile per leaf."""
    rng = np.random.default_rng(seed)

    def mask(path, a):
        m = rng.random(a.shape) < keep
        if modules > 1 and "recurrent" in jax.tree_util.keystr(path):
            m &= np.asarray(block_diagonal(modules)(a.shape), bool)
        return m

    return {
        "params": jax.tree_util.tree_map(
            lambda a: (0.5 * rng.standard_normal(a.shape)).astype(np.float32), abstract["params"]
        ),
        "masks": jax.tree_util.tree_map_with_path(mask, abstract["masks"]),
    }


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def linen_and_nnx(cell, seed, **kwargs):
    """A Linen RNN with random variables (:func:`random_variables`), and the NNX RNN built
    from another seed, then given the Linen variables."""
    linen = cells.RNN(cell, H, **kwargs)
    abstract = jax.eval_shape(linen.init, jax.random.key(0), jnp.zeros((B, T, D)))
    variables = random_variables(abstract, seed, modules=kwargs.get("recurrent_modules", 1))
    model = bnnx.RNN(cell, D, H, rngs=nnx.Rngs(seed + 100), **kwargs)
    bnnx.load_linen_variables(model, variables)
    return linen, variables, model


CASES = [
    ("gru", dict(num_layers=2)),
    ("lstm", dict(num_layers=1, bidirectional=True)),
    ("rnn", dict(num_layers=2, bidirectional=True)),
    ("rnn_clipped_relu", dict(num_layers=1)),
    ("gru", dict(num_layers=1, recurrent_modules=2)),
]


@pytest.mark.parametrize("cell,kwargs", CASES)
def test_nnx_matches_linen_outputs_and_gradients(cell, kwargs):
    linen, variables, model = linen_and_nnx(cell, 0, **kwargs)
    x = normal(1, (B, T, D))
    lengths = jnp.array([T, 3, 1])
    weight = normal(2, (B, T, H * (2 if kwargs.get("bidirectional") else 1)))

    def linen_loss(params):  # one compiled program per side: output, loss and gradient
        out = linen.apply({"params": params, "masks": variables["masks"]}, x, lengths)
        return jnp.sum(weight * out), out

    def nnx_loss(model):
        out = model(x, lengths)
        return jnp.sum(weight * out), out

    (_, expected), expected_grads = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))(
        variables["params"]
    )
    (_, out), grads = nnx.jit(nnx.value_and_grad(nnx_loss, has_aux=True))(model)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(expected))) > 0.05  # a real signal, not zeros
    grads = nnx.to_pure_dict(grads)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(expected_grads)
    jax.tree_util.tree_map(
        lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6), grads, expected_grads
    )
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads)) > 1e-3


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_reverse_and_carry_match_linen(cell):
    linen = cells.RecurrentLayer(cell, H, reverse=True)
    x = normal(3, (B, T, D))
    lengths = jnp.array([2, T, 4])
    h0 = normal(4, (B, H))
    carry0 = (h0, -h0) if cell == "lstm" else h0
    variables = random_variables(jax.eval_shape(linen.init, jax.random.key(0), x), 5, keep=0.7)
    layer = bnnx.RecurrentLayer(cell, D, H, reverse=True, rngs=nnx.Rngs(0))
    bnnx.load_linen_variables(layer, variables)
    out, carry = nnx.jit(layer)(x, lengths, carry0)
    expected_out, expected_carry = jax.jit(linen.apply)(variables, x, lengths, carry0)
    np.testing.assert_allclose(out, expected_out, rtol=1e-6, atol=1e-7)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), carry, expected_carry
    )
    # Reverse really runs backwards: the first valid step's output is the last one computed,
    # which differs from the forward layer's first output.
    forward = bnnx.RecurrentLayer(cell, D, H, rngs=nnx.Rngs(0))
    bnnx.load_linen_variables(forward, variables)
    forward_out, _ = nnx.jit(forward)(x, lengths, carry0)
    assert float(jnp.max(jnp.abs(forward_out[:, 0] - out[:, 0]))) > 1e-3


def test_masked_dense_zeros_the_kernel():
    layer = bnnx.MaskedDense(D, H, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(6)
    layer.bias[...] = jnp.asarray(rng.standard_normal(H), jnp.float32)
    mask = rng.random((D, H)) < 0.5
    mask[0] = False  # a whole zero row, for good measure
    layer.mask[...] = jnp.asarray(mask)
    x = rng.standard_normal((7, D))
    kernel = np.asarray(layer.kernel[...], np.float64)
    expected = x @ np.where(mask, kernel, 0.0) + np.asarray(layer.bias[...], np.float64)
    np.testing.assert_allclose(layer(jnp.asarray(x, jnp.float32)), expected, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(x @ kernel - x @ np.where(mask, kernel, 0.0))) > 1e-2  # masks matter


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_masked_rnn_equals_dense_with_pruned_weights_zeroed(cell):
    model = bnnx.RNN(cell, D, H, num_layers=2, rngs=nnx.Rngs(7))
    variables = random_variables(bnnx.linen_variables(model), 8, keep=0.5)
    masks = variables["masks"]
    bnnx.load_linen_variables(model, variables)
    x = normal(9, (B, T, D))
    lengths = jnp.array([T, 4, 2])
    run = nnx.jit(lambda model: model(x, lengths))
    masked = run(model)
    dense = bnnx.RNN(cell, D, H, num_layers=2, rngs=nnx.Rngs(0))
    bnnx.load_linen_variables(
        dense, {"params": zero_pruned(variables["params"], masks), "masks": ones(masks)}
    )
    np.testing.assert_array_equal(masked, run(dense))
    bnnx.load_linen_variables(model, {"masks": ones(masks)})
    assert float(jnp.max(jnp.abs(run(model) - masked))) > 1e-3


def test_linen_variables_round_trip():
    model = bnnx.RNN("gru", D, H, bidirectional=True, rngs=nnx.Rngs(10))
    variables = bnnx.linen_variables(model)
    # The Linen layer's own tree: same paths, shapes and dtypes.
    linen = jax.eval_shape(
        cells.RNN("gru", H, bidirectional=True).init, jax.random.key(0), jnp.zeros((B, T, D))
    )
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), variables) == (
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), dict(linen))
    )
    # Each mask sits at its kernel's Linen path.
    masks = random_variables(variables, 11)["masks"]
    bnnx.load_linen_variables(model, {"masks": masks})
    np.testing.assert_array_equal(
        model.layer_0_bwd.recurrent_z.mask[...], masks["layer_0_bwd"]["recurrent_z"]["kernel"]
    )
    back = bnnx.linen_variables(model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back["masks"], masks)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back["params"], variables["params"])
    # Into a model of another seed: the same function.
    other = bnnx.RNN("gru", D, H, bidirectional=True, rngs=nnx.Rngs(12))
    run = nnx.jit(lambda model: model(normal(13, (B, T, D))))
    assert float(jnp.max(jnp.abs(run(other) - run(model)))) > 1e-3
    bnnx.load_linen_variables(other, back)
    np.testing.assert_array_equal(run(other), run(model))


def test_load_inside_jit():
    model = bnnx.RNN("gru", D, H, rngs=nnx.Rngs(14))
    masks = random_variables(bnnx.linen_variables(model), 15)["masks"]

    @nnx.jit
    def set_masks(model, masks):
        bnnx.load_linen_variables(model, {"masks": masks})

    set_masks(model, masks)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, bnnx.linen_variables(model)["masks"], masks
    )


def test_bad_inputs():
    model = bnnx.RNN("gru", D, H, rngs=nnx.Rngs(0))
    variables = bnnx.linen_variables(model)
    with pytest.raises(ValueError, match="in_features=7"):
        model(jnp.zeros((B, T, 7)))
    with pytest.raises(ValueError, match="unknown collections"):
        bnnx.load_linen_variables(model, {"parms": variables["params"]})
    del variables["masks"]["layer_0"]["input_z"]
    with pytest.raises(ValueError, match="missing.*layer_0/input_z/kernel"):
        bnnx.load_linen_variables(model, {"masks": variables["masks"]})
    params = variables["params"]
    params["layer_0"]["input_r"]["kernel"] = jnp.zeros((D + 1, H))
    with pytest.raises(ValueError, match=r"layer_0/input_r/kernel has shape \(6, 4\)"):
        bnnx.load_linen_variables(model, {"params": params})
    with pytest.raises(ValueError, match="unknown cell"):
        bnnx.RNN("gruu", D, H, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="recurrent_modules=3"):
        bnnx.RecurrentLayer("gru", D, H, recurrent_modules=3, rngs=nnx.Rngs(0))


def test_nnx_optimizer_block_prunes_to_the_target():
    """nnx.Optimizer with block_prune: the masks it holds go into the model's Mask variables
    each step; at the end every kernel has floor(s_f · blocks) whole 2x2 blocks pruned, and
    its pruned weights are exactly zero (hard mode)."""
    in_features, features, steps, final = 4, 8, 8, 0.5  # 2x2 blocks tile every kernel
    model = bnnx.RNN("gru", in_features, features, rngs=nnx.Rngs(16))
    schedule = CubicSparsity(final, begin_step=2, end_step=6, freq=2)
    tx = optax.chain(
        optax.adam(1e-2),
        pruning.block_prune(schedule, (2, 2), masks=bnnx.linen_variables(model)["masks"]),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = normal(17, (B, T, in_features)), normal(18, (B, T, features))
    lengths = jnp.array([T, 3, 5])

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x, lengths) - y) ** 2))(model)
        optimizer.update(model, grads)
        bnnx.load_linen_variables(model, {"masks": pruning.masks_from(optimizer.opt_state)})
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(steps)]
    assert losses[-1] < losses[0]
    variables = bnnx.linen_variables(model)
    flat_params = dict(jax.tree_util.tree_flatten_with_path(variables["params"])[0])
    for path, mask in jax.tree_util.tree_flatten_with_path(variables["masks"])[0]:
        rows, cols = mask.shape
        tiles = np.asarray(mask).reshape(rows // 2, 2, cols // 2, 2)
        kept_blocks = tiles.all(axis=(1, 3))
        np.testing.assert_array_equal(tiles.any(axis=(1, 3)), kept_blocks)  # whole blocks
        assert (~kept_blocks).sum() == int(np.floor(final * kept_blocks.size)), path
        kernel = np.asarray(flat_params[path])
        assert np.all(kernel[~np.asarray(mask)] == 0.0) and np.all(kernel[mask] != 0.0)
