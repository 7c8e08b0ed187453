"""One training process per experiment folder, and the clean-up only that process may do.

Two `mamlpp-train` processes on the same experiment would overwrite each other's checkpoints,
and a clean-up of leftover temporary files is only safe when no writer is alive. The training
process therefore holds an exclusive advisory lock (`fcntl.flock`) on ``{experiment}/.lock``
while it trains; `mamlpp-eval` takes no lock and deletes nothing, so it can test the best epochs
of a run that is still training. The lock is released by the kernel when the process dies, even
by kill -9, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import os
from typing import List, Optional

try:  # POSIX; elsewhere the lock is a no-op (a second trainer is then the user's to avoid)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["ExperimentLock", "ExperimentBusyError", "remove_stale_temp_files"]

LOCK_NAME = ".lock"


class ExperimentBusyError(RuntimeError):
    """Another live process is training the same experiment."""


class ExperimentLock:
    """Exclusive lock on an experiment folder, as a context manager.

    Args:
        experiment_dir: the experiment folder (created if missing).

    Raises:
        ExperimentBusyError: on entry, when another process holds the lock (the message names
            its PID when known).
    """

    def __init__(self, experiment_dir: str) -> None:
        self.experiment_dir = experiment_dir
        self.path = os.path.join(experiment_dir, LOCK_NAME)
        self._handle = None

    def __enter__(self) -> "ExperimentLock":
        os.makedirs(self.experiment_dir, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise ExperimentBusyError(
                    f"another process (pid {holder}) is training {self.experiment_dir!r} "
                    f"(it holds {self.path!r}); wait for it to stop, or use another experiment_name"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


def _writer_is_dead(name: str) -> bool:
    """For ``<file>.<pid>.tmp`` names: whether that process is gone (unknown names: True)."""
    parts = name.split(".")
    if len(parts) < 3 or not parts[-2].isdigit():
        return True
    try:
        os.kill(int(parts[-2]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, but belongs to someone else
        return False
    return False


def remove_stale_temp_files(saved_models_dir: str, logs_dir: Optional[str] = None,
                            checkpoint_prefix: str = "train_model") -> List[str]:
    """Delete the temporary files of writes that a crash interrupted; call it only while holding
    the `ExperimentLock` (then no other trainer is writing). Returns the deleted paths.

    - ``saved_models/{prefix}_*.tmp``: checkpoints, written only by the lock holder;
    - ``logs/*.tmp.png``: learning-curve plots, written only by the lock holder;
    - ``logs/*.<pid>.tmp``: log and test-summary files, which `mamlpp-eval` writes too without
      the lock, so only those whose writer process is gone.
    """
    removed = []
    candidates = []
    if os.path.isdir(saved_models_dir):
        candidates += [os.path.join(saved_models_dir, name) for name in os.listdir(saved_models_dir)
                       if name.startswith(checkpoint_prefix + "_") and name.endswith(".tmp")]
    if logs_dir is not None and os.path.isdir(logs_dir):
        for name in os.listdir(logs_dir):
            if name.endswith(".tmp.png") or (name.endswith(".tmp") and _writer_is_dead(name)):
                candidates.append(os.path.join(logs_dir, name))
    for path in candidates:
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed
