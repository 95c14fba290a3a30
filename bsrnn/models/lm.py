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
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bsrnn import cells, models

Carry = tuple[Any, ...]  # one carry per layer: h (B, H), or (h, c) for the LSTM


def initial_carry(cell: str, num_layers: int, features: int, batch_size: int) -> Carry:
    """Zero carries for every layer: h of shape (B, H), or (h, c) for the LSTM."""
    h = jnp.zeros((batch_size, features), jnp.float32)
    return tuple((h, h) if cell == "lstm" else h for _ in range(num_layers))


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
        """Zero carries for a batch of ``batch_size`` rows."""
        return initial_carry(self.cell, self.num_layers, self.features, batch_size)

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
