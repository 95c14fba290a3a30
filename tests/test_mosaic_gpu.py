"""The Mosaic GPU recurrence kernels (`bsrnn.kernels.mosaic_gpu`, the step kernel and the
persistent one) against `bsrnn.cells.RecurrentLayer` in float32 with the same params and masks
(needs a Hopper GPU); their host-side layouts, resource checks and lowering for CUDA
(anywhere)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsrnn import kernels
from bsrnn.kernels import mosaic_gpu
from bsrnn.kernels.bsc import to_dense
from tests.test_recurrence import _layer_case, _reference, _rel_err


def _weights(hidden, block_shape, dtype=jnp.float16, seed=0, batch=3, steps=5):
    params, masks, x, h0 = _layer_case(seed, hidden, block_shape, batch=batch, steps=steps)
    return params, masks, x, h0, kernels.sparse_gru_weights(params, masks, block_shape,
                                                            dtype=dtype)


_NO_GPU = (None if (reason := mosaic_gpu.unsupported(_weights(16, (16, 16))[-1], 3)) is None
           else f"Mosaic GPU recurrence kernel cannot run here: {reason}")
needs_hopper = pytest.mark.skipif(_NO_GPU is not None, reason=_NO_GPU or "")


def test_unsupported_names_what_is_missing():
    *_, w = _weights(20, (8, 8))
    reason = mosaic_gpu.unsupported(w, 3)
    if jax.default_backend() != "gpu":
        assert "GPU" in reason
    w32 = kernels.sparse_gru_weights(*_weights(20, (8, 8))[:2], (8, 8), dtype=jnp.float32)
    if _NO_GPU is None:
        assert "float16" in mosaic_gpu.unsupported(w32, 3)
        assert "batch" in mosaic_gpu.unsupported(w, 1000)
        assert "shared memory" in mosaic_gpu.unsupported(w, 256, stages=16)


def test_smem_bytes_grows_with_batch_and_stages():
    assert mosaic_gpu.smem_bytes(1) == mosaic_gpu.smem_bytes(16)  # both N = 16
    assert mosaic_gpu.smem_bytes(32) > mosaic_gpu.smem_bytes(16)
    assert mosaic_gpu.smem_bytes(8, stages=8) > mosaic_gpu.smem_bytes(8, stages=4)
    assert mosaic_gpu.batch_columns(1) == 16 and mosaic_gpu.batch_columns(33) == 64


@needs_hopper
@pytest.mark.parametrize("hidden, block_shape, batch, chunk", [
    (40, (16, 16), 3, 8),  # partial edge blocks (40 = 2.5 blocks) on both sides
    (20, (8, 8), 1, 2),  # blocks smaller than the 16x16 tiles, partial edges
    (72, (32, 32), 17, 4),  # blocks larger than the tiles; N = 32
    (50, (5, 10), 40, 1),  # odd non-square blocks; N = 64
])
def test_matches_recurrent_layer(hidden, block_shape, batch, chunk):
    params, masks, x, h0, w = _weights(hidden, block_shape, seed=hidden, batch=batch, steps=6)
    xp = kernels.gru_input_projection(jnp.asarray(x), w)
    # unroll 4 over 6 steps: one scan block of 4 launches and a tail of 2
    out = jax.jit(lambda xp, h: mosaic_gpu.gru_recurrence_mosaic(xp, w, h, chunk=chunk,
                                                                 unroll=4))(
        xp, jnp.asarray(h0, jnp.float16))
    ref, _ = _reference(params, masks, x, h0)
    assert out.shape == (6, batch, hidden) and out.dtype == jnp.float16
    assert _rel_err(np.swapaxes(np.asarray(out, np.float32), 0, 1), ref) < 5e-3


@needs_hopper
def test_shape_errors_are_clear():
    *_, w = _weights(20, (8, 8))
    with pytest.raises(ValueError, match="3·H"):
        mosaic_gpu.gru_recurrence_mosaic(jnp.zeros((2, 3, 50), jnp.float16), w,
                                         jnp.zeros((3, 20), jnp.float16))
    with pytest.raises(ValueError, match="h0"):
        mosaic_gpu.gru_recurrence_mosaic(jnp.zeros((2, 3, 60), jnp.float16), w,
                                         jnp.zeros((4, 20), jnp.float16))


def test_resident_panels_hold_each_programs_weights():
    """Rebuilds every gate's W_h from the persistent kernel's resident panels (program j's
    chunk c in rows 16·c.. of its buffer, the tile rows in `rows`) and compares it with the
    dense masked kernel: the whole host-side layout, partial edge blocks included."""
    hidden, block_shape, chunk = 40, (8, 8), 2
    *_, w = _weights(hidden, block_shape, dtype=jnp.float32)
    plan = mosaic_gpu._plan(w, chunk)
    panels, max_chunks = mosaic_gpu._resident_panels(plan)
    tile, nq = mosaic_gpu.TILE, plan.hq // mosaic_gpu.TILE
    counts = plan.ptr[3::3] - plan.ptr[:-1:3]
    assert max_chunks == counts.max() and panels.shape == (
        nq, tile * max_chunks + mosaic_gpu.ROWS - tile, tile * chunk)
    rebuilt = np.zeros((3, plan.hq, plan.hq))  # (gate, in, out)
    for j in range(nq):
        first = plan.ptr[3 * j]
        assert not panels[j, tile * counts[j]:].any()  # padding rows are zero
        for g in range(3):
            for q in range(plan.ptr[3 * j + g], plan.ptr[3 * j + g + 1]):
                rows = panels[j, tile * (q - first):tile * (q - first + 1)]  # (out, C·in)
                for c in range(chunk):
                    i = plan.rows[q * chunk + c]
                    rebuilt[g, tile * i:tile * (i + 1), tile * j:tile * (j + 1)] += \
                        rows[:, tile * c:tile * (c + 1)].T
    dense = np.asarray(to_dense(w.w_h))
    hp = dense.shape[1] // 3
    for g in range(3):
        np.testing.assert_allclose(rebuilt[g, :hidden, :hidden],
                                   dense[:hidden, g * hp:g * hp + hidden], rtol=1e-6)


def test_persistent_smem_bytes_counts_the_resident_panels():
    base = mosaic_gpu.persistent_smem_bytes(8, max_chunks=10)
    panel_rows = 4 * mosaic_gpu.TILE  # 4 more chunks of 16 rows
    assert mosaic_gpu.persistent_smem_bytes(8, max_chunks=14) - base == \
        panel_rows * mosaic_gpu.TILE * mosaic_gpu.CHUNK * 2
    assert mosaic_gpu.persistent_smem_bytes(64, 10) > base


@pytest.mark.skipif(mosaic_gpu.plgpu is None, reason="this jax has no Mosaic GPU")
@pytest.mark.parametrize("kernel", ["step", "persistent", "persistent_nolimit"])
def test_kernels_lower_for_cuda(kernel, monkeypatch):
    """Both kernels lower for CUDA (Mosaic GPU's Python passes, layout inference included)
    on any machine: the check that caught the step kernel's unprovable TMA offsets without
    a GPU. (The persistent kernel's host callback cannot lower for another platform.)"""
    monkeypatch.setattr(jax.debug, "callback", lambda *a, **k: None)
    params, masks, x, h0, w = _weights(40, (16, 16), batch=3, steps=6)
    xp = kernels.gru_input_projection(jnp.asarray(x), w)
    run = {"step": mosaic_gpu.gru_recurrence_mosaic,
           "persistent": mosaic_gpu.gru_persistent_mosaic,
           "persistent_nolimit": functools.partial(mosaic_gpu.gru_persistent_mosaic,
                                                   spin_limit=None)}[kernel]
    lowered = jax.jit(lambda xp, h: run(xp, w, h, interpret=False)).trace(
        xp, jnp.asarray(h0, jnp.float16)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@needs_hopper
@pytest.mark.parametrize("hidden, block_shape, batch, chunk", [
    (40, (16, 16), 3, 8),
    (20, (8, 8), 1, 2),
    (72, (32, 32), 17, 4),
    (50, (5, 10), 40, 1),
])
def test_persistent_matches_recurrent_layer(hidden, block_shape, batch, chunk):
    params, masks, x, h0, w = _weights(hidden, block_shape, seed=hidden + 1, batch=batch,
                                       steps=9)
    xp = kernels.gru_input_projection(jnp.asarray(x), w)
    out = jax.jit(lambda xp, h: mosaic_gpu.gru_persistent_mosaic(xp, w, h, chunk=chunk))(
        xp, jnp.asarray(h0, jnp.float16))
    ref, _ = _reference(params, masks, x, h0)
    assert out.shape == (9, batch, hidden) and out.dtype == jnp.float16
    assert _rel_err(np.swapaxes(np.asarray(out, np.float32), 0, 1), ref) < 5e-3


@needs_hopper
def test_persistent_wait_that_gives_up_raises():
    """spin_limit=0: every wait gives up at once (a forced barrier failure)."""
    params, masks, x, h0, w = _weights(40, (16, 16), batch=3, steps=4)
    xp = kernels.gru_input_projection(jnp.asarray(x), w)
    with pytest.raises(Exception, match="gave up"):
        out = jax.jit(lambda xp, h: mosaic_gpu.gru_persistent_mosaic(xp, w, h, spin_limit=0))(
            xp, jnp.asarray(h0, jnp.float16))
        np.asarray(out)


@needs_hopper
def test_persistent_through_the_public_api_with_lengths_and_reverse():
    params, masks, x, h0 = _layer_case(5, 48, (16, 16), batch=4, steps=7)
    w = kernels.sparse_gru_weights(params, masks, (16, 16), dtype=jnp.float16)
    lengths = jnp.asarray([7, 3, 0, 5])
    got, _ = kernels.sparse_gru(jnp.asarray(x), w, jnp.asarray(h0, jnp.float16),
                                lengths=lengths, reverse=True, impl="mosaic_persistent")
    want, _ = kernels.sparse_gru(jnp.asarray(x), w, jnp.asarray(h0, jnp.float16),
                                 lengths=lengths, reverse=True, impl="dense")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=5e-3)
