"""Would a channels-last (NHWC) pipeline make task_conv faster? The second-order MAML pattern of
one layer, NCHW against NHWC tensors.

MetaLearner keeps activations NCHW ([n, B*C, H, W], tasks as channel groups) because its fused
batch-norm kernels are written for that layout. cuDNN (and oneDNN) often prefer NHWC and transpose
internally otherwise. This measures what the convolutions alone would gain if the whole pipeline
were NHWC, before anyone rewrites the fused kernels for it: the inputs, weights and incoming
gradients are created in the layout, so no conversion is timed.

The pattern per layer (B tasks, grouped conv): y = conv(x_s, w) on the support images; the inner
gradients of a loss of y with create_graph (weight, and input where C_in > 1); y' = conv(x_t, w -
0.1 g_w) on the target images; then the outer gradient of a loss of y' plus the inner input
gradient's squared norm, through everything. That is the forward, backward and double backward a
meta-step runs per layer and inner step.

    python benchmarks/bench_task_conv_layout.py --device cuda --json out.json   # TF32 as PyTorch's default
    python benchmarks/bench_task_conv_layout.py --threads 2                     # CPU

Medians in ms; the two layouts are checked to agree (float64) before timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import env_info, keep_freed_host_memory, markdown_table, measure, write_json  # noqa: E402
from mamlpp_fast.tf32 import conv_tf32_enabled, disable_tf32  # noqa: E402

LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


@dataclasses.dataclass(frozen=True)
class Config:
    setting: str
    B: int          # tasks
    n_support: int  # images per task
    n_target: int
    cin: int
    cout: int
    S: int          # H = W
    layout: str = "NCHW"
    device: str = "cpu"


@dataclasses.dataclass(frozen=True)
class Result:
    config: Config
    median_ms: float
    runs: int
    speedup_vs_nchw: float


def layers(quick: bool) -> List[Config]:
    """Each conv layer of two official configs (quick: one small layer of each)."""
    rows = [Config("omniglot20w1s", 8, 20, 20, cin, 64, s) for cin, s in ((1, 28), (64, 14), (64, 7), (64, 3))]
    rows += [Config("mini-imagenet5w1s", 2, 5, 75, cin, 48, s) for cin, s in ((3, 84), (48, 42), (48, 21), (48, 10))]
    return [r for r in rows if r.S in (7, 10)] if quick else rows


def make_tensors(row: Config, layout: str, device: str, dtype: torch.dtype, seed: int = 0):
    B, n_s, n_t, cin, cout, S = row.B, row.n_support, row.n_target, row.cin, row.cout, row.S
    gen = torch.Generator(device="cpu").manual_seed(seed)
    fmt = LAYOUTS[layout]

    def make(*shape, scale=1.0, grad=False):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)
        t = t.contiguous(memory_format=fmt) if t.dim() == 4 else t
        return t.requires_grad_(grad)

    x_s = make(n_s, B * cin, S, S, grad=cin > 1)  # a layer input that needs a gradient, except images
    x_t = make(n_t, B * cin, S, S, grad=cin > 1)
    w = make(B * cout, cin, 3, 3, scale=0.1, grad=True)
    r_s = make(n_s, B * cout, S, S)  # fixed "upstream" cotangents, in the layout
    r_t = make(n_t, B * cout, S, S)
    return x_s, x_t, w, r_s, r_t, B


def second_order_step(tensors) -> Callable[[], tuple]:
    x_s, x_t, w, r_s, r_t, B = tensors
    needs_input_grad = x_s.requires_grad

    def step():
        y = F.conv2d(x_s, w, padding=1, groups=B)
        inputs = (w, x_s) if needs_input_grad else (w,)
        grads = torch.autograd.grad((y * y * r_s).sum(), inputs, create_graph=True)
        y_t = F.conv2d(x_t, w - 0.1 * grads[0], padding=1, groups=B)
        outer = (y_t * r_t).sum() + sum((g * g).sum() for g in grads[1:])
        return torch.autograd.grad(outer, inputs + ((x_t,) if needs_input_grad else ()))

    return step


def check_layouts_agree(row: Config, device: str) -> None:
    results = [second_order_step(make_tensors(row, layout, device, torch.float64))() for layout in LAYOUTS]
    for a, e in zip(*results):
        err = ((a - e).norm() / e.norm().clamp_min(1e-300)).item()
        if not err < 1e-10:
            raise SystemExit(f"NCHW and NHWC disagree for {row}: rel err {err:.2e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small layer per setting (a smoke run)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-tf32", action="store_true", help="cuDNN in full float32 (default: PyTorch's TF32 convs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_tf32:
        disable_tf32()
    keep_freed_host_memory(args.device)  # as mamlpp-train does: no page faults in the timings
    print(f"# {env_info()}")
    print(f"# TF32 convolutions: {conv_tf32_enabled()}")
    results: List[Result] = []
    for row in layers(args.quick):
        check_layouts_agree(row, args.device)
        times = {layout: measure(second_order_step(make_tensors(row, layout, args.device, torch.float32)), args.device)
                 for layout in LAYOUTS}
        base = times["NCHW"].p50_ms
        for layout, timing in times.items():
            config = dataclasses.replace(row, layout=layout, device=args.device)
            results.append(Result(config, timing.p50_ms, timing.reps, base / timing.p50_ms))
    rows = [(c.setting, c.B, f"{c.n_support}+{c.n_target}", f"{c.cin}->{c.cout}", c.S, c.layout,
             f"{r.median_ms:.3f}", f"{r.speedup_vs_nchw:.2f}") for r in results for c in (r.config,)]
    print(markdown_table(["setting", "B", "images", "channels", "S", "layout", "ms (median)",
                          "speed-up vs NCHW"], rows))
    if args.json:
        write_json(args.json, "bench_task_conv_layout", results)


if __name__ == "__main__":
    main()
