"""FLOPs of one meta-iteration, achieved GFLOP/s and % of this machine's peak, in one run.

    python benchmarks/bench_roofline.py                          # Omniglot 20w1s + mini-ImageNet 5w1s
    python benchmarks/bench_roofline.py --settings maml++_omniglot_5w1s --reps 3 --threads 1

- Work: `torch.utils.flop_counter.FlopCounterMode` around one full `run_train_iter` (inner
  loops, outer backward incl. double backward, Adam). It counts ATen matmuls and convolutions
  (forward and backward) only; custom C++/CUDA ops are invisible to it, so MetaLearner is
  counted with backend="aten" (its fused BN/activation/pool has no matmul/conv FLOPs anyway)
  and BN, activations, pooling and the optimiser count zero for every provider.
- Peak, measured here in the same process and thread count: a large `F.conv2d` (batch 160,
  64->64 channels, 14x14, 3x3, pad 1) and a 2048^2 fp32 matmul (or --peak-matmul-size).
- Time: providers round-robin (as bench_meta_step), median of --reps after one warm-up.
- Reported: GFLOP/iter (own count), s/iter, achieved GFLOP/s = own FLOPs / time, the
  "useful" rate = the *reference's* FLOPs / time (work-normalised, fair if a provider does
  more or less arithmetic), and % of the conv peak (computed from the useful rate).
- Caveat: FlopCounterMode overcounts grouped `convolution_backward` (its grad-weight term is
  not divided by the groups; MetaLearner's task-batched convs are grouped): at Omniglot 20w1s,
  B=8 it counts 515 GFLOP for MetaLearner against 185 for the reference, while the forward
  convs count the same. So read MetaLearner's "achieved" column as an upper bound and use the
  useful rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meta_step import DEFAULT_SETTINGS, make_provider, random_batch  # noqa: E402
from utils import env_info, markdown_table, time_cpu, time_cuda, write_json  # noqa: E402

from mamlpp_fast import preset  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Peak:
    name: str
    gflop: float
    ms_median: float
    gflops: float


@dataclasses.dataclass(frozen=True)
class RooflineResult:
    setting: str
    second_order: bool
    batch_size: int
    provider: str
    counted_as: str
    gflop_per_iter: float
    seconds_median: float
    achieved_gflops: float
    useful_gflops: float
    pct_of_conv_peak: float
    speedup_vs_reference: float


def measure_peaks(device: str, matmul_size: int) -> List[Peak]:
    timer = time_cuda if torch.device(device).type == "cuda" else (
        lambda fn: time_cpu(fn, warmup=2, min_time_s=1.0, min_reps=5))
    x = torch.randn(160, 64, 14, 14, device=device)
    w = torch.randn(64, 64, 3, 3, device=device)
    conv_flop = 2 * 160 * 64 * 64 * 9 * 14 * 14
    a = torch.randn(matmul_size, matmul_size, device=device)
    b = torch.randn(matmul_size, matmul_size, device=device)
    mm_flop = 2 * matmul_size ** 3
    conv_t = timer(lambda: F.conv2d(x, w, padding=1)).p50_ms
    mm_t = timer(lambda: a @ b).p50_ms
    return [Peak("conv2d 160x64x14x14, 64->64 3x3", conv_flop / 1e9, conv_t, conv_flop / conv_t / 1e6),
            Peak(f"matmul {matmul_size}^2 fp32", mm_flop / 1e9, mm_t, mm_flop / mm_t / 1e6)]


def count_flops(provider: str, config, device: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = make_provider(provider, config, torch.float32, device)
    counter = FlopCounterMode(display=False)
    with counter:
        step(random_batch(config))
    return counter.get_total_flops()


def run(setting: str, second_order: bool, batch_size: int, providers: List[str], reps: int,
        device: str, conv_peak: float) -> List[RooflineResult]:
    config = preset(setting, batch_size=batch_size, second_order=second_order)
    counted = {p: ("mamlpp_fast:aten" if p.startswith("mamlpp_fast") else p) for p in providers}
    flops = {p: count_flops(counted[p], config, device) for p in providers}
    batch = tuple(t.to(device) for t in random_batch(config))
    steps = {p: make_provider(p, config, torch.float32, device) for p in providers}
    for step in steps.values():
        step(batch)
    samples: Dict[str, List[float]] = {p: [] for p in providers}
    for _ in range(reps):
        for p, step in steps.items():
            start = time.perf_counter()
            step(batch)
            samples[p].append(time.perf_counter() - start)
    med = {p: statistics.median(s) for p, s in samples.items()}
    ref_flops = flops.get("reference", float("nan"))
    ref_time = med.get("reference", float("nan"))
    return [RooflineResult(setting, second_order, batch_size, p, counted[p], flops[p] / 1e9, med[p],
                           flops[p] / med[p] / 1e9, ref_flops / med[p] / 1e9,
                           100.0 * ref_flops / med[p] / 1e9 / conv_peak, ref_time / med[p])
            for p in providers]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
    parser.add_argument("--providers", default="reference,mamlpp_fast")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peak-matmul-size", type=int, default=2048)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {env_info()}")
    peaks = measure_peaks(args.device, args.peak_matmul_size)
    print(markdown_table(["peak kernel", "GFLOP", "ms (median)", "GFLOP/s"],
                         [(p.name, p.gflop, p.ms_median, p.gflops) for p in peaks]))
    providers = [p for p in args.providers.split(",") if p]
    results: List[RooflineResult] = []
    for setting in args.settings.split(","):
        batch_size = args.batch_size or preset(setting).batch_size
        results += run(setting, not args.first_order, batch_size, providers, args.reps, args.device,
                       peaks[0].gflops)
    print(markdown_table(
        ["setting", "order", "B", "provider", "counted as", "GFLOP/iter", "s/iter (median)",
         "achieved GFLOP/s", "useful GFLOP/s (ref. FLOPs)", "% of conv peak (useful)", "speed-up vs reference"],
        [(r.setting, "2nd" if r.second_order else "1st", r.batch_size, r.provider, r.counted_as,
          r.gflop_per_iter, r.seconds_median, r.achieved_gflops, r.useful_gflops, r.pct_of_conv_peak,
          r.speedup_vs_reference) for r in results]))
    if args.json:
        write_json(args.json, "bench_roofline", [{"peaks": peaks, "results": results}])


if __name__ == "__main__":
    main()
