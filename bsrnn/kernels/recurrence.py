"""Whole GRU and vanilla-RNN sequences forward (inference) with block-sparse recurrent weights.

The input projection of all steps is one dense product, hoisted out of the loop; the loop
only does what must be sequential: h_t @ W_h with W_h block-sparse, and the gate math.
Gate equations and order (r, z, n) are those of `bsrnn.cells` (PyTorch/cuDNN GRU).

    weights = sparse_gru_weights(variables["params"], variables["masks"], (16, 16),
                                 dtype=jnp.float16)
    outputs, h_last = sparse_gru(x, weights)   # same as RecurrentLayer("gru", H).apply

Implementations (`impl=`), chosen like `bsc_matmul`'s: "pallas" on GPUs, "xla" elsewhere.

- "xla": `lax.scan` over steps; each step is `bsc_matmul_xla(h, W_h)` plus the gate math.
  Portable (CPU, GPU, TPU), jittable, differentiable by JAX.
- "pallas": each step is one Pallas/Triton kernel fusing the block-sparse product with the
  gate math, launched inside `lax.scan(..., unroll=U)` (per-iteration loop overhead
  dominates on GPUs: SPEC §2.6). GPU only; "pallas_interpret" runs the same kernel in the
  Pallas interpreter on any backend (tests).
- "persistent": one kernel for all steps, programs synchronised by a grid-wide barrier,
  weight panels held in registers across steps where they fit (`hold`). GPU only.

Measured on an H100 (WORKSPACE.md, GRU 2560, 90% of 16x16 blocks pruned,
fp16, T = 256, input projection included): "pallas" 6.4 / 12.0 / 16.2 µs per step at
batch 1 / 8 / 32, "persistent" 5.4 µs at batch 1 (3.7 µs with 32x32 blocks, and for GRU
1760) but slower than "pallas" at batch >= 8; cuDNN 16–20 µs. Hence "pallas" stays the GPU
default and "persistent" is opt-in (it also needs all its programs resident at once).

The vanilla RNN (`sparse_rnn`: tanh, or DS2's clipped ReLU as in P1's speech model) has
only the portable "xla" path: its step is one block-sparse product and an add.

Each gate's kernel is tiled on its own: gate g occupies block columns g·ceil(H/bw) ..
of W_h (padded with empty columns when bw does not divide H), so a block never straddles two
gates and partial edge blocks (H not a multiple of bh or bw) work on every path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from bsrnn.kernels import recurrence_pallas
from bsrnn.kernels.bsc import BlockSparseMatrix, from_dense
from bsrnn.kernels.xla import bsc_matmul_xla

RecurrenceImpl = Literal["xla", "pallas", "pallas_interpret", "persistent"]
GATES = ("r", "z", "n")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseGRUWeights:
    """A GRU layer's weights prepared for `sparse_gru` / `gru_recurrence`.

    Attributes:
      w_i: (D, 3·H) masked input kernels [W_ir | W_iz | W_in] (dense: used once for all
        steps).
      b_i: (3·H,) input biases with the recurrent biases of r and z folded in:
        [b_ir + b_hr | b_iz + b_hz | b_in].
      w_h: block-sparse recurrent kernel of shape (H, 3·Hp), Hp = ceil(H / bw)·bw: the gate
        kernels r, z, n side by side, each padded with zero columns to Hp.
      b_hn: (H,) recurrent bias of the n gate (it sits inside r ⊙ (·)).
      ell_feat: (3·Hp/bw, K) int32 or None: per block column, the input feature of each of
        its K panel rows (K = the largest column's bh·blocks rounded up to a power of two;
        padding rows point at feature 0).
      ell_values: (3·Hp/bw, K, bw) or None: those panel rows (zero for padding), the
        fixed-width ("ell") layout of the GPU kernels.
      hidden: H (static).
    """

    w_i: jax.Array
    b_i: jax.Array
    w_h: BlockSparseMatrix
    b_hn: jax.Array
    ell_feat: jax.Array | None
    ell_values: jax.Array | None
    hidden: int = dataclasses.field(metadata={"static": True})

    @property
    def block_shape(self) -> tuple[int, int]:
        """(bh, bw) of the recurrent blocks."""
        return self.w_h.block_shape

    @property
    def dtype(self) -> np.dtype:
        """dtype of the recurrent block values."""
        return self.w_h.values.dtype

    @property
    def ell(self) -> tuple[jax.Array, jax.Array] | None:
        """(ell_feat, ell_values), or None when built without them."""
        return None if self.ell_feat is None else (self.ell_feat, self.ell_values)


def _ell_arrays(w_h: BlockSparseMatrix, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    (bh, bw), (_, nbc) = w_h.block_shape, w_h.grid_shape
    col_ptr, row_idx = np.asarray(w_h.col_ptr), np.asarray(w_h.row_indices)
    values = np.asarray(w_h.values)
    k = recurrence_pallas.next_pow2(max(1, int(np.diff(col_ptr).max(initial=0))) * bh)
    feat = np.zeros((nbc, k), np.int32)
    panel = np.zeros((nbc, k, bw), values.dtype)
    for j in range(nbc):
        s, e = col_ptr[j], col_ptr[j + 1]
        rows = (row_idx[s:e, None] * bh + np.arange(bh)).reshape(-1)
        feat[j, : rows.size] = np.where(rows < hidden, rows, 0)  # out-of-range rows are 0
        panel[j, : rows.size] = values[s:e].reshape(-1, bw)
    return feat, panel


def _layer_arrays(
    params: Mapping[str, Any], masks: Mapping[str, Any], gates: tuple[str, ...]
) -> tuple[list[np.ndarray], ...]:
    """A RecurrentLayer's (input kernels, input biases, recurrent kernels, recurrent biases,
    input masks, recurrent masks), one list entry per gate, as numpy arrays."""
    try:
        return (
            [np.asarray(params[f"input_{g}"]["kernel"]) for g in gates],
            [np.asarray(params[f"input_{g}"]["bias"]) for g in gates],
            [np.asarray(params[f"recurrent_{g}"]["kernel"]) for g in gates],
            [np.asarray(params[f"recurrent_{g}"]["bias"]) for g in gates],
            [np.asarray(masks[f"input_{g}"]["kernel"], bool) for g in gates],
            [np.asarray(masks[f"recurrent_{g}"]["kernel"], bool) for g in gates],
        )
    except KeyError as e:
        names = "/".join(gates)
        raise ValueError(
            f"params/masks lack {e}: pass the RecurrentLayer's params and masks (keys "
            f"input_{names} and recurrent_{names}, each with 'kernel' and 'bias')"
        ) from None


def _compress_recurrent(gate: str, kernel: np.ndarray, mask: np.ndarray,
                        block_shape: tuple[int, int], dtype: Any) -> BlockSparseMatrix:
    """One gate's (H, H) recurrent kernel as BSC; errors name the gate."""
    hidden = kernel.shape[1]
    if kernel.shape != (hidden, hidden) or mask.shape != kernel.shape:
        raise ValueError(f"recurrent_{gate}: kernel {kernel.shape} and mask {mask.shape} must "
                         f"both be ({hidden}, {hidden})")
    try:
        return from_dense(kernel, mask, block_shape, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"recurrent_{gate}: {e}") from None


def _initial_state(h0: jax.Array | None, batch: int, hidden: int, dtype: Any) -> jax.Array:
    """h0 in ``dtype``, zeros (B, H) if None; checks its shape."""
    h0 = jnp.zeros((batch, hidden), dtype) if h0 is None else h0.astype(dtype)
    if h0.shape != (batch, hidden):
        raise ValueError(f"h0 has shape {h0.shape}, expected {(batch, hidden)}")
    return h0


def sparse_gru_weights(
    params: Mapping[str, Any],
    masks: Mapping[str, Any],
    block_shape: tuple[int, int],
    *,
    dtype: Any = None,
    ell: bool = True,
) -> SparseGRUWeights:
    """Builds the kernel inputs from a trained `bsrnn.cells.RecurrentLayer` (cell "gru").

    Args:
      params: the layer's params, {"input_r": {"kernel": (D, H), "bias": (H,)}, ...,
        "recurrent_n": {...}} (a model's params at the layer's path).
      masks: the layer's masks at the same paths ({"recurrent_r": {"kernel": (H, H)}, ...});
        the recurrent masks must be block-structured for `block_shape`, each gate tiled from
        (0, 0) on its own (partial edge blocks allowed). Input masks are applied densely.
      block_shape: (bh, bw) the recurrent kernels were pruned with.
      dtype: dtype of weights and computation (e.g. jnp.float16); default the params'.
      ell: also build the fixed-width "ell" layout (needed by the persistent kernel and
        layout="ell"; costs host time and up to a few times the block bytes).

    Returns:
      `SparseGRUWeights` (numpy arrays inside; host-side construction, not jittable).

    Raises:
      ValueError: on missing gates, mismatched shapes, or a recurrent mask that is not
        block-structured for `block_shape`.
    """
    kin, bin_, kh, bh_, min_, mh = _layer_arrays(params, masks, GATES)
    hidden = kh[0].shape[1]
    dtype = np.dtype(dtype) if dtype is not None else kh[0].dtype
    # Each gate compressed on its own, then the three BSC matrices put side by side.
    gates = [_compress_recurrent(g, k, m, block_shape, dtype)
             for g, k, m in zip(GATES, kh, mh, strict=True)]
    (bh, bw), (_, nbc_g) = gates[0].block_shape, gates[0].grid_shape
    offsets = np.cumsum([0] + [w.nnzb for w in gates])
    w_h = BlockSparseMatrix(
        values=np.concatenate([np.asarray(w.values) for w in gates]),
        row_indices=np.concatenate([np.asarray(w.row_indices) for w in gates]),
        col_ptr=np.concatenate(
            [np.asarray(gates[0].col_ptr)]
            + [np.asarray(w.col_ptr)[1:] + o for w, o in zip(gates[1:], offsets[1:-1], strict=True)]
        ).astype(np.int32),
        shape=(hidden, 3 * nbc_g * bw),
        block_shape=(bh, bw),
    )
    w_i = np.concatenate([np.where(m, k, 0) for k, m in zip(kin, min_, strict=True)], axis=1)
    b_i = np.concatenate([bin_[0] + bh_[0], bin_[1] + bh_[1], bin_[2]])
    feat, panel = _ell_arrays(w_h, hidden) if ell else (None, None)
    return SparseGRUWeights(
        w_i=w_i.astype(dtype), b_i=b_i.astype(dtype), w_h=w_h, b_hn=bh_[2].astype(dtype),
        ell_feat=feat, ell_values=panel, hidden=hidden,
    )


def default_recurrence_impl() -> RecurrenceImpl:
    """What `gru_recurrence` uses here: "pallas" on GPUs, "xla" elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def gru_input_projection(x: jax.Array, weights: SparseGRUWeights) -> jax.Array:
    """xp = x @ W_i + b_i for all steps at once, time-major.

    Args:
      x: (B, T, D) inputs.

    Returns:
      (T, B, 3·H) in the weights' dtype.
    """
    w_i = jnp.asarray(weights.w_i)
    xp = jnp.einsum("btd,dg->tbg", x.astype(w_i.dtype), w_i)
    return xp + jnp.asarray(weights.b_i)


def _gates_xla(xp_t, a, h, b_hn, hidden):
    f32 = jnp.float32
    x_r, x_z, x_n = (xp_t[:, i * hidden:(i + 1) * hidden].astype(f32) for i in range(3))
    hp = a.shape[-1] // 3
    a_r, a_z, a_n = (a[:, i * hp:i * hp + hidden].astype(f32) for i in range(3))
    r = jax.nn.sigmoid(x_r + a_r)
    z = jax.nn.sigmoid(x_z + a_z)
    n = jnp.tanh(x_n + r * (a_n + b_hn.astype(f32)))
    return ((1.0 - z) * n + z * h.astype(f32)).astype(h.dtype)


def _recurrence_xla(xp, weights, h0, unroll):
    w_h, b_hn = weights.w_h, jnp.asarray(weights.b_hn)

    def step(h, xp_t):
        h = _gates_xla(xp_t, bsc_matmul_xla(h, w_h), h, b_hn, weights.hidden)
        return h, h

    _, out = jax.lax.scan(step, h0, xp, unroll=unroll)
    return out


def gru_recurrence(
    xp: jax.Array,
    weights: SparseGRUWeights,
    h0: jax.Array | None = None,
    *,
    impl: RecurrenceImpl | None = None,
    unroll: int = 16,
    **kernel_options: Any,
) -> jax.Array:
    """The sequential part of a GRU sequence: all h_t from the input projections.

    Args:
      xp: (T, B, 3·H) from `gru_input_projection`.
      weights: `SparseGRUWeights`.
      h0: (B, H) initial state; zeros if None.
      impl: "xla", "pallas", "pallas_interpret", "persistent", or None for
        `default_recurrence_impl()`.
      unroll: `lax.scan` unroll factor of the "xla" and "pallas" loops.
      **kernel_options: passed to `recurrence_pallas.gru_step_pallas` ("pallas") or
        `gru_persistent_pallas` ("persistent"): layout, compute, rows_per_step, hold, ...

    Returns:
      (T, B, H) states h_1 .. h_T, in the promoted dtype of xp and the weights. Gate math is
      done in float32 and the state is rounded to that dtype after every step.
    """
    impl = impl or default_recurrence_impl()
    steps, batch, three_h = xp.shape
    hidden = weights.hidden
    if three_h != 3 * hidden:
        raise ValueError(f"xp has {three_h} features, expected 3·H = {3 * hidden}")
    dtype = jnp.result_type(xp.dtype, weights.dtype)
    xp = xp.astype(dtype)
    h0 = _initial_state(h0, batch, hidden, dtype)
    if steps == 0:
        return jnp.zeros((0, batch, hidden), dtype)
    if impl == "xla":
        if kernel_options:
            raise ValueError(f"impl='xla' takes no kernel options, got {sorted(kernel_options)}")
        return _recurrence_xla(xp, weights, h0, unroll)
    if impl not in ("pallas", "pallas_interpret", "persistent"):
        raise ValueError(
            "impl must be 'xla', 'pallas', 'pallas_interpret' or 'persistent', got "
            f"{impl!r}")
    if impl != "pallas_interpret" and jax.default_backend() != "gpu":
        raise ValueError(f"impl={impl!r} needs a GPU; use 'xla' or 'pallas_interpret'")
    hbuf = jnp.zeros(((steps + 1) * batch, hidden), dtype).at[:batch].set(h0)
    common = dict(hidden=hidden, ell=weights.ell)
    b_hn = jnp.asarray(weights.b_hn).astype(dtype)
    if impl == "persistent":
        hbuf, _ = recurrence_pallas.gru_persistent_pallas(
            hbuf, xp, weights.w_h, b_hn, **common, **kernel_options)
    else:
        kernel_options.setdefault("interpret", impl == "pallas_interpret")

        def step(carry, _):
            hbuf, cnt = carry
            return recurrence_pallas.gru_step_pallas(
                hbuf, cnt, xp, weights.w_h, b_hn, **common, **kernel_options), None

        (hbuf, _), _ = jax.lax.scan(
            step, (hbuf, jnp.zeros((1,), jnp.int32)), None, length=steps, unroll=unroll)
    return hbuf[batch:].reshape(steps, batch, hidden)


def sparse_gru(
    x: jax.Array,
    weights: SparseGRUWeights,
    h0: jax.Array | None = None,
    *,
    impl: RecurrenceImpl | None = None,
    unroll: int = 16,
    **kernel_options: Any,
) -> tuple[jax.Array, jax.Array]:
    """A whole GRU sequence forward, like `RecurrentLayer("gru", H)` without `lengths`.

    Args:
      x: (B, T, D) inputs.
      weights: from `sparse_gru_weights`.
      h0: (B, H) initial state; zeros if None.
      impl, unroll, **kernel_options: as in `gru_recurrence`.

    Returns:
      (outputs (B, T, H), final state h_T (B, H)).
    """
    xp = gru_input_projection(x, weights)
    batch = x.shape[0]
    out = gru_recurrence(xp, weights, h0, impl=impl, unroll=unroll, **kernel_options)
    last = out[-1] if out.shape[0] else (
        jnp.zeros((batch, weights.hidden), out.dtype) if h0 is None else h0.astype(out.dtype))
    return jnp.swapaxes(out, 0, 1), last


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseRNNWeights:
    """A vanilla RNN layer's weights prepared for `sparse_rnn`.

    Attributes:
      w_i: (D, H) masked input kernel (dense: used once for all steps).
      b: (H,) input and recurrent biases summed.
      w_h: block-sparse recurrent kernel (H, H).
      cell: "rnn" (tanh) or "rnn_clipped_relu" (min(max(·, 0), 20)) (static).
    """

    w_i: jax.Array
    b: jax.Array
    w_h: BlockSparseMatrix
    cell: str = dataclasses.field(metadata={"static": True})

    def __post_init__(self) -> None:
        if self.cell not in RNN_CELLS:
            raise ValueError(f"cell must be one of {RNN_CELLS}, got {self.cell!r}")


RNN_CELLS = ("rnn", "rnn_clipped_relu")


def sparse_rnn_weights(
    params: Mapping[str, Any],
    masks: Mapping[str, Any],
    block_shape: tuple[int, int],
    *,
    cell: str = "rnn",
    dtype: Any = None,
) -> SparseRNNWeights:
    """Builds `sparse_rnn`'s weights from a trained `bsrnn.cells.RecurrentLayer` (cell "rnn"
    or "rnn_clipped_relu").

    Args:
      params: the layer's params, {"input_h": {"kernel": (D, H), "bias": (H,)},
        "recurrent_h": {"kernel": (H, H), "bias": (H,)}}.
      masks: the layer's masks at the same paths; the recurrent mask must be
        block-structured for `block_shape` (partial edge blocks allowed).
      block_shape: (bh, bw) the recurrent kernel was pruned with.
      cell: "rnn" or "rnn_clipped_relu", the layer's cell.
      dtype: dtype of weights and computation; default the params'.

    Returns:
      `SparseRNNWeights` (numpy arrays inside; host-side, not jittable).

    Raises:
      ValueError: on an unknown cell, missing keys, mismatched shapes, or a recurrent mask
        that is not block-structured for `block_shape`.
    """
    if cell not in RNN_CELLS:
        raise ValueError(f"cell must be one of {RNN_CELLS}, got {cell!r}")
    (k_i,), (b_i,), (k_h,), (b_h,), (m_i,), (m_h,) = _layer_arrays(params, masks, ("h",))
    if m_i.shape != k_i.shape:
        raise ValueError(f"input_h: kernel {k_i.shape} and mask {m_i.shape} must match")
    dtype = np.dtype(dtype) if dtype is not None else k_h.dtype
    w_h = _compress_recurrent("h", k_h, m_h, block_shape, dtype)
    return SparseRNNWeights(w_i=np.where(m_i, k_i, 0).astype(dtype),
                            b=(b_i + b_h).astype(dtype), w_h=w_h, cell=cell)


def sparse_rnn(
    x: jax.Array, weights: SparseRNNWeights, h0: jax.Array | None = None, *, unroll: int = 16
) -> tuple[jax.Array, jax.Array]:
    """A whole vanilla-RNN sequence forward, like `RecurrentLayer(cell, H)` without
    `lengths`: h_t = act(x_t W_i + h_{t-1} W_h + b), W_h block-sparse (portable XLA path).
    For a ``reverse=True`` layer (the backward half of a bidirectional RNN), flip the time
    axis of ``x`` and of the outputs.

    Args:
      x: (B, T, D) inputs.
      weights: from `sparse_rnn_weights`.
      h0: (B, H) initial state; zeros if None.
      unroll: `lax.scan` unroll factor.

    Returns:
      (outputs (B, T, H), final state h_T (B, H)), in the promoted dtype of x and the
      weights; the activation is computed in float32.
    """
    w_i = jnp.asarray(weights.w_i)
    dtype = jnp.result_type(x.dtype, w_i.dtype)
    h0 = _initial_state(h0, x.shape[0], weights.w_h.shape[1], dtype)
    xp = jnp.einsum("btd,dh->tbh", x.astype(dtype), w_i.astype(dtype)) + jnp.asarray(weights.b)

    def step(h, xp_t):
        f32 = jnp.float32
        pre = xp_t.astype(f32) + bsc_matmul_xla(h, weights.w_h).astype(f32)
        h = (jnp.tanh(pre) if weights.cell == "rnn" else jnp.clip(pre, 0.0, 20.0)).astype(dtype)
        return h, h

    last, out = jax.lax.scan(step, h0, xp, unroll=unroll)
    return jnp.swapaxes(out, 0, 1), last
