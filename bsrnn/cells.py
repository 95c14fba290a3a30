"""Masked recurrent cells (vanilla RNN, GRU, LSTM) and the scan-based layers that run them.

One implementation per cell kind; sparsity is data. Every kernel is a :class:`MaskedDense`
whose boolean mask lives in the ``masks`` collection at the same path as the kernel::

    variables = model.init(key, x, lengths)          # {'params': ..., 'masks': ...}
    y, carry = model.apply(variables, x, lengths)    # forward pass sees kernel * mask

Gate kernels are separate params (``input_r``, ``recurrent_r``, ... for the GRU), so each
gate's matrix is tiled and pruned on its own; the layer concatenates the masked gate kernels
once per call, projects the inputs of all time steps in one product outside the scan, and
runs one fused (H, gates·H) product per step inside ``jax.lax.scan``. Its backward pass
(:func:`hoisted_recurrence`, a custom VJP) computes the recurrent weight gradient once, after
the backward scan, as one product over all steps.

Cell equations (PyTorch/cuDNN formulation; x_t the input, h the state):

* ``rnn``: h' = tanh(W_i x + b_i + W_h h + b_h); ``rnn_clipped_relu`` uses DS2's
  min(max(·, 0), 20) instead of tanh.
* ``gru``: r = σ(W_ir x + b_ir + W_hr h + b_hr), z = σ(W_iz x + b_iz + W_hz h + b_hz),
  n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)), h' = (1 − z) ⊙ n + z ⊙ h.
* ``lstm``: i, f, g, o from W_i· x + b_i· + W_h· h + b_h· (σ, σ, tanh, σ);
  c' = f ⊙ c + i ⊙ g, h' = o ⊙ tanh(c').
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bsrnn import blocks

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
        self.mask = self.variable(
            "masks", "kernel", initial_mask, self.mask_init, shape, "/".join(self.path)
        )
        if tuple(self.mask.value.shape) != shape:
            raise ValueError(
                f"the mask of {'/'.join(self.path)} has shape {tuple(self.mask.value.shape)} but "
                f"its kernel is {shape}: pass the masks that model.init made for a model of "
                "these sizes."
            )

    def weights(self) -> tuple[jax.Array, jax.Array | None]:
        """The masked kernel (D, F) and the bias (F,) or ``None``, in ``dtype``."""
        return masked_weights(self.kernel, self.mask.value, self.bias, self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., D) -> (..., F)."""
        return affine(x, *self.weights())


def initial_mask(mask_init: MaskInit | None, shape: tuple[int, int], name: str) -> jax.Array:
    """A kernel's mask at init: ``mask_init(shape)`` as bool, or all ones when ``None``.

    ``name`` (the kernel's path) is for the error when ``mask_init`` returns another shape.
    """
    if mask_init is None:
        return jnp.ones(shape, bool)
    mask = np.asarray(mask_init(shape))
    if mask.shape != shape:
        raise ValueError(f"mask_init gave shape {mask.shape} for the {shape} kernel {name}.")
    return jnp.asarray(mask, bool)


def masked_weights(
    kernel: jax.Array, mask: jax.Array, bias: jax.Array | None, dtype: Any = None
) -> tuple[jax.Array, jax.Array | None]:
    """A masked dense layer's weights: ``kernel ⊙ mask`` (D, F) through :func:`apply_mask`
    and ``bias`` (F,) or ``None``, cast to ``dtype`` unless it is ``None``."""
    kernel = apply_mask(kernel, mask)
    if dtype is not None:
        kernel = kernel.astype(dtype)
        bias = None if bias is None else bias.astype(dtype)
    return kernel, bias


def affine(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """x (..., D) @ kernel (D, F) (+ bias (F,)) -> (..., F), in the kernel's dtype."""
    y = jnp.dot(x.astype(kernel.dtype), kernel)
    return y if bias is None else y + bias


def recurrent_product(h: jax.Array, w_h: jax.Array) -> jax.Array:
    """The recurrent product h @ W_h of every gate at once.

    Dense: h (B, H) @ w_h (H, gates·H) -> (B, gates·H). Block-diagonal (P3's G modules): h
    (G, B, H/G), w_h (G, H/G, gates·H/G) -> (G, B, gates·H/G), G independent products, one
    per module (a batched einsum: H²·gates/G multiply-adds per row instead of H²·gates).
    Block-sparse (a frozen layer's :class:`bsrnn.kernels.sparse_training.SparseRecurrentKernel`):
    h (B, H) -> (B, gates·H) on the kept blocks only.
    """
    if not isinstance(w_h, jax.Array):  # a frozen layer's block-sparse kernel
        return h @ w_h
    if w_h.ndim == 2:
        return jnp.dot(h, w_h)
    return jnp.einsum("kbi,kic->kbc", h, w_h)


def recurrent_product_transpose(d: jax.Array, w_h: Any, h: jax.Array) -> jax.Array:
    """dh of :func:`recurrent_product` (``h``, ``w_h``) for the output cotangent ``d``, the
    gradient w.r.t. h only (the product is linear in h; no weight gradient is computed).

    Dense: d (B, gates·H) -> (B, H), d @ W_hᵀ; block-diagonal: d (G, B, gates·H/G) ->
    (G, B, H/G), G batched products; a frozen layer's block-sparse kernel: its own
    transposed product on the kept blocks (``transposed_product``). ``h`` (the product's
    input) gives the result's shape and dtype only.
    """
    if not isinstance(w_h, jax.Array):  # a frozen layer's block-sparse kernel
        return w_h.transposed_product(d).astype(h.dtype)
    transpose = jax.linear_transpose(
        lambda h: recurrent_product(h, w_h), jax.ShapeDtypeStruct(h.shape, h.dtype)
    )
    out_dtype = jnp.result_type(h.dtype, w_h.dtype)
    return transpose(d.astype(out_dtype))[0]


def rnn_activation(cell: str, pre: jax.Array) -> jax.Array:
    """The vanilla RNN's nonlinearity: tanh (``rnn``) or DS2's min(max(·, 0), 20)
    (``rnn_clipped_relu``), elementwise on the pre-activation W_i x + b_i + W_h h + b_h."""
    return jnp.tanh(pre) if cell == "rnn" else jnp.clip(pre, 0.0, 20.0)


def gru_gates(
    x_r: jax.Array,
    x_z: jax.Array,
    x_n: jax.Array,
    h_r: jax.Array,
    h_z: jax.Array,
    h_n: jax.Array,
    h: jax.Array,
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
    """One time step of ``cell``: :func:`cell_update` on ``recurrent_product(h, w_h) + b_h``.

    Args:
      cell: one of :data:`GATES`.
      carry: h (B, H), or (h, c) for the LSTM.
      x_proj: the input projection W_i x + b_i of this step, (B, gates·H), gates concatenated
        in the order of ``GATES[cell]``.
      w_h: masked recurrent kernel (H, gates·H); b_h: recurrent bias (gates·H,). Or, for
        P3's G block-diagonal modules (see :func:`recurrent_product`), every array per
        module: carry (G, B, H/G), x_proj (G, B, gates·H/G), w_h (G, H/G, gates·H/G) and
        b_h (G, 1, gates·H/G).

    Returns:
      (new carry, output h' of shape (B, H)).
    """
    return cell_update(cell, carry, x_proj, recurrent_product(carry_hidden(cell, carry), w_h) + b_h)


def carry_hidden(cell: str, carry: Carry) -> jax.Array:
    """The hidden state h of a carry: ``carry`` itself, or ``carry[0]`` for the LSTM."""
    return carry[0] if cell == "lstm" else carry


def cell_update(cell: str, carry: Carry, x_proj: jax.Array, h_proj: jax.Array):
    """The elementwise part of a step of ``cell``: the gate math given both projections.

    Args:
      cell: one of :data:`GATES`.
      carry: h (B, H), or (h, c) for the LSTM (or per module, as in :func:`cell_step`).
      x_proj: W_i x + b_i of this step, (B, gates·H).
      h_proj: W_h h + b_h of this step, (B, gates·H), same layout.

    Returns:
      (new carry, output h' of shape (B, H)).
    """
    if cell in ("rnn", "rnn_clipped_relu"):
        new_h = rnn_activation(cell, x_proj + h_proj)
        return new_h, new_h
    if cell == "gru":
        h = carry
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

    With ``recurrent_modules`` G > 1 (P3) every recurrent gate kernel is block-diagonal with
    G modules, and the layer computes it as what it is: each step runs G independent
    (H/G, H/G) products per gate (:func:`recurrent_product`), in the forward and the backward
    pass, so the recurrent FLOPs, and the recurrent weight gradient, fall by G. The params and
    masks are those of the masked dense layer (each gate kernel stays one dense (H, H) param,
    of which only the diagonal blocks are read), so checkpoints move between the two. The
    numbers are those of the masked dense layer up to float summation order, except that
    the kernel entries off the diagonal blocks get a zero gradient instead of the
    straight-through one of :func:`apply_mask` (with ``keep_masked`` their updates are zeroed
    either way; the global gradient norm, as in ``clip_by_global_norm``, no longer counts them).

    The recurrent masks must keep no entry off the diagonal blocks (they may prune more
    inside them): a concrete mask that does raises ``ValueError`` (at init, and when the layer
    is applied outside ``jit``); under ``jit``, where the masks are traced, such a layer
    outputs NaN rather than silently dropping weights (``bsrnn.train`` checks restored masks
    on the host before it trains).

    Attributes:
      cell: ``rnn``, ``rnn_clipped_relu``, ``gru`` or ``lstm``.
      features: hidden size H.
      reverse: run each sequence from its last valid step back to its first.
      recurrent_mask_init: fixed mask pattern for every recurrent gate kernel (H, H); ``None``:
        all ones, or P3's ``block_diagonal(G)`` when ``recurrent_modules`` is G > 1.
      input_mask_init: the same for the input gate kernels (D, H).
      recurrent_modules: P3's G, static; it must divide H. 1: the dense recurrent product
        (a block-diagonal mask then only zeroes weights).
      frozen_recurrent: frozen block structures by layer path
        (:func:`bsrnn.kernels.sparse_training.freeze`); when it holds this layer's path, the
        recurrent product runs on the kept blocks only, forward and backward (sparse training
        once masks freeze; pruned entries then get a zero gradient, as with G > 1).
      unroll: ``lax.scan`` unroll factor (per-step loop overhead dominates on GPUs).
      dtype: computation dtype (``None``: float32 params' dtype).
      input_norm: layer-normalise each gate's input projection x·W_i + b_i over its H
        units, per frame, with a learned scale and shift (module ``projection_norm``,
        never pruned), as DS2 batch-normalised the input projections (per frame, so
        padding and batch composition change nothing). Off: the plain cell.
      weight_grad: how the recurrence is differentiated. ``"hoisted"`` (default): a custom
        VJP (:func:`hoisted_recurrence`) that computes the recurrent weight gradient in one
        product over all steps after the backward scan, instead of accumulating it inside
        every backward step; ``"scan"``: plain JAX autodiff of the scan
        (:func:`scan_recurrence`), the same numbers up to summation order, needed only for
        forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``), which a custom VJP does not
        support.
    """

    cell: str
    features: int
    reverse: bool = False
    recurrent_mask_init: MaskInit | None = None
    input_mask_init: MaskInit | None = None
    recurrent_modules: int = 1
    frozen_recurrent: Mapping[str, Any] | None = None
    unroll: int = 1
    dtype: Any = None
    input_norm: bool = False
    weight_grad: str = "hoisted"

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
        check_layer_config(self.cell, self.features, self.recurrent_modules)
        check_weight_grad(self.weight_grad)
        dense = dict(features=self.features, dtype=self.dtype)
        recurrent_mask_init = recurrent_modules_mask_init(
            self.recurrent_mask_init,
            self.recurrent_modules,
            f"{'/'.join(self.path) or 'RecurrentLayer'}: recurrent_mask_init's mask",
        )
        inputs, recurrent_layers = [], []
        for gate in GATES[self.cell]:
            inputs.append(
                MaskedDense(
                    x.shape[-1], mask_init=self.input_mask_init, name=f"input_{gate}", **dense
                ).weights()
            )
            recurrent_layers.append(
                MaskedDense(
                    self.features,
                    mask_init=recurrent_mask_init,
                    kernel_init=nn.initializers.orthogonal(),
                    name=f"recurrent_{gate}",
                    **dense,
                )
            )
        weights = fused_weights(
            inputs,
            [layer.weights() for layer in recurrent_layers],
            {"/".join(layer.path): layer.mask.value for layer in recurrent_layers},
            self.recurrent_modules,
            self._frozen_recurrent_kernel(recurrent_layers),
        )
        norm = projection_norm(self.dtype) if self.input_norm else None
        return run_layer(self, x, lengths, initial_carry, weights, norm)

    def _frozen_recurrent_kernel(self, layers: list[MaskedDense]) -> Any:
        """This layer's :class:`bsrnn.kernels.sparse_training.SparseRecurrentKernel` when
        ``frozen_recurrent`` holds its path, else ``None``."""
        if self.frozen_recurrent is None:
            return None
        from bsrnn.kernels import sparse_training  # bsrnn.kernels imports this module

        name = "/".join(self.path)
        frozen = sparse_training.frozen_for(self.frozen_recurrent, self.path)
        if frozen is None:
            return None
        if (
            self.recurrent_modules > 1
            or frozen.gates != GATES[self.cell]
            or (frozen.hidden != self.features)
        ):
            raise ValueError(
                f"{name}: frozen_recurrent's entry is for {frozen.gates} gates of "
                f"{frozen.hidden} units, the layer has {GATES[self.cell]} of {self.features}"
                f"{' and recurrent_modules > 1' if self.recurrent_modules > 1 else ''}; "
                "freeze the masks of this model (with recurrent_modules=1)."
            )
        kernels = [
            layer.kernel if self.dtype is None else layer.kernel.astype(self.dtype)
            for layer in layers
        ]
        return sparse_training.recurrent_kernel(
            frozen, kernels, [layer.mask.value for layer in layers], name
        )


def check_layer_config(cell: str, features: int, recurrent_modules: int) -> None:
    """Raise ``ValueError`` unless ``cell`` is one of :data:`GATES` and ``recurrent_modules``
    (P3's G) is a positive int that divides ``features`` (H)."""
    if cell not in GATES:
        raise ValueError(f"unknown cell {cell!r}; choose one of {tuple(GATES)}.")
    modules = recurrent_modules
    if not isinstance(modules, int | np.integer) or modules < 1 or features % modules:
        raise ValueError(
            f"recurrent_modules={modules!r} must be a positive int that divides "
            f"features={features} (P3's G equal modules of H/G units)."
        )


def recurrent_modules_mask_init(
    pattern: MaskInit | None, recurrent_modules: int, name: str
) -> MaskInit | None:
    """A layer's recurrent mask init: ``pattern`` when G = ``recurrent_modules`` is 1, else
    ``pattern`` (default :func:`bsrnn.blocks.block_diagonal` (G)) checked to keep nothing off
    the G diagonal blocks; ``name`` is for that check's error."""
    modules = recurrent_modules
    if modules == 1:
        return pattern
    pattern = pattern or blocks.block_diagonal(modules)

    def init(shape: tuple[int, int]) -> np.ndarray:
        mask = np.asarray(pattern(shape))
        blocks.check_block_diagonal(mask, modules, name)
        return mask

    return init


def fused_weights(
    inputs: list[tuple[jax.Array, jax.Array]],
    recurrents: list[tuple[jax.Array, jax.Array]],
    recurrent_masks: Mapping[str, jax.Array],
    recurrent_modules: int = 1,
    frozen: Any = None,
) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    """The gates' masked weights side by side, as :func:`run_layer` takes them.

    Args:
      inputs: per gate (in ``GATES`` order) the masked input kernel (D, H) and bias (H,).
      recurrents: the same for the recurrent kernels (H, H).
      recurrent_masks: the recurrent kernels' masks (H, H) by kernel name, checked (G > 1)
        to keep nothing off the diagonal blocks (see :class:`RecurrentLayer`).
      recurrent_modules: P3's G.
      frozen: a frozen layer's block-sparse recurrent kernel, which replaces w_h, or ``None``.

    Returns:
      w_i (D, gates·H), b_i (gates·H,), and w_h (H, gates·H) with b_h (gates·H,), or, for
      G > 1, per module w_h (G, H/G, gates·H/G) with b_h (G, 1, gates·H/G).
    """
    modules = recurrent_modules
    w_i = jnp.concatenate([k for k, _ in inputs], axis=1)
    b_i = jnp.concatenate([b for _, b in inputs])
    b_h = jnp.concatenate([b for _, b in recurrents])
    kernels = [k for k, _ in recurrents]
    if frozen is not None:
        return w_i, b_i, frozen, b_h
    if modules == 1:
        return w_i, b_i, jnp.concatenate(kernels, axis=1), b_h
    w_h = _block_diagonal_kernel(kernels, recurrent_masks, modules)
    return w_i, b_i, w_h, _to_modules(b_h[None], modules, len(recurrents))


class LayerConfig(Protocol):
    """What :func:`run_layer` reads of a layer: the attributes of :class:`RecurrentLayer`."""

    cell: str
    features: int
    reverse: bool
    recurrent_modules: int
    unroll: int
    weight_grad: str


def projection_norm(dtype: Any = None, name: str = "projection_norm") -> nn.LayerNorm:
    """The layer norm of :class:`RecurrentLayer`'s ``input_norm``: applied to the input
    projections by gate, (..., gates, H) -> same, normalised over H, with a learned
    (gates, H) scale and shift (its params ``{"scale", "bias"}``). The one definition
    that :mod:`bsrnn.inference` applies to an exported layer's projections too."""
    return nn.LayerNorm(reduction_axes=-1, feature_axes=(-2, -1), dtype=dtype, name=name)


def run_layer(
    layer: LayerConfig,
    x: jax.Array,
    lengths: jax.Array | None,
    initial_carry: Carry | None,
    weights: tuple[jax.Array, jax.Array, Any, jax.Array],
    input_norm: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, Carry]:
    """One recurrent layer's pass over a padded batch, given its :func:`fused_weights`.

    The one implementation behind :class:`RecurrentLayer` and :class:`bsrnn.nnx.RecurrentLayer`
    (``layer``, whose cell, H, direction, P3's G, unroll factor and ``weight_grad`` it reads):
    the input projection of all steps in one product, then ``jax.lax.scan`` over
    :func:`cell_step` (:func:`hoisted_recurrence` or :func:`scan_recurrence`).
    ``input_norm``: applied to the input projection per gate, (B, T, gates, H) -> same
    (:class:`RecurrentLayer`'s ``input_norm``), or ``None``. The other arguments and the
    results as in :meth:`RecurrentLayer.__call__`.
    """
    cell, features, reverse, unroll = layer.cell, layer.features, layer.reverse, layer.unroll
    modules, weight_grad = layer.recurrent_modules, layer.weight_grad
    check_weight_grad(weight_grad)
    batch, steps, _ = x.shape
    w_i, b_i, w_h, b_h = weights
    gates = len(GATES[cell])
    if reverse:
        x = jnp.flip(x, axis=1) if lengths is None else reverse_sequences(x, lengths)
    x_proj = jnp.dot(x.astype(w_i.dtype), w_i) + b_i  # (B, T, gates·H), one product
    if input_norm is not None:  # per gate: (B, T, gates, H), normalised over H
        by_gate = x_proj.reshape(batch, steps, gates, features)
        x_proj = input_norm(by_gate).reshape(x_proj.shape)
    x_proj = jnp.swapaxes(x_proj, 0, 1)  # (T, B, gates·H)

    if initial_carry is None:
        h0 = jnp.zeros((batch, features), w_h.dtype)
        initial_carry = (h0, h0) if cell == "lstm" else h0
    if modules > 1:  # per module: x_proj (T, G, B, gates·H/G), carry (G, B, H/G)
        x_proj = _to_modules(x_proj, modules, gates)
        initial_carry = jax.tree_util.tree_map(lambda c: _to_modules(c, modules), initial_carry)

    valid = None if lengths is None else jnp.arange(steps)[:, None] < lengths[None, :]
    scan = hoisted_recurrence if weight_grad == "hoisted" else scan_recurrence
    carry, outputs = scan(cell, unroll, x_proj, valid, initial_carry, w_h, b_h)
    if modules > 1:
        outputs = _from_modules(outputs)
        carry = jax.tree_util.tree_map(_from_modules, carry)
    outputs = jnp.swapaxes(outputs, 0, 1)
    if reverse:
        outputs = jnp.flip(outputs, 1) if lengths is None else reverse_sequences(outputs, lengths)
    return outputs, carry


WEIGHT_GRADS = ("hoisted", "scan")


def check_weight_grad(weight_grad: str) -> None:
    """Raise ``ValueError`` unless ``weight_grad`` is one of :data:`WEIGHT_GRADS`."""
    if weight_grad not in WEIGHT_GRADS:
        raise ValueError(f"weight_grad={weight_grad!r}: choose one of {WEIGHT_GRADS}.")


def _select_update(
    cell: str, carry: Carry, x_t: jax.Array, h_proj: jax.Array, valid_t: jax.Array | None
) -> tuple[Carry, jax.Array]:
    """:func:`cell_update`, then, where ``valid_t`` (B,) is False, the old carry and a zero
    output (``valid_t`` ``None``: every row valid, no selects)."""
    new_carry, out = cell_update(cell, carry, x_t, h_proj)
    if valid_t is None:
        return new_carry, out
    keep = valid_t[:, None]  # (B, 1): broadcasts over (B, H) and (G, B, H/G)
    new_carry = jax.tree_util.tree_map(lambda new, old: jnp.where(keep, new, old), new_carry, carry)
    return new_carry, jnp.where(keep, out, 0)


def scan_recurrence(
    cell: str,
    unroll: int,
    x_proj: jax.Array,
    valid: jax.Array | None,
    initial_carry: Carry,
    w_h: Any,
    b_h: jax.Array,
) -> tuple[Carry, jax.Array]:
    """The recurrence of :func:`run_layer`: ``jax.lax.scan`` over :func:`cell_step` with the
    padding selects, differentiated by plain JAX autodiff (``weight_grad="scan"``).

    Args:
      cell: one of :data:`GATES`; unroll: the scan's unroll factor.
      x_proj: (T, B, gates·H) input projections (per module: (T, G, B, gates·H/G)).
      valid: (T, B) bool, False at padding steps, or ``None`` (no padding).
      initial_carry: h0 (B, H) or (h0, c0) (per module: (G, B, H/G)).
      w_h, b_h: the recurrent kernel and bias as :func:`cell_step` takes them.

    Returns:
      The final carry and the outputs (T, B, H) (per module (T, G, B, H/G)), zero at padding.
    """

    def step(carry: Carry, inputs: tuple[jax.Array, jax.Array | None]):
        x_t, valid_t = inputs
        h_proj = recurrent_product(carry_hidden(cell, carry), w_h) + b_h
        return _select_update(cell, carry, x_t, h_proj, valid_t)

    return jax.lax.scan(step, initial_carry, (x_proj, valid), unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def hoisted_recurrence(
    cell: str,
    unroll: int,
    x_proj: jax.Array,
    valid: jax.Array | None,
    initial_carry: Carry,
    w_h: Any,
    b_h: jax.Array,
) -> tuple[Carry, jax.Array]:
    """:func:`scan_recurrence` with a custom VJP that computes the recurrent weight gradient
    outside the scan (``weight_grad="hoisted"``, the default); same arguments and values.

    Plain autodiff of the scan treats W_h as a loop constant, so its transposed scan adds
    h_{t-1}ᵀ dp_t into a (H, gates·H) accumulator at every step (a read-modify-write of the
    whole kernel's size per step, on top of dh = dp_t W_hᵀ). Here the forward scan also
    saves each step's carry and recurrent projection p_t = W_h h_{t-1} + b_h; the backward
    scan takes, per step, the VJP of the elementwise part (:func:`cell_update` and the
    padding selects, by ``jax.vjp``) and dh_{t-1} += dp_t W_hᵀ
    (:func:`recurrent_product_transpose`); after it, dW_h is ONE product over all steps,
    the VJP of ``W -> recurrent_product(h_{0..T-1}, W)`` with time folded into the batch
    axis, and db_h = Σ dp_t. One formula serves the dense, block-diagonal and frozen
    block-sparse kernels. Forward-mode autodiff (``jax.jvp``) of a custom VJP is not
    defined in JAX: use ``weight_grad="scan"`` for it.
    """
    return scan_recurrence(cell, unroll, x_proj, valid, initial_carry, w_h, b_h)


def _hoisted_fwd(cell, unroll, x_proj, valid, initial_carry, w_h, b_h):
    def step(carry, inputs):
        x_t, valid_t = inputs
        h_proj = recurrent_product(carry_hidden(cell, carry), w_h) + b_h
        new_carry, out = _select_update(cell, carry, x_t, h_proj, valid_t)
        return new_carry, (out, carry, h_proj)

    carry, (outputs, carries, h_projs) = jax.lax.scan(
        step, initial_carry, (x_proj, valid), unroll=unroll
    )
    return (carry, outputs), (x_proj, valid, carries, h_projs, w_h, b_h)


def _hoisted_bwd(cell, unroll, residuals, cotangents):
    x_proj, valid, carries, h_projs, w_h, b_h = residuals
    d_final, d_outputs = cotangents

    def step(d_carry, inputs):
        x_t, valid_t, carry, h_proj, d_out = inputs
        _, vjp = jax.vjp(
            lambda x, p, c: _select_update(cell, c, x, p, valid_t), x_t, h_proj, carry
        )
        d_x, d_proj, d_prev = vjp((d_carry, d_out))
        h = carry_hidden(cell, carry)
        d_h = carry_hidden(cell, d_prev) + recurrent_product_transpose(d_proj, w_h, h)
        d_prev = (d_h, d_prev[1]) if cell == "lstm" else d_h
        return d_prev, (d_x, d_proj)

    d_initial, (d_x_proj, d_h_projs) = jax.lax.scan(
        step, d_final, (x_proj, valid, carries, h_projs, d_outputs), reverse=True, unroll=unroll
    )
    # dW_h in one product over all steps: time folded into the batch axis (axis -2).
    h_all = _fold_time(carry_hidden(cell, carries))
    _, vjp_w = jax.vjp(lambda w: recurrent_product(h_all, w), w_h)
    d_proj_all = _fold_time(d_h_projs)
    (d_w,) = vjp_w(d_proj_all.astype(jnp.result_type(h_all.dtype, w_h.dtype)))
    _, vjp_b = jax.vjp(lambda b: jnp.broadcast_to(b, d_h_projs.shape), b_h)
    (d_b,) = vjp_b(d_h_projs.astype(b_h.dtype))
    return d_x_proj, None, d_initial, d_w, d_b


hoisted_recurrence.defvjp(_hoisted_fwd, _hoisted_bwd)


def _fold_time(a: jax.Array) -> jax.Array:
    """(T, ..., B, F) -> (..., B·T, F): the steps stacked along the batch axis, batch-major,
    so that a batch sharded over devices (``bsrnn.sharding``) stays a contiguous split."""
    a = jnp.moveaxis(a, 0, -2)
    return a.reshape(*a.shape[:-3], -1, a.shape[-1])


def _block_diagonal_kernel(
    kernels: list[jax.Array], masks: Mapping[str, jax.Array], modules: int
) -> jax.Array:
    """The masked gate kernels (H, H) as per-module blocks (G, H/G, gates·H/G), after
    checking that their masks (by kernel name) keep nothing off the diagonal blocks (see
    :class:`RecurrentLayer`): concrete masks raise, traced ones turn the kernel to NaN."""
    off_diagonal = []
    for name, mask in masks.items():
        if isinstance(mask, jax.core.Tracer):
            off_diagonal.append(blocks.off_diagonal_count(mask, modules))
        else:
            blocks.check_block_diagonal(mask, modules, f"the mask of {name}")
    w_h = jnp.concatenate([blocks.diagonal_blocks(k, modules) for k in kernels], axis=-1)
    if off_diagonal:
        w_h = jnp.where(sum(off_diagonal) > 0, jnp.nan, w_h)
    return w_h


def _to_modules(a: jax.Array, modules: int, gates: int = 1) -> jax.Array:
    """(..., B, gates·H) -> (..., G, B, gates·H/G): module k gets its H/G units of each gate
    (units k·H/G to (k+1)·H/G), gates side by side."""
    *lead, rows, width = a.shape
    a = a.reshape(*lead, rows, gates, modules, width // gates // modules)
    return jnp.moveaxis(a, -2, -4).reshape(*lead, modules, rows, width // modules)


def _from_modules(a: jax.Array) -> jax.Array:
    """(..., G, B, H/G) -> (..., B, H), the inverse of :func:`_to_modules` for one gate."""
    *lead, modules, rows, units = a.shape
    return jnp.moveaxis(a, -3, -2).reshape(*lead, rows, modules * units)


class RNN(nn.Module):
    """A stack of :class:`RecurrentLayer`, optionally bidirectional.

    Layer i is named ``layer_i`` (``layer_i_fwd`` and ``layer_i_bwd`` when bidirectional,
    whose outputs are concatenated, so the next layer sees 2H features).

    Attributes:
      cell, features, recurrent_mask_init, input_mask_init, recurrent_modules,
        frozen_recurrent, unroll, dtype, input_norm, weight_grad: as in
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
    recurrent_modules: int = 1
    frozen_recurrent: Mapping[str, Any] | None = None
    unroll: int = 1
    dtype: Any = None
    input_norm: bool = False
    weight_grad: str = "hoisted"

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """x (B, T, D), lengths (B,) -> outputs (B, T, H), or (B, T, 2H) if bidirectional."""
        common = dict(
            cell=self.cell,
            features=self.features,
            recurrent_mask_init=self.recurrent_mask_init,
            input_mask_init=self.input_mask_init,
            recurrent_modules=self.recurrent_modules,
            frozen_recurrent=self.frozen_recurrent,
            unroll=self.unroll,
            dtype=self.dtype,
            input_norm=self.input_norm,
            weight_grad=self.weight_grad,
        )
        return run_stack(
            lambda name, reverse: RecurrentLayer(name=name, reverse=reverse, **common),
            self.num_layers,
            self.bidirectional,
            x,
            lengths,
        )


def stack_layers(num_layers: int, bidirectional: bool) -> list[tuple[tuple[str, bool], ...]]:
    """The layers of an :class:`RNN` stack: per depth i, the (name, reverse) of its layers,
    ``(("layer_i", False),)``, or ``(("layer_i_fwd", False), ("layer_i_bwd", True))``."""
    if bidirectional:
        return [((f"layer_{i}_fwd", False), (f"layer_{i}_bwd", True)) for i in range(num_layers)]
    return [((f"layer_{i}", False),) for i in range(num_layers)]


def run_stack(
    layer: Callable[[str, bool], Callable[..., tuple[jax.Array, Carry]]],
    num_layers: int,
    bidirectional: bool,
    x: jax.Array,
    lengths: jax.Array | None,
) -> jax.Array:
    """Run the :func:`stack_layers` in order, each depth's outputs concatenated.

    Args:
      layer: ``(name, reverse) -> the layer of that name`` (a :class:`RecurrentLayer`).
      num_layers, bidirectional: as in :class:`RNN`.
      x: inputs (B, T, D); lengths: (B,) or ``None``.

    Returns:
      (B, T, H), or (B, T, 2H) if bidirectional.
    """
    for depth in stack_layers(num_layers, bidirectional):
        outputs = [layer(name, reverse)(x, lengths)[0] for name, reverse in depth]
        x = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=-1)
    return x
