"""Pruning and group-lasso transformations against hand-computed masks, SPEC formulas and
finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bsrnn import blocks, cells, pruning
from bsrnn.schedules import CubicSparsity, GradualThreshold


def ones_like_masks(params):
    return jax.tree_util.tree_map(lambda w: jnp.ones(w.shape, bool), params)


def every_step(eps_per_step, start=0, end=1000):
    """A GradualThreshold with ε = eps_per_step·(itr + 1) at every step from 1 on."""
    return GradualThreshold(start, end, end, eps_per_step, eps_per_step, freq=1)


def test_weight_prune_mask_at_an_update_step():
    w = jnp.array([[0.05, -0.3, 0.12], [-0.08, 0.9, -0.11]])
    params = {"fc": {"kernel": w, "bias": jnp.ones(3)}}
    # Updates happen at itr = 5 only; ε there is θ·(5 − 4 + 1)/1 = 2θ = 0.1.
    schedule = GradualThreshold(
        start_itr=4, ramp_itr=6, end_itr=6, start_slope=0.05, ramp_slope=0.05, freq=1
    )
    tx = pruning.weight_prune(schedule)
    state, masks = tx.init(params), {"fc": {"kernel": jnp.ones((2, 3), bool)}}
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    for itr in range(8):
        _, state = tx.update(zero, state, params, masks=masks)
        masks = pruning.updated_masks(state, masks)
        expected = np.abs(w) >= 0.1 if itr >= 5 else np.ones((2, 3), bool)
        np.testing.assert_array_equal(masks["fc"]["kernel"], expected, err_msg=f"itr {itr}")
    assert float(state.thresholds["fc"]["kernel"]) == pytest.approx(0.1)


def test_block_prune_p1_toy_through_the_transform():
    w = jnp.array(
        [
            [0.1, -0.2, 0.9, 0.0],
            [0.3, 0.05, -0.1, 0.2],
            [-0.6, 0.1, 0.3, 0.4],
            [0.0, 0.2, -0.45, 0.1],
        ]
    )
    params = {"fc": {"kernel": w}}
    tx = pruning.block_prune(every_step(0.25), (2, 2), "max")  # ε(1) = 0.5
    state, masks = tx.init(params), ones_like_masks(params)
    updates, state = tx.update({"fc": {"kernel": jnp.zeros((4, 4))}}, state, params, masks=masks)
    updates, state = tx.update(updates, state, params, masks=masks)
    masks = pruning.updated_masks(state, masks)
    expected = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(masks["fc"]["kernel"], expected)
    # Hard mode: the update takes pruned weights to exactly zero and leaves the rest.
    new = optax.apply_updates(params, updates)["fc"]["kernel"]
    np.testing.assert_array_equal(new, np.where(expected, w, 0.0))


def test_cubic_sparsity_prunes_the_lowest_blocks():
    rng = np.random.default_rng(3)
    params = {"fc": {"kernel": jnp.asarray(rng.standard_normal((12, 16)), jnp.float32)}}
    schedule = CubicSparsity(final_sparsity=0.75, begin_step=0, end_step=4, freq=1)
    tx = pruning.block_prune(schedule, (4, 4), "rms")
    state, masks = tx.init(params), ones_like_masks(params)
    zero = {"fc": {"kernel": jnp.zeros((12, 16))}}
    scores = np.asarray(blocks.block_scores(params["fc"]["kernel"], (4, 4), "rms")).ravel()
    for step in range(6):
        _, state = tx.update(zero, state, params, masks=masks)
        masks = pruning.updated_masks(state, masks)
        s = float(schedule.sparsity(min(step, 4)))
        k = int(np.floor(s * 12))
        grid = np.asarray(masks["fc"]["kernel"])[::4, ::4].ravel()
        np.testing.assert_array_equal(grid, ~np.isin(np.arange(12), np.argsort(scores)[:k]))
    assert pruning.mask_sparsity(masks)["total"] == pytest.approx(0.75)


def gru_setup(hidden=8, mask_init=None):
    model = cells.RNN("gru", hidden, recurrent_mask_init=mask_init)
    x = jax.random.normal(jax.random.key(0), (4, 6, 5))
    lengths = jnp.array([6, 5, 3, 1])
    variables = model.init(jax.random.key(1), x, lengths)
    target = jax.random.normal(jax.random.key(2), (4, 6, hidden))

    def loss_fn(params, masks):
        y = model.apply({"params": params, "masks": masks}, x, lengths)
        return jnp.mean((y - target) ** 2)

    return variables, loss_fn


def make_step(tx, loss_fn):
    @jax.jit
    def step(params, masks, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params, masks)
        updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
        params = optax.apply_updates(params, updates)
        return params, pruning.updated_masks(opt_state, masks), opt_state, loss

    return step


def test_hard_mode_pruned_weights_stay_zero_and_sparsity_never_falls():
    variables, loss_fn = gru_setup()
    tx = optax.chain(optax.adam(3e-2), pruning.block_prune(every_step(0.02), (2, 2)))
    params, masks = variables["params"], variables["masks"]
    opt_state, step = tx.init(params), make_step(tx, loss_fn)
    previous = 0.0
    for _ in range(60):
        params, masks, opt_state, _ = step(params, masks, opt_state)
        sparsity = pruning.mask_sparsity(masks)["total"]
        assert sparsity >= previous
        previous = sparsity
        flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
        for path, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
            assert np.all(np.asarray(flat_p[path])[~np.asarray(mask)] == 0.0)
    assert 0.3 < previous < 1.0


def test_regrowth_rejoins_a_block_that_hard_mode_keeps_out():
    w = jnp.array([[0.05, 1.0], [1.0, 1.0]])
    params = {"fc": {"kernel": w}}
    push = {"fc": {"kernel": jnp.array([[-1.0, 0.0], [0.0, 0.0]])}}  # pushes w00 up
    zero = {"fc": {"kernel": jnp.zeros((2, 2))}}
    results = {}
    for mode in pruning.MODES:
        # ε(itr) = 0.05·(itr + 1) from itr 1: w00 = 0.05 < ε(1) = 0.1 is pruned at itr 1.
        tx = optax.chain(optax.sgd(0.1), pruning.weight_prune(every_step(0.05), mode=mode))
        p, masks, state = params, ones_like_masks(params), tx.init(params)
        history = []
        for itr in range(12):
            u, state = tx.update(push if itr >= 3 else zero, state, p, masks=masks)
            p = optax.apply_updates(p, u)
            masks = pruning.updated_masks(state, masks)
            history.append(bool(masks["fc"]["kernel"][0, 0]))
        results[mode] = (history, float(p["fc"]["kernel"][0, 0]))
    hard, regrowth = results["hard"], results["regrowth"]
    assert hard[0][1:] == [False] * 11 and hard[1] == 0.0
    # Shadow w00 after the update at itr k >= 3 is 0.05 + 0.1·(k − 2) against ε = 0.05·(k + 1):
    # below ε at itr 1..3, above it from itr 5 on.
    assert regrowth[0][1:4] == [False] * 3 and regrowth[0][5:] == [True] * 7
    assert regrowth[1] == pytest.approx(0.05 + 0.1 * 9)


def test_per_layer_type_hyper_parameters_and_pass_through():
    variables, _ = gru_setup(hidden=8)
    params, masks = variables["params"], variables["masks"]
    tx = pruning.block_prune(
        {"recurrent": every_step(10.0)}, block_shape={"recurrent": (4, 2)}
    )  # ε = 20 prunes every recurrent block; input kernels are left alone
    state = tx.init(params)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    for _ in range(2):
        _, state = tx.update(zero, state, params, masks=masks)
    new = pruning.updated_masks(state, masks)
    sparsity = pruning.mask_sparsity(new)
    assert sparsity["layer_0/recurrent_z/kernel"] == 1.0
    assert sparsity["layer_0/input_z/kernel"] == 0.0
    assert set(state.masks["layer_0"]) == {"recurrent_r", "recurrent_z", "recurrent_n"}


def test_keep_masked_holds_a_block_diagonal_pattern():
    variables, loss_fn = gru_setup(hidden=8, mask_init=blocks.block_diagonal(4))
    tx = optax.chain(optax.adam(1e-2), pruning.keep_masked())
    params, masks = variables["params"], variables["masks"]
    opt_state, step = tx.init(params), make_step(tx, loss_fn)
    for _ in range(5):
        params, masks, opt_state, _ = step(params, masks, opt_state)
    kernel = np.asarray(params["layer_0"]["recurrent_n"]["kernel"])
    pattern = blocks.block_diagonal(4)((8, 8))
    assert np.all(kernel[~pattern] == 0.0) and np.all(kernel[pattern] != 0.0)
    np.testing.assert_array_equal(masks["layer_0"]["recurrent_n"]["kernel"], pattern)


def numpy_penalty(w, block_shape, lam):
    bh, bw = block_shape
    total = 0.0
    for i in range(0, w.shape[0], bh):
        for j in range(0, w.shape[1], bw):
            total += np.sqrt(np.sum(w[i : i + bh, j : j + bw] ** 2))
    return lam * total


def test_group_lasso_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((7, 10))
    w[4:7, 8:10] = 0.0  # an all-zero partial edge block
    lam, block = 0.3, (4, 4)
    tx = pruning.group_lasso(lam, block)
    params = {"fc": {"kernel": jnp.asarray(w, jnp.float32)}}
    g = {"fc": {"kernel": jnp.zeros((7, 10))}}
    added, _ = tx.update(g, tx.init(params), params)
    added = np.asarray(added["fc"]["kernel"])
    assert np.all(np.isfinite(added))
    h, numeric = 1e-6, np.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        if w[idx] == 0.0:
            continue  # not differentiable there; the transform uses the 0 subgradient
        plus, minus = w.copy(), w.copy()
        plus[idx] += h
        minus[idx] -= h
        difference = numpy_penalty(plus, block, lam) - numpy_penalty(minus, block, lam)
        numeric[idx] = difference / (2 * h)
    np.testing.assert_allclose(added, numeric, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(added[4:7, 8:10], 0.0)
    penalty = float(pruning.group_lasso_penalty(params, lam, block))
    assert penalty == pytest.approx(numpy_penalty(w, block, lam), rel=1e-5)


def test_group_lasso_no_nan_on_an_all_zero_matrix_in_training():
    variables, loss_fn = gru_setup()
    params = jax.tree_util.tree_map(jnp.zeros_like, variables["params"])
    tx = pruning.glp(optax.sgd(0.1), 1e-2, every_step(0.01), (2, 2))
    step = make_step(tx, loss_fn)
    params, masks, _, loss = step(params, variables["masks"], tx.init(params))
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_group_lasso_prox_soft_thresholds_each_block():
    w = jnp.array([[3.0, 4.0, 0.3, 0.4]])  # block norms 5 and 0.5 with (1, 2) blocks
    params = {"fc": {"kernel": w}}
    tx = pruning.group_lasso_prox(strength=2.0, learning_rate=0.5, block_shape=(1, 2))
    u, _ = tx.update({"fc": {"kernel": jnp.zeros((1, 4))}}, tx.init(params), params)
    new = optax.apply_updates(params, u)["fc"]["kernel"]
    np.testing.assert_allclose(new, [[2.4, 3.2, 0.0, 0.0]], rtol=1e-6)  # factor 1 − 1/5


def test_bad_inputs_raise_clear_errors():
    params = {"fc": {"kernel": jnp.ones((8, 8))}}
    masks = ones_like_masks(params)
    with pytest.raises(ValueError, match="fc/kernel: block_shape \\(16, 2\\) is larger"):
        pruning.block_prune(every_step(0.1), (16, 2)).init(params)
    with pytest.raises(ValueError, match="unknown block reduction 'sum'"):
        pruning.block_prune(every_step(0.1), (2, 2), "sum").init(params)
    with pytest.raises(ValueError, match="unknown pruning mode 'soft'"):
        pruning.block_prune(every_step(0.1), mode="soft")
    with pytest.raises(ValueError, match="GradualThreshold or CubicSparsity"):
        pruning.block_prune(0.5)
    tx = pruning.block_prune(every_step(0.1), (2, 2))
    state = tx.init(params)
    with pytest.raises(ValueError, match="keep_masked needs the masks to keep"):
        pruning.keep_masked().update(params, optax.EmptyState(), params)
    with pytest.raises(ValueError, match="no entry for the pruned kernels \\['fc/kernel'\\]"):
        tx.update(params, state, params, masks={"other": {"kernel": jnp.ones((8, 8), bool)}})
    with pytest.raises(ValueError, match="shape \\(4, 8\\) but the kernel has shape \\(8, 8\\)"):
        tx.update(params, state, params, masks={"fc": {"kernel": jnp.ones((4, 8), bool)}})
    with pytest.raises(ValueError, match="block_shape has no entry for layer type 'fc'"):
        pruning.block_prune({"fc": every_step(0.1)}, {"recurrent": (2, 2)}).init(params)
    with pytest.raises(ValueError, match="masks tree does not have"):
        pruning.updated_masks(state, {"x": {"kernel": jnp.ones((8, 8), bool)}})
    assert pruning.updated_masks(state, masks)["fc"]["kernel"].shape == (8, 8)


def test_default_layer_type():
    lt = pruning.default_layer_type
    w2, w4 = jnp.ones((3, 3)), jnp.ones((3, 3, 1, 1))
    assert lt(("layer_0", "recurrent_r", "kernel"), w2) == "recurrent"
    assert lt(("layer_0", "input_r", "kernel"), w2) == "input"
    assert lt(("head", "kernel"), w2) == "fc"
    assert lt(("head", "bias"), jnp.ones(3)) is None
    assert lt(("conv", "kernel"), w4) is None
    assert lt(("embed", "embedding"), w2) is None
    # Integer keys (list indices, nnx.List) name no module.
    assert lt(("layers", 0, "recurrent_z", "kernel"), w2) == "recurrent"
    assert lt((3, "kernel"), w2) == "fc"


def numpy_keep_lowest_out(scores, sparsity):
    """Reference: a stable argsort drops the floor(s·n) lowest, ties by position."""
    flat = scores.ravel()
    k = int(np.floor(np.float32(sparsity) * flat.size))
    order = np.argsort(flat, kind="stable")
    keep = np.ones(flat.size, bool)
    keep[order[:k]] = False
    return keep.reshape(scores.shape), (flat[order[k - 1]] if k else np.float32(0.0))


@pytest.mark.parametrize("shape", [(7, 9), (40, 130)])
def test_sort_free_cut_matches_a_stable_sort_with_ties(shape):
    rng = np.random.default_rng(5)
    # Scores on a coarse grid (many ties, some exact zeros) and spread over many octaves.
    coarse = np.round(np.abs(rng.standard_normal(shape)) * 4) / 4
    spread = np.abs(rng.standard_normal(shape) * np.exp(rng.uniform(-20, 5, shape)))
    for scores in (coarse.astype(np.float32), spread.astype(np.float32)):
        for sparsity in (0.0, 1.5 / scores.size, 0.3, 0.5, 0.9, 0.999):
            keep, cut = jax.jit(pruning._keep_lowest_out)(jnp.asarray(scores), sparsity)
            expected_keep, expected_cut = numpy_keep_lowest_out(scores, sparsity)
            np.testing.assert_array_equal(keep, expected_keep, err_msg=f"s={sparsity}")
            assert np.float32(cut).tobytes() == np.float32(expected_cut).tobytes()


def mixed_schedules():
    """Different update steps per layer type: cubic every 3 steps from 1, P2's every 2."""
    return {
        "recurrent": CubicSparsity(0.6, begin_step=1, end_step=7, freq=3),
        "input": GradualThreshold(0, 4, 8, start_slope=0.05, ramp_slope=0.1, freq=2),
    }


@pytest.mark.parametrize("mode", pruning.MODES)
def test_host_decided_updates_give_bitwise_the_same_training(mode):
    variables, loss_fn = gru_setup(hidden=8)
    schedule = mixed_schedules()
    tx = optax.chain(optax.adam(3e-2), pruning.block_prune(schedule, (2, 2), mode=mode))

    @functools.partial(jax.jit, static_argnames="update_masks")
    def step(params, masks, opt_state, update_masks=None):
        grads = jax.grad(loss_fn)(params, masks)
        updates, opt_state = tx.update(
            grads, opt_state, params, masks=masks, update_masks=update_masks
        )
        return (
            optax.apply_updates(params, updates),
            pruning.updated_masks(opt_state, masks),
            opt_state,
        )

    due = pruning.update_steps(schedule, np.arange(10))
    assert due.tolist() == [False, True, True, False, True, False, True, True, False, False]
    hints = {"device": lambda t: None, "host": lambda t: bool(due[t]), "always": lambda t: True}
    start = (variables["params"], variables["masks"], tx.init(variables["params"]))
    runs = {name: [start] for name in hints}
    for name, hint in hints.items():
        for t in range(10):
            runs[name].append(step(*runs[name][-1], update_masks=hint(t)))
    for t in range(11):
        reference = jax.tree_util.tree_leaves(runs["device"][t])
        for name in ("host", "always"):
            for a, b in zip(reference, jax.tree_util.tree_leaves(runs[name][t]), strict=True):
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (name, t)
    # Not vacuous: the masks did change, at update steps only.
    sparsity = [pruning.mask_sparsity(run[1])["total"] for run in runs["device"]]
    assert sparsity[-1] > 0.2
    changed = [t for t in range(10) if sparsity[t + 1] != sparsity[t]]
    assert changed and all(due[t] for t in changed)


def test_only_the_device_decided_step_has_a_conditional():
    params = {
        "a": {"kernel": jnp.ones((4, 4))},
        "b": {"kernel": jnp.ones((4, 8))},
        "c": {"kernel": jnp.ones((8, 4))},
    }
    masks = ones_like_masks(params)
    tx = pruning.block_prune(mixed_schedules() | {"fc": every_step(0.1)}, (2, 2))
    state = tx.init(params)

    def conditionals(update_masks):
        jaxpr = jax.make_jaxpr(
            lambda u, s, p, m: tx.update(u, s, p, masks=m, update_masks=update_masks)
        )(params, state, params, masks)
        return sum(eqn.primitive.name == "cond" for eqn in jaxpr.jaxpr.eqns)

    assert [conditionals(h) for h in (None, True, False)] == [1, 0, 0]
    with pytest.raises(ValueError, match="update_masks must be None, True or False"):
        tx.update(params, state, params, masks=masks, update_masks=jnp.array(True))
