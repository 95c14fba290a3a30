r"""The paper-reproduction grid (SPEC §2.5, P2, P3) at AN4 and PTB scale: every run, by study.

Studies (``python experiments/reproduce/grid.py list`` prints every run and its command):

* ``an4_main``: P1's main table on CMU AN4 (CTC, test CER and WER), DS2-style bidirectional
  clipped-ReLU RNN and forward GRU with row convolution, 3 recurrent layers. The ladder,
  scaled from P1's 1760 / 704 / 2560 / 3072 (RNN) and 2560 / 704 / 3584 (GRU): a dense
  "big" model of 512 (AN4's 948 utterances do not support much more); a dense "small"
  model of 192, whose weights are about as many as the big model's nonzeros at 90%
  (192² / 512² = 0.14, P1's 704² / 1760² = 0.16); larger sparse models of 768 and 896
  (RNN, 1.5x and 1.75x the big one, as P1's 2560 and 3072 are of 1760) and 704 (GRU,
  1.375x, as 3584 of 2560). Rows dense, WP (1x1), BP 4x4, GL and GLP at 512; GLP and BP
  on the larger sizes. Two seeds each (three for the RNN, whose seeds disagree). Pruning:
  the cubic schedule to 90% of every matrix (equal sparsity makes rows comparable; P1
  tunes its threshold per run to get there).
* ``ptb_main``: the same ladder and rows on Penn Treebank words (perplexity), GRU and
  LSTM of 2 layers, 512 / 192 / 768.
* ``ptb_p3``: P3's block-diagonal recurrent matrices, LSTM, G in {2, 4, 8, 16} (G = 1 is
  ``ptb_main``'s dense 512) at equal hidden size (512) and at equal recurrent weights
  (H = 512·√G, so H²/G stays 512²).
* ``an4_blocks``: P1's block-size table with one schedule: P2's gradual threshold with
  θ_b = θ·N_b^(1/4), q from the dense 512 run of ``an4_main`` (seed 0), blocks 1x1,
  4x4, 12x2, 8x8, 16x16 and 32x32, RNN and GRU 512 (the 32x32 runs keep 16x16 on the
  fully connected type, whose output layer is 512 x 28). Its per-layer sparsity also
  tests claim (f).
* ``an4_blocks_cubic``: the block sizes again at one sparsity: the cubic schedule to 90%
  of every matrix, GRU 512, blocks 8x8, 12x2 and 32x32 (1x1 and 4x4 are ``an4_main``'s WP
  and BP rows, 16x16 is ``an4_reductions``' max). Under P2's threshold the large blocks
  are pruned to 99% (``an4_blocks``); this asks what block size costs at equal sparsity.
* ``an4_reductions``: the block reductions max, mean, rms, geomean and median at 4x4 and
  16x16 (GRU 512, cubic to 90%; max at 4x4 is ``an4_main``'s BP row).
* ``an4_sparsity``: BP 4x4 at 70%, 80%, 95% and 97% (90% is ``an4_main``'s), for the
  accuracy-against-sparsity curve.
* ``an4_oneshot``: P2's comparison, one-shot pruning to 90% at 40% of training (then
  training on) against ``an4_main``'s gradual BP and WP at the same final count.

Second pass (issue 17):

* ``an4_recipe``: candidate training recipes for the clipped-ReLU RNN (``RECIPES``: lower
  learning rate with longer warm-up and clip 1; layer norm on the input projections;
  both), dense RNN 512, three seeds; ``an4_rnn_recipe``: the RNN rows of the main table
  under each (pick one with ``--match=_<recipe>_``).
* ``an4_blocks_exp`` and ``an4_blocks_q``: claim (c)'s two fixes for θ_b = θ·N_b^(1/4):
  a smaller exponent (1/8, ``prune.block_exponent``) with the first pass's q, and q
  measured on each block size's scores (the 90th percentile of the dense model's max
  block scores; exponent 0), GRU 512.
* ``an4_layer_q``: claim (f), P2's threshold with one q per layer (``prune.q_layers``, the
  90th percentile of that layer's block scores), GRU 512 at 1x1, 4x4 and 12x2.

q per block size and per layer come from the weights of ``Q_REFERENCE`` (the GRU dense
512, seed 2): ``collect`` reads each ``keep_scores`` run's newest checkpoint from the
workdir and writes ``dense_scores.json`` (:func:`score_percentiles`) beside its report,
so those runs must be trained and collected (same call, same ``--workdir``) before the
studies that read it can run. The first pass kept no checkpoints. Every AN4 study of P1's
tables and the reductions, and P3, now have seeds 0, 1 and 2.

The last four studies of the first pass use the GRU (``SIDE_MODEL``): they are read
against its main-table rows, which were trained first, and its seeds agree far better
than the clipped-ReLU RNN's on AN4 (CER half-ranges 0.3-1.5 points, GL 4.6, against up to 32).

Run studies (several processes share each GPU; a run whose ``report.json`` is already
under ``--results`` is skipped; ``--deadline`` stops the rest and keeps what finished)::

    python experiments/reproduce/grid.py run --studies=an4_main,ptb_main \
        --workdir=/tmp/grid --workers=16 --deadline=540
    python experiments/reproduce/grid.py collect --workdir=/tmp/grid

``collect`` copies each finished run's ``report.json``, ``metrics.jsonl`` and
``command.txt`` (and ``masks.npz`` for the runs the plots need) to
``experiments/results/<study>/<run>/``; ``experiments/reproduce/build.py`` makes the
tables and plots from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from flax import traverse_util  # noqa: E402

from bsrnn import export, launcher, methods, schedules  # noqa: E402
from bsrnn import report as report_lib  # noqa: E402
from bsrnn.configs import LAYER_TYPES, all_types  # noqa: E402

RESULTS = REPO / "experiments" / "results"
AN4 = "experiments/configs/an4_ds2.py"
PTB = "experiments/configs/ptb_word.py"
SEEDS = (0, 1)
THREE_SEEDS = (0, 1, 2)
# The clipped-ReLU RNN's two seeds disagreed by up to 31 CER points on AN4: a third seed;
# the second pass (issue 17) gives every AN4 and P3 row three.
AN4_SEEDS = {"rnn": THREE_SEEDS, "gru": THREE_SEEDS}
BLOCK_SHAPES = ((1, 1), (4, 4), (12, 2), (8, 8), (16, 16), (32, 32))
REDUCTIONS = ("max", "mean", "rms", "geomean", "median")
SIDE_MODEL = "gru"  # the model of the cubic block-size, reductions, sparsity and
# one-shot studies

# AN4: 50 epochs of 32 utterances (948 / 32 = 29.6 steps an epoch).
# export_timing off: the end-of-run inference timing is not part of any table, and with six
# runs sharing a GPU its autotuning outlasted the call's deadline (2026-12-03).
AN4_COMMON = {"batch_size": 32, "eval_every": 500, "checkpoint_every": 500,
              "export_timing": False}
AN4_STEPS = 1500
# PTB: 9.6 epochs of 64 x 35 words (929k / 2240 = 415 steps an epoch), dropout 0.4.
PTB_COMMON = {"batch_size": 64, "eval_every": 2000, "checkpoint_every": 2000,
              "model.dropout": 0.4, "export_timing": False}
PTB_STEPS = 4000

# Candidate training recipes for the clipped-ReLU RNN (issue 17; the first pass's Adam 1e-3,
# 200 warm-up steps, clip 5 spiked on some seeds near step 150): a lower learning rate with
# a longer warm-up and tighter clipping; DS2's normalised input projections (layer norm per
# frame); both.
# The RNN settings of the first pass (the config's defaults then): every RNN run of the grid
# pins them, so its flags mean what they meant when it was trained; a recipe overrides them.
# The config's RNN default is now the ``lnlr5e4`` recipe (3 seeds of the dense 512 within
# 0.8 CER points, WORKSPACE.md).
FIRST_PASS_RNN = {"model.input_norm": False, "optimizer.learning_rate": 1e-3,
                  "optimizer.warmup_steps": 200, "optimizer.grad_clip": 5.0}
RECIPES = {
    "lr5e4": {"optimizer.learning_rate": 5e-4, "optimizer.warmup_steps": 300,
              "optimizer.grad_clip": 1.0},
    "ln": {"model.input_norm": True},
    "lnlr5e4": {"model.input_norm": True, "optimizer.learning_rate": 5e-4,
                "optimizer.warmup_steps": 300, "optimizer.grad_clip": 1.0},
}
# Claim (c)'s smaller exponent: θ_b = θ·N_b^(1/8), about how the 90th percentile of the max
# of N_b Gaussian |w| grows (1.65x at 16, 1.91x at 64, 2.15x at 256 weights; P1's 1/4 gives
# 2x, 2.8x, 4x).
SMALL_EXPONENT = 0.125
# The dense run whose block scores give the per-block-size and per-layer q (its
# dense_scores.json, written by ``collect`` from its checkpoint): the side model's third
# seed, trained in the second pass (the first pass kept no weights).
Q_REFERENCE = ("an4_main", f"{SIDE_MODEL}512_dense_s2")
Q_PERCENTILE = 90.0


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the grid.

    Attributes:
      study: its study (a folder of ``experiments/results``).
      name: its name in the study, e.g. ``rnn512_bp_s0``.
      config: ``--config`` of ``launch.py`` (file and arg).
      overrides: config overrides, ``{"a.b": value}``.
      keep_masks: whether ``collect`` keeps its ``masks.npz`` (for the plots).
      keep_scores: whether ``collect`` writes its ``dense_scores.json`` (the percentiles
        of its block scores, from its checkpoint: q for the runs that take it).
    """

    study: str
    name: str
    config: str
    overrides: dict[str, Any]
    keep_masks: bool = False
    keep_scores: bool = False

    def args(self) -> list[str]:
        """The ``launch.py`` flags of this run, ``--workdir`` aside."""
        return [f"--config={self.config}",
                *(launcher.config_flag(k, v) for k, v in self.overrides.items())]


def _an4(study: str, model: str, features: int, method: str, seed: int = 0,
         suffix: str = "", keep_masks: bool = False, keep_scores: bool = False,
         **overrides: Any) -> Run:
    return Run(study, f"{model}{features}_{method}{suffix}_s{seed}",
               f"{AN4}:model={model},features={features},method={method},steps={AN4_STEPS}",
               {**AN4_COMMON, "seed": seed, **(FIRST_PASS_RNN if model == "rnn" else {}),
                **overrides}, keep_masks, keep_scores)


def _ptb(study: str, cell: str, features: int, method: str, seed: int = 0,
         suffix: str = "", **overrides: Any) -> Run:
    return Run(study, f"{cell}{features}_{method}{suffix}_s{seed}",
               f"{PTB}:cell={cell},features={features},method={method},steps={PTB_STEPS}",
               {**PTB_COMMON, "seed": seed, **overrides})


# (features, method) rows of the main tables: AN4 per model, PTB for both cells.
_AT_512 = [(512, "dense"), (192, "dense"), (512, "wp"), (512, "bp"), (512, "gl"), (512, "glp")]
AN4_ROWS = {"rnn": [*_AT_512, (768, "glp"), (896, "bp")],
            "gru": [*_AT_512, (704, "bp"), (704, "glp")]}
PTB_ROWS = [*_AT_512, (768, "bp"), (768, "glp")]


def dense_q(study: str, name: str) -> dict[str, float]:
    """P2's q per layer type: the 90th-percentile |w| of the dense run ``study/name``."""
    path = RESULTS / study / name / "report.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the gradual schedule takes q from that dense run; run its "
            f"study first (grid.py run --studies={study}) and collect it.")
    return json.loads(path.read_text())["weight_percentile_90"]


def block_shape_name(block_shape: tuple[int, int]) -> str:
    """``(8, 8)`` -> ``"8x8"``, the keys of ``dense_scores.json`` and the run names."""
    return f"{block_shape[0]}x{block_shape[1]}"


def score_percentiles(params: Any, masks: Any, block_shapes: Any = BLOCK_SHAPES,
                      percentile: float = Q_PERCENTILE) -> dict[str, Any]:
    """The ``percentile`` of the max block scores of a trained dense model, per block shape,
    per layer type and per layer: q measured per block size (claim (c)) and per layer
    (claim (f)).

    Args:
      params, masks: the model's params and ``masks`` collection (numpy or jax trees).
      block_shapes: the (bh, bw) to measure; a shape that does not fit a kernel (wider than
        it) is left out for that kernel's type and layer.
      percentile: in [0, 100] (P2: 90).

    Returns:
      ``{"percentile": p, "by_type": {"8x8": {"input": q, ...}, ...},
      "by_layer": {"8x8": {"rnn/layer_0/input": q, ...}, ...}}``; layer names as in
      ``report.json``'s ``sparsity``.
    """
    layer_type = methods.prunable_layer_type(masks, LAYER_TYPES)
    kernels: dict[tuple[str, str], list[Any]] = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        kind = layer_type(path, leaf)
        if kind is not None:
            kernels.setdefault((kind, report_lib.layer_name(path)), []).append(leaf)
    result: dict[str, Any] = {"percentile": percentile, "by_type": {}, "by_layer": {}}
    for shape in block_shapes:
        name = block_shape_name(shape)
        fits = {key: leaves for key, leaves in kernels.items()
                if all(shape[0] <= k.shape[0] and shape[1] <= k.shape[1] for k in leaves)}
        by_type: dict[str, list[Any]] = {}
        for (kind, _), leaves in fits.items():
            by_type.setdefault(kind, []).extend(leaves)
        result["by_type"][name] = {kind: schedules.percentile_block_scores(
            leaves, shape, "max", percentile) for kind, leaves in by_type.items()}
        result["by_layer"][name] = {layer: schedules.percentile_block_scores(
            leaves, shape, "max", percentile) for (_, layer), leaves in fits.items()}
    return result


def dense_scores(study: str, name: str) -> dict[str, Any]:
    """``dense_scores.json`` of the dense run ``study/name`` (see :func:`score_percentiles`)."""
    path = RESULTS / study / name / "dense_scores.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: q per block size and per layer come from that dense run's "
            f"weights; run it (grid.py run --studies={study} --match=^{name}$) and collect it "
            "from the same --workdir (collect reads its checkpoint).")
    return json.loads(path.read_text())


def _type_q(shape: tuple[int, int]) -> dict[str, Any]:
    """``prune.q.<type>`` overrides: the reference run's q per type at ``shape`` (nan while
    it is missing). The output layer keeps 16x16 where the blocks are wider than it."""
    try:
        scores = dense_scores(*Q_REFERENCE)["by_type"]
        q = dict(scores[block_shape_name(shape)])
        if "fc" not in q or shape[1] > 28:
            q["fc"] = scores["16x16"]["fc"]
    except FileNotFoundError:
        q = {kind: math.nan for kind in LAYER_TYPES}
    return {f"prune.q.{kind}": value for kind, value in q.items()}


def _layer_q(shape: tuple[int, int]) -> dict[str, Any]:
    """The ``prune.q_layers`` override: the reference run's q per layer at ``shape`` (nan
    for the side model's layers while it is missing)."""
    try:
        q = dense_scores(*Q_REFERENCE)["by_layer"][block_shape_name(shape)]
    except FileNotFoundError:
        q = {name: math.nan for name in (
            *(f"rnn/layer_{i}/{kind}" for i in range(3) for kind in ("input", "recurrent")),
            "fc", "output")}
    return {"prune.q_layers": tuple(sorted(q.items()))}


def studies() -> dict[str, list[Run]]:
    """Every study of the grid, ``{study: [Run, ...]}`` (see the module docstring)."""
    grid: dict[str, list[Run]] = {}
    grid["an4_main"] = [
        _an4("an4_main", model, features, method, seed,
             keep_masks=seed == 0 and features == 512 and method in ("wp", "bp"),
             keep_scores=(features, method) == (512, "dense"))
        for model in ("rnn", "gru") for features, method in AN4_ROWS[model]
        for seed in AN4_SEEDS[model]
    ]
    grid["ptb_main"] = [
        _ptb("ptb_main", cell, features, method, seed)
        for cell in ("gru", "lstm") for features, method in PTB_ROWS for seed in SEEDS
    ] + [_ptb("ptb_main", "lstm", 512, "dense", 2)]  # P3's G = 1 row, third seed
    grid["ptb_p3"] = [
        _ptb("ptb_p3", "lstm", features, "structural", seed, suffix=f"G{g}",
             **{"structure.num_modules": g})
        for g in (2, 4, 8, 16)
        for features in (512, g * round(512 * math.sqrt(g) / g)) for seed in THREE_SEEDS
    ]
    grid["an4_blocks"] = [
        _an4("an4_blocks", model, 512, "bp", seed, suffix=f"{bh}x{bw}",
             keep_masks=seed == 0 and (bh, bw) in ((1, 1), (4, 4), (32, 32)),
             **{"prune.schedule": "gradual"}, **_block_shape(bh, bw),
             **{f"prune.q.{kind}": q for kind, q in _q_or_placeholder(model).items()})
        for model in ("rnn", "gru") for bh, bw in BLOCK_SHAPES for seed in THREE_SEEDS
    ]
    # Claim (c)'s two fixes, side model: the first pass's q per type with θ_b = θ·N_b^(1/8)
    # (1x1 is an4_blocks' own: N_b = 1); q measured on the block scores of each size, no
    # N_b scaling.
    grid["an4_blocks_exp"] = [
        _an4("an4_blocks_exp", SIDE_MODEL, 512, "bp", seed, suffix=f"{bh}x{bw}",
             **{"prune.schedule": "gradual", "prune.block_exponent": SMALL_EXPONENT},
             **_block_shape(bh, bw),
             **{f"prune.q.{kind}": q for kind, q in _q_or_placeholder(SIDE_MODEL).items()})
        for bh, bw in BLOCK_SHAPES[1:] for seed in THREE_SEEDS
    ]
    grid["an4_blocks_q"] = [
        _an4("an4_blocks_q", SIDE_MODEL, 512, "bp", seed, suffix=f"{bh}x{bw}",
             **{"prune.schedule": "gradual", "prune.block_exponent": 0.0},
             **_block_shape(bh, bw), **_type_q((bh, bw)))
        for bh, bw in BLOCK_SHAPES for seed in THREE_SEEDS
    ]
    # Claim (f): P2's threshold with one q per layer (the 90th percentile of that layer's
    # block scores in the dense model), at the block sizes of P1's figure.
    grid["an4_layer_q"] = [
        _an4("an4_layer_q", SIDE_MODEL, 512, "bp", seed, suffix=f"{bh}x{bw}",
             **{"prune.schedule": "gradual", "prune.block_exponent": 0.0},
             **all_types("prune.block_shape", (bh, bw)), **_layer_q((bh, bw)))
        for bh, bw in ((1, 1), (4, 4), (12, 2)) for seed in THREE_SEEDS
    ]
    # The candidate RNN recipes: the dense 512 first (which recipe trains it reliably),
    # then every RNN row of the main table under each (select one with --match=_<recipe>_).
    grid["an4_recipe"] = [
        _an4("an4_recipe", "rnn", 512, "dense", seed, suffix=f"_{recipe}", keep_scores=seed == 0,
             **overrides)
        for recipe, overrides in RECIPES.items() for seed in THREE_SEEDS
    ]
    grid["an4_rnn_recipe"] = [
        _an4("an4_rnn_recipe", "rnn", features, method, seed, suffix=f"_{recipe}",
             keep_masks=seed == 0 and features == 512 and method in ("wp", "bp"), **overrides)
        for recipe, overrides in RECIPES.items()
        for features, method in AN4_ROWS["rnn"] if (features, method) != (512, "dense")
        for seed in THREE_SEEDS
    ]
    grid["an4_blocks_cubic"] = [
        _an4("an4_blocks_cubic", SIDE_MODEL, 512, "bp", seed, suffix=f"{bh}x{bw}",
             keep_masks=seed == 0 and (bh, bw) == (32, 32), **_block_shape(bh, bw))
        for bh, bw in ((8, 8), (12, 2), (32, 32)) for seed in THREE_SEEDS
    ]
    grid["an4_reductions"] = [
        _an4("an4_reductions", SIDE_MODEL, 512, "bp", seed,
             suffix=f"{shape[0]}x{shape[1]}{reduction}",
             **all_types("prune.block_shape", shape), **all_types("prune.reduction", reduction))
        for shape in ((4, 4), (16, 16)) for reduction in REDUCTIONS
        if (shape, reduction) != ((4, 4), "max") for seed in THREE_SEEDS
    ]
    grid["an4_sparsity"] = [
        _an4("an4_sparsity", SIDE_MODEL, 512, "bp", suffix=f"{round(100 * s)}",
             **all_types("prune.sparsity", s))
        for s in (0.7, 0.8, 0.95, 0.97)
    ]
    grid["an4_oneshot"] = [
        # The cubic schedule from 39% to 40% with a recompute interval longer than that
        # window prunes nothing at 39% (its start value is 0) and everything at 40%.
        _an4("an4_oneshot", SIDE_MODEL, 512, method, seed, suffix="oneshot",
             **{"prune.begin_fraction": 0.39, "prune.ramp_fraction": 0.39,
                "prune.end_fraction": 0.4, "prune.freq": 10_000})
        for method in ("bp", "wp") for seed in SEEDS
    ]
    return grid


def _block_shape(bh: int, bw: int) -> dict[str, tuple[int, int]]:
    """Block shape overrides for every layer type; AN4's output layer is 512 x 28 (27
    symbols and the blank), too narrow for 32-wide blocks, so those keep 16x16 there."""
    return {**all_types("prune.block_shape", (bh, bw)),
            **({"prune.block_shape.fc": (16, 16)} if bw > 28 else {})}


def _q_or_placeholder(model: str) -> dict[str, float]:
    """q of the dense AN4 ``model`` 512 run, or ``nan`` while that run is missing (``run``
    refuses studies with nan in them, so ``list`` works before the dense runs exist)."""
    try:
        return dense_q("an4_main", f"{model}512_dense_s0")
    except FileNotFoundError:
        return {kind: math.nan for kind in ("input", "recurrent", "fc")}


def _select(names: str, match: str = "") -> list[Run]:
    grid = studies()
    chosen = [s for s in names.split(",") if s]
    unknown = [s for s in chosen if s not in grid]
    if unknown:
        raise SystemExit(f"grid.py: unknown studies {unknown}; known: {sorted(grid)}.")
    runs = [run for study in chosen for run in grid[study]
            if re.search(match, run.name) or re.search(match, f"{study}/{run.name}")]
    missing_q = [r.name for r in runs if _has_nan(list(r.overrides.values()))]
    if missing_q:
        raise SystemExit(f"grid.py: {missing_q} need q from dense runs not yet collected "
                         f"(an4_main's dense 512 runs; dense_scores.json of "
                         f"{'/'.join(Q_REFERENCE)}); run and collect those first.")
    return runs


def _has_nan(value: Any) -> bool:
    """Whether ``value`` (a float, or tuples and lists of them) holds a nan placeholder."""
    if isinstance(value, tuple | list):
        return any(_has_nan(v) for v in value)
    return isinstance(value, float) and math.isnan(value)


def run(names: str, workdir: Path, workers: int, deadline: float, match: str = "") -> None:
    """Train every run of the studies ``names`` not yet in ``experiments/results`` whose
    name matches the regular expression ``match``."""
    runs = [r for r in _select(names, match)
            if not (RESULTS / r.study / r.name / "report.json").exists()]
    stale = [f"{r.study}/{r.name}" for r in runs if _stale(workdir / r.study / r.name, r)]
    if stale:
        raise SystemExit(f"grid.py: {stale} in {workdir} were started with other flags "
                         "(their command.txt differs); delete those folders or use another "
                         "--workdir, so that no run resumes from another run's checkpoint.")
    # Seed 0 of every run first: the later seeds compile the same programs, which they then
    # find in the shared compilation cache.
    runs.sort(key=lambda r: r.overrides.get("seed", 0))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(workdir / "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # cuBLAS for every GEMM: XLA's Triton GEMM autotuner compiles hundreds of kernel
    # configurations per program on the CPU: 12 AN4 runs starting at once on 16 cores took
    # 7 minutes to reach step 50; with this flag, 12 runs start in about a minute.
    if "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_gpu_enable_triton_gemm=false").strip()
    jobs = [{"workdir": workdir / r.study / r.name, "args": r.args()} for r in runs]
    print(f"grid.py: {len(jobs)} runs, {workers} at a time", flush=True)
    started = time.time()
    launcher.run_in_processes(jobs, workers, deadline=deadline)
    for job in jobs:
        status = job.get("error", "done")
        print(f"{job['workdir'].relative_to(workdir)}: {status}", flush=True)
    print(f"grid.py: {time.time() - started:.0f} s", flush=True)


def _stale(folder: Path, run_: Run) -> bool:
    """Whether ``folder`` holds a start of ``run_`` with other flags than today's."""
    command = folder / "command.txt"
    if not command.exists():
        return False
    # The flags, whatever started them (`python launch.py ...` or `python -m bsrnn ...`).
    flags = [a for a in shlex.split(command.read_text())
             if a.startswith("--") and not a.startswith("--workdir=")]
    return flags != run_.args()


def collect(workdir: Path) -> None:
    """Copy the finished runs under ``workdir`` that the grid defines, with today's flags,
    into ``experiments/results``."""
    grid = {(r.study, r.name): r for runs in studies().values() for r in runs}
    copied = 0
    for report in sorted(workdir.glob("*/*/report.json")):
        study, name = report.parent.parent.name, report.parent.name
        if (study, name) not in grid or _stale(report.parent, grid[study, name]):
            print(f"grid.py: skipped {study}/{name}: not in the grid, or run with other flags")
            continue
        target = RESULTS / study / name
        target.mkdir(parents=True, exist_ok=True)
        files = ["report.json", "metrics.jsonl", "command.txt"]
        files += ["masks.npz"] if grid[study, name].keep_masks else []
        for file in files:
            if (report.parent / file).exists():
                shutil.copy(report.parent / file, target / file)
        if grid[study, name].keep_scores and not (target / "dense_scores.json").exists():
            _write_scores(report.parent, target / "dense_scores.json")
        copied += 1
    print(f"grid.py: collected {copied} runs into {RESULTS}")


def _write_scores(folder: Path, path: Path) -> None:
    """``dense_scores.json`` of the run in ``folder`` from its newest checkpoint (a note,
    not an error, when it has none: the first pass kept no checkpoints)."""
    try:
        _, params, masks = export.restore_newest(folder)
    except FileNotFoundError as e:
        print(f"grid.py: no dense_scores.json for {folder.name}: {e}")
        return
    path.write_text(json.dumps(score_percentiles(params, masks), indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print every run and its launch.py flags")
    run_parser = sub.add_parser("run", help="train the runs of some studies")
    run_parser.add_argument("--studies", required=True, help="comma-separated study names")
    run_parser.add_argument("--workdir", type=Path, required=True)
    run_parser.add_argument("--workers", type=int, default=1)
    run_parser.add_argument("--deadline", type=float, default=math.inf,
                            help="seconds after which unfinished runs are stopped")
    run_parser.add_argument("--match", default="",
                            help="only runs whose name, or study/name, matches this")
    collect_parser = sub.add_parser("collect", help="copy finished runs to experiments/results")
    collect_parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "list":
        for study, runs in studies().items():
            for r in runs:
                print(study, r.name, " ".join(r.args()))
    elif args.command == "run":
        run(args.studies, args.workdir, args.workers, args.deadline, args.match)
    else:
        collect(args.workdir)


if __name__ == "__main__":
    main()
