r"""P1's block-size sweep: block pruning with 1x1, 4x4, 12x2, 8x8, 16x16 and 32x32 blocks.

Reproduces claim (c) of SPEC §2.5: larger blocks cost a little accuracy at the same
sparsity (P1, DS2 RNN at 84-89% sparse: 1x1 -12.8%, 4x4 -16.7%, 32x32 at 79% -8.5%
relative CER). Every layer type gets the same block shape. On the default config
(Shakespeare GRU, 6 members of about 5 minutes on 2 CPU cores):

  python launch.py --sweep=experiments/sweeps/block_sizes.py --workdir=/tmp/blocks

On another config, e.g. AN4's bidirectional RNN, one member per GPU:

  python launch.py --config=experiments/configs/an4_ds2.py:rnn \
      --sweep=experiments/sweeps/block_sizes.py --workdir=/tmp/an4_blocks --sweep_workers=4

The summary table is `<workdir>/sweep_summary.txt`.
"""

from bsrnn.configs import all_types

BLOCK_SHAPES = ((1, 1), (4, 4), (12, 2), (8, 8), (16, 16), (32, 32))


def get_sweep(arg: str | None = None) -> list[dict]:
    """One member per block shape, method ``bp``."""
    del arg
    return [{"method": "bp", **all_types("prune.block_shape", shape)} for shape in BLOCK_SHAPES]
