"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

One run, from a config (see ``experiments/configs``) into a working directory:

* **Data** from :func:`bsrnn.data.load` (a ``TextData`` or ``SpeechData``, whose
  ``train_batches`` and ``eval_batches`` give the batches), the **model** picked by
  ``config.model_name`` from :mod:`bsrnn.models`, the **optimizer chain** of
  ``config.method`` from :func:`bsrnn.methods.create_optimizer` (each method is defined
  there).
* **What differs between models** is asked of the model's module, its
  :class:`bsrnn.models.Task`: the inputs of a batch, the carry, the training loss and the
  evaluation. Language models carry the recurrent state of each of the B rows from one
  window to the next (truncated BPTT) and minimise the mean cross-entropy per token in
  nats (:mod:`bsrnn.models.lm`); speech models minimise ``optax.ctc_loss``, averaged over
  the utterances of the batch (:mod:`bsrnn.models.ds2`).
* **Train step** (jitted), the contract of :mod:`bsrnn.pruning`::

      loss, grads = value_and_grad(loss_fn)(params)           # forward pass sees w ⊙ mask
      updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
      params = optax.apply_updates(params, updates)
      masks = pruning.updated_masks(opt_state, masks)
* **Devices**: data parallel over the ``data`` axis of a mesh of ``config.mesh.data``
  devices (:mod:`bsrnn.sharding`): batches and the LM carry are split by rows, params,
  masks and optimizer state replicated; the step is one ``jax.jit`` with these shardings.
  The losses match a one-device run up to float summation order. In a multi-process run
  (``launch.py --num_processes=...``) every process runs this function; only process 0
  writes ``metrics.jsonl``, TensorBoard files, ``config.json`` and ``report.json``.
* **Evaluation** every ``eval_every`` steps on the first eval split and at the end on all,
  by the model's ``Task.evaluate``: loss and bits per character (character LMs),
  perplexity (word LMs), or CER and WER of greedy CTC transcripts (speech).
* **Sparse training** (``config.prune.sparse_training``, off by default): once the pruning
  schedule has ended the masks are frozen, and the steps after it run every recurrent layer
  on its kept blocks only (:mod:`bsrnn.kernels.sparse_training`; same params, masks and
  checkpoints; the pruned recurrent weights get a zero gradient instead of the
  straight-through one, which only the global gradient norm sees).
* **Checkpoints** (orbax ``CheckpointManager``, ``<workdir>/checkpoints``) every
  ``checkpoint_every`` steps and at the end: params, masks, optimizer and schedule state,
  the LM carry, the RNG, the data position and the wall time so far, with the sha256 of
  every file (:mod:`bsrnn.workdir`). A run started on a workdir that holds checkpoints
  resumes from the newest and gives the same numbers as an uninterrupted run. Orbax writes
  each checkpoint into a temporary folder and renames it when complete, so a crash or a
  kill during a save leaves the previous one intact. A checkpoint whose files do not match
  their checksums (or cannot be read) is moved to ``<workdir>/damaged_checkpoints`` with a
  warning, never deleted, and the run resumes from the newest good one. Restores place
  every array with the sharding of the current mesh, so a run may resume on a different
  number of devices.
* **Resume** compares the config with the workdir's ``config.json`` first
  (:func:`bsrnn.workdir.resume_changes`): a different model, data, method, blocks or seed is
  refused with the differences listed; ``num_steps``, logging, evaluation and checkpoint
  cadence may change, the learning rate only with ``allow_changes``; each change is an
  event of the step it takes effect at. The workdir is locked while a run uses it.
* **Logs**: ``<workdir>/metrics.jsonl``, TensorBoard files in ``<workdir>/tensorboard``,
  per-layer sparsity every ``log_every`` steps, a progress bar with rate and ETA.
* **Report**: ``<workdir>/report.json`` (:func:`bsrnn.report.build_report`: final metrics,
  sparsity overall and per layer, total and nonzero parameters, method, blocks, wall time,
  config), printed as a table, and ``<workdir>/masks.npz``, the final masks
  (:func:`bsrnn.report.load_masks` reads them).
* **Export**: ``<workdir>/model.npz``, the model block-sparse (:mod:`bsrnn.export`), run
  from the file (:mod:`bsrnn.inference`): a few samples or transcripts, and its speed against
  the masked dense model (``report.json``'s ``export`` entry, :func:`export_model`).

A NaN or infinite loss (or gradient norm) stops the run with ``FloatingPointError``
before anything non-finite is saved; the last good checkpoint stays. A run that diverges
without a NaN (a training loss :data:`DIVERGENCE_FACTOR` times its first step's, the
model ending worse than it started, or an evaluation loss rising :data:`RISING_EVALS`
times in a row) gets a warning in the log and in the report (``warnings``). Events of
the run (config changes on resume, skipped checkpoints, warnings) are kept in
``<workdir>/events.jsonl`` and listed in the report.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct, traverse_util
from jax.experimental import multihost_utils
from tqdm import tqdm

from bsrnn import blocks, data, methods, models, pruning, report, sharding
from bsrnn import workdir as workdir_lib
from bsrnn.kernels import sparse_training

DIVERGENCE_FACTOR = 2.0  # a training loss this many times the first step's: diverging
RISING_EVALS = 3  # evaluation losses rising this many times in a row: a warning


class CheckpointError(RuntimeError):
    """A checkpoint in the workdir cannot be restored or saved; the message says what to do."""


@struct.dataclass
class TrainState:
    """Everything a run needs to go on from where it stopped.

    Attributes:
      step: int32 scalar, optimizer updates done.
      params: the model's params.
      masks: the ``masks`` collection (bool, one per prunable kernel).
      opt_state: the chain's state (optimizer moments, pruning counts, masks, thresholds).
      carry: the model's state between batches (``Task.initial_carry``): language
        models: the recurrent carry of the B training rows; speech: ().
      rng: uint32 key data; step t uses ``fold_in(rng, t)`` for dropout.
    """

    step: jax.Array
    params: Any
    masks: Any
    opt_state: Any
    carry: Any
    rng: jax.Array


def create_model(config: ml_collections.ConfigDict, dataset: data.Data) -> Any:
    """``bsrnn.models.<config.model_name>.Model(num_classes, **config.model)``, with P3's
    ``recurrent_modules`` from :func:`bsrnn.methods.recurrent_modules`."""
    module = models.model_module(config.model_name)
    if module.TASK != dataset.task:
        raise ValueError(
            f"config.model_name={config.model_name!r} models {module.TASK} data, but "
            f"config.data.name={config.data.name!r} is {dataset.task} data."
        )
    kwargs = dict(config.model)
    try:
        return module.Model(
            **{module.NUM_CLASSES_FIELD: dataset.num_classes},
            recurrent_modules=methods.recurrent_modules(config), **kwargs,
        )
    except TypeError as e:
        raise ValueError(f"config.model does not fit bsrnn.models.{config.model_name}: {e}") from e


def initial_state(
    config: ml_collections.ConfigDict, model: Any, task: models.Task, batch: dict[str, Any]
) -> tuple[TrainState, optax.GradientTransformationExtraArgs, optax.Schedule]:
    """Fresh params and masks (from ``config.seed``), the chain of ``config.method``.

    ``task``: the model's module (``models.model_module(config.model_name)``); ``batch``:
    a training batch, for shapes (:func:`bsrnn.data.example_batch`).
    """
    rng = jax.random.key(config.seed)
    init_rng, rng = jax.random.split(rng)
    variables = model.init(init_rng, *task.inputs(batch))
    params, masks = variables["params"], variables["masks"]
    tx, lr = methods.create_optimizer(config, masks)
    carry = task.initial_carry(model, config.batch_size)
    state = TrainState(
        step=jnp.zeros([], jnp.int32), params=params, masks=masks,
        opt_state=tx.init(params), carry=carry, rng=jax.random.key_data(rng),
    )
    return state, tx, lr


def train_step(
    state: TrainState, batch: dict[str, Any], *, model: Any, tx: Any, task: models.Task,
    update_masks: bool | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update; see the module docstring. Returns the new state and the
    step's ``loss`` (``task.train_loss``) and ``grad_norm``. ``update_masks`` (static):
    whether the pruning transformation recomputes masks at this step, from
    :func:`bsrnn.methods.mask_update_steps` (then the program has no conditional), or
    ``None``: it decides on the device."""
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
        variables = {"params": params, "masks": state.masks}
        return task.train_loss(model, variables, batch, state.carry, {"dropout": dropout_rng})

    (loss, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, masks=state.masks,
                                   update_masks=update_masks)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, masks=pruning.updated_masks(opt_state, state.masks),
        opt_state=opt_state, carry=jax.lax.stop_gradient(carry),
    )
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def evaluate(
    model: Any, params: Any, masks: Any, dataset: data.Data,
    config: ml_collections.ConfigDict, split: str, mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
    """Metrics of the model on one pass over ``split``, by the ``evaluate`` of the model's
    module (:mod:`bsrnn.models.lm`, :mod:`bsrnn.models.ds2`).

    Language models: ``loss`` (mean nats per token, the carry passed from window to
    window as in training), and ``bpc`` or ``perplexity``. Speech: ``loss`` (mean CTC loss
    per utterance), ``cer`` and ``wer`` of the greedy transcripts (fractions).
    With a ``mesh``, batches and the carry are split by rows over its ``data`` axis
    (``params`` and ``masks`` replicated on it); without, everything runs on one device.
    """
    batches = _progress(dataset.eval_batches(config, split), f"eval {split}")

    def place(tree: Any) -> Any:
        return tree if mesh is None else sharding.put_batch(tree, mesh)

    task = models.model_module(config.model_name)
    return task.evaluate(model, {"params": params, "masks": masks}, batches, dataset,
                         config.eval_batch_size, place)


def _progress(iterable: Any, desc: str, **kwargs: Any) -> Any:
    """A tqdm bar on an interactive terminal; plain iteration otherwise."""
    return tqdm(iterable, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                disable=not sys.stderr.isatty(), **kwargs)


def _check_config(config: ml_collections.ConfigDict) -> None:
    """Refuse settings that would fail later or give results that look right but are not."""
    for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "batch_size",
                "eval_batch_size", "max_checkpoints", *(("seq_len",) if "seq_len" in config
                                                         else ())):
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            why = (" (0 keeps no checkpoint, so a run could never resume)"
                   if key == "max_checkpoints" else "")
            raise ValueError(f"config.{key}={value!r} must be an integer >= 1{why}.")
    if config.checkpoint_every % config.log_every:
        raise ValueError(
            f"config.checkpoint_every={config.checkpoint_every} must be a multiple of "
            f"config.log_every={config.log_every}: a resumed run then logs the same averages "
            "as an uninterrupted one, and no checkpoint is saved before its loss is checked."
        )
    o = config.optimizer
    if not (isinstance(o.learning_rate, int | float) and np.isfinite(o.learning_rate)
            and o.learning_rate > 0):
        raise ValueError(
            f"config.optimizer.learning_rate={o.learning_rate!r} must be a finite number > 0 "
            "(a negative one climbs the loss, zero never moves)."
        )
    if not (np.isfinite(o.grad_clip) and o.grad_clip >= 0):
        raise ValueError(f"config.optimizer.grad_clip={o.grad_clip!r} must be >= 0 (0: no "
                         "clipping).")


def _checkpoint_manager(workdir: Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.max_checkpoints, enable_async_checkpointing=False, create=True,
        ),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "progress": ocp.JsonCheckpointHandler()},
    )


def _resume_changes(
    config: ml_collections.ConfigDict, workdir: Path, manager: ocp.CheckpointManager,
    allow_changes: tuple[str, ...],
) -> dict[str, tuple[Any, Any]]:
    """The config changes since the run that wrote the workdir's checkpoints (see
    :func:`bsrnn.workdir.resume_changes`); ``{}`` if there are none or nothing to resume."""
    step = manager.latest_step()
    recorded = workdir / "config.json"
    if step is None:
        return {}
    if not recorded.exists():
        logging.warning("%s holds checkpoints but no config.json: this config cannot be "
                        "compared with theirs; only the shapes of their arrays are checked.",
                        workdir)
        return {}
    try:
        before = json.loads(recorded.read_text())
    except ValueError as e:
        raise CheckpointError(
            f"{recorded} is not valid JSON ({e}); it records the config of the checkpoints "
            "there. Restore it, or use a new --workdir."
        ) from e
    now = json.loads(config.to_json_best_effort())
    return workdir_lib.resume_changes(before, now, step, allow_changes)


def _key(path: tuple[Any, ...]) -> str:
    """A tree path as ``params/layer_0/recurrent_z/kernel``, alike for a TrainState and for
    orbax's metadata of it."""
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
                    for k in path)


def _shape_differences(manager: ocp.CheckpointManager, step: int, state: Any) -> list[str]:
    """The arrays whose shape or dtype in checkpoint ``step`` differ from ``state``'s
    (arrays or ``ShapeDtypeStruct`` s)."""
    saved = {
        _key(p): (tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)))
        for p, x in jax.tree_util.tree_leaves_with_path(manager.item_metadata(step)["state"])
    }
    wanted = {_key(p): (tuple(x.shape), str(x.dtype))
              for p, x in jax.tree_util.tree_leaves_with_path(state)}
    def show(entry: tuple[tuple[int, ...], str] | None) -> str:
        return "absent" if entry is None else f"{entry[0]} {entry[1]}"

    order = {"params": 0, "masks": 1}  # the model's own arrays first
    keys = sorted(set(saved) | set(wanted), key=lambda k: (order.get(k.split("/")[0], 2), k))
    return [f"{k}: {show(saved.get(k))} in the checkpoint, {show(wanted.get(k))} now"
            for k in keys if saved.get(k) != wanted.get(k)]


def _set_aside(workdir: Path, folder: Path) -> Path:
    """Move a damaged checkpoint folder to ``<workdir>/damaged_checkpoints`` (never delete
    what might be recovered); returns where it went."""
    target = workdir / "damaged_checkpoints" / folder.name
    if target.exists():
        target = target.with_name(f"{folder.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    target.parent.mkdir(exist_ok=True)
    folder.rename(target)
    return target


def _try_restore(
    manager: ocp.CheckpointManager, step: int, target: Any
) -> tuple[Any, list[str]]:
    """Checkpoint ``step`` restored into ``target`` (``None`` if it cannot be), and what is
    wrong with it (``[]``: nothing).

    Raises:
      CheckpointError: its arrays do not fit ``target`` (another model or method wrote it),
        or its files match their checksums but orbax cannot read them: neither is damage,
        so an older checkpoint would not help.
    """
    folder = Path(manager.directory) / str(step)
    problems = workdir_lib.verify_checksums(folder)
    if problems:
        return None, problems
    try:
        differences = _shape_differences(manager, step, target)
        if not differences:
            return manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore(),
            )), []
    except Exception as e:  # orbax and tensorstore raise many kinds
        if problems is not None:
            raise CheckpointError(
                f"the checkpoint of step {step} in {folder} is intact (its files match their "
                f"checksums) but cannot be restored: {type(e).__name__}: {str(e)[:300]}. The "
                "installed orbax or bsrnn may differ from the one that wrote it; the "
                "checkpoint is kept."
            ) from e
        return None, [f"cannot be read ({type(e).__name__}: {str(e)[:200]})"]
    listed = "\n  ".join(differences[:12])
    more = f"\n  ... and {len(differences) - 12} more" if len(differences) > 12 else ""
    raise CheckpointError(
        f"the checkpoint of step {step} in {folder} does not fit this config: "
        f"{len(differences)} arrays differ in shape or dtype:\n  {listed}{more}\n"
        "It was written by a run of another model or method and is not damaged. Use a new "
        "--workdir for this config, or run with the config that wrote it."
    )


def _restore(
    manager: ocp.CheckpointManager, state: TrainState, workdir: Path, primary: bool
) -> tuple[TrainState, dict[str, Any] | None, list[dict[str, Any]]]:
    """The newest good checkpoint's state and progress (data position, wall time, first
    loss), or ``state`` and ``None`` if there is none; and the checkpoints skipped.

    Every array is restored with the shape, dtype and sharding of ``state``'s (each process
    reads the slices of its own devices), whatever mesh the checkpoint was saved from.
    Newest first, a checkpoint whose files differ from their checksums, or that has no
    checksums and cannot be read, is skipped: moved to ``<workdir>/damaged_checkpoints``
    (by process 0) with a warning naming it and why.

    Raises:
      CheckpointError: see :func:`_try_restore`; or every checkpoint damaged.
    """
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, skipped = None, []
    for step in sorted(manager.all_steps(), reverse=True):
        restored, problems = _try_restore(manager, step, target)
        if restored is not None:
            break
        skipped.append({"checkpoint": step, "problems": problems})
    for entry in skipped:
        folder = Path(manager.directory) / str(entry["checkpoint"])
        entry["moved_to"] = str(_set_aside(workdir, folder) if primary else folder)
        logging.warning("Skipped the damaged checkpoint of step %d (%s); moved to %s, not "
                        "deleted.", entry["checkpoint"], "; ".join(entry["problems"][:5]),
                        entry["moved_to"])
    if skipped:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("bsrnn: damaged checkpoints set aside")
        manager.reload()
    if restored is None and skipped:
        names = ", ".join(f"step {s['checkpoint']} (now in {s['moved_to']})" for s in skipped)
        raise CheckpointError(
            f"every checkpoint in {manager.directory} is damaged: {names}. They were moved "
            "aside, not deleted. Run again on the same --workdir to start from step 0, or put "
            "back copies from a backup."
        )
    if restored is None:
        return state, None, skipped
    return restored.state, restored.progress, skipped


def _save(
    manager: ocp.CheckpointManager, step: int, state: TrainState, progress: dict[str, Any],
    primary: bool,
) -> None:
    """Save checkpoint ``step`` and its checksums; a full disk or a folder that cannot be
    written raises :class:`CheckpointError` naming the last good checkpoint."""
    folder = Path(manager.directory) / str(step)
    try:
        saved = manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress),
        ))
        manager.wait_until_finished()
        if not saved:
            raise CheckpointError(f"orbax did not save the checkpoint of step {step} in "
                                  f"{folder} (it holds one of that step already).")
        if primary:
            workdir_lib.write_checksums(folder)
    except OSError as e:
        good = [s for s in manager.all_steps() if s < step]
        kept = f"step {max(good)}" if good else "none"
        raise CheckpointError(
            workdir_lib.os_error_message(f"saving the checkpoint of step {step} to {folder}", e)
            + f" The last good checkpoint ({kept}) is kept; run again on the same --workdir "
            "to resume from it."
        ) from e


def _check_recurrent_modules(masks: Any, modules: int) -> None:
    """On the host, raise ``ValueError`` unless every recurrent mask is within P3's
    ``block_diagonal(modules)`` (a checkpoint saved with another G would otherwise make
    the block-diagonal layers output NaN)."""
    if modules == 1:
        return
    for path, mask in traverse_util.flatten_dict(jax.device_get(masks)).items():
        if pruning.default_layer_type(path, mask) == "recurrent":
            blocks.check_block_diagonal(
                mask, modules, f"the restored mask {'/'.join(path)} (config.structure.num_modules"
                f"={modules})")


def _sparse_training_start(config: ml_collections.ConfigDict) -> int | None:
    """The first step whose masks are frozen (after the pruning schedule's end step) when
    ``config.prune.sparse_training`` is on, else ``None``."""
    if not config.prune.get("sparse_training", False):
        return None
    if not methods.prunes(config) or "recurrent" not in config.prune.layer_types:
        raise ValueError(
            "config.prune.sparse_training needs a pruning method (wp, bp, gl, glp) that prunes "
            f"recurrent kernels; got method {config.method!r}, layer types "
            f"{tuple(config.prune.layer_types)}."
        )
    return methods.schedule_steps(config)["end"] + 1


def _sparsity_scalars(layers: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {f"sparsity/{name}": entry["sparsity"] for name, entry in layers.items()}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, *,
    allow_changes: tuple[str, ...] | list[str] = (),
) -> TrainState:
    """Train, prune, evaluate, checkpoint and report; resume if ``workdir`` has checkpoints.

    Args:
      config: an experiment config (``experiments/configs``).
      workdir: where checkpoints, logs and ``report.json`` go (made absolute; locked while
        the run goes on).
      allow_changes: config keys of :data:`bsrnn.workdir.CONSENT_KEYS` (the learning rate
        and its kin) that may differ from the workdir's ``config.json`` when resuming.

    Returns:
      The final train state (``report.json`` holds the report).

    Raises:
      ValueError: a setting that cannot work or would give wrong results, named; a resume
        whose config differs from the workdir's where it must not.
      bsrnn.workdir.WorkdirError: a workdir that cannot be used, or one in use.
      CheckpointError: checkpoints that cannot be restored or saved.
    """
    started = time.time()
    _check_config(config)
    mesh = sharding.create_mesh(config)
    primary = sharding.is_primary()
    workdir = workdir_lib.prepare(workdir)
    with workdir_lib.Lock(workdir) if primary else contextlib.nullcontext() as lock:
        if lock is not None and lock.took_over:
            logging.warning("Took over the lock of %s from process %s on %s, which no longer "
                            "runs.", workdir, lock.took_over.get("pid"),
                            lock.took_over.get("host"))
        return _train_and_evaluate(config, workdir, mesh, primary, started, tuple(allow_changes))


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: Path, mesh: jax.sharding.Mesh, primary: bool,
    started: float, allow_changes: tuple[str, ...],
) -> TrainState:
    manager = _checkpoint_manager(workdir, config)
    changes = _resume_changes(config, workdir, manager, allow_changes)
    dataset = data.load(config)
    model = create_model(config, dataset)
    task = models.model_module(config.model_name)
    state, tx, learning_rate = initial_state(
        config, model, task, data.example_batch(dataset, config)
    )
    shardings = sharding.state_shardings(state, mesh)
    state = sharding.put(state, shardings)
    layer_type = methods.prunable_layer_type(state.masks, config.prune.layer_types)
    _check_prunable(config, state.params, layer_type)
    _check_eval_batches(dataset, config)
    workdir_lib.check_free_space(
        workdir, (config.max_checkpoints + 1) * _nbytes(state) + 2**24,
        f"{config.max_checkpoints} checkpoints and the one being written",
    )

    state, progress, skipped = _restore(manager, state, workdir, primary)
    _check_recurrent_modules(state.masks, methods.recurrent_modules(config))
    position, previous_time, initial_loss = (
        (None, 0.0, None) if progress is None
        else (progress["position"], float(progress["wall_time_s"]), progress.get("initial_loss"))
    )
    start = int(state.step)
    if start > config.num_steps:
        raise ValueError(
            f"the checkpoint in {workdir / 'checkpoints'} is at step {start} but "
            f"config.num_steps={config.num_steps}: a run cannot go back. Set "
            f"--config.num_steps={start} or more to go on, or use a new --workdir."
        )
    if start:
        logging.info("Resuming %s from step %d.", workdir, start)
    logging.info("Data parallel over %d device(s) of %d process(es).", mesh.size,
                 jax.process_count())
    events = workdir_lib.Events(workdir if primary else None, resume_step=start)
    for entry in skipped:
        events.add(start, "skipped_checkpoint", **entry)
    if start and changes:
        events.add(start, "config_change", changes={
            k: {"before": a, "after": b} for k, (a, b) in changes.items()})
        logging.warning("Resuming at step %d with config changes: %s.", start, "; ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    if primary:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    writer = report.MetricWriter(workdir, resume_step=start) if primary else _NoWriter()
    watch = _DivergenceWatch(events, initial_loss,
                             _records(workdir / "metrics.jsonl") if primary else [])

    def jitted_steps(model: Any) -> dict[bool, Any]:
        return {  # by whether the step recomputes masks; each compiles when first used
            update: jax.jit(
                functools.partial(train_step, model=model, tx=tx, task=task,
                                  update_masks=update),
                in_shardings=(shardings, sharding.batch_sharded(mesh)),
                out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0,
            )
            for update in (False, True)
        }

    step_fns = jitted_steps(model)
    masks_due = methods.mask_update_steps(config)
    sparse_from = _sparse_training_start(config)
    batches: Iterator = dataset.train_batches(config, position)
    sums, count, window_start = None, 0, time.time()
    bar = _progress(range(start, config.num_steps), "train", initial=start,
                    total=config.num_steps)
    for step in bar:
        if sparse_from is not None and step == max(sparse_from, start):
            frozen = sparse_training.freeze(state.masks, methods.block_shape(config, "recurrent"))
            logging.info("Masks frozen: steps from %d run the recurrences on their kept blocks.",
                         step)
            step_fns = jitted_steps(model.clone(frozen_recurrent=frozen))
        batch, position = next(batches)
        state, step_metrics = step_fns[bool(masks_due[step])](
            state, sharding.put_batch(batch, mesh))
        if initial_loss is None:
            initial_loss = watch.initial_loss = float(step_metrics["loss"])
        sums = step_metrics if sums is None else jax.tree_util.tree_map(
            jnp.add, sums, step_metrics)
        count += 1
        done = step + 1
        last = done == config.num_steps
        if done % config.log_every == 0 or last:
            scalars = {k: float(v) / count for k, v in jax.device_get(sums).items()}
            if not all(np.isfinite(v) for v in scalars.values()):
                writer.close()
                good = manager.latest_step()
                raise FloatingPointError(
                    f"non-finite training loss at step {done} (mean over steps "
                    f"{done - count + 1}-{done}: loss {scalars['loss']}, gradient norm "
                    f"{scalars['grad_norm']}). Stopped without saving; the last good checkpoint "
                    f"is {'step ' + str(good) if good is not None else 'none'} in "
                    f"{workdir / 'checkpoints'}. Lower config.optimizer.learning_rate or "
                    "config.optimizer.grad_clip (or check the data for huge or non-finite "
                    "values) and run again on the same --workdir to resume."
                )
            rate = count / (time.time() - window_start)
            layers = report.layer_sparsity(state.params, state.masks, layer_type)
            scalars.update(learning_rate=float(learning_rate(step)), steps_per_second=rate,
                           **_sparsity_scalars(layers))
            writer.write(done, "train", scalars)
            watch.train(done, scalars["loss"])
            logging.info(
                "step %d/%d: loss %.4f, sparsity %.1f%%, %.2f steps/s, ETA %s", done,
                config.num_steps, scalars["loss"], 100 * layers["total"]["sparsity"], rate,
                report.duration((config.num_steps - done) / rate),
            )
            sums, count, window_start = None, 0, time.time()
        if done % config.eval_every == 0 and not last:
            split = dataset.eval_splits[0]
            scores = evaluate(model, state.params, state.masks, dataset, config, split, mesh)
            writer.write(done, split, scores)
            watch.evaluated(done, split, scores["loss"])
        if done % config.checkpoint_every == 0 or last:
            progress = {"position": position, "initial_loss": initial_loss,
                        "wall_time_s": previous_time + time.time() - started}
            _save(manager, done, state, progress, primary)

    final: dict[str, dict[str, float]] = {}
    last_train = _last_train_record(workdir / "metrics.jsonl") if primary else None
    if last_train:
        final["train"] = {k: last_train[k] for k in ("loss", "grad_norm")}
    for split in dataset.eval_splits:
        final[split] = evaluate(model, state.params, state.masks, dataset, config, split, mesh)
        writer.write(int(state.step), split, final[split])
        watch.evaluated(int(state.step), split, final[split]["loss"], final=True)
    writer.close()
    if primary:
        result = report.build_report(config, workdir, state, final,
                                     previous_time + time.time() - started, events)
        report.save_masks(workdir / "masks.npz", jax.device_get(state.masks))
        (workdir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        result["export"] = export_model(config, workdir, state, dataset, model, final)
        (workdir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        print(report.format_report(result), flush=True)
        for warning in result["warnings"]:
            print(f"WARNING (step {warning['step']}): {warning['message']}", flush=True)
    return state


def export_model(
    config: ml_collections.ConfigDict, workdir: Path, state: TrainState,
    dataset: data.Data, model: Any, metrics: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """Writes ``<workdir>/model.npz`` (:func:`bsrnn.export.export_run`), runs the exported
    model and times it against the masked dense model, side by side in this process
    (:func:`bsrnn.inference.speed.compare_run`: samples or transcripts, and their speed). A
    config with ``export_timing=False`` skips the samples and the timing (their
    compilations take a few seconds; the tests' tiny runs need neither).

    Returns:
      ``report.json``'s ``export`` entry: the file, its bytes against the dense fp32
      weights, dtype, what was timed and its ``inference_speedup``, and the samples.
    """
    from bsrnn import export, inference
    from bsrnn.inference import speed

    path = workdir / "model.npz"
    params, masks = jax.device_get((state.params, state.masks))
    sizes = export.export_run(path, config, params, masks, dataset, step=int(state.step),
                              metrics=metrics)
    exported = inference.load(path)
    entry = {"file": str(path), "file_bytes": path.stat().st_size,
             "stored_bytes": sizes.stored_bytes, "dense_fp32_bytes": sizes.dense_fp32_bytes,
             "dtype": "float32", "backend": jax.default_backend()}
    if not config.get("export_timing", True):
        return entry
    run = speed.compare_run(exported, model, {"params": params, "masks": masks}, dataset, config)
    return {**entry, "timed": run["timed"], "inference": run["inference"],
            "inference_speedup": run["inference"]["speedup"], "samples": run["samples"]}


class _NoWriter:
    """The metric writer of processes other than 0: they compute the same numbers and log
    nothing."""

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        del step, split, scalars

    def close(self) -> None:
        pass


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last_train_record(path: Path) -> dict[str, Any] | None:
    train = [r for r in _records(path) if r["split"] == "train"]
    return train[-1] if train else None


class _DivergenceWatch:
    """Warnings, in the log and as events, for a run that diverges without a NaN.

    * a training window's mean loss above :data:`DIVERGENCE_FACTOR` times the loss of the
      run's first step (the model at initialisation);
    * a final evaluation loss above that first loss (training made the model worse);
    * an evaluation loss that rose at :data:`RISING_EVALS` evaluations in a row.

    Each kind of warning is given once per run. ``history``: the ``metrics.jsonl`` records
    kept on resume, so the evaluations before it count.
    """

    def __init__(self, events: workdir_lib.Events, initial_loss: float | None,
                 history: list[dict[str, Any]]):
        self.events, self.initial_loss = events, initial_loss
        self.losses: dict[str, list[float]] = {}
        for record in history:
            if record["split"] != "train":
                self.losses.setdefault(record["split"], []).append(record["loss"])

    def _warn(self, step: int, reason: str, message: str) -> None:
        if any(e.get("reason") == reason for e in self.events.of_kind("warning")):
            return
        logging.warning("Step %d: %s", step, message)
        self.events.add(step, "warning", reason=reason, message=message)

    def train(self, step: int, loss: float) -> None:
        """Check the mean training ``loss`` of the window that ends at ``step``."""
        first = self.initial_loss
        if first is not None and first > 0 and loss > DIVERGENCE_FACTOR * first:
            self._warn(step, "loss_above_start", (
                f"training loss {loss:.4g} is more than {DIVERGENCE_FACTOR:g}x the first step's "
                f"{first:.4g}: the run is diverging. Lower config.optimizer.learning_rate "
                "(or raise config.optimizer.warmup_steps)."))

    def evaluated(self, step: int, split: str, loss: float, final: bool = False) -> None:
        """Check the evaluation ``loss`` of ``split`` at ``step``."""
        losses = self.losses.setdefault(split, [])
        losses.append(loss)
        recent = losses[-RISING_EVALS - 1:]
        if len(recent) > RISING_EVALS and all(np.diff(recent) > 0):
            self._warn(step, "eval_rising", (
                f"the {split} loss rose at {RISING_EVALS} evaluations in a row ("
                + ", ".join(f"{x:.4g}" for x in recent) + "): the run diverges or overfits."))
        first = self.initial_loss
        if final and first is not None and loss > first:
            self._warn(step, "worse_than_start", (
                f"the final {split} loss {loss:.4g} is above the first training step's "
                f"{first:.4g}: training made the model worse. Check "
                "config.optimizer.learning_rate."))


def _nbytes(tree: Any) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def _check_prunable(config: ml_collections.ConfigDict, params: Any,
                    layer_type: pruning.LayerTypeFn) -> None:
    """A pruning method must find kernels of every type it prunes: refuse a method that
    would prune nothing, warn about a layer type that has no kernel."""
    if not methods.prunes(config):
        return
    found = {kind for path, leaf in traverse_util.flatten_dict(params).items()
             if (kind := layer_type(path, leaf))}
    if not found:
        raise ValueError(
            f"config.method={config.method!r} prunes layer types "
            f"{tuple(config.prune.layer_types)} but the model has no masked kernel of those "
            "types: nothing would be pruned. Check config.prune.layer_types (and, for 'fc', "
            "config.model.mask_output), or use config.method='dense'."
        )
    for kind in sorted(set(config.prune.layer_types) - found):
        logging.warning("config.prune.layer_types has %r but the model has no masked %s kernel; "
                        "its schedule prunes nothing.", kind, kind)


def _check_eval_batches(dataset: data.Data, config: ml_collections.ConfigDict) -> None:
    """Every evaluation split makes at least one batch (before training, not after it)."""
    for split in dataset.eval_splits:
        try:
            next(dataset.eval_batches(config, split))
        except ValueError as e:
            raise ValueError(
                f"config.eval_batch_size={config.eval_batch_size}: the {split} split is too "
                f"small for it ({e}); lower --config.eval_batch_size."
            ) from e

