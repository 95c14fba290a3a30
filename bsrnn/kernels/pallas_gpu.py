"""Block-sparse product y = x @ K as a Pallas kernel for GPUs (Triton backend).

One program per (block column j, tile of TM rows of x). Block column j's stored blocks
are contiguous in `values` (BSC order), so viewed as a 2-D array of shape (nnzb*bh, bw)
they form a panel of rows col_ptr[j]*bh : col_ptr[j+1]*bh whose panel row r multiplies
input feature row_indices[r // bh]*bh + r % bh. The program walks its panel R rows at a
time: it gathers the matching (TM, R) slice of x, loads the (R, bw) slice of the panel,
accumulates in float32, and finally writes its (TM, bw) output tile. No atomics, no
second pass, and the weight bytes read are those of the stored blocks only.

Two ways to accumulate:

- "fma": elementwise products into a (TM, R, bw) float32 accumulator, summed over R once
  after the loop. No tensor-core layout shuffles, no padding of N or bw; best when each
  program has little work (N of 1 to a few).
- "dot": a tensor-core dot per step, with the tile of x padded to >= 16 rows and the
  panel slice to >= 16 columns (masked loads, so no extra bytes move).

`transpose_x=True` gathers from x^T (in, N) instead of x (N, in): each panel row then reads
N contiguous values of x instead of N values one row apart, at the price of one XLA
transpose before the kernel.

Defaults, from the H100 sweep in WORKSPACE.md (fp16 and fp32, RNN 1760 and
GRU 2560 at 90/95% block sparsity): "fma" for N <= 4 (and N <= 8 in float32, where the
exact-fp32 dot is slow), else "dot" with 64 panel rows per step up to N = 16 and 128
beyond; for N > 16, gathering from x^T unless bw >= 32.

Triton needs power-of-two tile sides, so any bh (12 for 12x2 blocks) is handled through
the flat panel rows, and bw through masked loads into a power-of-two tile. Runs on the
CPU with `interpret=True` (slow; for tests).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bsrnn.kernels.bsc import BlockSparseMatrix

_FMA_MAX_N = 8
_FMA_ACC_ELEMENTS = 8192  # TM * R * bw_pad of the "fma" accumulator


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def launch_config(n: int, bw: int, dtype, compute: str | None, rows_per_step: int | None,
                  max_tm: int) -> tuple[str, int, int, int]:
    """(compute, tm, bw_pad, rows_per_step) for n rows of x (or batch rows of h) and blocks
    bw wide: the launch defaults of every kernel here and in `recurrence_pallas`.

    "fma" for n <= 4 (n <= 8 for 32-bit operands), with the most panel rows per step that
    keep `_FMA_ACC_ELEMENTS` accumulator entries (<= 256); else "dot" with tiles of
    16..max_tm rows and 64 panel rows per step up to n = 16, 128 beyond.
    """
    if compute is None:
        wide = jnp.dtype(dtype).itemsize >= 4
        compute = "fma" if n <= 4 or (wide and n <= _FMA_MAX_N) else "dot"
    if compute == "fma":
        if n > _FMA_MAX_N:
            raise ValueError(f'compute="fma" takes N <= {_FMA_MAX_N} rows, got {n}')
        tm, bw_pad = next_pow2(n), next_pow2(bw)
        rows = rows_per_step or min(256, max(1, _FMA_ACC_ELEMENTS // (tm * bw_pad)))
    elif compute == "dot":
        tm, bw_pad = min(max(16, next_pow2(n)), max_tm), max(16, next_pow2(bw))
        rows = rows_per_step or (64 if n <= 16 else 128)
    else:
        raise ValueError(f'compute must be "fma" or "dot", got {compute!r}')
    if rows & (rows - 1):
        raise ValueError(f"rows_per_step must be a power of two, got {rows}")
    return compute, tm, bw_pad, rows


def acc_init(compute: str, tm: int, rows_per_step: int, bw_pad: int) -> jax.Array:
    """The float32 accumulator of `accumulate`: (tm, R, bw_pad) for "fma", else (tm, bw_pad)."""
    shape = (tm, rows_per_step, bw_pad) if compute == "fma" else (tm, bw_pad)
    return jnp.zeros(shape, jnp.float32)


def accumulate(acc: jax.Array, xg: jax.Array, wv: jax.Array, compute: str,
               precision) -> jax.Array:
    """acc + xg (tm, R) @ wv (R, bw_pad): elementwise products ("fma", summed over R by
    `acc_result`) or a tensor-core dot, accumulated in float32."""
    if compute == "fma":
        return acc + xg.astype(jnp.float32)[:, :, None] * wv.astype(jnp.float32)[None]
    return acc + jnp.dot(xg, wv, preferred_element_type=jnp.float32, precision=precision)


def acc_result(acc: jax.Array, compute: str) -> jax.Array:
    """The (tm, bw_pad) product from an `accumulate` accumulator."""
    return acc.sum(axis=1) if compute == "fma" else acc


def column_walk(start, stop, row_idx_ref, panel_ref, gather, *, bh: int, bw: int,
                bw_pad: int, n_in: int, tm: int, rows_per_step: int, compute: str, dtype,
                precision) -> jax.Array:
    """The block-column walk, the one loop of every BSC kernel: float32 (tm, bw_pad) sum of
    the panel rows start .. stop - 1 (flat rows of the (nnzb·bh, bw) panel of one block
    column), each times the input feature it multiplies.

    Args:
      start, stop: the column's first and one-past-last panel rows (col_ptr · bh).
      row_idx_ref, panel_ref: block-row indices (nnzb,) and the (nnzb·bh, bw) panel.
      gather: (features (R,), valid (R,)) -> the (tm, R) slice of the input at those
        features (zero where not valid), in any dtype.
      bh, bw, bw_pad, n_in, tm, rows_per_step, compute, dtype, precision: the launch.
    """
    c = jnp.arange(bw_pad, dtype=jnp.int32)
    c_ok = c < bw

    def step(i, acc):
        r = start + i * rows_per_step + jnp.arange(rows_per_step, dtype=jnp.int32)
        r_ok = r < stop
        block_row = plgpu.load(row_idx_ref.at[r // bh], mask=r_ok, other=0)
        feat = block_row * bh + r % bh
        xg = gather(feat, r_ok & (feat < n_in)).astype(dtype)
        wv = plgpu.load(panel_ref.at[r[:, None], c[None, :]],
                        mask=r_ok[:, None] & c_ok[None, :], other=0).astype(dtype)
        return accumulate(acc, xg, wv, compute, precision)

    n_steps = (stop - start + rows_per_step - 1) // rows_per_step
    acc = jax.lax.fori_loop(0, n_steps, step, acc_init(compute, tm, rows_per_step, bw_pad))
    return acc_result(acc, compute)


def _kernel(
    col_ptr_ref,
    row_idx_ref,
    panel_ref,
    x_ref,
    o_ref,
    *,
    n: int,
    n_in: int,
    n_out: int,
    bh: int,
    bw: int,
    bw_pad: int,
    tm: int,
    rows_per_step: int,
    compute: str,
    x_transposed: bool,
    precision,
):
    j = pl.program_id(0)
    m = pl.program_id(1) * tm + jnp.arange(tm, dtype=jnp.int32)
    c = jnp.arange(bw_pad, dtype=jnp.int32)
    m_ok = m < n
    c_ok = c < bw

    def gather(feat, ok):
        if x_transposed:
            x_at = x_ref.at[feat[None, :], m[:, None]]
        else:
            x_at = x_ref.at[m[:, None], feat[None, :]]
        return plgpu.load(x_at, mask=m_ok[:, None] & ok[None, :], other=0)

    acc = column_walk(col_ptr_ref[j] * bh, col_ptr_ref[j + 1] * bh, row_idx_ref, panel_ref,
                      gather, bh=bh, bw=bw, bw_pad=bw_pad, n_in=n_in, tm=tm,
                      rows_per_step=rows_per_step, compute=compute,
                      dtype=jnp.result_type(x_ref.dtype, panel_ref.dtype), precision=precision)
    out_col = j * bw + c
    plgpu.store(
        o_ref.at[m[:, None], out_col[None, :]],
        acc.astype(o_ref.dtype),
        mask=m_ok[:, None] & (c_ok & (out_col < n_out))[None, :],
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "interpret",
        "compute",
        "transpose_x",
        "rows_per_step",
        "max_tm",
        "num_warps",
        "num_stages",
        "precision",
    ),
)
def bsc_matmul_pallas(
    x: jax.Array,
    w: BlockSparseMatrix,
    *,
    interpret: bool = False,
    compute: Literal["fma", "dot"] | None = None,
    transpose_x: bool | None = None,
    rows_per_step: int | None = None,
    max_tm: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
    precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST,
) -> jax.Array:
    """y = x @ K with K block-sparse, as one Pallas (Triton) kernel launch.

    Args:
      x: (..., in_features) input; the flattened leading size N may be anything (tiles of
        up to `max_tm` rows), 1 to 256 is the intended range.
      w: block-sparse K of shape (in_features, out_features).
      interpret: run the kernel in the Pallas interpreter (CPU tests).
      compute: "fma" (elementwise products, N <= 8 only) or "dot" (tensor cores); default
        "fma" for N <= 4 (N <= 8 for 32-bit operands), else "dot".
      transpose_x: gather from x^T (one extra XLA transpose; coalesced gathers); default
        for "dot" with N > 16 and bw < 32.
      rows_per_step: panel rows per loop step (power of two; >= 16 for "dot"); default
        64 (N <= 16) or 128 for "dot", the most that fits 8192 accumulator entries
        (<= 256) for "fma".
      max_tm: largest tile of x rows per program for "dot" (power of two, >= 16).
      num_warps, num_stages: Triton launch parameters; default 4 warps, and 3 stages for
        "dot", 1 for "fma".
      precision: of the "dot" products of float32 operands: HIGHEST (the default) is exact
        fp32; None follows JAX's default matmul precision (``jax_default_matmul_precision``:
        TF32 tensor-core products on recent GPUs unless set to "highest"), as ``jnp.dot``
        and the masked dense layers do. 16-bit operands always multiply exactly.

    Returns:
      (..., out_features) in the promoted dtype of x and the block values, accumulated in
      float32.
    """
    n_in, n_out = w.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the kernel expects {n_in}")
    (bh, bw), (_, nbc) = w.block_shape, w.grid_shape
    dtype = jnp.result_type(x.dtype, w.values.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)
    n = x2.shape[0]
    if w.nnzb == 0 or n == 0:
        return jnp.zeros((*lead, n_out), dtype)
    compute, tm, bw_pad, rows_per_step = launch_config(n, bw, dtype, compute, rows_per_step,
                                                       max_tm)
    num_stages = num_stages or (3 if compute == "dot" else 1)
    if transpose_x is None:
        transpose_x = compute == "dot" and n > 16 and bw < 32
    precision = precision if dtype == jnp.float32 else None
    kernel = functools.partial(
        _kernel,
        n=n,
        n_in=n_in,
        n_out=n_out,
        bh=bh,
        bw=bw,
        bw_pad=bw_pad,
        tm=tm,
        rows_per_step=rows_per_step,
        compute=compute,
        x_transposed=transpose_x,
        precision=precision,
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, n_out), dtype),
        grid=(nbc, pl.cdiv(n, tm)),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or 4, num_stages=num_stages),
        name=f"bsc_matmul_{bh}x{bw}",
    )(
        jnp.asarray(w.col_ptr),
        jnp.asarray(w.row_indices),
        jnp.asarray(w.values).reshape(w.nnzb * bh, bw),
        x2.T if transpose_x else x2,
    )
    return y.reshape(*lead, n_out)
