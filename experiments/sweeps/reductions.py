r"""P1's future work: block reductions other than the maximum (mean, RMS, geometric mean,
median), at 4x4 blocks.

Which score of a block best predicts that it can go. On the default config (5 members of
about 5 minutes on 2 CPU cores):

  python launch.py --sweep=experiments/sweeps/reductions.py --workdir=/tmp/reductions

The summary table is `<workdir>/sweep_summary.txt`.
"""

from bsrnn.blocks import REDUCTIONS
from bsrnn.configs import all_types


def get_sweep(arg: str | None = None) -> list[dict]:
    """One member per reduction, method ``bp``."""
    del arg
    return [{"method": "bp", **all_types("prune.reduction", r)} for r in REDUCTIONS]
