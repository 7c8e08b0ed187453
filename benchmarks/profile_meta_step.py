"""Where one MetaLearner meta-iteration spends its time: torch.profiler's top ops and kernels, the
number of kernel launches, and GPU busy time against wall time (launch-bound or compute-bound).

    python benchmarks/profile_meta_step.py --device cuda --setting maml++_omniglot_20w1s
    python benchmarks/profile_meta_step.py --threads 1 --rows 20        # CPU

The profiled iteration is eager (a CUDA-graph replay shows as one opaque launch); two warm-up
iterations run first. Output: a markdown-ish table from torch.profiler and a summary line.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    main()
