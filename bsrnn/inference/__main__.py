"""The command line of `bsrnn.inference`: sample, transcribe, evaluate an exported model.

  python -m bsrnn.inference sample --model=/tmp/run/model.npz --length=300 \
      --temperature=0.8 --prompt="ROMEO:" --seed=0
  python -m bsrnn.inference transcribe --model=/tmp/an4/model.npz a.mfc b.mfc ...
  python -m bsrnn.inference evaluate --model=/tmp/run/model.npz --config=/tmp/run/config.json

`--config` takes a run's `config.json` or a config file (`experiments/configs/x.py[:arg]`);
`--data_path` points it at the data elsewhere. Every command takes `--impl` (auto, dense,
xla, pallas, pallas_interpret), `--dtype` (computation dtype) and `--device` (cpu, gpu, tpu).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import jax
import ml_collections


def _config(spec: str, data_path: str | None) -> ml_collections.ConfigDict:
    """A run's config.json, or `file.py[:arg]`'s `get_config(arg)`."""
    path, _, arg = spec.partition(":") if not spec.endswith(".json") else (spec, "", "")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config={spec}: {file} is not a file; pass a run's "
                                "config.json or a config file such as "
                                "experiments/configs/shakespeare_gru.py")
    if file.suffix == ".json":
        config = ml_collections.ConfigDict(json.loads(file.read_text()))
    else:
        module_spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(arg or None)
    if data_path is not None:
        config.data.path = data_path
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bsrnn.inference", description="Run a model exported by bsrnn.export.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="the exported .npz (a run's model.npz)")
    common.add_argument("--impl", default="auto",
                        choices=("auto", "dense", "xla", "pallas", "pallas_interpret"),
                        help="kernels: auto (block-sparse where stored so), dense (masked "
                             "dense baseline), or one implementation forced")
    common.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="computation dtype (default float32 on CPUs, else the file's)")
    common.add_argument("--device", choices=("cpu", "gpu", "tpu"),
                        help="JAX platform to run on (default: JAX's choice)")
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", parents=[common], help="text from a language model")
    sample.add_argument("--length", type=int, default=200, help="tokens to sample")
    sample.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature; 0 takes the most likely token")
    sample.add_argument("--prompt", default="", help="text to continue (default: a new line)")
    sample.add_argument("--seed", type=int, default=0)
    transcribe = commands.add_parser("transcribe", parents=[common],
                                     help="greedy CTC transcripts of .mfc / .wav files")
    transcribe.add_argument("files", nargs="+")
    transcribe.add_argument("--batch_size", type=int, default=32)
    evaluate = commands.add_parser("evaluate", parents=[common],
                                   help="the test metrics from the exported file alone")
    evaluate.add_argument("--config", required=True,
                          help="a run's config.json or experiments/configs/x.py[:arg]")
    evaluate.add_argument("--data_path", help="override config.data.path")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line (module docstring) and run it."""
    args = _parser().parse_args(argv)
    if args.device:
        jax.config.update("jax_platforms", args.device)
    from bsrnn import data, inference, train  # after the platform is chosen

    try:
        model = inference.load(args.model, impl=args.impl, dtype=args.dtype)
        if args.command == "sample":
            if not isinstance(model, inference.LanguageModel):
                raise ValueError(f"{args.model} is a speech model; use transcribe")
            if args.length < 1:
                raise ValueError(f"--length must be >= 1, got {args.length}")
            prompt = args.prompt or model.default_prompt()
            text = model.sample(args.length, temperature=args.temperature, prompt=prompt,
                                seed=args.seed)
            print((args.prompt or "") + text)
        elif args.command == "transcribe":
            if not isinstance(model, inference.SpeechModel):
                raise ValueError(f"{args.model} is a language model; use sample")
            for start in range(0, len(args.files), args.batch_size):
                chunk = args.files[start:start + args.batch_size]
                for path, text in zip(chunk, model.transcribe(chunk), strict=True):
                    print(f"{path}\t{text}")
        else:
            config = _config(args.config, args.data_path)
            dataset = data.load(config)
            recorded = model.info.get("metrics", {})
            weights = model.weights  # speech batches vary in length: auto falls back there
            if isinstance(model, inference.LanguageModel):  # windows of one shape: measured
                weights = model.weights_for(config.eval_batch_size, config.seq_len)
            for split in dataset.eval_splits:
                metrics = train.evaluate(model, weights, None, dataset, config, split)
                for name, value in metrics.items():
                    was = recorded.get(split, {}).get(name)
                    note = f" (report: {was:.6f})" if was is not None else ""
                    print(f"{split} {name} {value:.6f}{note}")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
