"""`BlockSparseMatrix`: a kernel stored as block-compressed sparse columns (BSC), and the
conversions to and from dense.

A pruned kernel K of shape (in_features, out_features) (Flax layout, y = x @ K) with a
block-structured boolean mask becomes a `BlockSparseMatrix`: the kept (bh, bw) blocks of
K * mask, stored block-column by block-column (BSC, the column-compressed twin of BSR).

Why columns. Output feature o of y = x @ K is column o of K, so the blocks of one block
column are exactly the blocks that feed one tile of bw outputs. Keeping them contiguous,
with a pointer per block column, lets a kernel give each output tile to its own program:
it walks its block column, gathers the matching bh-wide slices of x and accumulates, with
no atomics and no second reduction pass. (BSR of K would make the work parallel over
inputs instead, and every output tile would be summed from many programs.) BSC of K is
the same arrays as BSR of W = K^T, the (out, in) layout of P1, P2 and torch.

This is the format every kernel in `bsrnn.kernels` reads; `bsrnn.export` writes it to files.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

T = TypeVar("T")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparseMatrix:
    """A (in_features, out_features) kernel stored as block-compressed sparse columns (BSC).

    Attributes:
      values: (nnzb, bh, bw) kept blocks, ordered by block column, then block row. Entries
        of partial edge blocks that fall outside `shape` are zero.
      row_indices: (nnzb,) int32 block-row index i of each stored block: the block covers
        rows i*bh:(i+1)*bh of the kernel.
      col_ptr: (n_block_cols + 1,) int32, n_block_cols = ceil(out_features / bw). Block
        column j (kernel columns j*bw:(j+1)*bw) owns stored blocks col_ptr[j]:col_ptr[j+1].
      shape: (in_features, out_features) of the dense kernel (static).
      block_shape: (bh, bw) (static).
      col_ids: (nnzb,) int32 or None: the block column of each stored block (`col_ptr`
        expanded), precomputed by `with_xla_layout`; None: `block_col_ids` derives it.
      values_t: (bh, nnzb, bw) or None: `values` with the in-block row first, precomputed by
        `with_xla_layout`: the layout the XLA path's multiply-adds read contiguously
        (`bsrnn.kernels.xla`); None: that path reads `values` strided.
    """

    values: jax.Array
    row_indices: jax.Array
    col_ptr: jax.Array
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})
    block_shape: tuple[int, int] = dataclasses.field(metadata={"static": True})
    col_ids: jax.Array | None = None
    values_t: jax.Array | None = None

    @property
    def nnzb(self) -> int:
        """Number of stored blocks."""
        return self.values.shape[0]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(n_block_rows, n_block_cols) = (ceil(in / bh), ceil(out / bw))."""
        return _grid_shape(self.shape, self.block_shape)

    @property
    def dtype(self) -> np.dtype:
        """dtype of the stored values."""
        return self.values.dtype

    @property
    def density(self) -> float:
        """Fraction of blocks kept (1 - block sparsity)."""
        nbr, nbc = self.grid_shape
        return self.nnzb / (nbr * nbc)


def _grid_shape(shape: tuple[int, int], block_shape: tuple[int, int]) -> tuple[int, int]:
    (n_in, n_out), (bh, bw) = shape, block_shape
    return -(-n_in // bh), -(-n_out // bw)


def _check_block_shape(block_shape: Any) -> tuple[int, int]:
    try:
        bh, bw = (int(b) for b in block_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"block_shape must be a pair of positive ints (bh, bw), got {block_shape!r}"
        ) from None
    if bh < 1 or bw < 1:
        raise ValueError(f"block_shape must be a pair of positive ints, got {block_shape!r}")
    return bh, bw


def block_keep(mask: np.ndarray, block_shape: tuple[int, int]) -> np.ndarray:
    """Which blocks a block-structured mask keeps.

    Args:
      mask: (in, out) boolean mask.
      block_shape: (bh, bw).

    Returns:
      (ceil(in / bh), ceil(out / bw)) boolean array, True where the block is kept.

    Raises:
      ValueError: if a block (the in-bounds part of a partial edge block included) mixes
        kept and pruned entries, i.e. the mask is not block-structured for this shape.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (in, out), got shape {mask.shape}")
    bh, bw = _check_block_shape(block_shape)
    nbr, nbc = _grid_shape(mask.shape, (bh, bw))
    padded = np.zeros((nbr * bh, nbc * bw), np.int32)
    inside = np.zeros_like(padded)
    padded[: mask.shape[0], : mask.shape[1]] = mask.astype(bool)
    inside[: mask.shape[0], : mask.shape[1]] = 1
    kept = padded.reshape(nbr, bh, nbc, bw).sum(axis=(1, 3))
    size = inside.reshape(nbr, bh, nbc, bw).sum(axis=(1, 3))
    mixed = (kept != 0) & (kept != size)
    if mixed.any():
        i, j = np.argwhere(mixed)[0]
        raise ValueError(
            f"mask of shape {mask.shape} is not block-structured for block_shape {(bh, bw)}: "
            f"{int(mixed.sum())} blocks mix kept and pruned entries, the first is block "
            f"({i}, {j}) = rows {i * bh}:{(i + 1) * bh}, cols {j * bw}:{(j + 1) * bw}. "
            "Export with the block shape the mask was pruned with."
        )
    return kept != 0


def from_dense(
    kernel: Any,
    mask: Any,
    block_shape: tuple[int, int],
    *,
    dtype: Any = None,
) -> BlockSparseMatrix:
    """Compresses `kernel * mask` into block-compressed sparse columns.

    Args:
      kernel: (in, out) dense kernel, y = x @ kernel.
      mask: (in, out) boolean mask, block-structured for `block_shape`.
      block_shape: (bh, bw); blocks tile the kernel from (0, 0), edge blocks may be partial.
      dtype: dtype of the stored values (e.g. jnp.float16, jnp.bfloat16); default: the
        kernel's dtype.

    Returns:
      A `BlockSparseMatrix` holding numpy arrays (values (nnzb, bh, bw), int32 indices).

    Raises:
      ValueError: if shapes do not match or the mask is not block-structured.
    """
    kernel = np.asarray(kernel)
    mask = np.asarray(mask)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be 2-D (in_features, out_features), got {kernel.shape}")
    if mask.shape != kernel.shape:
        raise ValueError(f"mask shape {mask.shape} does not match kernel shape {kernel.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be boolean, got dtype {mask.dtype}")
    bh, bw = _check_block_shape(block_shape)
    keep = block_keep(mask, (bh, bw))
    nbr, nbc = keep.shape
    dtype = np.dtype(dtype) if dtype is not None else kernel.dtype
    padded = np.zeros((nbr * bh, nbc * bw), kernel.dtype)
    padded[: kernel.shape[0], : kernel.shape[1]] = np.where(mask, kernel, 0)
    blocks = padded.reshape(nbr, bh, nbc, bw).transpose(2, 0, 1, 3)  # (nbc, nbr, bh, bw)
    keep_t = keep.T  # (nbc, nbr): row-major order = by column, then row (BSC order).
    values = blocks[keep_t].astype(dtype)
    row_indices = np.nonzero(keep_t)[1].astype(np.int32)
    col_ptr = np.concatenate([[0], np.cumsum(keep_t.sum(axis=1))]).astype(np.int32)
    return BlockSparseMatrix(values, row_indices, col_ptr, tuple(kernel.shape), (bh, bw))


def with_xla_layout(m: BlockSparseMatrix) -> BlockSparseMatrix:
    """``m`` with `BlockSparseMatrix.col_ids` and `values_t` computed once on the host.

    The XLA path (`bsrnn.kernels.bsc_matmul_xla`) otherwise derives the block column ids from
    `col_ptr` in every call and reads the blocks' rows strided; when the matrix is a jitted
    function's argument (not a constant XLA can fold) that costs time in every call: at
    N = 1 on XLA:CPU the strided read made the 4x4 product of a trained GRU 256 ~1.6x slower
    (WORKSPACE.md, "End to end"). Same products, bit for bit.

    Args:
      m: a matrix with concrete (numpy or device) arrays.

    Returns:
      A `BlockSparseMatrix` with the same values, indices and static fields (numpy arrays
      for the two new fields).

    Raises:
      ValueError: if ``m`` holds tracers (call it outside `jax.jit`, on the weights).
    """
    if any(isinstance(a, jax.core.Tracer) for a in (m.values, m.row_indices, m.col_ptr)):
        raise ValueError("with_xla_layout needs a concrete matrix; call it outside jax.jit")
    nbc = m.grid_shape[1]
    counts = np.diff(np.asarray(m.col_ptr))
    col_ids = np.repeat(np.arange(nbc, dtype=np.int32), counts)
    if col_ids.shape != (m.nnzb,):
        raise ValueError(f"col_ptr covers {col_ids.size} blocks, the matrix stores {m.nnzb}")
    values_t = np.ascontiguousarray(np.swapaxes(np.asarray(m.values), 0, 1))
    return dataclasses.replace(m, col_ids=col_ids, values_t=values_t)


def block_col_ids(m: BlockSparseMatrix) -> jax.Array:
    """(nnzb,) int32 block-column index of each stored block: `m.col_ids` when precomputed
    (`with_xla_layout`), else `col_ptr` expanded in the graph (jittable)."""
    if m.col_ids is not None:
        return jnp.asarray(m.col_ids)
    nbc = m.grid_shape[1]
    counts = jnp.diff(jnp.asarray(m.col_ptr))
    return jnp.repeat(jnp.arange(nbc, dtype=jnp.int32), counts, total_repeat_length=m.nnzb)


def to_dense(m: BlockSparseMatrix) -> jax.Array:
    """Rebuilds the dense (in, out) kernel (pruned entries zero) in the values' dtype.

    Jittable; `to_dense(from_dense(k, mask, bs))` equals `k * mask` up to the value dtype.
    """
    (n_in, n_out), (bh, bw) = m.shape, m.block_shape
    nbr, nbc = m.grid_shape
    blocks = jnp.zeros((nbr, nbc, bh, bw), m.values.dtype)
    blocks = blocks.at[jnp.asarray(m.row_indices), block_col_ids(m)].set(m.values)
    return blocks.transpose(0, 2, 1, 3).reshape(nbr * bh, nbc * bw)[:n_in, :n_out]


_CONCRETE_CACHE: dict[tuple[int, Any], tuple[Any, Any]] = {}


def cached_on(m: BlockSparseMatrix, tag: Any, build: Callable[[], T]) -> T:
    """``build()``, computed once per concrete matrix ``m`` and ``tag`` and cached for as long
    as ``m.values`` lives; computed in the graph (not cached) when ``m`` holds tracers.

    For arrays derived from fixed weights (the dense kernel, re-laid-out panels), so a
    jitted function that closes over the weights gets one constant instead of re-deriving
    it in the graph, where XLA may sink the derivation into a loop body.
    """
    if any(isinstance(a, jax.core.Tracer) for a in (m.values, m.row_indices, m.col_ptr)):
        return build()
    key = (id(m.values), tag)
    hit = _CONCRETE_CACHE.get(key)
    if hit is not None and hit[0]() is m.values:
        return hit[1]
    with jax.ensure_compile_time_eval():
        value = jax.block_until_ready(build())
    try:
        ref = weakref.ref(m.values)
    except TypeError:  # not weak-referenceable: do not cache
        return value
    _CONCRETE_CACHE[key] = (ref, value)
    weakref.finalize(m.values, _CONCRETE_CACHE.pop, key, None)
    return value


def dense_kernel(m: BlockSparseMatrix) -> jax.Array:
    """`to_dense(m)`, computed once per concrete matrix and cached (the "dense" candidate of
    the kernels' dispatchers), or in the graph when `m` holds tracers (`cached_on`).

    Returns:
      (in, out) dense kernel in the values' dtype, pruned entries zero.
    """
    return cached_on(m, "dense", lambda: to_dense(m))
