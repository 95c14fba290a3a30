"""Models, picked by name: ``config.model_name = "lm"`` is :class:`bsrnn.models.lm.Model`.

Each module here holds one ``Model`` (a Flax module whose constructor arguments are the
fields of ``config.model``) and the functions that go with it:

* :mod:`bsrnn.models.lm`: language model (embedding, stacked RNN/GRU/LSTM, softmax).
* :mod:`bsrnn.models.ds2`: Deep Speech 2 style acoustic model for CTC.

Prunable kernels are :class:`bsrnn.cells.MaskedDense` (mask in the ``masks`` collection);
the others are plain Flax layers, so the set of masks *is* the set of prunable kernels.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType

MODEL_NAMES = ("lm", "ds2")


def model_module(name: str) -> ModuleType:
    """The module ``bsrnn.models.<name>`` (one of :data:`MODEL_NAMES`)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"config.model_name={name!r} is not a model; choose one of {MODEL_NAMES}.")
    return importlib.import_module(f"bsrnn.models.{name}")


def check_sizes(
    model: str, *, positive: dict[str, int | Iterable[int]] | None = None,
    non_negative: dict[str, int] | None = None,
) -> None:
    """Raise ``ValueError`` naming the first field of ``config.model`` (of model ``model``)
    that is not an integer >= 1 (``positive``, each value or each entry of a sequence) or
    >= 0 (``non_negative``)."""
    for fields, low in ((positive or {}, 1), (non_negative or {}, 0)):
        for name, value in fields.items():
            entries = value if isinstance(value, Iterable) else [value]
            for v in entries:
                v = list(v) if isinstance(v, Iterable) else [v]
                if not all(isinstance(x, int) and not isinstance(x, bool) and x >= low
                           for x in v):
                    raise ValueError(
                        f"config.model.{name}={value!r} (bsrnn.models.{model}): must be "
                        f"{'integers' if isinstance(value, Iterable) else 'an integer'} >= {low}."
                    )
