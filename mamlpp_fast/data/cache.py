"""On-disk cache of preprocessed image arrays.

A cache entry is one uncompressed ``.npz`` named ``<prefix>-<fingerprint>.npz``. The fingerprint
hashes the list of source files (relative path, size, mtime in ns), the preprocessing version and
the preprocessing parameters, so editing, adding or removing any source file, or changing the
preprocessing, selects a different entry. Entries are written atomically: a temporary file in the
same folder, flushed and fsync'ed, then ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np


def fingerprint(entries: Iterable[tuple[str, int, int]], params: Mapping[str, object]) -> str:
    """sha256 over ``params`` (as JSON) and each (relative path, size, mtime_ns) entry."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(params), sort_keys=True, default=str).encode())
    for rel, size, mtime_ns in entries:
        h.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
    return h.hexdigest()


def stat_entries(files: Iterable[Path], base: Path) -> list[tuple[str, int, int]]:
    """(path relative to ``base``, size, mtime_ns) for each file, in the given order."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append((os.path.relpath(f, base), st.st_size, st.st_mtime_ns))
    return out


def entry_path(cache_folder: Path, prefix: str, fp: str) -> Path:
    return Path(cache_folder) / f"{prefix}-{fp[:32]}.npz"


def load(path: Path) -> Optional[dict[str, np.ndarray]]:
    """Load a cache entry; None if absent or unreadable (a broken entry is treated as a miss)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # truncated or foreign file: rebuild it
        return None


def save(path: Path, arrays: Mapping[str, np.ndarray]) -> bool:
    """Atomically write ``arrays`` to ``path``. Returns False (and leaves no file) if it fails."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache holds nothing private
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        return True
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not isinstance(exc, Exception):  # KeyboardInterrupt and friends
            raise
        return False
