"""A vmapped sweep trains each member as the ordinary train step does alone, and refuses
members whose shapes differ."""

import functools

import jax
import numpy as np
import pytest
from conftest import tiny_lm_config
from flax import traverse_util

from bsrnn import data, models, train, vmap_sweep


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def alone(config, steps):
    """Losses (steps,) and final state of ``config`` through ``train.train_step``."""
    dataset = data.load(config)
    model = train.create_model(config, dataset)
    task = models.model_module(config.model_name)
    state, tx, _ = train.initial_state(config, model, task, data.example_batch(dataset, config))
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, task=task))
    batches, losses = dataset.train_batches(config), []
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


def test_launcher_vmap_sweep_reports_each_member_as_a_run_would(tiny_text, tmp_path):
    """``run_sweep(..., vmap=True)`` (``launch.py --sweep=F --vmap``) on 2 seeds: one report
    per member in its sub-workdir, with the final train loss (mean of the last log window),
    the valid and test metrics and the masks of a sequential run of that member."""
    import json

    from bsrnn import launcher, report

    config = tiny_lm_config(tiny_text, method="bp", steps=6)
    config.log_every, config.checkpoint_every, config.eval_every = 4, 4, 100
    config.export_timing = False
    sweep = tmp_path / "seeds.py"
    sweep.write_text("def get_sweep(arg=None):\n    return [{'seed': 0}, {'seed': 3}]\n")
    assert launcher.run_sweep(config, str(sweep), tmp_path / "v", vmap=True) == 0
    summary = json.loads((tmp_path / "v" / "sweep_summary.json").read_text())
    assert [m["name"] for m in summary] == ["00_0", "01_3"]
    records = {}
    for seed, member in zip((0, 3), summary, strict=True):
        got = json.loads((tmp_path / "v" / member["name"] / "report.json").read_text())
        assert got == member["report"] and got["config"]["seed"] == seed
        lines = (tmp_path / "v" / member["name"] / "metrics.jsonl").read_text().splitlines()
        records[seed] = [json.loads(line) for line in lines]
        assert [(r["step"], r["split"]) for r in records[seed]] == [
            (4, "train"), (6, "train"), (6, "valid"), (6, "test")]
    # The first member against its train steps alone: each record is its window's mean.
    losses, _ = alone(launcher.apply_overrides(config, {"seed": 0}), 6)
    assert records[0][0]["loss"] == pytest.approx(losses[:4].mean(), rel=1e-5)
    assert summary[0]["report"]["metrics"]["train"]["loss"] == pytest.approx(
        losses[4:].mean(), rel=1e-5)
    # The second member against a sequential run of it through the trainer.
    train.train_and_evaluate(launcher.apply_overrides(config, {"seed": 3}), tmp_path / "alone")
    expected = json.loads((tmp_path / "alone" / "report.json").read_text())
    got = summary[1]["report"]
    for split, metric in (("train", "loss"), ("train", "grad_norm"), ("valid", "loss"),
                          ("valid", "bpc"), ("test", "loss")):
        assert got["metrics"][split][metric] == pytest.approx(
            expected["metrics"][split][metric], rel=1e-5), (split, metric)
    assert got["sparsity"] == expected["sparsity"] and got["params"] == expected["params"]
    for path, mask in report.load_masks(tmp_path / "alone" / "masks.npz").items():
        np.testing.assert_array_equal(
            report.load_masks(tmp_path / "v" / "01_3" / "masks.npz")[path], mask)
    assert summary[0]["report"]["metrics"]["valid"] != summary[1]["report"]["metrics"]["valid"]
    # Members that differ in a shape are refused with the key named, before any training.
    sweep.write_text("def get_sweep(arg=None):\n"
                     "    return [{'seed': 0}, {'model.features': 8}]\n")
    with pytest.raises(ValueError, match=r"differ in \['model.features'\]"):
        launcher.run_sweep(config, str(sweep), tmp_path / "w", vmap=True)
