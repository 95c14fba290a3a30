"""Tests of bsrnn.export: BSC layout, round trips, errors, file layout and size."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from bsrnn import export
from bsrnn.kernels import bsc


def _block_mask(rng, shape, block_shape, density):
    """Random block-structured mask: kron of a random block grid, cropped to `shape`."""
    bh, bw = block_shape
    grid = (-(-shape[0] // bh), -(-shape[1] // bw))
    keep = rng.random(grid) < density
    return np.kron(keep, np.ones(block_shape, bool))[: shape[0], : shape[1]], keep


def test_bsc_layout_matches_hand_computed_example():
    # 3x5 kernel, 2x2 blocks: block grid 2x3 with partial last row and column.
    k = np.arange(1, 16, dtype=np.float32).reshape(3, 5)
    keep = np.array([[1, 0, 1], [1, 1, 0]], bool)
    mask = np.kron(keep, np.ones((2, 2), bool))[:3, :5]
    m = bsc.from_dense(k, mask, (2, 2))
    # Column 0 holds block rows 0 and 1, column 1 block row 1, column 2 block row 0.
    np.testing.assert_array_equal(m.row_indices, [0, 1, 1, 0])
    np.testing.assert_array_equal(m.col_ptr, [0, 2, 3, 4])
    np.testing.assert_array_equal(m.values[0], [[1, 2], [6, 7]])
    np.testing.assert_array_equal(m.values[1], [[11, 12], [0, 0]])  # padded edge row
    np.testing.assert_array_equal(m.values[2], [[13, 14], [0, 0]])
    np.testing.assert_array_equal(m.values[3], [[5, 0], [10, 0]])  # padded edge column
    assert m.shape == (3, 5) and m.block_shape == (2, 2) and m.grid_shape == (2, 3)
    assert m.density == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    "shape, block_shape",
    [
        ((37, 45), (4, 4)),
        ((50, 30), (12, 2)),
        ((33, 70), (16, 16)),
        ((20, 19), (1, 1)),
        ((64, 96), (32, 32)),
        ((23, 17), (3, 5)),
    ],
)
def test_round_trip_equals_masked_kernel(shape, block_shape):
    rng = np.random.default_rng(hash((shape, block_shape)) % 2**32)
    k = rng.standard_normal(shape).astype(np.float32)
    mask, keep = _block_mask(rng, shape, block_shape, 0.3)
    m = bsc.from_dense(k, mask, block_shape)
    assert m.nnzb == keep.sum()
    np.testing.assert_array_equal(np.asarray(bsc.to_dense(m)), k * mask)
    np.testing.assert_array_equal(np.asarray(jax.jit(bsc.to_dense)(m)), k * mask)


def test_value_dtype_and_pytree():
    rng = np.random.default_rng(1)
    k = rng.standard_normal((40, 24)).astype(np.float32)
    mask, _ = _block_mask(rng, k.shape, (8, 8), 0.5)
    m = bsc.from_dense(k, mask, (8, 8), dtype=jnp.bfloat16)
    assert m.values.dtype == jnp.bfloat16 and m.row_indices.dtype == np.int32
    leaves, treedef = jax.tree_util.tree_flatten(m)
    assert len(leaves) == 3
    m2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert m2.shape == (40, 24) and m2.block_shape == (8, 8)
    dense = np.asarray(bsc.to_dense(m).astype(jnp.float32))
    np.testing.assert_allclose(dense, k * mask, rtol=1e-2, atol=1e-2)


def test_errors():
    k = np.ones((8, 8), np.float32)
    mask = np.kron(np.eye(2, dtype=bool), np.ones((4, 4), bool))
    bsc.from_dense(k, mask, (4, 4))  # block-structured: fine.
    broken = mask.copy()
    broken[0, 0] = False
    with pytest.raises(ValueError, match=r"not block-structured.*block \(0, 0\)"):
        bsc.from_dense(k, broken, (4, 4))
    with pytest.raises(ValueError, match="not block-structured"):
        bsc.from_dense(k, mask, (8, 8))
    with pytest.raises(ValueError, match="does not match kernel shape"):
        bsc.from_dense(k, mask[:, :7], (4, 4))
    with pytest.raises(ValueError, match="boolean"):
        bsc.from_dense(k, mask.astype(np.float32), (4, 4))
    with pytest.raises(ValueError, match="2-D"):
        bsc.from_dense(np.ones(8), np.ones(8, bool), (4, 4))
    with pytest.raises(ValueError, match="positive"):
        bsc.from_dense(k, mask, (0, 4))


def _model(rng, block_shape=(4, 4), density=0.1):
    params = {
        "rnn": {
            "input": {
                "kernel": rng.standard_normal((256, 768)).astype(np.float32),
                "bias": rng.standard_normal(768).astype(np.float32),
            },
            "recurrent": {"kernel": rng.standard_normal((768, 768)).astype(np.float32)},
        },
        "head": {"kernel": rng.standard_normal((768, 10)).astype(np.float32)},
    }
    masks = {"rnn": {"input": {"kernel": None}, "recurrent": {"kernel": None}}}
    for name in ("input", "recurrent"):
        k = params["rnn"][name]["kernel"]
        grid = (k.shape[0] // block_shape[0], k.shape[1] // block_shape[1])
        keep = np.zeros(grid[0] * grid[1], bool)
        keep[rng.permutation(keep.size)[: round(density * keep.size)]] = True
        masks["rnn"][name]["kernel"] = np.kron(keep.reshape(grid), np.ones(block_shape, bool))
    return params, masks


@pytest.mark.parametrize(
    "dtype, max_ratio", [(None, 0.12), (jnp.float16, 0.06), (jnp.bfloat16, 0.06)]
)
def test_export_save_load_and_size(tmp_path, dtype, max_ratio):
    rng = np.random.default_rng(2)
    params, masks = _model(rng)
    exported = export.export_params(params, masks, (4, 4), dtype=dtype, dense_dtype=dtype)
    path = os.path.join(tmp_path, "model.npz")
    export.save_npz(path, exported)
    loaded = export.load_npz(path)

    want_dtype = np.float32 if dtype is None else np.dtype(dtype)
    for name in ("input", "recurrent"):
        m = loaded["rnn"][name]["kernel"]
        assert isinstance(m, bsc.BlockSparseMatrix)
        assert m.values.dtype == want_dtype and m.row_indices.dtype == np.int32
        ref = (params["rnn"][name]["kernel"] * masks["rnn"][name]["kernel"]).astype(want_dtype)
        np.testing.assert_array_equal(np.asarray(bsc.to_dense(m)), ref)
    np.testing.assert_array_equal(
        loaded["rnn"]["input"]["bias"], params["rnn"]["input"]["bias"].astype(want_dtype)
    )
    np.testing.assert_array_equal(
        loaded["head"]["kernel"], params["head"]["kernel"].astype(want_dtype)
    )

    n_params = 256 * 768 + 768 + 768 * 768 + 768 * 10
    report = export.size_report(loaded)
    assert report.dense_fp32_bytes == 4 * n_params
    file_bytes = os.path.getsize(path)
    # npz overhead: a zip entry and a 128-byte npy header per array, and the JSON header.
    assert report.stored_bytes <= file_bytes < report.stored_bytes + 8192
    assert file_bytes <= max_ratio * report.dense_fp32_bytes, (file_bytes, report)
    with np.load(path) as f:  # compact index dtypes on disk
        assert f["rnn/recurrent/kernel:row_indices"].dtype == np.uint8  # 192 block rows
        assert f["rnn/recurrent/kernel:col_ptr"].dtype == np.uint16  # 3686 blocks
        if dtype == jnp.bfloat16:
            assert f["rnn/recurrent/kernel:values"].dtype == np.uint16


def test_export_params_block_shape_per_path_and_errors():
    rng = np.random.default_rng(3)
    params, masks = _model(rng)
    shapes = {"rnn/input/kernel": (4, 4), "rnn/recurrent/kernel": (2, 4)}  # 4x4 masks are 2x4
    exported = export.export_params(params, masks, shapes)
    assert exported["rnn"]["recurrent"]["kernel"].block_shape == (2, 4)
    with pytest.raises(ValueError, match="no block shape"):
        export.export_params(params, masks, {"rnn/input/kernel": (4, 4)})
    with pytest.raises(ValueError, match="rnn/input/kernel: .*not block-structured"):
        export.export_params(params, masks, (8, 8))
    with pytest.raises(ValueError, match="lack"):
        export.export_params(params, {"nope": {"kernel": np.ones((2, 2), bool)}}, (1, 1))


def test_load_rejects_other_npz(tmp_path):
    path = os.path.join(tmp_path, "other.npz")
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a bsrnn export"):
        export.load_npz(path)


def test_bfloat16_survives_file(tmp_path):
    k = np.linspace(-3, 3, 64, dtype=np.float32).reshape(8, 8)
    m = bsc.from_dense(k, np.ones((8, 8), bool), (4, 4), dtype=ml_dtypes.bfloat16)
    path = os.path.join(tmp_path, "m.npz")
    export.save_npz(path, {"w": m, "b": k[0].astype(ml_dtypes.bfloat16)})
    loaded = export.load_npz(path)
    assert loaded["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded["b"], k[0].astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(
        np.asarray(bsc.to_dense(loaded["w"])), k.astype(ml_dtypes.bfloat16)
    )


def test_version_1_files_still_load_and_unknown_versions_are_refused(tmp_path):
    k = np.arange(16, dtype=np.float32).reshape(4, 4)
    path = os.path.join(tmp_path, "v2.npz")
    export.save_npz(path, {"w": k})
    with np.load(path) as f:
        arrays = {name: f[name] for name in f.files}
    header = json.loads(arrays["__bsrnn_export__"].item())
    for version, name in ((1, "v1.npz"), (3, "v3.npz")):
        header["version"] = version
        arrays["__bsrnn_export__"] = np.array(json.dumps(header).encode())
        np.savez(os.path.join(tmp_path, name), **arrays)
    loaded = export.load_file(os.path.join(tmp_path, "v1.npz"))
    assert loaded.version == 1 and loaded.model is None
    np.testing.assert_array_equal(loaded.params["w"], k)
    with pytest.raises(ValueError, match=r"v3.npz: bsrnn export format version 3"):
        export.load_npz(os.path.join(tmp_path, "v3.npz"))


def test_export_command_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export.main([f"--workdir={tmp_path}"])
    assert "config.json is missing" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        export.main([f"--workdir={tmp_path}"])
    assert "holds no checkpoint" in capsys.readouterr().err
