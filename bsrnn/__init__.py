"""bsrnn: block-sparse and structurally sparse RNN, GRU and LSTM training in JAX/Flax.

Where things are:

* :mod:`bsrnn.blocks`: block tiling, block reductions, P3's block-diagonal pattern.
* :mod:`bsrnn.schedules`: P2's threshold schedule and the cubic target-sparsity schedule.
* :mod:`bsrnn.pruning`: optax transforms (weight/block pruning, group lasso) and the masks.
* :mod:`bsrnn.cells`: masked RNN/GRU/LSTM cells and the scan-based recurrent layers.
* :mod:`bsrnn.nnx`: the same layers for Flax NNX, each mask its own ``nnx.Variable``.
* :mod:`bsrnn.data`: text (Shakespeare, PTB, any text file) and speech (AN4, FSDD) loaders;
  ``config.data`` -> a corpus and its resumable batches (``bsrnn.data.load``).
* :mod:`bsrnn.export`: a trained masked model as block-sparse (BSC) matrices, ``.npz`` files.
* :mod:`bsrnn.kernels`: block-sparse products and GRU/LSTM/RNN sequences, ``impl="auto"``.
* :mod:`bsrnn.inference`: an exported model run from its file on the kernels; its CLI.
* :mod:`bsrnn.models`: the language model and the Deep Speech 2 style acoustic model, each
  with what the trainer asks of it (inputs, carry, loss, evaluation: ``models.Task``).
* :mod:`bsrnn.ctc`: greedy CTC decoding, CER and WER.
* :mod:`bsrnn.methods`: ``config.method`` (dense, structural, WP, BP, GL, GLP) as an optax chain
  with the optimizer: ``create_optimizer``.
* :mod:`bsrnn.train`: the trainer, ``train_and_evaluate(config, workdir)``.
* :mod:`bsrnn.workdir`: the run folder: paths, lock, resume checks, checkpoint checksums.
* :mod:`bsrnn.sharding`: the data-parallel mesh and its shardings; multi-host start-up.
* :mod:`bsrnn.vmap_sweep`: sweep members that differ only in values, vmapped in one program.
* :mod:`bsrnn.report`: metric logs, sparsity and parameter counts, ``report.json`` and its tables.
* :mod:`bsrnn.configs`: building blocks of configs, and the default config it ships
  (``bsrnn/configs/shakespeare_gru.py``).
* :mod:`bsrnn.launcher`: what ``python -m bsrnn`` and ``launch.py`` run: flags, single runs
  and sweeps.

Every module above is an attribute of the package (``import bsrnn; bsrnn.pruning``), imported
when first used: ``import bsrnn`` alone takes milliseconds, not the seconds of JAX.
"""

import importlib
from types import ModuleType

__version__ = "0.1.0"

__all__ = [
    "blocks", "cells", "configs", "ctc", "data", "export", "inference", "kernels", "launcher",
    "methods", "models", "nnx", "pruning", "report", "schedules", "sharding", "train",
    "vmap_sweep", "workdir",
]


def __getattr__(name: str) -> ModuleType:
    """``bsrnn.<module>``: the public submodule, imported on first access."""
    if name in __all__:
        return importlib.import_module(f"bsrnn.{name}")
    raise AttributeError(f"module 'bsrnn' has no attribute {name!r}; its modules are {__all__}.")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
