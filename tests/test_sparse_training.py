"""Sparse training once masks freeze (bsrnn.kernels.sparse_training): a frozen layer's
block-sparse recurrence against the masked dense layer with the same params and masks, with
partial edge blocks (H = 10, 4x4 blocks), with both ways of computing the kept blocks' weight
gradient (``weight_grad`` "blocks" and "dense"), and its custom VJP against finite
differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_lm_config

from bsrnn import blocks, cells, train
from bsrnn.kernels import sparse_training
from bsrnn.kernels.bsc import from_dense, to_dense

BLOCKS = (4, 4)


def block_masks(masks, key, keep=0.5):
    """Random masks of whole 4x4 blocks (partial at the edges of a 10-wide kernel)."""
    leaves, treedef = jax.tree_util.tree_flatten(masks)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([
        blocks.expand_blocks(jax.random.bernoulli(k, keep, blocks.grid_shape(m.shape, BLOCKS)),
                             BLOCKS, m.shape)
        for k, m in zip(keys, leaves, strict=True)
    ])


def test_product_and_its_vjp_against_dense_and_finite_differences():
    hidden, key = 10, jax.random.key(0)
    grids = np.random.default_rng(0).random((3, 3, 3)) < 0.5  # per gate: 3x3 blocks of 4x4
    masks = [np.kron(g, np.ones(BLOCKS, bool))[:10, :10] for g in grids]
    kernels = [jax.random.normal(jax.random.fold_in(key, 10 + g), (10, 10)) for g in range(3)]
    frozen = sparse_training.FrozenBlocks.from_masks(masks, ("r", "z", "n"), BLOCKS)
    assert frozen.nnzb == grids.sum()
    dense = jnp.concatenate([jnp.where(m, k, 0) for m, k in zip(masks, kernels, strict=True)],
                            axis=1)
    h = jax.random.normal(jax.random.key(1), (5, hidden))
    values = sparse_training.gather_blocks(frozen, kernels)
    kernel = sparse_training.SparseRecurrentKernel(values, frozen)
    np.testing.assert_allclose(h @ kernel, h @ dense, rtol=1e-5, atol=1e-5)
    # The stored blocks are those of bsc.from_dense, gate by gate.
    for g in range(3):
        own = from_dense(np.asarray(kernels[g]), masks[g], BLOCKS)
        cols = slice(g * 12, g * 12 + 10)
        np.testing.assert_allclose(
            to_dense(sparse_training._matrix(frozen, values))[:, cols], to_dense(own), atol=0)
    # Custom VJP: dh and d(values) against central differences in float64-free form.
    cotangent = jax.random.normal(jax.random.key(2), (5, 3 * frozen.padded))

    @jax.jit
    def f(h, values):
        return jnp.sum(sparse_training.block_sparse_matmul(frozen, h, values) * cotangent)

    dh, dvalues = jax.jit(jax.grad(f, argnums=(0, 1)))(h, values)
    eps = 1e-2
    for arg, grad in ((0, dh), (1, dvalues)):
        direction = jax.random.normal(jax.random.key(3 + arg), grad.shape)
        args = [h, values]
        plus, minus = list(args), list(args)
        plus[arg], minus[arg] = args[arg] + eps * direction, args[arg] - eps * direction
        numeric = (f(*plus) - f(*minus)) / (2 * eps)
        np.testing.assert_allclose(jnp.sum(grad * direction), numeric, rtol=2e-3)


def test_both_weight_grads_give_the_kept_blocks_of_the_dense_gradient():
    # Per gate 3x3 blocks of 4x4 on a 10x10 kernel (partial edge blocks), N = 7 rows.
    grids = np.random.default_rng(1).random((3, 3, 3)) < 0.5
    masks = [np.kron(g, np.ones(BLOCKS, bool))[:10, :10] for g in grids]
    h = np.asarray(jax.random.normal(jax.random.key(11), (7, 10)))
    dy = np.array(jax.random.normal(jax.random.key(12), (7, 3 * 12)))
    dy.reshape(7, 3, 12)[:, :, 10:] = 0  # padded columns: zero, as the layer's cotangents
    h_pad = np.pad(h.astype(np.float64), ((0, 0), (0, 2)))  # (7, 3 block rows · 4)
    dense = h_pad.T @ dy.astype(np.float64)  # (12, 36), hand-computed in float64
    for weight_grad in ("blocks", "dense"):
        frozen = sparse_training.FrozenBlocks.from_masks(masks, ("r", "z", "n"), BLOCKS,
                                                         weight_grad=weight_grad)
        assert frozen.weight_grad_mode() == weight_grad
        got = jax.jit(functools.partial(sparse_training.kept_weight_grad, frozen))(h, dy)
        assert got.shape == (frozen.nnzb, 4, 4) and frozen.nnzb == grids.sum()
        for k, (r, c) in enumerate(zip(frozen.row_indices, frozen.col_ids, strict=True)):
            np.testing.assert_allclose(got[k], dense[4 * r:4 * r + 4, 4 * c:4 * c + 4],
                                       rtol=1e-5, atol=1e-5)
        # The two modes run different products: one (H, gates·Hp) GEMM, or nnzb small ones.
        jaxpr = str(jax.make_jaxpr(sparse_training.kept_weight_grad, static_argnums=0)(
            frozen, h, dy))
        assert ("f32[10,36] = dot_general" in jaxpr) == (weight_grad == "dense")
        assert (f"f32[{frozen.nnzb},4,4] = dot_general" in jaxpr) == (weight_grad == "blocks")
    # auto: on CPUs "blocks" for few kept weights (as here), else "dense".
    auto = sparse_training.FrozenBlocks.from_masks(masks, ("r", "z", "n"), BLOCKS)
    assert auto.weight_grad_mode() == ("blocks" if jax.default_backend() == "cpu" else "dense")
    big = [np.ones((200, 200), bool)] * 3  # 3·200² kept weights
    assert sparse_training.FrozenBlocks.from_masks(big, ("r", "z", "n"), BLOCKS) \
        .weight_grad_mode() == "dense"


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn_clipped_relu"])
def test_frozen_layers_give_the_masked_dense_numbers_and_gradients(cell):
    model = cells.RNN(cell, 10, num_layers=2)
    x = jax.random.normal(jax.random.key(4), (3, 6, 5))
    lengths = jnp.array([6, 2, 4])
    variables = model.init(jax.random.key(5), x, lengths)
    masks = block_masks(variables["masks"], jax.random.key(6))
    target = jax.random.normal(jax.random.key(7), (3, 6, 10))

    @functools.partial(jax.jit, static_argnums=0)
    def grads(model, params, x):
        def loss(params, x):
            y = model.apply({"params": params, "masks": masks}, x, lengths)
            return jnp.sum(jnp.tanh(y) * target), y

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    (g_ref, gx_ref), y_ref = grads(model, variables["params"], x)
    assert float(jnp.max(jnp.abs(y_ref))) > 0.01
    flat_masks = dict(jax.tree_util.tree_flatten_with_path(masks)[0])
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(g_ref)[0])
    for weight_grad in ("blocks", "dense"):
        frozen = sparse_training.freeze(masks, BLOCKS, weight_grad=weight_grad)
        assert sorted(frozen) == ["layer_0", "layer_1"]
        assert frozen["layer_1"].weight_grad == weight_grad
        fast = model.clone(frozen_recurrent=frozen)
        (g_fast, gx_fast), y_fast = grads(fast, variables["params"], x)
        np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gx_fast, gx_ref, rtol=1e-5, atol=1e-6)
        for path, g in jax.tree_util.tree_flatten_with_path(g_fast)[0]:
            if path in flat_masks and "recurrent" in jax.tree_util.keystr(path):
                kept = np.asarray(flat_masks[path])  # kept: equal; pruned: 0
                assert 0 < kept.mean() < 1
                np.testing.assert_allclose(np.where(kept, g, 0),
                                           np.where(kept, flat_ref[path], 0),
                                           rtol=1e-5, atol=1e-6)
                assert np.all(np.asarray(g)[~kept] == 0)
            else:
                np.testing.assert_allclose(g, flat_ref[path], rtol=1e-5, atol=1e-6)


def test_masks_other_than_the_frozen_ones_are_caught():
    layer = cells.RecurrentLayer("gru", 10)
    x = jax.random.normal(jax.random.key(8), (2, 3, 4))
    variables = layer.init(jax.random.key(9), x)
    masks = block_masks(variables["masks"], jax.random.key(10))
    frozen = {"": sparse_training.freeze({"layer": masks}, BLOCKS)["layer"]}
    fast = layer.clone(frozen_recurrent=frozen)
    good = {"params": variables["params"], "masks": masks}
    assert np.all(np.isfinite(np.asarray(jax.jit(fast.apply)(good, x)[0])))
    changed = jax.tree_util.tree_map(lambda m: m, masks)
    changed["recurrent_n"]["kernel"] = ~masks["recurrent_n"]["kernel"]
    bad = {"params": variables["params"], "masks": changed}
    with pytest.raises(ValueError, match="differ from the frozen block structure in 100 entries"):
        fast.apply(bad, x)
    assert np.all(np.isnan(np.asarray(jax.jit(fast.apply)(bad, x)[0])))
    with pytest.raises(ValueError, match="not block-structured for block_shape"):
        sparse_training.freeze({"layer": masks}, (3, 3))
    with pytest.raises(ValueError, match=r"weight_grad='gemm': choose one of \('auto', "
                                         r"'blocks', 'dense'\)"):
        sparse_training.freeze({"layer": masks}, BLOCKS, weight_grad="gemm")
    with pytest.raises(ValueError, match=r"expected 3 kernels, each \(H, H\) or \(H, Hp\)"):
        sparse_training.gather_blocks(frozen[""], [jnp.zeros((10, 11))] * 3)
    with pytest.raises(ValueError, match=r"frozen_recurrent's entry is for \('r', 'z', 'n'\)"):
        cells.RecurrentLayer("lstm", 10, frozen_recurrent=frozen).init(jax.random.key(0), x)


def test_training_with_sparse_recurrences_after_the_freeze_matches_masked_dense(tiny_text,
                                                                                tmp_path):
    # bp on a GRU of 16 with 4x4 blocks: the schedule ends at step 6, steps 7-11 run frozen.
    # No gradient clipping: its global norm would count the dense layer's straight-through
    # gradients of pruned weights, which the sparse layers do not have.
    states = {}
    for sparse in (False, True):
        config = tiny_lm_config(tiny_text, method="bp")
        config.optimizer.grad_clip = 0.0
        config.prune.sparse_training = sparse
        states[sparse] = train.train_and_evaluate(config, tmp_path / str(sparse))
    assert int(states[True].step) == 12
    jax.tree_util.tree_map(np.testing.assert_array_equal, states[True].masks,
                           states[False].masks)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                           states[True].params, states[False].params)
    recurrent = states[True].masks["layer_0"]["recurrent_r"]["kernel"]
    assert 0 < np.mean(np.asarray(recurrent)) < 0.5  # pruned before the freeze
    config.method = "structural"
    with pytest.raises(ValueError, match="sparse_training needs a pruning method"):
        train.train_and_evaluate(config, tmp_path / "structural")
