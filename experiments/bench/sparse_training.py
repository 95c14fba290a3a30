"""Training steps after the masks freeze: a block-pruned GRU layer run on its kept blocks
(``bsrnn.kernels.sparse_training``) against the masked dense layer, same params and masks.

Baseline: ``bsrnn.cells.RecurrentLayer("gru", H)`` with the masks (every step one dense
(B, H) @ (H, 3H) product of the masked kernel). Ours: the same layer with
``frozen_recurrent=sparse_training.freeze(masks, block)``: each step's recurrent product on the
kept blocks only (``bsc_matmul_xla``), with the custom VJP (dh through W_hᵀ stored
block-sparse, the weight gradient for the kept blocks only). The recurrent masks prune
``--sparsity`` of each gate's blocks at random; the input kernels stay dense in both.

Timed interleaved in one process (median of ``--repeats`` after two warm-up calls), each one
jitted call: ``layer`` (forward and backward of the layer, T steps, D = H) and ``train
step`` (Adam and ``keep_masked`` on a mean squared error, what every step after the freeze
costs). The largest output difference checks that both compute the same numbers.

    python experiments/bench/sparse_training.py --hidden=512 --steps=16 --repeats=5   # CPU
    python experiments/bench/sparse_training.py --json=st_h200.json --markdown=st_h200.md

GPU defaults are issue 14's target: GRU 2560, 90% of 16x16 blocks pruned, batch 32
(target: train step >= 1.5x faster than masked dense).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bsrnn import blocks, cells
from bsrnn.kernels import sparse_training

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from block_diagonal import layer_grad, median_times, train_step  # noqa: E402


def random_block_masks(masks, sparsity: float, block: tuple[int, int], seed: int = 0):
    """``masks`` with every recurrent mask replaced by one that prunes ``sparsity`` of its
    blocks at random (exactly round(sparsity · blocks))."""
    rng = np.random.default_rng(seed)

    def replace(path, mask):
        if "recurrent" not in jax.tree_util.keystr(path):
            return mask
        grid = blocks.grid_shape(mask.shape, block)
        keep = np.ones(grid[0] * grid[1], bool)
        keep[rng.permutation(keep.size)[: round(sparsity * keep.size)]] = False
        return blocks.expand_blocks(jnp.asarray(keep.reshape(grid)), block, mask.shape)

    return jax.tree_util.tree_map_with_path(replace, masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="gru")
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--block", type=int, default=16, help="square blocks of this side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64, help="sequence length T")
    parser.add_argument("--unroll", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    block = (args.block, args.block)
    kx, kc, kt = jax.random.split(jax.random.key(0), 3)
    shape = (args.batch, args.steps, args.hidden)
    x, cotangent, target = (jax.random.normal(k, shape) for k in (kx, kc, kt))
    dense = cells.RecurrentLayer(args.cell, args.hidden, unroll=args.unroll)
    variables = jax.jit(dense.init)(jax.random.key(1), x)
    variables = {"params": variables["params"],
                 "masks": random_block_masks(variables["masks"], args.sparsity, block)}
    ours = dense.clone(frozen_recurrent={"": sparse_training.freeze(
        {"layer": variables["masks"]}, block)["layer"]})
    y_dense, _ = jax.jit(dense.apply)(variables, x)
    y_ours, _ = jax.jit(ours.apply)(variables, x)
    max_diff = float(jnp.max(jnp.abs(y_dense - y_ours)))
    times = median_times({
        "dense layer": layer_grad(dense, variables, x, cotangent),
        "ours layer": layer_grad(ours, variables, x, cotangent),
        "dense step": train_step(dense, variables, x, target),
        "ours step": train_step(ours, variables, x, target),
    }, args.repeats)

    device = jax.devices()[0]
    lines = [
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, flax "
        f"{flax.__version__}, optax {optax.__version__}, python {platform.python_version()}",
        f"{args.cell} H={args.hidden} B={args.batch} T={args.steps} D={args.hidden} recurrent "
        f"sparsity {args.sparsity} of {block} blocks, unroll={args.unroll}, "
        f"repeats={args.repeats}, float32; max abs diff y {max_diff:.1e}",
        "", "| timed | masked dense (ms) | kept blocks (ms) | ratio dense / ours |",
        "|---|---|---|---|",
    ]
    for kind in ("layer", "step"):
        d, o = times[f"dense {kind}"], times[f"ours {kind}"]
        lines.append(f"| {kind} | {d * 1e3:.2f} | {o * 1e3:.2f} | {d / o:.2f} |")
    print("\n".join(lines), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "max_abs_diff": max_diff,
                       **{k.replace(" ", "_") + "_s": v for k, v in times.items()}}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
