"""Side-by-side speed of an exported model against the masked dense Flax model.

One process, the same jitted loop on both sides (only the model differs), calls interleaved
(sparse, dense, sparse, ...), medians. What a run reports (`report.json`'s `export` entry)
and what `experiments/bench/end_to_end.py` measures.

* `compare_sampling`: language-model sampling, the carry passed step to step inside one
  `lax.scan` (`bsrnn.inference.sample_tokens`), tokens per second.
* `compare_scoring`: one forward pass over a (B, T) batch, tokens per second.
* `compare_transcription`: DS2 forward and greedy CTC decoding of a padded batch, utterances
  per second and the real-time factor (seconds of compute per second of audio).
* `compare_run`: what a run reports of its exported model (`bsrnn.train.export_model`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bsrnn import ctc
from bsrnn.inference import LanguageModel, SpeechModel, ds2_forward, lm_forward, sample_tokens


def interleaved_medians(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each function (results blocked on), calls interleaved.

    Each function is called once first (compilation, not timed).
    """
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _flax_lm_forward(model: Any) -> Callable:
    def forward(variables, tokens, carry):
        return model.apply(variables, tokens, carry)

    return forward


def _rates(seconds: Mapping[str, float], units: float, name: str) -> dict[str, float]:
    out = {f"{side}_{name}": units / s for side, s in seconds.items()}
    out["speedup"] = seconds["dense"] / seconds["sparse"]
    return out


def compare_sampling(
    exported: LanguageModel, model: Any, variables: Mapping, *, length: int = 1000,
    batch_size: int = 1, repeats: int = 5, prompt: str = "", temperature: float = 0.8,
    constants: bool = False,
) -> dict[str, float]:
    """Sampling `length` tokens at `batch_size` rows: exported sparse model against the Flax
    `model` with `variables` ({"params", "masks"}), the same loop and noise.

    The sparse side calls `exported.sampler`, so `exported.sample` with the same length,
    prompt and temperature afterwards reuses its compiled loop. With `constants`, both sides
    instead compile their weights into the program as constants (XLA then folds the
    kernels' index arithmetic, which it does not hoist out of the loop when the weights are
    arguments).

    Returns:
      `sparse_tokens_per_s`, `dense_tokens_per_s` (tokens of all rows) and `speedup`
      (dense time / sparse time).
    """
    ids = exported.encode(prompt or exported.default_prompt())
    prompt_ids = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (batch_size, ids.size))
    noise = jax.random.gumbel(jax.random.key(0), (length, batch_size, len(exported.vocab)))
    dense = jax.jit(functools.partial(sample_tokens, _flax_lm_forward(model)),
                    static_argnames="temperature")
    if constants:
        def baked(forward, weights):
            return jax.jit(lambda p, n: sample_tokens(forward, weights, p, None, n, temperature))

        sparse_fn = baked(lm_forward, exported.sampling_weights(batch_size, length))
        dense_fn = baked(_flax_lm_forward(model), dict(variables))
        fns = {"sparse": functools.partial(sparse_fn, prompt_ids, noise),
               "dense": functools.partial(dense_fn, prompt_ids, noise)}
    else:
        weights = exported.sampling_weights(batch_size, length)
        fns = {"sparse": functools.partial(exported.sampler, weights, prompt_ids, None, noise,
                                           temperature=temperature),
               "dense": functools.partial(dense, dict(variables), prompt_ids, None, noise,
                                          temperature=temperature)}
    return _rates(interleaved_medians(fns, repeats), length * batch_size, "tokens_per_s")


def compare_scoring(
    exported: LanguageModel, model: Any, variables: Mapping, tokens: np.ndarray, *,
    repeats: int = 5,
) -> dict[str, float]:
    """Logits of a (B, T) token batch in one pass: `sparse_tokens_per_s`,
    `dense_tokens_per_s`, `speedup`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    sparse = jax.jit(lm_forward)
    dense = jax.jit(_flax_lm_forward(model))
    weights = exported.weights_for(*tokens.shape)
    fns = {"sparse": lambda: sparse(weights, tokens, None)[0],
           "dense": lambda: dense(dict(variables), tokens, None)[0]}
    return _rates(interleaved_medians(fns, repeats), tokens.size, "tokens_per_s")


def compare_transcription(
    exported: SpeechModel, model: Any, variables: Mapping, features: list[np.ndarray], *,
    frames_per_second: float = 100.0, repeats: int = 5,
    others: Mapping[str, SpeechModel] | None = None,
) -> dict[str, float]:
    """Greedy CTC transcripts of one padded batch of normalised (T_i, F) features.

    ``others``: more exported models (e.g. loaded with `fuse_directions=False`, or the
    same model unpruned) timed in the same interleaved loop, by name.

    Returns:
      `sparse_utterances_per_s`, `dense_utterances_per_s`, `speedup`, and
      `sparse_real_time_factor`, `dense_real_time_factor` (compute seconds per second of
      audio, `frames_per_second` frames a second: AN4's cepstra are 100 per second); for
      each of ``others`` `<name>_utterances_per_s`, `<name>_real_time_factor` and
      `<name>_speedup` (dense time / its time).
    """
    from bsrnn import data

    padded, lengths = data.pad_sequences(features, multiple=exported.pad_multiple)
    padded, lengths = jnp.asarray(padded), jnp.asarray(lengths)

    def sparse(weights, x, n):
        return ctc.greedy_decode(*ds2_forward(weights, x, n))

    def dense(variables, x, n):
        return ctc.greedy_decode(*model.apply(variables, x, n))

    sparse, dense = jax.jit(sparse), jax.jit(dense)
    weights = exported.weights_for_frames(*padded.shape[:2])
    fns = {"sparse": lambda: sparse(weights, padded, lengths),
           "dense": lambda: dense(dict(variables), padded, lengths)}
    for name, other in (others or {}).items():
        if name in fns:
            raise ValueError(f"others may not be named {sorted(fns)}, got {name!r}")
        fns[name] = functools.partial(sparse, other.weights_for_frames(*padded.shape[:2]),
                                      padded, lengths)
    seconds = interleaved_medians(fns, repeats)
    out = _rates(seconds, len(features), "utterances_per_s")
    out.update({f"{name}_speedup": seconds["dense"] / seconds[name] for name in others or {}})
    audio = float(np.sum([len(f) for f in features])) / frames_per_second
    out.update({f"{side}_real_time_factor": s / audio for side, s in seconds.items()})
    return out


def compare_run(
    exported: LanguageModel | SpeechModel, model: Any, variables: Mapping, dataset: Any,
    config: Any,
) -> dict[str, Any]:
    """What a training run reports of its exported model, timed against the Flax `model`.

    Language models sample 600 tokens at temperature 0.8 (seed `config.seed`; the first 4
    lines are kept) and time sampling at batch 1 (`compare_sampling`); speech models
    transcribe 3 test utterances of `dataset` and time one batch of `config.eval_batch_size`
    of them (`compare_transcription`).

    Returns:
      `timed` (what was timed, in words), `inference` (the comparison's numbers) and
      `samples` (lines of text, or "transcript -> transcription").
    """
    if isinstance(exported, LanguageModel):
        measured = compare_sampling(exported, model, variables, length=600)
        text = exported.sample(600, temperature=0.8, seed=config.seed)
        return {"timed": "sampling 600 tokens at batch 1", "inference": measured,
                "samples": text.strip("\n").split("\n")[:4]}
    test = dataset.corpus.test[: config.eval_batch_size]
    samples = [f"{u.transcript} -> {t}" for u, t in zip(
        test[:3], exported.transcribe_features([u.features for u in test[:3]]), strict=True)]
    measured = compare_transcription(exported, model, variables, [u.features for u in test])
    return {"timed": f"transcribing a batch of {len(test)} test utterances",
            "inference": measured, "samples": samples}
