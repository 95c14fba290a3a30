"""Shared fixtures: a tiny text corpus and a tiny language-model config built on the
default experiment config, so every training test compiles small programs.

Also a test-wide setting: float32 matrix products at full precision on every backend. On
GPUs JAX's default float32 matmul may use TF32 (about 1e-3 relative error), which would hide
real mismatches behind loose tolerances; the references here are float32 or float64.

And one XLA compilation cache for the whole run (``share_compilations``): the tiny training
runs compile the same programs again and again, in this process, in the xdist workers and
in the subprocesses the tests start.
"""

import importlib.util
import os
import shutil
import struct
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

_OWN_CACHE: list[Path] = []  # the cache folder this process made, and removes at the end


def share_compilations() -> None:
    """JAX's persistent compilation cache, for every program however short its compile, in
    a fresh folder of this test run: this process, the xdist workers it starts and the
    subprocesses of the tests use it (through the environment), so nothing compiled by an
    earlier run is ever read back. A hit returns the executable XLA built for the identical
    program, devices and flags. A cache folder the caller set is used as it is."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _OWN_CACHE.append(Path(tempfile.mkdtemp(prefix="bsrnn-tests-xla-cache-")))
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_OWN_CACHE[0])
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # JAX read the environment when it was imported, above: set this process's config too.
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


share_compilations()


def pytest_unconfigure(config):
    """The run's compilation cache goes once the run is over, by the process that made it
    (the xdist controller, or the one process without xdist)."""
    for folder in _OWN_CACHE:
        shutil.rmtree(folder, ignore_errors=True)


# Files of the longest tests (subprocesses, whole training runs), started first so that under
# ``-n 2`` (pyproject's addopts) no long test is left to run alone at the end.
LONG_FIRST = ("test_sharding.py", "test_notebook.py", "test_launch.py", "test_vmap_sweep.py",
              "test_train.py", "test_sparse_training.py", "test_bad_inputs.py")


def pytest_collection_modifyitems(config, items):
    """Runs the files of LONG_FIRST first, in that order; the rest keep theirs."""
    del config
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


REPO = Path(__file__).resolve().parents[1]
WORDS = ("abc", "bad", "cafe", "dig", "hij", "fig", "jab")  # 10 letters + space: V = 12


def write_tiny_text(path: Path, num_words: int = 4000) -> Path:
    """A 'language' of 7 words where each word fixes the next one with probability 0.8."""
    rng = np.random.default_rng(0)
    words, w = [], 0
    for _ in range(num_words):
        w = (w + 1) % len(WORDS) if rng.random() < 0.8 else int(rng.integers(len(WORDS)))
        words.append(WORDS[w] + " ")
    path.write_text("".join(words))
    return path


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    return write_tiny_text(tmp_path_factory.mktemp("text") / "tiny.txt")


@pytest.fixture(scope="session")
def tiny_lm_run(tiny_text, tmp_path_factory):
    """``(workdir, state)`` of ``tiny_lm_config(tiny_text)`` trained in one go on this
    process's one device (12 steps of block pruning, checkpoints at 4, 8 and 12): the
    reference of the resume, checkpoint and data-parallel tests. Read it, never write it."""
    from bsrnn import train

    workdir = tmp_path_factory.mktemp("tiny_lm_run")
    return workdir, train.train_and_evaluate(tiny_lm_config(tiny_text), workdir)


def load_config(name: str, arg: str | None = None):
    """``experiments/configs/<name>.py``'s ``get_config(arg)``."""
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / "configs" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_lm_config(text: Path, method: str = "bp", steps: int = 12):
    """The default config shrunk: a GRU of 16 on the tiny text, 4x4 blocks to 70%."""
    config = load_config("shakespeare_gru", f"method={method},features=16,steps={steps}")
    config.data.name, config.data.path = "text", str(text)
    config.model.embed_dim = 8
    config.batch_size, config.seq_len, config.eval_batch_size = 8, 16, 16
    config.log_every, config.checkpoint_every, config.eval_every = 2, 4, 4
    config.optimizer.warmup_steps = 0
    config.optimizer.learning_rate = 3e-2
    config.prune.freq = 2
    config.prune.layer_types = ("input", "recurrent", "fc")
    config.prune.sparsity.input = config.prune.sparsity.recurrent = 0.7
    config.prune.sparsity.fc = 0.7
    config.structure.num_modules = 4
    config.export_timing = False  # model.npz still written; its sampling not timed (seconds)
    return config


def write_tiny_an4(root: Path, num_train: int = 32, num_test: int = 8) -> Path:
    """An AN4-shaped folder (etc/*.fileids, etc/*.transcription, feat/**/*.mfc) whose 13-dim
    frames spell the transcript: 4 noisy frames of a letter's own pattern per letter."""
    rng = np.random.default_rng(1)
    words = ("YES", "NO", "ONE", "TWO", "SIX")
    letters = sorted(set("".join(words)) | {" "})
    patterns = {c: rng.normal(0, 1, 13) for c in letters}
    (root / "etc").mkdir(parents=True)
    for split, count in (("an4_train", num_train), ("an4_test", num_test)):
        ids, lines = [], []
        for i in range(count):
            text = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
            frames = np.concatenate([
                patterns[c] + rng.normal(0, 0.3, (int(rng.integers(3, 6)), 13)) for c in text
            ]).astype(">f4")
            file_id = f"{split}/spk{i % 3}/utt{i}"
            (root / "feat" / file_id).parent.mkdir(parents=True, exist_ok=True)
            (root / "feat" / f"{file_id}.mfc").write_bytes(
                struct.pack(">i", frames.size) + frames.tobytes())
            ids.append(file_id)
            lines.append(f"{text} (utt{i})")
        (root / "etc" / f"{split}.fileids").write_text("\n".join(ids) + "\n")
        (root / "etc" / f"{split}.transcription").write_text("\n".join(lines) + "\n")
    return root


def tiny_ds2_config(an4: Path, model: str = "rnn", steps: int = 80):
    """The AN4 config shrunk to a DS2 of 16 units on the tiny AN4 folder."""
    config = load_config("an4_ds2", f"model={model},features=16,layers=1,steps={steps}")
    config.data.path = str(an4)
    config.data.pad_multiple = 64
    config.model.update(conv_features=(4, 4), conv_kernels=((3, 3), (3, 3)),
                        conv_strides=((1, 2), (1, 2)), unroll=1)
    config.batch_size, config.eval_batch_size = 4, 8
    config.log_every, config.checkpoint_every, config.eval_every = 10, 40, 40
    config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
    config.prune.freq = 5
    config.export_timing = False
    return config
