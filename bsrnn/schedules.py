"""Pruning schedules: when masks are recomputed, and with which threshold or target sparsity.

Two kinds, both small frozen dataclasses that take a (possibly traced) integer step. Their
float fields may be traced arrays too (one schedule per member of a vmapped sweep); then
``__post_init__`` skips its checks, which the sweep makes on the concrete values first:

* :class:`GradualThreshold`: P2's Algorithm 1. A threshold ε, piecewise linear in the
  iteration, below which a weight (or a block's score) is pruned.
* :class:`CubicSparsity`: Zhu & Gupta's cubic ramp (arXiv 1710.01878). A target sparsity per
  matrix; the threshold is the matching quantile of that matrix's block scores.

Steps count optimizer updates from 0, as optax's ``count`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bsrnn import blocks
from bsrnn.blocks import BlockShape

BLOCK_EXPONENT = 0.25  # P1's θ_b = θ·N_b^(1/4)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _traced(schedule: Any) -> bool:
    """True when a field is a JAX array: a member of a vmapped sweep (:mod:`bsrnn.vmap_sweep`),
    built inside ``jax.vmap`` with traced values. Such a schedule skips ``__post_init__``'s
    checks (a tracer has no truth value); the sweep checks every member's concrete values
    first."""
    return any(isinstance(getattr(schedule, f.name), jax.Array)
               for f in dataclasses.fields(schedule))


@dataclasses.dataclass(frozen=True)
class GradualThreshold:
    """P2 Algorithm 1: a monotone, piecewise linear pruning threshold.

    For ``start_itr < itr < end_itr`` and ``itr mod freq == 0`` (an *update step*)::

        itr <  ramp_itr:  ε = θ·(itr − start_itr + 1) / freq
        itr >= ramp_itr:  ε = (θ·(ramp_itr − start_itr + 1) + φ·(itr − ramp_itr + 1)) / freq

    Between update steps ε keeps its last value; before the first update step it is 0, and
    after ``end_itr`` it is frozen (and so are the masks).

    Attributes:
      start_itr: iteration to start pruning (P2: start of the second epoch).
      ramp_itr: iteration where the slope increases (P2: 25% of training).
      end_itr: iteration to stop pruning (P2: 50% of training; P1: about 40%).
      start_slope: θ.
      ramp_slope: φ (P2: 1.5θ to 2θ).
      freq: iterations between threshold updates (P2: 100).
    """

    start_itr: int
    ramp_itr: int
    end_itr: int
    start_slope: float
    ramp_slope: float
    freq: int = 100

    def __post_init__(self) -> None:
        if _traced(self):
            return
        _require(
            0 <= self.start_itr <= self.ramp_itr <= self.end_itr and self.start_itr < self.end_itr,
            "GradualThreshold needs 0 <= start_itr <= ramp_itr <= end_itr and start_itr < "
            f"end_itr; got start_itr={self.start_itr}, ramp_itr={self.ramp_itr}, "
            f"end_itr={self.end_itr}.",
        )
        _require(self.freq >= 1, f"GradualThreshold.freq must be >= 1, got {self.freq}.")
        _require(
            self.start_slope >= 0 and self.ramp_slope >= 0,
            f"GradualThreshold slopes must be >= 0, got start_slope={self.start_slope}, "
            f"ramp_slope={self.ramp_slope}.",
        )

    @classmethod
    def from_quantile(
        cls,
        q: float,
        start_itr: int,
        ramp_itr: int,
        end_itr: int,
        freq: int = 100,
        ramp_ratio: float = 1.5,
    ) -> GradualThreshold:
        """P2 Eq. 1: θ = 2·q·freq / (2·(ramp_itr − start_itr) + 3·(end_itr − ramp_itr)).

        Args:
          q: the 90th-percentile |w| of a trained dense model (see :func:`percentile_abs`).
          start_itr, ramp_itr, end_itr, freq: as in the class.
          ramp_ratio: φ / θ (P2: 1.5 to 2). With 1.5, ε reaches about q at ``end_itr``.
        """
        denominator = 2 * (ramp_itr - start_itr) + 3 * (end_itr - ramp_itr)
        _require(
            denominator > 0,
            f"Eq. 1 needs start_itr < end_itr; got {start_itr}, {ramp_itr}, {end_itr}.",
        )
        theta = 2.0 * q * freq / denominator
        return cls(start_itr, ramp_itr, end_itr, theta, ramp_ratio * theta, freq)

    def scaled_for_block(
        self, block_shape: BlockShape, exponent: float = BLOCK_EXPONENT
    ) -> GradualThreshold:
        """P1's block scaling θ_b = θ·N_b^e, N_b = bh·bw, e = ``exponent`` (P1: 1/4; φ
        scales with θ). With a q measured on the block scores themselves
        (:func:`percentile_block_scores`) the scaling is already in q: pass 0."""
        _require(exponent >= 0, f"the block exponent must be >= 0, got {exponent}.")
        factor = float(block_shape[0] * block_shape[1]) ** exponent
        return dataclasses.replace(
            self, start_slope=self.start_slope * factor, ramp_slope=self.ramp_slope * factor
        )

    def is_update_step(self, step: jax.Array | int) -> jax.Array:
        """True where Algorithm 1 recomputes ε and the masks."""
        step = jnp.asarray(step)
        return (step > self.start_itr) & (step < self.end_itr) & (step % self.freq == 0)

    def threshold(self, step: jax.Array | int) -> jax.Array:
        """ε in force at ``step`` (float32 scalar): its value at the last update step <= step."""
        step = jnp.asarray(step)
        last = (jnp.minimum(step, self.end_itr - 1) // self.freq) * self.freq
        before_ramp = self.start_slope * (last - self.start_itr + 1) / self.freq
        after_ramp = (
            self.start_slope * (self.ramp_itr - self.start_itr + 1)
            + self.ramp_slope * (last - self.ramp_itr + 1)
        ) / self.freq
        eps = jnp.where(last < self.ramp_itr, before_ramp, after_ramp)
        return jnp.where(last > self.start_itr, eps, 0.0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class CubicSparsity:
    """Zhu & Gupta's target sparsity: s_t = s_f + (s_i − s_f)·(1 − (t − t_0)/(t_end − t_0))³.

    Masks are recomputed at ``begin_step + k·freq`` up to ``end_step`` (and at ``end_step``
    itself). At each update every matrix prunes the fraction s_t of its blocks with the lowest
    scores. Before ``begin_step`` nothing is pruned; after ``end_step`` the masks are frozen.

    Attributes:
      final_sparsity: s_f, the fraction of blocks pruned at the end, in [0, 1).
      begin_step: t_0.
      end_step: t_end.
      freq: steps between mask updates.
      initial_sparsity: s_i, the fraction pruned at ``begin_step``.
    """

    final_sparsity: float
    begin_step: int
    end_step: int
    freq: int = 100
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        if _traced(self):
            return
        _require(
            0.0 <= self.initial_sparsity <= self.final_sparsity < 1.0,
            "CubicSparsity needs 0 <= initial_sparsity <= final_sparsity < 1; got "
            f"{self.initial_sparsity} and {self.final_sparsity}.",
        )
        _require(
            0 <= self.begin_step < self.end_step,
            f"CubicSparsity needs 0 <= begin_step < end_step; got {self.begin_step}, "
            f"{self.end_step}.",
        )
        _require(self.freq >= 1, f"CubicSparsity.freq must be >= 1, got {self.freq}.")

    def is_update_step(self, step: jax.Array | int) -> jax.Array:
        """True where the masks are recomputed."""
        step = jnp.asarray(step)
        in_range = (step >= self.begin_step) & (step <= self.end_step)
        return in_range & (((step - self.begin_step) % self.freq == 0) | (step == self.end_step))

    def sparsity(self, step: jax.Array | int) -> jax.Array:
        """Target fraction of pruned blocks at the last update step <= ``step`` (float32)."""
        step = jnp.asarray(step)
        span = self.end_step - self.begin_step
        last = self.begin_step + ((step - self.begin_step) // self.freq) * self.freq
        last = jnp.where(step >= self.end_step, self.end_step, last)
        progress = jnp.clip((last - self.begin_step) / span, 0.0, 1.0)
        s = self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (
            1.0 - progress
        ) ** 3
        return jnp.where(step >= self.begin_step, s, 0.0).astype(jnp.float32)


Schedule = GradualThreshold | CubicSparsity


def percentile_abs(tree: Any, percentile: float = 90.0) -> float:
    """The ``percentile``-th percentile of |w| over every leaf of ``tree`` (P2's q).

    Args:
      tree: a pytree of arrays, e.g. the recurrent kernels of a trained dense model
        (P2 takes one q per layer type).
      percentile: in [0, 100].
    """
    leaves = [np.abs(np.asarray(x)).ravel() for x in jax.tree_util.tree_leaves(tree)]
    _require(bool(leaves), "percentile_abs got an empty tree; pass the kernels to measure.")
    return float(np.percentile(np.concatenate(leaves), percentile))


def percentile_block_scores(
    kernels: Any, block_shape: BlockShape, reduction: str = "max", percentile: float = 90.0
) -> float:
    """q measured per block size: the ``percentile``-th percentile of the block scores
    (:func:`bsrnn.blocks.block_scores`) over every kernel of ``kernels``.

    With ``block_shape`` (1, 1) this is :func:`percentile_abs`. Used as the gradual
    schedule's q with a block exponent of 0, ε ends near this percentile of the scores
    the threshold is compared with, whatever the block size (P1's N_b^(1/4) guesses how
    the scores grow with the block instead).

    Args:
      kernels: a pytree of 2-D kernels (rows, cols) of a trained dense model, e.g. those of
        one layer type or one layer; each is tiled on its own (edge blocks reduced over the
        entries they hold).
      block_shape: (bh, bw).
      reduction: a :data:`bsrnn.blocks.REDUCTIONS` name (P1: ``max``).
      percentile: in [0, 100].
    """
    leaves = jax.tree_util.tree_leaves(kernels)
    _require(
        bool(leaves), "percentile_block_scores got an empty tree; pass the kernels to measure."
    )
    scores = [
        np.asarray(blocks.block_scores(jnp.asarray(k), tuple(block_shape), reduction)).ravel()
        for k in leaves
    ]
    return float(np.percentile(np.concatenate(scores), percentile))
