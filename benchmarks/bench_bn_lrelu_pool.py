"""Benchmark the fused bn_lrelu_pool op against the ATen composition (batch_norm -> leaky_relu ->
max_pool2d) at task-batched MAML++ shapes.

Run from the repository root (after `pip install --no-build-isolation .`):

    python benchmarks/bench_bn_lrelu_pool.py                 # markdown table on stdout
    python benchmarks/bench_bn_lrelu_pool.py --json out.json --providers aten,cpp --quick
    python benchmarks/bench_bn_lrelu_pool.py --providers cpp,cpp+nhwc   # the two CPU layouts

Modes: ``fwd`` (forward only, no autograd), ``fwd+bwd`` (forward + first-order backward) and
``2nd`` (forward, create_graph backward, then the backward of those gradients: the second-order
MAML pattern). Times are medians in milliseconds on float32. ``--graphed`` (CUDA) times each step
replayed from a CUDA graph, as the ops run inside ``MetaLearner(cuda_graphs=True)``: GPU time only,
without the launch and Python overhead that eager timing of these sub-millisecond ops includes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import env_info, keep_freed_host_memory, measure, write_json  # noqa: E402

from mamlpp_fast.ops.bn_lrelu_pool import bn_lrelu_pool  # noqa: E402

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
    device: str = "cpu"
    graphed: bool = False


@dataclasses.dataclass(frozen=True)
class Result:
    config: Config
    median_ms: float
    runs: int


def get_configs(providers: list[str], quick: bool = False, device: str = "cpu", graphed: bool = False) -> list[Config]:
    shapes = []  # (dataset, n, C, S, tasks)
    for S in (28, 14, 7, 3):
        shapes += [("omniglot", 20, 64, S, B) for B in ((1, 8) if S == 28 else (1, 8, 32))]
    for S in (84, 42, 21, 10):
        shapes += [("mini-imagenet", 5, 48, S, B) for B in (1, 8)]
        shapes += [("mini-imagenet", 75, 48, S, 1)]
    if quick:
        shapes = [s for s in shapes if s[4] <= 8 and s[3] <= 42]
    return [
        Config(ds, n, C, B, S, mode, p, device, graphed)
        for (ds, n, C, S, B), mode, p in itertools.product(shapes, MODES, providers)
    ]


def run_experiment(cfg: Config) -> Result:
    gen = torch.Generator().manual_seed(0)
    G = cfg.B * cfg.C
    x0 = torch.randn(cfg.n, G, cfg.S, cfg.S, generator=gen).to(cfg.device)
    w0 = (torch.rand(G, generator=gen) + 0.5).to(cfg.device)
    b0 = (torch.randn(G, generator=gen) * 0.1).to(cfg.device)
    gy = torch.randn(cfg.n, G, cfg.S // 2, cfg.S // 2, generator=gen).to(cfg.device)
    hx = torch.randn_like(x0)
    backend, _, layout = cfg.provider.partition("+")
    if layout == "nhwc":  # the activations channels-last, as MetaLearner(memory_format="channels_last")
        x0, gy, hx = (t.contiguous(memory_format=torch.channels_last) for t in (x0, gy, hx))
    elif layout:
        raise ValueError(f"provider {cfg.provider!r}: the only option is +nhwc")

    def op(x, w, b):
        return bn_lrelu_pool(x, w, b, backend=backend)[0]

    if cfg.mode == "fwd":
        def step():
            with torch.no_grad():
                op(x0, w0, b0)
    else:
        x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        if cfg.mode == "fwd+bwd":
            def step():
                torch.autograd.grad(op(x, w, b), (x, w, b), gy)
        else:
            gyr = gy.clone().requires_grad_()

            def step():
                gx, gw, _ = torch.autograd.grad(op(x, w, b), (x, w, b), gyr, create_graph=True)
                loss = (gx * hx).sum() + gw.square().sum()
                torch.autograd.grad(loss, (gyr, x, w))

    timing = measure(step, cfg.device, graphed=cfg.graphed)
    return Result(cfg, timing.p50_ms, timing.reps)


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
    parser.add_argument("--providers", default=None,
                        help="comma list, first is the baseline (default: aten,cpp,cpp+nhwc on CPU; aten,cuda "
                             "on CUDA); +nhwc: the inputs channels-last")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--graphed", action="store_true",
                        help="CUDA: time each step replayed from a CUDA graph (GPU time, no launch overhead)")
    args = parser.parse_args()
    if args.graphed and torch.device(args.device).type != "cuda":
        parser.error(f"--graphed needs --device cuda, got {args.device}")
    keep_freed_host_memory(args.device)
    default = "aten,cuda" if torch.device(args.device).type == "cuda" else "aten,cpp,cpp+nhwc"
    providers = (args.providers or default).split(",")
    results = [run_experiment(c) for c in get_configs(providers, args.quick, args.device, args.graphed)]
    print(f"# {env_info()}" + (" (CUDA-graph replay)" if args.graphed else "") + "\n")
    print_results(results, providers)
    if args.json:
        write_json(args.json, "bench_bn_lrelu_pool", results)


if __name__ == "__main__":
    main()
