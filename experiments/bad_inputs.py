"""Issue 16's bad inputs, tried through the Python API on a tiny text corpus: prints a
markdown table of each case and the first line of what it now gives (WORKSPACE.md).

  PYTHONPATH=. python3 experiments/bad_inputs.py --out=/tmp/bad_inputs.md   # ~3 min, 2 CPUs
"""

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_lm_config, write_tiny_an4, write_tiny_text  # noqa: E402

from bsrnn import configs, data, train  # noqa: E402
from bsrnn import workdir as workdir_lib  # noqa: E402


def outcome(fn) -> str:
    try:
        result = fn()
    except Exception as e:  # the point: which kind, and what it says
        return f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    return result if isinstance(result, str) else "ran"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    text = write_tiny_text(root / "tiny.txt")
    base = root / "base"
    train.train_and_evaluate(tiny_lm_config(text, steps=8), base)

    def resumed(mutate, allow=(), drop_config=False, steps=8):
        w = root / f"w{len(list(root.iterdir()))}"
        shutil.copytree(base, w)
        if drop_config:
            (w / "config.json").unlink()
        config = tiny_lm_config(text, steps=steps)
        mutate(config)
        train.train_and_evaluate(config, w, allow_changes=allow)
        report = json.loads((w / "report.json").read_text())
        return f"ran; config_changes {report['config_changes']}"

    def setting(mutate, workdir=None):
        config = tiny_lm_config(text)
        mutate(config)
        train.train_and_evaluate(config, workdir if workdir is not None else root / "s")

    def damaged_newest():
        w = root / "dmg"
        shutil.copytree(base, w)
        victim = max((f for f in (w / "checkpoints/8/state").rglob("*") if "/d/" in str(f)
                      and f.is_file()), key=lambda f: f.stat().st_size)
        raw = bytearray(victim.read_bytes())
        raw[100:164] = bytes(b ^ 0xFF for b in raw[100:164])
        victim.write_bytes(bytes(raw))
        train.train_and_evaluate(tiny_lm_config(text, steps=8), w)
        report = json.loads((w / "report.json").read_text())
        return f"ran; skipped_checkpoints {report['skipped_checkpoints'][0]['problems']}"

    def live_lock():
        w = root / "lock"
        shutil.copytree(base, w)
        with workdir_lib.Lock(w):
            train.train_and_evaluate(tiny_lm_config(text, steps=8), w)

    def mfc(values):
        an4 = write_tiny_an4(root / f"an4_{len(list(root.iterdir()))}", 6, 2)
        frames = np.asarray(values, ">f4")
        (an4 / "feat/an4_train/spk1/utt4.mfc").write_bytes(
            struct.pack(">i", frames.size) + frames.tobytes())
        data.load_an4(an4)

    rng = np.random.default_rng(0)
    a_file = root / "a_file"
    a_file.write_text("x")
    cases = [
        ("resume, model.features 16 -> 24", lambda: resumed(
            lambda c: c.model.update(features=24))),
        ("resume, features 24, no config.json", lambda: resumed(
            lambda c: c.model.update(features=24), drop_config=True)),
        ("resume, seed 0 -> 1", lambda: resumed(lambda c: c.update(seed=1))),
        ("resume, method bp -> wp", lambda: resumed(lambda c: c.update(method="wp"))),
        ("resume, block 4x4 -> 8x8", lambda: resumed(
            lambda c: c.prune.block_shape.update(recurrent=(8, 8)))),
        ("resume, learning rate 0.03 -> 0.01", lambda: resumed(
            lambda c: c.optimizer.update(learning_rate=1e-2))),
        ("resume, lr changed, --allow_changes", lambda: resumed(
            lambda c: c.optimizer.update(learning_rate=1e-2),
            allow=("optimizer.learning_rate",), steps=10)),
        ("resume, num_steps 8 -> 10, log_every 2 -> 1", lambda: resumed(
            lambda c: c.update(log_every=1), steps=10)),
        ("resume, num_steps 8 -> 6", lambda: resumed(lambda c: None, steps=6)),
        ("resume, --allow_changes=model.features", lambda: resumed(
            lambda c: None, allow=("model.features",))),
        ("newest checkpoint: 64 flipped bytes", damaged_newest),
        ("workdir in use by a live process", live_lock),
        ("--workdir= (empty)", lambda: setting(lambda c: None, workdir="")),
        ("--workdir is a regular file", lambda: setting(lambda c: None, workdir=a_file)),
        ("--workdir below a regular file", lambda: setting(lambda c: None,
                                                           workdir=a_file / "w")),
        ("max_checkpoints=0", lambda: setting(lambda c: c.update(max_checkpoints=0))),
        ("max_checkpoints=-1", lambda: setting(lambda c: c.update(max_checkpoints=-1))),
        ("learning_rate=-1e-3", lambda: setting(lambda c: c.optimizer.update(
            learning_rate=-1e-3))),
        ("learning_rate=0", lambda: setting(lambda c: c.optimizer.update(learning_rate=0.0))),
        ("grad_clip=-1", lambda: setting(lambda c: c.optimizer.update(grad_clip=-1.0))),
        ("seq_len=0", lambda: setting(lambda c: c.update(seq_len=0))),
        ("seq_len=-4", lambda: setting(lambda c: c.update(seq_len=-4))),
        ("model.features=0", lambda: setting(lambda c: c.model.update(features=0))),
        ("model.features=-8", lambda: setting(lambda c: c.model.update(features=-8))),
        ("model.num_layers=0", lambda: setting(lambda c: c.model.update(num_layers=0))),
        ("model.dropout=1.5", lambda: setting(lambda c: c.model.update(dropout=1.5))),
        ("eval_batch_size=5000 (corpus too small)", lambda: setting(
            lambda c: c.update(eval_batch_size=5000))),
        ("batch_size=100000 (corpus too small)", lambda: setting(
            lambda c: c.update(batch_size=100000))),
        ("prune only fc, softmax unmasked", lambda: setting(lambda c: (
            c.prune.update(layer_types=("fc",)), c.model.update(mask_output=False)))),
        ("config arg features=abc", lambda: configs.parse_arg("features=abc", features=256)),
        ("config arg tie=maybe (bool)", lambda: configs.parse_arg("tie=maybe", tie=False)),
        (".mfc of 1e20", lambda: mfc(np.full((20, 13), 1e20))),
        (".mfc of random bits, valid header", lambda: mfc(
            rng.integers(0, 2**32, 13 * 30, dtype=np.uint32).view(np.float32))),
        (".mfc with one NaN", lambda: mfc(np.where(np.arange(130).reshape(10, 13) == 7,
                                                   np.nan, 1.0))),
        (".mfc of 0 frames", lambda: mfc(np.zeros((0, 13)))),
    ]
    lines = ["| bad input | what it gives now |", "| --- | --- |"]
    for name, fn in cases:
        lines.append(f"| {name} | {outcome(fn).replace('|', '/')} |")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
