"""`impl="auto"`: the one dispatcher of `bsrnn.kernels`.

For each key (the operation, `jax.devices()[0].device_kind`, sizes, block shape, number of
stored blocks, batch, dtype) `choose` picks the fastest candidate implementation, the dense
product always among them, so "auto" is never slower than dense beyond measurement noise:

1. a decision already made in this process (or read from the cache file) is reused;
2. otherwise each candidate whose resource check passes is compiled and run once (one that
   raises is skipped, so no size crashes), then timed (`measure`: interleaved repeats,
   medians) and the fastest kept, in memory and, when a cache file is set, on disk;
3. where the weights are traced (passed into `jax.jit` as arguments, so nothing can run
   on them), a cached decision is used if there is one, else the op's fallback with a
   warning: call the op once outside jit, or close over the weights, to measure.

The cache file is ``$BSRNN_AUTOTUNE_CACHE`` if set, or `set_cache_file(path)`: a JSON map
from key to {"impl", "times_s", "skipped"}; a file measured on a device is the table for
that device. Tests replace the timer with `using_timer` (no timing in tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

Timer = Callable[[Mapping[str, Callable[[], Any]]], Mapping[str, float]]

_decisions: dict[str, dict[str, Any]] = {}
_file_state: dict[str, Any] = {"path": None, "loaded": None}


def key(op: str, **fields: Any) -> str:
    """The cache key of one decision: op, backend, device kind and the given fields."""
    device = jax.devices()[0]
    parts = [op, jax.default_backend(), getattr(device, "device_kind", str(device))]
    parts += [f"{k}={fields[k]}" for k in sorted(fields)]
    return "|".join(str(p) for p in parts)


def measure(thunks: Mapping[str, Callable[[], Any]], rounds: int = 7,
            min_sample_s: float = 2e-3) -> dict[str, float]:
    """Seconds per call of each thunk: calls per sample chosen so a sample lasts about
    ``min_sample_s``, samples of all thunks interleaved, median over ``rounds``."""
    reps = {}
    for name, fn in thunks.items():
        t = time.perf_counter()
        jax.block_until_ready(fn())
        reps[name] = max(1, min(1000, round(min_sample_s / max(time.perf_counter() - t,
                                                               1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in thunks}
    for _ in range(rounds):
        for name, fn in thunks.items():
            t = time.perf_counter()
            out = None
            for _ in range(reps[name]):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t) / reps[name])
    return {name: statistics.median(s) for name, s in samples.items()}


_timer: list[Timer] = [measure]


@contextlib.contextmanager
def using_timer(timer: Timer) -> Iterator[None]:
    """Within the block, `choose` times candidates with ``timer`` ({name: thunk} ->
    {name: seconds}) on an empty in-memory cache and no cache file; restored after."""
    saved = dict(_decisions), dict(_file_state)
    _decisions.clear()
    _file_state.update(path="", loaded={})
    _timer.insert(0, timer)
    try:
        yield
    finally:
        _timer.pop(0)
        _decisions.clear()
        _decisions.update(saved[0])
        _file_state.update(saved[1])


def set_cache_file(path: str | None) -> None:
    """Reads and writes decisions at ``path`` (None: ``$BSRNN_AUTOTUNE_CACHE``; "" none)."""
    _file_state.update(path=path, loaded=None)


def _file() -> tuple[str, dict[str, Any]]:
    path = _file_state["path"]
    if path is None:
        path = os.environ.get("BSRNN_AUTOTUNE_CACHE", "")
    if _file_state["loaded"] is None:
        loaded = {}
        if path and os.path.exists(path):
            with open(path) as f:
                loaded = json.load(f)
        _file_state["loaded"] = loaded
    return path, _file_state["loaded"]


def decisions() -> dict[str, dict[str, Any]]:
    """The decisions made in this process so far: {key: {"impl", "times_s", "skipped"}}."""
    return dict(_decisions)


def is_concrete(tree: Any) -> bool:
    """Whether no leaf of ``tree`` is a tracer (so candidates can run on it)."""
    return not any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(tree))


def choose(
    op_key: str,
    candidates: Mapping[str, Callable[[], str | None]],
    make: Callable[[str], Callable[[], Any]],
    *,
    measurable: bool = True,
    fallback: tuple[str, ...] = ("dense",),
) -> str:
    """The implementation to run for ``op_key``.

    Args:
      op_key: from `key`.
      candidates: {impl: resource check}; a check returns None when the impl can run here,
        else the reason it cannot (then it is skipped).
      make: impl -> a thunk that runs that impl once on inputs of the key's shapes.
      measurable: False where the thunks cannot run (traced weights): no measurement.
      fallback: used, in order of preference, when nothing can be measured or decided.

    Returns:
      The chosen impl name.
    """
    if op_key in _decisions:
        return _decisions[op_key]["impl"]
    path, table = _file()
    if op_key in table and table[op_key].get("impl") in candidates:
        _decisions[op_key] = table[op_key]
        return table[op_key]["impl"]
    if not measurable:
        impl = next((f for f in fallback if f in candidates), next(iter(candidates)))
        warnings.warn(f"impl='auto' cannot measure {op_key} on traced weights; using "
                      f"{impl!r}. Call it once with concrete weights (outside jit, or closed "
                      "over) to measure.", stacklevel=3)
        return impl
    skipped: dict[str, str] = {}
    thunks: dict[str, Callable[[], Any]] = {}
    with jax.ensure_compile_time_eval():
        for name, check in candidates.items():
            try:
                reason = check()
                if reason is None:
                    thunk = make(name)
                    jax.block_until_ready(thunk())  # compiles; a failure skips the candidate
                    thunks[name] = thunk
            except Exception as e:  # noqa: BLE001  (any failure removes the candidate)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            if reason is not None:
                skipped[name] = reason
        if not thunks:
            raise RuntimeError(f"no implementation can run {op_key}: {skipped}")
        times = dict(_timer[0](thunks))
    impl = min(thunks, key=lambda name: times[name])
    decision = {"impl": impl, "times_s": times, "skipped": skipped}
    _decisions[op_key] = decision
    if path:
        table[op_key] = decision
        with open(path, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
    return impl
