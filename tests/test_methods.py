"""config.method -> optax chain: which kernels are pruned, the schedules' numbers, the order
of the chain, and the messages of configs that do not fit together."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from bsrnn import methods, pruning, schedules


def tiny_config(method="bp", **prune):
    config = load_config("shakespeare_gru", f"method={method},steps=1000")
    config.prune.layer_types = ("input", "recurrent", "fc")
    config.prune.update(begin_fraction=0.1, ramp_fraction=0.25, end_fraction=0.5)
    for key, value in prune.items():
        config.prune[key] = value
    return config


PARAMS = {
    "layer_0": {"input_r": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
                "recurrent_r": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)}},
    "output": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)},
    "proj": {"kernel": jnp.ones((8, 8))},  # a plain nn.Dense: no mask
}
MASKS = {
    "layer_0": {"input_r": {"kernel": jnp.ones((4, 8), bool)},
                "recurrent_r": {"kernel": jnp.ones((8, 8), bool)}},
    "output": {"kernel": jnp.ones((8, 4), bool)},
}


def test_only_masked_kernels_of_the_listed_types_are_prunable():
    layer_type = methods.prunable_layer_type(MASKS, ("recurrent", "fc"))
    selected = {
        "/".join(p): layer_type(p, leaf)
        for p, leaf in jax.tree_util.tree_flatten_with_path(PARAMS)[0]
        for p in [tuple(k.key for k in p)]
    }
    assert {k: v for k, v in selected.items() if v} == {
        "layer_0/recurrent_r/kernel": "recurrent", "output/kernel": "fc"}
    with pytest.raises(ValueError, match="unknown types.*'conv'"):
        methods.prunable_layer_type(MASKS, ("conv",))


def test_gl_cut_prunes_once_at_the_end_step_to_the_target_sparsity():
    config = tiny_config("gl")
    config.prune.sparsity.recurrent = 0.8
    cut = methods._gl_cut(config, "recurrent")
    steps = np.arange(1000)
    updates = steps[np.asarray(cut.is_update_step(steps))].tolist()
    assert updates == [499, 500]  # end_fraction 0.5 of 1000 steps, and the step before
    assert [float(cut.sparsity(s)) for s in (0, 498, 499, 500, 999)] == pytest.approx(
        [0, 0, 0, 0.8, 0.8])


def test_gradual_schedule_is_p2_eq1_scaled_for_blocks():
    config = tiny_config("bp", schedule="gradual")
    config.prune.q.recurrent = 0.3
    config.prune.block_shape.recurrent = (4, 4)
    config.prune.layer_types = ("recurrent",)
    (schedule,) = methods.pruning_schedules(config).values()
    start, ramp, end, freq = 100, 250, 500, 100  # fractions 0.1, 0.25, 0.5 of 1000
    theta = 2 * 0.3 * freq / (2 * (ramp - start) + 3 * (end - ramp))  # P2 Eq. 1
    assert schedule.start_slope == pytest.approx(theta * 16 ** 0.25)  # P1: θ_b = θ N_b^(1/4)
    assert schedule.ramp_slope == pytest.approx(1.5 * theta * 16 ** 0.25)
    assert (schedule.start_itr, schedule.ramp_itr, schedule.end_itr) == (start, ramp, end)
    config.prune.q.recurrent = 0.0
    with pytest.raises(ValueError, match=r"q.recurrent=0.0.*90th percentile"):
        methods.pruning_schedules(config)


def test_cubic_schedule_per_layer_type():
    config = tiny_config("bp")
    config.prune.sparsity.fc = 0.5
    result = methods.pruning_schedules(config)
    assert result["fc"] == schedules.CubicSparsity(0.5, 100, 500, 100)
    assert result["recurrent"].final_sparsity == 0.92  # the default config's


def test_learning_rate_warmup_then_cosine_to_the_final_fraction():
    config = tiny_config()
    config.optimizer.update(learning_rate=0.1, warmup_steps=100, schedule="cosine",
                            final_lr_fraction=0.1)
    lr = methods.learning_rate_schedule(config)
    assert float(lr(0)) == 0.0 and float(lr(50)) == pytest.approx(0.05)
    assert float(lr(100)) == pytest.approx(0.1)
    assert float(lr(550)) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))  # half-way down the cosine
    assert float(lr(1000)) == pytest.approx(0.01)


def test_glp_adds_the_group_lasso_gradient_before_the_optimizer():
    config = tiny_config("glp")
    config.optimizer.update(name="sgd", learning_rate=0.5, momentum=0.0, nesterov=False,
                            grad_clip=0.0, schedule="constant", warmup_steps=0)
    config.group_lasso.glp_strength.recurrent = 0.01
    params = {"layer_0": {"recurrent_r": {"kernel": jnp.arange(64.0).reshape(8, 8) / 64}}}
    masks = {"layer_0": {"recurrent_r": {"kernel": jnp.ones((8, 8), bool)}}}
    tx, _ = methods.create_optimizer(config, masks)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params, masks=masks)
    w = np.asarray(params["layer_0"]["recurrent_r"]["kernel"])
    norms = np.sqrt((w.reshape(2, 4, 2, 4) ** 2).sum(axis=(1, 3)))
    gl_grad = w / np.kron(norms, np.ones((4, 4)))
    np.testing.assert_allclose(updates["layer_0"]["recurrent_r"]["kernel"],
                               -0.5 * (1.0 + 0.01 * gl_grad), rtol=1e-6)


def test_dense_chain_is_the_plain_optimizer():
    config = tiny_config("dense")
    tx, lr = methods.create_optimizer(config, MASKS)
    params = {k: v for k, v in PARAMS.items() if k != "proj"}
    grads = jax.tree_util.tree_map(lambda x: 0.1 * jnp.ones_like(x), params)
    ours, _ = tx.update(grads, tx.init(params), params, masks=MASKS)
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    theirs, _ = reference.update(grads, reference.init(params), params)
    jax.tree_util.tree_map(np.testing.assert_allclose, ours, theirs)


@pytest.mark.parametrize("change,message", [
    (dict(method="magic"), r"config.method='magic'; choose one of"),
    (dict(method="structural", modules=1), r"needs config.structure.num_modules >= 2"),
    (dict(begin_fraction=0.6), r"begin_fraction <= ramp_fraction"),
    (dict(schedule="linear"), r"config.prune.schedule='linear'"),
    (dict(steps=1), r"pruning schedule is empty"),
])
def test_configs_that_do_not_fit_are_rejected_by_name(change, message):
    config = tiny_config("bp")
    config.method = change.get("method", "bp")
    config.structure.num_modules = change.get("modules", 8)
    config.num_steps = change.get("steps", 1000)
    for key in ("begin_fraction", "schedule"):
        if key in change:
            config.prune[key] = change[key]
    with pytest.raises(ValueError, match=message):
        methods.create_optimizer(config, MASKS)


@pytest.mark.parametrize("method,prunes,blocks", [
    ("dense", False, False), ("structural", False, False), ("wp", True, False),
    ("bp", True, True), ("gl", True, True), ("glp", True, True),
])
def test_method_predicates_say_what_each_method_prunes(method, prunes, blocks):
    config = tiny_config(method, block_shape={"input": (4, 2), "recurrent": (2, 8), "fc": (1, 4)})
    assert methods.prunes(config) is prunes
    assert methods.prunes_blocks(config) is blocks
    if prunes:  # wp prunes single weights whatever config.prune.block_shape says
        assert methods.block_shape(config, "recurrent") == ((2, 8) if blocks else (1, 1))


@pytest.mark.parametrize("method,expected", [
    ("bp", [100, 200, 300, 400, 500]),  # cubic from 10% to 50% of 1000 steps, freq 100
    ("wp", [100, 200, 300, 400, 500]),
    ("gl", [499, 500]),  # the one cut at the end step, and the step before
    ("dense", []),
    ("structural", []),
])
def test_mask_update_steps_are_where_the_chain_changes_masks(method, expected):
    config = tiny_config(method)
    config.num_steps = 1000
    due = methods.mask_update_steps(config)
    assert due.shape == (1000,) and np.flatnonzero(due).tolist() == expected
    if not expected:
        return
    # The chain's own decision agrees: on a step the host calls quiet (update_masks=False)
    # the device-decided step (None) leaves the masks as they are; on a due step it prunes.
    params = {"layer_0": {"recurrent_r": {"kernel": jax.random.normal(jax.random.key(0),
                                                                      (8, 8))}}}
    masks = {"layer_0": {"recurrent_r": {"kernel": jnp.ones((8, 8), bool)}}}
    tx, _ = methods.create_optimizer(config, masks)
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    for step in (expected[-1] + 1, expected[-1]):  # after the end step (quiet), the end step
        at_step = jax.tree_util.tree_map(  # every count of the chain set to the step
            lambda x, step=step: jnp.full_like(x, step) if x.dtype == jnp.int32 else x, state)
        results = [tx.update(grads, at_step, params, masks=masks, update_masks=hint)
                   for hint in (None, bool(due[step]))]
        for a, b in zip(*(jax.tree_util.tree_leaves(r) for r in results), strict=True):
            np.testing.assert_array_equal(a, b)
        new_masks = pruning.updated_masks(results[0][1], masks)
        assert np.all(new_masks["layer_0"]["recurrent_r"]["kernel"]) != bool(due[step]), step


def test_block_exponent_replaces_p1s_quarter():
    config = tiny_config("bp", schedule="gradual", block_exponent=0.125)
    config.prune.q.recurrent = 0.3
    config.prune.block_shape.recurrent = (8, 8)
    config.prune.layer_types = ("recurrent",)
    (schedule,) = methods.pruning_schedules(config).values()
    theta = 2 * 0.3 * 100 / (2 * 150 + 3 * 250)  # P2 Eq. 1 at 100, 250, 500
    assert schedule.start_slope == pytest.approx(theta * 64 ** 0.125)


def test_q_per_layer_gives_each_layer_its_own_threshold():
    # Weight pruning at the last update step (400) before the end (500): each layer keeps
    # the weights with |w| >= ε(400) of its own q; the two input layers share a type.
    config = tiny_config("wp", schedule="gradual")
    q = {"layer_0/input": 0.5, "layer_1/input": 1.5, "layer_0/recurrent": 1.0, "output": 0.2}
    config.prune.q_layers = tuple(q.items())
    key = jax.random.split(jax.random.key(1), 4)
    params = {"layer_0": {"input_r": {"kernel": jax.random.normal(key[0], (4, 8))},
                          "recurrent_r": {"kernel": jax.random.normal(key[1], (8, 8))}},
              "layer_1": {"input_r": {"kernel": 2 * jax.random.normal(key[2], (8, 8))}},
              "output": {"kernel": jax.random.normal(key[3], (8, 4))}}
    masks = jax.tree_util.tree_map(lambda w: jnp.ones(w.shape, bool), params)
    tx, _ = methods.create_optimizer(config, masks)
    state = jax.tree_util.tree_map(
        lambda x: jnp.full_like(x, 400) if x.dtype == jnp.int32 else x, tx.init(params))
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    _, state = tx.update(grads, state, params, masks=masks)
    got = pruning.updated_masks(state, masks)
    for path, layer in ((("layer_0", "input_r"), "layer_0/input"),
                        (("layer_1", "input_r"), "layer_1/input"),
                        (("layer_0", "recurrent_r"), "layer_0/recurrent"), (("output",), "output")):
        eps = schedules.GradualThreshold.from_quantile(q[layer], 100, 250, 500, 100).threshold(400)
        w = params
        m = got
        for part in (*path, "kernel"):
            w, m = w[part], m[part]
        np.testing.assert_array_equal(m, np.abs(w) >= float(eps), err_msg=layer)
        assert 0 < m.sum() < m.size, layer  # the threshold falls inside each layer's |w|
    # Every pruned layer needs its q, and names must be the model's.
    config.prune.q_layers = tuple((k, v) for k, v in q.items() if k != "output") + (
        ("layer_9/input", 0.1),)
    with pytest.raises(ValueError, match=r"no q for the pruned layers \['output'\].*unknown "
                                         r"layers \['layer_9/input'\]"):
        methods.create_optimizer(config, masks)
    config.prune.q_layers = (("output", float("nan")),)
    with pytest.raises(ValueError, match=r"q must be > 0.*'output': nan"):
        methods.create_optimizer(config, masks)
    config.prune.q_layers = tuple(q.items())
    config.prune.schedule = "cubic"
    with pytest.raises(ValueError, match="q_layers sets the gradual threshold per layer"):
        methods.create_optimizer(config, masks)


def test_q_per_layer_keeps_the_update_steps():
    config = tiny_config("bp", schedule="gradual")
    config.prune.q_layers = (("layer_0/input", 0.5),)
    assert np.flatnonzero(methods.mask_update_steps(config)).tolist() == [200, 300, 400]
