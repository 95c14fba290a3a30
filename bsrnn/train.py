"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

One run, from a config (see ``experiments/configs``) into a working directory:

* **Data** from :mod:`bsrnn.input_pipeline`, the **model** picked by ``config.model_name``
  from :mod:`bsrnn.models`, the **optimizer chain** of ``config.method`` from
  :mod:`bsrnn.methods`.
* **Train step** (jitted), the contract of :mod:`bsrnn.pruning`::

      loss, grads = value_and_grad(loss_fn)(params)           # forward pass sees w ⊙ mask
      updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
      params = optax.apply_updates(params, updates)
      masks = pruning.updated_masks(opt_state, masks)

  Language models carry the recurrent state of each of the B rows from one window to
  the next (truncated BPTT); the loss is the mean cross-entropy per token in nats. Speech
  models use ``optax.ctc_loss``, averaged over the utterances of the batch.
* **Devices**: data parallel over the ``data`` axis of a mesh of ``config.mesh.data``
  devices (:mod:`bsrnn.sharding`): batches and the LM carry are split by rows, params,
  masks and optimizer state replicated; the step is one ``jax.jit`` with these shardings.
  The losses match a one-device run up to float summation order. In a multi-process run
  (``launch.py --num_processes=...``) every process runs this function; only process 0
  writes ``metrics.jsonl``, TensorBoard files, ``config.json`` and ``report.json``.
* **Evaluation** every ``eval_every`` steps on the first eval split and at the end on all:
  loss and bits per character (character LMs), perplexity (word LMs), or CER and WER of
  greedy CTC transcripts (speech).
* **Sparse training** (``config.prune.sparse_training``, off by default): once the pruning
  schedule has ended the masks are frozen, and the steps after it run every recurrent layer
  on its kept blocks only (:mod:`bsrnn.kernels.sparse_training`; same params, masks and
  checkpoints; the pruned recurrent weights get a zero gradient instead of the
  straight-through one, which only the global gradient norm sees).
* **Checkpoints** (orbax ``CheckpointManager``, ``<workdir>/checkpoints``) every
  ``checkpoint_every`` steps and at the end: params, masks, optimizer and schedule state,
  the LM carry, the RNG, the data position and the wall time so far. A run started on a
  workdir that holds checkpoints resumes from the newest and gives the same numbers as an
  uninterrupted run. Orbax writes each checkpoint into a temporary folder and renames it
  when complete, so a crash or a kill during a save leaves the previous one intact.
  Restores place every array with the sharding of the current mesh, so a run may resume
  on a different number of devices.
* **Logs**: ``<workdir>/metrics.jsonl``, TensorBoard files in ``<workdir>/tensorboard``,
  per-layer sparsity every ``log_every`` steps, a progress bar with rate and ETA.
* **Report**: ``<workdir>/report.json`` (final metrics, sparsity overall and per layer,
  total and nonzero parameters, method, blocks, wall time, config), printed as a table, and
  ``<workdir>/masks.npz``, the final masks (:func:`bsrnn.report.load_masks` reads them).

A NaN or infinite loss (or gradient norm) stops the run with ``FloatingPointError``
before anything non-finite is saved; the last good checkpoint stays.
"""

from __future__ import annotations

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
from tqdm import tqdm

from bsrnn import blocks, ctc, data, input_pipeline, methods, models, pruning, report, sharding
from bsrnn.kernels import sparse_training


class CheckpointError(RuntimeError):
    """A checkpoint in the workdir cannot be restored; the message says what to do."""


@struct.dataclass
class TrainState:
    """Everything a run needs to go on from where it stopped.

    Attributes:
      step: int32 scalar, optimizer updates done.
      params: the model's params.
      masks: the ``masks`` collection (bool, one per prunable kernel).
      opt_state: the chain's state (optimizer moments, pruning counts, masks, thresholds).
      carry: language models: the recurrent carry of the B training rows; speech: ().
      rng: uint32 key data; step t uses ``fold_in(rng, t)`` for dropout.
    """

    step: jax.Array
    params: Any
    masks: Any
    opt_state: Any
    carry: Any
    rng: jax.Array


def create_model(config: ml_collections.ConfigDict, dataset: input_pipeline.Data) -> Any:
    """``bsrnn.models.<config.model_name>.Model(num_classes, **config.model)``, with P3's
    ``recurrent_modules`` from :func:`bsrnn.methods.recurrent_modules`."""
    module = models.model_module(config.model_name)
    size = {"lm": "vocab_size", "ds2": "num_classes"}[config.model_name]
    task = {"lm": "lm", "ds2": "ctc"}[config.model_name]
    if task != dataset.task:
        raise ValueError(
            f"config.model_name={config.model_name!r} models {task} data, but "
            f"config.data.name={config.data.name!r} is {dataset.task} data."
        )
    kwargs = dict(config.model)
    try:
        return module.Model(
            **{size: dataset.num_classes}, recurrent_modules=methods.recurrent_modules(config),
            **kwargs,
        )
    except TypeError as e:
        raise ValueError(f"config.model does not fit bsrnn.models.{config.model_name}: {e}") from e


def _model_inputs(batch: dict[str, Any], task: str) -> tuple[Any, ...]:
    return (batch["inputs"],) if task == "lm" else (batch["inputs"], batch["lengths"])


def initial_state(
    config: ml_collections.ConfigDict, model: Any, task: str, batch: dict[str, Any]
) -> tuple[TrainState, optax.GradientTransformationExtraArgs, optax.Schedule]:
    """Fresh params and masks (from ``config.seed``), the chain of ``config.method``."""
    rng = jax.random.key(config.seed)
    init_rng, rng = jax.random.split(rng)
    variables = model.init(init_rng, *_model_inputs(batch, task))
    params, masks = variables["params"], variables["masks"]
    tx, lr = methods.create_optimizer(config, masks)
    carry = model.initial_carry(config.batch_size) if task == "lm" else ()
    state = TrainState(
        step=jnp.zeros([], jnp.int32), params=params, masks=masks,
        opt_state=tx.init(params), carry=carry, rng=jax.random.key_data(rng),
    )
    return state, tx, lr


def _lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy in nats per token, (B, T, V), (B, T) -> (B, T)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _ctc_loss(logits: jax.Array, lengths: jax.Array, batch: dict[str, Any]) -> jax.Array:
    """Per-utterance CTC loss (B,), blank 0."""
    paddings = (jnp.arange(logits.shape[1])[None, :] >= lengths[:, None]).astype(jnp.float32)
    return optax.ctc_loss(logits, paddings, batch["labels"], batch["label_paddings"])


def train_step(
    state: TrainState, batch: dict[str, Any], *, model: Any, tx: Any, task: str
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update; see the module docstring. Returns the new state and the
    step's ``loss`` and ``grad_norm``."""
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
        variables = {"params": params, "masks": state.masks}
        rngs = {"dropout": dropout_rng}
        if task == "lm":
            logits, carry = model.apply(variables, batch["inputs"], state.carry, train=True,
                                        rngs=rngs)
            return _lm_loss(logits, batch["targets"]).mean(), carry
        logits, lengths = model.apply(variables, batch["inputs"], batch["lengths"], train=True,
                                      rngs=rngs)
        return _ctc_loss(logits, lengths, batch).mean(), state.carry

    (loss, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, masks=state.masks)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, masks=pruning.updated_masks(opt_state, state.masks),
        opt_state=opt_state, carry=jax.lax.stop_gradient(carry),
    )
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnames=("model",))
def _lm_eval_step(params, masks, carry, batch, model):
    logits, carry = model.apply({"params": params, "masks": masks}, batch["inputs"], carry)
    return _lm_loss(logits, batch["targets"]).sum(), carry


@functools.partial(jax.jit, static_argnames=("model",))
def _ctc_eval_step(params, masks, batch, model):
    logits, lengths = model.apply({"params": params, "masks": masks}, batch["inputs"],
                                  batch["lengths"])
    real = batch["lengths"] > 0
    loss = jnp.where(real, _ctc_loss(logits, lengths, batch), 0.0).sum()
    labels, label_lengths = ctc.greedy_decode(logits, lengths)
    return loss, real.sum(), labels, label_lengths


def evaluate(
    model: Any, params: Any, masks: Any, dataset: input_pipeline.Data,
    config: ml_collections.ConfigDict, split: str, mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
    """Metrics of the model on one pass over ``split``.

    Language models: ``loss`` (mean nats per token, the carry passed from window to
    window as in training), and ``bpc`` or ``perplexity``. Speech: ``loss`` (mean CTC loss
    per utterance), ``cer`` and ``wer`` of the greedy transcripts (fractions).
    With a ``mesh``, batches and the carry are split by rows over its ``data`` axis
    (``params`` and ``masks`` replicated on it); without, everything runs on one device.
    """
    batches = _progress(input_pipeline.eval_batches(dataset, config, split), f"eval {split}")

    def place(tree: Any) -> Any:
        return tree if mesh is None else sharding.put_batch(tree, mesh)

    if isinstance(dataset, input_pipeline.TextData):
        total, count = 0.0, 0
        carry = place(model.initial_carry(config.eval_batch_size))
        for batch in batches:
            loss, carry = _lm_eval_step(params, masks, carry, place(batch), model)
            total += float(loss)
            count += batch["targets"].size
        mean = total / count
        name, value = (
            ("bpc", data.bits_per_character(mean)) if dataset.unit == "char"
            else ("perplexity", data.perplexity(mean))
        )
        return {"loss": mean, name: value}
    total, count, references, hypotheses = 0.0, 0, [], []
    for batch in batches:
        loss, n, labels, lengths = _ctc_eval_step(params, masks, place(batch), model)
        total, count = total + float(loss), count + int(n)
        labels, lengths = sharding.to_host(labels), sharding.to_host(lengths)
        for b in range(int(n)):
            references.append("".join(dataset.vocab.decode(
                batch["labels"][b, : batch["label_lengths"][b]])))
            hypotheses.append("".join(dataset.vocab.decode(labels[b, : int(lengths[b])])))
    return {"loss": total / count, **ctc.error_rates(references, hypotheses)}


def _progress(iterable: Any, desc: str, **kwargs: Any) -> Any:
    """A tqdm bar on an interactive terminal; plain iteration otherwise."""
    return tqdm(iterable, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                disable=not sys.stderr.isatty(), **kwargs)


def _check_config(config: ml_collections.ConfigDict) -> None:
    for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "batch_size",
                "eval_batch_size"):
        if config[key] < 1:
            raise ValueError(f"config.{key}={config[key]} must be >= 1.")
    if config.checkpoint_every % config.log_every:
        raise ValueError(
            f"config.checkpoint_every={config.checkpoint_every} must be a multiple of "
            f"config.log_every={config.log_every}: a resumed run then logs the same averages "
            "as an uninterrupted one, and no checkpoint is saved before its loss is checked."
        )


def _checkpoint_manager(workdir: Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.get("max_checkpoints", 2), enable_async_checkpointing=False,
            create=True,
        ),
    )


def _restore(
    manager: ocp.CheckpointManager, state: TrainState
) -> tuple[TrainState, data.Position | None, float]:
    """The newest checkpoint's state, data position and wall time, or ``state`` if none.

    Every array is restored with the shape, dtype and sharding of ``state``'s (each process
    reads the slices of its own devices), whatever mesh the checkpoint was saved from.
    """
    step = manager.latest_step()
    if step is None:
        return state, None, 0.0
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore(),
        ))
    except Exception as e:  # orbax and tensorstore raise many kinds; all mean the same here
        older = [s for s in manager.all_steps() if s < step]
        folder = Path(manager.directory) / str(step)
        advice = (
            f"delete {folder} to resume from step {max(older)}" if older
            else "delete it to start again"
        )
        raise CheckpointError(
            f"the checkpoint of step {step} in {folder} is damaged and cannot be restored "
            f"({type(e).__name__}: {str(e)[:300]}). To go on, {advice}; or use a new --workdir."
        ) from e
    progress = restored.progress
    return restored.state, progress["position"], float(progress["wall_time_s"])


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
    if config.method not in ("wp", "bp", "gl", "glp") or "recurrent" not in (
            config.prune.layer_types):
        raise ValueError(
            "config.prune.sparse_training needs a pruning method (wp, bp, gl, glp) that prunes "
            f"recurrent kernels; got method {config.method!r}, layer types "
            f"{tuple(config.prune.layer_types)}."
        )
    return methods.schedule_steps(config)["end"] + 1


def _sparsity_scalars(layers: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {f"sparsity/{name}": entry["sparsity"] for name, entry in layers.items()}


def build_report(
    config: ml_collections.ConfigDict, workdir: Path, state: TrainState,
    metrics: dict[str, dict[str, float]], wall_time: float,
) -> dict[str, Any]:
    """The content of ``report.json`` (see the module docstring)."""
    params, masks = jax.device_get((state.params, state.masks))
    layer_type = methods.prunable_layer_type(masks, config.prune.layer_types)
    pruned = config.method in ("wp", "bp", "gl", "glp")
    return {
        "workdir": str(workdir),
        "model": f"{config.model_name} ({config.model.cell})",
        "data": config.data.name,
        "method": config.method,
        "block_shape": (
            {k: (1, 1) for k in config.prune.layer_types} if config.method == "wp"
            else {k: tuple(config.prune.block_shape[k]) for k in config.prune.layer_types}
        ) if pruned else {},
        "reduction": (
            {k: config.prune.reduction[k] for k in config.prune.layer_types}
            if pruned and config.method != "wp" else {}
        ),
        "recurrent_modules": methods.recurrent_modules(config),
        "steps": int(state.step),
        "metrics": metrics,
        "sparsity": report.layer_sparsity(params, masks, layer_type),
        "params": report.param_counts(params, masks),
        "weight_percentile_90": report.weight_percentiles(params, masks, layer_type),
        "wall_time_s": wall_time,
        "config": json.loads(config.to_json_best_effort()),
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Train, prune, evaluate, checkpoint and report; resume if ``workdir`` has checkpoints.

    Args:
      config: an experiment config (``experiments/configs``).
      workdir: where checkpoints, logs and ``report.json`` go.

    Returns:
      The final train state (``report.json`` holds the report).
    """
    started = time.time()
    workdir = Path(workdir)
    _check_config(config)
    mesh = sharding.create_mesh(config)
    primary = sharding.is_primary()
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = input_pipeline.load(config)
    model = create_model(config, dataset)
    task = dataset.task
    state, tx, learning_rate = initial_state(
        config, model, task, input_pipeline.example_batch(dataset, config)
    )
    shardings = sharding.state_shardings(state, mesh)
    state = sharding.put(state, shardings)
    layer_type = methods.prunable_layer_type(state.masks, config.prune.layer_types)

    manager = _checkpoint_manager(workdir, config)
    state, position, previous_time = _restore(manager, state)
    _check_recurrent_modules(state.masks, methods.recurrent_modules(config))
    start = int(state.step)
    if start:
        logging.info("Resuming %s from step %d.", workdir, start)
    logging.info("Data parallel over %d device(s) of %d process(es).", mesh.size,
                 jax.process_count())
    if primary:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    writer = report.MetricWriter(workdir, resume_step=start) if primary else _NoWriter()

    def jitted_step(model: Any) -> Any:
        return jax.jit(
            functools.partial(train_step, model=model, tx=tx, task=task),
            in_shardings=(shardings, sharding.batch_sharded(mesh)),
            out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0,
        )

    step_fn = jitted_step(model)
    sparse_from = _sparse_training_start(config)
    batches: Iterator = input_pipeline.train_batches(dataset, config, position)
    sums, count, window_start = None, 0, time.time()
    bar = _progress(range(start, config.num_steps), "train", initial=start,
                    total=config.num_steps)
    for step in bar:
        if sparse_from is not None and step == max(sparse_from, start):
            block_shape = (1, 1) if config.method == "wp" else config.prune.block_shape.recurrent
            frozen = sparse_training.freeze(state.masks, tuple(block_shape))
            logging.info("Masks frozen: steps from %d run the recurrences on their kept blocks.",
                         step)
            step_fn = jitted_step(model.clone(frozen_recurrent=frozen))
        batch, position = next(batches)
        state, step_metrics = step_fn(state, sharding.put_batch(batch, mesh))
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
                    "config.optimizer.grad_clip and run again on the same --workdir to resume."
                )
            rate = count / (time.time() - window_start)
            layers = report.layer_sparsity(state.params, state.masks, layer_type)
            scalars.update(learning_rate=float(learning_rate(step)), steps_per_second=rate,
                           **_sparsity_scalars(layers))
            writer.write(done, "train", scalars)
            logging.info(
                "step %d/%d: loss %.4f, sparsity %.1f%%, %.2f steps/s, ETA %s", done,
                config.num_steps, scalars["loss"], 100 * layers["total"]["sparsity"], rate,
                report.duration((config.num_steps - done) / rate),
            )
            sums, count, window_start = None, 0, time.time()
        if done % config.eval_every == 0 and not last:
            split = dataset.eval_splits[0]
            writer.write(done, split, evaluate(model, state.params, state.masks, dataset,
                                               config, split, mesh))
        if done % config.checkpoint_every == 0 or last:
            progress = {"position": position,
                        "wall_time_s": previous_time + time.time() - started}
            manager.save(done, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress),
            ))
    manager.wait_until_finished()

    final: dict[str, dict[str, float]] = {}
    last_train = _last_train_record(workdir / "metrics.jsonl") if primary else None
    if last_train:
        final["train"] = {k: last_train[k] for k in ("loss", "grad_norm")}
    for split in dataset.eval_splits:
        final[split] = evaluate(model, state.params, state.masks, dataset, config, split, mesh)
        writer.write(int(state.step), split, final[split])
    writer.close()
    if primary:
        result = build_report(config, workdir, state, final,
                              previous_time + time.time() - started)
        report.save_masks(workdir / "masks.npz", jax.device_get(state.masks))
        (workdir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        print(report.format_report(result), flush=True)
    return state


class _NoWriter:
    """The metric writer of processes other than 0: they compute the same numbers and log
    nothing."""

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        del step, split, scalars

    def close(self) -> None:
        pass


def _last_train_record(path: Path) -> dict[str, Any] | None:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    return train[-1] if train else None

