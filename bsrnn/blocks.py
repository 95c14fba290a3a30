"""Block tiling of weight matrices: block scores, block norms and mask patterns.

A 2-D kernel of shape (rows, cols) is tiled into blocks of shape (bh, bw) starting at (0, 0).
When a side is not a multiple of the block side, the last block row or column is a partial
edge block and every reduction runs over the entries it holds. With ``num_gates > 1`` the
last axis is first split into that many equal gate matrices (a fused GRU/LSTM layout such as
(in, 3·H)) and each gate is tiled on its own, so no block straddles two gates.

The block grid of a kernel therefore has shape
``(ceil(rows / bh), num_gates · ceil(cols / num_gates / bw))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BlockShape = tuple[int, int]

REDUCTIONS = ("max", "mean", "rms", "geomean", "median")


def check_block_shape(block_shape: BlockShape, shape: tuple[int, ...], num_gates: int = 1) -> None:
    """Raise ``ValueError`` unless ``block_shape`` can tile a matrix of ``shape``.

    Args:
      block_shape: (bh, bw), positive ints, each at most the matching side of one gate matrix.
      shape: the kernel's shape; must be 2-D.
      num_gates: number of gate matrices fused along the last axis.
    """
    if len(shape) != 2:
        raise ValueError(f"block tiling needs a 2-D kernel, got shape {shape}.")
    if num_gates < 1 or shape[1] % num_gates:
        raise ValueError(
            f"num_gates={num_gates} must be >= 1 and divide the kernel's last side {shape[1]}."
        )
    if (
        not isinstance(block_shape, tuple | list)
        or len(block_shape) != 2
        or not all(isinstance(b, int | np.integer) for b in block_shape)
    ):
        raise ValueError(f"block_shape must be a pair of ints (bh, bw), got {block_shape!r}.")
    bh, bw = block_shape
    rows, cols = shape[0], shape[1] // num_gates
    if bh < 1 or bw < 1:
        raise ValueError(f"block_shape {tuple(block_shape)} must be positive, e.g. (4, 4).")
    if bh > rows or bw > cols:
        raise ValueError(
            f"block_shape {tuple(block_shape)} is larger than the {rows}x{cols} matrix it tiles"
            f"{' (one gate of ' + str(num_gates) + ')' if num_gates > 1 else ''}; "
            f"use blocks of at most ({rows}, {cols})."
        )


def check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of :data:`REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown block reduction {reduction!r}; choose one of {REDUCTIONS}.")


def grid_shape(shape: tuple[int, int], block_shape: BlockShape, num_gates: int = 1) -> BlockShape:
    """The shape of the block grid of a ``shape`` kernel (see the module docstring)."""
    bh, bw = block_shape
    return math.ceil(shape[0] / bh), num_gates * math.ceil(shape[1] // num_gates / bw)


def _to_blocks(w: jax.Array, block_shape: BlockShape, fill: float) -> jax.Array:
    """(rows, cols) -> (grid_rows, grid_cols, bh·bw), edge blocks padded with ``fill``."""
    bh, bw = block_shape
    rows, cols = w.shape
    gr, gc = math.ceil(rows / bh), math.ceil(cols / bw)
    w = jnp.pad(w, ((0, gr * bh - rows), (0, gc * bw - cols)), constant_values=fill)
    return w.reshape(gr, bh, gc, bw).transpose(0, 2, 1, 3).reshape(gr, gc, bh * bw)


def _per_gate(
    fn: Callable[[jax.Array], jax.Array], w: jax.Array, num_gates: int
) -> jax.Array:
    """Apply ``fn`` (a tiling function returning a block grid) to each gate, concat columns."""
    if num_gates == 1:
        return fn(w)
    return jnp.concatenate([fn(g) for g in jnp.split(w, num_gates, axis=1)], axis=1)


def block_scores(
    w: jax.Array, block_shape: BlockShape, reduction: str = "max", num_gates: int = 1
) -> jax.Array:
    """Reduce |w| over every block.

    Args:
      w: kernel, shape (rows, cols).
      block_shape: (bh, bw).
      reduction: ``max`` (P1), or P1's future-work reductions ``mean``, ``rms``
        (sqrt of the mean square), ``geomean`` (exp of the mean log; 0 if the block holds a 0)
        and ``median``.
      num_gates: gate matrices fused along the last axis, tiled separately.

    Returns:
      Scores, shape ``grid_shape(w.shape, block_shape, num_gates)``; partial edge blocks are
      reduced over the entries they hold.
    """
    check_reduction(reduction)
    check_block_shape(block_shape, w.shape, num_gates)
    a = jnp.abs(w.astype(jnp.float32))

    def score(g: jax.Array) -> jax.Array:
        # Partial edge blocks are padded with NaN and reduced with NaN-skipping reductions;
        # when the blocks tile the matrix exactly the plain (faster) reductions do.
        partial = g.shape[0] % block_shape[0] or g.shape[1] % block_shape[1]
        blocks = _to_blocks(g, block_shape, jnp.nan)
        max_, mean, median = (
            (jnp.nanmax, jnp.nanmean, jnp.nanmedian) if partial else (jnp.max, jnp.mean,
                                                                     jnp.median)
        )
        if reduction == "max":
            return max_(blocks, axis=-1)
        if reduction == "mean":
            return mean(blocks, axis=-1)
        if reduction == "rms":
            return jnp.sqrt(mean(blocks**2, axis=-1))
        if reduction == "geomean":
            return jnp.exp(mean(jnp.log(blocks), axis=-1))
        return median(blocks, axis=-1)

    return _per_gate(score, a, num_gates)


def block_norms(w: jax.Array, block_shape: BlockShape, num_gates: int = 1) -> jax.Array:
    """The L2 norm ‖w_g‖₂ of every block (group lasso's groups), shape as :func:`block_scores`.

    Differentiable; the caller is responsible for the gradient at a zero block (see
    :func:`bsrnn.pruning.group_lasso`, which never differentiates through this function).
    """
    check_block_shape(block_shape, w.shape, num_gates)
    return _per_gate(
        lambda g: jnp.sqrt(jnp.sum(_to_blocks(g, block_shape, 0.0) ** 2, axis=-1)), w, num_gates
    )


def expand_blocks(
    grid: jax.Array, block_shape: BlockShape, shape: tuple[int, int], num_gates: int = 1
) -> jax.Array:
    """Broadcast one value per block back to every entry of a ``shape`` kernel.

    Args:
      grid: per-block values, shape ``grid_shape(shape, block_shape, num_gates)``.
      block_shape: (bh, bw).
      shape: (rows, cols) of the kernel.
      num_gates: gate matrices fused along the last axis.

    Returns:
      Array of ``shape``; entry (i, j) holds the value of the block that contains it.
    """
    bh, bw = block_shape
    rows, cols = shape
    gate_cols = cols // num_gates
    parts = jnp.split(grid, num_gates, axis=1) if num_gates > 1 else [grid]
    full = [
        jnp.broadcast_to(p[:, None, :, None], (p.shape[0], bh, p.shape[1], bw))
        .reshape(p.shape[0] * bh, p.shape[1] * bw)[:rows, :gate_cols]
        for p in parts
    ]
    return jnp.concatenate(full, axis=1) if num_gates > 1 else full[0]


def _check_module_count(num_modules: Any) -> None:
    if not isinstance(num_modules, int | np.integer) or num_modules < 1:
        raise ValueError(f"block_diagonal needs a positive module count, got {num_modules!r}.")


def _module_shape(shape: tuple[int, ...], num_modules: int) -> tuple[int, int]:
    """(rows/G, cols/G) of one of G diagonal modules of a (rows, cols) matrix, or a
    ``ValueError`` that says which G would fit."""
    _check_module_count(num_modules)
    if len(shape) != 2:
        raise ValueError(f"a block-diagonal matrix is 2-D, got shape {tuple(shape)}.")
    rows, cols = shape
    if rows % num_modules or cols % num_modules:
        raise ValueError(
            f"block_diagonal({num_modules}) cannot split a {rows}x{cols} matrix into "
            f"{num_modules} equal modules; choose G dividing both {rows} and {cols}."
        )
    return rows // num_modules, cols // num_modules


def block_diagonal(
    num_modules: int,
) -> Callable[[tuple[int, int]], np.ndarray]:
    """P3's structurally sparse pattern: a mask initialiser for G block-diagonal modules.

    ``block_diagonal(G)(shape)`` returns a boolean (rows, cols) mask whose G diagonal blocks of
    shape (rows/G, cols/G) are True and everything else False. G = 1 is dense; G = rows = cols
    is diagonal (IndRNN). Recurrent weights and FLOPs fall by G.

    Args:
      num_modules: G, which must divide both sides of the matrix.
    """
    _check_module_count(num_modules)

    def init(shape: tuple[int, int]) -> np.ndarray:
        r, c = _module_shape(shape, num_modules)
        return np.kron(np.eye(num_modules, dtype=bool), np.ones((r, c), dtype=bool))

    return init


def _by_module(w: jax.Array, num_modules: int) -> tuple[jax.Array, jax.Array]:
    """(rows, cols) -> w as (G, r, G, c) and the (G, 1, G, 1) bool selector of its diagonal."""
    r, c = _module_shape(w.shape, num_modules)
    diagonal = np.eye(num_modules, dtype=bool)[:, None, :, None]
    return w.reshape(num_modules, r, num_modules, c), diagonal


def diagonal_blocks(w: jax.Array, num_modules: int) -> jax.Array:
    """The G diagonal blocks of a (rows, cols) matrix, stacked: shape (G, rows/G, cols/G).

    Block k is ``w[k·r:(k+1)·r, k·c:(k+1)·c]`` (r = rows/G, c = cols/G); entries off the
    diagonal blocks are dropped, so this is exact only for a block-diagonal ``w`` (see
    :func:`check_block_diagonal`). Differentiable: the gradient is zero off the diagonal.
    """
    by_module, diagonal = _by_module(w, num_modules)
    return jnp.sum(jnp.where(diagonal, by_module, 0), axis=2, dtype=by_module.dtype)


def off_diagonal_count(mask: jax.Array | np.ndarray, num_modules: int) -> jax.Array:
    """The number of kept (True) entries of a (rows, cols) mask outside its G diagonal
    blocks, an int32 scalar; 0 iff the mask is within ``block_diagonal(G)``. Jittable; a
    numpy mask is counted in numpy, on the host."""
    by_module, diagonal = _by_module(mask.astype(bool), num_modules)
    return (by_module & ~diagonal).sum(dtype=np.int32)


def check_block_diagonal(mask: Any, num_modules: int, name: str = "mask") -> None:
    """Raise ``ValueError`` unless the concrete (rows, cols) ``mask`` keeps entries only in its
    G diagonal blocks (it may prune more, inside the blocks).

    A layer that computes its product from the diagonal blocks alone
    (:class:`bsrnn.cells.RecurrentLayer` with ``recurrent_modules=G``) would otherwise drop
    the kept off-diagonal weights.
    """
    count = int(off_diagonal_count(np.asarray(mask), num_modules))
    if count:
        rows, cols = np.shape(mask)
        raise ValueError(
            f"{name} ({rows}x{cols}) keeps {count} entries outside its {num_modules} diagonal "
            f"blocks of {rows // num_modules}x{cols // num_modules}, so it is not P3's "
            f"block_diagonal({num_modules}) pattern. Load masks made for G={num_modules}, or "
            "build the model with the G its masks were made for (recurrent_modules=1 for "
            "any mask)."
        )
