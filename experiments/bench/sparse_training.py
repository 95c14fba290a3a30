"""Training steps after the masks freeze: a block-pruned layer run on its kept blocks
(``bsrnn.kernels.sparse_training``) against the masked dense layer, same params and masks.

Baselines, both ``bsrnn.cells.RecurrentLayer(cell, H)`` with the masks (every step one dense
(B, H) @ (H, gates·H) product of the masked kernel): "masked dense, scan autodiff"
(``weight_grad="scan"``, plain JAX autodiff of the scan, whose backward adds the recurrent
weight gradient into an (H, gates·H) accumulator at every step) and "masked dense, hoisted
VJP" (``weight_grad="hoisted"``, the default: the weight gradient in one product after the
backward scan). Ours: the same layer with ``frozen_recurrent=sparse_training.freeze(masks,
block, impl)`` and the hoisted VJP: each step's products h @ W_h and dh = dp @ W_hᵀ on the
kept blocks only (``impl``: "xla" is ``bsc_matmul_xla``, "pallas" the Triton kernel of
``bsrnn.kernels.bsc_matmul``, "auto" the latter on GPUs), the weight gradient of the kept
blocks in one product over all steps. ``--old_sparse`` adds the frozen layer with the scan
autodiff (its custom per-step VJP), the version before the hoisted VJP. Each frozen row names
its weight gradient (``FrozenBlocks.weight_grad``, "dW blocks": one batched product over
gathered rows and columns of the kept blocks; "dW dense": one dense product hᵀ @ dy, then its
kept blocks): without ``--weight_grads`` one row per impl with the default ("auto"), with it
one row per impl and mode. The recurrent masks
prune ``--sparsity`` of each gate's blocks at random; the input kernels stay dense in all.

Timed interleaved in one process (median of ``--repeats`` after two warm-up calls), each one
jitted call: ``layer`` (forward and backward of the layer, T steps, D = H) and ``train
step`` (Adam and ``keep_masked`` on a mean squared error, what every step after the freeze
costs); ``--timed`` picks them. The largest differences of the outputs and of the inputs'
gradients and of the recurrent kernels' gradients on kept entries (against the masked dense
layer's) check that all compute the same numbers, forward and backward; a variant that
fails to compile or run (a GPU kernel) is reported and left out.

    python experiments/bench/sparse_training.py --hidden=512 --steps=16 --repeats=5   # CPU
    python experiments/bench/sparse_training.py --unroll=8 --impls=xla,pallas \
        --json=st_h200.json --markdown=st_h200.md                                   # H200
    python experiments/bench/sparse_training.py --unroll=8 --impls=pallas \
        --weight_grads=blocks,dense --json=st2.json --markdown=st2.md               # H200

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
    parser.add_argument("--impls", default="auto",
                        help="the frozen layer's product impls to time (auto, xla, pallas)")
    parser.add_argument("--weight_grads", default="",
                        help="also time the frozen layer with these weight_grad modes "
                             "(blocks, dense; comma-separated)")
    parser.add_argument("--old_sparse", action="store_true",
                        help="also time the frozen layer with the scan autodiff")
    parser.add_argument("--timed", default="layer,step", help="layer, step or both")
    parser.add_argument("--kernels", action="store_true",
                        help="print each variant's GPU kernels per step (profiler trace)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    if not args.timed or set(args.timed.split(",")) - {"layer", "step"}:
        parser.error(f"--timed={args.timed!r}: give layer, step or layer,step")
    weight_grads = [m for m in args.weight_grads.split(",") if m]
    if set(weight_grads) - set(sparse_training.WEIGHT_GRADS):
        parser.error(f"--weight_grads={args.weight_grads!r}: choose from "
                     f"{sparse_training.WEIGHT_GRADS}")

    block = (args.block, args.block)
    kx, kc, kt = jax.random.split(jax.random.key(0), 3)
    shape = (args.batch, args.steps, args.hidden)
    x, cotangent, target = (jax.random.normal(k, shape) for k in (kx, kc, kt))
    dense = cells.RecurrentLayer(args.cell, args.hidden, unroll=args.unroll)
    variables = jax.jit(dense.init)(jax.random.key(1), x)
    variables = {"params": variables["params"],
                 "masks": random_block_masks(variables["masks"], args.sparsity, block)}
    layers = {"masked dense, scan autodiff": dense.clone(weight_grad="scan"),
              "masked dense, hoisted VJP": dense.clone(weight_grad="hoisted")}
    for impl in args.impls.split(","):
        for mode in ["auto", *weight_grads]:  # a mode equal to what auto resolves to: once
            frozen = {"": sparse_training.freeze({"layer": variables["masks"]}, block, impl,
                                                 mode)["layer"]}
            name = (f"kept blocks ({frozen[''].product_impl()}, "
                    f"dW {frozen[''].weight_grad_mode()})")
            layers[f"{name}, hoisted VJP"] = dense.clone(frozen_recurrent=frozen)
            if args.old_sparse and mode == "auto":
                layers[f"{name}, scan autodiff"] = dense.clone(frozen_recurrent=frozen,
                                                              weight_grad="scan")
    kinds = args.timed.split(",")
    y_ref, _ = jax.jit(dense.apply)(variables, x)
    thunks, checks, ref = {}, {}, None

    def kept_recurrent(grads):  # the recurrent kernels' gradients on kept entries
        return [jnp.where(m["kernel"], grads[name]["kernel"], 0) for name, m in
                variables["masks"].items() if name.startswith("recurrent_")]

    for name, layer in list(layers.items()):
        grads = layer_grad(layer, variables, x, cotangent)
        try:  # compiles the forward and backward products of this variant here
            y = jax.jit(layer.apply)(variables, x)[0]
            d_params, dx = grads()
        except Exception as error:  # e.g. a GPU kernel that cannot run: the others still do
            print(f"{name}: failed, left out: {type(error).__name__}: {error}", flush=True)
            del layers[name]
            continue
        dw = kept_recurrent(d_params)
        ref = (dx, dw) if ref is None else ref
        checks[name] = (float(jnp.max(jnp.abs(y - y_ref))), float(jnp.max(jnp.abs(dx - ref[0]))),
                        max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(dw, ref[1],
                                                                          strict=True)))
        del d_params, dx, dw
        if "layer" in kinds:
            thunks[f"{name} layer"] = grads
        if "step" in kinds:
            thunks[f"{name} step"] = train_step(layer, variables, x, target)
    times = median_times(thunks, args.repeats)
    if args.kernels:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from matmul import print_kernels  # noqa: PLC0415  (the benches' one trace parser)

        for key, thunk in thunks.items():
            if key.endswith("layer"):
                print_kernels(key, thunk, args.steps)

    device = jax.devices()[0]
    base = list(layers)[:2]
    header = {"layer": "layer fwd+bwd (ms) | ratio vs dense scan / vs dense hoisted",
              "step": "train step (ms) | ratio vs dense scan / vs dense hoisted"}
    lines = [
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, flax "
        f"{flax.__version__}, optax {optax.__version__}, python {platform.python_version()}",
        f"{args.cell} H={args.hidden} B={args.batch} T={args.steps} D={args.hidden} recurrent "
        f"sparsity {args.sparsity} of {block} blocks, unroll={args.unroll}, "
        f"repeats={args.repeats}, float32; ms are medians; ratio = that dense variant's "
        "time / this row's; max abs diff of y, of dL/dx and of dL/dW_h (kept entries) "
        "against masked dense (scan)",
        "", f"| variant | {' | '.join(header[k] for k in kinds)} | max abs diff y / dx / dW_h |",
        "|---|" + "---|---|" * len(kinds) + "---|",
    ]
    rows = []
    for name in layers:
        row = {"variant": name, "max_abs_diff_y": checks[name][0],
               "max_abs_diff_dx": checks[name][1], "max_abs_diff_dw": checks[name][2]}
        cols = []
        for kind in kinds:
            t = times[f"{name} {kind}"]
            row[f"{kind}_s"] = t
            row[f"{kind}_vs_dense_scan"] = times[f"{base[0]} {kind}"] / t
            row[f"{kind}_vs_dense_hoisted"] = times[f"{base[1]} {kind}"] / t
            cols += [f"{t * 1e3:.2f}", f"{row[f'{kind}_vs_dense_scan']:.2f} / "
                     f"{row[f'{kind}_vs_dense_hoisted']:.2f}"]
        rows.append(row)
        lines.append(f"| {name} | {' | '.join(cols)} | {checks[name][0]:.1e} / "
                     f"{checks[name][1]:.1e} / {checks[name][2]:.1e} |")
    print("\n".join(lines), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": lines[:2], "args": vars(args), "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
