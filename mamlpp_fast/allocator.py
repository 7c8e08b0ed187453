"""Keep freed host memory inside the process, so that big CPU tensors are not page-faulted in again
on every meta-step.

glibc's malloc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB)
with a fresh ``mmap`` and gives it back to the kernel on ``free``. A MAML meta-step allocates and
frees hundreds of such activation and gradient buffers, and each one is then zero-filled by the
kernel a 4 KiB page at a time when it is first written. On our 2-core VM that costs up to half of a
CPU meta-iteration: mini-ImageNet 5w1s, second order, 2 threads, seconds per iteration
(benchmarks/RESULTS.md, 2026-11-30):

    ====================  =======  ========================  ======================
                          default  MALLOC_MMAP_THRESHOLD_=4G  keep_freed_memory()
    ====================  =======  ========================  ======================
    per-task reference     12.6     7.1                       6.6
    MetaLearner             5.9     4.0                       4.2
    ====================  =======  ========================  ======================

``keep_freed_memory()`` raises the mmap and trim thresholds with ``mallopt``, so such buffers come
from, and return to, malloc's own heap, where the next step reuses them. The process keeps its peak
footprint instead of returning it between steps. (A VM's memory reclaim may still take idle pages
back now and then; the thresholds only stop glibc from doing it on every free.) ``mamlpp-train`` calls it by default
(``--allocator system`` opts out); library users may call it themselves, or set the environment
variable ``MALLOC_MMAP_THRESHOLD_`` before Python starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# mallopt takes an int: the largest threshold it can express (2 GiB - 1). Larger buffers still use mmap.
_THRESHOLD = 2**31 - 1

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (see the module docstring).

    Returns:
        True when the thresholds are set (now or by an earlier call); False where this does not
        apply: not Linux with glibc, or glibc refused the values. Never raises.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1
        trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    _applied = mmap_ok and trim_ok
    return _applied
