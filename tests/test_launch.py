"""launch.py as a user runs it: a subprocess on a tiny config, a sweep, and the messages of
a bad config key, a wrong type and a missing data path."""

import json
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO, load_config, tiny_lm_config

from bsrnn import launcher

TINY = [
    "--config=experiments/configs/shakespeare_gru.py:features=8,steps=6",
    "--config.data.name=text",
    "--config.model.embed_dim=4",
    "--config.batch_size=4",
    "--config.seq_len=8",
    "--config.eval_batch_size=8",
    "--config.log_every=2",
    "--config.checkpoint_every=6",
    "--config.eval_every=6",
    "--config.prune.freq=1",
]


def launch(*args, timeout=240):
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_launch_trains_and_reports(tiny_text, tmp_path):
    result = launch(*TINY, f"--config.data.path={tiny_text}", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 6 and report["method"] == "bp"
    assert report["config"]["model"]["features"] == 8  # the arg
    assert report["config"]["data"]["path"] == str(tiny_text)  # the override
    # The printed table is the report's.
    assert f"bsrnn report: {tmp_path}" in result.stdout
    total = report["sparsity"]["total"]
    assert "total (prunable)  " in result.stdout
    assert f"{100 * total['sparsity']:.1f}%" in result.stdout
    assert f"{report['metrics']['valid']['bpc']:.4f}" in result.stdout
    assert (tmp_path / "metrics.jsonl").read_text().count('"split": "train"') == 3
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "6").is_dir()


@pytest.mark.parametrize("flag,message", [
    ("--config.num_stepz=5", r"unknown config key .num_stepz. in --config.num_stepz=5 "
     r"\(did you mean .num_steps.\?\)"),
    ("--config.prune.sparsity.hidden=0.5", r"unknown config key 'hidden'"),
    ("--config.num_steps=many", r"--config.num_steps=many.*invalid literal for int"),
])
def test_bad_config_keys_and_types_are_named(tmp_path, flag, message):
    result = launch(flag, f"--workdir={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr[-2000:]


def test_missing_data_path_is_named(tmp_path):
    missing = tmp_path / "no" / "such.txt"
    result = launch(*TINY, f"--config.data.path={missing}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"launch.py: error: {missing}: no such file" in result.stderr
    assert "--config.data.path" in result.stderr


def test_sweep_in_worker_processes_writes_a_summary(tiny_text, tmp_path):
    sweep = tmp_path / "sweep.py"
    sweep.write_text(
        "def get_sweep(arg=None):\n"
        "    return [{'method': 'dense'},\n"
        "            {'method': 'bp', 'prune.block_shape.recurrent': (8, 8)}]\n"
    )
    result = launch(*TINY, f"--config.data.path={tiny_text}", f"--sweep={sweep}",
                    "--sweep_workers=2", f"--workdir={tmp_path / 'sweep'}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert [m["name"] for m in summary] == ["00_dense", "01_bp_8x8"]
    dense, sparse = (m["report"] for m in summary)
    assert dense["sparsity"]["total"]["sparsity"] == 0.0
    assert sparse["block_shape"]["recurrent"] == [8, 8] and sparse["config"]["seq_len"] == 8
    table = (tmp_path / "sweep" / "sweep_summary.txt").read_text()
    assert "01_bp_8x8" in table and f"{sparse['metrics']['valid']['bpc']:.4f}" in table
    assert table in result.stdout


def test_sweep_in_process_and_override_errors(tiny_text, tmp_path):
    config = tiny_lm_config(tiny_text, steps=4)
    config.log_every = config.checkpoint_every = config.eval_every = 2
    sweep = tmp_path / "sweep.py"
    sweep.write_text("def get_sweep(arg=None):\n    return [{'prune.reduction.input': arg}]\n")
    failed = launcher.run_sweep(config, f"{sweep}:rms", tmp_path / "s")
    assert failed == 0
    summary = json.loads((tmp_path / "s" / "sweep_summary.json").read_text())
    assert summary[0]["report"]["reduction"]["input"] == "rms"
    with pytest.raises(ValueError, match=r"'prune.blocks': unknown config key"):
        launcher.apply_overrides(config, {"prune.blocks": (2, 2)})
    with pytest.raises(ValueError, match=r"'num_steps'='many': wrong type"):
        launcher.apply_overrides(config, {"num_steps": "many"})


def test_every_config_and_sweep_loads():
    for name, arg in [("shakespeare_gru", None), ("ptb_word", "gru"), ("ptb_word", "lstm"),
                      ("an4_ds2", "rnn"), ("an4_ds2", "gru")]:
        for method in ("dense", "structural", "wp", "bp", "gl", "glp"):
            config = load_config(name, f"{arg},method={method}" if arg else f"method={method}")
            assert config.method == method
            assert set(config.prune.block_shape) == {"input", "recurrent", "fc"}
    for path in sorted((REPO / "experiments" / "sweeps").glob("*.py")):
        members = launcher.load_sweep(str(path))
        config = load_config("shakespeare_gru")
        for member in members:
            launcher.apply_overrides(config, member)  # every key exists, every type fits
    shapes = [m["prune.block_shape.recurrent"]
              for m in launcher.load_sweep(str(REPO / "experiments/sweeps/block_sizes.py"))]
    assert shapes == [(1, 1), (4, 4), (12, 2), (8, 8), (16, 16), (32, 32)]


def test_workers_share_gpus_round_robin_and_allocate_as_they_go(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    # 6 workers on 2 GPUs: 3 per GPU, none preallocating XLA's default 75% of it.
    envs = [launcher.worker_env(slot, 6, ["0", "1"]) for slot in range(6)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "1", "0", "1"]
    assert {e["XLA_PYTHON_CLIENT_PREALLOCATE"] for e in envs} == {"false"}
    # One worker per GPU keeps XLA's default; no GPU sets nothing; the user's choice wins.
    assert launcher.worker_env(1, 2, ["4", "7"]) == {"CUDA_VISIBLE_DEVICES": "7"}
    assert launcher.worker_env(0, 4, []) == {}
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    assert launcher.worker_env(2, 4, ["0"]) == {"CUDA_VISIBLE_DEVICES": "0"}


def test_jobs_past_the_deadline_are_stopped_or_not_started(tiny_text, tmp_path):
    # A million steps cannot finish in 4 s: the first job is stopped, the second never runs.
    args = [*TINY, f"--config.data.path={tiny_text}", "--config.num_steps=1000000"]
    jobs = [{"workdir": tmp_path / name, "args": args} for name in ("a", "b")]
    started = time.time()
    launcher.run_in_processes(jobs, workers=1, deadline=4)
    assert time.time() - started < 60
    assert jobs[0]["error"] == "stopped at the 4 s deadline"
    assert jobs[1]["error"] == "not started before the deadline"
    assert (tmp_path / "a" / "command.txt").exists() and not (tmp_path / "b").exists()


def test_installed_copy_runs_from_another_directory(tmp_path):
    """``pip install --target`` of a copy of the sources (so nothing is built in the
    repository), then ``python -m bsrnn`` from elsewhere with only the installed copy on the
    path: the shipped default config, shipped configs by name, and a data root that is not
    set are found or named without the repository."""
    import os
    import shutil

    source, site, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    shutil.copytree(REPO / "bsrnn", source / "bsrnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(REPO / name, source / name)
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-compile", "--target", str(site), str(source)],
                   check=True, capture_output=True, timeout=240)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BSRNN_DATA")}
    env["PYTHONPATH"] = str(site)

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=240)

    result = run("-c", "import bsrnn.launcher as l; print(l.__file__); print(l.DEFAULT_CONFIG)")
    assert result.stdout.split() == [str(site / "bsrnn" / "launcher.py"),
                                     str(site / "bsrnn" / "configs" / "shakespeare_gru.py")]
    result = run("-m", "bsrnn", "--help")  # absl's --help exits with status 1
    assert "python -m bsrnn" in result.stdout and "--data_root" in result.stdout, result.stderr
    result = run("-m", "bsrnn", "--config=no_such:lstm", "--workdir=w")
    assert result.returncode != 0
    assert "--config=no_such: no such config file" in result.stderr
    assert "['shakespeare_gru']" in result.stderr
    ptb = REPO / "experiments" / "configs" / "ptb_word.py"  # a config file given by path
    result = run("-m", "bsrnn", f"--config={ptb}:lstm", "--workdir=w")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert re.search(r"\$BSRNN_DATA/ptb: the data folder is not set.*--data_root",
                     result.stderr), result.stderr[-2000:]


def test_import_is_lazy_and_exposes_the_modules():
    code = ("import sys, bsrnn; assert 'jax' not in sys.modules, 'jax imported'; "
            "print(bsrnn.pruning.block_prune.__module__, bsrnn.data.load_words.__name__); "
            "bsrnn.nothing")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split() == ["bsrnn.pruning", "load_words"], result.stderr[-2000:]
    assert "module 'bsrnn' has no attribute 'nothing'; its modules are" in result.stderr


def test_jax_backend_probe_lines_are_dropped_and_warnings_kept():
    import logging

    def record(name, level, msg):
        return logging.LogRecord(name, level, f"/x/{name.replace('.', '/')}.py", 1, msg, (),
                                 None)

    probe = "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so"
    assert not launcher._quiet_libraries(record("jax._src.xla_bridge", logging.INFO, probe))
    assert launcher._quiet_libraries(record("jax._src.xla_bridge", logging.WARNING, probe))
    assert launcher._quiet_libraries(record("jax._src.xla_bridge", logging.INFO, "other"))
    assert launcher._quiet_libraries(record("bsrnn.train", logging.INFO, probe))
