"""Building blocks of the configs (``experiments/configs``, and the default config shipped
here, :mod:`bsrnn.configs.shakespeare_gru`).

Every config has the same sections, so any pruning method can be picked in any config
with ``--config.method=...`` and every hyper-parameter below can be overridden:

* ``method``: ``dense``, ``structural`` (P3), ``wp`` (P2), ``bp`` (P1), ``gl``, ``glp`` (P1);
  :mod:`bsrnn.methods` turns it into an optax chain.
* ``prune``: the schedule and the blocks, with one value per layer type (``input``,
  ``recurrent``, ``fc``) for ``sparsity``, ``q``, ``block_shape`` and ``reduction``.
* ``group_lasso``: λ_g per layer type for GL and for GLP, and the proximal variant (GL's
  one cut prunes to ``prune.sparsity``; see :mod:`bsrnn.methods`).
* ``structure``: P3's number of block-diagonal recurrent modules (method ``structural``).
* ``optimizer``: optax optimizer, learning-rate schedule, gradient clipping.
* ``mesh``: devices of the data-parallel axis (:mod:`bsrnn.sharding`); ``data=-1`` is all.

Steps of the pruning schedule are fractions of ``num_steps``, so overriding
``--config.num_steps`` keeps them in proportion (P2: start of the second epoch, 25% and 50%
of training; P1 stops at about 40%).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_collections

LAYER_TYPES = ("input", "recurrent", "fc")

UNSET_DATA_ROOT = "$BSRNN_DATA"


def data_root() -> str:
    """The folder of the data sets: ``$BSRNN_DATA`` (``launch.py --data_root`` sets it); else,
    in a source checkout, the ``shared/data`` folder beside the repository (SPEC §3); else
    :data:`UNSET_DATA_ROOT`, the literal ``$BSRNN_DATA``, so that loading a data set from it
    fails with an error that says to set it. Read when called, not at import."""
    if os.environ.get("BSRNN_DATA"):
        return os.environ["BSRNN_DATA"]
    repo = Path(__file__).resolve().parents[2]
    beside = repo.parent / "shared" / "data"
    if (repo / "pyproject.toml").is_file() and beside.is_dir():
        return str(beside)
    return UNSET_DATA_ROOT


def data_path(*parts: str) -> str:
    """A path under :func:`data_root`, e.g. ``data_path("ptb")``."""
    return str(Path(data_root(), *parts))


def per_type(value: Any, **overrides: Any) -> ml_collections.ConfigDict:
    """``{"input": value, "recurrent": value, "fc": value}``, with ``overrides`` by type."""
    unknown = set(overrides) - set(LAYER_TYPES)
    if unknown:
        raise ValueError(f"unknown layer types {sorted(unknown)}; use {LAYER_TYPES}.")
    return ml_collections.ConfigDict({t: overrides.get(t, value) for t in LAYER_TYPES})


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parse a config's ``arg`` (``--config=file.py:arg``) as ``key=value,key=value``.

    A token without ``=`` sets the first key of ``defaults`` (``ptb_word.py:lstm`` is
    ``cell=lstm``). Values take the type of the default; unknown keys raise.

    Args:
      arg: the string after the colon, or ``None``.
      defaults: the keys this config accepts and their default values.
    """
    result = ml_collections.ConfigDict(defaults)
    first = next(iter(defaults), None)
    for token in filter(None, (arg or "").split(",")):
        key, _, value = token.partition("=") if "=" in token else (first, "=", token)
        if key not in defaults:
            raise ValueError(f"config arg {token!r}: unknown key {key!r}; known: {list(defaults)}.")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"config arg {token!r}: {key} takes true or false, got "
                                 f"{value!r}.")
            result[key] = value.lower() in ("1", "true", "yes")
            continue
        try:
            result[key] = kind(value)
        except ValueError:
            raise ValueError(
                f"config arg {token!r}: {key} takes {kind.__name__} values (default "
                f"{defaults[key]!r}), got {value!r}."
            ) from None
    return result


def optimizer(
    name: str = "adam",
    learning_rate: float = 2e-3,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    grad_clip: float = 1.0,
    **rest: Any,
) -> ml_collections.ConfigDict:
    """The ``optimizer`` section (see :func:`bsrnn.methods.create_optimizer`)."""
    section = dict(
        name=name, learning_rate=learning_rate, schedule=schedule, warmup_steps=warmup_steps,
        grad_clip=grad_clip, final_lr_fraction=0.0, momentum=0.9, nesterov=True,
        weight_decay=0.0,
    )
    section.update(rest)
    return ml_collections.ConfigDict(section)


def pruning(
    *,
    sparsity: float = 0.9,
    block_shape: tuple[int, int] = (4, 4),
    reduction: str = "max",
    schedule: str = "cubic",
    begin_fraction: float = 0.1,
    ramp_fraction: float = 0.25,
    end_fraction: float = 0.5,
    freq: int = 100,
    glp_strength: float = 1e-5,
    gl_strength: float = 1e-4,
    num_modules: int = 8,
) -> dict[str, ml_collections.ConfigDict]:
    """The ``prune``, ``group_lasso`` and ``structure`` sections, one value for every type.

    ``prune.schedule`` is ``"cubic"`` (a target ``sparsity`` per matrix, Zhu & Gupta) or
    ``"gradual"`` (P2's threshold, with start slope from Eq. 1 and P2's ``q``: the 90th
    percentile |w| of a trained dense model per layer type, which a dense run's
    ``report.json`` lists under ``weight_percentile_90``), scaled for blocks by
    N_b^``block_exponent`` (P1: 1/4; 0 for a q measured on block scores); ``q_layers``
    gives a q per layer instead (:func:`bsrnn.methods.layer_q`). GL and GLP have their own λ_g
    (P1: GL needs a large one, GLP a small one). ``structure.num_modules`` is P3's G, used
    by the ``structural`` method only. ``prune.sparse_training`` runs the recurrences on their
    kept blocks once the schedule has ended (:mod:`bsrnn.train`; off until it pays).
    """
    prune = ml_collections.ConfigDict(dict(
        layer_types=LAYER_TYPES,
        schedule=schedule,
        sparsity=per_type(sparsity),
        q=per_type(0.0),
        q_layers=(),  # ((layer, q), ...): P2's threshold per layer instead of per type
        block_exponent=0.25,  # θ_b = θ·N_b^block_exponent (P1: 1/4)
        ramp_ratio=1.5,
        begin_fraction=begin_fraction,
        ramp_fraction=ramp_fraction,
        end_fraction=end_fraction,
        freq=freq,
        block_shape=per_type(tuple(block_shape)),
        reduction=per_type(reduction),
        mode="hard",
        sparse_training=False,
    ))
    group_lasso = ml_collections.ConfigDict(dict(
        glp_strength=per_type(glp_strength), gl_strength=per_type(gl_strength),
        proximal=False,
    ))
    structure = ml_collections.ConfigDict(dict(num_modules=num_modules))
    return dict(prune=prune, group_lasso=group_lasso, structure=structure)


def mesh(data: int = -1) -> ml_collections.ConfigDict:
    """The ``mesh`` section: ``data`` devices split every batch by rows (-1: all devices
    of all processes). The global ``batch_size`` and ``eval_batch_size`` must be multiples
    of it; set ``--config.mesh.data=1`` to run on one device of a larger machine."""
    return ml_collections.ConfigDict(dict(data=data))



def all_types(key: str, value: Any) -> dict[str, Any]:
    """Sweep overrides that set a per-type field for every layer type:
    ``all_types("prune.block_shape", (8, 8))`` -> ``{"prune.block_shape.input": (8, 8), ...}``.
    """
    return {f"{key}.{kind}": value for kind in LAYER_TYPES}
