"""Break-even of the block-sparse product: speedup over dense against sparsity, per block size.

y = x @ K with K the RNN 1760 matrix (1760x1760), x of N rows, fp16, on the GPU. For each
block shape and each block sparsity, a random block mask keeps exactly that fraction of
blocks; ``bsc_matmul_pallas`` (the default launch) is timed against ``jnp.dot`` on the same
masked matrix (cuBLAS), both by GPU kernel time from one profiler trace
(``matmul.profile_jax``: R chained ops per jitted call, launch gaps not counted). Each
output is checked against an fp32 product first. Writes a JSON of the points; ``--plot``
turns that JSON into the chart (a PNG) on any machine.

    PYTHONPATH=. python3 experiments/bench/break_even.py --json=$OUT/break_even.json   # GPU
    python experiments/bench/break_even.py --plot=experiments/bench/break_even.json \\
        --png=experiments/bench/break_even.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from matmul import block_mask, chained, profile_jax, rel_err  # noqa: E402

from bsrnn.kernels import bsc_matmul_pallas  # noqa: E402
from bsrnn.kernels.bsc import from_dense  # noqa: E402

BLOCKS = ((1, 1), (4, 4), (8, 8), (16, 16), (32, 32))
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97)


def measure(ns: list[int], reps: int, calls: int, budget_s: float = float("inf"),
            on_point=None) -> list[dict]:
    """Speedup of the Pallas product over ``jnp.dot`` for every (N, block, sparsity), until
    ``budget_s`` seconds have passed; ``on_point(points)`` after each point."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((1760, 1760)).astype(np.float32)
    points = []
    for n in ns:
        xs = list(jax.random.normal(jax.random.key(n), (reps, n, 1760)).astype(jnp.float16))
        for block in BLOCKS:
            for sparsity in SPARSITIES:
                if time.perf_counter() - t0 > budget_s:
                    print("time budget spent: stopping", flush=True)
                    return points
                mask = block_mask(rng, kernel.shape, block, sparsity)
                masked = np.where(mask, kernel, 0.0)
                k16 = jnp.asarray(masked, jnp.float16)
                w = from_dense(masked, mask, block, dtype=jnp.float16)
                label = f"{n}_{block[0]}x{block[1]}_{round(sparsity * 100)}"
                jobs = {
                    f"dense_{label}": (chained(jnp.dot, reps, f"dense_{label}"), (xs, k16), reps),
                    f"sparse_{label}": (
                        chained(bsc_matmul_pallas, reps, f"sparse_{label}"), (xs, w), reps,
                    ),
                }
                ref = jnp.dot(xs[0].astype(jnp.float32), k16.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)
                err = rel_err(jobs[f"sparse_{label}"][0](xs, w)[0], ref)
                for fn, args, _ in jobs.values():
                    jax.block_until_ready(fn(*args))
                times = profile_jax(jobs, calls)
                dense_us, sparse_us = times[f"dense_{label}"][0], times[f"sparse_{label}"][0]
                point = dict(n=n, block=f"{block[0]}x{block[1]}", sparsity=sparsity,
                             dense_us=dense_us, sparse_us=sparse_us,
                             speedup=dense_us / sparse_us, rel_err=err)
                print(json.dumps(point), flush=True)
                points.append(point)
                if on_point is not None:
                    on_point(points)
    return points


def plot(points: list[dict], header: str, png: str) -> None:
    """One panel per N; one line per block shape; speedup (log) against sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({p["n"] for p in points})
    fig, axes = plt.subplots(1, len(ns), figsize=(5.5 * len(ns), 4.2), squeeze=False)
    for ax, n in zip(axes[0], ns, strict=True):
        for block in dict.fromkeys(p["block"] for p in points):
            line = [p for p in points if p["n"] == n and p["block"] == block]
            ax.plot([100 * p["sparsity"] for p in line], [p["speedup"] for p in line],
                    marker="o", label=block)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("block sparsity (%)")
        ax.set_ylabel("speedup over dense jnp.dot (cuBLAS)")
        ax.set_title(f"RNN 1760, fp16, N = {n}")
        ax.legend(title="block")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(header, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="1,8")
    parser.add_argument("--reps", type=int, default=16)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--json", default="break_even.json")
    parser.add_argument("--plot", default="", help="a JSON written by this script: plot it")
    parser.add_argument("--png", default="break_even.png")
    parser.add_argument("--budget_s", type=float, default=200.0,
                        help="stop measuring after this many seconds (JSON kept)")
    args = parser.parse_args()
    if args.plot:
        with open(args.plot) as f:
            saved = json.load(f)
        plot(saved["points"], saved["header"], args.png)
        return
    device = jax.devices()[0]
    header = f"{device.device_kind}, jax {jax.__version__}, GPU kernel time (profiler)"

    def save(points):
        with open(args.json, "w") as f:
            json.dump({"header": header, "points": points}, f, indent=1)

    points = measure([int(n) for n in args.ns.split(",")], args.reps, args.calls,
                     args.budget_s, save)
    save(points)
    print("| N | block | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |")
    print("|---|---|" + "---|" * len(SPARSITIES))
    for n in dict.fromkeys(p["n"] for p in points):
        for block in dict.fromkeys(p["block"] for p in points):
            by = {p["sparsity"]: p for p in points if p["n"] == n and p["block"] == block}
            if by:
                print(f"| {n} | {block} | " + " | ".join(
                    f"{by[s]['speedup']:.2f}x" if s in by else "" for s in SPARSITIES) + " |")


if __name__ == "__main__":
    main()
