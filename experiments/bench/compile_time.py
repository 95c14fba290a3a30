"""Compile time of one AN4 training step, bidirectional clipped-ReLU RNN against GRU.

Lowers and compiles the jitted `bsrnn.train.train_step` of
`experiments/configs/an4_ds2.py` (512 wide, BP 4x4, batch 32, one batch shape) for each
model and prints the seconds each stage took. Used to check whether the RNN's compilation
was what stalled many parallel GPU starts (WORKSPACE.md, "What went wrong"). Needs the AN4
data (``$BSRNN_DATA/an4``).

    BSRNN_DATA=../shared/data PYTHONPATH=. python experiments/bench/compile_time.py
"""

from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path

import jax

from bsrnn import data as data_lib
from bsrnn import models, train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "an4_ds2.py"


def main() -> None:
    spec = importlib.util.spec_from_file_location("an4_ds2", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    for model_name in ("gru", "rnn"):
        config = module.get_config(f"model={model_name},features=512,method=bp,steps=1500")
        config.batch_size = 32
        dataset = data_lib.load(config)
        model = train.create_model(config, dataset)
        batch = data_lib.example_batch(dataset, config)
        task = models.model_module(config.model_name)
        state, tx, _ = train.initial_state(config, model, task, batch)
        step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, task=task))
        start = time.perf_counter()
        lowered = step.lower(state, batch)
        lowered_at = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
        print(f"{model_name}: inputs {batch['inputs'].shape}, lower {lowered_at - start:.1f} s, "
              f"compile {done - lowered_at:.1f} s", flush=True)


if __name__ == "__main__":
    main()
