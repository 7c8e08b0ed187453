"""Benchmark of lslr_update (the MAML++ LSLR inner-loop step) at Omniglot 20-way parameter shapes.

    python benchmarks/bench_lslr_update.py [--providers reference,aten,cpp] [--json out.json]

Providers are lslr_update backends: ``reference`` is the per-tensor ATen loop ``theta - lr[k] * g``,
``aten`` the ``torch._foreach_*`` composition, ``cpp``/``cuda``/``triton`` the fused kernels.
Modes: ``fwd`` (the update, recording autograd as in training), ``fwd+bwd`` (plus the gradient
w.r.t. params, grads and lr) and ``fwd+bwd+bwd2`` (a second-order pass through that gradient).
``shared`` configs are inner step 0 (theta shared by all B tasks), others are later steps.
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
from mamlpp_fast.ops import lslr_update  # noqa: E402
from mamlpp_fast.testing import OMNIGLOT_20WAY_SHAPES, lslr_update_inputs  # noqa: E402

MODES = ("fwd", "fwd+bwd", "fwd+bwd+bwd2")


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int
    shared: bool
    mode: str
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


@dataclasses.dataclass(frozen=True)
class Result:
    config: Config
    provider: str
    timing: Timing
    gbps: float  # forward bytes moved (read theta, grads; write out) / p50; 0 for other modes


def get_configs(device: str) -> list[Config]:
    return [Config(b, s, m, device) for b in (1, 8, 32) for s in (True, False) for m in MODES]


def default_providers(device: str) -> list[str]:
    avail = _backend.available_backends()
    fused = [p for p in (("cuda", "triton") if device == "cuda" else ("cpp",)) if p in avail]
    return ["reference", "aten", *fused]


def _step(config: Config, provider: str):
    params, grads, lr = lslr_update_inputs(OMNIGLOT_20WAY_SHAPES, config.batch, shared=config.shared,
                                           device=config.device, dtype=config.dtype,
                                           requires_grad=True)
    inputs = [*params, *grads, lr]
    cot = [torch.randn(g.shape, device=g.device, dtype=g.dtype) for g in grads]

    def run():
        out = lslr_update(params, grads, lr, backend=provider)
        if config.mode == "fwd":
            return out
        first = torch.autograd.grad(out, inputs, cot, create_graph=config.mode != "fwd+bwd")
        if config.mode == "fwd+bwd":
            return first
        return torch.autograd.grad(sum(f.square().sum() for f in first), inputs, allow_unused=True)

    moved = sum(p.numel() + 2 * g.numel() for p, g in zip(params, grads)) * params[0].element_size()
    return run, moved


def run_experiment(config: Config, provider: str, graphed: bool = False) -> Result:
    run, moved = _step(config, provider)
    timing = measure(run, config.device, graphed=graphed)
    gbps = moved / (timing.p50_ms * 1e-3) / 1e9 if config.mode == "fwd" else 0.0
    return Result(config, provider, timing, gbps)


def print_results(results: list[Result]) -> None:
    by_key: dict[tuple, dict[str, Result]] = {}
    providers: list[str] = []
    for r in results:
        by_key.setdefault((r.config.batch, r.config.shared, r.config.mode), {})[r.provider] = r
        if r.provider not in providers:
            providers.append(r.provider)
    header = ["B", "theta", "mode", *[f"{p} ms" for p in providers]]
    if "reference" in providers:
        header += [f"{p} speedup" for p in providers if p != "reference"]
    rows = []
    for (batch, shared, mode), res in by_key.items():
        row = [batch, "shared" if shared else "batched", mode]
        row += [res[p].timing.p50_ms if p in res else "-" for p in providers]
        if "reference" in res:
            ref = res["reference"].timing.p50_ms
            row += [f"{ref / res[p].timing.p50_ms:.2f}x" if p in res else "-"
                    for p in providers if p != "reference"]
        rows.append(row)
    print(markdown_table(header, rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", default=None, help="comma-separated lslr_update backends")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--graphed", action="store_true",
                        help="CUDA: time each call replayed from a CUDA graph (GPU time, no launch overhead); "
                             "the triton provider is left out (its launcher copies from the host, which a "
                             "graph cannot record)")
    args = parser.parse_args(argv)
    if args.graphed and torch.device(args.device).type != "cuda":
        parser.error(f"--graphed needs --device cuda, got {args.device}")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_host_memory(args.device)
    providers = args.providers.split(",") if args.providers else default_providers(args.device)
    if args.graphed:
        providers = [p for p in providers if p != "triton"]
    print(f"# lslr_update, Omniglot 20-way shapes, {args.device}"
          + (" (CUDA-graph replay)" if args.graphed else "") + f": {_backend.describe_backends()}\n")
    results = [run_experiment(c, p, args.graphed) for c in get_configs(args.device) for p in providers]
    print_results(results)
    if args.json:
        write_json(args.json, "lslr_update", results)


if __name__ == "__main__":
    main()
