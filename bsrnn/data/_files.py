"""Checks that a path a loader was given exists, with errors that say what to do."""

from pathlib import Path


def _existing(path: str | Path, expected: str, is_dir: bool) -> Path:
    if str(path).startswith("$BSRNN_DATA"):  # bsrnn.configs.data_path without a data root
        raise FileNotFoundError(
            f"{path}: the data folder is not set; expected {expected} there. Set BSRNN_DATA "
            "to the folder that holds the data sets (export BSRNN_DATA=/path/to/data, or "
            "launch.py --data_root=/path/to/data), or give the data set's own path."
        )
    path = Path(path)
    if not (path.is_dir() if is_dir else path.is_file()):
        raise FileNotFoundError(
            f"{path}: no such {'folder' if is_dir else 'file'}; expected {expected}. "
            "Pass the path of your own copy of the data."
        )
    return path


def existing_file(path: str | Path, expected: str) -> Path:
    """Returns `path` as a `Path`, or raises `FileNotFoundError` naming it and what it should be."""
    return _existing(path, expected, is_dir=False)


def existing_dir(path: str | Path, expected: str) -> Path:
    """Returns `path` as a `Path`, or raises `FileNotFoundError` naming it and what it should be."""
    return _existing(path, expected, is_dir=True)
