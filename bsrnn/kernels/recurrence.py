"""Whole RNN, GRU and LSTM sequences forward (inference) with block-sparse recurrent weights.

The input projection of all steps is one dense product, hoisted out of the loop; the loop
only does what must be sequential: h_t @ W_h with W_h block-sparse, and the gate math
(`bsrnn.cells.gru_gates`, `lstm_gates`, `rnn_activation`: the scan cells' own functions).

    weights = sparse_gru_weights(variables["params"], variables["masks"], (16, 16),
                                 dtype=jnp.float16)
    outputs, h_last = sparse_gru(x, weights, lengths=lengths)  # = RecurrentLayer("gru", H)

`lengths` and `reverse` mean exactly what they mean for `bsrnn.cells.RecurrentLayer`, and
are handled here once for every implementation: a row's padded steps come after its valid
ones, so the recurrence runs forward over all T steps, the final carry is each row's state
at step length - 1 (the initial carry when the length is 0), and outputs at or past the
length are zero. For `reverse=True` each row is reversed within its length (one gather)
before the input projection and its outputs reversed back after.

Implementations (`impl=`):

- "auto" (default): the fastest of the implementations below that can run here, the dense
  product included, measured once per (device, sizes, block, batch, dtype) and cached
  (`bsrnn.kernels.autotune`).
- "dense": `lax.scan` with the masked dense recurrent kernel (what `RecurrentLayer` runs).
- "xla": `lax.scan` over steps; each step is `bsc_matmul_xla(h, W_h)` plus the gate math.
  Portable (CPU, GPU, TPU), jittable, differentiable by JAX.
- "pallas" (every cell): each step is one Pallas/Triton kernel fusing the block-sparse
  product with the cell's gate math (`recurrence_pallas.cell_step_pallas`; the LSTM's c
  rides in the same state buffer as h), launched inside `lax.scan(..., unroll=U)`. GPU
  only; "pallas_interpret" runs the same kernel in the Pallas interpreter on any backend
  (tests).
- "persistent" (GRU only): one kernel for all steps, programs synchronised by a grid-wide
  barrier, weight panels held in registers where they fit. GPU only, and only where all
  its programs fit on the chip at once (checked before launch: `ResourceError` when
  forced, skipped by "auto"); a barrier that gave up raises. "persistent_interpret" runs
  it in the interpreter (tests).
- "mosaic" (GRU only): the Pallas Mosaic GPU kernel of `bsrnn.kernels.mosaic_gpu`, where that
  module exists and says it can run.
- "mosaic_persistent" (GRU only): its persistent form, one launch for all steps with each
  program's weights resident in shared memory (`mosaic_gpu.gru_persistent_mosaic`); checked
  before launch by a probe like "persistent"'s, and a wait that gave up raises.

Each gate's kernel is tiled on its own: gate g occupies block columns g·ceil(H/bw) ..
of W_h (padded with empty columns when bw does not divide H), so a block never straddles two
gates and partial edge blocks (H not a multiple of bh or bw) work on every path.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from bsrnn import cells
from bsrnn.kernels import autotune, pallas_gpu, recurrence_pallas
from bsrnn.kernels.bsc import BlockSparseMatrix, cached_on, from_dense, to_dense, with_xla_layout
from bsrnn.kernels.xla import bsc_matmul_xla

RecurrenceImpl = Literal["auto", "dense", "xla", "pallas", "pallas_interpret", "persistent",
                         "persistent_interpret", "mosaic", "mosaic_persistent"]
GATES = cells.GATES["gru"]
LSTM_GATES = cells.GATES["lstm"]
RNN_CELLS = ("rnn", "rnn_clipped_relu")
_SCAN_IMPLS = ("dense", "xla")
_KERNELS = ("pallas", "pallas_interpret", "persistent", "persistent_interpret", "mosaic",
            "mosaic_persistent")
_GRU_ONLY_KERNELS = ("persistent", "persistent_interpret", "mosaic", "mosaic_persistent")


class ResourceError(ValueError):
    """A kernel cannot run at this size on this device (shared memory, registers, resident
    programs): raised before launch when that kernel is forced with `impl=`."""


class _BlockSparseRecurrence:
    """What every layer's prepared weights say about their block-sparse recurrent kernel
    ``w_h`` (a mixin of `SparseGRUWeights`, `SparseLSTMWeights`, `SparseRNNWeights`)."""

    w_h: BlockSparseMatrix

    @property
    def block_shape(self) -> tuple[int, int]:
        """(bh, bw) of the recurrent blocks."""
        return self.w_h.block_shape

    @property
    def dtype(self) -> np.dtype:
        """dtype of the recurrent block values."""
        return self.w_h.values.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseGRUWeights(_BlockSparseRecurrence):
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
        fixed-width ("ell") layout of the persistent kernel.
      hidden: H (static).
      w_h_dense: (H, 3·H) the masked dense recurrent kernel without gate padding, or None:
        set by `with_dense_kernel` once "dense" is chosen, so a jitted loop that takes the
        weights as arguments reads it instead of rebuilding it from the blocks every step.
    """

    w_i: jax.Array
    b_i: jax.Array
    w_h: BlockSparseMatrix
    b_hn: jax.Array
    ell_feat: jax.Array | None
    ell_values: jax.Array | None
    hidden: int = dataclasses.field(metadata={"static": True})
    w_h_dense: jax.Array | None = None

    cell = "gru"

    @property
    def ell(self) -> tuple[jax.Array, jax.Array] | None:
        """(ell_feat, ell_values), or None when built without them."""
        return None if self.ell_feat is None else (self.ell_feat, self.ell_values)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseLSTMWeights(_BlockSparseRecurrence):
    """An LSTM layer's weights prepared for `sparse_lstm`.

    Attributes:
      w_i: (D, 4·H) masked input kernels [W_ii | W_if | W_ig | W_io] (dense).
      b: (4·H,) input and recurrent biases summed, same gate order.
      w_h: block-sparse recurrent kernel (H, 4·Hp), Hp = ceil(H / bw)·bw: the gate kernels
        i, f, g, o side by side, each padded with zero columns to Hp.
      hidden: H (static).
      w_h_dense: (H, 4·H) the masked dense recurrent kernel without gate padding, or None:
        set by `with_dense_kernel` once "dense" is chosen, so a jitted loop that takes the
        weights as arguments reads it instead of rebuilding it from the blocks every step.
    """

    w_i: jax.Array
    b: jax.Array
    w_h: BlockSparseMatrix
    hidden: int = dataclasses.field(metadata={"static": True})
    w_h_dense: jax.Array | None = None

    cell = "lstm"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseRNNWeights(_BlockSparseRecurrence):
    """A vanilla RNN layer's weights prepared for `sparse_rnn`.

    Attributes:
      w_i: (D, H) masked input kernel (dense: used once for all steps).
      b: (H,) input and recurrent biases summed.
      w_h: block-sparse recurrent kernel (H, H).
      cell: "rnn" (tanh) or "rnn_clipped_relu" (min(max(·, 0), 20)) (static).
      w_h_dense: (H, H) the masked dense recurrent kernel without gate padding, or None:
        set by `with_dense_kernel` once "dense" is chosen, so a jitted loop that takes the
        weights as arguments reads it instead of rebuilding it from the blocks every step.
    """

    w_i: jax.Array
    b: jax.Array
    w_h: BlockSparseMatrix
    cell: str = dataclasses.field(metadata={"static": True})
    w_h_dense: jax.Array | None = None

    def __post_init__(self) -> None:
        if self.cell not in RNN_CELLS:
            raise ValueError(f"cell must be one of {RNN_CELLS}, got {self.cell!r}")

    @property
    def hidden(self) -> int:
        """H."""
        return self.w_h.shape[1]


SparseWeights = SparseGRUWeights | SparseLSTMWeights | SparseRNNWeights


def _ell_arrays(w_h: BlockSparseMatrix, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    (bh, bw), (_, nbc) = w_h.block_shape, w_h.grid_shape
    col_ptr, row_idx = np.asarray(w_h.col_ptr), np.asarray(w_h.row_indices)
    values = np.asarray(w_h.values)
    k = pallas_gpu.next_pow2(max(1, int(np.diff(col_ptr).max(initial=0))) * bh)
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
        arrays = (
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
    unknown = sorted(set(params) - {f"{kind}_{g}" for kind in ("input", "recurrent")
                                    for g in gates})
    if unknown:  # e.g. input_norm's projection_norm, which the kernels do not compute
        raise ValueError(f"params have parts the kernels cannot run: {unknown} (a layer "
                         "built with input_norm=True?); run it as a RecurrentLayer")
    for g, k, m in zip(gates, arrays[0], arrays[4], strict=True):
        if m.shape != k.shape:
            raise ValueError(f"input_{g}: kernel {k.shape} and mask {m.shape} must match")
    return arrays


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


def _gate_padded(gates: tuple[str, ...], kernels: list[np.ndarray], masks: list[np.ndarray],
                 block_shape: tuple[int, int], dtype: Any) -> BlockSparseMatrix:
    """The gates' recurrent kernels, each compressed on its own, side by side as one
    (H, gates·Hp) BSC matrix (gate g = block columns g·ceil(H / bw) ..)."""
    parts = [_compress_recurrent(g, k, m, block_shape, dtype)
             for g, k, m in zip(gates, kernels, masks, strict=True)]
    (bh, bw), (_, nbc_g) = parts[0].block_shape, parts[0].grid_shape
    offsets = np.cumsum([0] + [w.nnzb for w in parts])
    return with_xla_layout(BlockSparseMatrix(
        values=np.concatenate([np.asarray(w.values) for w in parts]),
        row_indices=np.concatenate([np.asarray(w.row_indices) for w in parts]),
        col_ptr=np.concatenate(
            [np.asarray(parts[0].col_ptr)]
            + [np.asarray(w.col_ptr)[1:] + o for w, o in zip(parts[1:], offsets[1:-1], strict=True)]
        ).astype(np.int32),
        shape=(kernels[0].shape[1], len(gates) * nbc_g * bw),
        block_shape=(bh, bw),
    ))


def _masked_input(kernels: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.where(m, k, 0) for k, m in zip(kernels, masks, strict=True)], 1)


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
      ell: also build the fixed-width "ell" layout (needed by the persistent kernel's
        default layout; costs host time and up to a few times the block bytes).

    Returns:
      `SparseGRUWeights` (numpy arrays inside; host-side construction, not jittable).

    Raises:
      ValueError: on missing gates, mismatched shapes, or a recurrent mask that is not
        block-structured for `block_shape`.
    """
    kin, bin_, kh, bh_, min_, mh = _layer_arrays(params, masks, GATES)
    hidden = kh[0].shape[1]
    dtype = np.dtype(dtype) if dtype is not None else kh[0].dtype
    w_h = _gate_padded(GATES, kh, mh, block_shape, dtype)
    b_i = np.concatenate([bin_[0] + bh_[0], bin_[1] + bh_[1], bin_[2]])
    feat, panel = _ell_arrays(w_h, hidden) if ell else (None, None)
    return SparseGRUWeights(
        w_i=_masked_input(kin, min_).astype(dtype), b_i=b_i.astype(dtype), w_h=w_h,
        b_hn=bh_[2].astype(dtype), ell_feat=feat, ell_values=panel, hidden=hidden,
    )


def sparse_lstm_weights(
    params: Mapping[str, Any],
    masks: Mapping[str, Any],
    block_shape: tuple[int, int],
    *,
    dtype: Any = None,
) -> SparseLSTMWeights:
    """Builds `sparse_lstm`'s weights from a trained `bsrnn.cells.RecurrentLayer` (cell
    "lstm").

    Args:
      params: the layer's params, {"input_i": {"kernel": (D, H), "bias": (H,)}, ...,
        "recurrent_o": {...}} (gates i, f, g, o).
      masks: the layer's masks at the same paths; the recurrent masks must be
        block-structured for `block_shape`, each gate tiled on its own (partial edge blocks
        allowed). Input masks are applied densely.
      block_shape: (bh, bw) the recurrent kernels were pruned with.
      dtype: dtype of weights and computation; default the params'.

    Returns:
      `SparseLSTMWeights` (numpy arrays inside; host-side construction, not jittable).

    Raises:
      ValueError: on missing gates, mismatched shapes, or a recurrent mask that is not
        block-structured for `block_shape`.
    """
    kin, bin_, kh, bh_, min_, mh = _layer_arrays(params, masks, LSTM_GATES)
    dtype = np.dtype(dtype) if dtype is not None else kh[0].dtype
    return SparseLSTMWeights(
        w_i=_masked_input(kin, min_).astype(dtype),
        b=(np.concatenate(bin_) + np.concatenate(bh_)).astype(dtype),
        w_h=_gate_padded(LSTM_GATES, kh, mh, block_shape, dtype), hidden=kh[0].shape[1])


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
    dtype = np.dtype(dtype) if dtype is not None else k_h.dtype
    w_h = with_xla_layout(_compress_recurrent("h", k_h, m_h, block_shape, dtype))
    return SparseRNNWeights(w_i=np.where(m_i, k_i, 0).astype(dtype),
                            b=(b_i + b_h).astype(dtype), w_h=w_h, cell=cell)


def input_projection(x: jax.Array, weights: SparseWeights) -> jax.Array:
    """xp = x @ W_i + b for all steps at once, time-major.

    Args:
      x: (B, T, D) inputs.
      weights: any of `SparseGRUWeights`, `SparseLSTMWeights`, `SparseRNNWeights`.

    Returns:
      (T, B, gates·H) in the weights' dtype (biases folded in as the weights say).
    """
    w_i = jnp.asarray(weights.w_i)
    if x.ndim != 3 or x.shape[-1] != w_i.shape[0]:
        raise ValueError(f"x must be (B, T, D) with D = {w_i.shape[0]}, got shape {x.shape}")
    bias = weights.b_i if isinstance(weights, SparseGRUWeights) else weights.b
    return jnp.einsum("btd,dg->tbg", x.astype(w_i.dtype), w_i) + jnp.asarray(bias)


gru_input_projection = input_projection  # the name the GRU kernels' callers know


def _n_gates(weights: SparseWeights) -> int:
    return len(cells.GATES[weights.cell])


def _cell_update(weights: SparseWeights, xp_t: jax.Array, a: jax.Array, carry: Any) -> Any:
    """One step's new carry from the step's input projection xp_t (B, gates·H), the
    recurrent product a = h @ W_h (B, gates·Hp) and the old carry; float32 gate math, the
    carry rounded to its dtype."""
    f32, hidden = jnp.float32, weights.hidden
    hp = a.shape[-1] // _n_gates(weights)
    xs = [xp_t[:, g * hidden:(g + 1) * hidden].astype(f32) for g in range(_n_gates(weights))]
    hs = [a[:, g * hp:g * hp + hidden].astype(f32) for g in range(_n_gates(weights))]
    if weights.cell == "gru":
        b_hn = jnp.asarray(weights.b_hn).astype(f32)
        return cells.gru_gates(*xs, hs[0], hs[1], hs[2] + b_hn,
                               carry.astype(f32)).astype(carry.dtype)
    if weights.cell == "lstm":
        h, c = cells.lstm_gates(*(x + p for x, p in zip(xs, hs, strict=True)),
                                carry[1].astype(f32))
        return h.astype(carry[0].dtype), c.astype(carry[1].dtype)
    return cells.rnn_activation(weights.cell, xs[0] + hs[0]).astype(carry.dtype)


def _dense_recurrent(weights: SparseWeights) -> tuple[jax.Array, jax.Array]:
    """The masked dense recurrent kernel (H, gates·H) and bias (gates·H,) in the layout of
    `RecurrentLayer`'s step (gate padding dropped; the GRU's b_hn in its n slot, the other
    recurrent biases already folded into the input projection's)."""
    gates, hidden = _n_gates(weights), weights.hidden

    def unpadded() -> jax.Array:  # one constant for closed-over weights (`cached_on`)
        w = to_dense(weights.w_h)  # (H, gates·Hp)
        hp = w.shape[1] // gates
        if hp == hidden:
            return w
        return jnp.concatenate([w[:, g * hp:g * hp + hidden] for g in range(gates)], axis=1)

    w = weights.w_h_dense
    if w is None:
        w = cached_on(weights.w_h, ("recurrent", gates, hidden), unpadded)
    b = jnp.zeros((gates * hidden,), w.dtype)
    if weights.cell == "gru":
        b = b.at[2 * hidden:].set(jnp.asarray(weights.b_hn).astype(w.dtype))
    return w, b


def with_dense_kernel(weights: SparseWeights) -> SparseWeights:
    """``weights`` carrying their masked dense recurrent kernel (``w_h_dense``, (H,
    gates·H)), computed here once: what `bsrnn.inference` gives a layer whose "auto" chose
    "dense". Call it outside `jax.jit`, on concrete weights."""
    with jax.ensure_compile_time_eval():
        dense = _dense_recurrent(dataclasses.replace(weights, w_h_dense=None))[0]
    return dataclasses.replace(weights, w_h_dense=jax.block_until_ready(dense))


def _scan(xp: jax.Array, weights: SparseWeights, carry0: Any, impl: str, unroll: int) -> Any:
    """The "dense" and "xla" paths: lax.scan over steps, one product h @ W_h per step.

    "dense" runs `bsrnn.cells.cell_step`, `RecurrentLayer`'s own step, on the masked dense
    kernel (the same computation as the layer, so `auto`'s dense candidate is as fast as
    the layer); "xla" runs the block-sparse product with the float32 gate math."""
    if impl == "dense":
        w_dense, b_dense = _dense_recurrent(weights)
        w_dense, b_dense = w_dense.astype(xp.dtype), b_dense.astype(xp.dtype)

        def dense_step(carry, xp_t):
            carry, _ = cells.cell_step(weights.cell, carry, xp_t, w_dense, b_dense)
            return carry, carry

        return jax.lax.scan(dense_step, carry0, xp, unroll=unroll)[1]

    def step(carry, xp_t):
        h = carry[0] if weights.cell == "lstm" else carry
        carry = _cell_update(weights, xp_t, bsc_matmul_xla(h, weights.w_h), carry)
        return carry, carry

    return jax.lax.scan(step, carry0, xp, unroll=unroll)[1]


def _persistent_options(ell: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The persistent kernel's options: its default "ell" layout (weights held in
    registers) needs weights built with ``ell=True``; without them, the "bsc" panels."""
    if ell is None and "layout" not in options:
        return {**options, "layout": "bsc", "hold": False}
    return options


@functools.cache
def _mosaic_module() -> Any:
    """`bsrnn.kernels.mosaic_gpu`, or None where it is missing or fails to import."""
    try:
        return importlib.import_module("bsrnn.kernels.mosaic_gpu")
    except Exception:  # noqa: BLE001  (any import failure only removes the candidate)
        return None


def _gpu_only(impl: str) -> None:
    if jax.default_backend() != "gpu":
        raise ValueError(f"impl={impl!r} needs a GPU; use 'auto', 'xla', 'dense' or "
                         f"'{impl.split('_')[0]}_interpret'")


def _kernel_sequence(xp: jax.Array, weights: SparseWeights, carry0: Any, impl: str,
                     unroll: int, options: dict[str, Any]) -> Any:
    """The kernel paths: all steps' carries from xp (T, B, gates·H), each part (T, B, H).
    The step kernel ("pallas") serves every cell; "persistent" and "mosaic" only the GRU
    (`_recurrence` checks)."""
    steps, batch, _ = xp.shape
    hidden, dtype = weights.hidden, xp.dtype
    if impl in ("mosaic", "mosaic_persistent"):
        module = _mosaic_module()
        if module is None:
            raise ResourceError(f"impl={impl!r} cannot run here: bsrnn.kernels.mosaic_gpu is "
                                "missing or failed to import")
        check, run = ((module.unsupported, module.gru_recurrence_mosaic) if impl == "mosaic"
                      else (module.persistent_unsupported, module.gru_persistent_mosaic))
        if reason := check(weights, batch):
            raise ResourceError(f"impl={impl!r} cannot run here: {reason}")
        return run(xp, weights, carry0, **options).astype(dtype)
    interpret = impl.endswith("_interpret")
    if not interpret:
        _gpu_only(impl)
    parts = carry0 if weights.cell == "lstm" else (carry0,)  # state columns [h | c]
    hbuf = jnp.zeros(((steps + 1) * batch, len(parts) * hidden), dtype).at[:batch].set(
        jnp.concatenate(parts, axis=1))
    w_h = weights.w_h
    ell = weights.ell if weights.cell == "gru" else None
    b_hn = jnp.asarray(weights.b_hn).astype(dtype) if weights.cell == "gru" else None
    if impl.startswith("persistent"):
        options = _persistent_options(ell, options)
        reason = recurrence_pallas.persistent_unsupported(
            xp.shape, dtype, w_h, ell, **options, interpret=interpret)
        if reason:
            raise ResourceError(f"impl={impl!r} cannot run GRU H={hidden} with "
                                f"{w_h.block_shape} blocks at batch {batch}: {reason}. "
                                "Use impl='auto' or 'pallas'.")
        hbuf, sync = recurrence_pallas.gru_persistent_pallas(
            hbuf, xp, w_h, b_hn, hidden=hidden, ell=ell, interpret=interpret, **options)
        hbuf = recurrence_pallas.checked_persistent_output(
            hbuf, sync, steps, recurrence_pallas.persistent_programs(
                xp.shape, w_h, ell, **options))
    else:
        def step(carry, _):
            hbuf, cnt = carry
            return recurrence_pallas.cell_step_pallas(
                hbuf, cnt, xp, w_h, b_hn, cell=weights.cell, hidden=hidden, ell=ell,
                interpret=interpret, **options), None

        (hbuf, _), _ = jax.lax.scan(
            step, (hbuf, jnp.zeros((1,), jnp.int32)), None, length=steps, unroll=unroll)
    states = hbuf[batch:].reshape(steps, batch, len(parts) * hidden)
    if weights.cell == "lstm":
        return states[..., :hidden], states[..., hidden:]
    return states


def _recurrence(xp: jax.Array, weights: SparseWeights, carry0: Any, impl: str, unroll: int,
                options: dict[str, Any]) -> Any:
    """All steps' carries (each (T, B, H)) from xp (T, B, gates·H), for a forced impl."""
    if impl in _SCAN_IMPLS:
        if options:
            raise ValueError(f"impl={impl!r} takes no kernel options, got {sorted(options)}")
        return _scan(xp, weights, carry0, impl, unroll)
    if impl in _GRU_ONLY_KERNELS and weights.cell != "gru":
        raise ValueError(f"impl={impl!r} runs GRU layers only (it has no {weights.cell} "
                         f"form); for a {weights.cell} layer use 'auto', 'pallas' (GPU), "
                         "'pallas_interpret', 'dense' or 'xla'")
    if impl in _KERNELS:
        return _kernel_sequence(xp, weights, carry0, impl, unroll, options)
    kernels = tuple(k for k in _KERNELS if weights.cell == "gru" or k not in _GRU_ONLY_KERNELS)
    raise ValueError(f"impl must be one of {('auto', *_SCAN_IMPLS, *kernels)} for a "
                     f"{weights.cell} layer, got {impl!r}")


def _initial_carry(carry0: Any, weights: SparseWeights, batch: int, dtype: Any) -> Any:
    """The initial carry in ``dtype`` (zeros if None), shapes checked."""
    hidden = weights.hidden
    parts = 2 if weights.cell == "lstm" else 1
    if carry0 is None:
        carry0 = (None,) * parts
    elif parts == 2:
        if not (isinstance(carry0, tuple | list) and len(carry0) == 2):
            raise ValueError("an LSTM's initial carry is a pair (h0, c0), each (B, H)")
    else:
        carry0 = (carry0,)
    out = []
    for name, c in zip(("h0", "c0")[:parts], carry0, strict=True):
        c = jnp.zeros((batch, hidden), dtype) if c is None else jnp.asarray(c).astype(dtype)
        if c.shape != (batch, hidden):
            raise ValueError(f"{name} has shape {c.shape}, expected {(batch, hidden)}")
        out.append(c)
    return tuple(out) if parts == 2 else out[0]


def _recurrence_dtype(weights: SparseWeights) -> Any:
    """The computation dtype: the weights' (x is cast to it by the input projection)."""
    return jnp.result_type(weights.dtype, jnp.asarray(weights.w_i).dtype)


def resolve_impl(weights: SparseWeights, batch: int, steps: int, dtype: Any = None,
                 impl: str = "auto") -> str:
    """The implementation `impl="auto"` runs for these weights, batch, steps and dtype
    (default: the weights' computation dtype); ``impl`` itself when it is not "auto".

    Call it with concrete weights, outside `jax.jit`, to have `auto` measure; then pass the
    answer as ``impl=`` to the jitted call (as `bsrnn.inference` does)."""
    if impl != "auto":
        return impl
    dtype = _recurrence_dtype(weights) if dtype is None else dtype
    candidates = _candidates(weights, batch, steps, dtype)
    key = autotune.key(f"sparse_{weights.cell.split('_')[0]}", cell=weights.cell,
                       d=int(np.shape(weights.w_i)[0]), h=weights.hidden,
                       block=weights.block_shape, nnzb=weights.w_h.nnzb, batch=batch,
                       steps=steps, dtype=jnp.dtype(dtype).name)

    def make(name: str) -> Callable[[], Any]:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((batch, steps, np.shape(weights.w_i)[0])), dtype)
        # The weights are closed over, as a caller who wants `auto` to measure passes them
        # (and as the Mosaic kernel needs them: it re-lays them out on the host).
        fn = jax.jit(lambda x: _sequence(x, weights, None, None, False, name, 16, {})[0])
        return lambda: fn(x)

    return autotune.choose(key, candidates, make, measurable=autotune.is_concrete(weights),
                           fallback=("xla",))


def _candidates(weights: SparseWeights, batch: int, steps: int, dtype: Any
                ) -> dict[str, Callable[[], str | None]]:
    """`auto`'s candidates for these weights: {impl: resource check (None: can run here,
    else the reason it cannot)}, the dense scan first."""
    on_gpu = jax.default_backend() == "gpu"
    gpu = (lambda: None) if on_gpu else (lambda: "needs a GPU")
    candidates: dict[str, Callable[[], str | None]] = {"dense": lambda: None,
                                                       "xla": lambda: None, "pallas": gpu}
    if weights.cell != "gru":  # (xla stays a candidate: not yet measured against pallas)
        for name in ("persistent", "mosaic", "mosaic_persistent"):
            candidates[name] = lambda: "a GRU kernel only"
    else:
        if on_gpu:  # the fused step kernel does xla's work in 1 launch per step, not 2-4,
            # and was faster in every measured GPU cell (WORKSPACE.md): not worth compiling
            candidates["xla"] = lambda: "the step kernel replaces it on GPUs"
        candidates["persistent"] = (lambda: recurrence_pallas.persistent_unsupported(
            (steps, batch, 3 * weights.hidden), dtype, weights.w_h, weights.ell,
            **_persistent_options(weights.ell, {}))) \
            if on_gpu else gpu

        def mosaic(check: str) -> Callable[[], str | None]:
            def reason() -> str | None:
                module = _mosaic_module()
                if module is None:
                    return "bsrnn.kernels.mosaic_gpu is missing or failed to import"
                return getattr(module, check)(weights, batch)
            return reason

        candidates["mosaic"] = mosaic("unsupported")
        candidates["mosaic_persistent"] = mosaic("persistent_unsupported")
    return candidates


def _final_and_outputs(seqs: tuple[jax.Array, ...], carry0: tuple[jax.Array, ...],
                       lengths: jax.Array | None, steps: int):
    """(outputs (B, T, H) with zeros at and past each length, each carry part's state at
    step length - 1, or its initial value for length 0)."""
    outputs = jnp.swapaxes(seqs[0], 0, 1)
    if steps == 0:
        return outputs, carry0
    if lengths is None:
        return outputs, tuple(s[-1] for s in seqs)
    batch = outputs.shape[0]
    last = jnp.clip(lengths - 1, 0, steps - 1)
    started = (lengths > 0)[:, None]
    final = tuple(jnp.where(started, s[last, jnp.arange(batch)], c)
                  for s, c in zip(seqs, carry0, strict=True))
    valid = jnp.arange(steps)[None, :, None] < lengths[:, None, None]
    return jnp.where(valid, outputs, jnp.zeros((), outputs.dtype)), final


def _checked_inputs(x: jax.Array, weights: SparseWeights, carry0: Any,
                    lengths: jax.Array | None, projected: bool = False
                    ) -> tuple[int, int, Any, Any, Any]:
    """(batch, steps, computation dtype, initial carry, lengths), checked. With
    ``projected``, x is already the input projection (B, T, gates·H)."""
    if x.ndim != 3:
        raise ValueError(f"x must be (B, T, D), got shape {x.shape}")
    width = _n_gates(weights) * weights.hidden
    if projected and x.shape[-1] != width:
        raise ValueError(f"input projections must be (B, T, gates·H) = (B, T, {width}), got "
                         f"shape {x.shape}")
    batch, steps, _ = x.shape
    dtype = _recurrence_dtype(weights)
    carry0 = _initial_carry(carry0, weights, batch, dtype)
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be ({batch},) integers, got {lengths.shape} "
                             f"{lengths.dtype}")
    return batch, steps, dtype, carry0, lengths


def _in_direction(a: jax.Array, lengths: jax.Array | None, reverse: bool) -> jax.Array:
    """(B, T, ...) as the direction reads it: unchanged forward; reversed within each
    row's length (the whole T without lengths) backward. Its own inverse."""
    if not reverse:
        return a
    return jnp.flip(a, 1) if lengths is None else cells.reverse_sequences(a, lengths)


def _sequence(x: jax.Array, weights: SparseWeights, carry0: Any, lengths: jax.Array | None,
              reverse: bool, impl: str, unroll: int, options: dict[str, Any],
              projected: bool = False):
    """The one place for lengths and direction, shared by every cell and implementation.
    With ``projected``, x is already the input projection (B, T, gates·H)."""
    batch, steps, dtype, carry0, lengths = _checked_inputs(x, weights, carry0, lengths,
                                                           projected)
    if options and impl == "auto":
        raise ValueError(f"kernel options {sorted(options)} need a forced impl=")
    impl = resolve_impl(weights, batch, steps, dtype, impl)
    x = _in_direction(x, lengths, reverse)
    xp = (jnp.swapaxes(x, 0, 1) if projected else input_projection(x, weights)).astype(dtype)
    parts = carry0 if weights.cell == "lstm" else (carry0,)
    if steps == 0:
        seqs = tuple(jnp.zeros((0, batch, weights.hidden), dtype) for _ in parts)
    else:
        seqs = _recurrence(xp, weights, carry0, impl, unroll, options)
        seqs = seqs if weights.cell == "lstm" else (seqs,)
    outputs, final = _final_and_outputs(seqs, parts, lengths, steps)
    outputs = _in_direction(outputs, lengths, reverse)
    return outputs, final if weights.cell == "lstm" else final[0]


def gru_recurrence(
    xp: jax.Array,
    weights: SparseGRUWeights,
    h0: jax.Array | None = None,
    *,
    impl: RecurrenceImpl = "auto",
    unroll: int = 16,
    **kernel_options: Any,
) -> jax.Array:
    """The sequential part of a GRU sequence: all h_t from the input projections.

    Args:
      xp: (T, B, 3·H) from `input_projection`.
      weights: `SparseGRUWeights`.
      h0: (B, H) initial state; zeros if None.
      impl: as in `sparse_gru` ("auto" picks for this batch and T).
      unroll: `lax.scan` unroll factor of the "dense", "xla" and "pallas" loops.
      **kernel_options: passed to `recurrence_pallas.cell_step_pallas` ("pallas") or
        `gru_persistent_pallas` ("persistent"): layout, compute, rows_per_step, ...

    Returns:
      (T, B, H) states h_1 .. h_T, in the promoted dtype of xp and the weights. Gate math is
      done in float32 and the state is rounded to that dtype after every step.

    Raises:
      ResourceError: a forced kernel cannot run at this size here.
      A runtime error (when the result is read) if a persistent-kernel barrier gave up.
    """
    steps, batch, three_h = xp.shape
    if three_h != 3 * weights.hidden:
        raise ValueError(f"xp has {three_h} features, expected 3·H = {3 * weights.hidden}")
    dtype = jnp.result_type(xp.dtype, weights.dtype)
    h0 = _initial_carry(h0, weights, batch, dtype)
    if steps == 0:
        return jnp.zeros((0, batch, weights.hidden), dtype)
    if kernel_options and impl == "auto":
        raise ValueError(f"kernel options {sorted(kernel_options)} need a forced impl=")
    impl = resolve_impl(weights, batch, steps, dtype, impl)
    return _recurrence(xp.astype(dtype), weights, h0, impl, unroll, kernel_options)


_SEQUENCE_ARGS = """
    Args:
      x: (B, T, D) inputs.
      weights: from `{builder}`.
      {carry}
      lengths: (B,) int valid steps per row (None: all T). As in `RecurrentLayer`: steps
        at or past a row's length output zeros and leave its state alone.
      reverse: run each row from its last valid step back to its first (the backward half
        of a bidirectional layer); outputs stay aligned with the inputs.
      impl: "auto" (fastest measured here, dense included), "dense", "xla"{kernels}.
      unroll: `lax.scan` unroll factor of the looped paths.
      **kernel_options: launch options of a forced kernel impl.

    Returns:
      (outputs (B, T, H), final carry {final}), in the weights' dtype (x is cast to it);
      gate math in float32, the state rounded to that dtype every step.
"""


def sparse_gru(
    x: jax.Array,
    weights: SparseGRUWeights,
    h0: jax.Array | None = None,
    *,
    lengths: jax.Array | None = None,
    reverse: bool = False,
    impl: RecurrenceImpl = "auto",
    unroll: int = 16,
    **kernel_options: Any,
) -> tuple[jax.Array, jax.Array]:
    return _sequence(x, weights, h0, lengths, reverse, impl, unroll, kernel_options)


def sparse_lstm(
    x: jax.Array,
    weights: SparseLSTMWeights,
    carry0: tuple[jax.Array, jax.Array] | None = None,
    *,
    lengths: jax.Array | None = None,
    reverse: bool = False,
    impl: RecurrenceImpl = "auto",
    unroll: int = 16,
    **kernel_options: Any,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _sequence(x, weights, carry0, lengths, reverse, impl, unroll, kernel_options)


def sparse_rnn(
    x: jax.Array,
    weights: SparseRNNWeights,
    h0: jax.Array | None = None,
    *,
    lengths: jax.Array | None = None,
    reverse: bool = False,
    impl: RecurrenceImpl = "auto",
    unroll: int = 16,
    **kernel_options: Any,
) -> tuple[jax.Array, jax.Array]:
    return _sequence(x, weights, h0, lengths, reverse, impl, unroll, kernel_options)


def projected_sequence(
    xp: jax.Array,
    weights: SparseWeights,
    carry0: Any = None,
    *,
    lengths: jax.Array | None = None,
    reverse: bool = False,
    impl: RecurrenceImpl = "auto",
    unroll: int = 16,
    **kernel_options: Any,
) -> tuple[jax.Array, Any]:
    """`sparse_gru` / `sparse_lstm` / `sparse_rnn` from the input projections instead of the
    inputs: the same result as that function on inputs x when ``xp[:, t] = x[:, t] @ W_i +
    b`` (`input_projection`, batch-major), e.g. rows of a table of projected embeddings.

    Args:
      xp: (B, T, gates·H) input projections, biases included as the weights fold them
        (`input_projection`'s output with its time and batch axes swapped).
      weights: any of `SparseGRUWeights`, `SparseLSTMWeights`, `SparseRNNWeights`.
      carry0, lengths, reverse, impl, unroll, kernel_options: as in `sparse_gru` (the LSTM's
        carry0 is (h0, c0)).

    Returns:
      (outputs (B, T, H), final carry), as the cell's sequence function returns them.
    """
    return _sequence(xp, weights, carry0, lengths, reverse, impl, unroll, kernel_options,
                     projected=True)


_STEP_KERNEL = (', "pallas" (the GPU step kernel; "pallas_interpret" runs it in the Pallas '
                'interpreter; the persistent and Mosaic kernels are GRU only)')
sparse_gru.__doc__ = "A whole GRU sequence forward, like `RecurrentLayer(\"gru\", H)`.\n" + \
    _SEQUENCE_ARGS.format(
        builder="sparse_gru_weights", carry="h0: (B, H) initial state; zeros if None.",
        kernels=', "pallas", "persistent", "mosaic", "mosaic_persistent" (GPU kernels; '
        '"pallas_interpret" and '
        '"persistent_interpret" run them in the Pallas interpreter)',
        final="h (B, H), each row's state after its last valid step")
sparse_lstm.__doc__ = "A whole LSTM sequence forward, like `RecurrentLayer(\"lstm\", H)`.\n" + \
    _SEQUENCE_ARGS.format(
        builder="sparse_lstm_weights",
        carry="carry0: (h0, c0), each (B, H); zeros if None.", kernels=_STEP_KERNEL,
        final="(h, c), each (B, H), after each row's last valid step")
sparse_rnn.__doc__ = ("A whole vanilla-RNN sequence forward, like `RecurrentLayer(cell, H)` "
                      "with cell \"rnn\" or \"rnn_clipped_relu\":\nh_t = act(x_t W_i + "
                      "h_{t-1} W_h + b), W_h block-sparse.\n") + _SEQUENCE_ARGS.format(
    builder="sparse_rnn_weights", carry="h0: (B, H) initial state; zeros if None.",
    kernels=_STEP_KERNEL, final="h (B, H), each row's state after its last valid step")


# ----------------------------------------------------------------------------------------
# Both directions of a bidirectional layer as one recurrence.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BidirectionalWeights:
    """A bidirectional layer's two directions, prepared to run as one recurrence
    (`sparse_bidirectional`; built by `bidirectional_weights`).

    Attributes:
      forward, backward: each direction's prepared weights (same cell, H, D, block shape
        and dtype).
      pair: the two directions' recurrences as one layer of 2H units, for the block-sparse
        implementations: its recurrent kernel (2H, gates·2H) is block-diagonal (forward's h,
        rows 0..H-1, feeds forward's gate columns; backward's, rows H..2H-1, backward's),
        each gate's 2H columns [forward's H | backward's H] in the layout every kernel
        reads; the GRU's b_hn likewise [forward's | backward's]. Its w_i and input biases
        are None (each direction projects its own input). None when bh or bw does not
        divide H (a block would straddle the two directions).
    """

    forward: SparseWeights
    backward: SparseWeights
    pair: SparseWeights | None

    @property
    def cell(self) -> str:
        """The directions' cell."""
        return self.forward.cell


def _pair_recurrent_kernel(forward: BlockSparseMatrix, backward: BlockSparseMatrix,
                           hidden: int, gates: int) -> BlockSparseMatrix:
    """The block-diagonal (2H, gates·2H) BSC matrix of `BidirectionalWeights.pair` from the
    directions' (H, gates·H) ones (bh and bw dividing H)."""
    (bh, bw) = forward.block_shape
    per_gate = hidden // bw  # block columns of one gate of one direction
    values, rows, counts = [], [], []
    for g in range(gates):
        for w, row_offset in ((forward, 0), (backward, hidden // bh)):
            col_ptr = np.asarray(w.col_ptr)
            start, end = col_ptr[g * per_gate], col_ptr[(g + 1) * per_gate]
            values.append(np.asarray(w.values)[start:end])
            rows.append(np.asarray(w.row_indices)[start:end] + row_offset)
            counts.append(np.diff(col_ptr[g * per_gate:(g + 1) * per_gate + 1]))
    col_ptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int32)
    return BlockSparseMatrix(values=np.concatenate(values),
                             row_indices=np.concatenate(rows).astype(np.int32),
                             col_ptr=col_ptr, shape=(2 * hidden, gates * 2 * hidden),
                             block_shape=(bh, bw))


def bidirectional_weights(forward: SparseWeights, backward: SparseWeights
                          ) -> BidirectionalWeights:
    """The two directions' weights (from `sparse_gru_weights` etc.) prepared to run as one
    recurrence: `BidirectionalWeights` with the block-diagonal pair built on the host.

    Raises:
      ValueError: if the directions differ in cell, H, input width, block shape or dtype.
    """
    fields = [(w.cell, w.hidden, int(np.shape(w.w_i)[0]), w.block_shape,
               np.dtype(w.dtype)) for w in (forward, backward)]
    if fields[0] != fields[1]:
        raise ValueError("the two directions must have the same (cell, H, D, block shape, "
                         f"dtype); got forward {fields[0]} and backward {fields[1]}")
    hidden, (bh, bw), gates = forward.hidden, forward.block_shape, _n_gates(forward)
    if hidden % bh or hidden % bw:
        return BidirectionalWeights(forward, backward, None)
    w_h = _pair_recurrent_kernel(forward.w_h, backward.w_h, hidden, gates)
    if forward.cell == "gru":
        feat, panel = _ell_arrays(w_h, 2 * hidden) if forward.ell is not None else (None,
                                                                                     None)
        pair = SparseGRUWeights(
            w_i=None, b_i=None, w_h=w_h, ell_feat=feat, ell_values=panel, hidden=2 * hidden,
            b_hn=np.concatenate([np.asarray(forward.b_hn), np.asarray(backward.b_hn)]))
    elif forward.cell == "lstm":
        pair = SparseLSTMWeights(w_i=None, b=None, w_h=w_h, hidden=2 * hidden)
    else:
        pair = SparseRNNWeights(w_i=None, b=None, w_h=w_h, cell=forward.cell)
    return BidirectionalWeights(forward, backward, pair)


def _paired_dense(xps: tuple[jax.Array, jax.Array], weights: BidirectionalWeights,
                  parts: tuple[tuple[jax.Array, ...], ...], unroll: int) -> tuple:
    """The fused "dense" form: the two directions as P3's G = 2 modules of `cells.cell_step`
    (xp (T, 2, B, gates·H), carry (2, B, H), w_h (2, H, gates·H)), one scan. Returns per
    direction the carry parts' states, each (T, B, H)."""
    dtype = xps[0].dtype
    dense = [_dense_recurrent(w) for w in (weights.forward, weights.backward)]
    w_h = jnp.stack([w for w, _ in dense]).astype(dtype)
    b_h = jnp.stack([b for _, b in dense])[:, None].astype(dtype)
    carry0 = tuple(jnp.stack(pair) for pair in zip(*parts, strict=True))
    cell = weights.cell

    def step(carry, xp_t):
        carry, _ = cells.cell_step(cell, carry if cell == "lstm" else carry[0], xp_t, w_h, b_h)
        carry = carry if cell == "lstm" else (carry,)
        return carry, carry

    states = jax.lax.scan(step, carry0, jnp.stack(xps, axis=1), unroll=unroll)[1]
    return tuple(tuple(s[:, d] for s in states) for d in (0, 1))


def _paired_kernel(xps: tuple[jax.Array, jax.Array], weights: BidirectionalWeights,
                   parts: tuple[tuple[jax.Array, ...], ...], impl: str, unroll: int,
                   options: dict[str, Any]) -> tuple:
    """A block-sparse implementation on `weights.pair` (2H units, gates interleaved
    [forward | backward]); returns what `_paired_dense` returns."""
    hidden, gates = weights.forward.hidden, _n_gates(weights.forward)
    steps, batch, _ = xps[0].shape
    xp = jnp.stack([a.reshape(steps, batch, gates, hidden) for a in xps], axis=-2)
    carry0 = tuple(jnp.concatenate(pair, axis=-1) for pair in zip(*parts, strict=True))
    states = _recurrence(xp.reshape(steps, batch, gates * 2 * hidden), weights.pair,
                         carry0 if weights.cell == "lstm" else carry0[0], impl, unroll,
                         options)
    states = states if weights.cell == "lstm" else (states,)
    return tuple(tuple(s[..., d * hidden:(d + 1) * hidden] for s in states) for d in (0, 1))


def _bidirectional(x: Any, weights: BidirectionalWeights, carry0: Any,
                   lengths: jax.Array | None, impl: str, unroll: int,
                   separate: tuple[str, str], options: dict[str, Any],
                   projected: bool = False) -> tuple[tuple, tuple]:
    """`sparse_bidirectional`: lengths and directions as in `_sequence`, both directions
    advanced in the same step. With ``projected``, x is the pair (forward's, backward's) of
    input projections, each (B, T, gates·H) in input order."""
    if not isinstance(weights, BidirectionalWeights):
        raise ValueError("weights must be BidirectionalWeights (kernels.bidirectional_weights)"
                         f", got {type(weights).__name__}")
    directions = (weights.forward, weights.backward)
    if carry0 is None:
        carry0 = (None, None)
    elif not (isinstance(carry0, tuple | list) and len(carry0) == 2):
        raise ValueError("a bidirectional layer's initial carry is a pair (forward's, "
                         "backward's), each as its direction takes it, or None")
    if options and impl in ("auto", "dense"):
        raise ValueError(f"kernel options {sorted(options)} need a forced kernel impl=")
    if impl not in ("auto", "separate", "dense") and weights.pair is None:
        impl, separate = "separate", (impl, impl)  # no pair to run a kernel on
    inputs = tuple(x) if projected else (x, x)  # what each direction reads
    if projected and len(inputs) != 2:
        raise ValueError("projected inputs of a bidirectional layer are a pair (forward's, "
                         "backward's)")
    if impl == "separate":
        runs = [_sequence(xi, w, c, lengths, reverse, i, unroll, options, projected)
                for xi, w, c, reverse, i in zip(inputs, directions, carry0, (False, True),
                                                separate, strict=True)]
        return tuple(r[0] for r in runs), tuple(r[1] for r in runs)
    batch, steps, dtype, first, lengths = _checked_inputs(inputs[0], weights.forward,
                                                          carry0[0], lengths, projected)
    if projected:
        _checked_inputs(inputs[1], weights.backward, None, lengths, projected)
    carries = (first, _initial_carry(carry0[1], weights.backward, batch, dtype))
    impl = resolve_bidirectional_impl(weights, batch, steps, dtype, impl, separate)
    if impl == "separate":
        return _bidirectional(x, weights, carries, lengths, impl, unroll, separate, options,
                              projected)
    lstm = weights.cell == "lstm"
    parts = tuple(c if lstm else (c,) for c in carries)
    xps = tuple((jnp.swapaxes(_in_direction(xi, lengths, reverse), 0, 1) if projected else
                 input_projection(_in_direction(xi, lengths, reverse), w)).astype(dtype)
                for xi, w, reverse in zip(inputs, directions, (False, True), strict=True))
    if steps == 0:
        seqs = tuple(tuple(jnp.zeros((0, batch, w.hidden), dtype) for _ in p)
                     for w, p in zip(directions, parts, strict=True))
    elif impl == "dense":
        seqs = _paired_dense(xps, weights, parts, unroll)
    else:
        seqs = _paired_kernel(xps, weights, parts, impl, unroll, options)
    results = [_final_and_outputs(s, p, lengths, steps) for s, p in zip(seqs, parts,
                                                                          strict=True)]
    outputs = (results[0][0], _in_direction(results[1][0], lengths, True))
    return outputs, tuple(final if lstm else final[0] for _, final in results)


def resolve_bidirectional_impl(weights: BidirectionalWeights, batch: int, steps: int,
                               dtype: Any = None, impl: str = "auto",
                               separate: tuple[str, str] = ("auto", "auto")) -> str:
    """What `sparse_bidirectional(impl="auto")` runs: "dense" (the two directions as G = 2
    dense modules, one scan), a block-sparse implementation on the pair ("xla", "pallas",
    ... where `resolve_impl`'s checks pass for the 2H pair), or "separate" (today's two
    scans, each direction on ``separate``'s impl, "auto" measured per direction), measured
    against each other so that fusing is never slower than not; ``impl`` itself when it is
    not "auto". Call it on concrete weights, outside `jax.jit`, as `resolve_impl`."""
    if impl != "auto":
        return impl
    forward, backward = weights.forward, weights.backward
    dtype = _recurrence_dtype(forward) if dtype is None else dtype
    candidates: dict[str, Callable[[], str | None]] = {"dense": lambda: None,
                                                       "separate": lambda: None}
    if weights.pair is not None:
        candidates.update({name: check for name, check in _candidates(
            weights.pair, batch, steps, dtype).items() if name != "dense"})
    width = int(np.shape(forward.w_i)[0])
    key = autotune.key("sparse_bidirectional", cell=weights.cell, d=width, h=forward.hidden,
                       block=forward.block_shape, nnzb=forward.w_h.nnzb + backward.w_h.nnzb,
                       batch=batch, steps=steps, dtype=jnp.dtype(dtype).name)

    def make(name: str) -> Callable[[], Any]:
        x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, steps, width)), dtype)
        impls = tuple(resolve_impl(w, batch, steps, dtype, i) for w, i in zip(
            (forward, backward), separate, strict=True)) if name == "separate" else separate
        fn = jax.jit(lambda x: _bidirectional(x, weights, None, None, name, 16, impls, {})[0])
        return lambda: fn(x)

    return autotune.choose(key, candidates, make, measurable=autotune.is_concrete(weights),
                           fallback=("xla", "dense"))


def sparse_bidirectional(
    x: jax.Array,
    weights: BidirectionalWeights,
    carry0: tuple[Any, Any] | None = None,
    *,
    lengths: jax.Array | None = None,
    impl: str = "auto",
    separate: tuple[str, str] = ("auto", "auto"),
    unroll: int = 16,
    **kernel_options: Any,
) -> tuple[tuple[jax.Array, jax.Array], tuple[Any, Any]]:
    """A bidirectional layer's two directions over the same inputs, as ONE recurrence: the
    backward direction reads each row reversed within its length, both states advance in
    the same step (T sequential steps, not 2T), the backward outputs are reversed back.
    The numbers are those of `sparse_gru` / `sparse_lstm` / `sparse_rnn` run once per
    direction (``reverse=False`` and ``True``), up to float summation order.

    Args:
      x: (B, T, D) inputs.
      weights: `BidirectionalWeights` (`bidirectional_weights`).
      carry0: (forward's, backward's) initial carries, each as its direction takes it
        (h0 (B, H), or (h0, c0) for the LSTM; None: zeros), or None.
      lengths: (B,) int valid steps per row (None: all T), as in `sparse_gru`.
      impl: "auto" (`resolve_bidirectional_impl`), "dense" (G = 2 dense modules, one scan),
        "separate" (one sequence per direction, on ``separate``'s impls), or a block-sparse
        implementation of `sparse_gru` etc. run on the pair (which falls back to "separate"
        with that impl where there is no pair: H not a multiple of the block sides).
      separate: the directions' impls when they run separately.
      unroll: `lax.scan` unroll factor.
      **kernel_options: launch options of a forced kernel impl (as in `sparse_gru`).

    Returns:
      ((forward outputs, backward outputs), each (B, T, H) aligned with the inputs and zero
      at and past each length; (forward's, backward's) final carries).
    """
    return _bidirectional(x, weights, carry0, lengths, impl, unroll, separate,
                          kernel_options)


def projected_bidirectional(
    xps: tuple[jax.Array, jax.Array],
    weights: BidirectionalWeights,
    carry0: tuple[Any, Any] | None = None,
    *,
    lengths: jax.Array | None = None,
    impl: str = "auto",
    separate: tuple[str, str] = ("auto", "auto"),
    unroll: int = 16,
    **kernel_options: Any,
) -> tuple[tuple[jax.Array, jax.Array], tuple[Any, Any]]:
    """`sparse_bidirectional` from each direction's input projections instead of the
    inputs (as `projected_sequence` is to `sparse_gru`): the same result when ``xps[d][:, t]
    = x[:, t] @ W_i + b`` of direction d (`input_projection`, batch-major), e.g. projections
    that a layer norm has changed.

    Args:
      xps: (forward's, backward's) input projections, each (B, T, gates·H) in input order,
        biases included as the weights fold them.
      weights, carry0, lengths, impl, separate, unroll, kernel_options: as in
        `sparse_bidirectional`.

    Returns:
      As `sparse_bidirectional`.
    """
    return _bidirectional(xps, weights, carry0, lengths, impl, unroll, separate,
                          kernel_options, projected=True)


# ----------------------------------------------------------------------------------------
# A stack of unidirectional layers as one recurrence in wavefront order.


def _stack_checked(layers: tuple[SparseWeights, ...], x: jax.Array, carry0: Any,
                   lengths: jax.Array | None) -> tuple[int, int, Any, tuple, Any]:
    """(batch, steps, dtype, every layer's initial carry, lengths), checked."""
    layers = tuple(layers)
    if not layers:
        raise ValueError("a wavefront stack needs at least one layer")
    if len({w.cell for w in layers}) != 1:
        raise ValueError(f"the stacked layers must share a cell, got {[w.cell for w in layers]}")
    for below, above in zip(layers, layers[1:], strict=False):
        if int(np.shape(above.w_i)[0]) != below.hidden:
            raise ValueError(f"layer input width {np.shape(above.w_i)[0]} != the width "
                             f"{below.hidden} of the layer below it")
    carry0 = (None,) * len(layers) if carry0 is None else tuple(carry0)
    if len(carry0) != len(layers):
        raise ValueError(f"one initial carry per layer ({len(layers)}), got {len(carry0)}")
    batch, steps, dtype, first, lengths = _checked_inputs(x, layers[0], carry0[0], lengths)
    carries = (first, *(_initial_carry(c, w, batch, dtype)
                        for w, c in zip(layers[1:], carry0[1:], strict=True)))
    return batch, steps, dtype, carries, lengths


def _wavefront_dense(xp0: jax.Array, layers: tuple[SparseWeights, ...], parts: tuple,
                     lengths: jax.Array | None, unroll: int) -> tuple[jax.Array, tuple]:
    """The wavefront scan on the masked dense kernels: T + L - 1 steps; at step s layer l
    advances its time t = s - l (a state changes only where 0 <= t < length). Layer 0 reads
    its hoisted projection xp0 (T, B, gates·H_0); layer l >= 1 projects layer l-1's state
    of the step before (its output at time t) inside the step. With equal H the L
    recurrent products are one G = L batched product (`cells.cell_step`'s module form)
    and the L - 1 input products one G = L - 1 product.

    Returns the last layer's states (T, B, H_{L-1}) (rows past a length: whatever, the
    caller zeroes them) and each layer's final carry parts."""
    cell, depth = layers[0].cell, len(layers)
    steps, batch, _ = xp0.shape
    dtype = xp0.dtype
    lstm = cell == "lstm"
    dense = [_dense_recurrent(w) for w in layers]
    w_i = [jnp.asarray(w.w_i).astype(dtype) for w in layers[1:]]
    b_i = [jnp.asarray(w.b_i if cell == "gru" else w.b).astype(dtype) for w in layers[1:]]
    stacked = len({w.hidden for w in layers}) == 1
    if stacked:
        w_h = jnp.stack([w for w, _ in dense]).astype(dtype)
        b_h = jnp.stack([b for _, b in dense])[:, None].astype(dtype)
        carry0 = tuple(jnp.stack(p) for p in zip(*parts, strict=True))
        if depth > 1:
            w_in, b_in = jnp.stack(w_i), jnp.stack(b_i)[:, None]
    else:
        w_h = [w.astype(dtype) for w, _ in dense]
        b_h = [b.astype(dtype) for _, b in dense]
        carry0 = tuple(parts)
    limit = jnp.full((batch,), steps) if lengths is None else lengths
    padded = jnp.concatenate([xp0, jnp.zeros((depth - 1, *xp0.shape[1:]), dtype)])

    def valid(s: jax.Array, layer: int) -> jax.Array:  # (B, 1): layer's t = s - l counts
        t = s - layer
        return ((t >= 0) & (t < limit))[:, None]

    def step(carry, inputs):
        s, xp_0 = inputs
        if stacked:
            h = carry[0]  # (L, B, H): each layer's output at its previous time
            xp = xp_0[None] if depth == 1 else jnp.concatenate(
                [xp_0[None], jnp.einsum("kbi,kig->kbg", h[:-1], w_in) + b_in])
            new, _ = cells.cell_step(cell, carry if lstm else h, xp, w_h, b_h)
            new = new if lstm else (new,)
            mask = jnp.stack([valid(s, layer) for layer in range(depth)])
            carry = tuple(jnp.where(mask, n, o) for n, o in zip(new, carry, strict=True))
            return carry, carry[0][-1]
        out = []
        for layer in range(depth):
            xp = xp_0 if layer == 0 else jnp.dot(carry[layer - 1][0], w_i[layer - 1]) + b_i[
                layer - 1]
            old = carry[layer]
            new, _ = cells.cell_step(cell, old if lstm else old[0], xp, w_h[layer], b_h[layer])
            new = new if lstm else (new,)
            out.append(tuple(jnp.where(valid(s, layer), n, o)
                             for n, o in zip(new, old, strict=True)))
        carry = tuple(out)
        return carry, carry[-1][0]

    final, ys = jax.lax.scan(step, carry0, (jnp.arange(steps + depth - 1), padded),
                             unroll=unroll)
    if stacked:
        final = tuple(tuple(p[layer] for p in final) for layer in range(depth))
    return ys[depth - 1:], final


def _stack(x: jax.Array, layers: tuple[SparseWeights, ...], carry0: Any,
           lengths: jax.Array | None, impl: str, unroll: int, separate: tuple[str, ...]
           ) -> tuple[jax.Array, tuple]:
    """`sparse_stack`: "separate" runs `_sequence` layer after layer; "wavefront" the one
    scan of `_wavefront_dense`."""
    layers = tuple(layers)
    separate = tuple(separate) if separate else ("auto",) * len(layers)
    if len(separate) != len(layers):
        raise ValueError(f"separate needs one impl per layer ({len(layers)}), got {separate}")
    batch, steps, dtype, carries, lengths = _stack_checked(layers, x, carry0, lengths)
    impl = resolve_stack_impl(layers, batch, steps, dtype, impl, separate)
    if impl == "separate":
        finals = []
        for w, c, i in zip(layers, carries, separate, strict=True):
            x, c = _sequence(x, w, c, lengths, False, i, unroll, {})
            finals.append(c)
        return x, tuple(finals)
    if impl != "wavefront":
        raise ValueError(f"impl must be 'auto', 'wavefront' or 'separate', got {impl!r}")
    lstm = layers[0].cell == "lstm"
    parts = tuple(c if lstm else (c,) for c in carries)
    if steps == 0:
        return jnp.zeros((batch, 0, layers[-1].hidden), dtype), carries
    xp0 = input_projection(x, layers[0]).astype(dtype)
    ys, finals = _wavefront_dense(xp0, layers, parts, lengths, unroll)
    outputs, _ = _final_and_outputs((ys,), parts[-1][:1], lengths, steps)
    return outputs, tuple(f if lstm else f[0] for f in finals)


def resolve_stack_impl(layers: tuple[SparseWeights, ...], batch: int, steps: int,
                       dtype: Any = None, impl: str = "auto",
                       separate: tuple[str, ...] | None = None) -> str:
    """What `sparse_stack(impl="auto")` runs: "wavefront" (one scan of T + L - 1 steps on
    the masked dense kernels) or "separate" (the layers one after the other, each on
    ``separate``'s impl, "auto" measured per layer), measured against each other so that
    the wavefront is never slower than not; ``impl`` itself when it is not "auto". Call it
    on concrete weights, outside `jax.jit`, as `resolve_impl`."""
    if impl != "auto":
        return impl
    layers = tuple(layers)
    separate = tuple(separate) if separate else ("auto",) * len(layers)
    first = layers[0]
    dtype = _recurrence_dtype(first) if dtype is None else dtype
    width = int(np.shape(first.w_i)[0])
    key = autotune.key("sparse_stack", cell=first.cell, d=width,
                       h=tuple(w.hidden for w in layers),
                       block=tuple(w.block_shape for w in layers),
                       nnzb=tuple(w.w_h.nnzb for w in layers), batch=batch, steps=steps,
                       dtype=jnp.dtype(dtype).name)

    def make(name: str) -> Callable[[], Any]:
        x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, steps, width)), dtype)
        impls = tuple(resolve_impl(w, batch, steps, dtype, i) for w, i in zip(
            layers, separate, strict=True)) if name == "separate" else separate
        fn = jax.jit(lambda x: _stack(x, layers, None, None, name, 16, impls)[0])
        return lambda: fn(x)

    return autotune.choose(key, {"wavefront": lambda: None, "separate": lambda: None}, make,
                           measurable=autotune.is_concrete(layers),
                           fallback=("separate",))


def sparse_stack(
    x: jax.Array,
    layers: tuple[SparseWeights, ...],
    carry0: tuple[Any, ...] | None = None,
    *,
    lengths: jax.Array | None = None,
    impl: str = "auto",
    separate: tuple[str, ...] | None = None,
    unroll: int = 16,
) -> tuple[jax.Array, tuple[Any, ...]]:
    """A stack of L forward (unidirectional) layers, each reading the one below's outputs,
    as ONE recurrence in wavefront order: at scan step s layer l advances its time step
    t = s - l, so T + L - 1 sequential steps instead of L·T (at batch 1 a step is latency
    bound, so this is up to L times fewer). The numbers are those of `sparse_gru` /
    `sparse_lstm` / `sparse_rnn` run layer after layer, up to float summation order.

    Args:
      x: (B, T, D) inputs of the first layer.
      layers: the layers' prepared weights, bottom first (one cell; layer l's input width
        is layer l-1's H).
      carry0: one initial carry per layer (as each layer takes it; None: zeros), or None.
      lengths: (B,) int valid steps per row (None: all T); each layer's state changes only
        at its own valid time steps.
      impl: "auto" (`resolve_stack_impl`), "wavefront" (the one scan on the masked dense
        kernels: P3's G = L module form of `bsrnn.cells.cell_step` when the layers' H are
        equal), or "separate" (layer after layer on ``separate``'s impls).
      separate: the layers' impls when they run separately (default all "auto").
      unroll: `lax.scan` unroll factor.

    Returns:
      the last layer's outputs (B, T, H_{L-1}), zero at and past each length, and every
      layer's final carry (what `sparse_gru` etc. give for it).
    """
    return _stack(x, layers, carry0, lengths, impl, unroll, separate)
