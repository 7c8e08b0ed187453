"""Where one MetaLearner meta-iteration spends its time: torch.profiler's top ops and kernels, the
number of kernel launches, and GPU busy time against wall time (launch-bound or compute-bound).

    python benchmarks/profile_meta_step.py --device cuda --setting maml++_omniglot_20w1s
    python benchmarks/profile_meta_step.py --threads 1 --rows 20        # CPU
    python benchmarks/profile_meta_step.py --threads 2 --by-op-wall     # CPU, wall clock per op

`--by-op-wall` times every op of one iteration by wall clock from a TorchDispatchMode, per op and
per op and input shapes, instead of torch.profiler: on a shared CPU VM the profiler's own
bookkeeping inflated memory-bound ops several-fold (a first-layer convolution 11 ms profiled
against 1.5 ms unprofiled), while the dispatch mode adds a few microseconds per call (about 5% of
a meta-step), so its per-op times add up to the unprofiled iteration. One artefact: the mode holds
references to the tensors it sees, so autograd's in-place gradient accumulation (`add_`, taken only
when nobody else holds the gradient) shows as out-of-place `add` under it. CPU only: on CUDA the
ops return before the GPU has run them.
The profiled iteration is eager (a CUDA-graph replay shows as one opaque launch); two warm-up
iterations run first. Output: a markdown-ish table from torch.profiler and a summary line.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meta_step import random_batch  # noqa: E402
from utils import env_info, keep_freed_host_memory  # noqa: E402

from mamlpp_fast import MetaLearner, preset  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="maml++_omniglot_20w1s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--autocast", default=None, choices=("bfloat16",),
                        help="profile MetaLearner(autocast_dtype=...) (default: full precision)")
    parser.add_argument("--allocator", default="keep", choices=("system", "keep"),
                        help="keep (default): keep freed host memory, as mamlpp-train does, so that the "
                             "profile is not of page faults; system: glibc's defaults")
    parser.add_argument("--by-op-wall", action="store_true",
                        help="wall-clock time per op from a TorchDispatchMode instead of torch.profiler (CPU)")
    args = parser.parse_args(argv)
    if args.by_op_wall and torch.device(args.device).type != "cpu":
        parser.error("--by-op-wall times ops on the host: use it with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allocator == "keep":
        keep_freed_host_memory(args.device)
    print(f"# {env_info()}")
    config = preset(args.setting, second_order=not args.first_order)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = MetaLearner(config, device=args.device, backend=args.backend,
                              autocast_dtype=args.autocast)
    batch = tuple(t.to(args.device) for t in random_batch(config))
    cuda = torch.device(args.device).type == "cuda"
    for _ in range(2):
        float(learner.run_train_iter(batch, 0)[0]["loss"])
    # The same iteration unprofiled, for scale: on the CPU the profiler's own bookkeeping can make
    # memory-bound ops look several times slower (a first-layer convolution 11 ms profiled against
    # 1.5 ms unprofiled was seen here), so per-op times are to be read against this.
    start = time.perf_counter()
    float(learner.run_train_iter(batch, 0)[0]["loss"])
    unprofiled_ms = (time.perf_counter() - start) * 1e3
    if args.by_op_wall:
        print_wall_time_by_op(learner, batch, unprofiled_ms, args.rows)
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        float(learner.run_train_iter(batch, 0)[0]["loss"])
        wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    sort_key = "self_cpu_time_total"
    if cuda:
        sort_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    print(events.table(sort_by=sort_key, row_limit=args.rows, max_name_column_width=60))
    if cuda:
        kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        busy_ms = sum(e.device_time if hasattr(e, "device_time") else e.cuda_time for e in kernels) / 1e3
        print(f"summary: {args.setting} backend={learner.active_backends} activations={learner.active_memory_format} autocast={args.autocast} wall {wall_ms:.2f} ms (profiled), "
              f"{unprofiled_ms:.2f} ms unprofiled, {len(kernels)} GPU kernels/copies, GPU busy {busy_ms:.2f} ms "
              f"({100 * busy_ms / wall_ms:.0f}% of wall)")
    else:
        print(f"summary: {args.setting} backend={learner.active_backends} activations={learner.active_memory_format} autocast={args.autocast} wall {wall_ms:.1f} ms (profiled), {unprofiled_ms:.1f} ms unprofiled")


class _WallTimePerOp(TorchDispatchMode):
    """Wall-clock seconds and calls per (op, input shapes), below autograd (so the backward's ops
    are seen as they run)."""

    def __init__(self) -> None:
        super().__init__()
        self.totals: dict = collections.defaultdict(lambda: [0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[:2]
        entry = self.totals[(str(func.overloadpacket), shapes)]
        entry[0] += 1
        entry[1] += elapsed
        return out


def print_wall_time_by_op(learner, batch, unprofiled_ms: float, rows: int) -> None:
    timer = _WallTimePerOp()
    with timer:
        start = time.perf_counter()
        float(learner.run_train_iter(batch, 0)[0]["loss"])
        timed_ms = (time.perf_counter() - start) * 1e3
    by_op: dict = collections.defaultdict(lambda: [0, 0.0])
    for (op, _), (calls, seconds) in timer.totals.items():
        by_op[op][0] += calls
        by_op[op][1] += seconds
    ops_ms = sum(seconds for _, seconds in by_op.values()) * 1e3
    print("| op | calls | ms | % of the iteration |\n|---|---|---|---|")
    for op, (calls, seconds) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"| {op} | {calls} | {seconds * 1e3:.1f} | {100 * seconds * 1e3 / timed_ms:.1f} |")
    print("\n| op | input shapes (first two) | calls | ms |\n|---|---|---|---|")
    for (op, shapes), (calls, seconds) in sorted(timer.totals.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"| {op} | {shapes} | {calls} | {seconds * 1e3:.1f} |")
    print(f"\nsummary: {learner.active_backends} activations={learner.active_memory_format} "
          f"autocast={learner.autocast_dtype}: {timed_ms:.1f} ms timed per op ({ops_ms:.1f} ms inside ops), "
          f"{unprofiled_ms:.1f} ms untimed")


if __name__ == "__main__":
    main()
