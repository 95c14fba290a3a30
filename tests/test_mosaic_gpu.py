"""The Mosaic GPU recurrence kernel (`bsrnn.kernels.mosaic_gpu`) against
`bsrnn.cells.RecurrentLayer` in float32 with the same params and masks (needs a Hopper GPU),
and its resource checks (anywhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsrnn import kernels
from bsrnn.kernels import mosaic_gpu
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
