"""Portable block-sparse product y = x @ K in plain XLA ops (any backend, jittable).

K is a `BlockSparseMatrix` (block-compressed sparse columns, see `bsrnn.kernels.bsc`). The
product is three steps, each a stock XLA op:

1. gather: xg[k, n, :] = x[n, row_indices[k]*bh : (row_indices[k]+1)*bh]  (nnzb, N, bh)
2. one small product per stored block: p[k, n, :] = xg[k, n, :] @ values[k]  (nnzb, N, bw)
3. sorted segment sum over each block column: y[:, j*bw:(j+1)*bw] = sum_{k in col j} p[k]

so the work and the bytes read scale with the number of stored blocks, not with in*out.

Step 2 has two forms (`product=`). "dot" is one batched `dot_general` over the blocks.
"fma" writes the bh-term contraction out as bh broadcast multiply-adds, which XLA fuses
with the gather into one vectorised loop. On XLA:CPU the batched product of many tiny
matrices is slow: there "fma" is 1.4-54x faster for blocks of up to 256 entries with N > 1
(WORKSPACE.md, "CPU: the XLA path's product"), and "auto" picks it there.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from bsrnn.kernels.bsc import BlockSparseMatrix, block_col_ids

Product = Literal["auto", "dot", "fma"]

# Largest block (bh * bw entries) for which "auto" uses "fma" on the CPU: beyond it the
# bh-term unrolled loop loses to the batched product (32x32 blocks: 0.7-0.8x of "dot").
FMA_MAX_BLOCK = 256


def auto_product(block_shape: tuple[int, int], n: int) -> Literal["dot", "fma"]:
    """The product form "auto" uses for blocks of ``block_shape`` and an input of ``n`` rows.

    "fma" when ``jax.default_backend()`` is the CPU, for blocks of at most `FMA_MAX_BLOCK`
    entries, except for a single row with blocks 8 or more wide (a matrix-vector product,
    where "dot" is faster); "dot" on other backends and other shapes.
    """
    bh, bw = block_shape
    if jax.default_backend() != "cpu" or bh * bw > FMA_MAX_BLOCK or (n == 1 and bw >= 8):
        return "dot"
    return "fma"


def bsc_matmul_xla(x: jax.Array, w: BlockSparseMatrix, product: Product = "auto",
                   precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST
                   ) -> jax.Array:
    """y = x @ K with K block-sparse, in XLA ops.

    Args:
      x: (..., in_features) input.
      w: block-sparse K of shape (in_features, out_features).
      product: how each stored block is multiplied: "dot" (a batched matrix product),
        "fma" (bh fused multiply-adds), or "auto" (`auto_product`).
      precision: of the "dot" product (as `bsrnn.kernels.pallas_gpu.bsc_matmul_pallas`'s):
        HIGHEST, or None for JAX's default matmul precision.

    Returns:
      (..., out_features) in the promoted dtype of x and the block values; products are
      accumulated in float32 (or wider).
    """
    n_in, n_out = w.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the kernel expects {n_in}")
    if product not in ("auto", "dot", "fma"):
        raise ValueError(f"product must be 'auto', 'dot' or 'fma', got {product!r}")
    (bh, bw), (nbr, nbc) = w.block_shape, w.grid_shape
    dtype = jnp.result_type(x.dtype, w.values.dtype)
    acc_dtype = jnp.promote_types(dtype, jnp.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in).astype(dtype)
    n = x2.shape[0]
    if w.nnzb == 0:
        return jnp.zeros((*lead, n_out), dtype)
    if product == "auto":
        product = auto_product(w.block_shape, n)
    xb = jnp.pad(x2, ((0, 0), (0, nbr * bh - n_in))).reshape(n, nbr, bh).transpose(1, 0, 2)
    xg = jnp.take(xb, jnp.asarray(w.row_indices), axis=0, mode="clip")  # (nnzb, N, bh)
    values = jnp.asarray(w.values).astype(dtype)  # (nnzb, bh, bw)
    if product == "dot":
        partial = jnp.einsum("knb,kbc->knc", xg, values, preferred_element_type=acc_dtype,
                             precision=precision)
    else:  # rows of the blocks b-major (nnzb, bw) each: `values_t` when precomputed
        rows = (jnp.swapaxes(values, 0, 1) if w.values_t is None
                else jnp.asarray(w.values_t).astype(dtype)).astype(acc_dtype)
        xg = xg.astype(acc_dtype)
        partial = xg[:, :, 0:1] * rows[0][:, None, :]
        for b in range(1, bh):
            partial = partial + xg[:, :, b : b + 1] * rows[b][:, None, :]
    y = jax.ops.segment_sum(
        partial, block_col_ids(w), num_segments=nbc, indices_are_sorted=True
    )  # (nbc, N, bw)
    y = y.transpose(1, 0, 2).reshape(n, nbc * bw)[:, :n_out]
    return y.astype(dtype).reshape(*lead, n_out)
