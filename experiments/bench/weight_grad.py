"""The kept blocks' weight gradient of a frozen block-sparse recurrent kernel alone, both
ways (`bsrnn.kernels.sparse_training.kept_weight_grad`): "blocks" (a batched product of the
gathered rows and columns) against "dense" (one hᵀ·dy product, then its kept blocks). The
figures behind `FrozenBlocks.weight_grad`'s "auto" rule on CPUs.

GRU gates, 16x16 blocks, N rows of h (T·B in the hoisted VJP), for every H and kept
fraction given; median ms of ``--repeats`` interleaved jitted calls (`median_times`).

    python experiments/bench/weight_grad.py --hidden=256,512,1024 --kept=0.1,0.25,0.5
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bsrnn.kernels import sparse_training

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from block_diagonal import median_times  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="256,512,1024")
    parser.add_argument("--kept", default="0.1,0.25,0.5", help="fractions of blocks kept")
    parser.add_argument("--rows", type=int, default=256, help="N rows of h and dy")
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    block = (args.block, args.block)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"python {platform.python_version()}; N = {args.rows}, {block} blocks, GRU gates; "
          f"ms, median of {args.repeats}\n\n| H | kept | blocks | dense | blocks / dense |\n"
          "|---|---|---|---|---|", flush=True)
    rng = np.random.default_rng(0)
    for hidden in (int(h) for h in args.hidden.split(",")):
        nb = -(-hidden // args.block)
        for kept in (float(k) for k in args.kept.split(",")):
            masks = [np.kron(rng.random((nb, nb)) < kept, np.ones(block, bool))[:hidden, :hidden]
                     for _ in range(3)]
            h = jnp.asarray(rng.normal(size=(args.rows, hidden)), jnp.float32)
            thunks = {}
            for mode in ("blocks", "dense"):
                frozen = sparse_training.FrozenBlocks.from_masks(masks, ("r", "z", "n"), block,
                                                                 weight_grad=mode)
                dy = jnp.asarray(rng.normal(size=(args.rows, 3 * frozen.padded)), jnp.float32)
                fn = jax.jit(functools.partial(sparse_training.kept_weight_grad, frozen))
                thunks[mode] = functools.partial(fn, h, dy)
            t = median_times(thunks, args.repeats)
            print(f"| {hidden} | {kept:.2f} | {t['blocks'] * 1e3:.2f} | {t['dense'] * 1e3:.2f} "
                  f"| {t['blocks'] / t['dense']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
