"""mamlpp_fast.allocator: glibc keeps freed host memory for reuse instead of unmapping it."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc-only setting"
)

# In a fresh process (the setting is process-wide): where does a live 64 MiB tensor come from?
# glibc's mallinfo2() counts the bytes of blocks it mmapped on their own (hblkhd): those are the
# ones it unmaps on free, and that the kernel must fault in and zero again on the next allocation.
# (The page faults themselves are not a stable test: the VM's memory reclaim also takes idle
# pages back. benchmarks/RESULTS.md has the end-to-end effect.)
PROBE = """
import ctypes, ctypes.util, sys
import torch
from mamlpp_fast.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
applied = [keep_freed_memory(), keep_freed_memory()] if sys.argv[1] == "keep" else []
before = libc.mallinfo2().hblkhd
tensor = torch.ones(64 << 18)  # 64 MiB of float32
print(*applied, (libc.mallinfo2().hblkhd - before) >> 20)
"""


@pytest.mark.parametrize("mode, expected", [("keep", ["True", "True", "0"]), ("system", ["64"])])
def test_big_tensors_are_not_mmapped_on_their_own(mode, expected, tmp_path):
    if platform.libc_ver()[1] < "2.33":
        pytest.skip("mallinfo2 needs glibc 2.33")
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == expected
