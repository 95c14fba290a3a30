"""bsrnn: block-sparse and structurally sparse RNN, GRU and LSTM training in JAX/Flax.

Where things are:

* :mod:`bsrnn.blocks`: block tiling, block reductions, P3's block-diagonal pattern.
* :mod:`bsrnn.schedules`: P2's threshold schedule and the cubic target-sparsity schedule.
* :mod:`bsrnn.pruning`: optax transforms (weight/block pruning, group lasso) and the masks.
* :mod:`bsrnn.cells`: masked RNN/GRU/LSTM cells and the scan-based recurrent layers.
"""

__version__ = "0.1.0"
