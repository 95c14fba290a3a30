"""The masks the pruning transformations hold: Flax's ``TrainState`` and NNX's ``Optimizer``
unchanged, a missing write-back raises, leaves chosen by labels or key-path predicates,
and any pytree (integer keys, lists, ``nnx.State``) gives the masks a dict gives."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

from bsrnn import blocks, cells, pruning
from bsrnn.schedules import CubicSparsity

FINAL = 0.7  # 16 blocks of an 8x8 kernel -> floor(11.2) = 11 pruned, not 70%


def gru():
    model = cells.RNN("gru", 8)
    x = jax.random.normal(jax.random.key(0), (3, 5, 4))
    lengths = jnp.array([5, 4, 2])
    variables = model.init(jax.random.key(1), x, lengths)
    target = jax.random.normal(jax.random.key(2), (3, 5, 8))

    def loss_fn(params, masks):
        y = model.apply({"params": params, "masks": masks}, x, lengths)
        return jnp.mean((y - target) ** 2)

    return model, variables, loss_fn


def expected_sparsity(masks, block=(2, 2), final=FINAL):
    """By hand: each kernel loses floor(final · blocks) whole blocks."""
    pruned = total = 0
    for mask in jax.tree_util.tree_leaves(masks):
        rows, cols = mask.shape
        n = (rows // block[0]) * (cols // block[1])
        pruned += math.floor(final * n) * block[0] * block[1]
        total += mask.size
    return pruned / total


def test_flax_train_state_trains_to_the_schedule_target():
    model, variables, loss_fn = gru()
    tx = optax.chain(
        optax.adam(1e-2),
        pruning.block_prune(CubicSparsity(FINAL, 0, 4, freq=2), (2, 2), masks=variables["masks"]),
    )
    state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

    @jax.jit
    def step(state):
        grads = jax.grad(loss_fn)(state.params, pruning.masks_from(state.opt_state))
        return state.apply_gradients(grads=grads)

    for _ in range(6):
        state = step(state)
    masks = pruning.masks_from(state.opt_state)
    assert jax.tree_util.tree_structure(masks) == jax.tree_util.tree_structure(variables["masks"])
    assert pruning.mask_sparsity(masks)["total"] == pytest.approx(expected_sparsity(masks))
    for path, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
        kernel = np.asarray(dict(jax.tree_util.tree_flatten_with_path(state.params)[0])[path])
        assert np.all(kernel[~np.asarray(mask)] == 0.0) and np.all(kernel[np.asarray(mask)] != 0)


def stale_loop(tx, variables, loss_fn, steps, write_back):
    @jax.jit
    def step(params, masks, opt_state):
        grads = jax.grad(loss_fn)(params, masks)
        updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
        params = optax.apply_updates(params, updates)
        if write_back:
            masks = pruning.masks_from(opt_state)
        return params, masks, opt_state

    params, masks = variables["params"], variables["masks"]
    opt_state = tx.init(params)
    for _ in range(steps):
        params, masks, opt_state = jax.block_until_ready(step(params, masks, opt_state))
    return masks


def test_a_missing_write_back_raises_instead_of_training_dense():
    _, variables, loss_fn = gru()
    schedule = CubicSparsity(FINAL, 0, 4, freq=2)  # updates at counts 0, 2, 4
    tx = optax.chain(
        optax.adam(1e-2), pruning.block_prune(schedule, (2, 2), masks=variables["masks"])
    )
    kept = stale_loop(tx, variables, loss_fn, 6, write_back=True)
    assert pruning.mask_sparsity(kept)["total"] == pytest.approx(expected_sparsity(kept))
    # Count 0 prunes nothing (cubic starts at 0), count 2 prunes: the stale collection
    # (all ones) is caught at the update at count 4.
    with pytest.raises(jax.errors.JaxRuntimeError, match="does not write the new masks back"):
        stale_loop(tx, variables, loss_fn, 6, write_back=False)
    # Eagerly, a plain ValueError naming the kernels and the line to add.
    params = variables["params"]
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    prune = pruning.block_prune(schedule, (2, 2), masks=variables["masks"])
    state = prune.init(params)
    for _ in range(4):  # counts 0 to 3: at 3 no update, so no check
        _, state = prune.update(zero, state, params, masks=variables["masks"])
    with pytest.raises(ValueError, match=r"layer_0/input_n/kernel.*pruning.masks_from"):
        prune.update(zero, state, params, masks=variables["masks"])


def test_keep_masked_holds_its_pattern_without_masks_argument():
    pattern = blocks.block_diagonal(4)((8, 8))
    params = {"rec": {"kernel": jnp.ones((8, 8))}}
    tx = optax.chain(optax.sgd(0.1), pruning.keep_masked({"rec": {"kernel": pattern}}))
    grads = {"rec": {"kernel": -jnp.ones((8, 8))}}
    updates, opt_state = tx.update(grads, tx.init(params), params)
    new = np.asarray(optax.apply_updates(params, updates)["rec"]["kernel"])
    np.testing.assert_allclose(new, np.where(pattern, 1.1, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(pruning.masks_from(opt_state)["rec"]["kernel"], pattern)


def weights():
    rng = np.random.default_rng(7)
    return [
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in [(8, 8), (4, 8), (8, 8), (8, 3)]
    ]


def pruned_masks(params, steps=3, **kwargs):
    tx = pruning.block_prune(CubicSparsity(FINAL, 0, 1, freq=1), (2, 2), **kwargs)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    state = tx.init(params)
    for _ in range(steps):
        _, state = tx.update(zero, state, params)
    return pruning.masks_from(state)


def test_any_pytree_gives_the_masks_a_dict_gives():
    w = weights()
    as_dict = {
        "layer_0": {"recurrent": {"kernel": w[0]}, "input": {"kernel": w[1]}},
        "layer_1": {"recurrent": {"kernel": w[2]}},
        "head": {"kernel": w[3]},
    }
    # Integer dict keys and a list: default_layer_type skips the integers.
    as_list = {
        "layers": [
            {"recurrent": {"kernel": w[0]}, "input": {"kernel": w[1]}},
            {"recurrent": {"kernel": w[2]}},
        ],
        "head": {"kernel": w[3]},
    }
    by_int = {
        "layers": {
            0: {"recurrent": {"kernel": w[0]}, "input": {"kernel": w[1]}},
            1: {"recurrent": {"kernel": w[2]}},
        },
        "head": {"kernel": w[3]},
    }
    reference = pruned_masks(as_dict)
    ref = [
        reference["layer_0"]["recurrent"]["kernel"],
        reference["layer_0"]["input"]["kernel"],
        reference["layer_1"]["recurrent"]["kernel"],
        reference["head"]["kernel"],
    ]
    # Not vacuous: each kernel lost floor(0.7 · blocks) blocks of its lowest max |w|.
    for weight, mask in zip(w[:3], ref[:3], strict=True):
        scores = np.asarray(blocks.block_scores(weight, (2, 2), "max")).ravel()
        lowest = np.argsort(scores)[: math.floor(FINAL * scores.size)]
        grid = np.asarray(mask)[::2, ::2].ravel()
        np.testing.assert_array_equal(grid, ~np.isin(np.arange(scores.size), lowest))
    for tree in (as_list, by_int):
        got = pruned_masks(tree)
        layers = got["layers"]
        for mask, expected in zip(
            [
                layers[0]["recurrent"]["kernel"],
                layers[0]["input"]["kernel"],
                layers[1]["recurrent"]["kernel"],
                got["head"]["kernel"],
            ],
            ref,
            strict=True,
        ):
            np.testing.assert_array_equal(mask, expected)


class Layer(nnx.Module):
    def __init__(self, din, rngs):
        self.input = nnx.Linear(din, 8, use_bias=False, rngs=rngs)
        self.recurrent = nnx.Linear(8, 8, rngs=rngs)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([Layer(4, rngs), Layer(8, rngs)])

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer.recurrent(jnp.tanh(layer.input(x))))
        return x


def test_nnx_state_and_optimizer_without_masks_argument():
    model = Net(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    plain = {
        f"layer_{i}": {
            name: {"kernel": params["layers"][i][name]["kernel"][...]}
            for name in ("input", "recurrent")
        }
        for i in range(2)
    }
    reference = pruned_masks(plain)
    got = pruned_masks(params)
    for i in range(2):
        for name in ("input", "recurrent"):
            np.testing.assert_array_equal(
                got["layers"][i][name]["kernel"], reference[f"layer_{i}"][name]["kernel"]
            )
    # nnx.Optimizer calls tx.update(grads, opt_state, params): no masks=.
    tx = optax.chain(
        optax.sgd(1e-2), pruning.block_prune(CubicSparsity(FINAL, 0, 1, freq=1), (2, 2))
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.ones((2, 4))
    for _ in range(3):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
    masks = pruning.masks_from(optimizer.opt_state)
    kernel = np.asarray(model.layers[1].recurrent.kernel[...])
    mask = np.asarray(jax.tree_util.tree_leaves(masks["layers"][1]["recurrent"]["kernel"])[0])
    assert 1 - mask.mean() == pytest.approx(math.floor(FINAL * 16) / 16)
    assert np.all(kernel[~mask] == 0.0)


def test_layer_type_as_labels_tree_callable_or_key_path_predicate():
    w = weights()
    params = {"layers": [{"a": {"kernel": w[0]}, "b": {"kernel": w[1]}}], "c": {"kernel": w[2]}}
    labels = {
        "layers": [{"a": {"kernel": "recurrent"}, "b": {"kernel": None}}],
        "c": {"kernel": "fc"},
    }
    schedule = {
        "recurrent": CubicSparsity(FINAL, 0, 1, freq=1),
        "fc": CubicSparsity(0.25, 0, 1, freq=1),
    }

    def predicate(path, leaf):  # (str | int, ...) paths
        return {("layers", 0, "a", "kernel"): "recurrent", ("c", "kernel"): "fc"}.get(path)

    results = []
    for layer_type in (labels, lambda p: labels, predicate):
        tx = pruning.block_prune(schedule, (2, 2), layer_type=layer_type)
        state = tx.init(params)
        zero = jax.tree_util.tree_map(jnp.zeros_like, params)
        for _ in range(2):
            _, state = tx.update(zero, state, params)
        results.append(pruning.masks_from(state))
    for masks in results:
        assert set(masks) == {"layers", "c"} and set(masks["layers"][0]) == {"a"}
        assert 1 - np.mean(masks["layers"][0]["a"]["kernel"]) == pytest.approx(11 / 16)
        assert 1 - np.mean(masks["c"]["kernel"]) == pytest.approx(4 / 16)
    with pytest.raises(ValueError, match=r"no label for \['c/kernel'\]"):
        pruning.block_prune(schedule, layer_type={"layers": labels["layers"]}).init(params)
    with pytest.raises(ValueError, match="layer-type strings or None"):
        pruning.block_prune(schedule, layer_type={**labels, "c": {"kernel": 3}}).init(params)
