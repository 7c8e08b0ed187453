"""Shared benchmark machinery: timing, environment capture, JSON and markdown writers.

Every benchmarks/bench_<op>.py uses these, so numbers from different scripts are comparable.
Timings are reported as p20/p50/p80 in milliseconds.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    p20_ms: float
    p50_ms: float
    p80_ms: float
    reps: int


def _quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return pick(0.2), pick(0.5), pick(0.8)


def time_cpu(fn: Callable[[], Any], *, warmup: int = 3, min_time_s: float = 0.3,
             min_reps: int = 10, max_reps: int = 10_000) -> Timing:
    """Wall-clock samples of ``fn()`` after warmup, until ``min_time_s`` and ``min_reps`` are met."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(*_quantiles(samples), reps=len(samples))


def time_cuda(fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """GPU time of ``fn()``: triton.testing.do_bench (L2 flushed) when available, else CUDA events."""
    try:
        from triton.testing import do_bench

        p20, p50, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
        return Timing(p20, p50, p80, reps=-1)
    except ImportError:
        pass
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(50):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(begin.elapsed_time(end))
    return Timing(*_quantiles(samples), reps=len(samples))


def time_cuda_graph(fn: Callable[[], Any], *, rep_ms: float = 50) -> Timing:
    """GPU time of ``fn()`` replayed from a CUDA graph (triton.testing.do_bench_cudagraph: many
    calls recorded in one graph, no L2 flush): the op's cost inside `MetaLearner(cuda_graphs=True)`,
    free of the launch and Python overhead that dominates small ops in eager timing. Raises when
    ``fn`` cannot be captured."""
    from triton.testing import do_bench_cudagraph

    p20, p50, p80 = do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return Timing(p20, p50, p80, reps=-1)


def keep_freed_host_memory(device: str | torch.device) -> None:
    """On the CPU, keep freed buffers in the process instead of returning them to the kernel, as
    mamlpp-train does (`mamlpp_fast.allocator`). Otherwise every large temporary is page-faulted
    and zeroed again on its next allocation, which adds more to the timings (and their scatter)
    than many of the kernels being timed take."""
    if torch.device(device).type == "cpu":
        from mamlpp_fast.allocator import keep_freed_memory

        keep_freed_memory()


def measure(fn: Callable[[], Any], device: str | torch.device, graphed: bool = False) -> Timing:
    """``fn()``'s time on ``device``; ``graphed``: replayed from a CUDA graph (CUDA only)."""
    if graphed:
        if torch.device(device).type != "cuda":
            raise ValueError(f"graphed timing needs a CUDA device, got {device}")
        return time_cuda_graph(fn)
    return time_cuda(fn) if torch.device(device).type == "cuda" else time_cpu(fn)


def _git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info() -> dict[str, Any]:
    """Machine, versions, backends, git sha and date of this run."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        from mamlpp_fast import _backend

        info["backends"] = _backend.describe_backends()
    except Exception as exc:  # the benchmark still runs its ATen providers
        info["backends"] = f"mamlpp_fast not importable: {exc}"
    return info


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return obj


def write_json(path: str | os.PathLike, benchmark: str, results: Sequence[Any]) -> None:
    """One file per run: ``{"benchmark", "env", "results": [...]}``."""
    payload = {"benchmark": benchmark, "env": env_info(), "results": to_jsonable(list(results))}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
