"""Language model: embedding, stacked masked RNN/GRU/LSTM layers, dropout, softmax.

Parameter tree (``cell="gru"``, two layers)::

    embed/embedding          (V, E)       dense (embeddings are never pruned, P2)
    layer_0/input_{r,z,n}    (E, H) each  "input" kernels, masked
    layer_0/recurrent_{r,z,n} (H, H) each "recurrent" kernels, masked
    layer_1/...              (H, H)
    output/kernel            (H, V)       "fc", masked when ``mask_output`` (else nn.Dense)

With ``tie_embeddings`` the softmax reuses the embedding (``E`` must equal ``H``) and has
no ``output`` layer. The model is stateful across windows: it takes and returns the
recurrent carry of every layer, so a contiguous stream (``bsrnn.data.lm_batches``) is read
with truncated back-propagation through time.

The trainer's questions (:class:`bsrnn.models.Task`): it reads ``lm`` data
(:class:`bsrnn.data.TextData`); its loss is the cross-entropy per token in nats, the mean
over the batch's tokens in training; the carry of the B training rows goes from one window
to the next; evaluation passes the carry from window to window too and reports the mean
loss per token and bits per character (character corpora) or perplexity (word corpora).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bsrnn import cells, data, models

Carry = tuple[Any, ...]  # one carry per layer: h (B, H), or (h, c) for the LSTM

TASK = "lm"  # reads bsrnn.data.TextData
NUM_CLASSES_FIELD = "vocab_size"


class Model(nn.Module):
    """Embedding, ``num_layers`` recurrent layers of ``features`` units, softmax over V.

    Attributes:
      vocab_size: V.
      cell: ``rnn``, ``gru`` or ``lstm`` (see :data:`bsrnn.cells.GATES`).
      features: H.
      num_layers: number of stacked recurrent layers.
      embed_dim: E.
      dropout: drop rate on the embeddings, between layers and before the softmax
        (Zaremba et al.'s non-recurrent dropout).
      tie_embeddings: softmax weights = embedding matrix (needs E == H).
      mask_output: the softmax layer is a prunable ``fc`` kernel with a mask.
      recurrent_modules: P3's G: every recurrent kernel is block-diagonal with G modules,
        run as G independent products (:class:`bsrnn.cells.RecurrentLayer`).
      frozen_recurrent: frozen block structures of the recurrent layers, by path
        (:func:`bsrnn.kernels.sparse_training.freeze`; ``bsrnn.train`` sets it once masks
        freeze with ``config.prune.sparse_training``).
      unroll: ``lax.scan`` unroll factor.
    """

    vocab_size: int
    cell: str = "gru"
    features: int = 256
    num_layers: int = 1
    embed_dim: int = 64
    dropout: float = 0.0
    tie_embeddings: bool = False
    mask_output: bool = True
    recurrent_modules: int = 1
    frozen_recurrent: Any = None
    unroll: int = 1

    def __post_init__(self) -> None:
        models.check_sizes("lm", positive=dict(
            vocab_size=self.vocab_size, features=self.features, num_layers=self.num_layers,
            embed_dim=self.embed_dim, recurrent_modules=self.recurrent_modules,
            unroll=self.unroll))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"config.model.dropout={self.dropout!r} must be in [0, 1).")
        super().__post_init__()

    def initial_carry(self, batch_size: int) -> Carry:
        """Zero carries for every layer: h of shape (B, H), or (h, c) for the LSTM."""
        h = jnp.zeros((batch_size, self.features), jnp.float32)
        return tuple((h, h) if self.cell == "lstm" else h for _ in range(self.num_layers))

    @nn.compact
    def __call__(
        self, tokens: jax.Array, carry: Carry | None = None, *, train: bool = False
    ) -> tuple[jax.Array, Carry]:
        """tokens (B, T) int -> logits (B, T, V) float32 and the new carry.

        Args:
          tokens: token ids.
          carry: the carry returned for the previous window of the same rows;
            ``None``: zeros.
          train: apply dropout (needs the ``dropout`` RNG).
        """
        if self.tie_embeddings and self.embed_dim != self.features:
            raise ValueError(
                f"tie_embeddings needs embed_dim == features, got {self.embed_dim} and "
                f"{self.features}; set config.model.embed_dim={self.features}."
            )
        if carry is None:
            carry = self.initial_carry(tokens.shape[0])
        embed = nn.Embed(self.vocab_size, self.embed_dim, name="embed")
        drop = nn.Dropout(self.dropout, deterministic=not train)
        x = drop(embed(tokens))
        new_carry = []
        for i in range(self.num_layers):
            layer = cells.RecurrentLayer(
                self.cell, self.features, recurrent_modules=self.recurrent_modules,
                frozen_recurrent=self.frozen_recurrent,
                unroll=self.unroll, name=f"layer_{i}",
            )
            x, c = layer(x, None, initial_carry=carry[i])
            new_carry.append(c)
            x = drop(x)
        if self.tie_embeddings:
            logits = embed.attend(x)
        elif self.mask_output:
            logits = cells.MaskedDense(self.features, self.vocab_size, name="output")(x)
        else:
            logits = nn.Dense(self.vocab_size, name="output")(x)
        return logits.astype(jnp.float32), tuple(new_carry)


def inputs(batch: dict[str, Any]) -> tuple[jax.Array]:
    """The model's inputs: the (B, T) tokens."""
    return (batch["inputs"],)


def initial_carry(model: Model, batch_size: int) -> Carry:
    """Zero carries of ``model`` for ``batch_size`` rows (:meth:`Model.initial_carry`)."""
    return model.initial_carry(batch_size)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy in nats per token, (B, T, V), (B, T) -> (B, T)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def train_loss(
    model: Model, variables: dict[str, Any], batch: dict[str, Any], carry: Carry,
    rngs: dict[str, Any],
) -> tuple[jax.Array, Carry]:
    """Mean nats per token of ``batch`` with dropout, and the carry after it."""
    logits, carry = model.apply(variables, batch["inputs"], carry, train=True, rngs=rngs)
    return token_losses(logits, batch["targets"]).mean(), carry


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_step(variables, carry, batch, model):
    logits, carry = model.apply(variables, batch["inputs"], carry)
    return token_losses(logits, batch["targets"]).sum(), carry


def evaluate(
    model: Model, variables: dict[str, Any], batches: Iterator[dict[str, Any]],
    dataset: data.TextData, batch_size: int, place: Callable[[Any], Any],
) -> dict[str, float]:
    """``loss``, mean nats per token over ``batches`` (the windows of one split, the carry
    passed from window to window as in training), and ``bpc`` (``dataset.unit == "char"``)
    or ``perplexity`` (``"word"``).

    ``model`` may be any object with the Flax model's ``apply`` and ``initial_carry``
    (:class:`bsrnn.inference.LanguageModel` is one).
    """
    total, count = 0.0, 0
    carry = place(model.initial_carry(batch_size))
    for batch in batches:
        loss, carry = _eval_step(variables, carry, place(batch), model)
        total += float(loss)
        count += batch["targets"].size
    mean = total / count
    if dataset.unit == "char":
        return {"loss": mean, "bpc": data.bits_per_character(mean)}
    return {"loss": mean, "perplexity": data.perplexity(mean)}
