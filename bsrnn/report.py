"""What a run reports: metric logs, sparsity and parameter counts, ``report.json``.

* :class:`MetricWriter`: metrics as JSON lines (``<workdir>/metrics.jsonl``, one object per
  step and split) and TensorBoard event files (``<workdir>/tensorboard``).
* :func:`layer_sparsity`, :func:`param_counts`, :func:`weight_percentiles`: numbers of the
  prunable kernels, computed from the params and the ``masks`` collection.
* :func:`save_masks`, :func:`load_masks`: the final masks as a small ``masks.npz``.
* :func:`build_report`: the content of a run's ``report.json``.
* :func:`format_report`, :func:`format_sweep`: the readable tables printed at the end of a
  run and of a sweep (:func:`format_export`: the exported model's size, speed and samples).

A *layer* groups a recurrent layer's gate kernels by kind: ``layer_0/input_r``,
``layer_0/input_z`` and ``layer_0/input_n`` make ``layer_0/input``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from bsrnn import pruning

_GATE = re.compile(r"^(input|recurrent)_[a-z]+$")


class MetricWriter:
    """Writes scalars to ``metrics.jsonl`` and to TensorBoard under ``workdir``.

    On resume (``resume_step`` > 0), records of steps after ``resume_step`` (written by the
    interrupted run after its last checkpoint) are dropped from ``metrics.jsonl`` and purged
    from TensorBoard, so the logs read as one uninterrupted run.
    """

    def __init__(self, workdir: str | Path, resume_step: int = 0):
        from tensorboardX import SummaryWriter  # imported here: slow, and only runs need it

        self.path = Path(workdir) / "metrics.jsonl"
        if resume_step > 0 and self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self._tb = SummaryWriter(
            str(Path(workdir) / "tensorboard"),
            purge_step=resume_step + 1 if resume_step > 0 else None,
        )

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        """Log ``scalars`` of ``split`` (e.g. ``train``, ``valid``) at ``step``."""
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in scalars.items():
            self._tb.add_scalar(f"{split}/{key}", float(value), int(step))
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


def layer_name(path: Sequence[str]) -> str:
    """``("layer_0", "recurrent_z", "kernel")`` -> ``"layer_0/recurrent"``; fc layers keep
    their module path (``("output", "kernel")`` -> ``"output"``)."""
    modules = list(path[:-1]) if path and path[-1] == "kernel" else list(path)
    if modules and _GATE.match(modules[-1]):
        modules[-1] = modules[-1].split("_")[0]
    return "/".join(modules)


def layer_sparsity(
    params: Any, masks: Any, layer_type: pruning.LayerTypeFn
) -> dict[str, dict[str, Any]]:
    """Per layer of the prunable kernels: type, weights, kept weights, sparsity.

    Args:
      params: the params tree.
      masks: the ``masks`` collection.
      layer_type: the predicate selecting the prunable kernels.

    Returns:
      ``{layer: {"type", "params", "kept", "sparsity"}}`` from the input end to the output
      end (recurrent layers by index, then fully connected layers), and a ``"total"`` entry
      over all of them (type ``"all"``).
    """
    flat_masks = traverse_util.flatten_dict(masks) if masks else {}
    layers: dict[str, dict[str, Any]] = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        kind = layer_type(path, leaf)
        if kind is None:
            continue
        mask = np.asarray(flat_masks[path])
        entry = layers.setdefault(layer_name(path), {"type": kind, "params": 0, "kept": 0})
        entry["params"] += int(mask.size)
        entry["kept"] += int(mask.sum())
    layers = dict(sorted(layers.items(), key=lambda item: _layer_order(*item)))
    total = {
        "type": "all",
        "params": sum(e["params"] for e in layers.values()),
        "kept": sum(e["kept"] for e in layers.values()),
    }
    layers["total"] = total
    for entry in layers.values():
        entry["sparsity"] = 1.0 - entry["kept"] / entry["params"] if entry["params"] else 0.0
    return layers


def _layer_order(name: str, entry: dict[str, Any]) -> tuple:
    """Recurrent layers first, ``layer_2`` before ``layer_10``, then ``fc`` before ``output``."""
    natural = tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
    return (entry["type"] == "fc", name.startswith("output"), natural)


def effective_params(params: Any, masks: Any) -> Any:
    """The weights the forward pass uses: every masked kernel multiplied by its mask."""
    flat_masks = traverse_util.flatten_dict(masks) if masks else {}
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({
        p: np.where(np.asarray(flat_masks[p]), np.asarray(w), 0) if p in flat_masks
        else np.asarray(w)
        for p, w in flat.items()
    })


def param_counts(params: Any, masks: Any) -> dict[str, int]:
    """``total`` parameters and ``nonzero`` parameters of the effective (masked) weights."""
    leaves = jax.tree_util.tree_leaves(effective_params(params, masks))
    return {
        "total": int(sum(x.size for x in leaves)),
        "nonzero": int(sum(np.count_nonzero(x) for x in leaves)),
    }


def weight_percentiles(
    params: Any, masks: Any, layer_type: pruning.LayerTypeFn, percentile: float = 90.0
) -> dict[str, float]:
    """P2's q per layer type: the ``percentile``-th |w| over the kept weights of that type."""
    flat_masks = traverse_util.flatten_dict(masks) if masks else {}
    by_type: dict[str, list[np.ndarray]] = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        kind = layer_type(path, leaf)
        if kind is not None:
            kept = np.asarray(leaf)[np.asarray(flat_masks[path])]
            by_type.setdefault(kind, []).append(np.abs(kept))
    return {
        kind: float(np.percentile(np.concatenate(values), percentile))
        for kind, values in by_type.items()
        if sum(v.size for v in values)
    }


def save_masks(path: str | Path, masks: Any) -> None:
    """Write every mask of the ``masks`` collection to ``path`` (``.npz``), keyed by its
    ``/``-joined module path (``layer_0/recurrent_z/kernel``), bit-packed and compressed
    (a 512x512 mask takes a few kB); :func:`load_masks` reads it back."""
    flat = traverse_util.flatten_dict(masks) if masks else {}
    arrays = {}
    for key, mask in flat.items():
        mask = np.asarray(mask, dtype=bool)
        name = "/".join(key)
        arrays[name] = np.packbits(mask, axis=None)
        arrays[name + ":shape"] = np.asarray(mask.shape, dtype=np.int64)
    np.savez_compressed(path, **arrays)


def load_masks(path: str | Path) -> dict[str, np.ndarray]:
    """The masks that :func:`save_masks` wrote: ``{module path: bool array}``."""
    with np.load(path) as data:
        return {
            name: np.unpackbits(data[name], count=int(np.prod(data[name + ":shape"])))
            .astype(bool).reshape(data[name + ":shape"])
            for name in data.files if not name.endswith(":shape")
        }


def build_report(
    config: Any, workdir: str | Path, state: Any, metrics: Mapping[str, Mapping[str, float]],
    wall_time: float, events: Any = None,
) -> dict[str, Any]:
    """The content of ``report.json`` for a run of ``config`` that ended in ``state``.

    Args:
      config: the run's config.
      workdir: the run's folder.
      state: its final :class:`bsrnn.train.TrainState` (``step``, ``params``, ``masks``).
      metrics: the final metrics, by split (``train``, ``valid``, ``test``).
      wall_time: seconds the run took, resumed parts included.
      events: the run's :class:`bsrnn.workdir.Events`, which give ``config_changes``,
        ``skipped_checkpoints`` and ``warnings``; ``None``: none.

    Returns:
      ``workdir``, ``model``, ``data``, ``method``, the pruned ``block_shape`` and
      ``reduction`` by layer type (empty for dense and structural), ``recurrent_modules``,
      ``steps``, ``metrics``, ``sparsity`` (:func:`layer_sparsity`), ``params``
      (:func:`param_counts`), ``weight_percentile_90`` (:func:`weight_percentiles`),
      ``wall_time_s``, the ``config`` and the events above.
    """
    from bsrnn import methods  # here: methods imports this module

    params, masks = jax.device_get((state.params, state.masks))
    layer_type = methods.prunable_layer_type(masks, config.prune.layer_types)
    kinds = config.prune.layer_types if methods.prunes(config) else ()
    return {
        "workdir": str(workdir),
        "model": f"{config.model_name} ({config.model.cell})",
        "data": config.data.name,
        "method": config.method,
        "block_shape": {k: methods.block_shape(config, k) for k in kinds},
        "reduction": {
            k: config.prune.reduction[k] for k in kinds if methods.prunes_blocks(config)
        },
        "recurrent_modules": methods.recurrent_modules(config),
        "steps": int(state.step),
        "metrics": metrics,
        "sparsity": layer_sparsity(params, masks, layer_type),
        "params": param_counts(params, masks),
        "weight_percentile_90": weight_percentiles(params, masks, layer_type),
        "wall_time_s": wall_time,
        "config": json.loads(config.to_json_best_effort()),
        "config_changes": events.of_kind("config_change") if events else [],
        "skipped_checkpoints": events.of_kind("skipped_checkpoint") if events else [],
        "warnings": events.of_kind("warning") if events else [],
    }


def _number(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def duration(seconds: float) -> str:
    """``seconds`` as ``4m05s`` (or ``42s``)."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [list(header)] + [[_number(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return [line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])]


def _blocks(report: Mapping[str, Any]) -> str:
    shapes = report.get("block_shape") or {}
    if report.get("recurrent_modules", 1) > 1:
        return f", {report['recurrent_modules']} block-diagonal recurrent modules (P3)"
    if not shapes:
        return ""
    names = {kind: "x".join(map(str, shape)) for kind, shape in shapes.items()}
    reductions = report.get("reduction") or {}
    if len(set(names.values())) == 1 and len(set(reductions.values())) <= 1:
        reduction = next(iter(reductions.values()), "")
        return f", blocks {next(iter(names.values()))} ({reduction})"
    return ", blocks " + ", ".join(
        f"{kind} {name} ({reductions.get(kind, '')})" for kind, name in names.items()
    )


def format_report(report: Mapping[str, Any]) -> str:
    """``report.json`` as a readable table (see :func:`bsrnn.train.train_and_evaluate`)."""
    lines = [
        f"bsrnn report: {report['workdir']}",
        f"{report['model']} on {report['data']}, method {report['method']}{_blocks(report)}, "
        f"{report['steps']} steps, wall time {duration(report['wall_time_s'])}",
        "",
    ]
    metrics = report["metrics"]
    splits = list(metrics)
    names = list(dict.fromkeys(k for s in splits for k in metrics[s]))
    lines += _table(["metric", *splits],
                    [[n, *(metrics[s].get(n, "") for s in splits)] for n in names])
    lines.append("")
    layers = report["sparsity"]
    rows = [[name, e["type"], e["params"], e["kept"], f"{100 * e['sparsity']:.1f}%"]
            for name, e in layers.items() if name != "total"]
    total = layers["total"]
    rows.append(["total (prunable)", "", total["params"], total["kept"],
                 f"{100 * total['sparsity']:.1f}%"])
    lines += _table(["layer", "type", "weights", "kept", "sparsity"], rows)
    counts = report["params"]
    ratio = counts["total"] / max(counts["nonzero"], 1)
    lines += ["", f"parameters: {counts['total']:,} total, {counts['nonzero']:,} nonzero "
                  f"({ratio:.1f}x fewer)"]
    if report.get("export"):
        lines += ["", *format_export(report["export"])]
    return "\n".join(lines)


def format_export(entry: Mapping[str, Any]) -> list[str]:
    """The ``export`` entry of ``report.json`` (:func:`bsrnn.train.export_model`) as lines:
    the file against the dense fp32 weights, the measured speed-up, the samples."""
    lines = [
        f"exported {entry['file']}: {entry['file_bytes'] / 1e3:,.1f} kB ({entry['dtype']}); "
        f"the dense fp32 weights take {entry['dense_fp32_bytes'] / 1e3:,.1f} kB, "
        f"{entry['dense_fp32_bytes'] / entry['file_bytes']:.1f}x as much"]
    if "inference" not in entry:
        return lines
    measured = entry["inference"]
    rate = next(k for k in measured if k.startswith("sparse_") and k.endswith("_per_s"))
    unit = rate.removeprefix("sparse_").removesuffix("_per_s")
    return lines + [
        f"{entry['timed']} on the {entry['backend']}: {entry['inference_speedup']:.2f}x the "
        f"speed of the masked dense model ({measured[rate]:,.0f} against "
        f"{measured['dense' + rate.removeprefix('sparse')]:,.0f} {unit.replace('_', ' ')} "
        "per second)",
        "from the exported model:",
        *(f"  {line}" for line in entry.get("samples", [])),
    ]


def main_metric(report: Mapping[str, Any]) -> tuple[str, str, float]:
    """(split, name, value) of the number a run is judged by: bpc, perplexity or CER on
    the first evaluation split."""
    metrics = report["metrics"]
    split = next(s for s in metrics if s != "train")
    for name in ("bpc", "perplexity", "cer"):
        if name in metrics[split]:
            return split, name, metrics[split][name]
    return split, "loss", metrics[split]["loss"]


def format_sweep(members: Sequence[Mapping[str, Any]]) -> str:
    """One row per sweep member: its overrides, sparsity, main metric, parameters, time.

    Args:
      members: dicts with ``name``, ``overrides`` and ``report`` (a member's report.json,
        or ``None`` if it failed, then ``error`` says why).
    """
    rows = []
    for member in members:
        report = member.get("report")
        overrides = ", ".join(f"{k}={v}" for k, v in member["overrides"].items()) or "(base)"
        if report is None:
            rows.append([member["name"], overrides, "failed", "", "", "", ""])
            continue
        split, name, value = main_metric(report)
        rows.append([
            member["name"], overrides, f"{100 * report['sparsity']['total']['sparsity']:.1f}%",
            f"{split} {name}", value, f"{report['params']['nonzero']:,}",
            duration(report["wall_time_s"]),
        ])
    header = ["member", "overrides", "sparsity", "metric", "value", "nonzero params", "time"]
    lines = _table(header, rows)
    failed = [m for m in members if m.get("report") is None]
    lines += [f"{m['name']} failed: {m.get('error', 'no report.json')}" for m in failed]
    return "\n".join(lines)
