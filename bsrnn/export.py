"""Export of a trained model to one self-contained `.npz` file, and its file layout.

Pruned kernels become `bsrnn.kernels.bsc.BlockSparseMatrix` (block-compressed sparse columns;
that module says why columns); everything else stays dense. `export_run` writes what
`bsrnn.inference.load` needs to rebuild and run the model without the workdir: every run
ends with it (`<workdir>/model.npz`), and for an existing workdir (its newest checkpoint)::

    python -m bsrnn.export --workdir=W [--dtype=float16|bfloat16] [--out=F]

File layout (`save_npz` / `load_npz`), one flat `np.savez` archive, no pickles:

- `__bsrnn_export__`: 0-d bytes array holding UTF-8 JSON
  `{"format": "bsrnn.export", "version": 2, "leaves": {path: entry}, "model": info}`, where
  `path` is the '/'-joined key path in the params tree and `entry` is
  `{"kind": "dense", "dtype": str, "shape": [...]}` or
  `{"kind": "bsc", "dtype": str, "shape": [in, out], "block_shape": [bh, bw]}`. `info`
  (optional; `export_run` writes it, see `model_info`) says how to rebuild the model:
  `{"name": "lm" | "ds2", "kwargs": {...}, "vocab": {"tokens": [...], "unk": str | null},
  "data": str, "step": int, "metrics": {...}}` plus `"unit": "char" | "word"` for language
  models and `"features": {"kind": "mfc" | "log_mel", "num_mels": int, "mean": [...],
  "std": [...]}` (the training set's normalisation) for speech models. Version 1 files (no
  `info`) still load.
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
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from bsrnn.kernels.bsc import BlockSparseMatrix, from_dense

_FORMAT = "bsrnn.export"
_VERSION = 2
_READABLE = (1, 2)
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


def save_npz(
    path: str | os.PathLike, exported: Mapping, *, model: Mapping | None = None,
    compress: bool = False,
) -> None:
    """Writes an exported tree (from `export_params`) in the layout of the module docstring.

    Args:
      path: file name; numpy appends `.npz` if it lacks it.
      exported: nested dict of arrays and `BlockSparseMatrix`.
      model: the header's `model` entry (`model_info`), or None for weights only.
      compress: zip-deflate the arrays (`np.savez_compressed`).
    """
    arrays, leaves = _file_arrays(exported)
    header = {"format": _FORMAT, "version": _VERSION, "leaves": leaves}
    if model is not None:
        header["model"] = dict(model)
    save = np.savez_compressed if compress else np.savez
    save(path, **{_HEADER_KEY: np.array(json.dumps(header).encode())}, **arrays)


class ExportFile(NamedTuple):
    """What `load_file` reads.

    Attributes:
      params: nested dict of numpy arrays and `BlockSparseMatrix` (int32 indices).
      model: the header's `model` entry (see the module docstring), or None if the file has
        weights only (version 1, or `save_npz` without `model`).
      version: the file's format version.
    """

    params: dict
    model: dict | None
    version: int


def _unreadable(path: Any, what: str) -> ValueError:
    return ValueError(
        f"{path} is not a readable bsrnn export: {what}. Expected an .npz file written by "
        "bsrnn.export (a run's <workdir>/model.npz); if it was copied or downloaded, copy it "
        "again, or write it anew with `python -m bsrnn.export --workdir=<the run's workdir>`."
    )


def load_file(path: str | os.PathLike) -> ExportFile:
    """Reads a file written by `save_npz`: the params and the model description.

    Raises:
      ValueError: naming the file, if it is missing pieces, truncated, not an `.npz` archive
        (a text file, a `.npy` array, an empty file), not a bsrnn export, or of a format
        version this reader does not know.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; pass the path of an exported model "
                                "(a run writes <workdir>/model.npz).")
    try:
        f = np.load(path, allow_pickle=False)
    except EOFError:
        raise _unreadable(path, "the file is empty") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise _unreadable(path, f"not a complete zip archive, truncated or another format "
                                f"({type(e).__name__}: {e})") from None
    except ValueError:
        raise _unreadable(path, "neither an .npz archive nor a .npy array (a text file?)"
                          ) from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise _unreadable(path, f"a single .npy array of shape {np.shape(f)}, not an .npz "
                                "archive")
    with f:
        if _HEADER_KEY not in f.files:
            raise ValueError(f"{path} is not a bsrnn export: no {_HEADER_KEY} entry (an .npz "
                             "archive written by something else)")
        try:
            header = json.loads(f[_HEADER_KEY].item().decode())
        except (ValueError, AttributeError, zipfile.BadZipFile, OSError) as e:
            raise _unreadable(path, f"its {_HEADER_KEY} header is damaged ({e})") from None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a bsrnn export: its header names format "
                             f"{header.get('format') if isinstance(header, dict) else header!r}")
        version = header.get("version")
        if version not in _READABLE:
            raise ValueError(
                f"{path}: bsrnn export format version {version!r}; this build of bsrnn reads "
                f"versions {list(_READABLE)}. A newer bsrnn wrote it: upgrade bsrnn, or export "
                "the run again with this one (python -m bsrnn.export --workdir=...)."
            )
        out = {}
        try:
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
        except KeyError as e:
            raise _unreadable(path, f"the header lists {e} but the archive lacks it") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise _unreadable(path, f"an array is damaged ({type(e).__name__}: {e})") from None
    return ExportFile(_unflatten(out), header.get("model"), version)


def load_npz(path: str | os.PathLike) -> dict:
    """The params of a file written by `save_npz` (int32 indices in memory); see `load_file`
    for the model description and the errors."""
    return load_file(path).params


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


_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
           "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def dtype_named(dtype: Any) -> Any:
    """A dtype given by name ("float32", "float16", "bfloat16") or as a dtype; ``None``
    stays ``None``. An unknown name raises ``ValueError`` listing the names."""
    if not isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


def export_block_shapes(config: Any, masks: Mapping) -> dict[str, tuple[int, int]]:
    """The block shape of each kernel `export_run` stores block-sparse, by '/'-joined path.

    A masked kernel is stored block-sparse when its mask prunes something and the run's
    method says its block shape: `config.prune.block_shape[type]` for the types the method
    prunes (1x1 for `wp`), P3's (rows/G, cols/G) modules for `structural` recurrent kernels.
    Every other kernel is stored dense (with its mask applied).

    Args:
      config: the run's config (`method`, `prune`, `structure`).
      masks: the run's `masks` collection.
    """
    from bsrnn import methods, pruning  # the trainer's modules; export itself needs neither

    pruned = tuple(config.prune.layer_types) if methods.prunes(config) else ()
    modules = methods.recurrent_modules(config)
    shapes = {}
    for path, mask in _flatten(masks).items():
        mask = np.asarray(mask, bool)
        if mask.all():
            continue
        kind = pruning.default_layer_type(tuple(path.split("/")), mask)
        if kind in pruned:
            shapes[path] = tuple(int(b) for b in methods.block_shape(config, kind))
        elif kind == "recurrent" and modules > 1:
            shapes[path] = (mask.shape[0] // modules, mask.shape[1] // modules)
    return shapes


def model_info(config: Any, dataset: Any, *, step: int,
               metrics: Mapping[str, Mapping[str, float]] | None = None) -> dict:
    """The header's `model` entry (module docstring) for a run of `config` on `dataset`.

    Args:
      config: the run's config.
      dataset: its `bsrnn.data.Data` (the vocabulary comes from it; a speech
        corpus's normalisation is recomputed from its training files).
      step: the training step of the weights.
      metrics: the run's final metrics, recorded for reference.
    """
    from bsrnn import data, methods, models

    name = config.model_name
    size = models.model_module(name).NUM_CLASSES_FIELD
    kwargs = json.loads(config.model.to_json_best_effort())
    kwargs.update({size: int(dataset.num_classes),
                   "recurrent_modules": methods.recurrent_modules(config)})
    info: dict[str, Any] = {"name": name, "kwargs": kwargs, "data": config.data.name,
                            "step": int(step), "metrics": dict(metrics or {})}
    if isinstance(dataset, data.TextData):
        vocab = dataset.corpus.vocab
        info["unit"] = dataset.unit
    else:
        vocab = dataset.vocab
        raw = data.SPEECH_LOADERS[config.data.name](config.data.path)
        stats = data.feature_stats([u.features for u in raw.train])
        width = int(stats.mean.shape[0])
        kind = "mfc" if config.data.name == "an4" else "log_mel"
        info["features"] = {"kind": kind, "num_mels": width, "mean": stats.mean.tolist(),
                            "std": stats.std.tolist()}
    info["vocab"] = {"tokens": list(vocab.tokens), "unk": vocab.unk}
    return info


def export_run(
    path: str | os.PathLike, config: Any, params: Mapping, masks: Mapping, dataset: Any, *,
    step: int, metrics: Mapping[str, Mapping[str, float]] | None = None, dtype: Any = None,
) -> SizeReport:
    """Writes a run's model to `path`: pruned kernels block-sparse (`export_block_shapes`),
    every other leaf dense with its mask applied, and the `model_info` header.

    Args:
      path: the `.npz` file to write.
      config, dataset, step, metrics: as in `model_info`.
      params, masks: the trained params and `masks` collection (host or device arrays).
      dtype: dtype of every floating-point array in the file (e.g. "float16",
        "bfloat16"); default: unchanged (float32).

    Returns:
      The `size_report` of what was written.
    """
    from bsrnn import report

    dtype = dtype_named(dtype)
    params, masks = (jax_to_numpy(t) for t in (params, masks))
    shapes = export_block_shapes(config, masks)
    flat_masks = _flatten(masks)
    sparse_masks = _unflatten({p: flat_masks[p] for p in shapes})
    effective = report.effective_params(params, masks)  # dense leaves carry their masks
    exported = export_params(effective, sparse_masks, shapes, dtype=dtype, dense_dtype=dtype)
    save_npz(path, exported, model=model_info(config, dataset, step=step, metrics=metrics))
    return size_report(exported)


def jax_to_numpy(tree: Any) -> Any:
    """A nested dict of (device) arrays as plain nested dicts of numpy arrays."""
    if isinstance(tree, Mapping):
        return {str(k): jax_to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def restore_newest(workdir: str | os.PathLike) -> tuple[int, dict, dict]:
    """The newest checkpoint of a run: (step, params, masks) as numpy trees.

    Raises:
      FileNotFoundError: if the workdir holds no checkpoint.
    """
    import orbax.checkpoint as ocp

    folder = os.path.join(os.path.abspath(workdir), "checkpoints")
    manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(create=False)
                                    ) if os.path.isdir(folder) else None
    step = manager.latest_step() if manager is not None else None
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no checkpoint ({folder} is missing or empty); "
                                "pass the --workdir of a run that has saved one.")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = restored.state
    return step, jax_to_numpy(state["params"]), jax_to_numpy(state["masks"])


def main(argv: list[str] | None = None) -> None:
    """`python -m bsrnn.export --workdir=W [--dtype=...] [--out=F]` (module docstring)."""
    import argparse
    import pathlib

    import ml_collections

    from bsrnn import data

    parser = argparse.ArgumentParser(prog="python -m bsrnn.export", description=(
        "Export the newest checkpoint of a run to one self-contained .npz file that "
        "python -m bsrnn.inference reads."))
    parser.add_argument("--workdir", required=True, help="the run's --workdir")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        default="float32", help="dtype of the stored weights")
    parser.add_argument("--out", help="file to write (default <workdir>/model.npz)")
    args = parser.parse_args(argv)
    workdir = pathlib.Path(args.workdir)
    config_file = workdir / "config.json"
    if not config_file.is_file():
        parser.error(f"{config_file} is missing: --workdir must be a run's workdir.")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    try:
        step, params, masks = restore_newest(workdir)
    except FileNotFoundError as e:
        parser.error(str(e))
    report_file = workdir / "report.json"
    metrics = {}
    if report_file.is_file():
        run_report = json.loads(report_file.read_text())
        metrics = run_report["metrics"] if run_report.get("steps") == step else {}
    out = pathlib.Path(args.out) if args.out else workdir / "model.npz"
    dtype = None if args.dtype == "float32" else args.dtype
    sizes = export_run(out, config, params, masks, data.load(config), step=step,
                       metrics=metrics, dtype=dtype)
    print(f"wrote {out}: step {step}, {os.path.getsize(out):,} bytes; the dense fp32 weights "
          f"take {sizes.dense_fp32_bytes:,} ({sizes.dense_fp32_bytes / os.path.getsize(out):.1f}x "
          "as much)")


if __name__ == "__main__":
    main()
