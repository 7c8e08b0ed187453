"""Peak memory of one provider's meta-iterations, measured in a fresh process.

`bench_meta_step.py --memory` starts `python bench_meta_step.py --memory-child ...` once per
(setting, provider); the child builds the provider and the batch, records its baseline, runs
the iterations and prints one line ``MEMORY {json}`` that the parent parses.

- CPU: growth of the process's peak resident set size (`resource.getrusage(...).ru_maxrss`)
  over the iterations, i.e. peak during the iterations minus peak before them. The allocator
  may keep freed memory, so this is an upper bound on the live peak; it is comparable across
  providers because each starts in a fresh process with the same imports.
- CUDA: `torch.cuda.max_memory_allocated()` during the iterations minus the memory allocated
  before them (the meta-parameters, optimiser state and batch).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import time
from typing import Callable, List, Sequence

import torch

MARKER = "MEMORY "


@dataclasses.dataclass(frozen=True)
class MemoryResult:
    setting: str
    second_order: bool
    batch_size: int
    dtype: str
    device: str
    provider: str
    peak_mib: float          # growth over the baseline, MiB
    baseline_mib: float      # CPU: peak RSS before the iterations; CUDA: allocated before
    iterations: int
    seconds_per_iter: float  # from this process, not round-robin: for orientation only


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def measure_child(step: Callable[[tuple], None], batch: tuple, iterations: int, device: str) -> dict:
    """Run `iterations` steps (the first includes one-off costs, as in training) and report."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = _rss_mib()
    start = time.perf_counter()
    for _ in range(iterations):
        step(batch)
    elapsed = (time.perf_counter() - start) / iterations
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - baseline
    else:
        peak = _rss_mib() - baseline
    return {"peak_mib": peak, "baseline_mib": baseline, "iterations": iterations,
            "seconds_per_iter": elapsed}


def run_in_subprocess(script: str, args: Sequence[str]) -> dict:
    """Run `script args` and return the parsed MEMORY line (raises with its output if none)."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def print_memory(results: List[MemoryResult]) -> str:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from utils import markdown_table

    rows = [(r.setting, "2nd" if r.second_order else "1st", r.batch_size, r.dtype, r.device, r.provider,
             r.peak_mib, r.iterations, r.seconds_per_iter) for r in results]
    table = markdown_table(["setting", "order", "B", "dtype", "device", "provider",
                            "peak memory growth (MiB)", "iters", "s/iter (alone)"], rows)
    print(table)
    return table
