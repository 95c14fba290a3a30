"""Where the portable block-sparse product spends its time on the CPU, and which product
form ("dot" or "fma", `bsrnn.kernels.bsc_matmul_xla`) wins at which block shape and N.

Two parts, both on a 1760x1760 fp32 kernel with 90% of its blocks pruned at random and
fresh random inputs, timed with `matmul.py`'s helpers (8 ops chained in one jitted call,
methods' calls interleaved, median wall time per op), ratios against `jnp.dot` on the
masked dense kernel from the same run:

1. ``--parts``: the three steps of the XLA path apart (gather, per-block product in both
   forms, segment sum) at 16x16 blocks and N = 8.
2. ``--sweep``: dense, "dot" and "fma" for blocks 4x4, 12x2, 8x8, 16x16, 32x32 and N in
   {1, 2, 4, 8, 32, 128}: the measurements behind `bsrnn.kernels.xla.auto_product`.

    PYTHONPATH=. python experiments/bench/xla_product_cpu.py --parts --sweep
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from matmul import block_mask, chained, time_interleaved  # noqa: E402

from bsrnn.kernels import bsc_matmul_xla  # noqa: E402
from bsrnn.kernels.bsc import block_col_ids, from_dense  # noqa: E402

SIZE, SPARSITY, REPS = 1760, 0.9, 8


def case(rng: np.random.Generator, block: tuple[int, int], n: int):
    """A masked kernel, its BSC form and REPS random (n, SIZE) inputs."""
    mask = block_mask(rng, (SIZE, SIZE), block, SPARSITY)
    k = rng.standard_normal((SIZE, SIZE)).astype(np.float32) * mask
    xs = [jnp.asarray(rng.standard_normal((n, SIZE)).astype(np.float32)) for _ in range(REPS)]
    return jnp.asarray(k), from_dense(k, mask, block), xs


def parts(rng: np.random.Generator, calls: int) -> None:
    """Times the XLA path's steps apart at 16x16 blocks, N = 8."""
    k, w, xs = case(rng, (16, 16), 8)
    (bh, _), (nbr, nbc) = w.block_shape, w.grid_shape
    rows, values, cols = jnp.asarray(w.row_indices), jnp.asarray(w.values), block_col_ids(w)

    def gather(x):  # (nnzb, N, bh)
        return jnp.take(x.reshape(-1, nbr, bh).transpose(1, 0, 2), rows, axis=0)

    def dot(xg):
        return jnp.einsum("knb,kbc->knc", xg, values)

    def fma(xg):
        p = xg[:, :, 0:1] * values[:, None, 0, :]
        for b in range(1, bh):
            p = p + xg[:, :, b:b + 1] * values[:, None, b, :]
        return p

    def segsum(p):
        return jax.ops.segment_sum(p, cols, num_segments=nbc, indices_are_sorted=True)

    gathered = [gather(x) for x in xs]
    products = [dot(g) for g in gathered]
    jobs = {"dense": (jax.jit(chained(lambda x: x @ k, REPS)), (xs,), REPS),
            "whole path (auto)": (jax.jit(chained(lambda x: bsc_matmul_xla(x, w), REPS)),
                                  (xs,), REPS),
            "gather": (jax.jit(chained(gather, REPS)), (xs,), REPS),
            "product, dot": (jax.jit(chained(dot, REPS)), (gathered,), REPS),
            "product, fma": (jax.jit(chained(fma, REPS)), (gathered,), REPS),
            "segment sum": (jax.jit(chained(segsum, REPS)), (products,), REPS)}
    print(f"parts, 16x16 blocks, N = 8, {w.nnzb} stored blocks: µs per op")
    for name, us in time_interleaved(jobs, calls).items():
        print(f"  {name:18s} {us:8.1f}")


def sweep(rng: np.random.Generator, calls: int) -> None:
    """Dense against both product forms over block shapes and N (ratio = dense / method)."""
    print("sweep: µs per op (ratio to dense)")
    for block in ((4, 4), (12, 2), (8, 8), (16, 16), (32, 32)):
        for n in (1, 2, 4, 8, 32, 128):
            k, w, xs = case(rng, block, n)
            ops = {"dense": lambda x, k=k: x @ k,
                   "dot": lambda x, w=w: bsc_matmul_xla(x, w, product="dot"),
                   "fma": lambda x, w=w: bsc_matmul_xla(x, w, product="fma")}
            jobs = {m: (jax.jit(chained(op, REPS)), (xs,), REPS) for m, op in ops.items()}
            t = time_interleaved(jobs, calls)
            cells = "  ".join(f"{m} {us:7.1f} ({t['dense'] / us:4.2f}x)" for m, us in t.items())
            print(f"  {block[0]}x{block[1]:<3d} N={n:<4d} {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    if args.parts:
        parts(rng, args.calls)
    if args.sweep:
        sweep(rng, args.calls)


if __name__ == "__main__":
    main()
