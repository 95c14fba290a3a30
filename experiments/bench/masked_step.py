"""Cost of masks and of the pruning transform in a training step.

``--model lm`` and ``--model ds2`` (the default: both) time the trainer's own step
(``bsrnn.train.train_step``, jitted with the state donated, as ``train_and_evaluate`` does)
on synthetic batches of two experiment shapes:

* ``lm``: the PTB word LM of ``experiments/configs/ptb_word.py`` with a GRU, Adam, vocab
  10k, every input, recurrent and output kernel prunable (the 10k-wide output layer is most
  of the blocks: 650 x 10k at 4x4 is 406k blocks). Default 2 x 650, batch 20 x 35; the CPU
  shape of issue 14 is ``--features=128 --batch=8 --seq_len=16``.
* ``ds2``: the AN4 DS2 GRU of ``experiments/configs/an4_ds2.py:gru`` (3 GRU layers of 256,
  row convolution, batch 16) on 256 frames (the median AN4 utterance pads to 256).

Baseline: the masked model with ``keep_masked`` (method ``dense``: masks applied, no pruning).
Against it: method ``bp`` (``block_prune`` 4x4, cubic schedule from step 0) with masks
recomputed every 100 and every 10 steps, the trainer telling each step whether it is an
update step (``update_masks``, no conditional in the program), and the same with the
decision left to the device (one ``lax.cond``, a user's own loop). Every variant runs chunks
of ``--period`` steps (a multiple of both frequencies, so each chunk holds its share of
update steps) and is timed per chunk, the variants interleaved in one process; reported:
median ms per step and the ratio to the baseline.

``--model scan`` is the first round's comparison: a masked GRU scan (T 128, H 512, batch
32, MSE) against ``flax.linen.RNN(GRUCell)``, one step timed at a time.

    PYTHONPATH=. python experiments/bench/masked_step.py --features=128 --batch=8 \
        --seq_len=16 --json=/tmp/masked_step_cpu.json                         # CPU
    python experiments/bench/masked_step.py --json=$OUT/masked_step_h200.json   # GPU
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bsrnn import cells, configs, methods, pruning, train
from bsrnn.models import ds2, lm
from bsrnn.schedules import CubicSparsity

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AN4_CLASSES = 30  # blank, 26 letters, space, apostrophe and one more: AN4's CTC vocabulary


def load_config(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def lm_setup(args):
    config = load_config("ptb_word", f"cell=gru,features={args.features}")
    config.batch_size, config.seq_len = args.batch, args.seq_len
    config.optimizer = configs.optimizer("adam", learning_rate=1e-3, schedule="constant",
                                         grad_clip=config.optimizer.grad_clip)
    model = lm.Model(vocab_size=args.vocab, **config.model)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq_len + 1))
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
             "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}
    return config, model, lm, batch


def ds2_setup(args):
    config = load_config("an4_ds2", "model=gru")
    rng = np.random.default_rng(0)
    b, t, num_labels = config.batch_size, args.frames, 128
    lengths = rng.integers(t // 2, t + 1, b).astype(np.int32)
    lengths[0] = t
    frames = rng.standard_normal((b, t, 13)).astype(np.float32)
    frames *= (np.arange(t)[None, :, None] < lengths[:, None, None])
    label_lengths = rng.integers(10, 40, b)
    labels = rng.integers(1, AN4_CLASSES, (b, num_labels)).astype(np.int32)
    paddings = (np.arange(num_labels)[None, :] >= label_lengths[:, None]).astype(np.float32)
    batch = {"inputs": jnp.asarray(frames), "lengths": jnp.asarray(lengths),
             "labels": jnp.asarray(labels * (paddings == 0)),
             "label_paddings": jnp.asarray(paddings)}
    model = ds2.Model(num_classes=AN4_CLASSES, **config.model)
    return config, model, ds2, batch


def trainer_variant(config, model, task, batch, method, freq, host_decides=True):
    """The trainer's step for ``method`` (masks recomputed every ``freq`` steps from 0).

    ``host_decides``: pass ``update_masks`` from ``methods.mask_update_steps`` as the
    trainer does; else leave it to the device (one ``lax.cond``), as a user's own loop does.
    """
    config = config.copy_and_resolve_references()
    config.method = method
    config.num_steps = 1_000_000
    config.prune.update(layer_types=("input", "recurrent", "fc"), begin_fraction=0.0,
                        ramp_fraction=0.0, end_fraction=1.0, freq=freq)
    state, tx, _ = train.initial_state(config, model, task, batch)
    state = jax.tree_util.tree_map(jnp.copy, state)  # own buffers, as after sharding.put
    step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx, task=task),
                      donate_argnums=0, static_argnames="update_masks")
    due = methods.mask_update_steps(config)
    done = [0]  # the host's step counter, as in the trainer's loop

    def run(state, steps):
        for step in range(done[0], done[0] + steps):
            state, _ = step_fn(state, batch,
                               update_masks=bool(due[step]) if host_decides else None)
        done[0] += steps
        return state

    return run, state


def time_chunks(variants, period, repeats):
    """Median seconds per step of each variant, chunks of ``period`` steps interleaved."""
    states = {name: state for name, (_, state) in variants.items()}
    for name, (run, _) in variants.items():  # compile, and run the first update steps
        states[name] = jax.block_until_ready(run(states[name], period))
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (run, _) in variants.items():
            start = time.perf_counter()
            states[name] = jax.block_until_ready(run(states[name], period))
            times[name].append((time.perf_counter() - start) / period)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_trainer(args, setup):
    config, model, task, batch = setup(args)
    variants = {"keep_masked (baseline)": trainer_variant(config, model, task, batch,
                                                          "dense", 100)}
    for freq in (100, 10):
        variants[f"block_prune 4x4, freq {freq}"] = trainer_variant(
            config, model, task, batch, "bp", freq)
    for freq in (100, 10):
        variants[f"block_prune 4x4, freq {freq}, decided on the device"] = trainer_variant(
            config, model, task, batch, "bp", freq, host_decides=False)
    return time_chunks(variants, args.period, args.repeats), "keep_masked (baseline)"


def scan_baseline(x, target, unroll):
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

    def run(state, steps):
        for _ in range(steps):
            state = step(*state)[:2]
        return state

    return run, (params, tx.init(params))


def scan_ours(x, target, unroll, prune_freq):
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

    def run(state, steps):
        for _ in range(steps):
            state = step(*state)[:3]
        return state

    params = variables["params"]
    return run, (params, variables["masks"], tx.init(params))


def bench_scan(args):
    kx, kt = jax.random.split(jax.random.key(0))
    shape = (32, 128, 512)
    x, target = jax.random.normal(kx, shape), jax.random.normal(kt, shape)
    base = "flax GRUCell, adam (baseline)"
    variants = {
        base: scan_baseline(x, target, args.unroll),
        "bsrnn masked GRU, adam + keep_masked": scan_ours(x, target, args.unroll, None),
        "bsrnn, adam + block_prune 4x4, freq 100": scan_ours(x, target, args.unroll, 100),
        "bsrnn, adam + block_prune 4x4, freq 1": scan_ours(x, target, args.unroll, 1),
    }
    return time_chunks(variants, 1, args.repeats), base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lm,ds2", help="comma-separated: lm, ds2, scan")
    parser.add_argument("--features", type=int, default=650, help="lm: hidden size (and E)")
    parser.add_argument("--vocab", type=int, default=10_000, help="lm: vocabulary size")
    parser.add_argument("--batch", type=int, default=20, help="lm: rows")
    parser.add_argument("--seq_len", type=int, default=35, help="lm: window length")
    parser.add_argument("--frames", type=int, default=256, help="ds2: padded frames")
    parser.add_argument("--unroll", type=int, default=1, help="scan: unroll")
    parser.add_argument("--period", type=int, default=100, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    device = jax.devices()[0]
    header = (
        f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"flax {flax.__version__}, optax {optax.__version__}, python {platform.python_version()}"
        f", period={args.period} repeats={args.repeats}"
    )
    print(header)
    results = {"header": header, "args": vars(args), "tables": {}}
    for name in args.model.split(","):
        if name == "lm":
            medians, base = bench_trainer(args, lm_setup)
            title = (f"lm: GRU {args.features} x 2, vocab {args.vocab}, batch {args.batch} x "
                     f"{args.seq_len}")
        elif name == "ds2":
            medians, base = bench_trainer(args, ds2_setup)
            title = f"ds2: AN4 DS2 GRU 3 x 256, batch 16 x {args.frames} frames"
        elif name == "scan":
            medians, base = bench_scan(args)
            title = f"scan: T 128, H 512, batch 32, unroll {args.unroll}"
        else:
            raise ValueError(f"--model: unknown model {name!r}; choose lm, ds2 or scan.")
        print(f"\n{title}\n| variant | median step (ms) | ratio to baseline |\n|---|---|---|")
        rows = []
        for variant, median in medians.items():
            ratio = median / medians[base]
            rows.append({"variant": variant, "median_s": median, "ratio": ratio})
            print(f"| {variant} | {median * 1e3:.2f} | {ratio:.3f} |", flush=True)
        results["tables"][title] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
