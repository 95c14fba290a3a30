"""Token vocabularies: token <-> integer id, built from training data only."""

import collections
import dataclasses
from collections.abc import Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """A fixed list of tokens; a token's id is its position in `tokens`.

    Attributes:
      tokens: every token, id order.
      unk: the token that unknown tokens map to (it is one of `tokens`), or None for a closed
        vocabulary, where encoding an unknown token raises `ValueError`.
    """

    tokens: tuple[str, ...]
    unk: str | None = None

    def __post_init__(self):
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("Vocabulary tokens must be distinct.")
        if self.unk is not None and self.unk not in self.tokens:
            raise ValueError(f"Vocabulary unk token {self.unk!r} is not one of its tokens.")
        object.__setattr__(self, "_ids", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        """The id of `token` (the id of `unk` if it is unknown and the vocabulary has one)."""
        ids = self._ids
        if token in ids:
            return ids[token]
        if self.unk is None:
            raise ValueError(
                f"Token {token!r} is not in this closed vocabulary of {len(self)} tokens; "
                "build the vocabulary with an unk token, or clean the data."
            )
        return ids[self.unk]

    def encode(self, tokens: Iterable[str]) -> np.ndarray:
        """Token ids, shape (N,) int32. Unknown tokens map to `unk` (or raise, if there is none)."""
        ids = self._ids
        if self.unk is None:
            return np.fromiter((ids[t] if t in ids else self.id(t) for t in tokens), np.int32)
        unk_id = ids[self.unk]
        return np.fromiter((ids.get(t, unk_id) for t in tokens), np.int32)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The tokens of `ids`, any shape flattened in C order."""
        return [self.tokens[i] for i in np.asarray(ids).ravel()]


def build_vocabulary(
    tokens: Iterable[str], *, unk: str | None = None, reserved: tuple[str, ...] = ()
) -> Vocabulary:
    """Builds a vocabulary from training tokens.

    Ids: first the `reserved` tokens in the order given (e.g. a CTC blank at id 0), then the
    training tokens by decreasing count, ties broken by the token's string order (the order of
    the TensorFlow PTB reader), then `unk` if it is given and did not occur in training.

    Args:
      tokens: the training token stream (never valid or test data).
      unk: token for unknown tokens at encoding time, or None for a closed vocabulary.
      reserved: tokens placed first, whether or not they occur in `tokens`.

    Returns:
      The vocabulary.
    """
    counts = collections.Counter(tokens)
    for token in reserved:
        counts.pop(token, None)
    ordered = sorted(counts, key=lambda t: (-counts[t], t))
    if unk is not None and unk not in counts and unk not in reserved:
        ordered.append(unk)
    return Vocabulary(tokens=tuple(reserved) + tuple(ordered), unk=unk)
