"""Throughput of an M-member vmapped sweep against the same M members one after another.

The model is the default config's (``experiments/configs/shakespeare_gru.py``: one GRU of
256 units, 32 x 100 characters a batch, 4x4 block pruning with the cubic schedule), on a
synthetic corpus of random characters (81 symbols, as Shakespeare's), so no data set is
needed. The M members differ in seed, learning rate and target sparsity.

* **vmapped**: :func:`bsrnn.vmap_sweep.make_step` over all M members, one call a step.
* **one after another**: the same step function with M = 1, run for each member in turn
  (one compiled program serves all members, since their values are arguments; it is
  recompiled only for the first member). Also timed: ``train.train_step`` of member 0
  alone, jitted as the trainer does, to show that M = 1 costs what an ordinary run does.

Both run the same number of steps per member, every step on the same batch; each step is
timed to ``block_until_ready`` after a first call (compilation, reported apart). Printed: median
step time and member-steps per second of each, and the speed-up, as one JSON line.

    python experiments/bench/vmap_sweep.py                        # GPU: 8 members
    python experiments/bench/vmap_sweep.py --features=16 --steps=5  # CPU smoke test
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from bsrnn import data, models, train, vmap_sweep

REPO = Path(__file__).resolve().parents[2]


def member_configs(members: int, features: int, text: Path) -> list:
    """The default config on ``text``, M times, with different seed, lr and sparsity."""
    spec = importlib.util.spec_from_file_location(
        "shakespeare_gru", REPO / "experiments" / "configs" / "shakespeare_gru.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    configs = []
    for i in range(members):
        config = module.get_config(f"features={features}")
        config.data.name, config.data.path = "text", str(text)
        config.seed = i
        config.optimizer.learning_rate = 5e-3 * (1 + i / members)
        config.prune.sparsity.recurrent = 0.8 + 0.15 * i / members
        configs.append(config)
    return configs


def time_steps(step, values: dict | None, states: train.TrainState, batch: dict,
               steps: int) -> tuple[list[float], float]:
    """Seconds of each of ``steps`` steps after a first (compiling) one, and the first's."""
    start = time.perf_counter()
    states, metrics = jax.block_until_ready(step(values, states, batch))
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        states, metrics = jax.block_until_ready(step(values, states, batch))
        times.append(time.perf_counter() - start)
    return times, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per member")
    args = parser.parse_args()

    text = Path(tempfile.mkdtemp()) / "random.txt"
    rng = np.random.default_rng(0)
    text.write_text("".join(chr(c) for c in rng.integers(32, 32 + 81, 400_000)))
    configs = member_configs(args.members, args.features, text)
    config = configs[0]
    values = vmap_sweep.stack_values(configs)
    dataset = data.load(config)
    model = train.create_model(config, dataset)
    batch = jax.device_put(data.example_batch(dataset, config))
    task = models.model_module(config.model_name)
    step = vmap_sweep.make_step(config, model, task)

    states = vmap_sweep.initial_states(config, values, model, task, batch)
    vmapped, vmapped_first = time_steps(step, values, states, batch, args.steps)
    sequential, sequential_first = [], 0.0
    for i in range(args.members):
        one = {k: v[i : i + 1] for k, v in values.items()}
        states = vmap_sweep.initial_states(config, one, model, task, batch)
        times, first = time_steps(step, one, states, batch, args.steps)
        sequential, sequential_first = sequential + times, sequential_first + first
    # Check on member 0 that M = 1 costs what the ordinary trainer's step does.
    state, tx, _ = train.initial_state(config, model, task, batch)
    ordinary_step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, task=task),
                            donate_argnums=0)
    ordinary, _ = time_steps(lambda v, s, b: ordinary_step(s, b), None, state, batch, args.steps)

    vmapped_median = statistics.median(vmapped)
    sequential_median = statistics.median(sequential)
    result = {
        "members": args.members, "features": args.features, "batch": config.batch_size,
        "seq_len": config.seq_len, "timed_steps_per_member": args.steps,
        "vmapped_median_step_ms": 1e3 * vmapped_median,
        "vmapped_member_steps_per_s": args.members / vmapped_median,
        "sequential_median_step_ms": 1e3 * sequential_median,
        "sequential_member_steps_per_s": 1 / sequential_median,
        "ordinary_train_step_median_ms": 1e3 * statistics.median(ordinary),
        "speedup": args.members * sequential_median / vmapped_median,
        "vmapped_first_call_s": vmapped_first, "sequential_first_calls_s": sequential_first,
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
