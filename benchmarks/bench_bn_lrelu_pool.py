"""Benchmark the fused bn_lrelu_pool op against the ATen composition (batch_norm -> leaky_relu ->
max_pool2d) at task-batched MAML++ shapes.

Run from the repository root (after `pip install --no-build-isolation .`):

    python benchmarks/bench_bn_lrelu_pool.py                 # markdown table on stdout
    python benchmarks/bench_bn_lrelu_pool.py --json out.json --providers aten,cpp --quick

Modes: ``fwd`` (forward only, no autograd), ``fwd+bwd`` (forward + first-order backward) and
``2nd`` (forward, create_graph backward, then the backward of those gradients: the second-order
MAML pattern). Times are medians in milliseconds on float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time
from collections.abc import Callable

import torch

from mamlpp_fast.ops.bn_lrelu_pool import bn_lrelu_pool

MODES = ("fwd", "fwd+bwd", "2nd")


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str
    n: int  # images per task
    C: int  # channels per task
    B: int  # tasks (G = B * C)
    S: int  # spatial size (H = W = S)
    mode: str
    provider: str


@dataclasses.dataclass(frozen=True)
class Result:
    config: Config
    median_ms: float
    runs: int


def get_configs(providers: list[str], quick: bool = False) -> list[Config]:
    shapes = []  # (dataset, n, C, S, tasks)
    for S in (28, 14, 7, 3):
        shapes += [("omniglot", 20, 64, S, B) for B in ((1, 8) if S == 28 else (1, 8, 32))]
    for S in (84, 42, 21, 10):
        shapes += [("mini-imagenet", 5, 48, S, B) for B in (1, 8)]
        shapes += [("mini-imagenet", 75, 48, S, 1)]
    if quick:
        shapes = [s for s in shapes if s[4] <= 8 and s[3] <= 42]
    return [
        Config(ds, n, C, B, S, mode, p)
        for (ds, n, C, S, B), mode, p in itertools.product(shapes, MODES, providers)
    ]


def _timeit(fn: Callable[[], object], min_time: float = 0.25, max_runs: int = 50) -> tuple[float, int]:
    fn()  # warm-up (allocator, thread pool)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, len(times)


def run_experiment(cfg: Config) -> Result:
    gen = torch.Generator().manual_seed(0)
    G = cfg.B * cfg.C
    x0 = torch.randn(cfg.n, G, cfg.S, cfg.S, generator=gen)
    w0 = torch.rand(G, generator=gen) + 0.5
    b0 = torch.randn(G, generator=gen) * 0.1
    gy = torch.randn(cfg.n, G, cfg.S // 2, cfg.S // 2, generator=gen)
    hx = torch.randn_like(x0)

    def op(x, w, b):
        return bn_lrelu_pool(x, w, b, backend=cfg.provider)[0]

    if cfg.mode == "fwd":
        def step():
            with torch.no_grad():
                op(x0, w0, b0)
    else:
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        if cfg.mode == "fwd+bwd":
            def step():
                torch.autograd.grad(op(x, w, b), (x, w, b), gy)
        else:
            gyr = gy.clone().requires_grad_()

            def step():
                gx, gw, _ = torch.autograd.grad(op(x, w, b), (x, w, b), gyr, create_graph=True)
                loss = (gx * hx).sum() + gw.square().sum()
                torch.autograd.grad(loss, (gyr, x, w))

    ms, runs = _timeit(step)
    return Result(cfg, ms, runs)


def print_results(results: list[Result], providers: list[str]) -> None:
    by_key: dict[tuple, dict[str, float]] = {}
    for r in results:
        c = r.config
        key = (c.dataset, c.n, c.C, c.B, c.S, c.mode)
        by_key.setdefault(key, {})[c.provider] = r.median_ms
    base = providers[0]
    header = ["dataset", "n", "B*C", "HxW", "mode"] + [f"{p} ms" for p in providers]
    header += [f"{base}/{p}" for p in providers[1:]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (ds, n, C, B, S, mode), t in by_key.items():
        row = [ds, str(n), f"{B}*{C}", f"{S}x{S}", mode] + [f"{t[p]:.2f}" for p in providers]
        row += [f"{t[base] / t[p]:.2f}x" for p in providers[1:]]
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="aten,cpp", help="comma list: aten,cpp,reference")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    args = parser.parse_args()
    providers = args.providers.split(",")
    results = [run_experiment(c) for c in get_configs(providers, args.quick)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32\n")
    print_results(results, providers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "results": [
                        {**dataclasses.asdict(r.config), "median_ms": r.median_ms, "runs": r.runs}
                        for r in results
                    ],
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
