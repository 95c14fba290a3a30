"""Portable block-sparse product y = x @ K in plain XLA ops (any backend, jittable).

K is a `BlockSparseMatrix` (block-compressed sparse columns, see `bsrnn.export`). The
product is three steps, each a stock XLA op:

1. gather: xg[n, k, :] = x[n, row_indices[k]*bh : (row_indices[k]+1)*bh]  (N, nnzb, bh)
2. one small product per stored block: p[k, n, :] = xg[n, k, :] @ values[k]  (nnzb, N, bw)
3. sorted segment sum over each block column: y[:, j*bw:(j+1)*bw] = sum_{k in col j} p[k]

so the work and the bytes read scale with the number of stored blocks, not with in*out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bsrnn.export import BlockSparseMatrix, block_col_ids


def bsc_matmul_xla(x: jax.Array, w: BlockSparseMatrix) -> jax.Array:
    """y = x @ K with K block-sparse, in XLA ops.

    Args:
      x: (..., in_features) input.
      w: block-sparse K of shape (in_features, out_features).

    Returns:
      (..., out_features) in the promoted dtype of x and the block values; products are
      accumulated in float32 (or wider).
    """
    n_in, n_out = w.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the kernel expects {n_in}")
    (bh, bw), (nbr, nbc) = w.block_shape, w.grid_shape
    dtype = jnp.result_type(x.dtype, w.values.dtype)
    acc_dtype = jnp.promote_types(dtype, jnp.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in).astype(dtype)
    n = x2.shape[0]
    if w.nnzb == 0:
        return jnp.zeros((*lead, n_out), dtype)
    xb = jnp.pad(x2, ((0, 0), (0, nbr * bh - n_in))).reshape(n, nbr, bh)
    xg = jnp.take(xb, jnp.asarray(w.row_indices), axis=1, mode="clip")
    partial = jnp.einsum(
        "nkb,kbc->knc",
        xg,
        jnp.asarray(w.values).astype(dtype),
        preferred_element_type=acc_dtype,
        precision=jax.lax.Precision.HIGHEST,
    )
    y = jax.ops.segment_sum(
        partial, block_col_ids(w), num_segments=nbc, indices_are_sorted=True
    )  # (nbc, N, bw)
    y = y.transpose(1, 0, 2).reshape(n, nbc * bw)[:, :n_out]
    return y.astype(dtype).reshape(*lead, n_out)
