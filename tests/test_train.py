"""The trainer on a tiny text corpus: it learns, prunes to the scheduled sparsity, reports
what an independent count finds, resumes bit for bit, survives a kill during a save, falls
back from a damaged checkpoint to the previous one, and stops cleanly on a non-finite loss."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_ds2_config, tiny_lm_config, write_tiny_an4
from flax import traverse_util

from bsrnn import report as report_lib
from bsrnn import train


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "steps_per_second"}
            for line in lines]


@pytest.fixture
def uninterrupted(tiny_lm_run):
    """The reference: 12 steps of block pruning in one go (conftest's, shared)."""
    return tiny_lm_run


def test_short_run_learns_and_reaches_the_scheduled_sparsity(tiny_text, tmp_path):
    config = tiny_lm_config(tiny_text, steps=60)
    config.log_every, config.checkpoint_every, config.eval_every = 10, 30, 30
    state = train.train_and_evaluate(config, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    train_losses = [r["loss"] for r in records(tmp_path) if r["split"] == "train"]
    # Uniform guessing over the 12 symbols costs log2(12) = 3.58 bits per character; the
    # corpus's next word is 80% predictable, so a model that learns gets far below it.
    assert train_losses[-1] < 0.6 * train_losses[0]
    assert report["metrics"]["valid"]["bpc"] < 0.7 * math.log2(12)
    # Cubic schedule, final 70% of the 4x4 blocks of each matrix: floor(0.7 n) of n blocks.
    expected = {
        "layer_0/input": math.floor(0.7 * 8) / 8,  # three (8, 16) gate kernels, 8 blocks each
        "layer_0/recurrent": math.floor(0.7 * 16) / 16,  # (16, 16): 16 blocks
        "output": math.floor(0.7 * 12) / 12,  # (16, 12): 12 blocks
    }
    for layer, sparsity in expected.items():
        assert report["sparsity"][layer]["sparsity"] == pytest.approx(sparsity)
    masks, params = flat(state.masks), flat(state.params)
    for path, mask in masks.items():
        blocks = mask.reshape(mask.shape[0] // 4, 4, mask.shape[1] // 4, 4)
        assert np.all(blocks.min(axis=(1, 3)) == blocks.max(axis=(1, 3))), path  # whole blocks
        assert np.all(params[path][~mask] == 0), path  # hard mode: pruned weights are 0
    # Parameter counts, from the architecture: V = 12, E = 8, H = 16, three GRU gates.
    total = 12 * 8 + 3 * (8 * 16 + 16) + 3 * (16 * 16 + 16) + 16 * 12 + 12
    kept = sum(int(m.sum()) for m in masks.values())
    pruned_weights = sum(m.size for m in masks.values()) - kept
    assert report["params"] == {"total": total, "nonzero": total - pruned_weights}
    assert report["method"] == "bp" and report["steps"] == 60
    assert report["block_shape"]["recurrent"] == [4, 4]
    # Per-layer sparsity is logged as training goes, rising to the target.
    logged = [r["sparsity/total"] for r in records(tmp_path) if r["split"] == "train"]
    assert 0.0 < logged[0] < logged[-1] and logged == sorted(logged)
    # masks.npz holds the final masks bit for bit, odd shapes (16, 12) included.
    saved = report_lib.load_masks(tmp_path / "masks.npz")
    assert set(saved) == set(masks)
    for path, mask in masks.items():
        np.testing.assert_array_equal(saved[path], mask)
    assert logged[-1] == pytest.approx(report["sparsity"]["total"]["sparsity"])


def test_resume_after_an_interruption_equals_an_uninterrupted_run(
    tiny_text, tmp_path, monkeypatch, uninterrupted
):
    reference_dir, reference = uninterrupted
    save = ocp.CheckpointManager.save

    def save_then_die(self, step, *args, **kwargs):
        result = save(self, step, *args, **kwargs)
        if step == 8:
            raise KeyboardInterrupt("killed after the checkpoint of step 8")
        return result

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny_lm_config(tiny_text), tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "report.json").exists()
    resumed = train.train_and_evaluate(tiny_lm_config(tiny_text), tmp_path)

    # Params, masks, optimizer and pruning state, LM carry, RNG: all bit for bit.
    leaves = jax.tree_util.tree_leaves_with_path(reference)
    assert len(leaves) == len(jax.tree_util.tree_leaves(resumed))
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert records(tmp_path) == records(reference_dir)
    ours, theirs = (json.loads((d / "report.json").read_text())
                    for d in (tmp_path, reference_dir))
    assert ours["metrics"] == theirs["metrics"] and ours["sparsity"] == theirs["sparsity"]


def test_a_kill_during_a_save_keeps_the_last_checkpoint(
    tiny_text, tmp_path, monkeypatch, uninterrupted
):
    reference_dir, reference = uninterrupted
    json_save = ocp.JsonCheckpointHandler.async_save

    async def die_at_step_8(self, directory, *args, **kwargs):
        if "8.orbax-checkpoint-tmp" in str(directory):
            raise KeyboardInterrupt("killed in the middle of saving step 8")
        return await json_save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", die_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny_lm_config(tiny_text), tmp_path)
    monkeypatch.undo()
    leftovers = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "4" in leftovers and "8" not in leftovers
    assert any(name.startswith("8.") for name in leftovers)  # the half-written one
    resumed = train.train_and_evaluate(tiny_lm_config(tiny_text), tmp_path)
    for a, b in zip(flat(reference.params).values(), flat(resumed.params).values(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert records(tmp_path) == records(reference_dir)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    tiny_text, tmp_path, uninterrupted
):
    reference_dir, reference = uninterrupted
    shutil.copytree(reference_dir / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(reference_dir / "config.json", tmp_path / "config.json")
    # 64 flipped bytes inside the largest data file of the newest checkpoint (step 12).
    data_files = [f for f in (tmp_path / "checkpoints" / "12" / "state").rglob("*")
                  if f.is_file() and "/d/" in str(f)]
    victim = max(data_files, key=lambda f: f.stat().st_size)
    damaged = bytearray(victim.read_bytes())
    middle = len(damaged) // 2
    damaged[middle - 32 : middle + 32] = bytes(b ^ 0xFF for b in damaged[middle - 32 : middle + 32])
    victim.write_bytes(bytes(damaged))
    state = train.train_and_evaluate(tiny_lm_config(tiny_text), tmp_path)
    # Resumed from step 8 and retrained steps 9-12: the same numbers as the reference.
    for a, b in zip(flat(reference.params).values(), flat(state.params).values(), strict=True):
        np.testing.assert_array_equal(a, b)
    report = json.loads((tmp_path / "report.json").read_text())
    (skipped,) = report["skipped_checkpoints"]
    assert skipped["checkpoint"] == 12 and skipped["step"] == 8
    relative = str(victim.relative_to(tmp_path / "checkpoints" / "12"))
    assert skipped["problems"] == [f"{relative} changed since it was written"]
    # Not deleted: set aside with its flipped bytes, and a fresh step 12 written.
    moved = tmp_path / "damaged_checkpoints" / "12"
    assert skipped["moved_to"] == str(moved)
    assert (moved / relative).read_bytes() == bytes(damaged)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["12", "8"]


def test_every_checkpoint_damaged_is_refused_then_starts_afresh(tiny_text, tmp_path,
                                                                uninterrupted):
    reference_dir, _ = uninterrupted
    shutil.copytree(reference_dir / "checkpoints", tmp_path / "checkpoints")
    for step in ("8", "12"):
        for f in (tmp_path / "checkpoints" / step / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 0:
                f.write_bytes(b"\0" * 7)
    with pytest.raises(train.CheckpointError, match=r"every checkpoint in .* is damaged: "
                       r"step 12 \(now in .*damaged_checkpoints/12\), step 8 .*moved aside, not "
                       r"deleted.*start from step 0"):
        train.train_and_evaluate(tiny_lm_config(tiny_text), tmp_path)
    assert sorted(p.name for p in (tmp_path / "damaged_checkpoints").iterdir()) == ["12", "8"]
    state = train.train_and_evaluate(tiny_lm_config(tiny_text), tmp_path)
    assert int(state.step) == 12


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_text, tmp_path, monkeypatch
):
    train_step = train.train_step

    def poisoned(state, batch, **kwargs):
        new_state, metrics = train_step(state, batch, **kwargs)
        metrics["loss"] = jnp.where(state.step >= 6, jnp.nan, metrics["loss"])  # from step 7
        return new_state, metrics

    monkeypatch.setattr(train, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at step 8.*"
                       r"last good checkpoint is step 4"):
        train.train_and_evaluate(tiny_lm_config(tiny_text), tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
    assert not (tmp_path / "report.json").exists()
    state = train.train_and_evaluate(tiny_lm_config(tiny_text), tmp_path)
    assert int(state.step) == 12


@pytest.mark.parametrize("method", ["dense", "structural", "wp", "gl", "glp"])
def test_every_method_runs_with_its_own_masks(tiny_text, tmp_path, method):
    config = tiny_lm_config(tiny_text, method=method)
    state = train.train_and_evaluate(config, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    masks = flat(state.masks)
    recurrent = [m for p, m in masks.items() if "/recurrent_" in p]
    if method == "dense":
        assert all(m.all() for m in masks.values())
    elif method == "structural":  # P3: G = 4 modules of 4x4 on the diagonal of each (16, 16)
        diagonal = np.kron(np.eye(4, dtype=bool), np.ones((4, 4), bool))
        assert all(np.array_equal(m, diagonal) for m in recurrent)
        assert report["sparsity"]["layer_0/recurrent"]["sparsity"] == 0.75
        assert all(np.all(np.asarray(w)[~diagonal] == 0) for p, w in flat(state.params).items()
                   if "/recurrent_" in p and p.endswith("kernel"))
    elif method == "wp":  # 1x1: 70% of the weights of each matrix
        assert report["sparsity"]["layer_0/recurrent"]["sparsity"] == math.floor(0.7 * 256) / 256
        assert report["block_shape"]["input"] == [1, 1]
    elif method == "gl":
        # One cut at the end step (50% of 12 = 6) to the target, 70% of the 4x4 blocks.
        assert report["sparsity"]["layer_0/recurrent"]["sparsity"] == math.floor(0.7 * 16) / 16
    else:
        assert report["sparsity"]["total"]["sparsity"] > 0.6
    assert np.isfinite(report["metrics"]["valid"]["bpc"])


def test_ds2_on_a_tiny_an4_learns_and_reports_cer_and_wer(tmp_path):
    an4 = write_tiny_an4(tmp_path / "an4")
    config = tiny_ds2_config(an4, "rnn", steps=200)
    for kind in ("input", "recurrent", "fc"):
        config.prune.sparsity[kind] = 0.5
    config.export_timing = True  # the one run that times transcription (the LM's: test_inference)
    train.train_and_evaluate(config, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    losses = [r["loss"] for r in records(tmp_path / "run") if r["split"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    test = report["metrics"]["test"]
    assert set(test) == {"loss", "cer", "wer"} and "valid" not in report["metrics"]
    assert test["cer"] < 0.5  # the frames spell the letters; a model that learns reads them
    assert report["sparsity"]["total"]["sparsity"] == pytest.approx(0.5, abs=0.05)
    assert {"rnn/layer_0_fwd/recurrent", "rnn/layer_0_bwd/input", "fc", "output"} <= set(
        report["sparsity"])
    export = report["export"]
    assert export["inference_speedup"] > 0 and len(export["samples"]) == 3
    assert export["timed"] == "transcribing a batch of 8 test utterances"
