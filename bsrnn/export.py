"""Export of pruned weights to a compact block-sparse form, and its `.npz` file layout.

Masked kernels become `bsrnn.kernels.bsc.BlockSparseMatrix` (block-compressed sparse columns;
that module says why columns); everything else stays dense.

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

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from bsrnn.kernels.bsc import BlockSparseMatrix, from_dense

_FORMAT = "bsrnn.export"
_VERSION = 1
_HEADER_KEY = "__bsrnn_export__"


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
