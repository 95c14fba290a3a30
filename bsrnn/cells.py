"""Masked recurrent cells (vanilla RNN, GRU, LSTM) and the scan-based layers that run them.

One implementation per cell kind; sparsity is data. Every kernel is a :class:`MaskedDense`
whose boolean mask lives in the ``masks`` collection at the same path as the kernel::

    variables = model.init(key, x, lengths)          # {'params': ..., 'masks': ...}
    y, carry = model.apply(variables, x, lengths)    # forward pass sees kernel * mask

Gate kernels are separate params (``input_r``, ``recurrent_r``, ... for the GRU), so each
gate's matrix is tiled and pruned on its own; the layer concatenates the masked gate kernels
once per call, projects the inputs of all time steps in one product outside the scan, and
runs one fused (H, gates·H) product per step inside ``jax.lax.scan``.

Cell equations (PyTorch/cuDNN formulation; x_t the input, h the state):

* ``rnn``: h' = tanh(W_i x + b_i + W_h h + b_h); ``rnn_clipped_relu`` uses DS2's
  min(max(·, 0), 20) instead of tanh.
* ``gru``: r = σ(W_ir x + b_ir + W_hr h + b_hr), z = σ(W_iz x + b_iz + W_hz h + b_hz),
  n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)), h' = (1 − z) ⊙ n + z ⊙ h.
* ``lstm``: i, f, g, o from W_i· x + b_i· + W_h· h + b_h· (σ, σ, tanh, σ);
  c' = f ⊙ c + i ⊙ g, h' = o ⊙ tanh(c').
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MaskInit = Callable[[tuple[int, int]], Any]
Carry = Any  # h of shape (B, H), or (h, c) for the LSTM

GATES = {
    "rnn": ("h",),
    "rnn_clipped_relu": ("h",),
    "gru": ("r", "z", "n"),
    "lstm": ("i", "f", "g", "o"),
}


def apply_mask(kernel: jax.Array, mask: jax.Array) -> jax.Array:
    """``kernel * mask`` in value, with the gradient passed to ``kernel`` unmasked.

    The forward value is exact (pruned entries are exactly 0, kept entries unchanged). The
    gradient is the straight-through one that P2's text asks for ("gradients are not
    masked"): dense shadow weights keep learning, so a pruned block can regrow in
    ``regrowth`` mode; ``hard`` mode pruning zeroes the updates of pruned weights instead.
    """
    return kernel + jax.lax.stop_gradient(jnp.where(mask, kernel, 0) - kernel)


class MaskedDense(nn.Module):
    """A dense layer ``y = x @ (kernel ⊙ mask) + bias`` with its mask in ``masks``.

    Attributes:
      in_features: input width D.
      features: output width F.
      use_bias: whether to add a bias of shape (F,).
      mask_init: ``shape -> bool array`` fixed pattern at init (e.g.
        :func:`bsrnn.blocks.block_diagonal`); ``None`` means all ones.
      kernel_init: initialiser of the (D, F) kernel.
      dtype: computation dtype (``None``: the param dtype).
      param_dtype: dtype of kernel and bias.
    """

    in_features: int
    features: int
    use_bias: bool = True
    mask_init: MaskInit | None = None
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        shape = (self.in_features, self.features)
        self.kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        self.bias = (
            self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        if not self.is_initializing() and not self.has_variable("masks", "kernel"):
            raise ValueError(
                f"{'/'.join(self.path)} has no mask: apply the model with both collections, "
                "model.apply({'params': params, 'masks': masks}, ...)."
            )
        self.mask = self.variable("masks", "kernel", self._initial_mask, shape)

    def _initial_mask(self, shape: tuple[int, int]) -> jax.Array:
        if self.mask_init is None:
            return jnp.ones(shape, bool)
        mask = np.asarray(self.mask_init(shape))
        if mask.shape != shape:
            raise ValueError(
                f"mask_init gave shape {mask.shape} for the {shape} kernel {'/'.join(self.path)}."
            )
        return jnp.asarray(mask, bool)

    def weights(self) -> tuple[jax.Array, jax.Array | None]:
        """The masked kernel (D, F) and the bias (F,) or ``None``, in ``dtype``."""
        kernel = apply_mask(self.kernel, self.mask.value)
        bias = self.bias
        if self.dtype is not None:
            kernel = kernel.astype(self.dtype)
            bias = None if bias is None else bias.astype(self.dtype)
        return kernel, bias

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., D) -> (..., F)."""
        kernel, bias = self.weights()
        y = jnp.dot(x.astype(kernel.dtype), kernel)
        return y if bias is None else y + bias


def rnn_activation(cell: str, pre: jax.Array) -> jax.Array:
    """The vanilla RNN's nonlinearity: tanh (``rnn``) or DS2's min(max(·, 0), 20)
    (``rnn_clipped_relu``), elementwise on the pre-activation W_i x + b_i + W_h h + b_h."""
    return jnp.tanh(pre) if cell == "rnn" else jnp.clip(pre, 0.0, 20.0)


def gru_gates(
    x_r: jax.Array, x_z: jax.Array, x_n: jax.Array,
    h_r: jax.Array, h_z: jax.Array, h_n: jax.Array, h: jax.Array,
) -> jax.Array:
    """The GRU update h' from the gates' input parts x_· = W_i· x + b_i· and recurrent
    parts h_· = W_h· h + b_h· (all (B, H)) and the old state h: r = σ(x_r + h_r),
    z = σ(x_z + h_z), n = tanh(x_n + r ⊙ h_n), h' = (1 − z) ⊙ n + z ⊙ h.

    The one implementation of the GRU equations: the scan cells and every kernel in
    `bsrnn.kernels` (a Pallas kernel traces it on its tiles) call it.
    """
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return (1.0 - z) * n + z * h


def lstm_gates(
    i: jax.Array, f: jax.Array, g: jax.Array, o: jax.Array, c: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The LSTM update (h', c') from the gates' pre-activations i, f, g, o (each
    W_i· x + b_i· + W_h· h + b_h·, (B, H)) and the old cell state c:
    c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g), h' = σ(o) ⊙ tanh(c'). Shared by the scan cells and the
    kernels, like `gru_gates`."""
    new_c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(new_c), new_c


def cell_step(cell: str, carry: Carry, x_proj: jax.Array, w_h: jax.Array, b_h: jax.Array):
    """One time step of ``cell``.

    Args:
      cell: one of :data:`GATES`.
      carry: h (B, H), or (h, c) for the LSTM.
      x_proj: the input projection W_i x + b_i of this step, (B, gates·H), gates concatenated
        in the order of ``GATES[cell]``.
      w_h: masked recurrent kernel (H, gates·H); b_h: recurrent bias (gates·H,).

    Returns:
      (new carry, output h' of shape (B, H)).
    """
    h = carry[0] if cell == "lstm" else carry
    h_proj = jnp.dot(h, w_h) + b_h
    if cell in ("rnn", "rnn_clipped_relu"):
        new_h = rnn_activation(cell, x_proj + h_proj)
        return new_h, new_h
    if cell == "gru":
        new_h = gru_gates(*jnp.split(x_proj, 3, axis=-1), *jnp.split(h_proj, 3, axis=-1), h)
        return new_h, new_h
    new_h, new_c = lstm_gates(*jnp.split(x_proj + h_proj, 4, axis=-1), carry[1])
    return (new_h, new_c), new_h


def reverse_sequences(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reverse each sequence within its length; padding stays where it is.

    Args:
      x: (B, T, ...).
      lengths: (B,) int, each in [0, T].
    """
    t = jnp.arange(x.shape[1])[None, :]
    index = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class RecurrentLayer(nn.Module):
    """One recurrent layer run over a padded batch with ``jax.lax.scan``.

    Attributes:
      cell: ``rnn``, ``rnn_clipped_relu``, ``gru`` or ``lstm``.
      features: hidden size H.
      reverse: run each sequence from its last valid step back to its first.
      recurrent_mask_init: fixed mask pattern for every recurrent gate kernel (H, H), e.g.
        P3's ``block_diagonal(G)``; ``None``: all ones.
      input_mask_init: the same for the input gate kernels (D, H).
      unroll: ``lax.scan`` unroll factor (per-step loop overhead dominates on GPUs).
      dtype: computation dtype (``None``: float32 params' dtype).
    """

    cell: str
    features: int
    reverse: bool = False
    recurrent_mask_init: MaskInit | None = None
    input_mask_init: MaskInit | None = None
    unroll: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(
        self, x: jax.Array, lengths: jax.Array | None = None, initial_carry: Carry | None = None
    ) -> tuple[jax.Array, Carry]:
        """Run the layer.

        Args:
          x: inputs (B, T, D).
          lengths: (B,) valid steps per example (``None``: all T). Steps at or past a
            sequence's length do not change its state and output zeros.
          initial_carry: h0 (B, H), or (h0, c0) for the LSTM; zeros if ``None``.

        Returns:
          outputs (B, T, H) and the final carry (the state after each sequence's last valid
          step).
        """
        if self.cell not in GATES:
            raise ValueError(f"unknown cell {self.cell!r}; choose one of {tuple(GATES)}.")
        batch, steps, in_features = x.shape
        dense = dict(features=self.features, dtype=self.dtype)
        inputs, recurrents = [], []
        for gate in GATES[self.cell]:
            inputs.append(MaskedDense(in_features, mask_init=self.input_mask_init,
                                      name=f"input_{gate}", **dense).weights())
            recurrents.append(MaskedDense(self.features, mask_init=self.recurrent_mask_init,
                                          kernel_init=nn.initializers.orthogonal(),
                                          name=f"recurrent_{gate}", **dense).weights())
        w_i = jnp.concatenate([k for k, _ in inputs], axis=1)
        b_i = jnp.concatenate([b for _, b in inputs])
        w_h = jnp.concatenate([k for k, _ in recurrents], axis=1)
        b_h = jnp.concatenate([b for _, b in recurrents])

        if self.reverse:
            x = jnp.flip(x, axis=1) if lengths is None else reverse_sequences(x, lengths)
        x_proj = jnp.dot(x.astype(w_i.dtype), w_i) + b_i  # (B, T, gates·H), one product

        if initial_carry is None:
            h0 = jnp.zeros((batch, self.features), w_h.dtype)
            initial_carry = (h0, h0) if self.cell == "lstm" else h0

        def step(carry: Carry, inputs: tuple[jax.Array, jax.Array | None]):
            x_t, valid_t = inputs
            new_carry, out = cell_step(self.cell, carry, x_t, w_h, b_h)
            if valid_t is None:  # no padding: skip the selects
                return new_carry, out
            keep = valid_t[:, None]
            new_carry = jax.tree_util.tree_map(
                lambda new, old: jnp.where(keep, new, old), new_carry, carry
            )
            return new_carry, jnp.where(keep, out, 0)

        valid = None if lengths is None else jnp.arange(steps)[:, None] < lengths[None, :]
        carry, outputs = jax.lax.scan(
            step, initial_carry, (jnp.swapaxes(x_proj, 0, 1), valid), unroll=self.unroll
        )
        outputs = jnp.swapaxes(outputs, 0, 1)
        if self.reverse:
            outputs = jnp.flip(outputs, 1) if lengths is None else reverse_sequences(
                outputs, lengths
            )
        return outputs, carry


class RNN(nn.Module):
    """A stack of :class:`RecurrentLayer`, optionally bidirectional.

    Layer i is named ``layer_i`` (``layer_i_fwd`` and ``layer_i_bwd`` when bidirectional,
    whose outputs are concatenated, so the next layer sees 2H features).

    Attributes:
      cell, features, recurrent_mask_init, input_mask_init, unroll, dtype: as in
        :class:`RecurrentLayer`, shared by every layer.
      num_layers: depth.
      bidirectional: run a forward and a backward layer at each depth.
    """

    cell: str
    features: int
    num_layers: int = 1
    bidirectional: bool = False
    recurrent_mask_init: MaskInit | None = None
    input_mask_init: MaskInit | None = None
    unroll: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """x (B, T, D), lengths (B,) -> outputs (B, T, H), or (B, T, 2H) if bidirectional."""
        common = dict(
            cell=self.cell,
            features=self.features,
            recurrent_mask_init=self.recurrent_mask_init,
            input_mask_init=self.input_mask_init,
            unroll=self.unroll,
            dtype=self.dtype,
        )
        for i in range(self.num_layers):
            if self.bidirectional:
                fwd, _ = RecurrentLayer(name=f"layer_{i}_fwd", **common)(x, lengths)
                bwd, _ = RecurrentLayer(reverse=True, name=f"layer_{i}_bwd", **common)(x, lengths)
                x = jnp.concatenate([fwd, bwd], axis=-1)
            else:
                x, _ = RecurrentLayer(name=f"layer_{i}", **common)(x, lengths)
        return x
