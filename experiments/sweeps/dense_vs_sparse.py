r"""Pruning a large model against a small dense model of about the same nonzero size.

Reproduces claim (d) of SPEC §2.5 (P1: a 90%-sparse RNN 2560 beats a dense RNN 704 of
similar parameter count). On the default config (a GRU of 256 pruned to 90% keeps about
27k of 266k prunable weights; a dense GRU of 72 has about 27k), 3 members of a few
minutes on 2 CPU cores:

  python launch.py --sweep=experiments/sweeps/dense_vs_sparse.py --workdir=/tmp/dvs

The summary table is `<workdir>/sweep_summary.txt`; compare the metric at equal nonzero
parameters.
"""


def get_sweep(arg: str | None = None) -> list[dict]:
    """Dense large, dense small, block-sparse large."""
    del arg
    return [
        {"method": "dense", "model.features": 256},
        {"method": "dense", "model.features": 72},
        {"method": "bp", "model.features": 256},
    ]
