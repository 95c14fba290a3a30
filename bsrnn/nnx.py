"""Flax NNX versions of the masked cells: :class:`MaskedDense`, :class:`RecurrentLayer`,
:class:`RNN`.

The same layers as :mod:`bsrnn.cells`, running the same code (the mask product, the gate
equations and the scan are the functions of :mod:`bsrnn.cells`), with the same param names
and shapes. A kernel's mask is a :class:`Mask` variable beside it, at ``<module>/mask``
(the Linen ``masks`` collection keeps it at ``<module>/kernel``: an NNX module cannot hold
two attributes of one name)::

    from flax import nnx
    from bsrnn import nnx as bnnx

    model = bnnx.RNN("gru", in_features=32, features=256, num_layers=2, rngs=nnx.Rngs(0))
    y = model(x, lengths)                           # (B, T, 256), kernels times masks
    nnx.state(model, nnx.Param)                     # the params tree of cells.RNN("gru", 256)
    nnx.state(model, bnnx.Mask)                     # the masks, at <module>/mask

:func:`linen_variables` and :func:`load_linen_variables` move ``{'params', 'masks'}`` between
the two worlds (checkpoints, the pruning transforms' masks). ``nnx.grad`` differentiates the
``nnx.Param`` variables only, so the boolean masks never get a gradient.

Not here: the Linen layers' ``frozen_recurrent`` (block-sparse recurrent kernels of a frozen
layer, :mod:`bsrnn.kernels.sparse_training`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from bsrnn import cells

COLLECTIONS = ("params", "masks")
LECUN_NORMAL = nnx.initializers.lecun_normal()  # MaskedDense's default kernel init, as Linen's


class Mask(nnx.Variable):
    """A kernel's boolean mask (the kernel's shape): the forward pass sees ``kernel ⊙ mask``.

    Its own variable type, so that ``nnx.state(model, Mask)`` selects the masks,
    ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)`` leave them alone, and the pruning
    transforms' new masks go back with :func:`load_linen_variables`.
    """


class MaskedDense(nnx.Module):
    """``y = x @ (kernel ⊙ mask) + bias``, as :class:`bsrnn.cells.MaskedDense`.

    Variables: ``kernel`` (D, F) and ``bias`` (F,) (``nnx.Param``), ``mask`` (D, F) bool
    (:class:`Mask`).

    Args:
      in_features (D), features (F), use_bias, mask_init, kernel_init, dtype, param_dtype:
        as the attributes of :class:`bsrnn.cells.MaskedDense`.
      rngs: the ``params`` stream initialises the kernel.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        use_bias: bool = True,
        mask_init: cells.MaskInit | None = None,
        kernel_init: nnx.Initializer = LECUN_NORMAL,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        shape = (in_features, features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype)) if use_bias else None
        self.mask = Mask(cells.initial_mask(mask_init, shape, "MaskedDense.kernel"))
        self.dtype = dtype

    def weights(self) -> tuple[jax.Array, jax.Array | None]:
        """The masked kernel (D, F) and the bias (F,) or ``None``, in ``dtype``."""
        if self.mask.shape != self.kernel.shape:
            raise ValueError(
                f"MaskedDense: the mask has shape {self.mask.shape} but the kernel "
                f"{self.kernel.shape}; load masks made for a model of these sizes."
            )
        bias = None if self.bias is None else self.bias[...]
        return cells.masked_weights(self.kernel[...], self.mask[...], bias, self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., D) -> (..., F)."""
        return cells.affine(x, *self.weights())


class RecurrentLayer(nnx.Module):
    """One recurrent layer over a padded batch, as :class:`bsrnn.cells.RecurrentLayer`.

    Sub-modules ``input_<gate>`` (D, H) and ``recurrent_<gate>`` (H, H), one
    :class:`MaskedDense` per gate of ``bsrnn.cells.GATES[cell]``, as in the Linen layer.

    Args:
      cell: ``rnn``, ``rnn_clipped_relu``, ``gru`` or ``lstm``.
      in_features: input width D (NNX builds its variables before it sees an input).
      features: hidden size H.
      reverse: run each sequence from its last valid step back to its first.
      recurrent_mask_init, input_mask_init, recurrent_modules, unroll, dtype, weight_grad:
        as in :class:`bsrnn.cells.RecurrentLayer`.
      rngs: the ``params`` stream initialises the kernels.
    """

    def __init__(
        self,
        cell: str,
        in_features: int,
        features: int,
        *,
        reverse: bool = False,
        recurrent_mask_init: cells.MaskInit | None = None,
        input_mask_init: cells.MaskInit | None = None,
        recurrent_modules: int = 1,
        unroll: int = 1,
        dtype: Any = None,
        weight_grad: str = "hoisted",
        rngs: nnx.Rngs,
    ) -> None:
        cells.check_layer_config(cell, features, recurrent_modules)
        cells.check_weight_grad(weight_grad)
        recurrent_init = cells.recurrent_modules_mask_init(
            recurrent_mask_init, recurrent_modules, "RecurrentLayer: recurrent_mask_init's mask"
        )
        for gate in cells.GATES[cell]:
            setattr(
                self,
                f"input_{gate}",
                MaskedDense(
                    in_features, features, mask_init=input_mask_init, dtype=dtype, rngs=rngs
                ),
            )
            setattr(
                self,
                f"recurrent_{gate}",
                MaskedDense(
                    features,
                    features,
                    mask_init=recurrent_init,
                    kernel_init=nnx.initializers.orthogonal(),
                    dtype=dtype,
                    rngs=rngs,
                ),
            )
        self.cell, self.in_features, self.features = cell, in_features, features
        self.reverse, self.recurrent_modules, self.unroll = reverse, recurrent_modules, unroll
        self.weight_grad = weight_grad

    def __call__(
        self,
        x: jax.Array,
        lengths: jax.Array | None = None,
        initial_carry: cells.Carry | None = None,
    ) -> tuple[jax.Array, cells.Carry]:
        """x (B, T, D), lengths (B,) or ``None``, initial_carry h0 (B, H) ((h0, c0) for the
        LSTM) or ``None`` -> outputs (B, T, H) and the final carry, exactly as
        :meth:`bsrnn.cells.RecurrentLayer.__call__` (padding steps keep the state and output
        zeros)."""
        if jnp.ndim(x) != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"RecurrentLayer: x has shape {jnp.shape(x)}, expected (B, T, "
                f"{self.in_features}); build the layer with in_features={jnp.shape(x)[-1]} "
                "or pass (batch, time, features) inputs."
            )
        gates = cells.GATES[self.cell]
        inputs = [getattr(self, f"input_{gate}").weights() for gate in gates]
        recurrent = {f"recurrent_{gate}": getattr(self, f"recurrent_{gate}") for gate in gates}
        weights = cells.fused_weights(
            inputs,
            [layer.weights() for layer in recurrent.values()],
            {name: layer.mask[...] for name, layer in recurrent.items()},
            self.recurrent_modules,
        )
        return cells.run_layer(self, x, lengths, initial_carry, weights)


class RNN(nnx.Module):
    """A stack of :class:`RecurrentLayer`, optionally bidirectional, as
    :class:`bsrnn.cells.RNN`: layer i is ``layer_i`` (``layer_i_fwd`` and ``layer_i_bwd``
    when bidirectional, whose outputs are concatenated, so the next layer sees 2H features).

    Args:
      cell, in_features, features, recurrent_mask_init, input_mask_init, recurrent_modules,
        unroll, dtype, weight_grad: as in :class:`RecurrentLayer` (``in_features`` is the
        first layer's).
      num_layers: depth.
      bidirectional: run a forward and a backward layer at each depth.
      rngs: the ``params`` stream initialises the kernels.
    """

    def __init__(
        self,
        cell: str,
        in_features: int,
        features: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        recurrent_mask_init: cells.MaskInit | None = None,
        input_mask_init: cells.MaskInit | None = None,
        recurrent_modules: int = 1,
        unroll: int = 1,
        dtype: Any = None,
        weight_grad: str = "hoisted",
        rngs: nnx.Rngs,
    ) -> None:
        common = dict(
            recurrent_mask_init=recurrent_mask_init,
            input_mask_init=input_mask_init,
            recurrent_modules=recurrent_modules,
            unroll=unroll,
            dtype=dtype,
            weight_grad=weight_grad,
            rngs=rngs,
        )
        width = in_features
        for depth in cells.stack_layers(num_layers, bidirectional):
            for name, reverse in depth:
                layer = RecurrentLayer(cell, width, features, reverse=reverse, **common)
                setattr(self, name, layer)
            width = features * len(depth)
        self.num_layers, self.bidirectional = num_layers, bidirectional

    def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """x (B, T, D), lengths (B,) -> outputs (B, T, H), or (B, T, 2H) if bidirectional."""
        return cells.run_stack(
            lambda name, reverse: getattr(self, name),
            self.num_layers,
            self.bidirectional,
            x,
            lengths,
        )


def _flat(tree: Any, collection: str) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    if not isinstance(tree, Mapping):
        raise ValueError(
            f"variables[{collection!r}] must be a nested mapping of arrays (as Linen's "
            f"model.init gives it), got {type(tree).__name__}."
        )
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _mask_paths(model: nnx.Module) -> dict[tuple[str, ...], tuple[str, ...]]:
    """The Linen ``masks`` path (``.../kernel``) of each :class:`Mask` (``.../mask``)."""
    return {
        path[:-1] + ("kernel",): path
        for path in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, Mask)))
    }


def linen_variables(model: nnx.Module) -> dict[str, Any]:
    """The model's variables as the Linen layer of the same sizes holds them.

    Args:
      model: a module built from this module's layers (or any NNX module holding them).

    Returns:
      ``{'params': ..., 'masks': ...}``, nested dicts of arrays: the params at their NNX
      paths (the Linen names), every mask at its kernel's path.
    """
    state = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, Mask)))
    masks = {linen: state[path] for linen, path in _mask_paths(model).items()}
    return {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "masks": traverse_util.unflatten_dict(masks) if masks else {},
    }


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> None:
    """Write Linen variables into ``model`` in place (``nnx.update``); jittable.

    Args:
      model: the NNX model.
      variables: ``{'params': ..., 'masks': ...}``, either collection or both, e.g. Linen's
        ``model.init(...)`` of the same sizes, or just ``{'masks': masks}`` with the masks
        a pruning transformation produced. Each collection must hold every param (mask) of
        ``model`` with its shape, and nothing else; masks are cast to bool.

    Raises:
      ValueError: naming the collection and the paths or shapes that do not match.
    """
    unknown = set(variables) - set(COLLECTIONS)
    if unknown:
        raise ValueError(
            f"load_linen_variables: unknown collections {sorted(unknown)}; give 'params' "
            "and/or 'masks'."
        )
    current = linen_variables(model)
    mask_paths = _mask_paths(model)
    for collection in COLLECTIONS:
        if collection not in variables:
            continue
        new, old = _flat(variables[collection], collection), _flat(current[collection], "")
        missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        if missing or extra:
            raise ValueError(
                f"load_linen_variables: {collection} does not match the model: missing "
                f"{['/'.join(p) for p in missing]}, not in the model "
                f"{['/'.join(map(str, p)) for p in extra]}; pass the variables of the Linen "
                "layer with the same cell, sizes and layers (for the masks of a pruning "
                "transformation, build it with masks=linen_variables(model)['masks'], so that "
                "pruning.masks_from gives every mask)."
            )
        for path, value in new.items():
            if jnp.shape(value) != jnp.shape(old[path]):
                raise ValueError(
                    f"load_linen_variables: {collection} {'/'.join(path)} has shape "
                    f"{jnp.shape(value)}, the model's is {jnp.shape(old[path])}."
                )
        if collection == "params":
            state = nnx.state(model, nnx.Param)
            pure = traverse_util.unflatten_dict(
                {p: jnp.asarray(v, old[p].dtype) for p, v in new.items()}
            )
        else:
            state = nnx.state(model, Mask)
            pure = traverse_util.unflatten_dict(
                {mask_paths[p]: jnp.asarray(v, bool) for p, v in new.items()}
            )
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)
