"""A vmapped sweep trains each member as the ordinary train step does alone, and refuses
members whose shapes differ."""

import functools

import jax
import numpy as np
import pytest
from conftest import tiny_lm_config
from flax import traverse_util

from bsrnn import input_pipeline, train, vmap_sweep


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def alone(config, steps):
    """Losses (steps,) and final state of ``config`` through ``train.train_step``."""
    dataset = input_pipeline.load(config)
    model = train.create_model(config, dataset)
    state, tx, _ = train.initial_state(config, model, dataset.task,
                                       input_pipeline.example_batch(dataset, config))
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, task=dataset.task))
    batches, losses = input_pipeline.train_batches(dataset, config, None), []
    for _ in range(steps):
        state, metrics = step(state, next(batches)[0])
        losses.append(float(metrics["loss"]))
    return np.asarray(losses), state


def member_configs(text, method, overrides):
    configs = []
    for values in overrides:
        config = tiny_lm_config(text, method=method, steps=10)
        for key, value in values.items():
            *parents, leaf = key.split(".")
            node = config
            for name in parents:
                node = node[name]
            node[leaf] = value
        configs.append(config)
    return configs


@pytest.mark.parametrize("method, overrides", [
    # Cubic block pruning: seed, learning rate and target sparsity per member.
    ("bp", [{"seed": 0}, {"seed": 1, "optimizer.learning_rate": 1e-2},
            {"seed": 2, "prune.sparsity.recurrent": 0.5, "prune.sparsity.fc": 0.25}]),
    # GLP with the gradual schedule: λ_g, q (the slopes) and φ/θ per member.
    ("glp", [{"prune.schedule": "gradual", "prune.q.input": 0.1, "prune.q.recurrent": 0.1,
              "prune.q.fc": 0.1, "group_lasso.glp_strength.recurrent": 1e-3},
             {"prune.schedule": "gradual", "prune.q.input": 0.3, "prune.q.recurrent": 0.2,
              "prune.q.fc": 0.15, "group_lasso.glp_strength.recurrent": 1e-1,
              "prune.ramp_ratio": 2.0}]),
])
def test_members_train_as_they_would_alone(tiny_text, method, overrides):
    configs = member_configs(tiny_text, method, overrides)
    states, losses = vmap_sweep.train_members(configs)
    assert losses.shape == (10, len(configs))
    for i, config in enumerate(configs):
        expected_losses, expected = alone(config, 10)
        np.testing.assert_allclose(losses[:, i], expected_losses, rtol=1e-5)
        got = vmap_sweep.member(states, i)
        for path, mask in flat(expected.masks).items():
            np.testing.assert_array_equal(flat(got.masks)[path], mask, err_msg=path)
        for path, w in flat(expected.params).items():
            np.testing.assert_allclose(flat(got.params)[path], w, rtol=1e-4, atol=1e-6,
                                       err_msg=path)
    sparsities = [np.mean(np.concatenate([~m.ravel() for m in flat(masks).values()]))
                  for masks in (vmap_sweep.member(states, i).masks for i in range(len(configs)))]
    assert len(set(sparsities)) > 1  # the members really prune differently


@pytest.mark.parametrize("key, value", [("model.features", 32),
                                        ("prune.block_shape.recurrent", (8, 8))])
def test_members_that_differ_in_shapes_are_refused(tiny_text, key, value):
    configs = member_configs(tiny_text, "bp", [{}, {key: value}])
    with pytest.raises(ValueError, match=rf"differ in \['{key}'\].*launch.py --sweep"):
        vmap_sweep.stack_values(configs)
