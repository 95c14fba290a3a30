"""bsrnn: block-sparse and structurally sparse RNN, GRU and LSTM training in JAX/Flax.

Where things are:

* :mod:`bsrnn.blocks`: block tiling, block reductions, P3's block-diagonal pattern.
* :mod:`bsrnn.schedules`: P2's threshold schedule and the cubic target-sparsity schedule.
* :mod:`bsrnn.pruning`: optax transforms (weight/block pruning, group lasso) and the masks.
* :mod:`bsrnn.cells`: masked RNN/GRU/LSTM cells and the scan-based recurrent layers.
* :mod:`bsrnn.data`: text (Shakespeare, PTB, any text file) and speech (AN4, FSDD) loaders.
* :mod:`bsrnn.export`: a trained masked model as block-sparse (BSC) matrices, ``.npz`` files.
* :mod:`bsrnn.kernels`: block-sparse products and GRU/LSTM/RNN sequences, ``impl="auto"``.
* :mod:`bsrnn.inference`: an exported model run from its file on the kernels; its CLI.
* :mod:`bsrnn.models`: the language model and the Deep Speech 2 style acoustic model.
* :mod:`bsrnn.ctc`: greedy CTC decoding, CER and WER.
* :mod:`bsrnn.methods`: ``config.method`` (dense, structural, WP, BP, GL, GLP) as an optax chain.
* :mod:`bsrnn.input_pipeline`: ``config.data`` -> corpus and resumable batches.
* :mod:`bsrnn.train`: the trainer, ``train_and_evaluate(config, workdir)``.
* :mod:`bsrnn.workdir`: the run folder: paths, lock, resume checks, checkpoint checksums.
* :mod:`bsrnn.sharding`: the data-parallel mesh and its shardings; multi-host start-up.
* :mod:`bsrnn.vmap_sweep`: sweep members that differ only in values, vmapped in one program.
* :mod:`bsrnn.report`: metric logs, sparsity and parameter counts, the report tables.
* :mod:`bsrnn.configs`: building blocks of ``experiments/configs``.
* :mod:`bsrnn.launcher`: what ``launch.py`` runs: flags, single runs and sweeps.
"""

__version__ = "0.1.0"
