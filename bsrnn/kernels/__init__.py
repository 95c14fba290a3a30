"""Block-sparse matrix products for exported sparse weights.

`bsc_matmul(x, w)` computes y = x @ K for a `bsrnn.kernels.bsc.BlockSparseMatrix` K and picks
the implementation from `jax.default_backend()`: the Pallas/Triton kernel on GPUs, the
portable XLA path elsewhere. `impl=` overrides the choice.

`sparse_gru(x, weights)` runs a whole GRU sequence with block-sparse recurrent weights
(`bsrnn.kernels.recurrence`), dispatched the same way; `sparse_rnn` runs a vanilla RNN
(tanh or clipped ReLU) sequence on the portable XLA path.
"""

from __future__ import annotations

from typing import Literal

import jax

from bsrnn.kernels.bsc import BlockSparseMatrix
from bsrnn.kernels.pallas_gpu import bsc_matmul_pallas
from bsrnn.kernels.recurrence import (
    SparseGRUWeights,
    SparseRNNWeights,
    default_recurrence_impl,
    gru_input_projection,
    gru_recurrence,
    sparse_gru,
    sparse_gru_weights,
    sparse_rnn,
    sparse_rnn_weights,
)
from bsrnn.kernels.xla import bsc_matmul_xla

__all__ = [
    "SparseGRUWeights",
    "SparseRNNWeights",
    "bsc_matmul",
    "bsc_matmul_pallas",
    "bsc_matmul_xla",
    "default_impl",
    "default_recurrence_impl",
    "gru_input_projection",
    "gru_recurrence",
    "sparse_gru",
    "sparse_gru_weights",
    "sparse_rnn",
    "sparse_rnn_weights",
]

Impl = Literal["xla", "pallas", "pallas_interpret"]


def default_impl() -> Impl:
    """The implementation `bsc_matmul` uses here: "pallas" on GPUs, "xla" elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def bsc_matmul(x: jax.Array, w: BlockSparseMatrix, *, impl: Impl | None = None) -> jax.Array:
    """y = x @ K with K stored block-sparse.

    Args:
      x: (..., in_features) input.
      w: block-sparse K, shape (in_features, out_features).
      impl: "xla" (portable gathers + small products + segment sum), "pallas" (Triton
        kernel, GPU only), "pallas_interpret" (same kernel in the Pallas interpreter, any
        backend, slow), or None for `default_impl()`.

    Returns:
      (..., out_features), dtype promoted from x and the block values.
    """
    impl = impl or default_impl()
    if impl == "xla":
        return bsc_matmul_xla(x, w)
    if impl == "pallas":
        return bsc_matmul_pallas(x, w)
    if impl == "pallas_interpret":
        return bsc_matmul_pallas(x, w, interpret=True)
    raise ValueError(f"impl must be 'xla', 'pallas' or 'pallas_interpret', got {impl!r}")
