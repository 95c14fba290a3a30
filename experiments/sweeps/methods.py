r"""Every method on one config: dense, structural (P3), WP (P2), BP, GL and GLP (P1).

Reproduces claim (b) of SPEC §2.5 (GLP far better than GL: P1, RNN 1760 at 4x4, GL 83.3%
sparse -96.0% relative CER, GLP 90.8% -25.3%) and sets BP, WP and P3's block-diagonal
recurrence beside the dense baseline. On the default config (6 members of about 5 minutes
on 2 CPU cores):

  python launch.py --sweep=experiments/sweeps/methods.py --workdir=/tmp/methods

The summary table is `<workdir>/sweep_summary.txt`.
"""

METHODS = ("dense", "structural", "wp", "bp", "gl", "glp")


def get_sweep(arg: str | None = None) -> list[dict]:
    """One member per method."""
    del arg
    return [{"method": method} for method in METHODS]
