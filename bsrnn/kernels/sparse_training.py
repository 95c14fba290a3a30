"""Sparse training once learned masks freeze: the recurrent product of a block-pruned layer
on its kept blocks only, forward and backward.

After a pruning schedule's end step the masks no longer change (P1 freezes at about 40% of
training), so the block structure of every recurrent kernel is fixed and the rest of
training can run on it. :func:`freeze` reads the structure off the masks on the host, once;
:class:`bsrnn.cells.RecurrentLayer` given it (``frozen_recurrent=``) computes each step's
h @ W_h with W_h block-sparse (BSC, :mod:`bsrnn.kernels.bsc`), gates side by side:

* forward: ``bsc_matmul_xla(h, W_h)``, or on GPUs the Pallas (Triton) kernel of
  :func:`bsrnn.kernels.bsc_matmul` (:attr:`FrozenBlocks.impl`), at JAX's default matmul
  precision like the masked dense layer's product (TF32 for float32 on recent GPUs);
* backward (a custom VJP): dh = dy @ W_hᵀ (:func:`transposed_matmul`), again a block-sparse
  product by the same implementation, with W_hᵀ stored as BSC too (the same blocks
  transposed, ordered by W_h's block rows, so its sum over blocks is a sorted segment sum, no
  scatter); the weight gradient only for the kept blocks, dW_k = h[:, rows of k]ᵀ @
  dy[:, cols of k], shape (nnzb, bh, bw), either as nnzb small products of gathered rows
  and columns or as the kept blocks of one dense product hᵀ @ dy
  (:attr:`FrozenBlocks.weight_grad`).

The layer's recurrence (:func:`bsrnn.cells.hoisted_recurrence`, the default) calls the
dh-only product (:meth:`SparseRecurrentKernel.transposed_product`) at each backward step and
this VJP's weight gradient once, over the h of all steps stacked (T·B rows).

The params stay the dense kernels (same params, masks and checkpoints as the masked dense
layer): each call gathers the kept blocks from them, and the gather's gradient scatters the
block gradients back, so a pruned entry gets a zero gradient (not :func:`bsrnn.cells.
apply_mask`'s straight-through one; with hard pruning or ``keep_masked`` its update is zero
either way). Each gate's kernel is tiled on its own, padded to whole blocks (gate q holds
block columns q·ceil(H/bw) ...), so partial edge blocks (H not a multiple of bh or bw) work.

A frozen layer checks its masks in the graph: masks that differ from the frozen structure
turn its outputs to NaN, never into a silently wrong product.

    frozen = freeze(masks, (16, 16))                    # on the host, after the end step
    fast = model.clone(frozen_recurrent=frozen)         # same params and masks
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict

from bsrnn import blocks, cells
from bsrnn.kernels.bsc import BlockSparseMatrix, block_keep
from bsrnn.kernels.pallas_gpu import bsc_matmul_pallas
from bsrnn.kernels.xla import bsc_matmul_xla


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenBlocks:
    """The fixed block structure of one layer's fused recurrent kernel (H, gates·H).

    Hashed by identity (it is a static argument of the custom VJP).

    Attributes:
      hidden: H.
      gates: the gate names, in the order of :data:`bsrnn.cells.GATES`.
      block_shape: (bh, bw).
      keep: (gates, ceil(H/bh), ceil(H/bw)) bool, the kept blocks of each gate's kernel.
      row_indices, col_ptr: BSC of the fused kernel (H, gates·Hp), Hp = ceil(H/bw)·bw:
        (nnzb,) block rows and (gates·ceil(H/bw) + 1,) column pointers (int32).
      col_ids: (nnzb,) int32 block column of each stored block.
      t_order: (nnzb,) int32, the stored blocks in the order of the transposed kernel's BSC
        (by block row of W_h, then block column).
      t_col_ptr: (ceil(H/bh) + 1,) int32 column pointers of W_hᵀ.
      impl: how the per-step products h @ W_h and dy @ W_hᵀ run (:func:`bsrnn.kernels.
        bsc_matmul`'s ``impl``): "xla" (:func:`bsrnn.kernels.xla.bsc_matmul_xla`),
        "pallas" (the Triton kernel, GPUs only), "pallas_interpret" (the same kernel in
        the Pallas interpreter, any backend, slow: tests), or "auto": "pallas" where the
        default backend is a GPU, else "xla".
      weight_grad: how the backward computes the kept blocks' weight gradient from the
        product's input h (N, H) and output cotangent dy (N, gates·Hp) (N = T·B rows in the
        hoisted VJP): "blocks", one batched product over the kept blocks, dW_k = h[:, rows
        of k]ᵀ @ dy[:, cols of k], on two gathered (N, nnzb, bh) and (N, nnzb, bw) copies
        (a fraction nnzb/blocks of the multiply-adds, but the gathers write N·nnzb·(bh +
        bw) values, about 2 GB in float32 at issue 14's H200 shape); "dense", ONE dense
        product dW = hᵀ @ dy (H, gates·Hp), as the masked dense layer's, then its kept
        blocks (:func:`gather_blocks`); "auto": "dense", except on CPUs for at most
        :data:`CPU_BLOCKS_MAX_KEPT` kept weights (nnzb·bh·bw), where "blocks". Why: the
        dense product's cost does not depend on the masks, the batched one's grows with
        nnzb at a few times lower throughput per multiply-add; on GPUs the GEMM runs on
        tensor cores where the gathers are memory traffic. On a 2-core CPU "blocks" was
        faster only at 10% kept and H <= 512 (by 6-7%) and up to 7x slower elsewhere
        (``experiments/bench/weight_grad.py``, WORKSPACE.md, issue 14). Both run at
        the default matmul precision (``jax_default_matmul_precision``), as the masked dense
        layer's weight gradient does (TF32 on recent GPUs unless set to "highest").
    """

    hidden: int
    gates: tuple[str, ...]
    block_shape: tuple[int, int]
    keep: np.ndarray = dataclasses.field(repr=False)
    row_indices: np.ndarray = dataclasses.field(repr=False)
    col_ptr: np.ndarray = dataclasses.field(repr=False)
    col_ids: np.ndarray = dataclasses.field(repr=False)
    t_order: np.ndarray = dataclasses.field(repr=False)
    t_col_ptr: np.ndarray = dataclasses.field(repr=False)
    impl: str = "auto"
    weight_grad: str = "auto"

    @property
    def nnzb(self) -> int:
        """Number of kept blocks over all gates."""
        return int(self.row_indices.size)

    @property
    def padded(self) -> int:
        """Hp = ceil(H / bw)·bw, the padded width of each gate in the fused kernel."""
        return self.keep.shape[2] * self.block_shape[1]

    @classmethod
    def from_masks(cls, masks: Sequence[Any], gates: Sequence[str],
                   block_shape: tuple[int, int], impl: str = "auto",
                   weight_grad: str = "auto") -> FrozenBlocks:
        """The structure of the (H, H) masks of a layer's gates (concrete, block-structured
        for ``block_shape``; ``ValueError`` otherwise); ``impl`` and ``weight_grad`` as the
        attributes."""
        if impl not in PRODUCT_IMPLS:
            raise ValueError(f"impl={impl!r}: choose one of {PRODUCT_IMPLS}.")
        if weight_grad not in WEIGHT_GRADS:
            raise ValueError(f"weight_grad={weight_grad!r}: choose one of {WEIGHT_GRADS}.")
        hidden = int(np.shape(masks[0])[0])
        if any(np.shape(m) != (hidden, hidden) for m in masks):
            raise ValueError(f"recurrent masks must be (H, H), got {[np.shape(m) for m in masks]}.")
        keep = np.stack([block_keep(np.asarray(m, bool), block_shape) for m in masks])
        fused = np.concatenate(list(keep), axis=1)  # (nbr, gates·nbc)
        col_ids, row_indices = np.nonzero(fused.T)  # BSC order: by column, then row
        col_ptr = np.concatenate([[0], np.cumsum(fused.sum(axis=0))])
        t_order = np.lexsort((col_ids, row_indices))  # by row, then column
        t_col_ptr = np.concatenate([[0], np.cumsum(fused.sum(axis=1))])
        as_int = functools.partial(np.asarray, dtype=np.int32)
        return cls(hidden, tuple(gates), tuple(block_shape), keep,
                   as_int(row_indices), as_int(col_ptr), as_int(col_ids), as_int(t_order),
                   as_int(t_col_ptr), impl, weight_grad)

    def product_impl(self) -> str:
        """The ``impl`` the products run now: "auto" resolved for the default backend."""
        if self.impl != "auto":
            return self.impl
        return "pallas" if jax.default_backend() == "gpu" else "xla"

    def weight_grad_mode(self) -> str:
        """The ``weight_grad`` the backward runs now: "auto" resolved for the default
        backend and the number of kept weights (see the attribute)."""
        if self.weight_grad != "auto":
            return self.weight_grad
        kept = self.nnzb * self.block_shape[0] * self.block_shape[1]
        cpu = jax.default_backend() == "cpu"
        return "blocks" if cpu and kept <= CPU_BLOCKS_MAX_KEPT else "dense"


def freeze(masks: Any, block_shape: tuple[int, int],
           impl: str = "auto", weight_grad: str = "auto") -> FrozenDict[str, FrozenBlocks]:
    """The frozen structure of every :class:`bsrnn.cells.RecurrentLayer` in a masks tree.

    Args:
      masks: a model's ``masks`` collection (concrete: numpy or device arrays).
      block_shape: (bh, bw) the recurrent masks were pruned with.
      impl: the per-step products' implementation (:attr:`FrozenBlocks.impl`).
      weight_grad: how the kept blocks' weight gradient is computed ("blocks", "dense" or
        "auto", :attr:`FrozenBlocks.weight_grad`).

    Returns:
      ``{layer path ("layer_0", "rnn/layer_1_fwd", ...): FrozenBlocks}``, for the models'
      ``frozen_recurrent`` attribute (a hashable mapping, as Flax module attributes are).
    """
    by_layer: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, mask in traverse_util.flatten_dict(jax.device_get(masks)).items():
        if len(path) >= 2 and path[-1] == "kernel" and path[-2].startswith("recurrent_"):
            by_layer.setdefault(path[:-2], {})[path[-2].removeprefix("recurrent_")] = mask
    frozen = {}
    for layer, gate_masks in by_layer.items():
        gates = next((g for g in cells.GATES.values() if set(g) == set(gate_masks)), None)
        if gates is None:
            raise ValueError(f"{'/'.join(layer)} has recurrent gates {sorted(gate_masks)}, "
                             f"not those of a cell in {cells.GATES}.")
        frozen["/".join(layer)] = FrozenBlocks.from_masks(
            [gate_masks[g] for g in gates], gates, block_shape, impl, weight_grad)
    return FrozenDict(frozen)


def _matrix(blocks_: FrozenBlocks, values: jax.Array) -> BlockSparseMatrix:
    """W_h (H, gates·Hp) as a BlockSparseMatrix of ``values`` (nnzb, bh, bw)."""
    return BlockSparseMatrix(values, blocks_.row_indices, blocks_.col_ptr,
                             (blocks_.hidden, len(blocks_.gates) * blocks_.padded),
                             blocks_.block_shape)


def _transposed(blocks_: FrozenBlocks, values: jax.Array) -> BlockSparseMatrix:
    """W_hᵀ (gates·Hp, H), blocks (bw, bh)."""
    bh, bw = blocks_.block_shape
    return BlockSparseMatrix(jnp.swapaxes(values[blocks_.t_order], 1, 2),
                             blocks_.col_ids[blocks_.t_order], blocks_.t_col_ptr,
                             (len(blocks_.gates) * blocks_.padded, blocks_.hidden), (bw, bh))


PRODUCT_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
WEIGHT_GRADS = ("auto", "blocks", "dense")
# Kept weights up to which "auto" computes the weight gradient by "blocks" on CPUs (measured,
# see FrozenBlocks.weight_grad): 128 blocks of 16x16.
CPU_BLOCKS_MAX_KEPT = 32768


def _bsc_product(blocks_: FrozenBlocks, x: jax.Array, w: BlockSparseMatrix) -> jax.Array:
    """x @ w by ``blocks_.product_impl()``: the Pallas kernel of :func:`bsrnn.kernels.
    bsc_matmul` or :func:`bsc_matmul_xla`, at JAX's default matmul precision, as the masked
    dense layer's products (TF32 for float32 on recent GPUs unless the default is
    "highest")."""
    impl = blocks_.product_impl()
    if impl == "xla":
        return bsc_matmul_xla(x, w, precision=None)
    if impl == "pallas" and jax.default_backend() != "gpu":
        raise ValueError("impl='pallas' needs a GPU; use 'auto', 'xla' or 'pallas_interpret'")
    return bsc_matmul_pallas(x, w, interpret=impl == "pallas_interpret", precision=None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def block_sparse_matmul(blocks_: FrozenBlocks, h: jax.Array, values: jax.Array) -> jax.Array:
    """y = h @ W_h on the kept blocks.

    Args:
      blocks_: the frozen structure.
      h: (B, H).
      values: (nnzb, bh, bw), the kept blocks (:func:`gather_blocks`).

    Returns:
      (B, gates·Hp), gate q in columns q·Hp to q·Hp + H (the rest zero).
    """
    return _bsc_product(blocks_, h, _matrix(blocks_, values))


def transposed_matmul(blocks_: FrozenBlocks, dy: jax.Array, values: jax.Array) -> jax.Array:
    """dh = dy @ W_hᵀ on the kept blocks (W_hᵀ stored block-sparse, see the module
    docstring): dy (B, gates·Hp) -> (B, H). The gradient of :func:`block_sparse_matmul`
    w.r.t. h alone, no weight gradient."""
    return _bsc_product(blocks_, dy, _transposed(blocks_, values))


def _matmul_fwd(blocks_, h, values):
    return block_sparse_matmul(blocks_, h, values), (h, values)


def _matmul_bwd(blocks_, residuals, dy):
    h, values = residuals
    dh = transposed_matmul(blocks_, dy, values).astype(h.dtype)
    return dh, kept_weight_grad(blocks_, h, dy).astype(values.dtype)


block_sparse_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def kept_weight_grad(blocks_: FrozenBlocks, h: jax.Array, dy: jax.Array) -> jax.Array:
    """The weight gradient of :func:`block_sparse_matmul` on the kept blocks, dW_k =
    h[:, rows of k]ᵀ @ dy[:, cols of k], by ``blocks_.weight_grad_mode()`` (see
    :attr:`FrozenBlocks.weight_grad`), at the default matmul precision.

    Args:
      blocks_: the frozen structure.
      h: (N, H), the product's input.
      dy: (N, gates·Hp), the cotangent of its output.

    Returns:
      (nnzb, bh, bw) in BSC order; entries of partial edge blocks outside the kernel are
      zero.
    """
    gates, (bh, bw), nbr = len(blocks_.gates), blocks_.block_shape, blocks_.keep.shape[1]
    if blocks_.weight_grad_mode() == "dense":
        return gather_blocks(blocks_, jnp.split(jnp.dot(h.T, dy), gates, axis=1))
    hb = jnp.pad(h, ((0, 0), (0, nbr * bh - h.shape[1]))).reshape(h.shape[0], nbr, bh)
    dyb = dy.reshape(dy.shape[0], -1, bw)
    h_rows = jnp.take(hb, blocks_.row_indices, axis=1)  # (N, nnzb, bh)
    dy_cols = jnp.take(dyb, blocks_.col_ids, axis=1)  # (N, nnzb, bw)
    return jnp.einsum("nkb,nkc->kbc", h_rows, dy_cols)


def gather_blocks(blocks_: FrozenBlocks, kernels: Sequence[jax.Array]) -> jax.Array:
    """The kept blocks (nnzb, bh, bw) of the gates' dense kernels, in BSC order: each (H, H)
    (the params) or (H, Hp) (padded to whole block columns, as a gate's columns of the fused
    kernel); entries of partial edge blocks outside the kernel are zero. Differentiable."""
    (bh, bw), (_, nbr, nbc) = blocks_.block_shape, blocks_.keep.shape
    widths = (blocks_.hidden, blocks_.padded)
    if len(kernels) != len(blocks_.gates) or any(
            k.shape[0] != blocks_.hidden or k.shape[1] not in widths for k in kernels):
        raise ValueError(f"gather_blocks: expected {len(blocks_.gates)} kernels, each "
                         f"(H, H) or (H, Hp): {' or '.join(str((widths[0], w)) for w in widths)}"
                         f", got {[tuple(k.shape) for k in kernels]}.")
    tiles = jnp.stack([
        jnp.pad(k, ((0, nbr * bh - k.shape[0]), (0, nbc * bw - k.shape[1])))
        .reshape(nbr, bh, nbc, bw)
        for k in kernels
    ])  # (gates, nbr, bh, nbc, bw)
    gate, col = np.divmod(blocks_.col_ids, nbc)
    return tiles[gate, blocks_.row_indices, :, col, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseRecurrentKernel:
    """A frozen layer's recurrent kernel: ``h @ kernel`` is :func:`block_sparse_matmul`,
    (B, H) -> (B, gates·H), as :func:`bsrnn.cells.recurrent_product` expects.

    Attributes:
      values: (nnzb, bh, bw) kept blocks.
      blocks: the structure (static).
    """

    values: jax.Array
    blocks: FrozenBlocks = dataclasses.field(metadata={"static": True})

    @property
    def dtype(self) -> np.dtype:
        """dtype of the block values."""
        return self.values.dtype

    def __rmatmul__(self, h: jax.Array) -> jax.Array:
        """h (B, H) @ W_h -> (B, gates·H) in the values' dtype."""
        y = block_sparse_matmul(self.blocks, h.astype(self.values.dtype), self.values)
        gates, hp = len(self.blocks.gates), self.blocks.padded
        return y.reshape(h.shape[0], gates, hp)[:, :, : self.blocks.hidden].reshape(
            h.shape[0], -1)

    def transposed_product(self, dy: jax.Array) -> jax.Array:
        """dy (B, gates·H) @ W_hᵀ -> (B, H): the gradient of ``h @ kernel`` w.r.t. h only
        (:func:`transposed_matmul`; for :func:`bsrnn.cells.recurrent_product_transpose`)."""
        gates, hidden, hp = len(self.blocks.gates), self.blocks.hidden, self.blocks.padded
        dy = dy.astype(self.values.dtype).reshape(dy.shape[0], gates, hidden)
        dy = jnp.pad(dy, ((0, 0), (0, 0), (0, hp - hidden))).reshape(dy.shape[0], -1)
        return transposed_matmul(self.blocks, dy, self.values)


def recurrent_kernel(
    blocks_: FrozenBlocks, kernels: Sequence[jax.Array], masks: Sequence[jax.Array], name: str
) -> SparseRecurrentKernel:
    """A frozen layer's kernel from its gates' dense (H, H) kernels and masks.

    Concrete masks that differ from the frozen structure raise ``ValueError``; traced ones
    (under ``jit``) turn the kernel to NaN instead (see the module docstring).
    """
    shape = (blocks_.hidden, blocks_.hidden)

    def changed_entries(masks: Sequence[Any]) -> jax.Array:
        return sum(jnp.sum(m != blocks.expand_blocks(jnp.asarray(k), blocks_.block_shape, shape),
                           dtype=jnp.int32) for m, k in zip(masks, blocks_.keep, strict=True))

    traced = any(isinstance(m, jax.core.Tracer) for m in masks)
    if traced:
        changed = changed_entries(masks)
    else:
        with jax.ensure_compile_time_eval():  # on the host even while tracing
            count = int(changed_entries([np.asarray(m) for m in masks]))
        if count:
            raise ValueError(
                f"{name}: the masks differ from the frozen block structure in {count} "
                "entries; freeze again (bsrnn.kernels.sparse_training.freeze) from the masks "
                "the layer is applied with."
            )
    values = gather_blocks(blocks_, kernels)
    if traced:
        values = jnp.where(changed > 0, jnp.nan, values)
    return SparseRecurrentKernel(values, blocks_)


def frozen_for(frozen: Mapping[str, FrozenBlocks] | None, path: Sequence[str]) -> \
        FrozenBlocks | None:
    """The entry of the layer at ``path`` in a :func:`freeze` mapping, or ``None``."""
    return None if frozen is None else frozen.get("/".join(path))
