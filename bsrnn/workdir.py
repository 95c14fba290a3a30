"""A run's working directory: its path, its lock, its record of the config, its checksums.

:func:`bsrnn.train.train_and_evaluate` uses these before any training:

* :func:`prepare`: the path resolved to an absolute one (orbax needs it; a relative path
  would fail at the first checkpoint), refused if empty, a file, or not writable, with a
  message that names the path and what to do.
* :class:`Lock`: ``<workdir>/lock.json`` holds the pid and host of the process that runs
  there; a second process is refused with both named. A lock whose process no longer runs
  on this host (killed) is taken over. The file goes when the run ends.
* :func:`resume_changes`: the run's config against the workdir's ``config.json``. Keys of
  :data:`FREE_KEYS` may change on resume; keys of :data:`CONSENT_KEYS` only when named in
  ``allow_changes`` (``launch.py --allow_changes=optimizer.learning_rate``); any other
  difference is refused with every differing key listed. Changes are recorded as events.
* :func:`write_checksums` / :func:`verify_checksums`: the sha256 of every file of a
  checkpoint, in ``<step>/bsrnn_checksums.json``, so flipped bytes are found before orbax
  reads them.
* :class:`Events`: ``<workdir>/events.jsonl``, what the report must say happened during the
  run besides its metrics (config changes, skipped checkpoints, divergence warnings).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CHECKSUMS = "bsrnn_checksums.json"
LOCK = "lock.json"
EVENTS = "events.jsonl"

# Config keys that may differ between a run and the workdir it resumes: they change what is
# logged, evaluated and kept, or how long training goes on, not what was trained so far.
# The schedules are fractions of num_steps, so a new num_steps rescales them from the
# resumed step on (recorded as a change like the others).
FREE_KEYS = (
    "num_steps", "log_every", "eval_every", "checkpoint_every", "max_checkpoints",
    "eval_batch_size", "mesh.data",
)
# Keys that may differ only when the user names them: they change the training itself from
# the resumed step on.
CONSENT_KEYS = (
    "optimizer.learning_rate", "optimizer.final_lr_fraction", "optimizer.warmup_steps",
    "optimizer.grad_clip", "data.path",
)


class WorkdirError(RuntimeError):
    """The workdir cannot be used; the message names it and says what to do."""


def prepare(workdir: str | Path) -> Path:
    """``workdir`` as an absolute, existing, writable folder.

    Raises:
      WorkdirError: empty, a file, a parent that cannot be written, or a folder where no
        file can be created (read-only file system, full disk).
    """
    if not str(workdir).strip():
        raise WorkdirError("--workdir is empty; give the folder where checkpoints, logs and "
                           "report.json go (e.g. --workdir=/tmp/run).")
    path = Path(workdir).expanduser().resolve()
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise WorkdirError(
                f"--workdir={workdir}: {parent} is a file, not a folder; choose another "
                "--workdir."
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{socket.gethostname()}_{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise WorkdirError(os_error_message(f"--workdir={workdir} ({path})", e)) from e
    return path


def os_error_message(what: str, e: OSError) -> str:
    """A one-line message for an ``OSError`` met while writing ``what``: no space, no
    permission, or the error itself, each with what to do."""
    if e.errno == errno.ENOSPC:
        return f"{what}: no space left on the device; free some space or choose another --workdir."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{what}: cannot write there ({e.strerror}: {e.filename}); choose a folder you "
                "can write to.")
    return f"{what}: {e.strerror or e} ({e.filename}); choose another --workdir."


def check_free_space(path: Path, needed_bytes: int, what: str) -> None:
    """Raise :class:`WorkdirError` if the file system of ``path`` has less than
    ``needed_bytes`` free (``what`` says what they are for)."""
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise WorkdirError(
            f"{path} has {free / 2**20:.1f} MiB free but {what} need about "
            f"{needed_bytes / 2**20:.1f} MiB; free some space, lower config.max_checkpoints, "
            "or choose another --workdir."
        )


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a
    recycled pid from the process that took the lock; ``None`` where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(owner: Mapping[str, Any]) -> bool:
    """Whether the process that wrote ``owner`` (a lock's content) may still run. On another
    host we cannot tell, so it may."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    started = owner.get("process_start")
    return started is None or _process_start(pid) in (None, started)


class Lock:
    """``<workdir>/lock.json``: one process runs in a workdir at a time.

    Use as ``with Lock(workdir): ...``. Entering raises :class:`WorkdirError` naming the pid
    and host of the process that holds the lock, unless that process is gone from this host
    (then the lock is taken over, with a warning in the log).
    """

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK
        self.owner = {
            "pid": os.getpid(), "host": socket.gethostname(),
            "process_start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.took_over: dict[str, Any] | None = None

    def __enter__(self) -> Lock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and _alive(holder):
                    raise WorkdirError(
                        f"{self.path.parent} is in use by process {holder.get('pid')} on host "
                        f"{holder.get('host')} (since {holder.get('since')}). Wait for it to "
                        "finish or stop it, or choose another --workdir; if that process no "
                        f"longer runs, delete {self.path}."
                    ) from None
                stale = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
                try:
                    os.replace(self.path, stale)  # atomic: one taker wins
                except FileNotFoundError:
                    continue
                stale.unlink()
                self.took_over = holder
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return self
        raise WorkdirError(f"{self.path}: could not take the lock; another process keeps "
                           "taking it. Choose another --workdir.")

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # half-written by a process killed while taking it: stale

    def __exit__(self, *exc: Any) -> None:
        if self._holder() == self.owner:
            self.path.unlink()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and tuples are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


_ABSENT = "<absent>"


def config_differences(
    before: Mapping[str, Any], after: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (before, after)}`` for every leaf of two JSON configs that differs
    (a key missing on one side is ``"<absent>"`` there)."""
    a, b = flatten(before), flatten(after)
    return {
        k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    }


def resume_changes(
    recorded: Mapping[str, Any], config: Mapping[str, Any], step: int,
    allow_changes: Iterable[str] = (),
) -> dict[str, tuple[Any, Any]]:
    """The changes from the workdir's ``config.json`` (``recorded``) to the run's ``config``
    (both as JSON), if the run may resume at ``step`` with them.

    Raises:
      ValueError: a key outside :data:`FREE_KEYS` differs and is not in ``allow_changes``
        (all such keys listed, with both values); ``allow_changes`` names a key that cannot
        change on resume.
    """
    allow = set(allow_changes)
    unknown = allow - set(CONSENT_KEYS) - set(FREE_KEYS)
    if unknown:
        raise ValueError(
            f"--allow_changes={','.join(sorted(unknown))}: these cannot change when a run "
            f"resumes; only {', '.join(CONSENT_KEYS)} can (and {', '.join(FREE_KEYS)} "
            "always may)."
        )
    changes = config_differences(recorded, config)
    refused = {k: v for k, v in changes.items() if k not in FREE_KEYS and k not in allow}
    if refused:
        lines = "\n".join(f"  config.{k}: {a!r} in the workdir, {b!r} now"
                          for k, (a, b) in refused.items())
        consent = [k for k in refused if k in CONSENT_KEYS]
        fixed = [k for k in refused if k not in CONSENT_KEYS]
        advice = []
        if fixed:
            advice.append(
                "a run with a different " + ", ".join(fixed) + " is a different experiment: "
                "give it a new --workdir (the checkpoints here are good and stay), or run with "
                "the values in the workdir's config.json"
            )
        if consent:
            advice.append(f"to change {', '.join(consent)} from step {step} on, run again with "
                          f"--allow_changes={','.join(consent)}")
        raise ValueError(
            f"the workdir holds a run at step {step} whose config.json differs from this "
            f"config:\n{lines}\nTo go on: " + "; ".join(advice) + "."
        )
    return changes


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """Write ``folder/bsrnn_checksums.json``: the sha256 of every file under ``folder``."""
    sums = {
        str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }
    tmp = folder / f"{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps(sums, indent=1) + "\n")
    os.replace(tmp, folder / CHECKSUMS)


def verify_checksums(folder: Path) -> list[str] | None:
    """What is wrong with the files of ``folder`` against its ``bsrnn_checksums.json``:
    ``[]`` if all match, a list of problems (missing, changed, unreadable) if not, ``None``
    if the folder has no checksums (written before they existed, or killed in between)."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return [f"{CHECKSUMS} unreadable ({e})"]
    problems = []
    for name, expected in sums.items():
        path = folder / name
        try:
            if _sha256(path) != expected:
                problems.append(f"{name} changed since it was written")
        except FileNotFoundError:
            problems.append(f"{name} missing")
        except OSError as e:
            problems.append(f"{name} unreadable ({e.strerror})")
    return problems


class Events:
    """``<workdir>/events.jsonl``: one JSON object per line, each with ``step`` and
    ``kind`` (``config_change``, ``skipped_checkpoint``, ``warning``).

    Args:
      workdir: the run's folder; ``None`` keeps the events in memory only (the processes
        of a multi-process run other than 0).
      resume_step: events of later steps (written by a run that went past the checkpoint
        it resumes from) are dropped; 0 starts a new file.
    """

    def __init__(self, workdir: Path | None, resume_step: int):
        self.path = None if workdir is None else Path(workdir) / EVENTS
        self.records = [e for e in self._read() if e["step"] <= resume_step] if resume_step else []
        if self.path is not None:
            self.path.write_text("".join(json.dumps(e) + "\n" for e in self.records))

    def _read(self) -> list[dict[str, Any]]:
        if self.path is None or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def add(self, step: int, kind: str, **fields: Any) -> None:
        """Append one event."""
        record = {"step": int(step), "kind": kind, **fields}
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """The events of ``kind``, oldest first."""
        return [e for e in self.records if e["kind"] == kind]
