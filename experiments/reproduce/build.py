r"""Rebuild every table and plot of the paper reproduction from ``experiments/results``.

    python experiments/reproduce/build.py

writes ``experiments/results/TABLES.md`` (P1's table form: model, algorithm, nonzero
parameters, sparsity, metric as mean ± half-range over seeds, relative to the dense
baseline, and the paper's row beside ours) and the plots in ``experiments/results/plots``.
A study or run that has not been trained yet is listed as missing, never invented.

"Relative" is P1's: (dense − ours) / dense for an error or a perplexity, so a worse
result is negative. The dense baseline of a table is its dense "big" model (512), the mean
over its seeds.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).parent)]

from grid import (  # noqa: E402
    BLOCK_SHAPES,
    Q_REFERENCE,
    RECIPES,
    REDUCTIONS,
    SIDE_MODEL,
    SMALL_EXPONENT,
    block_shape_name,
)

from bsrnn import methods, report  # noqa: E402

RESULTS = REPO / "experiments" / "results"
PLOTS = RESULTS / "plots"
MODEL_ORDER = ["rnn", "gru", "lstm"]  # P1's order of the tables' blocks of rows

# P1's rows (SPEC §2.5), beside the rows of ours that play the same part in the ladder.
P1_MAIN = {
    ("rnn", 512, "dense"): "RNN Dense 1760: 0.0%, CER 15.36",
    ("rnn", 192, "dense"): "RNN Dense 704: 0.0%, CER 18.95 (−23.4%)",
    ("rnn", 512, "bp"): "RNN Sparse 1760 BP: 89.2%, CER 17.93 (−16.7%)",
    ("rnn", 768, "glp"): "RNN Sparse 2560 GLP: 90.8%, CER 15.89 (−3.4%)",
    ("rnn", 896, "bp"): "RNN Sparse 3072 BP: 87.3%, CER 15.66 (−1.9%)",
    ("gru", 512, "dense"): "GRU Dense 2560: 0.0%, CER 15.42",
    ("gru", 192, "dense"): "GRU Dense 704: 0.0%, CER 21.26 (−37.9%)",
    ("gru", 512, "glp"): "GRU Sparse 2560 GLP: 90.6%, CER 16.78 (−8.8%)",
    ("gru", 704, "bp"): "GRU Sparse 3584 BP: 88.4%, CER 16.23 (−5.2%)",
}
P1_GL = {  # P1's GL against GLP table is for the RNN only.
    ("rnn", "gl", 512): "RNN 1760 GL: 83.3%, −96.0%",
    ("rnn", "glp", 512): "RNN 1760 GLP: 90.8%, −25.3%",
    ("rnn", "gl", 768): "RNN 2560 GL: 82.8%, −78.4%",
    ("rnn", "glp", 768): "RNN 2560 GLP: 90.8%, −3.4%",
}
P1_BLOCKS = {
    ("rnn", "1x1"): "89.2%, −12.8%", ("rnn", "4x4"): "89.2%, −16.7%",
    ("rnn", "12x2"): "84.1%, −10.0%", ("rnn", "8x8"): "84.1%, −14.9%",
    ("rnn", "16x16"): "83.6%, −11.3%", ("rnn", "32x32"): "79.1%, −8.5%",
    ("gru", "1x1"): "88.7%, −7.3%", ("gru", "4x4"): "86.0%, −10.5%",
    ("gru", "16x16"): "81.9%, −9.2%",
}
# Run names of grid.py: <model><features>_<method><variant>_s<seed>.
NAME = re.compile(r"^(?P<model>[a-z]+)(?P<features>\d+)_(?P<method>dense|structural|wp|bp|glp|gl)"
                  r"(?P<variant>.*)_s(?P<seed>\d+)$")


def load(study: str) -> list[dict[str, Any]]:
    """The runs of ``study``: each report with ``name`` fields (model, features, method,
    variant, seed) and the folder (``dir``)."""
    runs = []
    for path in sorted((RESULTS / study).glob("*/report.json")):
        match = NAME.match(path.parent.name)
        if not match:
            raise ValueError(f"{path.parent}: not a grid run name (<model><features>_<method>"
                             "<variant>_s<seed>); move it out of experiments/results.")
        fields = match.groupdict()
        runs.append({**json.loads(path.read_text()), **fields, "features": int(fields["features"]),
                     "seed": int(fields["seed"]), "dir": path.parent})
    return runs


def metric(run: dict[str, Any]) -> float:
    """The headline number of a run: test CER in % (speech) or test perplexity (words)."""
    test = run["metrics"]["test"]
    return 100 * test["cer"] if "cer" in test else test["perplexity"]


def summary(values: Sequence[float]) -> str:
    """``mean ± half-range (n)``; one value alone as it is."""
    values = list(values)
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.2f} (1 seed)"
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f} ({len(values)} seeds)"


def relative(value: float, dense: float | None) -> str:
    """P1's relative change: (dense − value) / dense, in %."""
    return "" if dense is None else f"{100 * (dense - value) / dense:+.1f}%"


def grouped(runs: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    """Runs grouped by the values of ``keys``, seeds together."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[tuple(run[k] for k in keys)].append(run)
    return groups


def dense_baseline(runs: list[dict[str, Any]], model: str) -> float | None:
    """Mean metric of ``model``'s dense 512 runs in ``runs``."""
    values = [metric(r) for r in runs
              if (r["model"], r["features"], r["method"]) == (model, 512, "dense")]
    return float(np.mean(values)) if values else None


def sparsity(run: dict[str, Any]) -> str:
    """A run's final sparsity over its prunable weights, in %."""
    return f"{100 * run['sparsity']['total']['sparsity']:.1f}%"


def result_cells(runs: Sequence[dict[str, Any]], dense: float | None) -> list[str]:
    """The sparsity, metric and relative cells of one row's seeds ("not run yet" without
    any): sparsity and metric as mean ± half-range over the seeds."""
    if not runs:
        return ["not run yet", "", ""]
    values = [metric(r) for r in runs]
    return [sparsity_summary(runs), summary(values), relative(float(np.mean(values)), dense)]


def sparsity_summary(runs: Sequence[dict[str, Any]], layer: str = "total") -> str:
    """The final sparsity of ``layer`` in %, mean ± half-range over ``runs`` when they
    differ (P2's threshold reaches a different sparsity on every seed)."""
    values = [100 * r["sparsity"][layer]["sparsity"] for r in runs]
    spread = (max(values) - min(values)) / 2
    return f"{np.mean(values):.1f}%" + (f" ± {spread:.1f}" if spread >= 0.05 else "")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def main_table(study: str, metric_name: str, paper: dict | None) -> list[str]:
    """P1's main table for ``study`` (one block of rows per model)."""
    runs = load(study)
    if not runs:
        return [f"*{study}: not run yet.*", ""]
    rows = []
    for model in sorted({r["model"] for r in runs}, key=MODEL_ORDER.index):
        dense = dense_baseline(runs, model)
        groups = grouped([r for r in runs if r["model"] == model], "features", "method")
        for (features, method), group in sorted(groups.items(), key=lambda item: _row_order(
                *item[0])):
            values = [metric(r) for r in group]
            rows.append([
                f"{model.upper()} {features}", method.upper() if method != "dense" else "dense",
                f"{group[0]['params']['nonzero'] / 1e6:.2f}",
                sparsity(group[0]),
                summary(values), relative(float(np.mean(values)), dense),
                *([paper.get((model, features, method), "")] if paper else []),
            ])
    return table(["model", "algorithm", "nonzero params (M)", "sparsity (prunable)",
                  metric_name, "relative", *(["paper (P1)"] if paper else [])], rows)


def _row_order(features: int, method: str) -> tuple:
    """P1's order: dense big, dense small, then the sparse rows by size and method."""
    methods_order = ["dense", "wp", "bp", "gl", "glp"]
    if method == "dense":
        return (0, -features)
    return (1, features, methods_order.index(method))


def gl_table() -> list[str]:
    """GL against GLP (P1's second table) from ``an4_main``."""
    runs = [r for r in load("an4_main") if r["method"] in ("gl", "glp")]
    if not runs:
        return ["*GL and GLP runs: not run yet.*", ""]
    rows = []
    groups = grouped(runs, "model", "features", "method")
    for (model, features, method), group in sorted(
            groups.items(), key=lambda item: (MODEL_ORDER.index(item[0][0]), *item[0][1:])):
        dense = dense_baseline(load("an4_main"), model)
        values = [metric(r) for r in group]
        rows.append([f"{model.upper()} {features}", method.upper(),
                     sparsity(group[0]), summary(values),
                     relative(float(np.mean(values)), dense),
                     P1_GL.get((model, method, features), "")])
    return table(["model", "algorithm", "sparsity", "test CER %", "relative", "paper (P1, RNN)"],
                 rows)


def blocks_table() -> list[str]:
    """P1's block-size table from ``an4_blocks`` (gradual threshold, θ_b = θ·N_b^(1/4))."""
    runs = load("an4_blocks")
    if not runs:
        return ["*an4_blocks: not run yet.*", ""]
    main = load("an4_main")
    order = ["1x1", "4x4", "12x2", "8x8", "16x16", "32x32"]
    rows = []
    for (model, variant), group in sorted(grouped(runs, "model", "variant").items(),
                                          key=lambda item: (item[0][0],
                                                            order.index(item[0][1]))):
        rows.append([model.upper(), variant,
                     *result_cells(group, dense_baseline(main, model)),
                     P1_BLOCKS.get((model, variant), "")])
    return table(["model", "block", "sparsity", "test CER %", "relative", "paper (P1)"], rows)


def blocks_cubic_table(model: str) -> list[str]:
    """Block sizes at one sparsity (cubic schedule to 90%): 1x1 and 4x4 from ``an4_main``'s
    WP and BP rows, 16x16 from ``an4_reductions``' max, the rest from ``an4_blocks_cubic``."""
    runs = grouped(load("an4_blocks_cubic"), "variant")
    if not runs:
        return ["*an4_blocks_cubic: not run yet.*", ""]
    runs.update({
        ("16x16",): [r for r in load("an4_reductions") if r["variant"] == "16x16max"],
        ("1x1",): _main_rows(model, 512, "wp"), ("4x4",): _main_rows(model, 512, "bp")})
    dense = dense_baseline(load("an4_main"), model)
    rows = [[block, *result_cells(runs.get((block,), []), dense)]
            for block in ("1x1", "4x4", "12x2", "8x8", "16x16", "32x32")]
    return table(["block", "sparsity", "test CER %", "relative"], rows)


def _main_rows(model: str, features: int, method: str, seed: int | None = None
               ) -> list[dict[str, Any]]:
    """``an4_main``'s runs of one row (one seed, or all when ``seed`` is None)."""
    return [r for r in load("an4_main")
            if (r["model"], r["features"], r["method"]) == (model, features, method)
            and seed in (None, r["seed"])]


def reductions_table(model: str) -> list[str]:
    """Block reductions (P1's future work) from ``an4_reductions``; max at 4x4 is
    ``an4_main``'s BP row."""
    runs = load("an4_reductions")
    if not runs:
        return ["*an4_reductions: not run yet.*", ""]
    runs += [{**r, "variant": "4x4max"} for r in _main_rows(model, 512, "bp")]
    dense = dense_baseline(load("an4_main"), model)
    by_variant = grouped(runs, "variant")
    rows = []
    for block in ("4x4", "16x16"):
        for reduction in REDUCTIONS:
            rows.append([block, reduction,
                         *result_cells(by_variant.get((f"{block}{reduction}",), []), dense)])
    return table(["block", "reduction", "sparsity", "test CER %", "relative"], rows)


def sparsity_ladder(model: str) -> list[dict[str, Any]]:
    """BP 4x4 at every target sparsity, seed 0: ``an4_sparsity`` and ``an4_main``'s 90%."""
    return sorted(load("an4_sparsity") + _main_rows(model, 512, "bp", seed=0),
                  key=lambda r: r["sparsity"]["total"]["sparsity"])


def sparsity_table(model: str) -> list[str]:
    """Test CER against the final sparsity of BP 4x4 (the numbers of the plot)."""
    if not load("an4_sparsity"):
        return ["*an4_sparsity: not run yet.*", ""]
    runs = sparsity_ladder(model)
    dense = dense_baseline(load("an4_main"), model)
    return table(["target", "sparsity", "nonzero params (M)", "test CER %", "relative"], [
        [r["variant"] or "90", sparsity(r),
         f"{r['params']['nonzero'] / 1e6:.2f}", f"{metric(r):.2f}", relative(metric(r), dense)]
        for r in runs])


def oneshot_table(model: str) -> list[str]:
    """P2: gradual pruning (``an4_main``) against one-shot pruning at 40% of training
    (``an4_oneshot``), both to 90%."""
    oneshot = grouped(load("an4_oneshot"), "method")
    if not oneshot:
        return ["*an4_oneshot: not run yet.*", ""]
    dense = dense_baseline(load("an4_main"), model)
    rows = []
    for method in ("wp", "bp"):
        for schedule, group in (("gradual (cubic, 10%–40%)", _main_rows(model, 512, method)),
                                ("one-shot at 40%", oneshot.get((method,), []))):
            if not group:
                rows.append([method.upper(), schedule, "not run yet", "", ""])
                continue
            values = [metric(r) for r in group]
            rows.append([method.upper(), schedule,
                         sparsity(group[0]),
                         summary(values), relative(float(np.mean(values)), dense)])
    return table(["algorithm", "schedule", "sparsity", "test CER %", "relative"], rows)


def p3_table(study: str, dense_study: str) -> list[str]:
    """P3: block-diagonal recurrent matrices, G modules, at equal H and equal weights."""
    runs = load(study)
    if not runs:
        return [f"*{study}: not run yet.*", ""]
    dense_runs = [r for r in load(dense_study) if r["model"] == runs[0]["model"]]
    dense = dense_baseline(dense_runs, runs[0]["model"])
    dense_values = [metric(r) for r in dense_runs
                    if r["features"] == 512 and r["method"] == "dense"]
    rows = [[1, 512, f"{512 ** 2:,} per gate (dense)",
             summary(dense_values) if dense_values else f"not run yet ({dense_study})", ""]]
    for (variant, features), group in sorted(
            grouped(runs, "variant", "features").items(),
            key=lambda item: (int(item[0][0].removeprefix("G")), item[0][1])):
        g = int(variant.removeprefix("G"))
        values = [metric(r) for r in group]
        rows.append([g, features, f"{features ** 2 // g:,} per gate", summary(values),
                     relative(float(np.mean(values)), dense)])
    return table(["G", "hidden", "recurrent weights", "test perplexity", "relative"], rows)


def train_losses(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The logged training steps and losses of a run (``metrics.jsonl``)."""
    records = [json.loads(line) for line in (run["dir"] / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["split"] == "train"]
    return np.array([r["step"] for r in records]), np.array([r["loss"] for r in records])


def worst_rise(run: dict[str, Any], until: float = 0.4) -> float:
    """The largest training-loss rise in the first ``until`` of training: max over logged
    steps of loss / (lowest loss logged before it); 1.0 when the loss never rises. The
    first pass's failed RNN seeds rose 1.4-1.5x at step 150."""
    steps, losses = train_losses(run)
    keep = steps <= until * run["config"]["num_steps"]
    losses = losses[keep]
    if len(losses) < 2:
        return 1.0
    lowest = np.minimum.accumulate(losses)[:-1]
    return float(max(1.0, np.max(losses[1:] / lowest)))


def _recipe_label(variant: str) -> str:
    """A recipe's settings in words (``""``: the first pass's)."""
    if not variant:
        return "first pass: Adam 1e-3, warm-up 200, clip 5"
    words = {"optimizer.learning_rate": "lr {}", "optimizer.warmup_steps": "warm-up {}",
             "optimizer.grad_clip": "clip {}", "model.input_norm": "layer norm"}
    settings = RECIPES[variant.removeprefix("_")]
    return ", ".join(words[k].format(v) for k, v in settings.items() if v is not False)


def recipe_table() -> list[str]:
    """The RNN recipe candidates (``an4_recipe``) against the first pass's dense RNN 512
    (``an4_main``): test CER by seed, its mean and spread, and the worst loss rise."""
    runs = load("an4_recipe")
    if not runs:
        return ["*an4_recipe: not run yet.*", ""]
    groups = {"": _main_rows("rnn", 512, "dense"), **{
        variant: group for (variant,), group in grouped(runs, "variant").items()}}
    rows = []
    for variant, group in sorted(groups.items(), key=lambda item: (item[0] != "", item[0])):
        group = sorted(group, key=lambda r: r["seed"])
        rows.append([variant.removeprefix("_") or "base", _recipe_label(variant),
                     " / ".join(f"{metric(r):.1f}" for r in group),
                     summary([metric(r) for r in group]),
                     f"{max(worst_rise(r) for r in group):.2f}x",
                     f"{np.mean([r['metrics']['train']['loss'] for r in group]):.3f}"])
    return table(["recipe", "settings", "test CER % by seed", "test CER %",
                  "worst loss rise (first 40%)", "final train loss"], rows)


def recipe_main_table() -> list[str]:
    """P1's main table for the RNN under each candidate recipe (``an4_rnn_recipe``, dense
    512 from ``an4_recipe``)."""
    runs = load("an4_rnn_recipe")
    if not runs:
        return ["*an4_rnn_recipe: not run yet.*", ""]
    dense = grouped(load("an4_recipe"), "variant")
    rows = []
    for (variant,), group in sorted(grouped(runs + load("an4_recipe"), "variant").items()):
        baseline = [metric(r) for r in dense.get((variant,), [])]
        for (features, method), row in sorted(grouped(group, "features", "method").items(),
                                              key=lambda item: _row_order(*item[0])):
            values = [metric(r) for r in row]
            rows.append([variant.removeprefix("_"), f"RNN {features}",
                         method.upper() if method != "dense" else "dense", sparsity(row[0]),
                         summary(values), relative(float(np.mean(values)),
                                                   float(np.mean(baseline)) if baseline
                                                   else None),
                         P1_MAIN.get(("rnn", features, method), "")])
    return table(["recipe", "model", "algorithm", "sparsity", "test CER %", "relative",
                  "paper (P1)"], rows)


def claim_c_table(model: str) -> list[str]:
    """Claim (c): P2's threshold at every block size, three ways of setting θ_b: P1's
    θ·N_b^(1/4) with q of the weights (``an4_blocks``), θ·N_b^(1/8) with the same q
    (``an4_blocks_exp``), and q measured on each size's block scores (``an4_blocks_q``).
    Each cell: sparsity reached, test CER."""
    variants = [("an4_blocks", "N_b^(1/4), q of |w| (P1)"),
                ("an4_blocks_exp", f"N_b^({SMALL_EXPONENT:g}), q of |w|"),
                ("an4_blocks_q", "q of the block scores")]
    runs = {study: grouped([r for r in load(study) if r["model"] == model], "variant")
            for study, _ in variants}
    if not runs["an4_blocks_exp"] and not runs["an4_blocks_q"]:
        return ["*an4_blocks_exp, an4_blocks_q: not run yet.*", ""]
    # N_b^(1/8) at 1x1 is N_b^(1/4) at 1x1 (N_b = 1): the same run.
    runs["an4_blocks_exp"].setdefault(("1x1",), runs["an4_blocks"].get(("1x1",), []))
    rows = []
    for shape in BLOCK_SHAPES:
        block = block_shape_name(shape)
        cells = []
        for study, _ in variants:
            group = runs[study].get((block,), [])
            cells += ([sparsity_summary(group), summary([metric(r) for r in group])]
                      if group else ["not run yet", ""])
        rows.append([block, *cells, P1_BLOCKS.get((model, block), "")])
    header = ["block"]
    for _, label in variants:
        header += [f"{label}: sparsity", "test CER %"]
    return table([*header, "paper (P1): sparsity, relative"], rows)


def claim_f_layers(model: str) -> dict[str, list[dict[str, Any]]]:
    """The gradual runs of claim (f), ``{label: runs}``: P2's q per layer type
    (``an4_blocks``) and q per layer (``an4_layer_q``), at 1x1, 4x4 and 12x2."""
    result = {}
    for study, label in (("an4_blocks", "q per type"), ("an4_layer_q", "q per layer")):
        groups = grouped([r for r in load(study) if r["model"] == model], "variant")
        for block in ("1x1", "4x4", "12x2"):
            if (block,) in groups:
                result[f"{block}, {label}"] = groups[(block,)]
    return result


def claim_f_table(model: str) -> list[str]:
    """Claim (f): final sparsity by layer, input end first, under one q per layer type and
    one q per layer (mean over seeds)."""
    columns = claim_f_layers(model)
    if not any(label.endswith("per layer") for label in columns):
        return ["*an4_layer_q: not run yet.*", ""]
    layers = [k for k in next(iter(columns.values()))[0]["sparsity"] if k != "total"]
    rows = [[layer, *(sparsity_summary(group, layer) for group in columns.values())]
            for layer in [*layers, "total"]]
    return table(["layer", *columns], rows)


def _sparsity_curves(run: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    records = [json.loads(line) for line in (run["dir"] / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["split"] == "train"]
    steps = np.array([r["step"] for r in records])
    layers = [k for k in records[0] if k.startswith("sparsity/") and k != "sparsity/total"]
    return steps, {k.removeprefix("sparsity/"): np.array([r[k] for r in records]) for k in layers}


def plot_sparsity_vs_step(run: dict[str, Any], path: Path) -> None:
    """P2 Fig. 2: each layer's sparsity against the step, with each layer type's ε."""
    steps, curves = _sparsity_curves(run)
    config = ml_collections.ConfigDict(run["config"])
    schedules = methods.pruning_schedules(config)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        ax.plot(steps, 100 * values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity (%)")
    twin = ax.twinx()
    grid = np.arange(config.num_steps)
    for kind, schedule in schedules.items():
        twin.plot(grid, np.asarray(schedule.threshold(grid)), "--", lw=1, label=f"ε {kind}")
    twin.set_ylabel("threshold ε")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="center right")
    ax.set_title(f"{run['dir'].parent.name}/{run['dir'].name}: sparsity and threshold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_final_sparsity_by_layer(columns: dict[str, list[dict[str, Any]]], path: Path,
                                 title: str) -> None:
    """P1: final sparsity of each layer, input end first (claim (f)); one bar per column
    (label: runs), the mean over its seeds."""
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(columns)
    layers = [k for k in next(iter(columns.values()))[0]["sparsity"] if k != "total"]
    for i, (label, runs) in enumerate(columns.items()):
        ax.bar(np.arange(len(layers)) + i * width,
               [100 * np.mean([r["sparsity"][k]["sparsity"] for r in runs]) for k in layers],
               width, label=f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers, rotation=30, ha="right",
                  fontsize=7)
    ax.set_ylabel("final sparsity (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_connections_and_masks(runs: list[dict[str, Any]], layer: str, path: Path) -> None:
    """P1: a histogram of each neuron's output connections (kept weights in its row of the
    recurrent kernels, all gates), and the mask of one recurrent matrix, per run."""
    fig, axes = plt.subplots(2, len(runs), figsize=(4 * len(runs), 7), squeeze=False)
    for column, run in enumerate(runs):
        masks = report.load_masks(run["dir"] / "masks.npz")
        # A bidirectional layer's forward direction is <layer>_fwd.
        gates = sorted(k for k in masks if re.search(rf"{layer}(_fwd)?/recurrent_", k))
        if not gates:
            raise ValueError(f"{run['dir']}/masks.npz has no recurrent kernels of {layer}.")
        connections = sum(masks[k].sum(axis=1) for k in gates)
        axes[0, column].hist(connections, bins=40)
        axes[0, column].set_title(f"{run['dir'].name}: output connections per neuron", fontsize=8)
        axes[0, column].set_xlabel(f"kept weights in the neuron's rows of {len(gates)} gates")
        axes[1, column].imshow(masks[gates[-1]][:128, :128], cmap="gray_r", interpolation="none")
        axes[1, column].set_title(f"{gates[-1]}, top-left 128x128 (black: kept)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metric_vs_sparsity(runs: list[dict[str, Any]], dense: float | None, path: Path) -> None:
    """P1: test CER against final sparsity."""
    fig, ax = plt.subplots(figsize=(6, 4))
    points = sorted((100 * r["sparsity"]["total"]["sparsity"], metric(r)) for r in runs)
    ax.plot(*zip(*points, strict=True), "o-", label="BP 4x4, cubic schedule")
    if dense is not None:
        ax.axhline(dense, ls="--", color="gray", label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test CER (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build() -> list[str]:
    """Write TABLES.md and the plots; return the names of the plots not made (missing runs)."""
    PLOTS.mkdir(parents=True, exist_ok=True)
    lines = ["# Paper reproduction: tables", "",
             "Made by `python experiments/reproduce/build.py` from the runs in this folder "
             "(each run's `command.txt` has its launch command; `experiments/reproduce/grid.py` "
             "defines them). Metric: mean ± half the range over seeds.", "",
             "## AN4, P1's main table (test CER %)", "",
             *main_table("an4_main", "test CER %", P1_MAIN),
             "## AN4, GL against GLP", "", *gl_table(),
             "## AN4, block sizes (gradual threshold, θ_b = θ·N_b^(1/4), q of the dense 512)", "",
             *blocks_table(),
             f"## AN4, claim (c): three ways to set θ_b ({SIDE_MODEL.upper()} 512, gradual "
             "threshold)", "",
             f"q of the block scores: the 90th percentile of each block size's max scores in "
             f"{'/'.join(Q_REFERENCE)} (`dense_scores.json`), no N_b scaling. Each cell: "
             "mean ± half-range over seeds.", "",
             *claim_c_table(SIDE_MODEL),
             f"## AN4, claim (f): sparsity by layer, q per type against q per layer "
             f"({SIDE_MODEL.upper()} 512, gradual threshold)", "",
             *claim_f_table(SIDE_MODEL),
             f"## AN4, block sizes at one sparsity ({SIDE_MODEL.upper()} 512, cubic to 90%)", "",
             *blocks_cubic_table(SIDE_MODEL),
             f"## AN4, block reductions ({SIDE_MODEL.upper()} 512, cubic to 90%)", "",
             *reductions_table(SIDE_MODEL),
             f"## AN4, CER against sparsity ({SIDE_MODEL.upper()} 512, BP 4×4, seed 0)", "",
             *sparsity_table(SIDE_MODEL),
             f"## AN4, gradual against one-shot pruning ({SIDE_MODEL.upper()} 512, to 90%)", "",
             *oneshot_table(SIDE_MODEL),
             "## AN4, RNN training recipes (dense RNN 512)", "", *recipe_table(),
             "## AN4, P1's main table for the RNN under each recipe (test CER %)", "",
             *recipe_main_table()]
    for study, title in (("ptb_main", "PTB words (test perplexity)"),
                         ("ptb_main_lr1", "PTB words, first pass at lr 1 (undertrained; "
                          "test perplexity)")):
        lines += [f"## {title}", "", *main_table(study, "test perplexity", None)]
    for study, dense_study in (("ptb_p3", "ptb_main"), ("ptb_p3_lr1", "ptb_main_lr1")):
        lines += [f"## P3 on PTB, LSTM ({study})", "", *p3_table(study, dense_study)]
    (RESULTS / "TABLES.md").write_text("\n".join(lines))

    missing = []
    blocks = {(r["model"], r["variant"]): r for r in load("an4_blocks") if r["seed"] == 0}
    main = {(r["model"], r["features"], r["method"], r["seed"]): r for r in load("an4_main")}
    if ("gru", "1x1") in blocks:
        plot_sparsity_vs_step(blocks[("gru", "1x1")], PLOTS / "sparsity_vs_step.png")
    else:
        missing.append("sparsity_vs_step.png")
    by_type = {label: runs for label, runs in claim_f_layers("gru").items()
               if label.endswith("per type")}
    if by_type:
        plot_final_sparsity_by_layer(
            by_type, PLOTS / "sparsity_by_layer.png",
            "final sparsity by layer, input end on the left (gradual threshold, q per type)")
    else:
        missing.append("sparsity_by_layer.png")
    columns = claim_f_layers(SIDE_MODEL)
    if any(label.endswith("per layer") for label in columns):
        plot_final_sparsity_by_layer(
            columns, PLOTS / "sparsity_by_layer_q.png",
            "claim (f): final sparsity by layer, q per layer type against q per layer")
    else:
        missing.append("sparsity_by_layer_q.png")
    cubic_32 = [r for r in load("an4_blocks_cubic") if r["variant"] == "32x32"]
    candidates = [main.get(("gru", 512, "wp", 0)), main.get(("gru", 512, "bp", 0)),
                  *cubic_32]
    mask_runs = [r for r in candidates if r and (r["dir"] / "masks.npz").exists()]
    if mask_runs:
        plot_connections_and_masks(mask_runs, "rnn/layer_0", PLOTS / "connections_and_masks.png")
    else:
        missing.append("connections_and_masks.png")
    ladder = sparsity_ladder(SIDE_MODEL)
    if len(ladder) >= 3:
        plot_metric_vs_sparsity(ladder, dense_baseline(list(main.values()), SIDE_MODEL),
                                PLOTS / "cer_vs_sparsity.png")
    else:
        missing.append("cer_vs_sparsity.png")
    return missing


if __name__ == "__main__":
    not_made = build()
    print(f"wrote {RESULTS / 'TABLES.md'} and {PLOTS}; not made (runs missing): {not_made}")
