"""``task_conv``: the task-batched 3x3 convolution of MetaLearner (every task its own weights).

Layout: tasks are channel groups, as everywhere in MetaLearner: x [n, B*C_in, H, W] holds the
n images of each of B tasks, weight [B, C_out, C_in, 3, 3] and bias [B, C_out] are per task, and
the result is [n, B*C_out, H, W] (stride 1, zero padding 1).

Two strategies compute the same function:

- ``"grouped"``: one ``F.conv2d(..., groups=B)`` (cuDNN / oneDNN). Its weight gradient, and the
  convolutions of its double backward, take grouped-convolution paths that are slow for small
  per-group channel counts;
- ``"bmm"``: im2col (``F.unfold``) and one batched matmul over tasks. It moves 9x the input
  through memory but turns every gradient, first and second order, into batched matmuls;
- ``"triton"``: implicit GEMM with the task index in the grid (``mamlpp_fast.kernels.task_conv``):
  a forward kernel and a weight-gradient kernel; the input gradient is the forward kernel on the
  transposed, flipped weights. The two kernels' autograd formulas are written in terms of each
  other, so every order of derivative runs on them. CUDA, or CPU under ``TRITON_INTERPRET=1``.

Both are compositions of differentiable ATen ops, so gradients of any order come from autograd.
``"auto"`` is ``grouped`` on every device, by end-to-end measurement (benchmarks/RESULTS.md,
H200, 2026-11-30): in isolation ``bmm`` wins the second-order pattern for layers with
C_in*9 >= 27 and H*W >= 196 (up to 3.6x at mini-ImageNet's 84x84 first layer, TF32 off), but
inside whole meta-steps, where cuDNN runs in TF32 and the im2col buffers are kept for the outer
backward, a per-layer rule built on that was slower (mini-ImageNet 5w1s 242 vs 106 ms, Omniglot
20w1s under CUDA graphs 29.9 vs 25.3 ms). On the CPU oneDNN's grouped conv beat unfold+bmm at
every Omniglot/mini-ImageNet shape but the 1-channel first layer's second-order pass.

Note on precision: on CUDA, cuDNN convolutions run in TF32 by default
(``torch.backends.cudnn.allow_tf32``) while matmuls do not (``torch.backends.cuda.matmul.allow_tf32``),
so in float32 the two strategies round differently; in float64 they agree to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend

__all__ = ["task_conv", "task_conv_strategy", "STRATEGIES"]

STRATEGIES = ("grouped", "bmm", "triton")
_REQUESTS = ("auto",) + STRATEGIES


def task_conv_strategy(device: torch.device, strategy: str = "auto") -> str:
    """The strategy ``task_conv`` runs on ``device`` when asked for ``strategy`` ("auto" is the
    grouped convolution on every device and layer; "triton" raises where it cannot run)."""
    if strategy not in _REQUESTS:
        raise ValueError(f"task_conv: strategy must be one of {_REQUESTS}, got {strategy!r}")
    if strategy == "triton":
        _backend.select_backend("task_conv", torch.device(device), "triton")  # raises where it cannot run
    return "grouped" if strategy == "auto" else strategy


def _check(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    if weight.dim() != 5 or tuple(weight.shape[3:]) != (3, 3):
        raise ValueError(f"task_conv: weight must be [B, C_out, C_in, 3, 3], got {list(weight.shape)}")
    b, c_out, c_in = weight.shape[:3]
    if x.dim() != 4 or x.shape[1] != b * c_in:
        raise ValueError(
            f"task_conv: x must be [n, B*C_in, H, W] = [n, {b * c_in}, H, W] for weight "
            f"{list(weight.shape)}, got {list(x.shape)}"
        )
    if tuple(bias.shape) != (b, c_out):
        raise ValueError(f"task_conv: bias must be [B, C_out] = [{b}, {c_out}], got {list(bias.shape)}")
    if not (x.dtype == weight.dtype == bias.dtype):
        raise ValueError(f"task_conv: x, weight and bias must share a dtype, got {x.dtype}, "
                         f"{weight.dtype}, {bias.dtype}")
    if not (x.device == weight.device == bias.device):
        raise ValueError(f"task_conv: x, weight and bias must be on one device, got {x.device}, "
                         f"{weight.device}, {bias.device}")


def _task_conv_grouped(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    b, c_out, c_in = weight.shape[:3]
    return F.conv2d(x, weight.reshape(b * c_out, c_in, 3, 3), bias.reshape(b * c_out), padding=1, groups=b)


def _task_conv_bmm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    b, c_out, c_in = weight.shape[:3]
    n, _, h, w = x.shape
    # unfold's rows are channel-major (c * 9 + k), so [n, B*C_in*9, HW] splits as [n, B, C_in*9, HW].
    cols = F.unfold(x, kernel_size=3, padding=1).view(n, b, c_in * 9, h * w)
    cols = cols.permute(1, 2, 0, 3).reshape(b, c_in * 9, n * h * w)
    out = torch.baddbmm(bias.unsqueeze(2), weight.reshape(b, c_out, c_in * 9), cols)  # [B, C_out, n*HW]
    return out.view(b, c_out, n, h, w).permute(2, 0, 1, 3, 4).reshape(n, b * c_out, h, w).contiguous()


def _transpose_flip(weight: Tensor) -> Tensor:
    """[B, C_out, C_in, 3, 3] -> [B, C_in, C_out, 3, 3] rotated 180 degrees: the weights whose
    forward convolution is the input gradient (transposed convolution, stride 1, padding 1)."""
    return weight.transpose(1, 2).flip(-1, -2)


class _TritonTaskConv(torch.autograd.Function):
    """y = conv(x, weight) on the Triton forward kernel (no bias)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        from ..kernels.task_conv import task_conv_forward

        ctx.save_for_backward(x, weight)
        return task_conv_forward(x, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _TritonTaskConv.apply(grad_out, _transpose_flip(weight)) if ctx.needs_input_grad[0] else None
        grad_w = (_TritonTaskConvWeightGrad.apply(x, grad_out, weight.shape[0])
                  if ctx.needs_input_grad[1] else None)
        return grad_x, grad_w


class _TritonTaskConvWeightGrad(torch.autograd.Function):
    """gw = weight gradient of conv(x, .) for output gradient gy, on the Triton kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, grad_out: Tensor, num_tasks: int) -> Tensor:
        from ..kernels.task_conv import task_conv_weight_grad

        ctx.save_for_backward(x, grad_out)
        return task_conv_weight_grad(x, grad_out, num_tasks)

    @staticmethod
    def backward(ctx, grad_grad_w: Tensor):
        x, grad_out = ctx.saved_tensors
        # gw[co, ci, tap] = sum_p gy[co, p] x[ci, p + tap]: linear in x and in gy.
        grad_x = _TritonTaskConv.apply(grad_out, _transpose_flip(grad_grad_w)) if ctx.needs_input_grad[0] else None
        grad_gy = _TritonTaskConv.apply(x, grad_grad_w) if ctx.needs_input_grad[1] else None
        return grad_x, grad_gy, None


def _task_conv_triton(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    b, c_out = weight.shape[:2]
    return _TritonTaskConv.apply(x, weight) + bias.reshape(1, b * c_out, 1, 1)


def task_conv(x: Tensor, weight: Tensor, bias: Tensor, *, strategy: str = "auto") -> Tensor:
    """Per-task 3x3 convolution (stride 1, padding 1) of task-channel-grouped images.

    Args:
        x: [n, B*C_in, H, W], task t's channels at [t*C_in, (t+1)*C_in).
        weight: [B, C_out, C_in, 3, 3], a broadcast (expanded) view is fine.
        bias: [B, C_out].
        strategy: "auto" (default; see the module docstring), "grouped", "bmm" or "triton".

    Returns:
        [n, B*C_out, H, W], contiguous. Differentiable to any order in x, weight and bias.
    """
    _check(x, weight, bias)
    name = task_conv_strategy(x.device, strategy)
    if name == "bmm":
        return _task_conv_bmm(x, weight, bias)
    if name == "triton":
        return _task_conv_triton(x, weight, bias)
    return _task_conv_grouped(x, weight, bias)
