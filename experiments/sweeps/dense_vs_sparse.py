r"""Pruning a large model against a small dense model of the same nonzero size.

Reproduces claim (d) of SPEC §2.5 (P1: a 90%-sparse RNN 2560 beats a dense RNN 704 of
similar parameter count). On the default config, the block-sparse GRU of 256 ends with
about 53k nonzero parameters (embedding and softmax included), as many as a dense GRU of
88. Three members of about 4 minutes each on 2 CPU cores:

  python launch.py --sweep=experiments/sweeps/dense_vs_sparse.py --workdir=/tmp/dvs

The summary table is `<workdir>/sweep_summary.txt`; compare the metric at equal nonzero
parameters.
"""


def get_sweep(arg: str | None = None) -> list[dict]:
    """Dense large, dense small, block-sparse large."""
    del arg
    return [
        {"method": "dense", "model.features": 256},
        {"method": "dense", "model.features": 88},
        {"method": "bp", "model.features": 256},
    ]
