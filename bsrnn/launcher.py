"""What ``python -m bsrnn`` (and ``launch.py``) runs: flag parsing with clear config errors,
single runs and sweeps.

Nothing here depends on the repository: ``--config`` is a path, or the name of a config
shipped in :mod:`bsrnn.configs` (:data:`DEFAULT_CONFIG` when absent), ``--data_root`` sets
``$BSRNN_DATA`` before the config file reads it (:func:`bsrnn.configs.data_path`), and sweep
workers run ``python -m bsrnn``.

A sweep file (``experiments/sweeps/*.py``) defines ``get_sweep(arg) -> list[dict]``: one
dict of config overrides per member, keys as on the command line without ``config.``
(``{"prune.block_shape.recurrent": (8, 8)}``). ``launch.py --sweep=FILE[:arg]`` runs every
member in its own sub-workdir ``<workdir>/<NN>_<values>``, then writes
``<workdir>/sweep_summary.json`` and ``sweep_summary.txt``, a table of the members'
reports. With ``--vmap``, members that differ only in values (seeds, learning rates,
λ_g, target sparsities: :data:`bsrnn.vmap_sweep.SWEEPABLE`) train as one vmapped program
on one device, each then evaluated and reported in its sub-workdir (no checkpoints:
:mod:`bsrnn.vmap_sweep`); it is a flag, not automatic, because such a sweep keeps no
checkpoints (an interrupted one starts its unfinished members again). Otherwise members run
one after another in this process, or with ``--sweep_workers=N`` in N processes at once,
spread over the GPUs through ``CUDA_VISIBLE_DEVICES`` (workers that share a GPU allocate as
they go; on CPUs they share the cores). Members whose
sub-workdir already holds a ``report.json`` are not run again, so a sweep resumes like a
run.

Multi-host runs start one ``launch.py`` per process with the same flags plus
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or, without them,
under SLURM or on a TPU pod, where JAX reads the job from the environment);
:func:`main` joins them (:func:`bsrnn.sharding.initialize_distributed`) before any JAX
work, and every process trains its share of each batch (``config.mesh``). ``--workdir``
must be a folder that every host sees (orbax writes each process's shards there).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging as py_logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from bsrnn import report, sharding, train, vmap_sweep
from bsrnn import workdir as workdir_lib

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # bsrnn/configs/*.py
DEFAULT_CONFIG = str(SHIPPED_CONFIGS / "shakespeare_gru.py")
PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # where `import bsrnn` finds it

# Errors whose message tells the user what to do: printed without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, train.CheckpointError,
               workdir_lib.WorkdirError)


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The last ``--name=value`` (or ``--name value``) of ``argv``, or None."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def resolve_config(spec: str) -> str:
    """``--config``'s ``path[:arg]`` with a shipped config's name (``shakespeare_gru``)
    replaced by its file; a path is kept as given (relative to the current directory).

    Raises:
      FileNotFoundError: neither a file nor a shipped config, both named.
    """
    path, colon, arg = spec.partition(":")
    if Path(path).is_file():
        return spec
    shipped = SHIPPED_CONFIGS / f"{path.removesuffix('.py')}.py"
    if "/" not in path and shipped.is_file():
        return f"{shipped}{colon}{arg}"
    names = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.py") if p.stem != "__init__")
    raise FileNotFoundError(
        f"--config={path}: no such config file; pass a config file's path (e.g. "
        f"experiments/configs/ptb_word.py in the repository) or a shipped config: {names}."
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with unknown config keys reported by name instead of a traceback.

    Without ``--config`` the default config (:data:`DEFAULT_CONFIG`) is used; a shipped
    config may be given by name (:func:`resolve_config`). ``--data_root`` is applied (as
    ``$BSRNN_DATA``) before the config file runs. Wrong types are already reported by absl
    (``flag --config.num_steps=abc: invalid literal for int()``).
    """
    if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
    try:
        argv = [argv[0], *(f"--config={resolve_config(a.removeprefix('--config='))}"
                           if a.startswith("--config=") else a for a in argv[1:])]
    except FileNotFoundError as e:
        sys.exit(f"FATAL Flags parsing error: {e}")
    data_root = _flag_value(argv[1:], "data_root")
    if data_root:
        os.environ["BSRNN_DATA"] = str(Path(data_root).expanduser().resolve())
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        message = lines[-1] if "Traceback" in str(e) else str(e)  # a config file's own error
        sys.exit(f"FATAL Flags parsing error: {message}\nPass --helpfull to see help on flags.")
    except (AttributeError, KeyError) as e:
        message = str(e)
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        named = [
            (part, a) for a in overrides for part in a.split("=", 1)[0].split(".")[1:]
            if re.search(rf"\b{re.escape(part)}\b", message)
        ]
        key, where = named[0] if named else ("?", " ".join(overrides))
        hint = re.search(r'Did you mean "([^"]+)"', message)
        sys.exit(
            f"FATAL Flags parsing error: unknown config key {key!r} in {where}"
            f"{f' (did you mean {hint.group(1)!r}?)' if hint else ''}; override only keys "
            "that the config file defines."
        )
    except ValueError as e:
        sys.exit(f"FATAL Flags parsing error: {e}")


def _quiet_libraries(record: Any) -> bool:
    """Drop orbax's INFO lines (a dozen per checkpoint), and JAX's INFO line for each
    platform it probes and does not find ("Unable to initialize backend 'tpu'" on every CPU
    or GPU machine); keep every warning and error (a backend the user asked for with
    ``JAX_PLATFORMS`` that fails is an error)."""
    if record.levelno >= py_logging.WARNING:
        return True
    if "/orbax/" in record.pathname:
        return False
    return not (record.name.endswith("xla_bridge")
                and str(record.msg).startswith("Unable to initialize backend"))


def main(parsed: flags.FlagValues) -> None:
    """Run ``parsed.config`` in ``parsed.workdir``, or the sweep ``parsed.sweep``; join the
    multi-host job of ``parsed.coordinator_address`` etc. first."""
    logging.get_absl_handler().addFilter(_quiet_libraries)
    config = parsed.config
    try:
        distributed = sharding.initialize_distributed(
            parsed.coordinator_address, parsed.num_processes, parsed.process_id)
        if distributed and parsed.sweep:
            raise ValueError("--sweep runs on one host; drop the multi-host flags, or launch "
                             "each member as its own multi-host run.")
        if parsed.vmap and not parsed.sweep:
            raise ValueError("--vmap trains the members of a sweep together; give --sweep=FILE "
                             "too, or drop --vmap.")
        if parsed.sweep:
            config_holder = parsed["config"]
            base_args = [f"--config={config_flags.get_config_filename(config_holder)}"] + [
                config_flag(k, v)
                for k, v in config_flags.get_override_values(config_holder).items()
            ]
            failed = run_sweep(config, parsed.sweep, parsed.workdir,
                               workers=parsed.sweep_workers, base_args=base_args,
                               vmap=parsed.vmap)
            if failed:
                sys.exit(f"launch.py: {failed} sweep member(s) failed; see the summary above.")
        else:
            train.train_and_evaluate(config, parsed.workdir,
                                     allow_changes=parsed.allow_changes or ())
    except USER_ERRORS as e:
        sys.exit(f"launch.py: error: {e}")


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``{"a.b": value}`` overrides set; unknown keys and wrong
    types raise ``ValueError`` naming the key."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ValueError(
                    f"override {key!r}: config has no section {'.'.join(parents[: i + 1])!r}."
                )
            node = node[part]
        if leaf not in node:
            raise ValueError(
                f"override {key!r}: unknown config key; {'.'.join(parents) or 'config'} has "
                f"{sorted(node.keys())}."
            )
        try:
            node[leaf] = tuple(value) if isinstance(value, list) else value
        except TypeError as e:
            raise ValueError(f"override {key!r}={value!r}: wrong type ({e}).") from e
    return config


def load_sweep(spec: str) -> list[dict[str, Any]]:
    """The members of the sweep file ``spec`` (``path`` or ``path:arg``)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--sweep={spec}: no such file; expected experiments/sweeps/*.py.")
    module_spec = importlib.util.spec_from_file_location("bsrnn_sweep", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep(arg) returning a list of override dicts.")
    members = module.get_sweep(arg or None)
    if not members or not all(isinstance(m, dict) for m in members):
        raise ValueError(f"{path}: get_sweep must return a non-empty list of dicts of overrides.")
    return members


def _slug(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "x".join(map(str, value))
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value))


def member_name(index: int, overrides: dict[str, Any]) -> str:
    """``03_8x8``: the index and the distinct override values, for a sub-workdir name."""
    values = list(dict.fromkeys(_slug(v) for v in overrides.values()))
    return "_".join([f"{index:02d}", *values])[:80]


def config_flag(key: str, value: Any) -> str:
    """The ``launch.py`` flag that sets config ``key`` (``"a.b"``) to ``value``."""
    return f"--config.{key}={repr(tuple(value)) if isinstance(value, tuple | list) else value}"


def run_sweep(
    config: ml_collections.ConfigDict, sweep: str, workdir: str | Path, *, workers: int = 1,
    base_args: Sequence[str] = (), vmap: bool = False,
) -> int:
    """Run every member of ``sweep`` on ``config``; write and print the summary table.

    Args:
      config: the base config (command-line overrides applied).
      sweep: the sweep file, ``path[:arg]``.
      workdir: the sweep's folder; member i runs in ``<workdir>/<member_name>``.
      workers: members at once; above 1, each runs as ``launch.py`` in its own process
        (``base_args`` plus its overrides), on the GPUs as :func:`worker_env` assigns them.
      base_args: the ``--config`` flags that rebuild ``config`` in a worker process.
      vmap: train the members as one vmapped program in this process
        (:func:`bsrnn.vmap_sweep.train_and_report`); they must differ only in values
        (:data:`bsrnn.vmap_sweep.SWEEPABLE`), else ``ValueError`` names what differs.

    Returns:
      The number of failed members.
    """
    workdir = workdir_lib.prepare(workdir)
    members = []
    for i, overrides in enumerate(load_sweep(sweep)):
        members.append({"name": member_name(i, overrides), "overrides": overrides,
                        "config": apply_overrides(config, overrides)})
    todo = [m for m in members if not (workdir / m["name"] / "report.json").exists()]
    if vmap and workers > 1:
        raise ValueError("--vmap trains the members in one process; drop --sweep_workers.")
    if vmap and todo:
        logging.info("Sweep members %s as one vmapped program.", [m["name"] for m in todo])
        outcomes = vmap_sweep.train_and_report([m["config"] for m in todo],
                                               [workdir / m["name"] for m in todo])
        for member, outcome in zip(todo, outcomes, strict=True):
            if "error" in outcome:
                member["error"] = outcome["error"]
    elif workers <= 1:
        for member in todo:
            logging.info("Sweep member %s: %s", member["name"], member["overrides"])
            try:
                train.train_and_evaluate(member["config"], workdir / member["name"])
            except USER_ERRORS as e:
                member["error"] = str(e)
    else:
        for member in todo:
            member["workdir"] = workdir / member["name"]
            member["args"] = [*base_args, *(config_flag(k, v)
                                            for k, v in member["overrides"].items())]
        run_in_processes(todo, workers)
    summary = []
    for member in members:
        path = workdir / member["name"] / "report.json"
        summary.append({
            "name": member["name"], "overrides": member["overrides"],
            "workdir": str(workdir / member["name"]),
            "report": json.loads(path.read_text()) if path.exists() else None,
            **({"error": member["error"]} if "error" in member else {}),
        })
    table = report.format_sweep(summary)
    (workdir / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
    (workdir / "sweep_summary.txt").write_text(table + "\n")
    print(f"\nsweep {sweep}: {len(members)} members in {workdir}\n{table}", flush=True)
    return sum(m["report"] is None for m in summary)


def visible_gpus() -> list[str]:
    """The GPU ids a worker may be pinned to: ``$CUDA_VISIBLE_DEVICES``, else those that
    ``nvidia-smi -L`` lists, else none (a CPU machine). Asking JAX instead would make the
    parent process take GPU memory that the workers need."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # "" hides every GPU
        return [d for d in visible.split(",") if d]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def worker_env(slot: int, workers: int, gpus: Sequence[str]) -> dict[str, str]:
    """Environment additions for worker ``slot`` of ``workers``: its GPU (``slot mod
    len(gpus)``) and, where several workers share one GPU, ``XLA_PYTHON_CLIENT_PREALLOCATE
    =false``, so each takes the memory it uses instead of a fixed share (a share large
    enough for the largest member leaves the CUDA contexts of the others without room; a
    value already set in the environment wins). No GPUs: nothing (workers share the CPU
    cores)."""
    if not gpus:
        return {}
    env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}
    if workers > len(gpus) and "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def run_in_processes(
    jobs: list[dict[str, Any]], workers: int, deadline: float = float("inf")
) -> None:
    """Run ``python -m bsrnn`` once per job, ``workers`` at a time, spread over the GPUs
    (:func:`worker_env`).

    Args:
      jobs: dicts with ``workdir`` (a Path; gets ``command.txt`` and ``log.txt``) and
        ``args`` (the ``launch.py`` flags besides ``--workdir``). A job that fails gets
        ``error``, the last line of its log.
      workers: jobs at once.
      deadline: seconds from now after which no job starts and running ones are stopped
        (their checkpoints stay, so the same jobs resume later).
    """
    gpus = visible_gpus()
    running: dict[int, tuple[subprocess.Popen, dict[str, Any], Any]] = {}
    queue = list(jobs)
    stop_at = time.time() + deadline
    while queue or running:
        for slot, (process, job, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                if process.returncode:
                    tail = (job["workdir"] / "log.txt").read_text().strip()
                    last = tail.splitlines()[-1] if tail else ""
                    job["error"] = last or f"exit status {process.returncode}"
                del running[slot]
        if time.time() > stop_at:
            for process, job, log in running.values():
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                log.close()
                job["error"] = f"stopped at the {deadline:.0f} s deadline"
            for job in queue:
                job["error"] = "not started before the deadline"
            return
        for slot in range(workers):
            if slot in running or not queue:
                continue
            job = queue.pop(0)
            job["workdir"].mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "bsrnn", *job["args"],
                       f"--workdir={job['workdir']}"]
            (job["workdir"] / "command.txt").write_text(shlex.join(command) + "\n")
            log = (job["workdir"] / "log.txt").open("w")
            env = dict(os.environ, **worker_env(slot, workers, gpus))
            env["PYTHONPATH"] = os.pathsep.join(  # this bsrnn, installed or not
                filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
            logging.info("Job %s on worker slot %d", job["workdir"], slot)
            running[slot] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                              env=env), job, log)
        time.sleep(0.5)
