"""Where data sets and caches live.

Resolution order for a data set folder (first hit wins):

1. an explicit ``root`` argument (either the data set folder itself or a folder containing it);
2. ``$MAMLPP_FAST_DATA_DIR/<name>``;
3. the official code's ``$DATASET_DIR/<official folder name>`` (``omniglot_dataset``,
   ``mini_imagenet_full_size``) and ``$DATASET_DIR/<name>``.

The cache folder is ``$MAMLPP_FAST_CACHE_DIR`` or ``~/.cache/mamlpp_fast``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

DATA_DIR_ENV = "MAMLPP_FAST_DATA_DIR"
OFFICIAL_DATA_DIR_ENV = "DATASET_DIR"
CACHE_DIR_ENV = "MAMLPP_FAST_CACHE_DIR"


class DataNotFoundError(FileNotFoundError):
    """The data set folder could not be found (the message says where to put it)."""


class DataError(RuntimeError):
    """A data file is missing, unreadable or inconsistent (the message names the file)."""


class DataConfigError(DataError, ValueError):
    """The task settings do not fit the data (the message names the config key).

    A :class:`DataError`, so the CLI reports it as a data error, and a ``ValueError``, so callers
    that catch ``ValueError`` for bad arguments still do.
    """


class UnofficialDataWarning(UserWarning):
    """The data found is not the official data set: class or image counts differ, so the split
    (and the comparability of the results with the paper) differ too."""


def cache_dir() -> Path:
    """The folder for preprocessed-array caches (created on demand by the writer)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/mamlpp_fast").expanduser()


def candidate_dirs(root: Optional[os.PathLike | str], names: Sequence[str]) -> list[Path]:
    """Every folder that :func:`find_dataset_dir` looks at, in order."""
    out: list[Path] = []
    if root is not None:
        r = Path(root).expanduser()
        out.append(r)
        out.extend(r / n for n in names)
        return out
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        out.extend(Path(env).expanduser() / n for n in names)
    env = os.environ.get(OFFICIAL_DATA_DIR_ENV)
    if env:
        out.extend(Path(env).expanduser() / n for n in names)
    return out


def find_dataset_dir(root: Optional[os.PathLike | str], names: Sequence[str],
                     looks_right: Callable[[Path], bool]) -> Optional[Path]:
    """Return the first candidate folder for which ``looks_right`` is true, else None."""
    for cand in candidate_dirs(root, names):
        if cand.is_dir() and looks_right(cand):
            return cand
    return None


def describe_search(root: Optional[os.PathLike | str], names: Sequence[str]) -> str:
    """A human-readable list of the places searched, for error messages."""
    cands = candidate_dirs(root, names)
    where = "\n".join(f"  - {c}" for c in cands) or "  (nothing: no root given and no env var set)"
    return (f"Searched:\n{where}\n"
            f"Pass the folder (mamlpp-train/mamlpp-eval --dataset-dir DIR; dataset_dir= in Python), "
            f"or set ${DATA_DIR_ENV} to a folder containing "
            f"'{names[0]}/', or set the official ${OFFICIAL_DATA_DIR_ENV} to a folder containing "
            f"one of {list(names)}.")


def iter_files(folder: Path, suffixes: Iterable[str]) -> list[Path]:
    """All files under ``folder`` whose lower-cased name ends with one of ``suffixes``, sorted."""
    suffixes = tuple(s.lower() for s in suffixes)
    found: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(folder):
        for f in filenames:
            if f.lower().endswith(suffixes):
                found.append(Path(dirpath) / f)
    found.sort(key=lambda p: str(p))
    return found
