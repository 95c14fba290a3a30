"""Bad inputs and faults as a new user meets them (issue 16): every one ends in a message
that names what was wrong and what to do, before any training where it can be known then,
and none in a result that looks right but is not.

Resume: a changed model or seed is refused with the differences listed (the checkpoints
stay untouched), the learning rate changes only when asked and is recorded at its step,
``num_steps`` below the checkpoint is refused. Workdirs: locked, made absolute, refused
when empty, a file, unwritable or short of space. Settings and data: checked as they enter.
"""

import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, load_config, tiny_ds2_config, tiny_lm_config, write_tiny_an4

from bsrnn import cells, data, train
from bsrnn import workdir as workdir_lib


def tree_digest(folder):
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def eight_steps(tiny_text, tmp_path_factory):
    """A finished 8-step run (checkpoints at 4 and 8), made in a relative --workdir."""
    parent = tmp_path_factory.mktemp("eight")
    here = os.getcwd()
    os.chdir(parent)
    try:
        state = train.train_and_evaluate(tiny_lm_config(tiny_text, steps=8), "relw")
    finally:
        os.chdir(here)
    return parent / "relw", state


def copy_run(source, tmp_path):
    target = tmp_path / "w"
    shutil.copytree(source, target)
    return target


def test_a_relative_workdir_is_made_absolute_before_training(eight_steps):
    workdir, state = eight_steps
    report = json.loads((workdir / "report.json").read_text())
    assert report["workdir"] == str(workdir) and os.path.isabs(report["workdir"])
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "8"]
    assert int(state.step) == 8
    assert not (workdir / workdir_lib.LOCK).exists()  # released at the end


@pytest.mark.parametrize("change,listed", [
    (dict(features=24), [r"config.model.features: 16 in the workdir, 24 now"]),
    (dict(seed=1, cell="lstm"), [r"config.model.cell: 'gru' in the workdir, 'lstm' now",
                                 r"config.seed: 0 in the workdir, 1 now"]),
    (dict(block=(2, 2)), [r"config.prune.block_shape.recurrent: \[4, 4\] in the workdir, "
                          r"\[2, 2\] now"]),
])
def test_resume_with_another_model_or_seed_is_refused_listing_the_differences(
    tiny_text, tmp_path, eight_steps, change, listed
):
    workdir = copy_run(eight_steps[0], tmp_path)
    before = tree_digest(workdir / "checkpoints")
    config = tiny_lm_config(tiny_text, steps=8)
    config.model.features = change.get("features", 16)
    config.model.cell = change.get("cell", "gru")
    config.seed = change.get("seed", 0)
    config.prune.block_shape.recurrent = change.get("block", (4, 4))
    with pytest.raises(ValueError, match=r"holds a run at step 8 whose config.json differs") as e:
        train.train_and_evaluate(config, workdir)
    message = str(e.value)
    for line in listed:
        assert any(re.search(line, m) for m in message.splitlines()), message
    assert message.count(" in the workdir, ") == len(listed)  # only what differs
    assert "new --workdir" in message and "checkpoints here are good" in message
    assert "damaged" not in message and "delete" not in message
    assert tree_digest(workdir / "checkpoints") == before  # nothing touched


def test_without_config_json_a_changed_model_is_named_not_called_damaged(
    tiny_text, tmp_path, eight_steps
):
    workdir = copy_run(eight_steps[0], tmp_path)
    (workdir / "config.json").unlink()
    before = tree_digest(workdir / "checkpoints")
    config = tiny_lm_config(tiny_text, steps=8)
    config.model.features = 24
    with pytest.raises(train.CheckpointError) as e:
        train.train_and_evaluate(config, workdir)
    message = str(e.value)
    assert "does not fit this config" in message and "is not damaged" in message
    # The GRU's (16, 16) recurrent kernels are (24, 24) now; Adam's moments follow them.
    lines = message.splitlines()
    assert "  params/layer_0/recurrent_z/kernel: (16, 16) float32 in the checkpoint, (24, 24) " \
        "float32 now" in lines[1:13]
    # H = 16 -> 24 changes 13 of the 15 params (not the embedding, not the softmax bias),
    # the same 13 in Adam's mu and nu, the 7 masks, their 7 copies in the pruning state and
    # the carry; the thresholds (scalars), counts, step and rng keep their shapes.
    assert "54 arrays differ" in message and "... and 42 more" in message
    assert "delete" not in message
    assert tree_digest(workdir / "checkpoints") == before


def test_a_new_learning_rate_needs_consent_and_is_recorded_at_its_step(
    tiny_text, tmp_path, eight_steps
):
    workdir = copy_run(eight_steps[0], tmp_path)
    config = tiny_lm_config(tiny_text, steps=12)  # num_steps may change freely
    config.optimizer.learning_rate = 1e-2  # was 3e-2
    with pytest.raises(ValueError, match=r"config.optimizer.learning_rate: 0.03 in the workdir, "
                       r"0.01 now\n.*--allow_changes=optimizer.learning_rate"):
        train.train_and_evaluate(config, workdir)
    with pytest.raises(ValueError, match=r"--allow_changes=model.features: these cannot change"):
        train.train_and_evaluate(config, workdir, allow_changes=["model.features"])
    train.train_and_evaluate(config, workdir, allow_changes=["optimizer.learning_rate"])
    report = json.loads((workdir / "report.json").read_text())
    assert report["steps"] == 12 and report["config"]["optimizer"]["learning_rate"] == 1e-2
    assert report["config_changes"] == [{
        "step": 8, "kind": "config_change", "changes": {
            "num_steps": {"before": 8, "after": 12},
            "optimizer.learning_rate": {"before": 0.03, "after": 0.01},
        }}]
    # Steps 9-12 ran with the new cosine schedule over 12 steps (no warm-up): the rate
    # logged for the window ending at step 10 is that of step 9.
    logged = {r["step"]: r["learning_rate"] for r in map(
        json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"}
    assert logged[10] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 9 / 12)), rel=1e-5)
    assert logged[8] == pytest.approx(3e-2 * 0.5 * (1 + math.cos(math.pi * 7 / 8)), rel=1e-5)
    # Resuming again with the same config changes nothing more.
    train.train_and_evaluate(config, workdir)
    assert json.loads((workdir / "report.json").read_text())["config_changes"] == \
        report["config_changes"]


def test_num_steps_below_the_checkpoint_is_refused(tiny_text, tmp_path, eight_steps):
    workdir = copy_run(eight_steps[0], tmp_path)
    with pytest.raises(ValueError, match=r"at step 8 but config.num_steps=6: a run cannot go "
                       r"back. Set --config.num_steps=8 or more"):
        train.train_and_evaluate(tiny_lm_config(tiny_text, steps=6), workdir)


def test_a_second_process_is_refused_and_a_dead_ones_lock_taken_over(
    tiny_text, tmp_path, eight_steps
):
    workdir = copy_run(eight_steps[0], tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = workdir_lib.Lock(workdir)
        holder = dict(lock.owner, pid=sleeper.pid,
                      process_start=workdir_lib._process_start(sleeper.pid))
        (workdir / workdir_lib.LOCK).write_text(json.dumps(holder))
        with pytest.raises(workdir_lib.WorkdirError, match=(
                rf"in use by process {sleeper.pid} on host {socket.gethostname()}")):
            train.train_and_evaluate(tiny_lm_config(tiny_text, steps=8), workdir)
        # A lock from another host cannot be checked: refused too, naming that host.
        (workdir / workdir_lib.LOCK).write_text(json.dumps(dict(holder, host="elsewhere")))
        with pytest.raises(workdir_lib.WorkdirError, match=r"on host elsewhere.*delete"):
            train.train_and_evaluate(tiny_lm_config(tiny_text, steps=8), workdir)
        (workdir / workdir_lib.LOCK).write_text(json.dumps(holder))
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
    # Killed: the lock is stale and taken over; the finished run just reports again.
    state = train.train_and_evaluate(tiny_lm_config(tiny_text, steps=8), workdir)
    assert int(state.step) == 8 and not (workdir / workdir_lib.LOCK).exists()


def test_lock_is_exclusive_within_one_host(tmp_path):
    with workdir_lib.Lock(tmp_path) as first:
        assert json.loads((tmp_path / workdir_lib.LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(workdir_lib.WorkdirError, match=rf"process {os.getpid()}"):
            workdir_lib.Lock(tmp_path).__enter__()
        assert first.took_over is None
    assert not (tmp_path / workdir_lib.LOCK).exists()


def test_bad_workdirs_are_refused_before_any_work(tiny_text, tmp_path, monkeypatch):
    config = tiny_lm_config(tiny_text)
    with pytest.raises(workdir_lib.WorkdirError, match=r"--workdir is empty"):
        train.train_and_evaluate(config, "")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(workdir_lib.WorkdirError, match=rf"{a_file} is a file, not a folder"):
        train.train_and_evaluate(config, a_file)
    with pytest.raises(workdir_lib.WorkdirError, match=rf"{a_file} is a file, not a folder"):
        train.train_and_evaluate(config, a_file / "below")
    assert a_file.read_text() == "not a folder"

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    with monkeypatch.context() as m:  # tests run as root here, so chmod would not refuse
        m.setattr(type(tmp_path), "mkdir", denied)
        with pytest.raises(workdir_lib.WorkdirError, match=r"cannot write there \(Permission "
                           r"denied.*choose a folder you can write to"):
            train.train_and_evaluate(config, tmp_path / "ro" / "w")

    usage = shutil.disk_usage(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
        with pytest.raises(workdir_lib.WorkdirError, match=r"10.0 MiB free but 2 checkpoints "
                           r"and the one being written need about"):
            train.train_and_evaluate(config, tmp_path / "full")
    assert not (tmp_path / "full" / "metrics.jsonl").exists()  # before any training


def test_a_full_disk_during_a_save_names_the_last_good_checkpoint(
    tiny_text, tmp_path, monkeypatch
):
    save = ocp.CheckpointManager.save

    def full_at_8(self, step, *args, **kwargs):
        if step == 8:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_8)
    with pytest.raises(train.CheckpointError, match=r"checkpoint of step 8 .*no space left on "
                       r"the device.*last good checkpoint \(step 4\) is kept"):
        train.train_and_evaluate(tiny_lm_config(tiny_text), tmp_path)
    assert not (tmp_path / workdir_lib.LOCK).exists()


@pytest.mark.parametrize("key,value,message", [
    ("max_checkpoints", 0, r"config.max_checkpoints=0 must be an integer >= 1 \(0 keeps no "
     r"checkpoint"),
    ("max_checkpoints", -1, r"config.max_checkpoints=-1 must be an integer >= 1"),
    ("seq_len", 0, r"config.seq_len=0 must be an integer >= 1"),
    ("seq_len", -5, r"config.seq_len=-5 must be an integer >= 1"),
    ("optimizer.learning_rate", -1e-3, r"learning_rate=-0.001 must be a finite number > 0"),
    ("optimizer.learning_rate", 0.0, r"learning_rate=0.0 must be a finite number > 0"),
    ("optimizer.learning_rate", float("nan"), r"learning_rate=nan must be"),
    ("optimizer.grad_clip", -1.0, r"config.optimizer.grad_clip=-1.0 must be >= 0"),
    ("model.features", 0, r"config.model.features=0 \(bsrnn.models.lm\): must be an integer"),
    ("model.features", -3, r"config.model.features=-3"),
    ("model.num_layers", 0, r"config.model.num_layers=0"),
    ("model.embed_dim", 0, r"config.model.embed_dim=0"),
    ("model.dropout", 1.0, r"config.model.dropout=1.0 must be in \[0, 1\)"),
    ("eval_batch_size", 5000, r"config.eval_batch_size=5000: the valid split is too small"),
    ("batch_size", 100000, r"config.batch_size=100000: the train split is too small.*lower "
     r"config.batch_size or config.seq_len"),
])
def test_bad_settings_are_named_before_training(tiny_text, tmp_path, key, value, message):
    config = tiny_lm_config(tiny_text)
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_a_method_that_would_prune_nothing_is_refused(tiny_text, tmp_path):
    config = tiny_lm_config(tiny_text)
    config.prune.layer_types = ("fc",)
    config.model.mask_output = False  # the only fc kernel now has no mask
    with pytest.raises(ValueError, match=r"config.method='bp' prunes layer types \('fc',\) but "
                       r"the model has no masked kernel of those types: nothing would be pruned"):
        train.train_and_evaluate(config, tmp_path)


def test_ds2_sizes_are_checked(tmp_path):
    an4 = write_tiny_an4(tmp_path / "an4", num_train=8, num_test=4)
    config = tiny_ds2_config(an4)
    config.model.conv_strides = ((0, 2), (1, 2))
    with pytest.raises(ValueError, match=r"config.model.conv_strides=\(\(0, 2\), \(1, 2\)\) "
                       r"\(bsrnn.models.ds2\): must be integers >= 1"):
        train.train_and_evaluate(config, tmp_path / "w")


def test_a_config_arg_of_the_wrong_type_names_the_key():
    with pytest.raises(ValueError, match=r"config arg 'features=abc': features takes int values "
                       r"\(default 256\), got 'abc'"):
        load_config("shakespeare_gru", "features=abc")
    with pytest.raises(ValueError, match=r"config arg 'layers=two'"):
        load_config("an4_ds2", "rnn,layers=two")


def test_launch_names_an_empty_workdir_and_a_bad_config_arg(tmp_path):
    for args, message in [
        (["--workdir="], "launch.py: error: --workdir is empty"),
        (["--config=experiments/configs/shakespeare_gru.py:features=abc",
          f"--workdir={tmp_path}"], "features takes int values (default 256), got 'abc'"),
    ]:
        result = subprocess.run([sys.executable, "launch.py", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert message in result.stderr, result.stderr[-2000:]
    assert not any(tmp_path.iterdir())


def write_mfc(path, frames):
    frames = np.asarray(frames, ">f4")
    path.write_bytes(struct.pack(">i", frames.size) + frames.tobytes())


@pytest.mark.parametrize("kind", ["huge", "random_bytes", "nan", "empty"])
def test_an_mfc_file_of_absurd_values_is_refused_naming_it(tmp_path, kind):
    an4 = write_tiny_an4(tmp_path / "an4", num_train=6, num_test=2)
    victim = an4 / "feat" / "an4_train" / "spk1" / "utt4.mfc"
    rng = np.random.default_rng(7)
    if kind == "huge":
        write_mfc(victim, np.full((20, 13), 1e20))
        expected = r"260 of 260 values are not cepstra.*first: 1e\+20 at frame 0, c0"
    elif kind == "random_bytes":  # a valid header over random bits, as a bad copy may give
        raw = rng.integers(0, 256, 4 * 13 * 30, dtype=np.uint8).tobytes()
        victim.write_bytes(struct.pack(">i", 13 * 30) + raw)
        expected = r"\d+ of 390 values are not cepstra \(non-finite or beyond ±10000"
    elif kind == "nan":
        frames = rng.normal(0, 1, (10, 13))
        frames[3, 5] = np.nan
        write_mfc(victim, frames)
        expected = r"1 of 130 values are not cepstra.*first: nan at frame 3, c5"
    else:
        write_mfc(victim, np.zeros((0, 13)))
        expected = r"header says N=0 floats, an utterance of no frames"
    with pytest.raises(ValueError, match=rf"{victim}: {expected}"):
        data.load_an4(an4)


def test_real_cepstra_pass_the_mfc_check(tmp_path):
    # Values up to AN4's own range (|c| < 20) and beyond, to the limit, are read unchanged.
    frames = np.random.default_rng(3).uniform(-9999, 9999, (7, 13)).astype(np.float32)
    write_mfc(tmp_path / "ok.mfc", frames)
    np.testing.assert_array_equal(data.read_mfc(tmp_path / "ok.mfc"), frames)


def test_masks_of_the_wrong_shape_are_named():
    layer = cells.MaskedDense(6, 4, name="fc")
    x = jax.random.normal(jax.random.key(0), (3, 6))
    variables = layer.init(jax.random.key(1), x)
    bad = {"kernel": jnp.ones((4, 6), bool)}
    with pytest.raises(ValueError, match=r"the mask of .* has shape \(4, 6\) but its kernel is "
                       r"\(6, 4\)"):
        layer.apply({"params": variables["params"], "masks": bad}, x)
    # The right shape still gives x @ (W ⊙ M) + b.
    mask = jax.random.bernoulli(jax.random.key(2), 0.5, (6, 4))
    y = layer.apply({"params": variables["params"], "masks": {"kernel": mask}}, x)
    w, b = variables["params"]["kernel"], variables["params"]["bias"]
    np.testing.assert_allclose(y, x @ jnp.where(mask, w, 0) + b, rtol=1e-6)


def test_divergence_without_a_nan_is_warned_once_per_kind():
    events = workdir_lib.Events(None, resume_step=0)
    watch = train._DivergenceWatch(events, initial_loss=2.5, history=[
        {"step": 4, "split": "valid", "loss": 2.0}])  # from before a resume
    watch.train(2, 4.9)  # below 2x the first step's 2.5
    watch.evaluated(8, "valid", 2.1)
    watch.evaluated(12, "valid", 2.2)  # two rises
    assert events.of_kind("warning") == []
    watch.train(14, 5.1)
    watch.train(16, 9.0)
    watch.evaluated(16, "valid", 2.3)  # the third rise in a row
    watch.evaluated(20, "valid", 2.6, final=True)  # above 2.5: worse than it started
    reasons = [(w["step"], w["reason"]) for w in events.of_kind("warning")]
    assert reasons == [(14, "loss_above_start"), (16, "eval_rising"), (20, "worse_than_start")]
    assert "(2, 2.1, 2.2, 2.3)" in events.of_kind("warning")[1]["message"]


def test_an_absurd_learning_rate_is_reported_as_diverging(tiny_text, tmp_path):
    config = tiny_lm_config(tiny_text)
    config.optimizer.learning_rate = 1e6
    train.train_and_evaluate(config, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first_window = next(r["loss"] for r in records if r["split"] == "train")
    assert first_window > 2 * math.log(12)  # far above uniform guessing over V = 12
    reasons = {w["reason"] for w in report["warnings"]}
    assert reasons == {"loss_above_start", "worse_than_start"}
    assert report["metrics"]["valid"]["loss"] > math.log(12)
