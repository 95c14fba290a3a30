"""Shared fixtures: a tiny text corpus and a tiny language-model config built on the
default experiment config, so every training test compiles small programs."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

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
    config.prune.sparsity.input = config.prune.sparsity.recurrent = 0.7
    config.prune.sparsity.fc = 0.7
    config.structure.num_modules = 4
    return config
