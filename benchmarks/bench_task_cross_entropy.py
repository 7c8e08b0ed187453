"""Benchmark of task_cross_entropy (each task's mean cross-entropy and accuracy) at the official shapes.

    python benchmarks/bench_task_cross_entropy.py [--providers reference,aten,cpp] [--json out.json]

Providers are task_cross_entropy backends: ``reference`` is ``-log_softmax(...).gather`` plus
``argmax``, ``aten`` is ``F.cross_entropy(reduction="none")`` per task plus ``argmax`` (what
MetaLearner ran before the op existed), ``cpp``/``cuda``/``triton`` the fused kernels. Modes:
``fwd`` (loss and accuracy, recording autograd), ``fwd+bwd`` (plus the logits' gradient with
create_graph, as the second-order inner loop takes it) and ``fwd+bwd+bwd2`` (plus the gradient of
that gradient, as the meta-backward takes it). Shapes ``(B, n, N)``: the support and target sets of
Omniglot 20-way 1-shot (n = 20) and mini-ImageNet 5-way 1-shot (target n = 75), B in {1, 8, 32}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import Timing, keep_freed_host_memory, markdown_table, measure, write_json  # noqa: E402

from mamlpp_fast import _backend  # noqa: E402
from mamlpp_fast.ops import task_cross_entropy  # noqa: E402

MODES = ("fwd", "fwd+bwd", "fwd+bwd+bwd2")
# (name, samples per task n, classes N)
SETS = (("omniglot20w1s", 20, 20), ("miniimagenet5w1s-target", 75, 5))


@dataclasses.dataclass(frozen=True)
class Config:
    set_name: str
    batch: int
    samples: int
    classes: int
    mode: str
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


@dataclasses.dataclass(frozen=True)
class Result:
    config: Config
    provider: str
    timing: Timing


def get_configs(device: str) -> list[Config]:
    return [Config(name, b, n, classes, m, device)
            for name, n, classes in SETS for b in (1, 8, 32) for m in MODES]


def default_providers(device: str) -> list[str]:
    avail = _backend.available_backends()
    fused = [p for p in (("cuda", "triton") if device == "cuda" else ("cpp",)) if p in avail]
    return ["reference", "aten", *fused]


def _step(config: Config, provider: str):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(config.batch, config.samples, config.classes, generator=gen, dtype=torch.float64)
    logits = logits.to(config.device, config.dtype).requires_grad_()
    labels = torch.randint(0, config.classes, (config.batch, config.samples), generator=gen).to(config.device)
    weights = torch.rand(config.batch, generator=gen, dtype=torch.float64).to(config.device, config.dtype)

    def run():
        loss, accuracy = task_cross_entropy(logits, labels, backend=provider)
        if config.mode == "fwd":
            return loss, accuracy
        (grad,) = torch.autograd.grad((loss * weights).sum(), logits, create_graph=True)
        if config.mode == "fwd+bwd":
            return grad
        return torch.autograd.grad(grad.square().sum(), logits)

    return run


def run_experiment(config: Config, provider: str, graphed: bool = False) -> Result:
    return Result(config, provider, measure(_step(config, provider), config.device, graphed=graphed))


def print_results(results: list[Result]) -> None:
    by_key: dict[tuple, dict[str, Result]] = {}
    providers: list[str] = []
    for r in results:
        by_key.setdefault((r.config.set_name, r.config.batch, r.config.mode), {})[r.provider] = r
        if r.provider not in providers:
            providers.append(r.provider)
    header = ["shapes", "B", "mode", *[f"{p} ms" for p in providers]]
    if "aten" in providers:
        header += [f"{p} vs aten" for p in providers if p != "aten"]
    rows = []
    for (set_name, batch, mode), res in by_key.items():
        row = [set_name, batch, mode]
        row += [res[p].timing.p50_ms if p in res else "-" for p in providers]
        if "aten" in res:
            base = res["aten"].timing.p50_ms
            row += [f"{base / res[p].timing.p50_ms:.2f}x" if p in res else "-" for p in providers if p != "aten"]
        rows.append(row)
    print(markdown_table(header, rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", default=None, help="comma-separated task_cross_entropy backends")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--graphed", action="store_true",
                        help="CUDA: time each call replayed from a CUDA graph (GPU time, no launch overhead)")
    args = parser.parse_args(argv)
    if args.graphed and torch.device(args.device).type != "cuda":
        parser.error(f"--graphed needs --device cuda, got {args.device}")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_host_memory(args.device)
    providers = args.providers.split(",") if args.providers else default_providers(args.device)
    print(f"# task_cross_entropy, {args.device}" + (" (CUDA-graph replay)" if args.graphed else "")
          + f": {_backend.describe_backends()}\n")
    results = [run_experiment(c, p, args.graphed) for c in get_configs(args.device) for p in providers]
    print_results(results)
    if args.json:
        write_json(args.json, "task_cross_entropy", results)


if __name__ == "__main__":
    main()
