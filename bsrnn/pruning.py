"""Pruning and group lasso as composable optax gradient transformations.

Masks live in the model's Flax ``masks`` collection (one boolean array per prunable kernel,
same key path and shape as the kernel), and the cells multiply each kernel by its mask.
The pruning transformations **hold** the masks in their state: give them the collection's
initial masks when you build the chain, and read the masks for the collection back with
:func:`masks_from`, which is the only call the train step needs::

    tx = optax.chain(
        group_lasso(1e-5, (4, 4)),                      # P1's GLP regulariser (first)
        optax.sgd(lr, momentum=0.9, nesterov=True),     # any optimizer
        block_prune(schedule, (4, 4), masks=variables["masks"]),  # P1 block pruning (last)
    )
    opt_state = tx.init(variables["params"])
    ...
    masks = masks_from(opt_state)                       # the collection, for the forward pass
    grads = jax.grad(loss_fn)(params, masks, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

``update`` does not need the masks (Flax's ``TrainState.apply_gradients`` and NNX's
``nnx.Optimizer.update`` call ``tx.update(grads, opt_state, params)``). A loop that keeps
its own copy of the collection may still pass it as ``masks=``; then the transformation
checks it against the masks it holds at each mask-update step and raises if they differ
(see :func:`block_prune`): a train step that forgot to write the new masks back fails
instead of silently training a dense model. Everything is jittable, and ``opt_state`` (a
pytree of arrays) checkpoints with the rest.

**Any pytree.** Params, updates and masks may be any pytree of arrays: nested dicts (Linen),
an ``nnx.State``, lists and tuples. Leaves are matched by key path (a mask belongs to the
param at the same key path); a path is a tuple of plain keys, ``str`` for dict keys and
attributes, ``int`` for sequence indices (the ``.value`` of an ``nnx.Variable`` is dropped),
as :func:`key_path` makes it from ``jax.tree_util`` key entries.

**Which leaves** a transformation touches, and their layer type (``"input"``,
``"recurrent"``, ``"fc"``), is ``layer_type``, the analogue of optax's ``mask=`` and
``multi_transform``'s ``param_labels`` (:data:`LayerTypes`): a predicate
``(path, leaf) -> type | None``, or a tree of labels with the params' key paths (``None``
labels a leaf that is left alone), or a callable ``params -> tree of labels``. The default
:func:`default_layer_type` types every 2-D ``kernel`` by its module's name.
Hyper-parameters (schedule, block shape, reduction, group-lasso strength) are either one
value for every selected leaf or a mapping from layer type to value, as P2 sets them per
layer type. A mapping that lacks a type leaves the leaves of that type alone.
"""

from __future__ import annotations

import functools
import inspect
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

Path = tuple[Any, ...]  # plain keys: str (dict keys, attributes) and int (sequence indices)
LayerTypeFn = Callable[[Path, jax.Array], str | None]
LayerTypes = LayerTypeFn | Any | Callable[[Any], Any]  # predicate, labels tree, params -> labels
T = TypeVar("T")
PerType = T | Mapping[str, T]

MODES = ("hard", "regrowth")


def default_layer_type(path: Path, leaf: jax.Array) -> str | None:
    """P2's choice of what to prune: every 2-D ``kernel``, typed by its module's name.

    A kernel under a module whose name starts with ``recurrent`` is ``"recurrent"``, one
    under ``input`` is ``"input"`` (the names :class:`bsrnn.cells.RecurrentLayer` uses), any
    other 2-D kernel is ``"fc"``. Biases, embeddings, norm scales and convolution kernels
    (not 2-D) are never pruned. Keys that are not strings (list indices) name no module.
    """
    if not path or path[-1] != "kernel" or jnp.ndim(leaf) != 2:
        return None
    modules = [m for m in path[:-1] if isinstance(m, str)]
    if any(m.startswith("recurrent") for m in modules):
        return "recurrent"
    if any(m.startswith("input") for m in modules):
        return "input"
    return "fc"


def key_path(entries: tuple[Any, ...]) -> Path:
    """The plain path of a ``jax.tree_util`` key path: ``DictKey`` -> its key,
    ``GetAttrKey`` -> its name, ``SequenceKey`` -> its index, ``FlattenedIndexKey`` -> its
    key. A last ``GetAttrKey("value")`` (the array inside an ``nnx.Variable``) is dropped,
    so an ``nnx.State`` of Variables and one of bare arrays have the same paths."""
    if (
        entries
        and isinstance(entries[-1], jax.tree_util.GetAttrKey)
        and entries[-1].name == "value"
    ):
        entries = entries[:-1]
    keys = []
    for e in entries:
        if isinstance(e, jax.tree_util.DictKey):
            keys.append(e.key)
        elif isinstance(e, jax.tree_util.GetAttrKey):
            keys.append(e.name)
        elif isinstance(e, jax.tree_util.SequenceKey):
            keys.append(e.idx)
        elif isinstance(e, jax.tree_util.FlattenedIndexKey):
            keys.append(e.key)
        else:
            keys.append(e)
    return tuple(keys)


def _name(path: Path) -> str:
    return "/".join(str(k) for k in path)


def _flat(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[Path, Any]:
    """``{plain key path: leaf}`` of any pytree (``{}`` for ``None`` or an empty tree)."""
    flat = {}
    for entries, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        path = key_path(entries)
        if path in flat:
            raise ValueError(f"two leaves of the tree have the same key path {_name(path)}.")
        flat[path] = leaf
    return flat


def _replace_leaves(tree: Any, new: dict[Path, Any]) -> Any:
    """``tree`` (any pytree, structure kept) with the leaves at the paths of ``new`` replaced."""
    if not new:
        return tree
    entries, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return treedef.unflatten([new.get(key_path(e), leaf) for e, leaf in entries])


def _nested(flat: dict[Path, Any]) -> dict[Any, Any]:
    return traverse_util.unflatten_dict(flat) if flat else {}


def _takes_params(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is optax-style ``params -> labels`` (one required argument) rather
    than a predicate ``(path, leaf) -> type``."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return len(required) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in parameters)


def layer_types(params: Any, layer_type: LayerTypes = default_layer_type) -> dict[Path, str]:
    """The selected leaves of ``params`` and their layer types, ``{path: type}``.

    Args:
      params: any pytree of arrays.
      layer_type: a predicate ``(path, leaf) -> str | None`` (``path`` as :func:`key_path`
        makes it); or a tree of labels (``str`` layer type, or ``None`` for a leaf left
        alone) with the key paths of ``params`` (its container types may differ: a nested
        dict labels an ``nnx.State``); or a callable ``params -> tree of labels``, as
        ``optax.multi_transform``'s ``param_labels``.

    Returns:
      ``{path: layer type}`` for the selected leaves, in the order of ``params``' leaves.
    """
    flat = _flat(params)
    if callable(layer_type) and not _takes_params(layer_type):
        return {p: kind for p, leaf in flat.items() if (kind := layer_type(p, leaf)) is not None}
    labels = layer_type(params) if callable(layer_type) else layer_type
    flat_labels = _flat(labels, is_leaf=lambda x: x is None)
    missing = [_name(p) for p in flat if p not in flat_labels]
    extra = [_name(p) for p in flat_labels if p not in flat]
    if missing or extra:
        raise ValueError(
            f"the layer_type labels tree does not match the params: no label for {missing}, "
            f"labels for leaves the params do not have {extra}; give a label (a layer type or "
            "None) for every param leaf, at the same key paths."
        )
    bad = {_name(p): v for p, v in flat_labels.items() if v is not None and not isinstance(v, str)}
    if bad:
        raise ValueError(f"layer_type labels must be layer-type strings or None; got {bad}.")
    return {p: flat_labels[p] for p in flat if flat_labels[p] is not None}


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
    layer_type: LayerTypes,
) -> dict[Path, _LeafSpec]:
    """Selected leaves of ``params`` and their resolved hyper-parameters, checked."""
    specs, flat = {}, _flat(params)
    for path, kind in layer_types(params, layer_type).items():
        leaf = flat[path]
        first = _per_type(primary, kind)
        if first is None:
            continue
        values = {}
        for name, value in (
            ("block_shape", block_shape),
            ("reduction", reduction),
            ("num_gates", num_gates),
        ):
            values[name] = _per_type(value, kind)
            if values[name] is None:
                raise ValueError(
                    f"{name} has no entry for layer type {kind!r} (leaf {_name(path)}); "
                    f"give one value or a mapping with every pruned layer type."
                )
        shape = tuple(values["block_shape"])
        try:
            check_block_shape(shape, jnp.shape(leaf), values["num_gates"])
        except ValueError as e:
            raise ValueError(f"{_name(path)}: {e}") from None
        check_reduction(values["reduction"])
        specs[path] = _LeafSpec(first, shape, values["reduction"], values["num_gates"])
    return specs


def _checked_masks(masks: Any, paths: Any, params: Any, who: str) -> dict[Path, jax.Array]:
    """The flat masks, or a ValueError saying what in them does not match the params at
    ``paths`` (the kernels that need a mask)."""
    flat_masks, flat_params = _flat(masks), _flat(params)
    missing = [_name(p) for p in paths if p not in flat_masks]
    if missing:
        raise ValueError(
            f"{who}: the masks tree has no entry for the pruned kernels {missing}; give them "
            "a mask (bsrnn.cells.MaskedDense) or exclude them with layer_type."
        )
    for p in paths:
        if jnp.shape(flat_masks[p]) != jnp.shape(flat_params[p]):
            raise ValueError(
                f"{who}: mask {_name(p)} has shape {jnp.shape(flat_masks[p])} but the kernel "
                f"has shape {jnp.shape(flat_params[p])}; the masks tree does not match params."
            )
    return flat_masks


def _stale_message(who: str, names: list[str]) -> str:
    return (
        f"{who}: the masks passed as masks= are not the ones it holds (the masks of its last "
        f"update) for {names}: the train step does not write the new masks back into the "
        "`masks` collection, so the forward pass would not see the pruning. Feed the model "
        "`masks = pruning.masks_from(opt_state)` after each tx.update (then masks= is not "
        f"needed). If the collection starts with masks that are not all ones, give them to "
        f"the transformation: {who}(..., masks=variables['masks'])."
    )


def _raise_stale(who: str, names: list[str], stale: np.ndarray) -> None:
    """The host side of :func:`_check_fresh`: ``stale`` is (n,) bool, or (M, n) under vmap."""
    stale = np.asarray(stale).reshape(-1, len(names)).any(axis=0)
    if stale.any():
        raise ValueError(_stale_message(who, [n for n, s in zip(names, stale, strict=True) if s]))


def _check_fresh(who: str, given: dict[Path, jax.Array], held: dict[Path, jax.Array]) -> None:
    """Raise unless the masks the caller passed equal the ones the transformation holds.

    Eagerly a ``ValueError``; under ``jit`` one host callback (the comparison is on the
    device), whose ``ValueError`` surfaces as a ``jax.errors.JaxRuntimeError`` with the
    same message, when the step runs.
    """
    paths = list(held)
    if not paths:
        return
    stale = jnp.stack([jnp.any(given[p].astype(bool) != held[p]) for p in paths])
    names = [_name(p) for p in paths]
    if isinstance(stale, jax.core.Tracer):
        jax.debug.callback(functools.partial(_raise_stale, who, names), stale)
    else:
        _raise_stale(who, names, stale)


def _initial_masks(masks: Any, specs: dict[Path, _LeafSpec], params: Any, who: str) -> Any:
    """The masks a transformation starts from: ``masks`` (any pytree of bool arrays, the
    collection), checked against the selected kernels, or all ones for them (nested dict)."""
    if masks is None:
        flat = _flat(params)
        return _nested({p: jnp.ones(jnp.shape(flat[p]), bool) for p in specs})
    _checked_masks(masks, specs, params, who)
    return jax.tree_util.tree_map(lambda m: jnp.asarray(m).astype(bool), masks)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown pruning mode {mode!r}; choose one of {MODES}.")


class PruneState(NamedTuple):
    """State of :func:`block_prune` / :func:`weight_prune`.

    Attributes:
      count: int32 scalar, optimizer updates so far (the schedule's iteration).
      masks: the masks the transformation holds, those of its last update: the tree given
        as ``masks=`` at construction (any pytree; the pruned kernels' masks updated, the
        rest as given), or, without one, a nested dict of a bool mask per pruned kernel.
        :func:`masks_from` reads them.
      thresholds: nested dict (plain key paths), float32 scalar per pruned kernel: the
        threshold ε in force (for :class:`CubicSparsity`, the block score at the target
        quantile).
    """

    count: jax.Array
    masks: Any
    thresholds: Any


class KeepMaskedState(NamedTuple):
    """State of :func:`keep_masked` built with ``masks``: ``masks``, the fixed masks held."""

    masks: Any


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
    layer_type: LayerTypes = default_layer_type,
    masks: Any = None,
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

    Put it **last** in an ``optax.chain``: it needs the final update. ``update`` needs
    ``params``; the masks it prunes are the ones it holds (:class:`PruneState`), starting
    from the ``masks`` given here; :func:`masks_from` gives them for the collection.

    ``masks=`` (optional, through ``optax.chain``): the ``masks`` collection the caller
    keeps. It changes nothing; at each step that recomputes masks it is compared with the
    masks held (one elementwise pass over the pruned masks, and one host callback: steps
    between mask updates pay nothing), and a difference raises a ``ValueError`` naming the
    kernels: the caller did not write the new masks back (or gave no initial masks here
    while its collection does not start all ones). Eagerly the error comes at once; under
    ``jit`` it comes as a ``jax.errors.JaxRuntimeError`` with the same message when that
    step runs (a jitted call returns before its program ends: the error may surface at
    the next call that waits for a result).

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
      layer_type: which leaves are pruned and their layer type: a predicate, a tree of
        labels or a callable ``params -> labels`` (see :func:`layer_types`).
      masks: the initial masks (the ``masks`` collection from ``model.init``, any pytree of
        bool arrays at the kernels' key paths; every pruned kernel needs one), or ``None``:
        all ones for the pruned kernels. Only ``init`` reads it.

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
        paths = specs(params)
        return PruneState(
            count=jnp.zeros([], jnp.int32),
            masks=_initial_masks(masks, paths, params, "block_prune"),
            thresholds=_nested({p: jnp.zeros([], jnp.float32) for p in paths}),
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
        updates: Any,
        state: PruneState,
        params: Any = None,
        *,
        masks: Any = None,
        update_masks: bool | None = None,
        **extra: Any,
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
        held = _checked_masks(state.masks, leaf_specs, params, "block_prune")
        given = None if masks is None else _checked_masks(masks, leaf_specs, params, "block_prune")
        flat_params, flat_updates = _flat(params), _flat(updates)
        old_masks = {p: held[p] for p in leaf_specs}
        old_eps = {p: v for p, v in _flat(state.thresholds).items() if p in leaf_specs}
        due = {p: spec.setting.is_update_step(state.count) for p, spec in leaf_specs.items()}

        def recompute_due():
            if given is not None:
                _check_fresh("block_prune", given, old_masks)
            new_masks, new_eps = {}, {}
            for path, spec in leaf_specs.items():
                w = flat_params[path] + flat_updates[path]
                mask, eps = recompute(spec, w, old_masks[path], state.count)
                new_masks[path] = jnp.where(due[path], mask, old_masks[path])
                new_eps[path] = jnp.where(due[path], eps, old_eps[path])
            return new_masks, new_eps

        any_due = jnp.any(jnp.stack(list(due.values()))) if due else False
        if update_masks is None and not isinstance(any_due, jax.core.Tracer):
            update_masks = bool(any_due)  # called eagerly: decide here, errors raise here
        if update_masks is None:
            new_masks, new_eps = jax.lax.cond(any_due, recompute_due, lambda: (old_masks, old_eps))
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
            masks=_replace_leaves(state.masks, new_masks),
            thresholds=_replace_leaves(state.thresholds, new_eps),
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
    layer_type: LayerTypes = default_layer_type,
    masks: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """P2 weight pruning: :func:`block_prune` with 1x1 blocks (a weight is its own block).

    Each weight with |w| < ε(step) is pruned at the schedule's update steps. See
    :func:`block_prune` for the modes, ``layer_type``, ``masks`` and the train-step contract.
    """
    return block_prune(schedule, (1, 1), "max", mode=mode, layer_type=layer_type, masks=masks)


def _zero_masked(update: jax.Array, param: jax.Array, mask: jax.Array) -> jax.Array:
    """The update that leaves kept weights at ``param + update`` and pruned ones at exactly 0."""
    return jnp.where(mask, update, -param)


def keep_masked(masks: Any = None) -> optax.GradientTransformationExtraArgs:
    """Keep every masked-out weight at exactly zero; the masks never change.

    For fixed patterns such as P3's :func:`bsrnn.blocks.block_diagonal`, when no pruning
    transformation runs. Put it last in the chain; ``update`` needs ``params``. Every leaf
    that has a mask is affected.

    Args:
      masks: the masks to hold (the ``masks`` collection, any pytree of bool arrays at the
        kernels' key paths): the state is :class:`KeepMaskedState`, ``update`` needs no
        ``masks=`` (one given is not used: these masks never change, so there is no
        write-back to miss) and :func:`masks_from` gives them. ``None``: the state is empty
        and every ``update`` needs ``masks=``, the masks to keep.
    """

    def init_fn(params: Any) -> KeepMaskedState | optax.EmptyState:
        if masks is None:
            return optax.EmptyState()
        _checked_masks(masks, list(_flat(masks)), params, "keep_masked")
        return KeepMaskedState(jax.tree_util.tree_map(lambda m: jnp.asarray(m).astype(bool), masks))

    def update_fn(
        updates: Any,
        state: KeepMaskedState | optax.EmptyState,
        params: Any = None,
        *,
        masks: Any = None,
        **extra: Any,
    ) -> tuple[Any, KeepMaskedState | optax.EmptyState]:
        del extra
        if params is None:
            raise ValueError("keep_masked needs params: tx.update(grads, state, params, ...).")
        if isinstance(state, KeepMaskedState):
            masks = state.masks
        elif masks is None:
            raise ValueError(
                "keep_masked needs the masks to keep: build it as "
                "keep_masked(variables['masks']), or call tx.update(..., masks=masks)."
            )
        flat_masks = _checked_masks(masks, list(_flat(masks)), params, "keep_masked")
        flat_params, flat_updates = _flat(params), _flat(updates)
        new = {p: _zero_masked(flat_updates[p], flat_params[p], m) for p, m in flat_masks.items()}
        return _replace_leaves(updates, new), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _held_masks(opt_state: Any) -> list[Any]:
    """The masks held by every :class:`PruneState` and :class:`KeepMaskedState` of a
    (possibly chained, possibly NNX-wrapped) optimizer state, in chain order."""

    def holds(x):
        return isinstance(x, PruneState | KeepMaskedState)

    return [s.masks for s in jax.tree_util.tree_leaves(opt_state, is_leaf=holds) if holds(s)]


def masks_from(opt_state: Any) -> Any:
    """The masks for the ``masks`` collection: those the optimizer's transformations hold.

    The one call a train step needs (jittable, no copy): feed the forward pass
    ``{"params": params, "masks": masks_from(opt_state)}``. Built with ``masks=`` (the
    collection from ``model.init``), the transformation holds the whole collection and
    this returns a tree with its structure; built without, only the pruned kernels (a
    nested dict), to merge into a collection with :func:`updated_masks`.

    Args:
      opt_state: the optimizer state (``tx.init`` or ``tx.update``'s), e.g. a Flax
        ``TrainState``'s ``opt_state``.

    Returns:
      The masks (bool arrays at the kernels' key paths). With several mask-holding
      transformations in a chain, the first one's tree with the masks of the later ones
      at the paths they hold.
    """
    held = _held_masks(opt_state)
    if not held:
        raise ValueError(
            "masks_from: the optimizer state holds no masks; put block_prune, weight_prune, "
            "glp or keep_masked(masks) in the chain."
        )
    return _merged(held[0], held[1:])


def updated_masks(opt_state: Any, masks: Any = None) -> Any:
    """``masks`` with every mask the optimizer holds put in (:func:`masks_from` if ``None``).

    For a caller whose collection has masks the optimizer does not hold (it was built
    without ``masks=``). Jittable.

    Args:
      opt_state: the optimizer state returned by ``tx.update`` (or a transformation's
        state, or a masks tree).
      masks: the current ``masks`` collection (any pytree of bool arrays), or ``None``.

    Returns:
      A masks tree with the structure of ``masks``.
    """
    if masks is None:
        return masks_from(opt_state)
    return _merged(masks, _held_masks(opt_state))


def _merged(masks: Any, trees: list[Any]) -> Any:
    """``masks`` with the masks of each of ``trees`` (later ones last) at their paths."""
    flat = _flat(masks)
    new = {}
    for tree in trees:
        for path, mask in _flat(tree).items():
            if path not in flat:
                raise ValueError(
                    f"the optimizer prunes {_name(path)}, which the masks tree does not have; "
                    "the masks tree does not match the params."
                )
            new[path] = mask
    return _replace_leaves(masks, new)


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
    who: str,
    updates: Any,
    params: Any,
    strength: Any,
    block_shape: Any,
    num_gates: Any,
    layer_type: LayerTypes,
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
    layer_type: LayerTypes = default_layer_type,
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
      layer_type: which leaves are regularised and their type (see :func:`layer_types`).
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
    layer_type: LayerTypes = default_layer_type,
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
    layer_type: LayerTypes = default_layer_type,
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
    layer_type: LayerTypes = default_layer_type,
    masks: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """P1's GLP: ``chain(group_lasso, optimizer, block_prune)`` on the same blocks
    (``masks``: :func:`block_prune`'s initial masks)."""
    return optax.chain(
        group_lasso(strength, block_shape, layer_type=layer_type),
        optimizer,
        block_prune(
            schedule, block_shape, reduction, mode=mode, layer_type=layer_type, masks=masks
        ),
    )


def mask_sparsity(masks: Any) -> dict[str, float]:
    """Fraction of zeros per mask (keys ``"a/b/kernel"``) and overall (key ``"total"``).

    Args:
      masks: the ``masks`` collection (any pytree of bool arrays).
    """
    flat = {_name(p): np.asarray(m) for p, m in _flat(masks).items()}
    out = {k: float(1.0 - m.mean()) for k, m in flat.items()}
    size = sum(m.size for m in flat.values())
    out["total"] = float(1.0 - sum(m.sum() for m in flat.values()) / size) if size else 0.0
    return out
