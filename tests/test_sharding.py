"""Data parallelism: the tiny LM on 8 fake CPU devices gives the numbers of 1 device, and
bad meshes, batch sizes and multi-host flags are refused before any work starts.

The 8-device run is a subprocess: ``--xla_force_host_platform_device_count`` only takes
effect if it is set before JAX starts, and this process already runs on one device.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_lm_config
from flax import traverse_util

from bsrnn import sharding, train

EIGHT_DEVICES = """
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
import jax, numpy as np, pytest
from conftest import tiny_lm_config
from flax import traverse_util
from bsrnn import train

text, workdir = Path(sys.argv[1]), Path(sys.argv[2])
assert jax.device_count() == 8, jax.devices()
state = train.train_and_evaluate(tiny_lm_config(text), workdir / "run")
masks = {"/".join(k): np.asarray(v) for k, v in
         traverse_util.flatten_dict(state.masks).items()}
np.savez(workdir / "masks.npz", **masks)
params = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(state.params).items()}
np.savez(workdir / "params.npz", **params)
carry = jax.tree_util.tree_leaves(state.carry)[0]
kernel = jax.tree_util.tree_leaves(state.params)[0]
shards = {"carry": [list(s.data.shape) for s in carry.addressable_shards],
          "kernel_replicated": kernel.sharding.is_fully_replicated}

errors = {}
for key, value in [("batch_size", 12), ("eval_batch_size", 20), ("mesh.data", 16)]:
    config = tiny_lm_config(text)
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
    with pytest.raises(ValueError) as e:
        train.train_and_evaluate(config, workdir / key)
    errors[key] = [str(e.value), (workdir / key).exists()]
(workdir / "out.json").write_text(json.dumps({"shards": shards, "errors": errors}))
"""


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def train_losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["split"], r["loss"]) for r in map(json.loads, lines)]


def test_eight_devices_give_the_numbers_of_one(tiny_text, tiny_lm_run, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(tiny_text), str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    # B = 8 rows of (1, 16) carry on each of the 8 devices; weights whole on every device.
    assert out["shards"] == {"carry": [[1, 16]] * 8, "kernel_replicated": True}

    assert jax.device_count() == 1
    one_dir, reference = tiny_lm_run  # the same config trained on this process's one device
    ours, theirs = train_losses(tmp_path / "run"), train_losses(one_dir)
    assert [r[:2] for r in ours] == [r[:2] for r in theirs]  # same steps, same splits
    # Only the order of the float32 sums over the batch differs.
    np.testing.assert_allclose([r[2] for r in ours], [r[2] for r in theirs], rtol=1e-5)
    masks = np.load(tmp_path / "masks.npz")
    assert set(masks) == set(flat(reference.masks))
    for path, mask in flat(reference.masks).items():
        np.testing.assert_array_equal(masks[path], mask, err_msg=path)
    assert 0.5 < 1 - np.mean(np.concatenate([m.ravel() for m in masks.values()]))  # pruned
    params = np.load(tmp_path / "params.npz")
    for path, value in flat(reference.params).items():
        np.testing.assert_allclose(params[path], value, rtol=1e-4, atol=1e-5, err_msg=path)
    one, eight = (json.loads((d / "report.json").read_text())["metrics"]
                  for d in (one_dir, tmp_path / "run"))
    assert eight["valid"]["bpc"] == pytest.approx(one["valid"]["bpc"], rel=1e-5)

    errors = out["errors"]
    assert "config.batch_size=12 (global, over all devices) is not divisible by the 8 " \
        "devices" in errors["batch_size"][0]
    assert "config.eval_batch_size=20" in errors["eval_batch_size"][0]
    assert "e.g. 16 or 24" in errors["eval_batch_size"][0]
    assert "config.mesh.data=16 asks for 16 devices but only 8 exist" in errors["mesh.data"][0]
    assert not any(created for _, created in errors.values())  # refused before any work


def test_a_mesh_larger_than_the_machine_is_refused_before_any_work(tiny_text, tmp_path):
    config = tiny_lm_config(tiny_text)
    config.mesh.data = 2
    with pytest.raises(ValueError, match=r"config.mesh.data=2 asks for 2 devices but only 1 "
                       r"exist.*--config.mesh.data=-1"):
        train.train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    config.mesh.data = 0
    with pytest.raises(ValueError, match=r"config.mesh.data=0 must be -1 \(all devices\) or >= 1"):
        train.train_and_evaluate(config, tmp_path / "w")


def test_batch_sizes_must_divide_over_the_data_axis(tiny_text):
    config = tiny_lm_config(tiny_text)  # batch 8, eval batch 16
    sharding.check_batch_sizes(config, 4)
    with pytest.raises(ValueError, match=r"config.batch_size=8 .* not divisible by the 3 "
                       r"devices .* e.g. 6 or 9"):
        sharding.check_batch_sizes(config, 3)
    with pytest.raises(ValueError, match=r"config.eval_batch_size=16 .* by the 32 devices"):
        config.batch_size = 32
        sharding.check_batch_sizes(config, 32)


@pytest.mark.parametrize("args,message", [
    (("localhost:1234", 2, 2), r"--process_id=2 is not one of the 2 processes .* from 0 to 1"),
    (("localhost:1234", 2, -1), r"--process_id=-1 is not one of the 2 processes"),
    (("localhost:1234", 0, 0), r"--num_processes=0 must be >= 1"),
    ((None, 2, 0), r"--coordinator_address missing; pass all three"),
    (("localhost:1234", None, None), r"--num_processes, --process_id missing"),
])
def test_mismatched_multi_host_flags_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        sharding.initialize_distributed(*args)


def test_without_flags_or_a_cluster_nothing_is_initialized(monkeypatch):
    for name in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert sharding._cluster_job_in_environment() is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert sharding._cluster_job_in_environment() is True


def test_launch_names_a_bad_process_id_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "launch.py", f"--workdir={tmp_path}", "--num_processes=2",
         "--process_id=2", "--coordinator_address=localhost:1234"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "launch.py: error: --process_id=2 is not one of the 2 processes" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


TWO_PROCESSES = """
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import jax
from conftest import tiny_lm_config
from bsrnn import sharding, train

text, workdir, address, process_id = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
assert sharding.initialize_distributed(address, 2, process_id)  # as launch.py does
assert jax.process_count() == 2 and jax.device_count() == 4
train.train_and_evaluate(tiny_lm_config(Path(text)), workdir)
"""


def test_two_processes_give_the_numbers_of_one_and_resume_on_one_device(tiny_text, tiny_lm_run,
                                                                         tmp_path):
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    processes = [
        subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(tiny_text),
                          str(tmp_path / "two"), address, str(i)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (_, stderr) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    # Only process 0 prints the report; both wrote their shards of the checkpoints.
    assert "bsrnn report" in outputs[0][0] and "bsrnn report" not in outputs[1][0]
    assert (tmp_path / "two" / "checkpoints" / "12" / "state" / "ocdbt.process_1").exists()

    one_dir, reference = tiny_lm_run  # the same config trained on this process's one device
    ours, theirs = train_losses(tmp_path / "two"), train_losses(one_dir)
    np.testing.assert_allclose([r[2] for r in ours], [r[2] for r in theirs], rtol=1e-5)

    # The 4-device checkpoint of step 8 restores onto this 1-device mesh and goes on.
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "12")
    resumed = train.train_and_evaluate(tiny_lm_config(tiny_text), tmp_path / "two")
    assert int(resumed.step) == 12
    for path, mask in flat(reference.masks).items():
        np.testing.assert_array_equal(flat(resumed.masks)[path], mask, err_msg=path)
    for path, value in flat(reference.params).items():
        np.testing.assert_allclose(flat(resumed.params)[path], value, rtol=1e-4, atol=1e-5)
