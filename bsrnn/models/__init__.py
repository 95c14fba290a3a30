"""Models, picked by name: ``config.model_name = "lm"`` is :class:`bsrnn.models.lm.Model`.

Each module here holds one ``Model`` (a Flax module whose constructor arguments are the
fields of ``config.model``) and the functions that go with it:

* :mod:`bsrnn.models.lm`: language model (embedding, stacked RNN/GRU/LSTM, softmax).
* :mod:`bsrnn.models.ds2`: Deep Speech 2 style acoustic model for CTC.

Each module is also what the trainer asks about everything that differs between models
(:class:`Task`): which data it reads, its inputs from a batch, its carry, its training loss
and its evaluation. ``bsrnn.train`` holds no per-model code; a new model is a new module
here with these names, and its name in :data:`MODEL_NAMES`.

Prunable kernels are :class:`bsrnn.cells.MaskedDense` (mask in the ``masks`` collection);
the others are plain Flax layers, so the set of masks *is* the set of prunable kernels.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

MODEL_NAMES = ("lm", "ds2")


class Task(Protocol):
    """What the trainer asks of a model module (:mod:`bsrnn.models.lm`, :mod:`.ds2`).

    Attributes:
      TASK: the ``task`` of the data the model reads (``bsrnn.data.TextData.task``, ...).
      NUM_CLASSES_FIELD: the ``Model`` field that the data's ``num_classes`` sets.
    """

    TASK: str
    NUM_CLASSES_FIELD: str

    def inputs(self, batch: dict[str, Any]) -> tuple[Any, ...]:
        """The positional inputs of ``Model.__call__`` (and ``init``) from a batch."""

    def initial_carry(self, model: Any, batch_size: int) -> Any:
        """The state a training batch of ``batch_size`` rows starts with; ``()`` for none."""

    def train_loss(
        self, model: Any, variables: dict[str, Any], batch: dict[str, Any], carry: Any,
        rngs: dict[str, Any],
    ) -> tuple[Any, Any]:
        """The scalar loss to minimise on ``batch`` (the model in training mode), and the
        carry for the next batch."""

    def evaluate(
        self, model: Any, variables: dict[str, Any], batches: Iterator[dict[str, Any]],
        dataset: Any, batch_size: int, place: Callable[[Any], Any],
    ) -> dict[str, float]:
        """Metrics over ``batches`` of ``batch_size`` rows (one pass over a split);
        ``place`` puts a batch or a carry on the devices."""


def model_module(name: str) -> Task:
    """The module ``bsrnn.models.<name>`` (one of :data:`MODEL_NAMES`), its :class:`Task`."""
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
