"""Run an exported model (`bsrnn.export`) from its file alone, on the block-sparse kernels.

    from bsrnn import inference
    model = inference.load("/tmp/run/model.npz")        # a LanguageModel or a SpeechModel
    print(model.sample(length=300, temperature=0.8, prompt="ROMEO:\\n"))
    logits, carry = model(tokens)                        # (B, T) ids -> (B, T, V) logits
    speech = inference.load("/tmp/an4/model.npz")
    speech.transcribe(["an4/feat/an4_clstk/fash/an251-fash-b.mfc"])

The command line (`python -m bsrnn.inference sample|transcribe|evaluate`) is in `__main__`.

Every layer runs from the exported arrays through one function per layer kind:

* `linear` (softmax and DS2's fully connected layer): `bsrnn.kernels.bsc_matmul` when the
  kernel is stored block-sparse, a dense product otherwise.
* `recurrent` (every recurrent layer, stacked, bidirectional, with lengths): the kernels'
  whole-sequence functions (`sparse_gru`, `sparse_lstm`, `sparse_rnn`, which take lengths and
  a direction) when the layer's recurrent kernels are block-sparse with one block shape;
  otherwise the masked dense computation of `bsrnn.cells.RecurrentLayer`.
* `bidirectional` (a DS2 depth whose two directions both run on the kernels): the two as ONE
  recurrence, `bsrnn.kernels.sparse_bidirectional` (T sequential steps, not 2T; `auto` times
  that against the two separate scans). `load(fuse_directions=False)` runs them one after
  the other, as `recurrent` does.
* DS2's convolutions and row convolution (never pruned) run the model's own Flax modules.

`impl="dense"` runs every layer masked dense: the same numbers (the tests check it against
the Flax model with its masks) and the baseline the benchmarks compare with.

With `impl="auto"` the kernels choose per layer by measuring (`bsrnn.kernels.autotune`), which
needs the weights concrete. The models' methods pass the weights to `jax.jit` as arguments, so
before a shape's first call they resolve every layer's choice for that (batch, steps) outside
jit (`measured`) and hand the jitted function the answer; your own jitted loop can do the same.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from bsrnn import cells, ctc, data, export, kernels
from bsrnn.kernels import bsc
from bsrnn.kernels.bsc import BlockSparseMatrix
from bsrnn.models import MODEL_NAMES, ds2

IMPLS = ("auto", "dense", "xla", "pallas", "pallas_interpret")

# Cells with a whole-sequence sparse kernel: (weights builder, sequence function).
_KERNEL_CELLS: dict[str, tuple[Callable, Callable]] = {
    "gru": (kernels.sparse_gru_weights, kernels.sparse_gru),
    "lstm": (kernels.sparse_lstm_weights, kernels.sparse_lstm),
    "rnn": (functools.partial(kernels.sparse_rnn_weights, cell="rnn"), kernels.sparse_rnn),
    "rnn_clipped_relu": (
        functools.partial(kernels.sparse_rnn_weights, cell="rnn_clipped_relu"),
        kernels.sparse_rnn,
    ),
}


def _static(**kwargs: Any) -> Any:
    return dataclasses.field(metadata={"static": True}, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Linear:
    """y = x @ K + b with K (D, F) dense or a `BlockSparseMatrix`.

    Attributes:
      kernel: (D, F) array or `BlockSparseMatrix`.
      bias: (F,) or None.
      impl: the kernels' `impl` for a block-sparse K (static).
    """

    kernel: Any
    bias: Any
    impl: str = _static(default="auto")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Recurrent:
    """One recurrent layer: the kernels' weights, or the masked dense params.

    Attributes:
      sparse: the kernels' prepared weights (e.g. `kernels.SparseGRUWeights`), or None.
      params, masks: the `bsrnn.cells.RecurrentLayer` params and masks (dense path), or None.
      cell, features, reverse: as in `RecurrentLayer` (static).
      impl: the kernels' `impl` (static).
      input_norm: the layer normalises its input projection (``RecurrentLayer``'s
        ``input_norm``, :func:`bsrnn.cells.projection_norm`), static.
      norm: on the kernels, that layer norm's params and the bias the kernels fold into
        the projection on top of the input bias: {"scale": (gates, H), "bias": (gates, H),
        "shift": (gates·H,)}, so the projection is ``norm(xp - shift) + shift`` with xp the
        kernels' `input_projection` (see `projections`); None without ``input_norm`` (or on
        the dense path, whose params hold the norm).
    """

    sparse: Any
    params: Any
    masks: Any
    cell: str = _static()
    features: int = _static()
    reverse: bool = _static(default=False)
    impl: str = _static(default="auto")
    input_norm: bool = _static(default=False)
    norm: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bidirectional:
    """A bidirectional depth whose two directions run as one recurrence on the kernels.

    Attributes:
      forward, backward: the two `Recurrent` layers (both on the kernels; their `impl`s are
        what "separate" runs).
      pair: `bsrnn.kernels.BidirectionalWeights.pair` (the two recurrent kernels as one
        block-diagonal 2H layer), or None where the blocks do not tile H.
      impl: `kernels.sparse_bidirectional`'s: "auto", "dense", "separate" or a kernel
        (static).
    """

    forward: Recurrent
    backward: Recurrent
    pair: Any
    impl: str = _static(default="auto")

    @property
    def kernel_weights(self) -> kernels.BidirectionalWeights:
        """The kernels' `BidirectionalWeights` of this depth."""
        return kernels.BidirectionalWeights(self.forward.sparse, self.backward.sparse,
                                            self.pair)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Wavefront:
    """Consecutive forward layers on the kernels run as one wavefront-ordered recurrence
    (`bsrnn.kernels.sparse_stack`: T + L - 1 sequential steps, not L·T).

    Attributes:
      layers: the `Recurrent` layers, bottom first (their `impl`s are what "separate" runs).
      impl: `kernels.sparse_stack`'s: "auto", "wavefront" or "separate" (static).
    """

    layers: tuple[Recurrent, ...]
    impl: str = _static(default="auto")


def wavefront(layer: Wavefront, x: jax.Array, carry: Any = None,
              lengths: jax.Array | None = None) -> tuple[jax.Array, tuple]:
    """x (B, T, D) -> the last layer's outputs (B, T, H) and every layer's final carry:
    what `recurrent` layer after layer gives."""
    return kernels.sparse_stack(x, tuple(r.sparse for r in layer.layers), carry,
                                lengths=lengths, impl=layer.impl,
                                separate=tuple(r.impl for r in layer.layers))


def _wavefronts(depths: tuple, fuse: bool) -> tuple:
    """DS2's depths with each run of >= 2 consecutive forward-only depths on the kernels
    as one `Wavefront` (when ``fuse``)."""
    if not fuse:
        return depths
    out, run = [], []
    for depth in depths + (None,):
        if (isinstance(depth, tuple) and len(depth) == 1 and depth[0].sparse is not None
                and depth[0].norm is None and not depth[0].reverse):
            run.append(depth[0])
            continue
        out.extend([Wavefront(tuple(run), run[0].impl)] if len(run) > 1 else
                   [(r,) for r in run])
        run = []
        if depth is not None:
            out.append(depth)
    return tuple(out)


def linear(layer: Linear, x: jax.Array) -> jax.Array:
    """(..., D) -> (..., F): `bsc_matmul` for a block-sparse kernel, `jnp.dot` otherwise."""
    if isinstance(layer.kernel, BlockSparseMatrix):
        y = kernels.bsc_matmul(x, layer.kernel, impl=layer.impl)
    else:
        y = jnp.dot(x.astype(layer.kernel.dtype), layer.kernel)
    return y if layer.bias is None else y + layer.bias


def _zero_initial(cell: str, batch: int, features: int, dtype: Any) -> Any:
    h = jnp.zeros((batch, features), dtype)
    return (h, h) if cell == "lstm" else h


def recurrent(
    layer: Recurrent, x: jax.Array, carry: Any = None, lengths: jax.Array | None = None
) -> tuple[jax.Array, Any]:
    """One recurrent layer over a padded batch, like `bsrnn.cells.RecurrentLayer`.

    Args:
      layer: the layer's weights.
      x: (B, T, D) inputs.
      carry: h0 (B, H), or (h0, c0) for the LSTM; zeros if None.
      lengths: (B,) valid steps (None: all T); outputs past them are zero and the final
        carry is the state after each sequence's last valid step.

    Returns:
      outputs (B, T, H) and the final carry.
    """
    if layer.sparse is None:
        module = cells.RecurrentLayer(layer.cell, layer.features, reverse=layer.reverse,
                                      input_norm=layer.input_norm)
        return module.apply({"params": layer.params, "masks": layer.masks}, x, lengths,
                            initial_carry=carry)
    if layer.norm is not None:  # the normalised projections, then the kernels' recurrence
        return kernels.projected_sequence(projections(layer, x), layer.sparse, carry,
                                          lengths=lengths, reverse=layer.reverse,
                                          impl=layer.impl)
    run = _KERNEL_CELLS[layer.cell][1]
    outputs, last = run(x, layer.sparse, carry, lengths=lengths, reverse=layer.reverse,
                        impl=layer.impl)
    return outputs, last


def projections(layer: Recurrent, x: jax.Array) -> jax.Array:
    """x (B, T, D) -> the input projections (B, T, gates·H) that a layer on the kernels feeds
    `kernels.projected_sequence`: x @ W_i + b as the kernels fold the biases, with the
    layer's ``input_norm`` applied (to x @ W_i + b_i, by gate, as `RecurrentLayer` does)."""
    xp = jnp.swapaxes(kernels.input_projection(x, layer.sparse), 0, 1)
    if layer.norm is None:
        return xp
    gates = len(cells.GATES[layer.cell])
    shift = layer.norm["shift"]
    by_gate = (xp - shift).reshape(*xp.shape[:-1], gates, -1)
    normed = cells.projection_norm(xp.dtype).apply(
        {"params": {"scale": layer.norm["scale"], "bias": layer.norm["bias"]}}, by_gate)
    return normed.reshape(xp.shape) + shift


def bidirectional(
    layer: Bidirectional, x: jax.Array, carry: Any = None, lengths: jax.Array | None = None
) -> tuple[tuple[jax.Array, jax.Array], tuple[Any, Any]]:
    """A bidirectional depth over a padded batch, both directions in one recurrence.

    Args:
      layer: the depth's weights.
      x: (B, T, D) inputs.
      carry: (forward's, backward's) initial carries (as `recurrent` takes them), or None.
      lengths: (B,) valid steps (None: all T).

    Returns:
      (forward outputs, backward outputs), each (B, T, H), and the two final carries: what
      `recurrent` gives for each direction.
    """
    separate = (layer.forward.impl, layer.backward.impl)
    if layer.forward.norm is not None:  # normalised projections (both or neither: `_paired`)
        xps = (projections(layer.forward, x), projections(layer.backward, x))
        return kernels.projected_bidirectional(xps, layer.kernel_weights, carry,
                                               lengths=lengths, impl=layer.impl,
                                               separate=separate)
    return kernels.sparse_bidirectional(x, layer.kernel_weights, carry, lengths=lengths,
                                        impl=layer.impl, separate=separate)


def _paired(depth: tuple[Recurrent, ...], fuse: bool) -> tuple[Recurrent, ...] | Bidirectional:
    """A DS2 depth as `load` runs it: a `Bidirectional` when ``fuse`` and both directions
    are on the kernels, else the layers as they are (run one after the other)."""
    if not (fuse and len(depth) == 2 and all(layer.sparse is not None for layer in depth)):
        return depth
    forward, backward = depth
    pair = kernels.bidirectional_weights(forward.sparse, backward.sparse).pair
    return Bidirectional(forward, backward, jax.tree_util.tree_map(jnp.asarray, pair),
                         forward.impl)


def measured(weights: Any, batch: int, steps: int, rows: int | None = None) -> Any:
    """``weights`` with each "auto" layer's `impl` replaced by the kernels' measured choice
    for inputs of ``batch`` rows and ``steps`` time steps (recurrent layers) and ``rows``
    rows (linear layers; default ``batch * steps``).

    Run it outside `jax.jit`, on concrete weights (an `LMWeights`, `DS2Weights`, or any tree
    of `Recurrent` / `Linear` layers); the choices are cached per shape by the kernels.
    """

    rows = batch * steps if rows is None else rows

    def resolve(layer: Any) -> Any:
        if isinstance(layer, Wavefront):  # the layers first: "separate" runs them
            layer = dataclasses.replace(layer, layers=tuple(resolve(r) for r in layer.layers))
            return dataclasses.replace(layer, impl=kernels.resolve_stack_impl(
                tuple(r.sparse for r in layer.layers), batch, steps, impl=layer.impl,
                separate=tuple(r.impl for r in layer.layers)))
        if isinstance(layer, Bidirectional):  # the directions first: "separate" runs them
            forward, backward = resolve(layer.forward), resolve(layer.backward)
            layer = dataclasses.replace(layer, forward=forward, backward=backward)
            return dataclasses.replace(layer, impl=kernels.resolve_bidirectional_impl(
                layer.kernel_weights, batch, steps, impl=layer.impl,
                separate=(forward.impl, backward.impl)))
        if isinstance(layer, Recurrent) and layer.sparse is not None and layer.impl == "auto":
            impl = kernels.resolve_impl(layer.sparse, batch, steps)
            sparse = (kernels.recurrence.with_dense_kernel(layer.sparse) if impl == "dense"
                      else layer.sparse)  # not rebuilt from the blocks in every loop step
            return dataclasses.replace(layer, impl=impl, sparse=sparse)
        if (isinstance(layer, Linear) and isinstance(layer.kernel, BlockSparseMatrix)
                and layer.impl == "auto"):
            impl = kernels.matmul_impl(layer.kernel, rows, layer.kernel.dtype)
            if impl == "dense":  # the dense kernel itself, not rebuilt in every loop step
                return dataclasses.replace(layer, kernel=bsc.dense_kernel(layer.kernel),
                                           impl=impl)
            return dataclasses.replace(layer, impl=impl)
        return layer

    return jax.tree_util.tree_map(
        resolve, weights,
        is_leaf=lambda x: isinstance(x, Recurrent | Linear | Bidirectional | Wavefront))


# ----------------------------------------------------------------------------------------
# Building the layers from the exported arrays.


def _kernel_and_mask(leaf: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """A stored kernel as a dense (in, out) array (pruned entries zero) and its boolean mask.

    On the host in NumPy: `bsc.to_dense` is jittable JAX, and run eagerly its half-dozen
    ops per kernel cost more than the rest of `load`.
    """
    if not isinstance(leaf, BlockSparseMatrix):
        leaf = np.asarray(leaf)
        return leaf.astype(dtype), np.ones(leaf.shape, bool)
    (n_in, n_out), (bh, bw), (nbr, nbc) = leaf.shape, leaf.block_shape, leaf.grid_shape
    cols = np.repeat(np.arange(nbc), np.diff(np.asarray(leaf.col_ptr)))
    rows = np.asarray(leaf.row_indices)
    blocks = np.zeros((nbr, nbc, bh, bw), dtype)
    blocks[rows, cols] = np.asarray(leaf.values).astype(dtype)
    keep = np.zeros((nbr, nbc), bool)
    keep[rows, cols] = True
    kernel = blocks.transpose(0, 2, 1, 3).reshape(nbr * bh, nbc * bw)[:n_in, :n_out]
    mask = np.kron(keep, np.ones((bh, bw), bool))[:n_in, :n_out]
    return kernel, mask


def _cast(tree: Any, dtype: Any) -> Any:
    """Floating leaves (block values included) in `dtype`, as device arrays."""

    def cast(a: Any) -> Any:
        a = np.asarray(a)
        return jnp.asarray(a.astype(dtype) if np.issubdtype(a.dtype, np.floating)
                           or a.dtype == ml_dtypes.bfloat16 else a)

    return jax.tree_util.tree_map(cast, tree)


def _linear(params: dict, impl: str, dtype: Any) -> Linear:
    kernel = params["kernel"]
    if impl == "dense" and isinstance(kernel, BlockSparseMatrix):
        kernel = _kernel_and_mask(kernel, np.asarray(kernel.values).dtype)[0]
    elif isinstance(kernel, BlockSparseMatrix):
        kernel = bsc.with_xla_layout(kernel)
    bias = params.get("bias")
    return Linear(_cast(kernel, dtype), None if bias is None else _cast(bias, dtype),
                  _kernel_impl(impl))


def _kernel_impl(impl: str) -> str:
    return "auto" if impl == "dense" else impl


def _recurrent(params: dict, cell: str, impl: str, dtype: Any, reverse: bool = False
               ) -> Recurrent:
    gates = cells.GATES[cell]
    names = [f"{kind}_{g}" for kind in ("input", "recurrent") for g in gates]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"a {cell} layer needs {names}; the file lacks {missing}")
    input_norm = "projection_norm" in params  # RecurrentLayer(input_norm=True)
    unknown = sorted(set(params) - set(names) - {"projection_norm"})
    if unknown:  # running without a part would be wrong
        raise ValueError(f"a {cell} layer of this file has parts bsrnn.inference cannot run "
                         f"yet: {unknown}; evaluate that model from its workdir with "
                         "bsrnn.train instead")
    dense = {n: dict(zip(("kernel", "mask"), _kernel_and_mask(params[n]["kernel"], dtype),
                         strict=True)) for n in names}
    layer_params = {n: {"kernel": dense[n]["kernel"], "bias": np.asarray(params[n]["bias"])}
                    for n in names}
    layer_masks = {n: {"kernel": dense[n]["mask"]} for n in names}
    features = layer_params[names[0]]["kernel"].shape[1]
    recurrent_kernels = [params[f"recurrent_{g}"]["kernel"] for g in gates]
    block_shapes = {k.block_shape for k in recurrent_kernels
                    if isinstance(k, BlockSparseMatrix)}
    sparse_ok = (impl != "dense" and cell in _KERNEL_CELLS and len(block_shapes) == 1
                 and all(isinstance(k, BlockSparseMatrix) for k in recurrent_kernels))
    norm_params = ({k: np.asarray(v) for k, v in params["projection_norm"].items()}
                   if input_norm else None)
    if not sparse_ok:
        if input_norm:
            layer_params["projection_norm"] = norm_params
        return Recurrent(None, _cast(layer_params, dtype), jax.tree_util.tree_map(
            jnp.asarray, layer_masks), cell, features, reverse, input_norm=input_norm)
    build = _KERNEL_CELLS[cell][0]
    weights = build(layer_params, layer_masks, block_shapes.pop(), dtype=dtype)
    if cell == "gru":
        weights = dataclasses.replace(weights, ell_feat=None, ell_values=None)
    norm = None
    if input_norm:  # what the kernels add to x @ W_i on top of the input biases
        folded = np.asarray(weights.b_i if cell == "gru" else weights.b, np.float64)
        input_bias = np.concatenate([np.asarray(params[f"input_{g}"]["bias"], np.float64)
                                     for g in gates])
        norm = _cast({**norm_params, "shift": (folded - input_bias).astype(np.float32)}, dtype)
    return Recurrent(jax.tree_util.tree_map(jnp.asarray, weights), None, None, cell, features,
                     reverse, _kernel_impl(impl), input_norm=input_norm, norm=norm)


def _compute_dtype(dtype: Any, stored: np.dtype) -> np.dtype:
    if dtype is not None:
        return np.dtype(export.dtype_named(dtype))
    return np.dtype(np.float32) if jax.default_backend() == "cpu" else stored


def _stored_dtype(params: dict) -> np.dtype:
    for leaf in jax.tree_util.tree_leaves(params):
        if np.issubdtype(np.asarray(leaf).dtype, np.floating) or leaf.dtype == ml_dtypes.bfloat16:
            return np.asarray(leaf).dtype
    return np.dtype(np.float32)


# ----------------------------------------------------------------------------------------
# The two models.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LMWeights:
    """A language model's layers: embedding (V, E), recurrent layers, softmax (or tied).

    Attributes:
      embedding: (V, E).
      layers: the recurrent layers, first to last.
      output: the softmax layer, or None (tied to the embedding).
      input_table: (V, gates·H) or None: the first layer's input projection of every token,
        embedding @ W_i + b (`fold_input_projection`); `lm_forward` looks a token's row up
        instead of embedding it and multiplying by W_i.
    """

    embedding: jax.Array
    layers: tuple[Recurrent, ...]
    output: Linear | None
    input_table: jax.Array | None = None


# `fold_input_projection` folds when the table takes at most this many times the entries of
# the embedding and the first layer's input kernel it replaces (a char LM: ~1.2x; a word LM
# with a large vocabulary would multiply its memory).
FOLD_MAX_RATIO = 2.0


def fold_input_projection(weights: LMWeights, max_ratio: float = FOLD_MAX_RATIO) -> LMWeights:
    """``weights`` with `LMWeights.input_table` set: the first layer's input projection
    computed once for every token. The first layer reads the embedding directly (the LM has
    nothing between them at inference), so E[t] @ W_i + b is row t of E @ W_i + b: the
    lookup removes an (E x gates·H) product per token from every forward pass.

    Folds only a first layer on the kernels (`Recurrent.sparse`) and only when the table has
    at most ``max_ratio`` times the entries of the embedding and W_i; returns ``weights``
    unchanged otherwise. Run on concrete weights (e.g. at `load`).
    """
    first = weights.layers[0] if weights.layers else None
    if first is None or first.sparse is None or weights.input_table is not None:
        return weights
    vocab, embed = weights.embedding.shape
    width = int(np.shape(first.sparse.w_i)[1])
    if vocab * width > max_ratio * (vocab * embed + embed * width):
        return weights
    table = projections(first, weights.embedding[None])[0]  # (V, G·H)
    return dataclasses.replace(weights, input_table=table)


def _table_rows(table: jax.Array, tokens: jax.Array, hidden: int) -> jax.Array:
    """Rows ``tokens`` (B, T) of the (V, gates·H) table, (B, T, gates·H), looked up one gate
    (H entries) at a time: on XLA:CPU the gate math fused with slices of one looked-up row
    runs unvectorised (4-6 µs a step at H = 256, more than the product the table removes);
    with a lookup per gate, ~1 µs."""
    vocab, width = table.shape
    gates = width // hidden
    per_gate = table.reshape(vocab * gates, hidden)
    return jnp.concatenate([jnp.take(per_gate, tokens * gates + g, axis=0)
                            for g in range(gates)], axis=-1)


def lm_forward(weights: LMWeights, tokens: jax.Array, carry: Any = None
               ) -> tuple[jax.Array, tuple]:
    """tokens (B, T) int -> logits (B, T, V) float32 and the new carry (one per layer),
    like `bsrnn.models.lm.Model` (without dropout)."""
    carry = (None,) * len(weights.layers) if carry is None else carry
    new_carry = []
    for i, (layer, c) in enumerate(zip(weights.layers, carry, strict=True)):
        if i == 0 and weights.input_table is not None:
            xp = _table_rows(weights.input_table, tokens, layer.sparse.hidden)
            x, c = kernels.projected_sequence(xp, layer.sparse, c, impl=layer.impl)
        else:
            x = jnp.take(weights.embedding, tokens, axis=0) if i == 0 else x
            x, c = recurrent(layer, x, c)
        new_carry.append(c)
    logits = (jnp.dot(x, weights.embedding.T) if weights.output is None
              else linear(weights.output, x))
    return logits.astype(jnp.float32), tuple(new_carry)


def sample_tokens(
    forward: Callable, weights: Any, prompt: jax.Array, carry: Any, noise: jax.Array,
    temperature: float,
) -> jax.Array:
    """Sampling, the state carried from step to step, all in one `lax.scan`.

    Args:
      forward: `(weights, tokens (B, T), carry) -> (logits (B, T, V), carry)`.
      weights: its first argument.
      prompt: (B, P) token ids, P >= 1, read first; the samples continue them.
      carry: the carry before the prompt (None: zeros).
      noise: (N, B, V) standard Gumbel noise, one row per sampled token.
      temperature: > 0 samples softmax(logits / temperature) (Gumbel-max: the argmax of
        logits / temperature + noise); 0 takes the most likely token.

    Returns:
      (B, N) sampled token ids.
    """
    logits, carry = forward(weights, prompt, carry)

    def step(state, g):
        logits, carry = state
        scores = logits if temperature == 0 else logits / temperature + g
        token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        logits, carry = forward(weights, token[:, None], carry)
        return (logits[:, -1], carry), token

    _, tokens = jax.lax.scan(step, (logits[:, -1], carry), noise)
    return tokens.T


class _Exported:
    """What both exported models share: their weights, with `auto` resolved per shape."""

    weights: Any

    def weights_for(self, batch: int, steps: int, rows: int | None = None) -> Any:
        """`weights` with every "auto" layer's choice measured for ``batch`` rows and
        ``steps`` recurrent steps (`measured`; linear layers: ``rows``, default
        ``batch * steps``), cached per shape."""
        cache, key = self.__dict__.setdefault("_measured", {}), (batch, steps, rows)
        if key not in cache:
            cache[key] = measured(self.weights, batch, steps, rows)
        return cache[key]

    def sampling_weights(self, batch: int, length: int) -> Any:
        """`weights_for` a sampling loop: one token of ``batch`` rows per call, ``length``
        calls. The recurrent layers are measured on a sequence of up to 256 steps (a
        one-step call measures launch overhead, not the step inside the loop)."""
        return self.weights_for(batch, min(length, 256), rows=batch)


class LanguageModel(_Exported):
    """An exported language model (`load`); the vocabulary comes with it.

    Attributes:
      weights: the `LMWeights` (pass them to `lm_forward` yourself to jit your own loop).
      sampler: `sample_tokens` of this model, jitted (`sample_ids` calls it).
      vocab: the `bsrnn.data.Vocabulary`.
      unit: "char" or "word".
      info: the file's model description (`bsrnn.export.model_info`).
    """

    def __init__(self, weights: LMWeights, info: dict):
        self.weights = weights
        self.info = info
        self.vocab = data.Vocabulary(tuple(info["vocab"]["tokens"]), info["vocab"]["unk"])
        self.unit = info.get("unit", "char")
        self.cell = info["kwargs"].get("cell", "gru")
        self.features = int(info["kwargs"].get("features", 256))
        self._forward = jax.jit(lm_forward)
        # (weights, prompt, carry, noise, *, temperature) -> ids: `sample_tokens`, jitted.
        self.sampler = jax.jit(functools.partial(sample_tokens, lm_forward),
                               static_argnames="temperature")

    def __call__(self, tokens: Any, carry: Any = None) -> tuple[jax.Array, tuple]:
        """tokens (B, T) int -> logits (B, T, V) float32 and the carry after them."""
        tokens = jnp.asarray(tokens, jnp.int32)
        return self._forward(self.weights_for(*tokens.shape), tokens, carry)

    def initial_carry(self, batch_size: int) -> tuple:
        """Zero carries of every layer for `batch_size` rows."""
        dtype = self.weights.embedding.dtype
        return tuple(_zero_initial(self.cell, batch_size, self.features, dtype)
                     for _ in self.weights.layers)

    def apply(self, variables: dict, tokens: jax.Array, carry: Any = None) -> Any:
        """The Flax model's interface (`variables["params"]` are `LMWeights`), so that
        `bsrnn.train.evaluate` scores the exported model exactly as it scores a run's."""
        return lm_forward(variables["params"], tokens, carry)

    def encode(self, text: str) -> np.ndarray:
        """Text -> (N,) ids: characters, or whitespace-separated words (newline: <eos>)."""
        if self.unit == "word":
            tokens = text.replace("\n", f" {data.text.EOS} ").split()
        else:
            tokens = [data.text.EOS if c == "\n" and "\n" not in self.vocab.tokens else c
                      for c in text]
        try:
            return self.vocab.encode(tokens)
        except ValueError as e:
            raise ValueError(f"the prompt has a token this model never saw: {e}") from None

    def decode(self, ids: Any) -> str:
        """(N,) ids -> text (<eos> becomes a newline)."""
        tokens = ["\n" if t == data.text.EOS else t for t in self.vocab.decode(ids)]
        if self.unit == "word":
            return " ".join(tokens).replace(" \n ", "\n").replace(" \n", "\n")
        return "".join(tokens)

    def default_prompt(self) -> str:
        """What sampling starts from when no prompt is given: a line break."""
        return "\n"

    def sample_ids(self, length: int, *, temperature: float = 1.0, prompt: str = "",
                   seed: int = 0, batch_size: int = 1) -> np.ndarray:
        """(batch_size, length) sampled ids after `prompt` (default: a line break)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        ids = self.encode(prompt or self.default_prompt())
        if ids.size == 0:
            raise ValueError("the prompt encodes to no token; give at least one")
        prompt_ids = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (batch_size, ids.size))
        noise = jax.random.gumbel(jax.random.key(seed), (length, batch_size, len(self.vocab)))
        weights = self.sampling_weights(batch_size, length)
        return np.asarray(self.sampler(weights, prompt_ids, None, noise,
                                       temperature=float(temperature)))

    def sample(self, length: int, *, temperature: float = 1.0, prompt: str = "",
               seed: int = 0) -> str:
        """`length` tokens sampled after `prompt`, as text (the prompt not included)."""
        return self.decode(self.sample_ids(length, temperature=temperature, prompt=prompt,
                                           seed=seed)[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DS2Weights:
    """A DS2 model's layers (see `bsrnn.models.ds2`)."""

    conv: tuple[dict, ...]
    # per depth: (fwd,), (fwd, bwd) run one after the other, or a Bidirectional; or a
    # Wavefront of consecutive forward depths
    layers: tuple[tuple[Recurrent, ...] | Bidirectional | Wavefront, ...]
    row_conv: Any
    fc: Linear
    output: Linear
    conv_kernels: tuple[tuple[int, int], ...] = _static()
    conv_strides: tuple[tuple[int, int], ...] = _static()


def ds2_forward(weights: DS2Weights, features: jax.Array, lengths: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """features (B, T, F), lengths (B,) -> logits (B, T', C) float32 (zero past each output
    length) and the output lengths, like `bsrnn.models.ds2.Model`."""
    x = features[..., None].astype(weights.fc.bias.dtype)
    for params, (kt, kf), stride in zip(weights.conv, weights.conv_kernels,
                                        weights.conv_strides, strict=True):
        conv = nn.Conv(params["kernel"].shape[-1], (kt, kf), stride,
                       padding=(((kt - 1) // 2, kt // 2), ((kf - 1) // 2, kf // 2)))
        x = conv.apply({"params": params}, x)
        lengths = ds2.output_lengths(lengths, [stride[0]])
        x = ds2._zero_padding(ds2.clipped_relu(x), lengths)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    for depth in weights.layers:
        if isinstance(depth, Wavefront):
            x = wavefront(depth, x, None, lengths)[0]
            continue
        outputs = (bidirectional(depth, x, None, lengths)[0] if isinstance(depth, Bidirectional)
                   else [recurrent(layer, x, None, lengths)[0] for layer in depth])
        x = jnp.concatenate(outputs, -1)
    if weights.row_conv is not None:
        context = weights.row_conv["kernel"].shape[0] - 1
        x = ds2._zero_padding(ds2.RowConv(context).apply({"params": weights.row_conv}, x),
                              lengths)
    x = ds2.clipped_relu(linear(weights.fc, x))
    return ds2._zero_padding(linear(weights.output, x).astype(jnp.float32), lengths), lengths


class SpeechModel(_Exported):
    """An exported DS2 acoustic model (`load`), its CTC alphabet and feature normalisation.

    Attributes:
      weights: the `DS2Weights`.
      vocab: the CTC `bsrnn.data.Vocabulary` (blank at 0).
      info: the file's model description (`bsrnn.export.model_info`).
    """

    pad_multiple = 64  # frames are padded to a multiple of this (fewer shapes to compile)

    def __init__(self, weights: DS2Weights, info: dict):
        self.weights = weights
        self.info = info
        self.vocab = data.Vocabulary(tuple(info["vocab"]["tokens"]), info["vocab"]["unk"])
        features = info.get("features") or {}
        self.feature_kind = features.get("kind", "mfc")
        self.num_mels = int(features.get("num_mels", data.speech.MFC_DIM))
        self.stats = data.FeatureStats(np.asarray(features.get("mean", 0.0), np.float32),
                                       np.asarray(features.get("std", 1.0), np.float32))
        self._decode = jax.jit(self._logits_and_labels)

    def __call__(self, features: Any, lengths: Any) -> tuple[jax.Array, jax.Array]:
        """Normalised features (B, T, F), lengths (B,) -> logits (B, T', C), lengths (B,)."""
        features = jnp.asarray(features)
        return jax.jit(ds2_forward)(self.weights_for_frames(*features.shape[:2]), features,
                                    jnp.asarray(lengths))

    def weights_for_frames(self, batch: int, frames: int) -> Any:
        """`weights_for` the recurrent layers' steps of a (batch, frames, F) input."""
        steps = jnp.asarray([frames])
        for stride in self.weights.conv_strides:
            steps = ds2.output_lengths(steps, [stride[0]])
        return self.weights_for(batch, int(steps[0]))

    def apply(self, variables: dict, features: jax.Array, lengths: jax.Array) -> Any:
        """The Flax model's interface (`variables["params"]` are `DS2Weights`), for
        `bsrnn.train.evaluate`."""
        return ds2_forward(variables["params"], features, lengths)

    def _logits_and_labels(self, weights, features, lengths):
        logits, out_lengths = ds2_forward(weights, features, lengths)
        return ctc.greedy_decode(logits, out_lengths)

    def read_features(self, path: str | os.PathLike) -> np.ndarray:
        """A `.mfc` or `.wav` file as this model's normalised (T, F) features."""
        suffix = Path(path).suffix.lower()
        if suffix == ".mfc":
            if self.feature_kind != "mfc":
                raise ValueError(f"{path}: this model reads log-mel features of .wav files, "
                                 "not Sphinx cepstra; pass .wav files")
            features = data.read_mfc(path)
        elif suffix == ".wav":
            if self.feature_kind != "log_mel":
                raise ValueError(
                    f"{path}: this model was trained on AN4's Sphinx cepstra (.mfc), which "
                    "bsrnn cannot compute from audio; pass the .mfc files of the recordings")
            samples, rate = data.read_wav(path)
            features = data.log_mel_spectrogram(samples, rate, num_mels=self.num_mels)
        else:
            raise ValueError(f"{path}: expected a .mfc or .wav file")
        return data.normalize(features, self.stats)

    def transcribe_features(self, features: Sequence[np.ndarray]) -> list[str]:
        """Greedy CTC transcripts of normalised (T_i, F) feature arrays, one batch."""
        padded, lengths = data.pad_sequences(list(features), multiple=self.pad_multiple)
        labels, counts = self._decode(self.weights_for_frames(*padded.shape[:2]),
                                      jnp.asarray(padded), jnp.asarray(lengths))
        return ["".join(self.vocab.decode(seq))
                for seq in ctc.decoded_sequences(labels, counts)]

    def transcribe(self, paths: Sequence[str | os.PathLike]) -> list[str]:
        """The greedy CTC transcript of each `.mfc` / `.wav` file."""
        return self.transcribe_features([self.read_features(p) for p in paths])


# ----------------------------------------------------------------------------------------


def _check_info(path: Any, info: dict | None) -> dict:
    if info is None:
        raise ValueError(
            f"{path} holds weights only (no model description): it was written by "
            "bsrnn.export.save_npz without model=, or by an older bsrnn. Export the run "
            "with `python -m bsrnn.export --workdir=<its workdir>`.")
    name, cell = info.get("name"), info.get("kwargs", {}).get("cell")
    if name not in MODEL_NAMES:
        raise ValueError(f"{path} holds a model of kind {name!r}, which this build of bsrnn "
                         f"does not know (it knows {MODEL_NAMES}); upgrade bsrnn.")
    if cell not in cells.GATES:
        raise ValueError(f"{path} holds a {name} model with cell {cell!r}, which this build of "
                         f"bsrnn does not know (it knows {tuple(cells.GATES)}); upgrade bsrnn.")
    return info


def masked_dense(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The Flax model an export describes, and its variables: the masked dense model.

    Returns:
      (`bsrnn.models.<name>.Model(**kwargs)`, {"params": ..., "masks": ...}), every kernel
      dense in float32 and every mask the model has (block-sparse kernels' masks rebuilt from
      their stored blocks, the others all True). `model.apply(variables, ...)` gives the
      logits `load(path)` gives, up to rounding.
    """
    from bsrnn import models

    params, info, _ = export.load_file(path)
    info = _check_info(path, info)
    model = models.model_module(info["name"]).Model(**info["kwargs"])
    if info["name"] == "lm":
        example = (jnp.zeros((1, 1), jnp.int32),)
    else:
        width = int((info.get("features") or {}).get("num_mels", data.speech.MFC_DIM))
        example = (jnp.zeros((1, 16, width)), jnp.ones((1,), jnp.int32))
    abstract = jax.eval_shape(model.init, jax.random.key(0), *example)
    flat = export._flatten(params)
    dense, masks = {}, {}
    for key, leaf in flat.items():
        dense[key] = _kernel_and_mask(leaf, np.float32)[0] if isinstance(
            leaf, BlockSparseMatrix) else np.asarray(leaf, np.float32)
    for key in export._flatten(abstract["masks"]):
        masks[key] = _kernel_and_mask(flat[key], np.float32)[1]
    return model, {"params": export._unflatten(dense), "masks": export._unflatten(masks)}


def load(path: str | os.PathLike, *, impl: str = "auto", dtype: Any = None,
         fuse_directions: bool = True, wavefront: bool = True) -> LanguageModel | SpeechModel:
    """Loads an exported model (`bsrnn.export`, e.g. a run's `<workdir>/model.npz`).

    Args:
      path: the `.npz` file.
      impl: "auto" (block-sparse kernels where the file stores block-sparse kernels, with
        the kernels' default implementation for this backend), "dense" (every layer masked
        dense: the baseline), or an implementation of `bsrnn.kernels` ("xla", "pallas",
        "pallas_interpret") forced for every sparse kernel.
      dtype: computation dtype ("float32", "float16", "bfloat16"); default float32 on CPUs
        (half precision is emulated there) and the file's dtype elsewhere.
      fuse_directions: run each bidirectional DS2 depth whose directions are on the kernels
        as one recurrence (`Bidirectional`); False: the directions one after the other.
      wavefront: run consecutive forward-only DS2 depths on the kernels as one
        wavefront-ordered recurrence (`Wavefront`; "auto" times it against the layers run
        one after the other); False: one after the other.

    A language model's first layer on the kernels gets its input projection of every token
    precomputed (`fold_input_projection`), where that table is small.

    Returns:
      A `LanguageModel` or a `SpeechModel`.

    Raises:
      ValueError: naming the file, if it is not a readable bsrnn export (see
        `bsrnn.export.load_file`) or holds a model kind or cell this build does not know.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    params, info, _ = export.load_file(path)
    info = _check_info(path, info)
    kwargs = info["kwargs"]
    dtype = _compute_dtype(dtype, _stored_dtype(params))
    cell = kwargs.get("cell", "gru")
    try:
        if info["name"] == "lm":
            layers = tuple(_recurrent(params[f"layer_{i}"], cell, impl, dtype)
                           for i in range(int(kwargs.get("num_layers", 1))))
            output = None if kwargs.get("tie_embeddings") else _linear(
                params["output"], impl, dtype)
            weights = LMWeights(_cast(params["embed"]["embedding"], dtype), layers, output)
            return LanguageModel(fold_input_projection(weights), info)
        rnn = params["rnn"]
        suffixes = ("_fwd", "_bwd") if kwargs.get("bidirectional", True) else ("",)
        layers = _wavefronts(tuple(_paired(
            tuple(_recurrent(rnn[f"layer_{i}{s}"], cell, impl, dtype, reverse=s == "_bwd")
                  for s in suffixes), fuse_directions)
            for i in range(int(kwargs.get("num_layers", 3)))), wavefront)
        num_conv = len(kwargs.get("conv_features", (32, 32)))
        weights = DS2Weights(
            conv=tuple(_cast(params[f"conv_{i}"], dtype) for i in range(num_conv)),
            layers=layers,
            row_conv=_cast(params["row_conv"], dtype) if "row_conv" in params else None,
            fc=_linear(params["fc"], impl, dtype),
            output=_linear(params["output"], impl, dtype),
            conv_kernels=tuple(tuple(int(k) for k in ks) for ks in kwargs["conv_kernels"]),
            conv_strides=tuple(tuple(int(s) for s in ss) for ss in kwargs["conv_strides"]),
        )
        return SpeechModel(weights, info)
    except KeyError as e:
        raise ValueError(f"{path}: the {info['name']} model it describes needs the array "
                         f"{e}, which the file lacks; export the run again") from None
