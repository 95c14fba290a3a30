"""Checks that a path a loader was given exists, with errors that say what to do."""

from pathlib import Path


def existing_file(path: str | Path, expected: str) -> Path:
    """Returns `path` as a `Path`, or raises `FileNotFoundError` naming it and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; expected {expected}. "
            "Pass the path of your own copy of the data."
        )
    return path


def existing_dir(path: str | Path, expected: str) -> Path:
    """Returns `path` as a `Path`, or raises `FileNotFoundError` naming it and what it should be."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such folder; expected {expected}. "
            "Pass the path of your own copy of the data."
        )
    return path
