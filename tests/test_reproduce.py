"""The paper-reproduction grid and its tables (``experiments/reproduce``): every run of the
grid builds its model and optimizer before any GPU time is spent on it, and the committed
tables are what ``build.py`` makes from the committed results."""

import importlib.util
import json
import math
import shlex
import shutil
import sys

import jax
import numpy as np
import pytest
from conftest import REPO

from bsrnn import data, launcher, models, train

DATA = REPO.parent / "shared" / "data"


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(
        f"reproduce_{name}", REPO / "experiments" / "reproduce" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


grid = load_module("grid")
build = load_module("build")


def distinct_runs():
    """Every run of the grid once per configuration (seeds only change values)."""
    seen, runs = set(), []
    for study_runs in grid.studies().values():
        for run in study_runs:
            key = (run.config, repr(sorted((k, v) for k, v in run.overrides.items()
                                           if k != "seed")))
            if key not in seen:
                seen.add(key)
                runs.append(run)
    return runs


def grid_config(run):
    file, _, arg = run.config.partition(":")
    spec = importlib.util.spec_from_file_location("config", REPO / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # q of the gradual runs comes from dense runs that may not be in experiments/results yet
    # (nan until then, also inside prune.q_layers' (layer, q) pairs).
    def filled(v):
        if isinstance(v, tuple):
            return tuple(filled(x) for x in v)
        return 0.1 if isinstance(v, float) and math.isnan(v) else v

    overrides = {k: filled(v) for k, v in run.overrides.items()}
    return launcher.apply_overrides(module.get_config(arg), overrides)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent (it sits beside the repo in CI)")
def test_every_grid_run_builds_its_model_and_optimizer():
    # Shapes only (jax.eval_shape): the same checks as a real start, block shapes against
    # every matrix included, in seconds. A run that would fail on the GPU fails here.
    failures, datasets = {}, {}
    for run in distinct_runs():
        config = grid_config(run)
        key = (config.data.name, config.data.path)
        dataset = datasets[key] = datasets.get(key) or data.load(config)
        model = train.create_model(config, dataset)
        batch = data.example_batch(dataset, config)
        task = models.model_module(config.model_name)
        try:
            jax.eval_shape(lambda c=config, m=model, t=task, b=batch:
                           train.initial_state(c, m, t, b)[0])
        except ValueError as e:
            failures[f"{run.study}/{run.name}"] = str(e)
    assert not failures, failures
    assert len(distinct_runs()) > 50


def test_grid_names_parse_and_studies_hold_what_the_tables_need():
    studies = grid.studies()
    for runs in studies.values():
        names = [r.name for r in runs]
        assert len(names) == len(set(names))
        for run in runs:
            parsed = build.NAME.match(run.name)
            assert parsed, run.name
            assert f"method={parsed['method']}," in run.config, run.name  # bp, not bponeshot
            assert f"features={parsed['features']}," in run.config, run.name
    # P1's main table at two seeds per row; P3's G values at equal H and equal weights.
    seeds = {}
    for run in studies["an4_main"]:
        seeds.setdefault(run.name.rsplit("_s", 1)[0], set()).add(run.overrides["seed"])
    assert len(seeds) == 16 and all(len(s) >= 2 for s in seeds.values()), seeds
    p3 = {(r.overrides["structure.num_modules"], int(build.NAME.match(r.name)["features"]))
          for r in studies["ptb_p3"]}
    for g in (2, 4, 8, 16):
        assert (g, 512) in p3
        (h,) = [f for gg, f in p3 if gg == g and f != 512]
        assert h % g == 0 and abs(h * h / g - 512 * 512) / 512**2 < 0.01  # H²/G = 512²


def test_summary_and_relative_follow_p1():
    assert build.summary([10.0, 12.0, 11.0]) == "11.00 ± 1.00 (3 seeds)"
    assert build.summary([7.5]) == "7.50 (1 seed)"
    # P1's "relative": (dense − sparse) / dense; worse than dense is negative.
    assert build.relative(16.78, 15.42) == "-8.8%"
    assert build.relative(14.0, 16.0) == "+12.5%"


def test_committed_tables_are_rebuilt_from_the_committed_results(tmp_path, monkeypatch):
    committed = (build.RESULTS / "TABLES.md").read_text()
    results = tmp_path / "results"
    shutil.copytree(build.RESULTS, results)
    (results / "TABLES.md").unlink()
    monkeypatch.setattr(build, "RESULTS", results)
    monkeypatch.setattr(build, "PLOTS", results / "plots")
    build.build()
    assert (results / "TABLES.md").read_text() == committed


def test_collect_files_only_grid_runs_made_with_todays_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grid, "RESULTS", tmp_path / "results")
    run = grid.studies()["an4_main"][0]
    workdir = tmp_path / "work"

    def finished(study, name, args, start=("python", "-m", "bsrnn")):  # as launcher writes
        folder = workdir / study / name
        folder.mkdir(parents=True)
        q = {"input": 0.1, "recurrent": 0.1, "fc": 0.1}  # read by the gradual studies
        (folder / "report.json").write_text(json.dumps({"weight_percentile_90": q}))
        (folder / "command.txt").write_text(
            shlex.join([*start, *args, f"--workdir={folder}"]) + "\n")

    finished(run.study, run.name, run.args())  # collected
    earlier = grid.studies()["an4_main"][2]  # started by an earlier launcher: collected
    finished(earlier.study, earlier.name, earlier.args(), start=("python", "launch.py"))
    finished("an4_main", "rnn999_dense_s0", run.args())  # not a run of the grid
    other = grid.studies()["an4_main"][1]
    finished(other.study, other.name, [*other.args(), "--config.batch_size=7"])  # other flags
    grid.collect(workdir)
    collected = sorted(p.parent.name for p in (tmp_path / "results").glob("*/*/report.json"))
    assert collected == sorted([run.name, earlier.name])
    assert capsys.readouterr().out.count("skipped") == 2
    # The same stale folder stops `run` before anything starts, naming the folder.
    with pytest.raises(SystemExit, match=other.name):
        grid.run("an4_main", workdir, workers=1, deadline=0, match=other.name)


def test_score_percentiles_per_block_size_type_and_layer():
    # Two GRU-style layers of gate kernels and an output layer 2 wide; q at 2x2 and 4x4 blocks.
    rng = np.random.default_rng(0)
    w = {name: rng.standard_normal(shape) for name, shape in (
        ("in0z", (4, 4)), ("in0r", (4, 4)), ("rec0z", (4, 4)), ("in1z", (4, 8)), ("out", (8, 2)))}
    params = {"rnn": {"layer_0": {"input_z": {"kernel": w["in0z"]},
                                  "input_r": {"kernel": w["in0r"]},
                                  "recurrent_z": {"kernel": w["rec0z"]}},
                      "layer_1": {"input_z": {"kernel": w["in1z"]}}},
              "output": {"kernel": w["out"], "bias": np.ones(2)}}
    masks = {"rnn": {layer: {gate: {"kernel": np.ones(k["kernel"].shape, bool)}
                             for gate, k in gates.items()}
                     for layer, gates in params["rnn"].items()},
             "output": {"kernel": np.ones((8, 2), bool)}}

    def maxima(a, bh, bw):  # block maxima of |a| by numpy
        r, c = a.shape
        return np.abs(a).reshape(r // bh, bh, c // bw, bw).max(axis=(1, 3)).ravel()

    got = grid.score_percentiles(params, masks, ((2, 2), (4, 4)), percentile=75.0)
    two = {k: maxima(a, 2, 2) for k, a in w.items()}
    expected_layer = {"rnn/layer_0/input": np.concatenate([two["in0z"], two["in0r"]]),
                      "rnn/layer_0/recurrent": two["rec0z"], "rnn/layer_1/input": two["in1z"],
                      "output": two["out"]}
    for layer, scores in expected_layer.items():
        assert got["by_layer"]["2x2"][layer] == pytest.approx(np.percentile(scores, 75)), layer
    inputs = np.concatenate([two["in0z"], two["in0r"], two["in1z"]])
    assert got["by_type"]["2x2"] == pytest.approx({
        "input": np.percentile(inputs, 75), "recurrent": np.percentile(two["rec0z"], 75),
        "fc": np.percentile(two["out"], 75)})
    # 4x4 blocks do not fit the 2-wide output layer: no fc entry, the rest measured.
    assert set(got["by_type"]["4x4"]) == {"input", "recurrent"}
    assert "output" not in got["by_layer"]["4x4"]
    assert got["by_layer"]["4x4"]["rnn/layer_1/input"] == pytest.approx(
        np.percentile(maxima(w["in1z"], 4, 4), 75))


def test_match_selects_by_name_or_by_study_and_name():
    """A run name shared by two studies is picked in one of them with `study/name`."""
    both = grid._select("an4_blocks_q,an4_layer_q", "^gru512_bp4x4_s0$")
    one = grid._select("an4_blocks_q,an4_layer_q", "^an4_layer_q/gru512_bp4x4_s0$")
    assert len(both) == 2 and {r.name for r in both} == {"gru512_bp4x4_s0"}
    assert len(one) == 1 and one[0] in grid.studies()["an4_layer_q"]
    assert one[0] not in grid.studies()["an4_blocks_q"]
