"""The default config, the character-level GRU on Shakespeare's plays, block-pruned to 90%.

It ships inside the package, as ``bsrnn/configs/shakespeare_gru.py`` (its docstring holds the
commands and what it reproduces), so that an installed bsrnn runs it without this repository;
this file makes it available by path beside the other configs:

  python launch.py --config=experiments/configs/shakespeare_gru.py:method=dense --workdir=/tmp/sd
"""

from bsrnn.configs.shakespeare_gru import get_config

__all__ = ["get_config"]
