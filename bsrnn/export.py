"""Export of pruned weights to a compact block-sparse form, and its `.npz` file layout.

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

File layout (`save_npz` / `load_npz`), one flat `np.savez` archive, no pickles:

- `__bsrnn_export__`: 0-d bytes array holding UTF-8 JSON
  `{"format": "bsrnn.export", "version": 1, "leaves": {path: entry}}`, where `path` is the
  '/'-joined key path in the params tree and `entry` is
  `{"kind": "dense", "dtype": str, "shape": [...]}` or
  `{"kind": "bsc", "dtype": str, "shape": [in, out], "block_shape": [bh, bw]}`.
- dense leaf: `<path>`, the array itself.
- block-sparse leaf: `<path>:values` (nnzb, bh, bw); `<path>:row_indices` (nnzb,), the
  block-row index of each stored block, in the smallest unsigned integer dtype that holds
  ceil(in / bh) - 1; `<path>:col_ptr` (ceil(out / bw) + 1,), block column j owns stored
  blocks col_ptr[j]:col_ptr[j + 1], in the smallest unsigned dtype that holds nnzb.
- bfloat16 arrays are stored as their uint16 bit patterns (the JSON names the real dtype),
  because `.npz` has no bfloat16.

In memory, indices are int32 (what the kernels index with); only the file is compact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

_FORMAT = "bsrnn.export"
_VERSION = 1
_HEADER_KEY = "__bsrnn_export__"


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
    """

    values: jax.Array
    row_indices: jax.Array
    col_ptr: jax.Array
    shape: tuple[int, int] = dataclasses.field(metadata={"static": True})
    block_shape: tuple[int, int] = dataclasses.field(metadata={"static": True})

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


class SizeReport(NamedTuple):
    """Bytes of an exported tree as `save_npz` stores it, against the dense fp32 model.

    Attributes:
      stored_bytes: array payload bytes written by `save_npz` (values, indices, pointers
        and dense leaves; the JSON header and the npz container overhead excluded).
      dense_fp32_bytes: 4 bytes per parameter of the dense model (every kernel dense).
      ratio: stored_bytes / dense_fp32_bytes.
    """

    stored_bytes: int
    dense_fp32_bytes: int
    ratio: float


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


def block_col_ids(m: BlockSparseMatrix) -> jax.Array:
    """(nnzb,) int32 block-column index of each stored block (expands `col_ptr`; jittable)."""
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


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        key = str(key)
        if "/" in key or ":" in key:
            raise ValueError(f"param names may not contain '/' or ':', got {key!r}")
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def export_params(
    params: Mapping,
    masks: Mapping,
    block_shape: tuple[int, int] | Mapping[str, tuple[int, int]],
    *,
    dtype: Any = None,
    dense_dtype: Any = None,
) -> dict:
    """Exports a params tree: masked kernels become `BlockSparseMatrix`, the rest stays dense.

    Args:
      params: nested dict of arrays (Flax `params`).
      masks: nested dict of boolean masks with the same paths as the masked kernels.
      block_shape: (bh, bw) for every masked kernel, or a dict from '/'-joined path (as in
        `params`, e.g. "gru/recurrent/kernel") to its (bh, bw).
      dtype: dtype of the block values (e.g. jnp.float16); default: each kernel's dtype.
      dense_dtype: dtype for the floating-point leaves kept dense (biases, unmasked
        kernels); default: unchanged.

    Returns:
      Nested dict shaped like `params`, with numpy arrays and `BlockSparseMatrix` leaves.

    Raises:
      ValueError: for a mask path missing from `params`, a missing block shape, or any
        error of `from_dense`.
    """
    flat_params = _flatten(params)
    flat_masks = _flatten(masks)
    missing = sorted(set(flat_masks) - set(flat_params))
    if missing:
        raise ValueError(f"masks name paths that params lack: {missing}")
    out = {}
    for path, value in flat_params.items():
        if path not in flat_masks:
            value = np.asarray(value)
            if dense_dtype is not None and np.issubdtype(value.dtype, np.floating):
                value = value.astype(dense_dtype)
            out[path] = value
            continue
        if isinstance(block_shape, Mapping):
            if path not in block_shape:
                raise ValueError(f"no block shape given for masked kernel {path!r}")
            bs = block_shape[path]
        else:
            bs = block_shape
        try:
            out[path] = from_dense(value, flat_masks[path], bs, dtype=dtype)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return _unflatten(out)


def _smallest_uint(max_value: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _encode(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


def _decode(a: np.ndarray, dtype: str) -> np.ndarray:
    return a.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else a.astype(dtype, copy=False)


def _file_arrays(exported: Mapping) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    arrays: dict[str, np.ndarray] = {}
    leaves: dict[str, dict] = {}
    for path, leaf in _flatten(exported).items():
        if isinstance(leaf, BlockSparseMatrix):
            values = np.asarray(leaf.values)
            nbr, _ = leaf.grid_shape
            arrays[f"{path}:values"] = _encode(values)
            arrays[f"{path}:row_indices"] = np.asarray(leaf.row_indices).astype(
                _smallest_uint(max(nbr - 1, 0))
            )
            arrays[f"{path}:col_ptr"] = np.asarray(leaf.col_ptr).astype(_smallest_uint(leaf.nnzb))
            leaves[path] = {
                "kind": "bsc",
                "dtype": values.dtype.name,
                "shape": list(leaf.shape),
                "block_shape": list(leaf.block_shape),
            }
        else:
            leaf = np.asarray(leaf)
            arrays[path] = _encode(leaf)
            leaves[path] = {"kind": "dense", "dtype": leaf.dtype.name, "shape": list(leaf.shape)}
    return arrays, leaves


def save_npz(path: str | os.PathLike, exported: Mapping, *, compress: bool = False) -> None:
    """Writes an exported tree (from `export_params`) in the layout of the module docstring.

    Args:
      path: file name; numpy appends `.npz` if it lacks it.
      exported: nested dict of arrays and `BlockSparseMatrix`.
      compress: zip-deflate the arrays (`np.savez_compressed`).
    """
    arrays, leaves = _file_arrays(exported)
    header = json.dumps({"format": _FORMAT, "version": _VERSION, "leaves": leaves})
    save = np.savez_compressed if compress else np.savez
    save(path, **{_HEADER_KEY: np.array(header.encode())}, **arrays)


def load_npz(path: str | os.PathLike) -> dict:
    """Reads a file written by `save_npz` back into a nested dict (int32 indices in memory).

    Raises:
      ValueError: if the file is not a bsrnn export of a known version.
    """
    with np.load(path, allow_pickle=False) as f:
        if _HEADER_KEY not in f.files:
            raise ValueError(f"{path} is not a bsrnn export: no {_HEADER_KEY} entry")
        header = json.loads(f[_HEADER_KEY].item().decode())
        if header.get("format") != _FORMAT or header.get("version") != _VERSION:
            raise ValueError(
                f"{path}: unsupported export format {header.get('format')!r} "
                f"version {header.get('version')!r} (this reader knows version {_VERSION})"
            )
        out = {}
        for p, entry in header["leaves"].items():
            if entry["kind"] == "dense":
                out[p] = _decode(f[p], entry["dtype"])
            else:
                out[p] = BlockSparseMatrix(
                    values=_decode(f[f"{p}:values"], entry["dtype"]),
                    row_indices=f[f"{p}:row_indices"].astype(np.int32),
                    col_ptr=f[f"{p}:col_ptr"].astype(np.int32),
                    shape=tuple(entry["shape"]),
                    block_shape=tuple(entry["block_shape"]),
                )
    return _unflatten(out)


def size_report(exported: Mapping) -> SizeReport:
    """Bytes `save_npz` stores for `exported`, against the dense fp32 model.

    Args:
      exported: nested dict from `export_params` or `load_npz`.

    Returns:
      `SizeReport(stored_bytes, dense_fp32_bytes, ratio)`; dense_fp32_bytes counts 4 bytes
      for every entry of every kernel (pruned or not) and of every dense leaf.
    """
    arrays, _ = _file_arrays(exported)
    stored = sum(a.nbytes for a in arrays.values())
    dense = 0
    for leaf in _flatten(exported).values():
        shape = leaf.shape if isinstance(leaf, BlockSparseMatrix) else np.shape(leaf)
        dense += 4 * int(np.prod(shape))
    return SizeReport(stored, dense, stored / dense if dense else float("nan"))
