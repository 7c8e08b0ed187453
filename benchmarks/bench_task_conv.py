"""Ways to run a task-batched 3x3 convolution (per-task weights), timed against each other.

MetaLearner convolves B tasks with B different weight sets at every inner step. The strategies:

- ``grouped``: tasks as channel groups, one ``F.conv2d(..., groups=B)`` (cuDNN / oneDNN);
  what MetaLearner runs on CUDA;
- ``explicit``: the same grouped kernels under mamlpp_fast's own autograd formulas (no loop over
  groups in the double backward); what MetaLearner runs on the CPU;
- ``bmm``: ``F.unfold`` (im2col) then one batched matmul over tasks;
- ``loop``: one ``F.conv2d`` per task (the per-task reference's pattern);
- ``triton``: the implicit-GEMM Triton kernels of ``mamlpp_fast.kernels.task_conv`` (CUDA only);
- ``blockdiag``: one dense conv with a block-diagonal weight (B times the work; timed for
  few-channel first layers only).

    python benchmarks/bench_task_conv.py --device cuda --json out.json
    python benchmarks/bench_task_conv.py --quick          # small CPU run
    python benchmarks/bench_task_conv.py --weight-grad    # the weight gradient alone (CPU kernel)

Modes as in bench_bn_lrelu_pool: ``fwd``, ``fwd+bwd`` (input and weight gradients) and ``2nd``
(gradients with create_graph, then the backward of their squared norm: the second-order MAML
pattern, where the grouped weight-gradient is the known slow path). Medians in ms, float32, TF32
off. All strategies are checked against each other before timing.

``--weight-grad`` times the weight and bias gradients alone on channels-last activations, as
MetaLearner runs them on the CPU: ``onednn+sum`` (ATen's grouped convolution backward and a
channel sum, the "explicit" strategy's path for layers with many input channels), ``bmm`` (im2col
and a batched matmul) and ``cpp`` (``torch.ops.mamlpp_fast.task_conv_weight_grad``, one pass over
grad_out, chosen for at most ``CPU_WEIGHT_GRAD_MAX_C_IN`` input channels per task), at the first
layers' shapes and over a sweep of input channels, in float32 and bfloat16.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import env_info, keep_freed_host_memory, markdown_table, measure, write_json  # noqa: E402
from mamlpp_fast.tf32 import disable_tf32  # noqa: E402

STRATEGIES = ("grouped", "explicit", "bmm", "loop", "triton", "blockdiag")
BLOCKDIAG_MAX_CIN = 3  # blockdiag does B times the work: timed on few-channel first layers only
MODES = ("fwd", "fwd+bwd", "2nd")


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str
    B: int      # tasks
    n: int      # images per task
    cin: int
    cout: int
    S: int      # H = W
    mode: str
    strategy: str
    device: str = "cpu"


@dataclasses.dataclass(frozen=True)
class Result:
    config: Config
    median_ms: float
    runs: int
    speedup_vs_grouped: float


def conv_grouped(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [B, n, Cin, H, W], w [B, Cout, Cin, 3, 3], b [B, Cout] -> [B, n, Cout, H, W]."""
    B, n, cin, h, wd = x.shape
    cout = w.shape[1]
    grouped = x.transpose(0, 1).reshape(n, B * cin, h, wd)
    out = F.conv2d(grouped, w.reshape(B * cout, cin, 3, 3), b.reshape(-1), padding=1, groups=B)
    return out.reshape(n, B, cout, h, wd).transpose(0, 1)


def conv_bmm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    B, n, cin, h, wd = x.shape
    cout = w.shape[1]
    cols = F.unfold(x.reshape(B * n, cin, h, wd), 3, padding=1)            # [B*n, Cin*9, H*W]
    cols = cols.reshape(B, n, cin * 9, h * wd).transpose(1, 2).reshape(B, cin * 9, n * h * wd)
    out = torch.baddbmm(b.unsqueeze(2), w.reshape(B, cout, cin * 9), cols)  # [B, Cout, n*H*W]
    return out.reshape(B, cout, n, h, wd).transpose(1, 2)


def conv_loop(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([F.conv2d(x[t], w[t], b[t], padding=1) for t in range(x.shape[0])])


def library_conv(strategy: str) -> Callable:
    """mamlpp_fast.ops.task_conv with `strategy`, in this benchmark's [B, n, C, H, W] layout."""

    def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from mamlpp_fast.ops import task_conv

        B, n, cin, h, wd = x.shape
        grouped = x.transpose(0, 1).reshape(n, B * cin, h, wd)
        out = task_conv(grouped, w, b, strategy=strategy)
        return out.reshape(n, B, w.shape[1], h, wd).transpose(0, 1)

    return conv


CONVS: Dict[str, Callable] = {"grouped": conv_grouped, "explicit": library_conv("explicit"), "bmm": conv_bmm,
                              "loop": conv_loop, "triton": library_conv("triton"),
                              "blockdiag": library_conv("blockdiag")}


def strategies_for(device: str, cin: int) -> List[str]:
    from mamlpp_fast import _backend

    usable = torch.device(device).type == "cuda" and _backend.has_triton()
    return [s for s in STRATEGIES
            if (s != "triton" or usable) and (s != "blockdiag" or cin <= BLOCKDIAG_MAX_CIN)]


def get_shapes(quick: bool) -> List[tuple]:
    shapes = []  # (dataset, n, cin, cout, S)
    for cin, S in ((1, 28), (64, 28), (64, 14), (64, 7)):
        shapes.append(("omniglot20w1s", 20, cin, 64, S))
    for cin, S in ((3, 84), (48, 42), (48, 21), (48, 10)):
        shapes.append(("mini-imagenet5w1s", 5, cin, 48, S))
    tasks = (1, 8, 32)
    if quick:
        shapes = [s for s in shapes if s[4] <= 28][:3]
        tasks = (1, 8)
    return [(d, B, n, ci, co, S) for (d, n, ci, co, S) in shapes for B in tasks]


def make_step(strategy: str, mode: str, x, w, b) -> Callable[[], object]:
    conv = CONVS[strategy]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return conv(x, w, b)
        return step
    cot = torch.randn_like(conv_grouped(x, w, b))

    if mode == "fwd+bwd":
        def step():
            return torch.autograd.grad((conv(x, w, b) * cot).sum(), (x, w, b))
        return step

    def step():
        gx, gw, gb = torch.autograd.grad((conv(x, w, b) * cot).sum(), (x, w, b), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w, b), allow_unused=True)
    return step


def check_agree(x, w, b) -> None:
    """All strategies give the same output and gradients (float64 copies), or stop."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    cot = torch.randn(x.shape[0], x.shape[1], w.shape[1], x.shape[3], x.shape[4],
                      dtype=torch.float64, device=x.device)
    results = {}
    for name in strategies_for(str(x.device), x.shape[2]):
        conv = CONVS[name]
        out = conv(x64, w64, b64)
        grads = torch.autograd.grad((out * cot).sum(), (x64, w64, b64))
        results[name] = (out, *grads)
    for name in [s for s in results if s != "grouped"]:
        for a, e in zip(results[name], results["grouped"]):
            err = ((a - e).norm() / e.norm().clamp_min(1e-300)).item()
            if not err < 1e-10:
                raise SystemExit(f"task conv strategy {name} disagrees with grouped: rel err {err:.2e}")


def weight_grad_providers(device: str) -> Dict[str, Callable]:
    def onednn_sum(x, gy, num_tasks):
        c_in, c_out = x.shape[1] // num_tasks, gy.shape[1] // num_tasks
        weight = x.new_empty(num_tasks * c_out, c_in, 3, 3)
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            gy, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], num_tasks, [False, True, False])
        return grad_w.view(num_tasks, c_out, c_in, 3, 3), gy.sum((0, 2, 3)).view(num_tasks, c_out)

    def bmm(x, gy, num_tasks):
        n, _, h, w = x.shape
        c_in, c_out = x.shape[1] // num_tasks, gy.shape[1] // num_tasks
        cols = F.unfold(x, 3, padding=1).view(n, num_tasks, c_in * 9, h * w).permute(1, 0, 3, 2)
        g = gy.reshape(n, num_tasks, c_out, h * w).permute(1, 2, 0, 3).reshape(num_tasks, c_out, n * h * w)
        grad_w = torch.bmm(g, cols.reshape(num_tasks, n * h * w, c_in * 9))
        return grad_w.view(num_tasks, c_out, c_in, 3, 3), g.sum(2)

    providers = {"onednn+sum": onednn_sum, "bmm": bmm}
    from mamlpp_fast import _backend

    if torch.device(device).type == "cpu" and _backend.has_extension():
        providers["cpp"] = torch.ops.mamlpp_fast.task_conv_weight_grad.default
    return providers


def weight_grad_shapes(quick: bool) -> List[tuple]:
    # (dataset, B, n, C_in, C_out, S): the first layers of the second-order meta-steps (support and
    # target sets), then a sweep of C_in at Omniglot's size to find where oneDNN takes over.
    shapes = [("omniglot20w1s", b, 20, 1, 64, 28) for b in (8, 1, 32)]
    shapes += [("mini-imagenet5w1s", 2, 5, 3, 48, 84), ("mini-imagenet5w1s", 2, 75, 3, 48, 84),
               ("mini-imagenet5w1s", 8, 5, 3, 48, 84)]
    shapes += [("sweep", 8, 20, c_in, 64, 28) for c_in in (2, 4, 8, 16, 64)]
    return [shapes[0], shapes[3]] if quick else shapes


def run_weight_grad(args) -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    providers = weight_grad_providers(args.device)
    rows, results = [], []
    for dataset, B, n, cin, cout, S in weight_grad_shapes(args.quick):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, B * cin, S, S, generator=gen).to(args.device, dtype)
            gy = torch.randn(n, B * cout, S, S, generator=gen).to(args.device, dtype)
            x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
            expected = providers["onednn+sum"](x.double(), gy.double(), B)
            times = {}
            for name, fn in providers.items():
                for a, e in zip(fn(x, gy, B), expected):
                    err = ((a.double() - e).norm() / e.norm()).item()
                    if not err < (1e-4 if dtype == torch.float32 else 2e-2):
                        raise SystemExit(f"weight gradient {name} disagrees with float64: rel err {err:.2e}")
                times[name] = measure(lambda fn=fn: fn(x, gy, B), args.device)
            base = times["onednn+sum"].p50_ms
            for name, timing in times.items():
                rows.append((dataset, B, n, f"{cin}->{cout}", S, str(dtype).replace("torch.", ""), name,
                             f"{timing.p50_ms:.3f}", f"{base / timing.p50_ms:.2f}"))
                results.append({"dataset": dataset, "B": B, "n": n, "cin": cin, "cout": cout, "S": S,
                                "dtype": str(dtype), "provider": name, "median_ms": timing.p50_ms,
                                "reps": timing.reps, "speedup_vs_onednn_sum": base / timing.p50_ms})
    print(markdown_table(["shape", "B", "n", "channels", "S", "dtype", "weight+bias gradient", "ms (median)",
                          "speed-up vs onednn+sum"], rows))
    if args.json:
        write_json(args.json, "bench_task_conv_weight_grad", results)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="few shapes, B in {1, 8}")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--weight-grad", action="store_true",
                        help="time the weight and bias gradients alone (channels-last; see the docstring)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_host_memory(args.device)
    disable_tf32()
    print(f"# {env_info()}")
    if args.weight_grad:
        run_weight_grad(args)
        return
    gen = torch.Generator(device="cpu").manual_seed(0)
    results: List[Result] = []
    for dataset, B, n, cin, cout, S in get_shapes(args.quick):
        x = torch.randn(B, n, cin, S, S, generator=gen).to(args.device).requires_grad_()
        w = (torch.randn(B, cout, cin, 3, 3, generator=gen) * 0.1).to(args.device).requires_grad_()
        b = torch.randn(B, cout, generator=gen).to(args.device).requires_grad_()
        check_agree(x, w, b)
        for mode in args.modes.split(","):
            times = {s: measure(make_step(s, mode, x, w, b), args.device) for s in strategies_for(args.device, cin)}
            base = times["grouped"].p50_ms
            for strategy, timing in times.items():
                config = Config(dataset, B, n, cin, cout, S, mode, strategy, args.device)
                results.append(Result(config, timing.p50_ms, timing.reps, base / timing.p50_ms))
    rows = [(r.config.dataset, r.config.B, r.config.n, f"{r.config.cin}->{r.config.cout}", r.config.S,
             r.config.mode, r.config.strategy, f"{r.median_ms:.4f}", f"{r.speedup_vs_grouped:.2f}")
            for r in results]
    print(markdown_table(["shape", "B", "n", "channels", "S", "mode", "strategy", "ms (median)",
                          "speed-up vs grouped"], rows))
    if args.json:
        write_json(args.json, "bench_task_conv", results)


if __name__ == "__main__":
    main()
