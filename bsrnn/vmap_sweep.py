"""Sweeps that fill one device: M members in one jitted program, ``jax.vmap`` over members.

Members are configs that differ only in **values** (:data:`SWEEPABLE`: seed, learning
rate, group-lasso strengths λ_g, the cubic schedule's target sparsity, the gradual
schedule's q and φ/θ). Everything else, in particular what sets array shapes (hidden size,
block shape, batch size), must be equal; members that differ there run as separate
processes with ``launch.py --sweep``. All members see the same batches. ::

    states, losses = vmap_sweep.train_members([config_a, config_b, config_c])   # losses: (steps, 3)

How the values reach the program: the swept values are stacked into arrays of shape (M,)
(:func:`stack_values`). Inside the vmapped function each member's config is the first
config with its swept fields set to that member's (traced) scalars, and the ordinary
:func:`bsrnn.train.initial_state` and :func:`bsrnn.methods.create_optimizer` build its
params and chain from it, so a member trains exactly like ``train.train_step`` alone.
Schedules hold traced fields there and skip their checks (:mod:`bsrnn.schedules`); the
checks run on every member's concrete config before anything is traced.

From the launcher, ``launch.py --sweep=FILE --vmap`` runs the members of a sweep file this
way (:func:`train_and_report`): one program trains them all, then each member is evaluated
and written to its own sub-workdir as a run of ``train.train_and_evaluate`` would write it
(``config.json``, ``metrics.jsonl`` and TensorBoard train records every ``log_every`` steps
and the final evaluations, ``report.json``, ``masks.npz``, ``model.npz``), so the sweep
summary reads the same. What it does not do: checkpoints (an interrupted vmapped sweep
starts its unfinished members again; members with a ``report.json`` are skipped), evaluation
during training, sparse training (``prune.sparse_training``), several devices, and the
trainer's divergence warnings. ``wall_time_s`` of each report is the shared program's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from bsrnn import data, methods, models, report, train

SWEEPABLE = (
    "seed",
    "optimizer.learning_rate",
    "group_lasso.gl_strength",
    "group_lasso.glp_strength",
    "prune.sparsity",
    "prune.q",
    "prune.ramp_ratio",
)


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = traverse_util.flatten_dict(config.to_dict())
    return {".".join(k): tuple(v) if isinstance(v, list) else v for k, v in flat.items()}


def _sweepable(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in SWEEPABLE)


def stack_values(configs: list[ml_collections.ConfigDict]) -> dict[str, np.ndarray]:
    """The swept values of the members, ``{dotted key: (M,) array}`` (int32 seed, float32 rest).

    Raises ``ValueError`` if the members differ in anything but :data:`SWEEPABLE` values,
    or if a member's config is invalid (each builds its chain once, concretely, to check).
    """
    if not configs:
        raise ValueError("a vmapped sweep needs at least one member config.")
    flats = [_flat(c) for c in configs]
    differ = sorted(k for k in set().union(*flats)
                    if not _sweepable(k) and len({repr(f.get(k)) for f in flats}) > 1)
    if differ:
        raise ValueError(
            f"the members differ in {differ}; a vmapped sweep trains members that differ only "
            f"in the values {SWEEPABLE} (anything else may change array shapes, e.g. "
            "model.features or prune.block_shape). Run such members as separate processes: "
            "launch.py --sweep=FILE."
        )
    for config in configs:
        methods.create_optimizer(config, None)  # the checks, on concrete values
    keys = sorted(k for k in flats[0] if _sweepable(k))
    return {k: np.asarray([f[k] for f in flats], np.int32 if k == "seed" else np.float32)
            for k in keys}


def member_config(
    config: ml_collections.ConfigDict, values: dict[str, Any]
) -> ml_collections.ConfigDict:
    """``config`` with each dotted key of ``values`` set to its (possibly traced) scalar."""
    config = config.copy_and_resolve_references()
    with config.ignore_type():
        for key, value in values.items():
            *parents, leaf = key.split(".")
            node = config
            for name in parents:
                node = node[name]
            node[leaf] = value
    return config


def initial_states(
    config: ml_collections.ConfigDict, values: dict[str, Any], model: Any,
    task: models.Task, batch: dict[str, Any],
) -> train.TrainState:
    """The members' fresh states, every leaf with a leading member axis of size M."""

    def init(member_values):
        return train.initial_state(member_config(config, member_values), model, task, batch)[0]

    return jax.jit(jax.vmap(init))(values)  # one program: op by op, vmap's init is slow


def make_step(config: ml_collections.ConfigDict, model: Any, task: models.Task) -> Any:
    """The jitted sweep step ``(values, states, batch) -> (states, metrics)``: one
    ``train.train_step`` per member, the batch (B, ...) shared; metrics are (M,) arrays."""

    def step(member_values, state, batch):
        tx, _ = methods.create_optimizer(member_config(config, member_values), state.masks)
        return train.train_step(state, batch, model=model, tx=tx, task=task)

    return jax.jit(jax.vmap(step, in_axes=(0, 0, None)), donate_argnums=1)


def member(states: train.TrainState, index: int) -> train.TrainState:
    """Member ``index`` of stacked states, as the state of an ordinary run."""
    return jax.tree_util.tree_map(lambda x: x[index], states)


def _train(
    configs: list[ml_collections.ConfigDict],
) -> tuple[train.TrainState, dict[str, np.ndarray], data.Data, Any]:
    """Train the members; the states, the step metrics ``{name: (num_steps, M)}``, the data
    and the model."""
    values = stack_values(configs)
    config = configs[0]
    dataset = data.load(config)
    model = train.create_model(config, dataset)
    task = models.model_module(config.model_name)
    example = data.example_batch(dataset, config)
    states = initial_states(config, values, model, task, example)
    step = make_step(config, model, task)
    batches = dataset.train_batches(config)
    values = jax.tree_util.tree_map(jnp.asarray, values)
    history = []
    for _ in range(config.num_steps):
        batch, _ = next(batches)
        states, metrics = step(values, states, batch)
        history.append(metrics)
    history = jax.device_get(history)
    return states, {k: np.stack([m[k] for m in history]) for k in history[0]}, dataset, model


def train_members(
    configs: list[ml_collections.ConfigDict],
) -> tuple[train.TrainState, np.ndarray]:
    """Train the members together for ``configs[0].num_steps`` steps on one device.

    Returns:
      The final states (leading member axis M) and the training losses, (num_steps, M),
      mean nats per token (LM) or CTC loss per utterance (speech).
    """
    states, metrics, _, _ = _train(configs)
    return states, metrics["loss"]


def log_windows(num_steps: int, log_every: int) -> list[tuple[int, int]]:
    """The trainer's train-record windows ``(first, end)`` of step indices (end exclusive):
    a record every ``log_every`` steps and one at the last step."""
    ends = [*range(log_every, num_steps, log_every), num_steps]
    return list(zip([0, *ends[:-1]], ends, strict=True))


def train_and_report(
    configs: list[ml_collections.ConfigDict], workdirs: list[str | Path]
) -> list[dict[str, Any]]:
    """Train ``configs`` as one vmapped program, then evaluate each member and write its
    workdir as ``train.train_and_evaluate`` would (see the module docstring). A member whose
    training loss became non-finite gets no report, only an error (the others go on).

    Args:
      configs: M member configs that differ only in :data:`SWEEPABLE` values.
      workdirs: M folders, one per member (created).

    Returns:
      One entry per member: ``{"report": the content of its report.json}`` or
      ``{"error": why it has none}``.

    Raises:
      ValueError: members that differ in more than values, sparse training, or a mesh of
        more than one device.
    """
    if len(configs) != len(workdirs):
        raise ValueError(f"{len(configs)} configs but {len(workdirs)} workdirs; give one each.")
    for config in configs:
        if config.prune.get("sparse_training"):
            raise ValueError("a vmapped sweep has no sparse training; set "
                             "--config.prune.sparse_training=False or drop --vmap.")
        train._check_config(config)
    started = time.time()
    states, metrics, dataset, model = _train(configs)
    wall_time = time.time() - started
    reports = []
    for i, (config, workdir) in enumerate(zip(configs, workdirs, strict=True)):
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        bad = np.flatnonzero(~np.isfinite(metrics["loss"][:, i]))
        if bad.size:
            reports.append({"error": f"non-finite training loss at step {bad[0] + 1}; lower "
                                     "its optimizer.learning_rate or optimizer.grad_clip."})
            continue
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        state = member(states, i)
        writer = report.MetricWriter(workdir)
        final = {}
        for first, end in log_windows(config.num_steps, config.log_every):
            final["train"] = {k: float(np.mean(v[first:end, i])) for k, v in metrics.items()}
            writer.write(end, "train", final["train"])
        for split in dataset.eval_splits:
            final[split] = train.evaluate(model, state.params, state.masks, dataset, config,
                                          split)
            writer.write(config.num_steps, split, final[split])
        writer.close()
        result = report.build_report(config, workdir, state, final, wall_time)
        report.save_masks(workdir / "masks.npz", jax.device_get(state.masks))
        result["export"] = train.export_model(config, workdir, state, dataset, model, final)
        (workdir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        print(report.format_report(result), flush=True)
        reports.append({"report": result})
    return reports
