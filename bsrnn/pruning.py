"""Pruning and group lasso as composable optax gradient transformations.

Masks live in the model's Flax ``masks`` collection (one boolean array per prunable kernel,
same path and shape as the kernel). The transformations here read the current masks as an
extra argument of ``update`` and keep the new masks in their state; one line of the train
step moves them back into the collection::

    tx = optax.chain(
        group_lasso(1e-5, (4, 4)),                      # P1's GLP regulariser (first)
        optax.sgd(lr, momentum=0.9, nesterov=True),     # any optimizer
        block_prune(schedule, (4, 4)),                  # P1 block pruning (last)
    )
    opt_state = tx.init(variables["params"])
    ...
    grads = jax.grad(loss_fn)(params, masks, batch)
    updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
    params = optax.apply_updates(params, updates)
    masks = updated_masks(opt_state, masks)             # the one line

Everything is jittable, and ``opt_state`` (a pytree of arrays) checkpoints with the rest.

Which leaves a transformation touches is chosen by a predicate over the param tree,
``layer_type(path, leaf) -> "input" | "recurrent" | "fc" | None`` (``None``: leave it
alone), the analogue of optax's ``mask=``. Hyper-parameters (schedule, block shape, reduction,
group-lasso strength) are either one value for every selected leaf or a mapping from layer
type to value, as P2 sets them per layer type. A mapping that lacks a type leaves the leaves
of that type alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from bsrnn.blocks import (
    BlockShape,
    block_norms,
    block_scores,
    check_block_shape,
    check_reduction,
    expand_blocks,
)
from bsrnn.schedules import CubicSparsity, GradualThreshold, Schedule

Path = tuple[str, ...]
LayerTypeFn = Callable[[Path, jax.Array], str | None]
T = TypeVar("T")
PerType = T | Mapping[str, T]

MODES = ("hard", "regrowth")


def default_layer_type(path: Path, leaf: jax.Array) -> str | None:
    """P2's choice of what to prune: every 2-D ``kernel``, typed by its module's name.

    A kernel under a module whose name starts with ``recurrent`` is ``"recurrent"``, one
    under ``input`` is ``"input"`` (the names :class:`bsrnn.cells.RecurrentLayer` uses), any
    other 2-D kernel is ``"fc"``. Biases, embeddings, norm scales and convolution kernels
    (not 2-D) are never pruned.
    """
    if not path or path[-1] != "kernel" or jnp.ndim(leaf) != 2:
        return None
    modules = path[:-1]
    if any(m.startswith("recurrent") for m in modules):
        return "recurrent"
    if any(m.startswith("input") for m in modules):
        return "input"
    return "fc"


def _flat(tree: Any) -> dict[Path, Any]:
    return traverse_util.flatten_dict(tree) if tree else {}


def _per_type(value: PerType[T], layer_type: str) -> T | None:
    if isinstance(value, Mapping):
        return value.get(layer_type)
    return value


class _LeafSpec(NamedTuple):
    setting: Any  # the schedule (block_prune) or the strength λ_g (group lasso)
    block_shape: BlockShape
    reduction: str
    num_gates: int


def _leaf_specs(
    params: Any,
    primary: PerType[Any],
    block_shape: PerType[BlockShape],
    reduction: PerType[str],
    num_gates: PerType[int],
    layer_type: LayerTypeFn,
) -> dict[Path, _LeafSpec]:
    """Selected leaves of ``params`` and their resolved hyper-parameters, checked."""
    specs = {}
    for path, leaf in _flat(params).items():
        kind = layer_type(path, leaf)
        if kind is None:
            continue
        first = _per_type(primary, kind)
        if first is None:
            continue
        values = {}
        for name, value in (("block_shape", block_shape), ("reduction", reduction),
                            ("num_gates", num_gates)):
            values[name] = _per_type(value, kind)
            if values[name] is None:
                raise ValueError(
                    f"{name} has no entry for layer type {kind!r} (leaf {'/'.join(path)}); "
                    f"give one value or a mapping with every pruned layer type."
                )
        shape = tuple(values["block_shape"])
        try:
            check_block_shape(shape, jnp.shape(leaf), values["num_gates"])
        except ValueError as e:
            raise ValueError(f"{'/'.join(path)}: {e}") from None
        check_reduction(values["reduction"])
        specs[path] = _LeafSpec(first, shape, values["reduction"], values["num_gates"])
    return specs


def _checked_masks(masks: Any, paths: Any, params: Any, who: str) -> dict[Path, jax.Array]:
    """The flat masks for ``paths``, or a ValueError saying what does not match the params."""
    if masks is None:
        raise ValueError(
            f"{who} needs the current masks: call "
            "tx.update(grads, opt_state, params, masks=variables['masks'])."
        )
    flat_masks, flat_params = _flat(masks), _flat(params)
    missing = [p for p in paths if p not in flat_masks]
    if missing:
        raise ValueError(
            f"{who}: the masks tree has no entry for the pruned kernels "
            f"{['/'.join(p) for p in missing]}; give them a mask (bsrnn.cells.MaskedDense) or "
            "exclude them with layer_type."
        )
    for p in paths:
        if jnp.shape(flat_masks[p]) != jnp.shape(flat_params[p]):
            raise ValueError(
                f"{who}: mask {'/'.join(p)} has shape {jnp.shape(flat_masks[p])} but the kernel "
                f"has shape {jnp.shape(flat_params[p])}; the masks tree does not match params."
            )
    return flat_masks


def _replace_leaves(tree: Any, new: dict[Path, Any]) -> Any:
    flat = _flat(tree)
    flat.update(new)
    return traverse_util.unflatten_dict(flat)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown pruning mode {mode!r}; choose one of {MODES}.")


class PruneState(NamedTuple):
    """State of :func:`block_prune` / :func:`weight_prune`.

    Attributes:
      count: int32 scalar, optimizer updates so far (the schedule's iteration).
      masks: nested dict, bool mask per pruned kernel (same paths and shapes as the kernels),
        the masks computed at the last update; :func:`updated_masks` reads them.
      thresholds: nested dict, float32 scalar per pruned kernel: the threshold ε in force
        (for :class:`CubicSparsity`, the block score at the target quantile).
    """

    count: jax.Array
    masks: Any
    thresholds: Any


def _order_key(x: jax.Array) -> jax.Array:
    """uint32 keys in the order of ``jnp.sort`` of float32 ``x``: -0 equals 0, NaNs are equal
    and last. (Bit patterns of floats, standardised, with the sign folded in.)"""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    bits = jnp.where(x == 0, jnp.uint32(0), bits)
    bits = jnp.where(jnp.isnan(x), jnp.uint32(0x7FC00000), bits)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


_RADIX_PASSES = ((21, 11), (10, 11), (0, 10))  # (shift, width) of each digit of a uint32


def _first_reaching(counts: jax.Array, rank: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The first bin whose cumulative count reaches ``rank`` and the count before it."""
    total = jnp.cumsum(counts)
    index = jnp.argmax(total >= rank)
    return index, total[index] - counts[index]


def _keep_lowest_out(scores: jax.Array, sparsity: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keep all but the ``floor(sparsity·n)`` lowest of n scores; also return that cut.

    Ties are broken by position (the lower flat index goes first), as a stable sort would.
    No sort: the k-th lowest key is found by a radix select, three passes of 11, 11 and 10
    bits, each a 2,048-bin histogram of the keys that share the digits chosen so far: O(n)
    on every backend (XLA's CPU sort of the 406k block scores of a 650 x 10k kernel takes
    ~0.1 s).
    """
    flat = scores.ravel()
    k = jnp.floor(sparsity * flat.size).astype(jnp.int32)
    key = _order_key(flat)
    rank = jnp.maximum(k, 1)  # the rank (from 1) of the cut among the keys
    cut_key, chosen = jnp.uint32(0), jnp.ones(flat.shape, jnp.int32)
    for shift, width in _RADIX_PASSES:
        digit = ((key >> shift) & ((1 << width) - 1)).astype(jnp.int32)
        value, below = _first_reaching(jnp.bincount(digit, chosen, length=1 << width), rank)
        rank = rank - below
        cut_key = (cut_key << width) | value.astype(jnp.uint32)
        chosen = chosen * (digit == value)
    tied = key == cut_key
    position = jnp.cumsum(tied, dtype=jnp.int32)  # 1, 2, ... among the tied keys
    ties_out = k - jnp.sum(key < cut_key, dtype=jnp.int32)
    out = (key < cut_key) | (tied & (position <= ties_out))
    cut = jnp.where(k > 0, flat[jnp.argmax(tied & (position == ties_out))], 0.0)
    return ~out.reshape(scores.shape), cut


def block_prune(
    schedule: PerType[Schedule],
    block_shape: PerType[BlockShape] = (4, 4),
    reduction: PerType[str] = "max",
    *,
    mode: str = "hard",
    num_gates: PerType[int] = 1,
    layer_type: LayerTypeFn = default_layer_type,
) -> optax.GradientTransformationExtraArgs:
    """P1 block pruning: prune whole blocks whose reduced |w| falls below a threshold.

    At an update step of the schedule, each selected kernel w (after this step's update) is
    tiled into ``block_shape`` blocks (each gate separately when ``num_gates > 1``), every
    block is scored with ``reduction`` (P1: ``max`` of |w|), and a block is pruned when

    * :class:`GradualThreshold`: its score < ε(step) (P2 Algorithm 1; use
      ``schedule.scaled_for_block(block_shape)`` for P1's θ_b = θ·N_b^(1/4));
    * :class:`CubicSparsity`: it is among the ``floor(s_t · n_blocks)`` lowest scores.

    Modes (SPEC §2.1):

    * ``"hard"`` (P2's pseudo-code): masks are monotone (new = old ∧ keep) and updates are
      rewritten so that pruned weights become, and stay, exactly zero.
    * ``"regrowth"`` (P2's text): params are dense shadow weights that keep their updates;
      the masks are recomputed from them at each update step, so a block whose score rises
      above the threshold rejoins. The forward pass still sees only ``w * mask``. Masks are
      recomputed from scratch, so a fixed pattern from init (P3's block-diagonal) is not kept:
      use ``"hard"`` with fixed patterns.

    Put it **last** in an ``optax.chain``: it needs the final update. ``update`` requires
    ``params`` and ``masks=`` (the current ``masks`` collection).

    Whether this is an update step is, by default, decided on the device from the state's
    count: one ``lax.cond`` around the recomputation of every mask. A caller that knows the
    count on the host (the trainer does: it is the step) can pass a static
    ``update_masks=`` instead (through ``optax.chain`` like ``masks=``), and the program
    has no conditional at all, which on a GPU means no device-to-host read of the
    predicate, so the host keeps running ahead of the device:

    * ``update_masks=False`` promises that no schedule of this transformation updates at
      this count (:func:`update_steps` says when one does). Masks and thresholds pass through;
      the step costs what :func:`keep_masked` costs.
    * ``update_masks=True`` recomputes the masks; a kernel whose schedule does not update at
      this count keeps its mask and threshold, so ``True`` is always correct, only slower.

    The masks and params are bitwise the same on every path.

    Args:
      schedule: a schedule, or a mapping layer type -> schedule.
      block_shape: (bh, bw), or a mapping layer type -> (bh, bw). 1x1 is weight pruning.
      reduction: one of :data:`bsrnn.blocks.REDUCTIONS`, or a mapping layer type -> name.
      mode: ``"hard"`` or ``"regrowth"``.
      num_gates: gates fused along a kernel's last axis (1 for bsrnn's own cells, which keep
        one kernel per gate), or a mapping layer type -> count.
      layer_type: predicate choosing and typing the pruned leaves.

    Returns:
      An optax transformation with state :class:`PruneState`.
    """
    _check_mode(mode)
    for s in schedule.values() if isinstance(schedule, Mapping) else [schedule]:
        if not isinstance(s, GradualThreshold | CubicSparsity):
            raise ValueError(
                f"schedule must be a GradualThreshold or CubicSparsity, got {type(s).__name__}."
            )

    def specs(params: Any) -> dict[Path, _LeafSpec]:
        return _leaf_specs(params, schedule, block_shape, reduction, num_gates, layer_type)

    def init_fn(params: Any) -> PruneState:
        leaves = _flat(params)
        paths = specs(params)
        return PruneState(
            count=jnp.zeros([], jnp.int32),
            masks=traverse_util.unflatten_dict(
                {p: jnp.ones(jnp.shape(leaves[p]), bool) for p in paths}
            ),
            thresholds=traverse_util.unflatten_dict(
                {p: jnp.zeros([], jnp.float32) for p in paths}
            ),
        )

    def recompute(spec: _LeafSpec, w: jax.Array, old: jax.Array, count: jax.Array):
        scored = jnp.where(old, w, 0) if mode == "hard" else w
        scores = block_scores(scored, spec.block_shape, spec.reduction, spec.num_gates)
        if isinstance(spec.setting, GradualThreshold):
            eps = spec.setting.threshold(count)
            keep = scores >= eps
        else:
            keep, eps = _keep_lowest_out(scores, spec.setting.sparsity(count))
        keep = expand_blocks(keep, spec.block_shape, w.shape, spec.num_gates)
        return (old & keep if mode == "hard" else keep), eps.astype(jnp.float32)

    def update_fn(
        updates: Any, state: PruneState, params: Any = None, *, masks: Any = None,
        update_masks: bool | None = None, **extra: Any,
    ) -> tuple[Any, PruneState]:
        del extra
        if params is None:
            raise ValueError("block_prune needs params: tx.update(grads, state, params, ...).")
        if update_masks is not None and not isinstance(update_masks, bool):
            raise ValueError(
                f"block_prune: update_masks must be None, True or False (a Python bool, known "
                f"when the step is traced), got {update_masks!r}; leave it None to decide on "
                "the device."
            )
        leaf_specs = specs(params)
        flat_masks = _checked_masks(masks, leaf_specs, params, "block_prune")
        flat_params, flat_updates = _flat(params), _flat(updates)
        old_masks = {p: flat_masks[p].astype(bool) for p in leaf_specs}
        old_eps = {p: v for p, v in _flat(state.thresholds).items() if p in leaf_specs}
        due = {p: spec.setting.is_update_step(state.count) for p, spec in leaf_specs.items()}

        def recompute_due():
            new_masks, new_eps = {}, {}
            for path, spec in leaf_specs.items():
                w = flat_params[path] + flat_updates[path]
                mask, eps = recompute(spec, w, old_masks[path], state.count)
                new_masks[path] = jnp.where(due[path], mask, old_masks[path])
                new_eps[path] = jnp.where(due[path], eps, old_eps[path])
            return new_masks, new_eps

        if update_masks is None:
            any_due = jnp.any(jnp.stack(list(due.values()))) if due else False
            new_masks, new_eps = jax.lax.cond(
                any_due, recompute_due, lambda: (old_masks, old_eps)
            )
        elif update_masks:
            new_masks, new_eps = recompute_due()
        else:
            new_masks, new_eps = old_masks, old_eps
        new_updates = {}
        if mode == "hard":
            new_updates = {
                p: _zero_masked(flat_updates[p], flat_params[p], m) for p, m in new_masks.items()
            }
        new_state = PruneState(
            count=state.count + 1,
            masks=traverse_util.unflatten_dict(new_masks),
            thresholds=traverse_util.unflatten_dict(new_eps),
        )
        return _replace_leaves(updates, new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def update_steps(schedule: PerType[Schedule], steps: Any) -> np.ndarray:
    """Where :func:`block_prune` with ``schedule`` recomputes masks, for a host-side caller.

    Evaluate it once, before the loop (it runs the schedules' own ``is_update_step``), and
    pass ``update_masks=bool(due[count])`` at each step.

    Args:
      schedule: the ``schedule`` given to :func:`block_prune` (a schedule or a mapping).
      steps: int array of counts (optimizer updates so far), e.g. ``np.arange(num_steps)``.

    Returns:
      bool array, shape of ``steps``: True where any of the schedules updates.
    """
    steps = np.asarray(steps)
    due = np.zeros(steps.shape, bool)
    for s in schedule.values() if isinstance(schedule, Mapping) else [schedule]:
        due |= np.asarray(s.is_update_step(steps))
    return due


def weight_prune(
    schedule: PerType[Schedule],
    *,
    mode: str = "hard",
    layer_type: LayerTypeFn = default_layer_type,
) -> optax.GradientTransformationExtraArgs:
    """P2 weight pruning: :func:`block_prune` with 1x1 blocks (a weight is its own block).

    Each weight with |w| < ε(step) is pruned at the schedule's update steps. See
    :func:`block_prune` for the modes and the train-step contract.
    """
    return block_prune(schedule, (1, 1), "max", mode=mode, layer_type=layer_type)


def _zero_masked(update: jax.Array, param: jax.Array, mask: jax.Array) -> jax.Array:
    """The update that leaves kept weights at ``param + update`` and pruned ones at exactly 0."""
    return jnp.where(mask, update, -param)


def keep_masked() -> optax.GradientTransformationExtraArgs:
    """Keep every masked-out weight at exactly zero; the masks never change.

    For fixed patterns such as P3's :func:`bsrnn.blocks.block_diagonal`, when no pruning
    transformation runs. Put it last in the chain; ``update`` needs ``params`` and ``masks=``.
    Every leaf that has a mask is affected.
    """

    def update_fn(
        updates: Any, state: optax.EmptyState, params: Any = None, *, masks: Any = None,
        **extra: Any,
    ) -> tuple[Any, optax.EmptyState]:
        del extra
        if params is None:
            raise ValueError("keep_masked needs params: tx.update(grads, state, params, ...).")
        flat_masks = _checked_masks(masks, list(_flat(masks)), params, "keep_masked")
        flat_params, flat_updates = _flat(params), _flat(updates)
        new = {p: _zero_masked(flat_updates[p], flat_params[p], m) for p, m in flat_masks.items()}
        return _replace_leaves(updates, new), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def updated_masks(opt_state: Any, masks: Any) -> Any:
    """The ``masks`` collection after an update: ``masks`` with every pruned kernel's mask
    replaced by the one in ``opt_state``'s :class:`PruneState` (found anywhere in a chain).

    Args:
      opt_state: the optimizer state returned by ``tx.update``.
      masks: the current ``masks`` collection (nested dict of bool arrays).

    Returns:
      A masks tree with the structure of ``masks``.
    """
    states = [
        s
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
        if isinstance(s, PruneState)
    ]
    flat = _flat(masks)
    for state in states:
        for path, mask in _flat(state.masks).items():
            if path not in flat:
                raise ValueError(
                    f"the optimizer prunes {'/'.join(path)}, which the masks tree does not have; "
                    "the masks tree does not match the params."
                )
            flat[path] = mask
    return traverse_util.unflatten_dict(flat) if flat else masks


class GroupLassoState(NamedTuple):
    """State of :func:`group_lasso`: ``count`` (int32) for a scheduled strength."""

    count: jax.Array


def _strength_at(strength: float | optax.Schedule, count: jax.Array) -> jax.Array:
    return strength(count) if callable(strength) else jnp.asarray(strength)


def _group_gradient(w: jax.Array, block_shape: BlockShape, num_gates: int) -> jax.Array:
    """∂/∂w Σ_g ‖w_g‖₂ = w / ‖w_g‖₂, taken as 0 on a zero block (a valid subgradient)."""
    norms = expand_blocks(block_norms(w, block_shape, num_gates), block_shape, w.shape, num_gates)
    safe = jnp.where(norms > 0, norms, 1.0)
    return jnp.where(norms > 0, w / safe, 0.0).astype(w.dtype)


def _group_leaves(
    who: str, updates: Any, params: Any, strength: Any, block_shape: Any, num_gates: Any,
    layer_type: LayerTypeFn,
) -> tuple[dict[Path, _LeafSpec], dict[Path, Any], dict[Path, Any]]:
    """The group-lasso leaves (their spec holds λ_g) and the flat params and updates."""
    if params is None:
        raise ValueError(f"{who} needs params: tx.update(grads, state, params).")
    specs = _leaf_specs(params, strength, block_shape, "max", num_gates, layer_type)
    return specs, _flat(params), _flat(updates)


def group_lasso(
    strength: PerType[float | optax.Schedule],
    block_shape: PerType[BlockShape] = (4, 4),
    *,
    num_gates: PerType[int] = 1,
    layer_type: LayerTypeFn = default_layer_type,
) -> optax.GradientTransformation:
    """P1 group lasso: add the gradient of λ_g · Σ_g ‖w^(g)‖₂ over the blocks of each kernel.

    For each selected kernel the update becomes ``g + λ_g · w / ‖w_g‖₂`` (blockwise), with 0
    on an all-zero block, so a pruned block yields no NaN. Put it **first** in the chain, like
    ``optax.add_decayed_weights``. GL is this with a large λ_g; GLP is this with a small λ_g
    followed by :func:`block_prune` (see :func:`glp`). :func:`group_lasso_penalty` gives the
    value of the term for logging.

    Args:
      strength: λ_g (a float or an optax schedule of the step), or a mapping layer type -> λ_g.
      block_shape: (bh, bw) of the groups, or a mapping layer type -> (bh, bw).
      num_gates: gates fused along a kernel's last axis, or a mapping.
      layer_type: predicate choosing and typing the regularised leaves.
    """

    def update_fn(
        updates: Any, state: GroupLassoState, params: Any = None
    ) -> tuple[Any, GroupLassoState]:
        specs, flat_params, flat_updates = _group_leaves(
            "group_lasso", updates, params, strength, block_shape, num_gates, layer_type
        )
        new = {
            p: flat_updates[p]
            + _strength_at(s.setting, state.count)
            * _group_gradient(flat_params[p], s.block_shape, s.num_gates)
            for p, s in specs.items()
        }
        return _replace_leaves(updates, new), GroupLassoState(state.count + 1)

    return optax.GradientTransformation(
        lambda params: GroupLassoState(jnp.zeros([], jnp.int32)), update_fn
    )


def group_lasso_prox(
    strength: PerType[float],
    learning_rate: float | optax.Schedule,
    block_shape: PerType[BlockShape] = (4, 4),
    *,
    num_gates: PerType[int] = 1,
    layer_type: LayerTypeFn = default_layer_type,
) -> optax.GradientTransformation:
    """Proximal group lasso (group soft-threshold). **Not from P1**; an alternative to
    :func:`group_lasso` that sets blocks to exactly zero.

    After the optimizer's step z = w + u, each block becomes
    ``z_g · max(0, 1 − η·λ_g / ‖z_g‖₂)``, the proximal operator of η·λ_g·‖·‖₂. Put it after
    the optimizer (and before a pruning transformation, if any).

    Args:
      strength: λ_g, or a mapping layer type -> λ_g.
      learning_rate: η, the optimizer's step size (a float or an optax schedule).
      block_shape, num_gates, layer_type: as in :func:`group_lasso`.
    """

    def update_fn(
        updates: Any, state: GroupLassoState, params: Any = None
    ) -> tuple[Any, GroupLassoState]:
        specs, flat_params, flat_updates = _group_leaves(
            "group_lasso_prox", updates, params, strength, block_shape, num_gates, layer_type
        )
        eta = _strength_at(learning_rate, state.count)
        new = {}
        for p, s in specs.items():
            z = flat_params[p] + flat_updates[p]
            norms = block_norms(z, s.block_shape, s.num_gates)
            shrink = jnp.maximum(0.0, 1.0 - eta * s.setting / jnp.where(norms > 0, norms, 1.0))
            shrink = expand_blocks(shrink, s.block_shape, z.shape, s.num_gates)
            new[p] = (z * shrink).astype(z.dtype) - flat_params[p]
        return _replace_leaves(updates, new), GroupLassoState(state.count + 1)

    return optax.GradientTransformation(
        lambda params: GroupLassoState(jnp.zeros([], jnp.int32)), update_fn
    )


def group_lasso_penalty(
    params: Any,
    strength: PerType[float],
    block_shape: PerType[BlockShape] = (4, 4),
    *,
    num_gates: PerType[int] = 1,
    layer_type: LayerTypeFn = default_layer_type,
) -> jax.Array:
    """The value λ_g · Σ_g ‖w^(g)‖₂ summed over the selected kernels (float32 scalar).

    For logging. Differentiating this with ``jax.grad`` gives NaN at an all-zero block; use
    :func:`group_lasso` in the optimizer chain instead.
    """
    specs = _leaf_specs(params, strength, block_shape, "max", num_gates, layer_type)
    flat = _flat(params)
    total = jnp.zeros([], jnp.float32)
    for p, s in specs.items():
        total += s.setting * jnp.sum(block_norms(flat[p], s.block_shape, s.num_gates))
    return total


def glp(
    optimizer: optax.GradientTransformation,
    strength: PerType[float],
    schedule: PerType[Schedule],
    block_shape: PerType[BlockShape] = (4, 4),
    reduction: PerType[str] = "max",
    *,
    mode: str = "hard",
    layer_type: LayerTypeFn = default_layer_type,
) -> optax.GradientTransformationExtraArgs:
    """P1's GLP: ``chain(group_lasso, optimizer, block_prune)`` on the same blocks."""
    return optax.chain(
        group_lasso(strength, block_shape, layer_type=layer_type),
        optimizer,
        block_prune(schedule, block_shape, reduction, mode=mode, layer_type=layer_type),
    )


def mask_sparsity(masks: Any) -> dict[str, float]:
    """Fraction of zeros per mask (keys ``"a/b/kernel"``) and overall (key ``"total"``).

    Args:
      masks: the ``masks`` collection (nested dict of bool arrays).
    """
    flat = {"/".join(p): np.asarray(m) for p, m in _flat(masks).items()}
    out = {k: float(1.0 - m.mean()) for k, m in flat.items()}
    size = sum(m.size for m in flat.values())
    out["total"] = float(1.0 - sum(m.sum() for m in flat.values()) / size) if size else 0.0
    return out
