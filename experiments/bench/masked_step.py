"""Overhead of a masked, block-pruning GRU training step against an unmasked Flax GRU.

Baseline: ``flax.linen.RNN(flax.linen.GRUCell(H))`` trained with Adam (no masks).
Ours: ``bsrnn.cells.RNN("gru", H)`` (masks from the ``masks`` collection) trained with
``chain(adam, block_prune(4x4, cubic schedule))`` plus ``updated_masks``: the full pruning step,
with masks recomputed every 100 steps (P2's freq; the step timed is mostly one that skips
the recompute through ``lax.cond``) and at every step (freq 1, the worst case).
Also: ours with plain Adam (masks applied, no pruning transform), to split the two costs.

Same sizes and loss for all (scan over T = 128 steps, hidden 512, batch 32, input 512, mean
squared error on the outputs); each step is one jitted call; the variants are timed
interleaved in one process, median of repeats after warm-up; ratios are against the baseline.

    python experiments/bench/masked_step.py                 # CPU
    python experiments/bench/masked_step.py --unroll=8      # GPU (scan unroll as in SPEC §2.6)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bsrnn import cells, pruning
from bsrnn.schedules import CubicSparsity


def make_baseline(x, target, unroll):
    model = nn.RNN(nn.GRUCell(x.shape[-1]), unroll=unroll)
    params = model.init(jax.random.key(1), x)["params"]
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((model.apply({"params": p}, x) - target) ** 2)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = (params, tx.init(params))
    return lambda s: step(*s)[:2], state


def make_ours(x, target, unroll, prune_freq):
    """``prune_freq=None``: no pruning transform, only ``keep_masked``."""
    model = cells.RNN("gru", x.shape[-1], unroll=unroll)
    variables = model.init(jax.random.key(1), x)
    if prune_freq is None:
        tx = optax.chain(optax.adam(1e-3), pruning.keep_masked())
    else:
        schedule = CubicSparsity(0.9, begin_step=0, end_step=10_000, freq=prune_freq)
        tx = optax.chain(optax.adam(1e-3), pruning.block_prune(schedule, (4, 4)))

    @jax.jit
    def step(params, masks, opt_state):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean(
                (model.apply({"params": p, "masks": masks}, x) - target) ** 2
            )
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
        params = optax.apply_updates(params, updates)
        return params, pruning.updated_masks(opt_state, masks), opt_state, loss

    params = variables["params"]
    state = (params, variables["masks"], tx.init(params))
    return lambda s: step(*s)[:3], state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--unroll", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    kx, kt = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (args.batch, args.steps, args.hidden))
    target = jax.random.normal(kt, (args.batch, args.steps, args.hidden))
    variants = {
        "flax GRUCell, adam (baseline)": make_baseline(x, target, args.unroll),
        "bsrnn masked GRU, adam + keep_masked": make_ours(x, target, args.unroll, None),
        "bsrnn, adam + block_prune 4x4, freq 100": make_ours(x, target, args.unroll, 100),
        "bsrnn, adam + block_prune 4x4, freq 1": make_ours(x, target, args.unroll, 1),
    }
    states = {name: state for name, (_, state) in variants.items()}
    times = {name: [] for name in variants}
    for name, (fn, _) in variants.items():  # compile and warm up
        for _ in range(2):
            states[name] = fn(states[name])
        jax.block_until_ready(states[name])
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for name, (fn, _) in variants.items():
            start = time.perf_counter()
            states[name] = jax.block_until_ready(fn(states[name]))
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["flax GRUCell, adam (baseline)"])
    device = jax.devices()[0]
    header = (
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"flax {flax.__version__}, optax {optax.__version__}, python {platform.python_version()}"
        f"\nT={args.steps} H={args.hidden} B={args.batch} unroll={args.unroll} "
        f"repeats={args.repeats}"
    )
    print(header)
    print("| variant | median step (ms) | ratio to baseline |\n|---|---|---|")
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        rows.append({"variant": name, "median_s": median, "ratio": median / base})
        print(f"| {name} | {median * 1e3:.1f} | {median / base:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
