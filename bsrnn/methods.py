"""The pruning methods as optax chains: ``config.method`` -> one gradient transformation.

=============  =========================================================================
method         chain (first to last)
=============  =========================================================================
``dense``      optimizer, ``keep_masked``
``structural`` optimizer, ``keep_masked``; recurrent masks are P3's ``block_diagonal(G)``,
               G = ``structure.num_modules`` (the other methods use G = 1)
``wp``         optimizer, ``weight_prune(schedule)`` (P2)
``bp``         optimizer, ``block_prune(schedule θ_b, block_shape, reduction)`` (P1)
``gl``         ``group_lasso(gl_strength)``, optimizer, one ``block_prune`` cut at the end
``glp``        ``group_lasso(glp_strength)``, optimizer, ``block_prune(schedule θ_b)`` (P1)
=============  =========================================================================

The optimizer is ``chain(clip_by_global_norm, adam | adamw | sgd)`` with an optax
learning-rate schedule. Group lasso comes first (it adds to the gradient, like weight
decay), pruning last (it needs the final update). With ``group_lasso.proximal`` the
group soft-threshold (**not from P1**) runs after the optimizer instead.

GL's cut: P1's GL has no pruning schedule; the regulariser drives blocks towards zero.
To turn "near zero" into masks, GL prunes once, at the end step of the pruning schedule,
the ``prune.sparsity`` fraction of each matrix's blocks with the lowest scores (our rule:
P1 does not say how its GL masks were cut). A fixed threshold on the block norm would not
do: under Adam the subgradient leaves unimportant blocks oscillating at the scale of the
learning rate instead of at zero, so no threshold separates them reliably.

The gradual threshold's q is per layer type (``prune.q``) or, with ``prune.q_layers``,
per layer; θ_b = θ·N_b^e with e = ``prune.block_exponent`` (P1: 1/4).

Which kernels are pruned: those that have a mask (see :mod:`bsrnn.models`) and whose
layer type (:func:`bsrnn.pruning.default_layer_type`) is in ``prune.layer_types``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from bsrnn import pruning, report, schedules
from bsrnn.configs import LAYER_TYPES

METHODS = ("dense", "structural", "wp", "bp", "gl", "glp")
PRUNING_METHODS = ("wp", "bp", "gl", "glp")  # the methods that compute masks as they train
SCHEDULES = ("cubic", "gradual")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear")


def prunes(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config.method`` computes masks (wp, bp, gl, glp), rather than keeping the
    model's initial ones (dense, structural)."""
    return config.method in PRUNING_METHODS


def prunes_blocks(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config.method`` prunes whole blocks, scored by ``prune.reduction`` (bp, gl,
    glp), rather than single weights (wp) or nothing."""
    return prunes(config) and config.method != "wp"


def block_shape(config: ml_collections.ConfigDict, kind: str) -> tuple[int, int]:
    """The blocks ``config.method`` prunes ``kind`` kernels by: (1, 1) for ``wp`` (single
    weights), else ``config.prune.block_shape[kind]``."""
    return (1, 1) if config.method == "wp" else tuple(config.prune.block_shape[kind])


def prunable_layer_type(
    masks: Any, layer_types: tuple[str, ...] | list[str]
) -> pruning.LayerTypeFn:
    """The ``layer_type`` predicate: a kernel's type if it has a mask and its type is in
    ``layer_types``, else ``None``.

    Args:
      masks: the model's ``masks`` collection.
      layer_types: subset of ``("input", "recurrent", "fc")``.
    """
    unknown = set(layer_types) - set(LAYER_TYPES)
    if unknown:
        raise ValueError(
            f"config.prune.layer_types has unknown types {sorted(unknown)}; use {LAYER_TYPES}."
        )
    masked = set(traverse_util.flatten_dict(masks)) if masks else set()
    types = tuple(layer_types)

    def layer_type(path: tuple[str, ...], leaf: jax.Array) -> str | None:
        kind = pruning.default_layer_type(path, leaf)
        return kind if tuple(path) in masked and kind in types else None

    return layer_type


def _by_type(section: Any) -> Any:
    """A per-type ConfigDict as a plain mapping (tuples kept), anything else as it is."""
    if isinstance(section, ml_collections.ConfigDict | Mapping):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
    return section


def schedule_steps(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The pruning schedule's ``begin``, ``ramp`` and ``end`` steps, from the fractions."""
    n, p = config.num_steps, config.prune
    if not 0 <= p.begin_fraction <= p.ramp_fraction <= p.end_fraction <= 1:
        raise ValueError(
            "config.prune needs 0 <= begin_fraction <= ramp_fraction <= end_fraction <= 1; got "
            f"{p.begin_fraction}, {p.ramp_fraction}, {p.end_fraction}."
        )
    steps = {
        "begin": round(p.begin_fraction * n),
        "ramp": round(p.ramp_fraction * n),
        "end": round(p.end_fraction * n),
    }
    if steps["begin"] >= steps["end"]:
        raise ValueError(
            f"the pruning schedule is empty: begin step {steps['begin']} >= end step "
            f"{steps['end']} (num_steps={n}); widen config.prune.begin_fraction..end_fraction "
            "or train longer."
        )
    return steps


def _gradual(config: ml_collections.ConfigDict, kind: str, q: Any, where: str
             ) -> schedules.GradualThreshold:
    """P2's threshold for a ``kind`` kernel from its q (``where`` names q's config key in
    errors): Eq. 1, then θ_b = θ·N_b^e with e = ``prune.block_exponent`` (P1: 1/4)."""
    p, steps = config.prune, schedule_steps(config)
    if not isinstance(q, jax.Array) and q <= 0:  # traced: see vmap_sweep
        raise ValueError(
            f"config.prune.{where}={q}: the gradual schedule needs P2's q, the 90th "
            "percentile |w| of a trained dense model (a dense run's report.json lists it "
            "under weight_percentile_90); or use config.prune.schedule='cubic'."
        )
    threshold = schedules.GradualThreshold.from_quantile(
        q, steps["begin"], steps["ramp"], steps["end"], p.freq, p.ramp_ratio
    )
    # Reports written before block_exponent existed have P1's 1/4.
    exponent = p.get("block_exponent", schedules.BLOCK_EXPONENT)
    return threshold.scaled_for_block(block_shape(config, kind), exponent)


def pruning_schedules(config: ml_collections.ConfigDict) -> dict[str, schedules.Schedule]:
    """One schedule per layer type in ``prune.layer_types`` (θ_b-scaled for blocks), from
    ``prune.q`` (``prune.q_layers``' per-layer schedules are :func:`create_optimizer`'s)."""
    p, steps = config.prune, schedule_steps(config)
    if p.schedule not in SCHEDULES:
        raise ValueError(f"config.prune.schedule={p.schedule!r}; choose one of {SCHEDULES}.")
    result = {}
    for kind in p.layer_types:
        if p.schedule == "cubic":
            result[kind] = schedules.CubicSparsity(
                p.sparsity[kind], steps["begin"], steps["end"], p.freq
            )
        else:
            result[kind] = _gradual(config, kind, p.q[kind], f"q.{kind}")
    return result


def layer_q(config: ml_collections.ConfigDict) -> dict[str, float]:
    """``prune.q_layers`` as ``{layer: q}`` (layer names as in ``report.json``'s
    ``sparsity``, e.g. ``rnn/layer_0/input``); empty when q is per layer type."""
    pairs = tuple(config.prune.get("q_layers", ()))
    try:
        result = {str(name): float(q) for name, q in pairs}
    except (TypeError, ValueError):
        raise ValueError(
            f"config.prune.q_layers={pairs!r}: give (layer, q) pairs, e.g. "
            "(('rnn/layer_0/input', 0.05), ('output', 0.1))."
        ) from None
    bad = {name: q for name, q in result.items() if not q > 0}  # nan too
    if bad:
        raise ValueError(
            f"config.prune.q_layers: q must be > 0 (the 90th percentile of the layer's block "
            f"scores in a trained dense model); got {bad}."
        )
    if result and (config.prune.schedule != "gradual" or config.method not in (
            "wp", "bp", "glp")):
        raise ValueError(
            "config.prune.q_layers sets the gradual threshold per layer: it needs "
            "prune.schedule='gradual' and method wp, bp or glp; got schedule "
            f"{config.prune.schedule!r}, method {config.method!r}. Clear q_layers (=()) else."
        )
    return result


def _by_layer(
    config: ml_collections.ConfigDict, masks: Any, layer_type: pruning.LayerTypeFn,
    q: Mapping[str, float], per_kind: dict[str, Any],
) -> tuple[pruning.LayerTypeFn, dict[str, Any], dict[str, dict[str, Any]]]:
    """The pruning transformation's arguments with one schedule per layer (q from ``q``).

    Layers are keyed ``"<type>@<layer>"``: the returned predicate gives each prunable
    kernel its key, the schedules are keyed by it, and so are the per-type settings of
    ``per_kind`` (``{"block_shape": {type: value}, ...}``), copied to every layer of the
    type.
    """
    keys = {}
    for path, leaf in (traverse_util.flatten_dict(masks) if masks else {}).items():
        kind = layer_type(path, leaf)
        if kind is not None:
            keys[path] = f"{kind}@{report.layer_name(path)}"
    layers = {key.split("@", 1)[1] for key in keys.values()}
    missing, unknown = sorted(layers - set(q)), sorted(set(q) - layers)
    if masks is not None and (missing or unknown):  # None: checks of the values only
        raise ValueError(
            f"config.prune.q_layers: no q for the pruned layers {missing}"
            f"{f' and unknown layers {unknown}' if unknown else ''}; the model's pruned "
            f"layers are {sorted(layers)} (measure each from a trained dense model)."
        )
    schedule = {key: _gradual(config, key.split("@")[0], q[key.split("@", 1)[1]],
                              f"q_layers[{key.split('@', 1)[1]!r}]")
                for key in set(keys.values())}
    settings = {name: {key: values[key.split("@")[0]] for key in schedule}
                for name, values in per_kind.items()}

    def by_layer(path: tuple[str, ...], leaf: jax.Array) -> str | None:
        return keys.get(tuple(path)) if layer_type(path, leaf) is not None else None

    return by_layer, schedule, settings


def _gl_cut(config: ml_collections.ConfigDict, kind: str) -> schedules.CubicSparsity:
    """A schedule that prunes once, at the end step e, the ``prune.sparsity`` fraction of
    the blocks of each ``kind`` matrix with the lowest scores.

    The cubic schedule from e − 1 to e has two updates: at e − 1 its target is 0 (nothing
    is pruned), at e it is the final sparsity.
    """
    end = max(schedule_steps(config)["end"], 1)
    return schedules.CubicSparsity(config.prune.sparsity[kind], end - 1, end, freq=1)


def _prune_schedules(config: ml_collections.ConfigDict) -> dict[str, schedules.Schedule]:
    """The pruning transformation's schedules: ``gl``'s one cut, else the configured ones."""
    if config.method == "gl":
        return {kind: _gl_cut(config, kind) for kind in config.prune.layer_types}
    return pruning_schedules(config)


def mask_update_steps(config: ml_collections.ConfigDict) -> np.ndarray:
    """bool (num_steps,): the steps at which the chain of ``config.method`` recomputes masks.

    For a training loop whose step is the chain's count (the trainer's is): pass
    ``update_masks=bool(due[step])`` to ``tx.update`` and no step has a conditional (see
    :func:`bsrnn.pruning.block_prune`). All False for ``dense`` and ``structural``.
    """
    check_method(config)
    steps = np.arange(config.num_steps)
    if not prunes(config):
        return np.zeros(steps.shape, bool)
    if layer_q(config):  # q per layer: a gradual schedule's update steps do not depend on q
        return pruning.update_steps(
            {kind: _gradual(config, kind, 1.0, "q_layers") for kind in config.prune.layer_types},
            steps)
    return pruning.update_steps(_prune_schedules(config), steps)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """``optimizer.schedule`` over ``num_steps``: linear warm-up to ``learning_rate``, then
    constant, cosine or linear decay to ``final_lr_fraction · learning_rate``."""
    o, n = config.optimizer, config.num_steps
    if o.schedule not in LR_SCHEDULES:
        raise ValueError(f"config.optimizer.schedule={o.schedule!r}; choose one of {LR_SCHEDULES}.")
    warmup = min(o.warmup_steps, n)
    end_value = o.learning_rate * o.final_lr_fraction
    if o.schedule == "constant":
        after = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.learning_rate, max(n - warmup, 1),
                                            alpha=o.final_lr_fraction)
    else:
        after = optax.linear_schedule(o.learning_rate, end_value, max(n - warmup, 1))
    if warmup == 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(0.0, o.learning_rate, warmup), after], [warmup]
    )


def _optimizer(
    config: ml_collections.ConfigDict, lr: optax.Schedule
) -> optax.GradientTransformation:
    o = config.optimizer
    if o.name not in OPTIMIZERS:
        raise ValueError(f"config.optimizer.name={o.name!r}; choose one of {OPTIMIZERS}.")
    if o.name == "adam":
        opt = optax.adam(lr)
    elif o.name == "adamw":
        opt = optax.adamw(lr, weight_decay=o.weight_decay)
    else:
        opt = optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov)
    clip = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    return optax.chain(*clip, opt)


def check_method(config: ml_collections.ConfigDict) -> None:
    """Raise ``ValueError`` unless ``config.method`` is known and its section fits."""
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r}; choose one of {METHODS}.")
    if config.method == "structural" and config.structure.num_modules < 2:
        raise ValueError(
            "config.method='structural' needs config.structure.num_modules >= 2 (P3's G "
            f"block-diagonal recurrent modules); got {config.structure.num_modules}."
        )


def recurrent_modules(config: ml_collections.ConfigDict) -> int:
    """P3's G for the model: ``structure.num_modules`` for ``structural``, else 1 (dense)."""
    return config.structure.num_modules if config.method == "structural" else 1


def create_optimizer(
    config: ml_collections.ConfigDict, masks: Any
) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """The chain of ``config.method`` (see the module docstring) and its learning rate.

    Args:
      config: a full experiment config (``method``, ``prune``, ``group_lasso``,
        ``structure``, ``optimizer``, ``num_steps``).
      masks: the model's ``masks`` collection, which says which kernels are prunable; the
        chain holds it from ``init`` on (:func:`bsrnn.pruning.masks_from` reads it back).
        ``None`` only to check a config (the chain then needs ``masks=`` to keep masks).

    Returns:
      The transformation (``update`` takes ``params``, and optionally ``masks=``, checked)
      and the learning-rate schedule (step -> float), for logging.
    """
    check_method(config)
    lr = learning_rate_schedule(config)
    optimizer = _optimizer(config, lr)
    p, gl, method = config.prune, config.group_lasso, config.method
    layer_type = prunable_layer_type(masks, p.layer_types)
    block_shape = {k: tuple(v) for k, v in _by_type(p.block_shape).items()}
    reduction = _by_type(p.reduction)
    if p.mode not in pruning.MODES:
        raise ValueError(f"config.prune.mode={p.mode!r}; choose one of {pruning.MODES}.")

    if method in ("dense", "structural"):
        return optax.chain(optimizer, pruning.keep_masked(masks)), lr
    strength = _by_type(gl.gl_strength if method == "gl" else gl.glp_strength)
    q = layer_q(config)
    schedule = None if q else _prune_schedules(config)
    if q:  # one threshold per layer (P2 sets q per layer type; claim (f) asks per layer)
        layer_type, schedule, by_layer = _by_layer(
            config, masks, layer_type, q,
            {"block_shape": block_shape, "reduction": reduction, "strength": strength})
        block_shape, reduction, strength = (by_layer["block_shape"], by_layer["reduction"],
                                            by_layer["strength"])
    if method == "wp":
        return optax.chain(
            optimizer, pruning.weight_prune(schedule, mode=p.mode, layer_type=layer_type,
                                            masks=masks)
        ), lr
    prune = pruning.block_prune(schedule, block_shape, reduction, mode=p.mode,
                                layer_type=layer_type, masks=masks)
    if method == "bp":
        return optax.chain(optimizer, prune), lr
    if gl.proximal:
        regulariser = pruning.group_lasso_prox(strength, lr, block_shape, layer_type=layer_type)
        return optax.chain(optimizer, regulariser, prune), lr
    regulariser = pruning.group_lasso(strength, block_shape, layer_type=layer_type)
    return optax.chain(regulariser, optimizer, prune), lr
