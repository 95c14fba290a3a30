"""Batches for training and evaluation, with a position that can be checkpointed.

Two batchers, both generators of `(batch, position)`:

- `lm_batches`: the standard contiguous-stream batching for language models. The token
  stream is cut into B rows, `stream[:B * L].reshape(B, L)`, and read left to right in
  windows of T tokens; targets are the inputs shifted by one token, so the recurrent state
  of row b can be carried from one window to the next.
- `ctc_batches`: padded batches of variable-length sequences with their label sequences,
  shuffled from a seed and bucketed by length, in the form `optax.ctc_loss` takes.

A position is a dict of ints, `{"epoch": e, "index": i}`: batch i of epoch e. The position
yielded with a batch is the position of the *next* batch, so saving it in a checkpoint and
passing it back as `start=` continues with exactly the batches an uninterrupted run would
have produced (given the same data, batch size and seed). An epoch starts where a position
has index 0.
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

Position = dict[str, int]


class LMBatch(NamedTuple):
    """A window of the token stream.

    Attributes:
      inputs: (B, T) int32 token ids.
      targets: (B, T) int32, the token following each input token.
    """

    inputs: np.ndarray
    targets: np.ndarray


class CTCBatch(NamedTuple):
    """Padded speech batch; padded entries are 0.

    Attributes:
      inputs: (B, T, F) float32 features.
      lengths: (B,) int32 number of real frames per example.
      paddings: (B, T) float32, 1.0 at padded frames (optax's `logit_paddings` when the model
        keeps the frame rate; otherwise recompute with `paddings_from_lengths`).
      labels: (B, L) int32 label ids, right-padded with 0 (the blank).
      label_lengths: (B,) int32 number of real labels per example.
      label_paddings: (B, L) float32, 1.0 at padded labels (optax's `label_paddings`).
      index: (B,) int32 index of each example in the sequences given to `ctc_batches`.
    """

    inputs: np.ndarray
    lengths: np.ndarray
    paddings: np.ndarray
    labels: np.ndarray
    label_lengths: np.ndarray
    label_paddings: np.ndarray
    index: np.ndarray


def paddings_from_lengths(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """(B,) lengths -> (B, max_length) float32 with 1.0 at positions >= length."""
    return (np.arange(max_length)[None, :] >= np.asarray(lengths)[:, None]).astype(np.float32)


def pad_sequences(
    sequences: Sequence[np.ndarray], *, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads sequences of shapes (T_i, ...) with zeros along their first axis.

    Args:
      sequences: B arrays with equal trailing shapes and dtypes.
      multiple: the padded length is rounded up to a multiple of this (fewer distinct shapes,
        fewer recompilations under `jax.jit`).

    Returns:
      padded (B, T, ...) with T = max T_i rounded up to `multiple`, and lengths (B,) int32.
    """
    lengths = np.array([len(s) for s in sequences], np.int32)
    max_length = -(-max(lengths, default=0) // multiple) * multiple
    first = np.asarray(sequences[0])
    padded = np.zeros((len(sequences), max_length, *first.shape[1:]), first.dtype)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = sequence
    return padded, lengths


def _positions(
    num_batches: int, start: Position | None, num_epochs: int | None
) -> Iterator[tuple[int, int]]:
    """(epoch, index) of each batch from `start` on, `num_batches` per epoch."""
    epoch, index = 0, 0
    if start is not None:
        if set(start) != {"epoch", "index"}:
            raise ValueError(f"Position {start!r}: expected a dict with keys 'epoch' and 'index'.")
        epoch, index = int(start["epoch"]), int(start["index"])
        if epoch < 0 or not 0 <= index < num_batches:
            raise ValueError(
                f"Position {start!r} is outside this data ({num_batches} batches per epoch); "
                "resume with the data, batch size and sequence length of the saved run."
            )
    while num_epochs is None or epoch < num_epochs:
        yield epoch, index
        epoch, index = (epoch, index + 1) if index + 1 < num_batches else (epoch + 1, 0)


def _next_position(epoch: int, index: int, num_batches: int) -> Position:
    if index + 1 < num_batches:
        return {"epoch": epoch, "index": index + 1}
    return {"epoch": epoch + 1, "index": 0}


def lm_num_batches(
    num_tokens: int, batch_size: int, seq_len: int, *, drop_remainder: bool = True
) -> int:
    """Number of windows per epoch of `lm_batches` over a stream of `num_tokens` tokens."""
    row_length = num_tokens // batch_size
    if drop_remainder:
        return (row_length - 1) // seq_len
    return -(-(row_length - 1) // seq_len)


def lm_batches(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    *,
    start: Position | None = None,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> Iterator[tuple[LMBatch, Position]]:
    """Contiguous-stream language-model batches.

    The stream `tokens[:B * L]`, L = len(tokens) // B, is reshaped to (B, L) (the last
    len(tokens) mod B tokens are unused); window i has inputs `rows[:, iT:(i+1)T]` and targets
    `rows[:, iT+1:(i+1)T+1]`. Every epoch reads the same windows in the same order.

    Args:
      tokens: (N,) token ids, e.g. `TextCorpus.train`.
      batch_size: B, the number of parallel rows.
      seq_len: T, tokens per window.
      start: position to start from (from a checkpoint); default epoch 0, window 0.
      num_epochs: stop after this many epochs (counted from epoch 0); None for no end.
      drop_remainder: drop the last window when it is shorter than T (training); if False it
        is yielded with shape (B, T') where T' < T, so evaluation covers the whole stream.

    Yields:
      (LMBatch of shape (B, T), position of the next window).
    """
    row_length = len(tokens) // batch_size
    num_batches = lm_num_batches(len(tokens), batch_size, seq_len, drop_remainder=drop_remainder)
    if num_batches < 1:
        raise ValueError(
            f"{len(tokens)} tokens make no window of batch_size={batch_size} rows by "
            f"seq_len={seq_len}; use a smaller batch size or sequence length."
        )
    rows = np.asarray(tokens, np.int32)[: batch_size * row_length].reshape(batch_size, -1)
    for epoch, index in _positions(num_batches, start, num_epochs):
        begin = index * seq_len
        end = min(begin + seq_len, row_length - 1)
        batch = LMBatch(inputs=rows[:, begin:end], targets=rows[:, begin + 1 : end + 1])
        yield batch, _next_position(epoch, index, num_batches)


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    bucket_size: int | None = 20,
    drop_remainder: bool = False,
) -> list[np.ndarray]:
    """Which examples go in which batch in one epoch: a pure function of its arguments.

    Examples are shuffled with a generator seeded by (seed, epoch) (or kept in order when
    `shuffle` is False). With bucketing, the order is cut into buckets of
    `bucket_size * batch_size` examples, each bucket is sorted by length (stable) and cut into
    batches, and the batches are shuffled; so batches hold examples of similar length and
    every example still appears exactly once per epoch.

    Args:
      lengths: length of each example (e.g. frames).
      batch_size: examples per batch.
      seed: shuffling seed.
      epoch: epoch number; each epoch has its own order.
      shuffle: shuffle examples and batches.
      bucket_size: batches per bucket; None for no bucketing. A bucket as large as the data
        sorts it all (least padding, e.g. for evaluation).
      drop_remainder: drop the last batch of a bucket when it has fewer than batch_size
        examples (without bucketing, the last batch of the epoch).

    Returns:
      a list of (B_i,) int64 arrays of example indices, B_i <= batch_size.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    chunk = len(order) if bucket_size is None else bucket_size * batch_size
    batches = []
    for begin in range(0, len(order), chunk):
        bucket = order[begin : begin + chunk]
        if bucket_size is not None:
            bucket = bucket[np.argsort(lengths[bucket], kind="stable")]
        for b in range(0, len(bucket), batch_size):
            if not drop_remainder or b + batch_size <= len(bucket):
                batches.append(bucket[b : b + batch_size])
    if shuffle and bucket_size is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def ctc_batches(
    inputs: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    batch_size: int,
    *,
    seed: int = 0,
    start: Position | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    bucket_size: int | None = 20,
    drop_remainder: bool = False,
    pad_multiple: int = 1,
) -> Iterator[tuple[CTCBatch, Position]]:
    """Padded, length-bucketed batches of (features, labels) pairs for CTC training.

    Args:
      inputs: N arrays of shape (T_i, F), e.g. normalised `Utterance.features`.
      labels: N int arrays of shape (L_i,), e.g. `ctc_vocabulary(...).encode(transcript)`.
      batch_size: B.
      seed, shuffle, bucket_size, drop_remainder: see `epoch_batches`, which decides the
        batches of each epoch.
      start: position to start from (from a checkpoint); default epoch 0, batch 0.
      num_epochs: stop after this many epochs (counted from epoch 0); None for no end.
      pad_multiple: T and L are rounded up to a multiple of this.

    Yields:
      (CTCBatch with B <= batch_size rows, position of the next batch).
    """
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} label sequences; pair them.")
    lengths = [len(x) for x in inputs]
    plan_args = dict(shuffle=shuffle, bucket_size=bucket_size, drop_remainder=drop_remainder)
    num_batches = len(epoch_batches(lengths, batch_size, seed=seed, epoch=0, **plan_args))
    if num_batches < 1:
        raise ValueError(f"{len(inputs)} examples make no batch of {batch_size}.")
    plan, plan_epoch = [], None
    for epoch, index in _positions(num_batches, start, num_epochs):
        if epoch != plan_epoch:
            plan = epoch_batches(lengths, batch_size, seed=seed, epoch=epoch, **plan_args)
            plan_epoch = epoch
        members = plan[index]
        features, frames = pad_sequences([inputs[i] for i in members], multiple=pad_multiple)
        label_ids, label_lengths = pad_sequences(
            [np.asarray(labels[i], np.int32) for i in members], multiple=pad_multiple
        )
        batch = CTCBatch(
            inputs=features.astype(np.float32),
            lengths=frames,
            paddings=paddings_from_lengths(frames, features.shape[1]),
            labels=label_ids,
            label_lengths=label_lengths,
            label_paddings=paddings_from_lengths(label_lengths, label_ids.shape[1]),
            index=members.astype(np.int32),
        )
        yield batch, _next_position(epoch, index, num_batches)
