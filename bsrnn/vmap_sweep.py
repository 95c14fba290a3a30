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

Not here: evaluation, checkpoints and logs of ``train.train_and_evaluate``; evaluate a
member with ``train.evaluate`` on :func:`member` of the final states.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from bsrnn import input_pipeline, methods, train

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
    config: ml_collections.ConfigDict, values: dict[str, Any], model: Any, task: str,
    batch: dict[str, Any],
) -> train.TrainState:
    """The members' fresh states, every leaf with a leading member axis of size M."""

    def init(member_values):
        return train.initial_state(member_config(config, member_values), model, task, batch)[0]

    return jax.vmap(init)(values)


def make_step(config: ml_collections.ConfigDict, model: Any, task: str) -> Any:
    """The jitted sweep step ``(values, states, batch) -> (states, metrics)``: one
    ``train.train_step`` per member, the batch (B, ...) shared; metrics are (M,) arrays."""

    def step(member_values, state, batch):
        tx, _ = methods.create_optimizer(member_config(config, member_values), state.masks)
        return train.train_step(state, batch, model=model, tx=tx, task=task)

    return jax.jit(jax.vmap(step, in_axes=(0, 0, None)), donate_argnums=1)


def member(states: train.TrainState, index: int) -> train.TrainState:
    """Member ``index`` of stacked states, as the state of an ordinary run."""
    return jax.tree_util.tree_map(lambda x: x[index], states)


def train_members(
    configs: list[ml_collections.ConfigDict],
) -> tuple[train.TrainState, np.ndarray]:
    """Train the members together for ``configs[0].num_steps`` steps on one device.

    Returns:
      The final states (leading member axis M) and the training losses, (num_steps, M),
      mean nats per token (LM) or CTC loss per utterance (speech).
    """
    values = stack_values(configs)
    config = configs[0]
    dataset = input_pipeline.load(config)
    model = train.create_model(config, dataset)
    task = dataset.task
    example = input_pipeline.example_batch(dataset, config)
    states = initial_states(config, values, model, task, example)
    step = make_step(config, model, task)
    batches = input_pipeline.train_batches(dataset, config, None)
    values = jax.tree_util.tree_map(jnp.asarray, values)
    losses = []
    for _ in range(config.num_steps):
        batch, _ = next(batches)
        states, metrics = step(values, states, batch)
        losses.append(metrics["loss"])
    return states, np.asarray(jax.device_get(losses))
