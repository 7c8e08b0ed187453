"""How MetaLearner's time and memory per meta-iteration scale with tasks per meta-batch (B),
inner steps and image size; the reference at a few points for ratios. Plots to PNG.

    python benchmarks/bench_scaling.py                 # full sweep (meant for a GPU)
    python benchmarks/bench_scaling.py --quick --threads 1 --json benchmarks/out/scaling.json

Base point: MAML++ Omniglot 5-way 1-shot (1x28x28, 64 filters, 1 target per class), second
order, 5 steps, B = 8 (quick: 2). Each sweep changes one axis from the base:

- B in {1, 2, 4, 8, 16, 32, 64}      (quick: up to 16)
- inner steps in {1, 5, 10, 20}      (quick: up to 10)
- image size in {28, 56, 84}         (square, 1 channel; the flattened features grow with it)

Time: median s/iter of --reps after one warm-up; where the reference also runs (the first
and last point of each sweep, or every point with --reference-all), both are timed
round-robin in the same loop. --quick: base B=2, 1 rep after the warm-up.

Memory: on CUDA, `torch.cuda.max_memory_allocated()` during the iteration minus the memory
before it. On CPU the process-wide peak RSS cannot be reset between points, so we report the
bytes of tensors the autograd graph saves during the iteration (`saved_tensors_hooks`, unique
storages), which is the dominant, growing part of a meta-iteration's memory; use
`bench_meta_step.py --memory` for process RSS.

Plots: benchmarks/out/scaling_time.png and scaling_memory.png (matplotlib Agg).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meta_step import make_provider, random_batch  # noqa: E402
from utils import env_info, markdown_table, write_json  # noqa: E402

from mamlpp_fast import preset  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
FULL = {"tasks": [1, 2, 4, 8, 16, 32, 64], "steps": [1, 5, 10, 20], "image": [28, 56, 84]}
QUICK = {"tasks": [1, 2, 4, 8, 16], "steps": [1, 5, 10], "image": [28, 56, 84]}


@dataclasses.dataclass(frozen=True)
class Point:
    axis: str
    value: int
    provider: str
    batch_size: int
    steps: int
    image: int
    seconds_median: float
    memory_mib: float
    memory_kind: str
    reps: int
    speedup_vs_reference: Optional[float]


def config_for(base_b: int, axis: str, value: int, second_order: bool):
    b, steps, image = base_b, 5, 28
    if axis == "tasks":
        b = value
    elif axis == "steps":
        steps = value
    else:
        image = value
    return preset("maml++_omniglot_5w1s", batch_size=b, number_of_training_steps_per_iter=steps,
                  number_of_evaluation_steps_per_iter=steps, image_height=image, image_width=image,
                  second_order=second_order), b, steps, image


def saved_tensor_mib(step, batch) -> float:
    seen: Dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch)
    return sum(seen.values()) / 2**20


def cuda_peak_mib(step, batch) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(batch)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure_point(axis, value, providers, base_b, reps, device, second_order) -> List[Point]:
    config, b, steps, image = config_for(base_b, axis, value, second_order)
    batch = random_batch(config)
    fns = {p: make_provider(p, config, torch.float32, device) for p in providers}
    cuda = torch.device(device).type == "cuda"
    memory = {p: (cuda_peak_mib if cuda else saved_tensor_mib)(fn, batch) for p, fn in fns.items()}  # + warm-up
    samples: Dict[str, List[float]] = {p: [] for p in providers}
    for _ in range(reps):
        for p, fn in fns.items():
            start = time.perf_counter()
            fn(batch)
            samples[p].append(time.perf_counter() - start)
    med = {p: statistics.median(s) for p, s in samples.items()}
    ref = med.get("reference")
    return [Point(axis, value, p, b, steps, image, med[p], memory[p],
                  "cuda max_memory_allocated" if cuda else "autograd saved tensors",
                  reps, (ref / med[p]) if ref else None) for p in providers]


def plot(points: List[Point], out_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"tasks": "tasks per meta-batch B", "steps": "inner steps", "image": "image size (px)"}
    paths = []
    for metric, ylabel, name in (("seconds_median", "s / meta-iteration", "scaling_time.png"),
                                 ("memory_mib", f"MiB ({points[0].memory_kind})", "scaling_memory.png")):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, axis in zip(axes, ("tasks", "steps", "image")):
            values = {p.value for p in points if p.axis == axis}
            for provider in sorted({p.provider for p in points}):
                pts = sorted((p for p in points if p.axis == axis and p.provider == provider),
                             key=lambda p: p.value)
                if not pts:
                    continue
                # A provider measured at a few points only (the reference, at the ends by default)
                # gets markers: a line between them would suggest values nobody measured.
                complete = {p.value for p in pts} == values
                ax.plot([p.value for p in pts], [getattr(p, metric) for p in pts], "o-" if complete else "o",
                        label=provider if complete else f"{provider} (measured points)")
            ax.set_xlabel(labels[axis])
            ax.set_ylabel(ylabel)
            if axis == "tasks":
                ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"MAML++ Omniglot 5w1s base, 2nd order: {ylabel}")
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU limits: B <= 16, steps <= 10, base B=2, 1 rep")
    parser.add_argument("--provider", default="mamlpp_fast")
    parser.add_argument("--reference-all", action="store_true", help="reference at every point")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--reps", type=int, default=None, help="default 1 quick, 5 full")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--axes", default="tasks,steps,image")
    parser.add_argument("--json", default=None)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = QUICK if args.quick else FULL
    base_b = 2 if args.quick else 8
    reps = args.reps or (1 if args.quick else 5)
    print(f"# {env_info()}")
    points: List[Point] = []
    for axis in args.axes.split(","):
        values = grid[axis]
        with_ref = set() if args.no_reference else (
            set(values) if args.reference_all else {values[0], values[-1]})
        for value in values:
            providers = [args.provider] + (["reference"] if value in with_ref else [])
            points += measure_point(axis, value, providers, base_b, reps, args.device, not args.first_order)
            print(f"# {axis}={value}: " + ", ".join(f"{p.provider} {p.seconds_median:.3f}s {p.memory_mib:.0f}MiB"
                                                     for p in points[-len(providers):]), flush=True)
    print(markdown_table(
        ["axis", "value", "provider", "B", "steps", "image", "s/iter", "memory MiB", "memory kind", "reps",
         "speed-up vs reference"],
        [(p.axis, p.value, p.provider, p.batch_size, p.steps, p.image, p.seconds_median, p.memory_mib,
          p.memory_kind, p.reps, "" if p.speedup_vs_reference is None else p.speedup_vs_reference)
         for p in points]))
    for path in plot(points, Path(args.out)):
        print(f"# wrote {path}")
    if args.json:
        write_json(args.json, "bench_scaling", points)


if __name__ == "__main__":
    main()
