"""CTC decoding and the error rates of its transcripts.

* :func:`greedy_decode`: best path decoding: the arg-max label of every frame, repeats
  collapsed, then blanks removed (Graves et al. 2006). Jittable, fixed shapes.
* :func:`edit_distance`, :func:`error_rates`: Levenshtein distance and CER / WER, the
  speech metrics of SPEC §2.5, computed on the host.

The loss itself is ``optax.ctc_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def greedy_decode(
    logits: jax.Array, lengths: jax.Array, blank: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Best-path CTC decoding.

    Args:
      logits: (B, T, C) scores (log-probabilities or logits).
      lengths: (B,) valid frames per example; frames past them are ignored.
      blank: the blank label.

    Returns:
      labels (B, T) int32, each row's decoded labels first and ``blank`` after them, and
      the number of decoded labels (B,) int32.
    """
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (B, T)
    previous = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    valid = jnp.arange(best.shape[1])[None, :] < lengths[:, None]
    keep = valid & (best != blank) & (best != previous)
    order = jnp.argsort(~keep, axis=1, stable=True)  # kept frames first, in time order
    labels = jnp.take_along_axis(jnp.where(keep, best, blank), order, axis=1)
    return labels, keep.sum(axis=1).astype(jnp.int32)


def decoded_sequences(labels: jax.Array, lengths: jax.Array) -> list[list[int]]:
    """The (labels, lengths) of :func:`greedy_decode` as one Python list per example."""
    labels, lengths = np.asarray(labels), np.asarray(lengths)
    return [labels[b, : lengths[b]].tolist() for b in range(len(lengths))]


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Levenshtein distance: fewest substitutions, insertions and deletions turning
    ``reference`` into ``hypothesis`` (sequences of comparable items: characters, words)."""
    previous = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, start=1):
        current = [i]
        for j, h in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus character and word error rates, as fractions (0.1 is 10%).

    CER = Σ edit_distance(characters) / Σ reference characters (spaces count as characters);
    WER = Σ edit_distance(words) / Σ reference words, words split on whitespace. Errors are
    summed over the corpus before dividing, so long utterances weigh more.

    Returns:
      ``{"cer": ..., "wer": ...}``.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses.")
    char_errors = sum(edit_distance(r, h) for r, h in zip(references, hypotheses, strict=True))
    word_errors = sum(
        edit_distance(r.split(), h.split()) for r, h in zip(references, hypotheses, strict=True)
    )
    chars = sum(len(r) for r in references)
    words = sum(len(r.split()) for r in references)
    if chars == 0 or words == 0:
        raise ValueError("error rates need at least one non-empty reference transcript.")
    return {"cer": char_errors / chars, "wer": word_errors / words}
