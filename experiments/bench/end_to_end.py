"""End to end: an exported model run by `bsrnn.inference` against the masked dense model.

Baseline: the masked dense Flax model the file describes (`bsrnn.inference.masked_dense`:
`model.apply` with every kernel dense and its mask), the same jitted loop and inputs; on a
GPU also cuDNN (torch.nn.GRU / LSTM / RNN with the same masked weights) for the language
model. One process, calls interleaved (sparse, dense, cudnn, sparse, ...), medians of
`--repeats`; each ratio is the baseline's time over the exported model's.

* LM sampling at batch 1: tokens per second, the state carried step to step inside one
  `lax.scan` (`bsrnn.inference.sample_tokens`), Gumbel-max sampling at temperature 0.8 on
  both sides; cuDNN: a Python loop of one-step `torch.nn.GRU` calls.
* The same with both sides' weights compiled into the program as constants
  (`compare_sampling(constants=True)`: XLA then folds the kernels' per-call index work).
* LM scoring: one forward pass over a (32, 100) batch, tokens per second.
* DS2 transcription (forward + greedy CTC decoding), batch 1 (a median-length utterance) and
  batch 32: utterances per second and real-time factor (compute seconds per second of
  audio, 100 frames a second). Two more columns, timed in the same loop, attribute the
  gain: the exported model with each bidirectional depth's directions run one after the
  other (`load(fuse_directions=False)`, only for a bidirectional model), the exported model
  with its forward depths run one after the other instead of as one wavefront
  (`load(wavefront=False)`, column "wavefront off"), and the same
  model exported with no block pruned (every block stored, 100% density) through the same
  engine (how much is sparsity, how much the engine).

Models: `--lm_model` / `--ds2_model` take exported files (a run's `<workdir>/model.npz`).
Without them the script builds **random** models in seconds and says so in every table: the
default Shakespeare GRU (256 units, embedding 64, 81 characters, 4x4 blocks, input 80% and
recurrent 92% pruned, softmax dense) and an AN4 DS2 GRU (`--ds2_features` units, 3 layers,
row convolution, every input, recurrent and fc kernel with 90% of its 16x16 blocks pruned at
random; unidirectional, as `experiments/configs/an4_ds2.py:gru`, unless
`--ds2_bidirectional`; `--ds2_cell=rnn_clipped_relu --ds2_bidirectional --ds2_features=256`
gives the shapes of `an4_ds2.py:rnn`, but with the GRU's row convolution). Speed does not
depend on the weights' values. Utterances are AN4's test set when
`--an4` (default `$BSRNN_DATA/an4`) exists, else random features of AN4's lengths (labelled).

CPU (this machine):

    PYTHONPATH=. python3 experiments/bench/end_to_end.py --lm_model=/tmp/sh/model.npz \
        --json=/tmp/e2e_cpu.json --markdown=/tmp/e2e_cpu.md

GPU (about 2 minutes on an H200):

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 experiments/bench/end_to_end.py \
        --json=$OUT/end_to_end_gpu.json --markdown=$OUT/end_to_end_gpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from bsrnn import configs, data, export, inference  # noqa: E402
from bsrnn.inference import speed  # noqa: E402
from bsrnn.kernels.bsc import BlockSparseMatrix  # noqa: E402
from bsrnn.models import ds2, lm  # noqa: E402

CHARS = [chr(c) for c in range(32, 112)] + ["\n"]  # 81 tokens, like Shakespeare's
AN4_ALPHABET = ["<blank>", " ", "'", *[chr(c) for c in range(65, 91)]]


def _random_block_masks(rng, masks, sparsity, block_shape):
    """Each mask: exactly round((1 - sparsity) * blocks) random blocks kept (at least 1)."""
    out = {}
    for path, mask in traverse_util.flatten_dict(masks).items():
        kind = "recurrent" if any(p.startswith("recurrent") for p in path) else (
            "input" if any(p.startswith("input") for p in path) else "fc")
        level = sparsity[kind] if isinstance(sparsity, dict) else sparsity
        if level is None:
            out[path] = np.ones(mask.shape, bool)
            continue
        rows, cols = mask.shape
        bh, bw = block_shape
        grid = (-(-rows // bh), -(-cols // bw))
        keep = np.zeros(grid[0] * grid[1], bool)
        keep[rng.permutation(keep.size)[: max(1, round((1 - level) * keep.size))]] = True
        out[path] = np.kron(keep.reshape(grid), np.ones(block_shape, bool))[:rows, :cols]
    return traverse_util.unflatten_dict(out)


def _write_random(path, model, example, sparsity, block_shape, info, seed):
    rng = np.random.default_rng(seed)
    variables = model.init(jax.random.key(seed), *example)
    masks = _random_block_masks(rng, variables["masks"], sparsity, block_shape)
    sparse_masks = {k: m for k, m in export._flatten(masks).items() if not m.all()}
    params = jax.device_get(variables["params"])
    exported = export.export_params(params, export._unflatten(sparse_masks), block_shape)
    export.save_npz(path, exported, model=info)
    return path


def random_lm(folder: Path, seed: int = 0) -> Path:
    """The default Shakespeare model's shapes, random weights and 4x4 block masks."""
    kwargs = dict(vocab_size=len(CHARS), cell="gru", features=256, num_layers=1,
                  embed_dim=64, mask_output=True)
    info = dict(name="lm", kwargs=kwargs, unit="char", data="random", step=0, metrics={},
                vocab={"tokens": CHARS, "unk": None})
    return _write_random(folder / "random_lm.npz", lm.Model(**kwargs),
                         (jnp.zeros((1, 4), jnp.int32),),
                         {"input": 0.8, "recurrent": 0.92, "fc": None}, (4, 4), info, seed)


def random_ds2(folder: Path, features: int, seed: int = 0, *, cell: str = "gru",
               bidirectional: bool = False, input_norm: bool = False) -> Path:
    """An AN4 DS2 GRU (configs/an4_ds2.py:gru shapes; `cell`, `bidirectional`, `input_norm`
    change those), random weights, 90% of 16x16 blocks."""
    kwargs = dict(num_classes=len(AN4_ALPHABET), conv_features=(32, 32),
                  conv_kernels=((11, 5), (11, 5)), conv_strides=((2, 2), (1, 2)), cell=cell,
                  features=features, num_layers=3, bidirectional=bidirectional,
                  row_conv_context=10, fc_features=features, mask_fc=True, mask_output=True,
                  unroll=4, input_norm=input_norm)
    info = dict(name="ds2", kwargs=kwargs, data="random", step=0, metrics={},
                vocab={"tokens": AN4_ALPHABET, "unk": None},
                features={"kind": "mfc", "num_mels": 13, "mean": [0.0] * 13,
                          "std": [1.0] * 13})
    example = (jnp.zeros((1, 64, 13)), jnp.full((1,), 64, jnp.int32))
    return _write_random(folder / "random_ds2.npz", ds2.Model(**kwargs), example, 0.9,
                         (16, 16), info, seed)


def unpruned_copy(path: Path, folder: Path) -> Path:
    """The model of `path` exported again with every block kept: each kernel the file
    stores block-sparse is stored block-sparse at 100% density (its pruned entries are
    zero, which does not change the speed), so the same engine runs the unpruned model."""
    params, info, _ = export.load_file(path)
    _, variables = inference.masked_dense(path)
    blocks = {leaf.block_shape for leaf in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, BlockSparseMatrix))
        if isinstance(leaf, BlockSparseMatrix)}
    masks = jax.tree_util.tree_map(lambda m: np.ones(np.shape(m), bool), variables["masks"])
    exported = export.export_params(variables["params"], masks,
                                    blocks.pop() if len(blocks) == 1 else (16, 16))
    out = folder / f"{Path(path).stem}_unpruned.npz"
    export.save_npz(out, exported, model=info)
    return out


def utterances(an4: str, count: int = 32, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """AN4 test features (normalised), or random ones of AN4-like lengths."""
    if Path(an4).is_dir():
        corpus, _ = data.normalize_corpus(data.SPEECH_LOADERS["an4"](an4))
        return [u.features for u in corpus.test[:count]], f"AN4 test ({an4})"
    rng = np.random.default_rng(seed)
    lengths = rng.integers(69, 640, count)
    return ([rng.normal(0, 1, (int(n), 13)).astype(np.float32) for n in lengths],
            "random features, AN4 lengths 69-639 frames")


# ----------------------------------------------------------------------------------------
# cuDNN (torch) baselines for the language model.


def _torch_lm(model, variables):
    """torch Embedding + GRU/LSTM/RNN (cuDNN) + Linear on the GPU with the masked weights."""
    import torch

    params = jax.device_get(variables["params"])
    masks = jax.device_get(variables["masks"])

    def masked(*path):
        """The kernel at params[path...]["kernel"], times its mask where it has one."""
        kernel, mask = params, masks
        for key in (*path, "kernel"):
            kernel, mask = kernel[key], (mask or {}).get(key)
        kernel = np.asarray(kernel)
        return kernel if mask is None else np.where(mask, kernel, 0)

    gates = {"gru": "rzn", "lstm": "ifgo", "rnn": "h"}[model.cell]
    cls = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM, "rnn": torch.nn.RNN}[model.cell]
    rnn = cls(model.embed_dim, model.features, model.num_layers, batch_first=True).cuda()
    with torch.no_grad():
        for i in range(model.num_layers):
            layer = f"layer_{i}"
            w_ih = np.concatenate([masked(layer, f"input_{g}") for g in gates], 1).T
            w_hh = np.concatenate([masked(layer, f"recurrent_{g}") for g in gates], 1).T
            b_ih = np.concatenate([params[layer][f"input_{g}"]["bias"] for g in gates])
            b_hh = np.concatenate([params[layer][f"recurrent_{g}"]["bias"] for g in gates])
            for name, value in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih),
                                ("bias_hh", b_hh)):
                getattr(rnn, f"{name}_l{i}").copy_(torch.from_numpy(np.ascontiguousarray(value)))
    embed = torch.from_numpy(np.asarray(params["embed"]["embedding"])).cuda()
    out_w = torch.from_numpy(np.ascontiguousarray(masked("output"))).cuda()
    out_b = torch.from_numpy(np.asarray(params["output"]["bias"])).cuda()
    return torch, rnn, embed, out_w, out_b


def cudnn_fns(model, variables, tokens, length, vocab_size):
    """(sampling fn, scoring fn) on cuDNN, each synchronising before it returns."""
    torch, rnn, embed, out_w, out_b = _torch_lm(model, variables)
    scoring_tokens = torch.from_numpy(np.asarray(tokens)).long().cuda()
    noise = torch.from_numpy(np.asarray(jax.random.gumbel(
        jax.random.key(0), (length, 1, vocab_size)))).cuda()

    @torch.no_grad()
    def sample():
        token, state = torch.zeros((1, 1), dtype=torch.long, device="cuda"), None
        for t in range(length):
            out, state = rnn(embed[token], state)
            token = torch.argmax((out[:, -1] @ out_w + out_b) / 0.8 + noise[t], -1)[:, None]
        torch.cuda.synchronize()

    @torch.no_grad()
    def score():
        out, _ = rnn(embed[scoring_tokens])
        _ = out @ out_w + out_b
        torch.cuda.synchronize()

    return sample, score


# ----------------------------------------------------------------------------------------


def _with_cudnn(result, cudnn_fn, sparse_fn, units, repeats, name):
    """Adds cuDNN's rate and the exported model's ratio to it, timed against `sparse_fn`."""
    seconds = speed.interleaved_medians({"sparse": sparse_fn, "cudnn": cudnn_fn}, repeats)
    result[f"cudnn_{name}"] = units / seconds["cudnn"]
    result["speedup_vs_cudnn"] = seconds["cudnn"] / seconds["sparse"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm_model", help="exported LM (.npz); default: random default-size")
    parser.add_argument("--ds2_model", help="exported DS2 (.npz); default: random AN4 GRU")
    parser.add_argument("--ds2_features", type=int, default=512,
                        help="units of the random DS2 GRU")
    parser.add_argument("--ds2_cell", default="gru", help="cell of the random DS2 model")
    parser.add_argument("--ds2_input_norm", action="store_true",
                        help="layer norm on the recurrent input projections (the AN4 RNN "
                        "config's default)")
    parser.add_argument("--ds2_bidirectional", action="store_true",
                        help="random DS2 model with bidirectional layers")
    parser.add_argument("--ds2_batches", default="1,32", help="DS2 batch sizes timed")
    parser.add_argument("--ds2_dtype", default=None,
                        help="computation dtype of the exported DS2 model (float16, ...); "
                        "the masked dense model stays float32")
    parser.add_argument("--an4", default=configs.data_path("an4"), help="AN4 folder")
    parser.add_argument("--length", type=int, default=2000, help="tokens sampled per call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip", default="",
                        help="comma-separated: lm, ds2, and the DS2 columns unpruned, separate, "
                        "layered")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    try:
        import torch
        cuda = backend == "gpu" and torch.cuda.is_available()
    except ImportError:
        cuda = False
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    results = {"backend": backend, "device": device, "jax": jax.__version__,
               "python": platform.python_version(), "commit": commit,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "lm": {}, "ds2": {}}
    skip = set(filter(None, args.skip.split(",")))
    folder = Path(tempfile.mkdtemp(prefix="bsrnn_e2e_"))

    if "lm" not in skip:
        path = Path(args.lm_model) if args.lm_model else random_lm(folder)
        exported = inference.load(path)
        model, variables = inference.masked_dense(path)
        results["lm"]["model"] = str(path) if args.lm_model else "RANDOM weights and masks"
        results["lm"]["sizes"] = dict(export.size_report(export.load_npz(path))._asdict())
        print(f"LM {results['lm']['model']}: sampling {args.length} tokens, batch 1", flush=True)
        sampling = speed.compare_sampling(exported, model, variables, length=args.length,
                                          repeats=args.repeats)
        baked = speed.compare_sampling(exported, model, variables, length=args.length,
                                       repeats=args.repeats, constants=True)
        tokens = np.random.default_rng(0).integers(0, len(exported.vocab), (32, 100))
        print("LM: scoring (32, 100)", flush=True)
        scoring = speed.compare_scoring(exported, model, variables, tokens,
                                        repeats=args.repeats)
        if cuda and model.cell in ("gru", "lstm", "rnn") and not model.tie_embeddings:
            sample_c, score_c = cudnn_fns(model, variables, tokens, args.length,
                                          len(exported.vocab))
            ids = exported.encode(exported.default_prompt())
            prompt = jnp.asarray(ids, jnp.int32)[None]
            noise = jax.random.gumbel(jax.random.key(0), (args.length, 1, len(exported.vocab)))
            weights = exported.sampling_weights(1, args.length)
            _with_cudnn(sampling, sample_c, lambda: exported.sampler(
                weights, prompt, None, noise, temperature=0.8), args.length,
                args.repeats, "tokens_per_s")
            forward = jax.jit(inference.lm_forward)
            weights = exported.weights_for(*tokens.shape)
            _with_cudnn(scoring, score_c, lambda: forward(weights, tokens)[0],
                        tokens.size, args.repeats, "tokens_per_s")
        results["lm"].update(sampling_b1=sampling, sampling_b1_constants=baked,
                             scoring_b32_t100=scoring)

    if "ds2" not in skip:
        path = Path(args.ds2_model) if args.ds2_model else random_ds2(
            folder, args.ds2_features, cell=args.ds2_cell,
            bidirectional=args.ds2_bidirectional, input_norm=args.ds2_input_norm)
        exported = inference.load(path, dtype=args.ds2_dtype)
        others = {}
        if "unpruned" not in skip:
            others["unpruned"] = inference.load(unpruned_copy(path, folder),
                                                dtype=args.ds2_dtype)
        if "separate" not in skip and any(isinstance(d, inference.Bidirectional)
                                          for d in exported.weights.layers):
            others["separate"] = inference.load(path, fuse_directions=False,
                                                dtype=args.ds2_dtype)
        if "layered" not in skip and any(isinstance(d, inference.Wavefront)
                                         for d in exported.weights.layers):
            others["layered"] = inference.load(path, wavefront=False, dtype=args.ds2_dtype)
        model, variables = inference.masked_dense(path)
        feats, source = utterances(args.an4)
        kwargs = exported.info["kwargs"]
        results["ds2"]["model"] = str(path) if args.ds2_model else (
            f"RANDOM DS2 {args.ds2_cell} {args.ds2_features}x3"
            f"{' bidirectional' if args.ds2_bidirectional else ''}"
            f"{' input_norm' if args.ds2_input_norm else ''}, 90% of 16x16 blocks")
        results["ds2"]["dtype"] = str(exported.weights.fc.kernel.dtype)
        results["ds2"]["bidirectional"] = bool(kwargs.get("bidirectional", True))
        results["ds2"]["utterances"] = source
        median = sorted(feats, key=len)[len(feats) // 2]
        for batch in (int(b) for b in args.ds2_batches.split(",")):
            chosen = [median] if batch == 1 else feats[:batch]
            print(f"DS2: transcribing a batch of {len(chosen)}", flush=True)
            results["ds2"][f"batch_{batch}"] = speed.compare_transcription(
                exported, model, variables, chosen, repeats=args.repeats, others=others)
            results["ds2"][f"batch_{batch}"]["frames"] = int(sum(len(f) for f in chosen))
            shape = data.pad_sequences(chosen, multiple=exported.pad_multiple)[0].shape[:2]
            for name, m in {"sparse": exported, **others}.items():
                results["ds2"][f"batch_{batch}"][f"{name}_impls"] = _impls(
                    m.weights_for_frames(*shape))

    text = markdown(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


def _impls(weights: inference.DS2Weights) -> list[str]:
    """What each recurrent depth ran: the fused impl, or each direction's."""
    out = []
    for depth in weights.layers:
        if isinstance(depth, inference.Wavefront):
            if depth.impl != "separate":
                out.append(f"{depth.impl} ({len(depth.layers)} layers)")
                continue
            out.extend(layer.impl for layer in depth.layers)
            continue
        if isinstance(depth, inference.Bidirectional):
            if depth.impl != "separate":
                out.append(f"{depth.impl} (fused)")
                continue
            depth = (depth.forward, depth.backward)
        out.append("+".join(layer.impl if layer.sparse is not None else "masked dense"
                            for layer in depth))
    return out


def markdown(results: dict) -> str:
    """The results as markdown tables (ratio = baseline time / exported model's time)."""
    lines = [f"end to end, {results['backend']} ({results['device']}), jax {results['jax']}, "
             f"commit {results['commit']}, {results['date']}", ""]
    lm_results = results["lm"]
    if lm_results:
        lines += [f"LM: {lm_results['model']} (file weights {lm_results['sizes']['ratio']:.1%} "
                  "of dense fp32)", "",
                  "| task | exported sparse | masked dense | ratio | cuDNN | ratio |",
                  "|---|---|---|---|---|---|"]
        for key, label in (("sampling_b1", "sampling, B = 1 (tokens/s)"),
                           ("sampling_b1_constants", "sampling, B = 1, weights compiled in"),
                           ("scoring_b32_t100", "scoring, (32, 100) (tokens/s)")):
            r = lm_results[key]
            cudnn = (f"{r['cudnn_tokens_per_s']:,.0f} | {r['speedup_vs_cudnn']:.2f}x"
                     if "cudnn_tokens_per_s" in r else "n/a | n/a")
            lines.append(f"| {label} | {r['sparse_tokens_per_s']:,.0f} | "
                         f"{r['dense_tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {cudnn} |")
        lines.append("")
    ds2_results = results["ds2"]
    if ds2_results:
        lines += [f"DS2: {ds2_results['model']}; exported model computes in "
                  f"{ds2_results['dtype']}, masked dense in float32; utterances: "
                  f"{ds2_results['utterances']}", "",
                  "utt/s, RTF (ratio: masked dense time / that column's time); 'directions "
                  "separate': the exported model with its bidirectional depths' directions run "
                  "one after the other; 'wavefront off': its forward depths run one after the "
                  "other (`load(wavefront=False)`); 'no block pruned': the same model at 100% "
                  "density through the same engine", "",
                  "| batch | exported sparse | directions separate | wavefront off | "
                  "no block pruned | masked dense | ratio | ratio, separate | ratio, wavefront "
                  "off | ratio, unpruned | recurrent impls |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]

        def cell(r, side):
            if f"{side}_utterances_per_s" not in r:
                return "n/a"
            return (f"{r[f'{side}_utterances_per_s']:,.1f}, "
                    f"{r[f'{side}_real_time_factor']:.4f}")

        for key in sorted((k for k in ds2_results if k.startswith("batch_")),
                          key=lambda k: int(k.split("_")[1])):
            r = ds2_results[key]
            ratios = [f"{r[k]:.2f}x" if k in r else "n/a"
                      for k in ("speedup", "separate_speedup", "layered_speedup",
                                "unpruned_speedup")]
            lines.append(
                f"| {key.split('_')[1]} | {cell(r, 'sparse')} | {cell(r, 'separate')} | "
                f"{cell(r, 'layered')} | {cell(r, 'unpruned')} | {cell(r, 'dense')} | "
                f"{' | '.join(ratios)} | "
                f"{', '.join(r.get('sparse_impls', []))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
