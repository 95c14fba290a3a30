"""Deep Speech 2 style acoustic model for CTC (SPEC §2.5, P1's speech models).

features (B, T, F) -> 2-D convolutions over (time, frequency), strided, clipped ReLU
-> N recurrent layers -> optional row convolution (lookahead) -> fully connected layer,
clipped ReLU -> softmax over the CTC vocabulary (blank = 0).

P1's two models, at any size:

* RNN: ``cell="rnn_clipped_relu"``, ``bidirectional=True`` (P1: 7 layers).
* GRU: ``cell="gru"``, forward only, ``row_conv_context > 0`` (P1: 3 layers).

Parameter tree::

    conv_0, conv_1          (kt, kf, C_in, C)  dense (P2: convolutions stay dense)
    rnn/layer_i[_fwd|_bwd]/input_*, recurrent_*   masked "input" / "recurrent" kernels
    row_conv/kernel         (τ + 1, D)           dense, per-feature lookahead weights
    fc/kernel               (D, fc_features)     "fc", masked when ``mask_fc``
    output/kernel           (fc_features, C)     "fc", masked when ``mask_output``

Padding is exact: every layer zeroes the frames past each example's length, and the
convolutions pad (kt − 1) // 2 frames before and kt // 2 after, so frame t of a padded
batch equals frame t of the example run alone. A stride s maps n frames to ceil(n / s).

The trainer's questions (:class:`bsrnn.models.Task`): it reads ``ctc`` data
(:class:`bsrnn.data.SpeechData`); its inputs are the features and their lengths; its loss
is ``optax.ctc_loss`` per utterance (blank 0), the mean over the batch in training; it has
no carry; evaluation reports the mean loss per utterance and the CER and WER of the greedy
transcripts (:mod:`bsrnn.ctc`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bsrnn import cells, ctc, data, models, sharding

TASK = "ctc"  # reads bsrnn.data.SpeechData
NUM_CLASSES_FIELD = "num_classes"


def clipped_relu(x: jax.Array) -> jax.Array:
    """DS2's min(max(x, 0), 20)."""
    return jnp.clip(x, 0.0, 20.0)


def output_lengths(lengths: jax.Array, time_strides: Sequence[int]) -> jax.Array:
    """Frames after the convolutions: n -> ceil(n / s) for each time stride s. (B,) -> (B,)."""
    for s in time_strides:
        lengths = -(-lengths // s)
    return lengths


def _zero_padding(x: jax.Array, lengths: jax.Array) -> jax.Array:
    valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, 0)


class RowConv(nn.Module):
    """DS2's row convolution: y_t = Σ_{j=0..τ} w_j ⊙ h_{t+j}, per feature (lookahead τ).

    Frames past a sequence's end must be zero (they are: the recurrent layers output zeros
    there), so the lookahead never reads padding.
    """

    context: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """h (B, T, D) -> (B, T, D)."""
        steps, features = h.shape[1], h.shape[2]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=1),
            (self.context + 1, features),
        )
        padded = jnp.pad(h, ((0, 0), (0, self.context), (0, 0)))
        return sum(kernel[j] * padded[:, j : j + steps] for j in range(self.context + 1))


class Model(nn.Module):
    """DS2-style acoustic model; see the module docstring.

    Attributes:
      num_classes: CTC vocabulary size C, blank included.
      conv_features: channels of each convolution.
      conv_kernels: (kt, kf) of each convolution.
      conv_strides: (st, sf) of each convolution.
      cell: ``rnn_clipped_relu``, ``rnn``, ``gru`` or ``lstm``.
      features: H, units per recurrent layer (per direction).
      num_layers: recurrent layers.
      bidirectional: forward and backward layers, concatenated (2H features).
      row_conv_context: τ, frames of lookahead; 0 for no row convolution.
      fc_features: width of the fully connected layer.
      mask_fc, mask_output: the fully connected / softmax layer is a prunable ``fc``
        kernel with a mask (else a plain ``nn.Dense``).
      recurrent_modules: P3's G for every recurrent kernel (block-diagonal, run as G
        independent products: :class:`bsrnn.cells.RecurrentLayer`).
      frozen_recurrent: frozen block structures of the recurrent layers, by path
        (:func:`bsrnn.kernels.sparse_training.freeze`; ``bsrnn.train`` sets it once masks
        freeze with ``config.prune.sparse_training``).
      unroll: ``lax.scan`` unroll factor.
      input_norm: layer norm on each recurrent layer's input projections
        (:class:`bsrnn.cells.RecurrentLayer`; DS2 batch-normalised them).
    """

    num_classes: int
    conv_features: Sequence[int] = (32, 32)
    conv_kernels: Sequence[Sequence[int]] = ((11, 5), (11, 5))
    conv_strides: Sequence[Sequence[int]] = ((2, 2), (1, 2))
    cell: str = "rnn_clipped_relu"
    features: int = 256
    num_layers: int = 3
    bidirectional: bool = True
    row_conv_context: int = 0
    fc_features: int = 256
    mask_fc: bool = True
    mask_output: bool = True
    recurrent_modules: int = 1
    frozen_recurrent: Any = None
    unroll: int = 1
    input_norm: bool = False

    def __post_init__(self) -> None:
        models.check_sizes(
            "ds2", positive=dict(
                num_classes=self.num_classes, features=self.features, num_layers=self.num_layers,
                fc_features=self.fc_features, recurrent_modules=self.recurrent_modules,
                unroll=self.unroll, conv_features=self.conv_features,
                conv_kernels=self.conv_kernels, conv_strides=self.conv_strides),
            non_negative=dict(row_conv_context=self.row_conv_context))
        super().__post_init__()

    def output_lengths(self, lengths: jax.Array) -> jax.Array:
        """(B,) input frames -> (B,) output frames (the CTC logit lengths)."""
        return output_lengths(lengths, [s[0] for s in self.conv_strides])

    @nn.compact
    def __call__(
        self, features: jax.Array, lengths: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """Run the model.

        Args:
          features: (B, T, F) float input frames, zero past each length.
          lengths: (B,) int valid frames.
          train: unused (no dropout or batch statistics); kept for the trainer's interface.

        Returns:
          logits (B, T', C) float32, T' = T after the strides, zero past each output length,
          and the output lengths (B,).
        """
        del train
        if not (len(self.conv_features) == len(self.conv_kernels) == len(self.conv_strides)):
            raise ValueError(
                "conv_features, conv_kernels and conv_strides need one entry per convolution; "
                f"got {len(self.conv_features)}, {len(self.conv_kernels)}, "
                f"{len(self.conv_strides)}."
            )
        x = features[..., None]  # (B, T, F, 1): an image of time by frequency
        for i, (channels, kernel, stride) in enumerate(
            zip(self.conv_features, self.conv_kernels, self.conv_strides, strict=True)
        ):
            kt, kf = kernel
            x = nn.Conv(
                channels, (kt, kf), tuple(stride),
                padding=(((kt - 1) // 2, kt // 2), ((kf - 1) // 2, kf // 2)),
                name=f"conv_{i}",
            )(x)
            lengths = output_lengths(lengths, [stride[0]])
            x = _zero_padding(clipped_relu(x), lengths)
        x = x.reshape(x.shape[0], x.shape[1], -1)  # (B, T', F'·C)
        x = cells.RNN(
            self.cell, self.features, self.num_layers, self.bidirectional,
            recurrent_modules=self.recurrent_modules, frozen_recurrent=self.frozen_recurrent,
            unroll=self.unroll, input_norm=self.input_norm, name="rnn",
        )(x, lengths)
        if self.row_conv_context > 0:
            x = _zero_padding(RowConv(self.row_conv_context, name="row_conv")(x), lengths)
        width = x.shape[-1]
        if self.mask_fc:
            x = cells.MaskedDense(width, self.fc_features, name="fc")(x)
        else:
            x = nn.Dense(self.fc_features, name="fc")(x)
        x = clipped_relu(x)
        if self.mask_output:
            logits = cells.MaskedDense(self.fc_features, self.num_classes, name="output")(x)
        else:
            logits = nn.Dense(self.num_classes, name="output")(x)
        return _zero_padding(logits.astype(jnp.float32), lengths), lengths


def inputs(batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    """The model's inputs: features (B, T, F) and lengths (B,)."""
    return batch["inputs"], batch["lengths"]


def initial_carry(model: Model, batch_size: int) -> tuple[()]:
    """``()``: the model keeps no state from one batch to the next."""
    del model, batch_size
    return ()


def utterance_losses(logits: jax.Array, lengths: jax.Array, batch: dict[str, Any]) -> jax.Array:
    """CTC loss per utterance (blank 0): logits (B, T', C), output lengths (B,) -> (B,)."""
    paddings = (jnp.arange(logits.shape[1])[None, :] >= lengths[:, None]).astype(jnp.float32)
    return optax.ctc_loss(logits, paddings, batch["labels"], batch["label_paddings"])


def train_loss(
    model: Model, variables: dict[str, Any], batch: dict[str, Any], carry: tuple[()],
    rngs: dict[str, Any],
) -> tuple[jax.Array, tuple[()]]:
    """Mean CTC loss over the utterances of ``batch``, and the (empty) carry."""
    logits, lengths = model.apply(variables, *inputs(batch), train=True, rngs=rngs)
    return utterance_losses(logits, lengths, batch).mean(), carry


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_step(variables, batch, model):
    logits, lengths = model.apply(variables, *inputs(batch))
    real = batch["lengths"] > 0
    loss = jnp.where(real, utterance_losses(logits, lengths, batch), 0.0).sum()
    labels, label_lengths = ctc.greedy_decode(logits, lengths)
    return loss, real.sum(), labels, label_lengths


def evaluate(
    model: Model, variables: dict[str, Any], batches: Iterator[dict[str, Any]],
    dataset: data.SpeechData, batch_size: int, place: Callable[[Any], Any],
) -> dict[str, float]:
    """``loss``, mean CTC loss per utterance over ``batches`` (rows of length 0 are padding
    and do not count), and ``cer`` and ``wer`` of the greedy transcripts (fractions).

    ``model`` may be any object with the Flax model's ``apply``
    (:class:`bsrnn.inference.SpeechModel` is one).
    """
    del batch_size  # no carry to size
    total, count, references, hypotheses = 0.0, 0, [], []
    for batch in batches:
        loss, n, labels, lengths = _eval_step(variables, place(batch), model)
        total, count = total + float(loss), count + int(n)
        labels, lengths = sharding.to_host(labels), sharding.to_host(lengths)
        for b in range(int(n)):
            references.append("".join(dataset.vocab.decode(
                batch["labels"][b, : batch["label_lengths"][b]])))
            hypotheses.append("".join(dataset.vocab.decode(labels[b, : int(lengths[b])])))
    return {"loss": total / count, **ctc.error_rates(references, hypotheses)}
