"""Block-sparse kernels for exported sparse weights.

`bsc_matmul(x, w)` computes y = x @ K for a `bsrnn.kernels.bsc.BlockSparseMatrix` K;
`sparse_gru`, `sparse_lstm` and `sparse_rnn` run whole sequences with block-sparse recurrent
weights (`bsrnn.kernels.recurrence`), with `lengths` and `reverse` as in
`bsrnn.cells.RecurrentLayer`; `sparse_bidirectional` runs a bidirectional layer's two
directions as one recurrence; `sparse_stack` runs a stack of forward layers as one
wavefront-ordered recurrence. Each takes `impl=`; the default "auto" runs the fastest
implementation measured on this device for these sizes, the dense product included
(`bsrnn.kernels.autotune`), so it is never slower than dense.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from bsrnn.kernels import autotune
from bsrnn.kernels.bsc import BlockSparseMatrix, dense_kernel
from bsrnn.kernels.pallas_gpu import bsc_matmul_pallas
from bsrnn.kernels.recurrence import (
    BidirectionalWeights,
    ResourceError,
    SparseGRUWeights,
    SparseLSTMWeights,
    SparseRNNWeights,
    bidirectional_weights,
    gru_input_projection,
    gru_recurrence,
    input_projection,
    projected_bidirectional,
    projected_sequence,
    resolve_bidirectional_impl,
    resolve_impl,
    resolve_stack_impl,
    sparse_bidirectional,
    sparse_gru,
    sparse_gru_weights,
    sparse_lstm,
    sparse_lstm_weights,
    sparse_rnn,
    sparse_rnn_weights,
    sparse_stack,
)
from bsrnn.kernels.xla import bsc_matmul_xla

__all__ = [
    "BidirectionalWeights",
    "ResourceError",
    "SparseGRUWeights",
    "SparseLSTMWeights",
    "SparseRNNWeights",
    "autotune",
    "bsc_matmul",
    "bsc_matmul_pallas",
    "bsc_matmul_xla",
    "bidirectional_weights",
    "gru_input_projection",
    "gru_recurrence",
    "input_projection",
    "matmul_impl",
    "projected_bidirectional",
    "projected_sequence",
    "resolve_bidirectional_impl",
    "resolve_stack_impl",
    "resolve_impl",
    "sparse_bidirectional",
    "sparse_stack",
    "sparse_gru",
    "sparse_gru_weights",
    "sparse_lstm",
    "sparse_lstm_weights",
    "sparse_rnn",
    "sparse_rnn_weights",
]

Impl = Literal["auto", "dense", "xla", "pallas", "pallas_interpret"]
IMPLS = ("auto", "dense", "xla", "pallas", "pallas_interpret")


MATMUL_REPS = 16  # products per timed program in `matmul_impl`'s measurement


def matmul_impl(w: BlockSparseMatrix, n: int, dtype, impl: Impl = "auto") -> str:
    """The implementation `bsc_matmul(impl="auto")` runs for K = ``w`` and ``n`` rows of x
    in ``dtype`` (``impl`` itself when it is not "auto")."""
    if impl != "auto":
        return impl
    on_gpu = jax.default_backend() == "gpu"
    candidates = {"dense": lambda: None, "xla": lambda: None,
                  "pallas": (lambda: None) if on_gpu else (lambda: "needs a GPU")}
    dtype = jnp.dtype(dtype)

    def make(name):
        # MATMUL_REPS products in one program: one call's wall time is mostly dispatch
        # (13-17 µs on the H200), which hides kernels a few µs apart. `shift` (zero, but
        # traced) makes each product's input depend on the loop, so none is hoisted. The
        # weights are closed over, as callers with fixed weights do (`bsrnn.inference`):
        # passed as an argument, the "dense" candidate rebuilt the dense kernel from the
        # blocks inside every timed product, and lost to kernels 1.7x slower than its GEMM
        # (H200, 1x1 blocks, N = 8 and 32; WORKSPACE.md, 2026-12-04).
        x = jnp.asarray(np.random.default_rng(0).standard_normal((n, w.shape[0])), dtype)

        def reps(x, shift):
            def body(i, acc):
                return acc + bsc_matmul(x + i.astype(x.dtype) * shift, w, impl=name)
            # Unrolled: as a loop, this measured ~27 µs per product on the H200 where the
            # kernel takes 2.7 µs: per-iteration loop overhead, the same for every candidate,
            # drowned their differences.
            return jax.lax.fori_loop(0, MATMUL_REPS, body,
                                     jnp.zeros((n, w.shape[1]), jnp.result_type(x, w.dtype)),
                                     unroll=True)

        fn, shift = jax.jit(reps), jnp.zeros((), dtype)
        return lambda: fn(x, shift)

    op_key = autotune.key("bsc_matmul", shape=w.shape, block=w.block_shape, nnzb=w.nnzb,
                          n=n, dtype=dtype.name)
    return autotune.choose(op_key, candidates, make, measurable=autotune.is_concrete(w),
                           fallback=("pallas", "xla") if on_gpu else ("xla",))


def bsc_matmul(x: jax.Array, w: BlockSparseMatrix, *, impl: Impl = "auto") -> jax.Array:
    """y = x @ K with K stored block-sparse.

    Args:
      x: (..., in_features) input.
      w: block-sparse K, shape (in_features, out_features).
      impl: "auto" (the fastest of the others measured here for these sizes, see
        `matmul_impl`), "dense" (x @ the dense K, pruned entries zero), "xla" (portable
        gathers + small products + segment sum), "pallas" (Triton kernel, GPU only),
        "pallas_interpret" (same kernel in the Pallas interpreter, any backend, slow).

    Returns:
      (..., out_features), dtype promoted from x and the block values.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    n_in = w.shape[0]
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the kernel expects {n_in}")
    dtype = jnp.result_type(x.dtype, w.values.dtype)
    impl = matmul_impl(w, int(np.prod(x.shape[:-1])), dtype, impl)
    if impl == "dense":
        return jnp.dot(x.astype(dtype), dense_kernel(w).astype(dtype),
                       preferred_element_type=jnp.promote_types(dtype, jnp.float32)
                       ).astype(dtype)
    if impl == "xla":
        return bsc_matmul_xla(x, w)
    if impl == "pallas" and jax.default_backend() != "gpu":
        raise ValueError("impl='pallas' needs a GPU; use 'auto', 'xla' or 'pallas_interpret'")
    return bsc_matmul_pallas(x, w, interpret=impl == "pallas_interpret")
