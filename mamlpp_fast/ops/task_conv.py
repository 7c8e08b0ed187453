"""``task_conv``: the task-batched 3x3 convolution of MetaLearner (every task its own weights).

Layout: tasks are channel groups, as everywhere in MetaLearner: x [n, B*C_in, H, W] holds the
n images of each of B tasks, weight [B, C_out, C_in, 3, 3] and bias [B, C_out] are per task, and
the result is [n, B*C_out, H, W] (stride 1, zero padding 1; the official network's other options,
stride 2 and padding 0, run with the ATen strategies only).

Five strategies compute the same function:

- ``"grouped"``: one ``F.conv2d(..., groups=B)`` (cuDNN / oneDNN) under ATen's autograd. Its
  double backward (``_convolution_double_backward``) loops over the B groups for one of its
  terms: 2B extra small convolutions per layer and inner step;
- ``"explicit"``: the same grouped kernels under mamlpp_fast's own autograd formulas: a forward
  convolution, an input-gradient convolution (``conv_transpose2d``) and a weight-gradient
  convolution (``aten.convolution_backward``), each differentiating into the others, so every
  order of derivative is one grouped call per term and nothing loops over groups. On the CPU,
  for layers with few input channels per task (MAML++'s first layer) and channels-last
  activations, the weight and bias gradients come from mamlpp_fast's own kernel
  (``task_conv_weight_grad``, csrc/cpu/task_conv.cpp) in one pass over the output gradient;
- ``"bmm"``: im2col (``F.unfold``) and one batched matmul over tasks. It moves 9x the input
  through memory but turns every gradient, first and second order, into batched matmuls;
- ``"triton"``: implicit GEMM with the task index in the grid (``mamlpp_fast.kernels.task_conv``):
  a forward kernel and a weight-gradient kernel; the input gradient is the forward kernel on the
  transposed, flipped weights, under the same explicit autograd formulas as ``"explicit"``.
  CUDA, or CPU under ``TRITON_INTERPRET=1``;
- ``"blockdiag"``: one dense ``F.conv2d`` whose weight [B*C_out, B*C_in, 3, 3] is zero between
  tasks: B times the FLOPs, but a dense kernel. Meant for the few-channel first layer (C_in = 1),
  which the grouped form sends to ATen's depthwise kernel (3.1 of 25 ms of an Omniglot 20w1s
  meta-step on the H200); pick it per layer, e.g. ``("blockdiag", "auto", "auto", "auto")``.

Gradients of any order come from autograd in all five. ``"auto"``, by end-to-end measurement, is
``explicit`` on the CPU and ``grouped`` on CUDA (and ``grouped`` wherever the stride or padding is
not MAML++'s, which only the ATen strategies implement). On the CPU, ``explicit`` is 1.3-1.5x
faster than ``grouped`` for an isolated second-order pattern (gradients of |dx|^2 + |dw|^2);
inside whole second-order meta-steps it was equal on an AVX2 host and 0.4-11% faster on an
AVX-512 host (all five official settings), and equal in first order, where both run the same
kernels (benchmarks/RESULTS.md). On the H200 (2026-11-30), in isolation ``bmm`` wins the second-order
pattern for layers with C_in*9 >= 27 and H*W >= 196 (up to 3.6x at mini-ImageNet's 84x84 first
layer, TF32 off), but inside whole meta-steps, where cuDNN runs in TF32 and the im2col buffers are
kept for the outer backward, a per-layer rule built on that was slower (mini-ImageNet 5w1s 242 vs 106 ms, Omniglot
20w1s under CUDA graphs 29.9 vs 25.3 ms); ``explicit`` has not been measured on a GPU yet.

Note on precision: on CUDA, cuDNN convolutions run in TF32 by default while matmuls do not
(``torch.backends.cudnn.conv.fp32_precision`` and ``torch.backends.cuda.matmul.fp32_precision``;
``mamlpp_fast.tf32`` reads and sets them on every torch), so in float32 the strategies round
differently; in float64 they agree to rounding.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend

__all__ = ["task_conv", "task_conv_weight_grad", "task_conv_strategy", "task_conv_strategies",
           "check_conv_geometry", "STRATEGIES", "FLEXIBLE_STRATEGIES", "CPU_WEIGHT_GRAD_MAX_C_IN"]

STRATEGIES = ("grouped", "explicit", "bmm", "triton", "blockdiag")
# The strategies whose kernels take any stride and padding (ATen's convolutions under ATen's
# autograd); the others implement MAML++'s stride 1, padding 1 only.
FLEXIBLE_STRATEGIES = ("grouped", "blockdiag")
_REQUESTS = ("auto",) + STRATEGIES


def task_conv_strategy(device: torch.device, strategy: str = "auto", stride: int = 1, padding: int = 1) -> str:
    """The strategy ``task_conv`` runs on ``device`` when asked for ``strategy``: "auto" is
    "explicit" on the CPU and "grouped" on other devices or wherever the stride and padding are
    not 1 and 1; "triton" raises where it cannot run."""
    if strategy not in _REQUESTS:
        raise ValueError(f"task_conv: strategy must be one of {_REQUESTS}, got {strategy!r}")
    device = torch.device(device)
    if strategy == "triton":
        _backend.select_backend("task_conv", device, "triton")  # raises where it cannot run
    if strategy != "auto":
        return strategy
    if device.type == "cpu" and (stride, padding) == (1, 1):
        return "explicit"
    return "grouped"


def task_conv_strategies(device: torch.device, strategy: Union[str, Sequence[str]], num_layers: int,
                         stride: int = 1, padding: int = 1) -> Tuple[str, ...]:
    """The strategy each of ``num_layers`` conv layers runs on ``device``: ``strategy`` is one
    request for every layer, or one per layer, e.g. ``("triton", "grouped", "grouped", "grouped")``
    (layers differ: a 1-channel first layer and the 64-channel ones favour different kernels)."""
    requested = per_layer_requests(strategy, num_layers)
    return tuple(task_conv_strategy(device, item, stride, padding) for item in requested)


def per_layer_requests(strategy: Union[str, Sequence[str]], num_layers: int,
                       argument: str = "task_conv strategy") -> Tuple[str, ...]:
    """``strategy`` as one validated request per layer (names checked, devices not); errors
    start with ``argument``, the name the caller knows the value by."""
    if isinstance(strategy, str):
        requested: Tuple = (strategy,) * num_layers
    else:
        try:
            requested = tuple(strategy)
        except TypeError:
            raise ValueError(f"{argument}: expected a strategy name or one per conv layer, got {strategy!r}") from None
        if len(requested) != num_layers:
            raise ValueError(f"{argument}: a per-layer strategy needs {num_layers} entries, one per conv "
                             f"layer, got {len(requested)}: {requested!r}")
    for item in requested:
        if item not in _REQUESTS:
            raise ValueError(f"{argument}: expected one of {_REQUESTS}, got {item!r}")
    return requested


def check_conv_geometry(strategy: str, stride: int, padding: int, argument: str = "task_conv") -> None:
    """Raise ValueError (starting with `argument`) unless the requested strategy implements the
    stride and padding: 1 and 1 everywhere, the official network's stride 2 / padding 0 on the
    ATen strategies only ("auto" is one)."""
    if stride not in (1, 2):
        raise ValueError(f"{argument}: stride must be 1 or 2, got {stride!r}")
    if padding not in (0, 1):
        raise ValueError(f"{argument}: padding must be 0 or 1, got {padding!r}")
    if (stride, padding) != (1, 1) and strategy not in ("auto",) + FLEXIBLE_STRATEGIES:
        raise ValueError(
            f"{argument}: stride {stride} and padding {padding} (the official max_pooling=false and "
            f"conv_padding=false) run with the strategies {FLEXIBLE_STRATEGIES} (or 'auto'), got {strategy!r}"
        )


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


def _task_conv_bmm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    b, c_out, c_in = weight.shape[:3]
    n, _, h, w = x.shape
    # unfold's rows are channel-major (c * 9 + k), so [n, B*C_in*9, HW] splits as [n, B, C_in*9, HW].
    cols = F.unfold(x, kernel_size=3, padding=1).view(n, b, c_in * 9, h * w)
    cols = cols.permute(1, 2, 0, 3).reshape(b, c_in * 9, n * h * w)
    out = torch.baddbmm(bias.unsqueeze(2), weight.reshape(b, c_out, c_in * 9), cols)  # [B, C_out, n*HW]
    return out.view(b, c_out, n, h, w).permute(2, 0, 1, 3, 4).reshape(n, b * c_out, h, w).contiguous()


def _task_conv_blockdiag(x: Tensor, weight: Tensor, bias: Tensor, stride: int = 1, padding: int = 1) -> Tensor:
    b, c_out, c_in = weight.shape[:3]
    # dense[t, o, u, c] = weight[t, o, c] if u == t else 0, as [B*C_out, B*C_in, 3, 3]. Autograd
    # takes the dense weight gradient (B times the work) and keeps its diagonal blocks.
    same_task = torch.eye(b, dtype=weight.dtype, device=weight.device).view(b, 1, b, 1, 1, 1)
    dense = (weight.unsqueeze(2) * same_task).reshape(b * c_out, b * c_in, 3, 3)
    return F.conv2d(x, dense, bias.reshape(-1), stride=stride, padding=padding)


class _ConvKernels(NamedTuple):
    """The three convolutions a strategy provides (x [n, B*C_in, H, W], w [B, C_out, C_in, 3, 3],
    gy [n, B*C_out, H, W], bias [B, C_out] or None); each is linear in x/gy and in w."""

    forward: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]  # (x, w, bias) -> conv(x, w) + bias
    input_grad: Callable[[Tensor, Tensor], Tensor]  # (gy, w) -> dy/dx^T gy
    # (x, gy, B, with_bias) -> (dy/dw^T gy [B, C_out, C_in, 3, 3], and with_bias db = sum gy [B, C_out], else None)
    weight_grad: Callable[[Tensor, Tensor, int, bool], Tuple[Tensor, Optional[Tensor]]]
    # Optional (gy, x, w, needs [x, w, bias]) -> (gx, gw, gbias): every gradient in one call, for a
    # backward that will not be differentiated again (grad mode off).
    all_grads: Optional[Callable[..., Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]] = None


def _bias_grad(grad_out: Tensor, num_tasks: int) -> Tensor:
    return grad_out.sum(dim=(0, 2, 3)).view(num_tasks, -1)


def _grouped_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int = 1, padding: int = 1) -> Tensor:
    b, c_out, c_in = weight.shape[:3]
    flat_bias = None if bias is None else bias.reshape(b * c_out)
    return F.conv2d(x, weight.reshape(b * c_out, c_in, 3, 3), flat_bias, stride=stride, padding=padding, groups=b)


def _grouped_input_grad(grad_out: Tensor, weight: Tensor) -> Tensor:
    b, c_out, c_in = weight.shape[:3]
    return F.conv_transpose2d(grad_out, weight.reshape(b * c_out, c_in, 3, 3), padding=1, groups=b)


# The C++ weight-gradient kernel (csrc/cpu/task_conv.cpp) replaces oneDNN's for layers with at
# most this many input channels per task (MAML++'s first layer: 1 or 3) and at least
# _CPU_WEIGHT_GRAD_MIN_C_OUT output channels (its vector width), on channels-last CPU activations:
# mini-ImageNet's first layer (75 images, 2 tasks, 3 -> 48 channels, 84x84) 3.7x faster than
# oneDNN and a channel sum, Omniglot's (20 images, 8 tasks, 1 -> 64, 28x28) 2.1x. In bfloat16
# oneDNN is faster from 8 input channels on; in float32 the kernel still wins at 16 and loses at
# 64 (benchmarks/bench_task_conv.py --weight-grad). 0 turns the kernel off (the baseline).
CPU_WEIGHT_GRAD_MAX_C_IN = 4
_CPU_WEIGHT_GRAD_MIN_C_OUT = 16
_CPU_WEIGHT_GRAD_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _cpu_weight_grad_applies(x: Tensor, grad_out: Tensor, num_tasks: int) -> bool:
    channels_last = torch.channels_last
    return (_HAS_WEIGHT_GRAD_OP and x.device.type == "cpu" and x.dtype in _CPU_WEIGHT_GRAD_DTYPES
            and grad_out.dtype == x.dtype
            and x.shape[1] <= CPU_WEIGHT_GRAD_MAX_C_IN * num_tasks
            and grad_out.shape[1] >= _CPU_WEIGHT_GRAD_MIN_C_OUT * num_tasks
            and x.is_contiguous(memory_format=channels_last)
            and grad_out.is_contiguous(memory_format=channels_last))


def _grouped_weight_grad(x: Tensor, grad_out: Tensor, num_tasks: int, with_bias: bool):
    c_out, c_in = grad_out.shape[1] // num_tasks, x.shape[1] // num_tasks
    # convolution_backward reads only the weight's shape, dtype and layout.
    weight_like = x.new_empty(num_tasks, c_out, c_in, 3, 3)
    return _grouped_all_grads(grad_out, x, weight_like, (False, True, with_bias))[1:]


def _grouped_all_grads(grad_out: Tensor, x: Tensor, weight: Tensor, needs: Tuple[bool, bool, bool]):
    # ATen's own convolution backward: one oneDNN/cuDNN call for the input and weight gradients.
    # The bias gradient is an ATen sum: oneDNN's, taken inside its weight-gradient kernel, made
    # the call 3.1x slower for Omniglot's 1-channel first layer (20 x 8 tasks x 28x28: 3.9 ms,
    # against 1.25 ms + 0.8 ms for the sum) and a little slower for every other layer. For
    # few-channel layers on the CPU, mamlpp_fast's own kernel takes both in one pass.
    b, c_out, c_in = weight.shape[:3]
    grad_x = grad_w = grad_b = None
    aten_weight_grad = needs[1]
    if needs[1] and _cpu_weight_grad_applies(x, grad_out, b):
        grad_w, grad_b = torch.ops.mamlpp_fast.task_conv_weight_grad.default(x, grad_out, b)
        aten_weight_grad = False
    if needs[0] or aten_weight_grad:
        grad_x, aten_grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, x, weight.reshape(b * c_out, c_in, 3, 3), None,
            [1, 1], [1, 1], [1, 1], False, [0, 0], b, [needs[0], aten_weight_grad, False])
        if aten_weight_grad:
            grad_w = aten_grad_w.view(b, c_out, c_in, 3, 3)
    if not needs[2]:
        return grad_x, grad_w, None
    return grad_x, grad_w, grad_b if grad_b is not None else _bias_grad(grad_out, b)


def _transpose_flip(weight: Tensor) -> Tensor:
    """[B, C_out, C_in, 3, 3] -> [B, C_in, C_out, 3, 3] rotated 180 degrees: the weights whose
    forward convolution is the input gradient (transposed convolution, stride 1, padding 1)."""
    return weight.transpose(1, 2).flip(-1, -2)


def _triton_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    from ..kernels.task_conv import task_conv_forward

    out = task_conv_forward(x, weight)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


def _triton_input_grad(grad_out: Tensor, weight: Tensor) -> Tensor:
    return _triton_forward(grad_out, _transpose_flip(weight), None)


def _triton_weight_grad(x: Tensor, grad_out: Tensor, num_tasks: int, with_bias: bool):
    from ..kernels.task_conv import task_conv_weight_grad

    return task_conv_weight_grad(x, grad_out, num_tasks), _bias_grad(grad_out, num_tasks) if with_bias else None


_GROUPED_KERNELS = _ConvKernels(_grouped_forward, _grouped_input_grad, _grouped_weight_grad,
                                _grouped_all_grads)
_TRITON_KERNELS = _ConvKernels(_triton_forward, _triton_input_grad, _triton_weight_grad)

# y = conv(x, w) is bilinear, and so are its two gradients. With gy the cotangent of y:
#   conv:        dx = input_grad(gy, w)        dw = weight_grad(x, gy)
#   input_grad:  d(gy) = conv(h, w)            dw = weight_grad(h, gy)     for cotangent h of dx
#   weight_grad: dx = input_grad(gy, h)        d(gy) = conv(x, h)          for cotangent h of dw
# so the three autograd Functions below are written in terms of each other, and derivatives of
# every order run on the same three kernels. The bias gradient, db = sum gy, is an ATen
# reduction taken beside dw; its cotangent hb joins the weight gradient's: d(gy) = conv(x, h) + hb.


class _TaskConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], kernels: _ConvKernels) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.kernels = kernels
        return kernels.forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        k = ctx.kernels
        needs = tuple(ctx.needs_input_grad[:3])
        if k.all_grads is not None and not torch.is_grad_enabled():
            # A first-order backward (no create_graph): nothing differentiates these gradients.
            return (*k.all_grads(grad_out, x, weight, needs), None)
        num_tasks = weight.shape[0]
        grad_x = _TaskConvInputGrad.apply(grad_out, weight, k) if needs[0] else None
        grad_w = grad_b = None
        if needs[1]:
            grads = _TaskConvWeightGrad.apply(x, grad_out, num_tasks, k, needs[2])
            grad_w, grad_b = grads if needs[2] else (grads, None)
        elif needs[2]:
            grad_b = _bias_grad(grad_out, num_tasks)
        return grad_x, grad_w, grad_b, None


class _TaskConvInputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_out: Tensor, weight: Tensor, kernels: _ConvKernels) -> Tensor:
        ctx.save_for_backward(grad_out, weight)
        ctx.kernels = kernels
        return kernels.input_grad(grad_out, weight)

    @staticmethod
    def backward(ctx, h: Tensor):
        grad_out, weight = ctx.saved_tensors
        k = ctx.kernels
        d_grad_out = _TaskConv.apply(h, weight, None, k) if ctx.needs_input_grad[0] else None
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = _TaskConvWeightGrad.apply(h, grad_out, weight.shape[0], k, False)
        return d_grad_out, d_weight, None


class _TaskConvWeightGrad(torch.autograd.Function):
    """(x, gy) -> dw, or (dw, db) with ``with_bias``: db = sum of gy, [B, C_out]. Taking the bias
    gradient here, not as a separate sum, puts its cotangent on the backward's convolution as
    that convolution's bias, so gy's cotangent arrives as one dense tensor. (A separate sum's
    backward hands autograd a broadcast view, which its gradient accumulation cannot add in
    place: an out-of-place broadcast add of an activation-sized tensor per layer and inner step,
    1-3% of a second-order meta-step on the CPU.)"""

    @staticmethod
    def forward(ctx, x: Tensor, grad_out: Tensor, num_tasks: int, kernels: _ConvKernels, with_bias: bool):
        ctx.save_for_backward(x, grad_out)
        ctx.kernels = kernels
        ctx.set_materialize_grads(False)
        grad_w, grad_b = kernels.weight_grad(x, grad_out, num_tasks, with_bias)
        return (grad_w, grad_b) if with_bias else grad_w

    @staticmethod
    def backward(ctx, h: Optional[Tensor], h_bias: Optional[Tensor] = None):
        x, grad_out = ctx.saved_tensors
        return (*_weight_grad_cotangents(x, grad_out, h, h_bias, ctx.needs_input_grad[:2], ctx.kernels),
                None, None, None)


def _weight_grad_cotangents(x: Tensor, grad_out: Tensor, h: Optional[Tensor], h_bias: Optional[Tensor],
                            needs: Tuple[bool, bool], kernels: _ConvKernels):
    """The cotangents of (x, grad_out) for cotangents h of dw and h_bias of db: the weight
    gradient is bilinear in (x, grad_out), so d x = input_grad(grad_out, h) and
    d grad_out = conv(x, h) + h_bias."""
    d_x = d_grad_out = None
    if h is not None and needs[0]:
        d_x = _TaskConvInputGrad.apply(grad_out, h, kernels)
    if needs[1]:
        if h is not None:
            d_grad_out = _TaskConv.apply(x, h, h_bias, kernels)
        elif h_bias is not None:
            d_grad_out = h_bias.reshape(1, -1, 1, 1).expand_as(grad_out)
    return d_x, d_grad_out


def task_conv(x: Tensor, weight: Tensor, bias: Tensor, *, strategy: str = "auto", stride: int = 1,
              padding: int = 1) -> Tensor:
    """Per-task 3x3 convolution of task-channel-grouped images.

    Args:
        x: [n, B*C_in, H, W], task t's channels at [t*C_in, (t+1)*C_in).
        weight: [B, C_out, C_in, 3, 3], a broadcast (expanded) view is fine.
        bias: [B, C_out].
        strategy: "auto" (default: "explicit" on the CPU, "grouped" on CUDA; see the module
            docstring), "grouped", "explicit", "bmm", "triton" or "blockdiag".
        stride, padding: 1 and 1 in MAML++. The official network's other options (stride 2 for
            max_pooling=false, padding 0 for conv_padding=false) run with the ATen strategies
            only: "auto", "grouped" or "blockdiag".

    Returns:
        [n, B*C_out, H', W'], H' = (H + 2 * padding - 3) // stride + 1: in x's memory format
        (contiguous, or channels-last as oneDNN and cuDNN propagate it) for "grouped",
        "explicit" and "blockdiag", contiguous for "bmm" and "triton".
        Differentiable to any order in x, weight and bias.
    """
    x, weight, bias, autocast_off = _autocast_inputs(x, weight, bias)
    _check(x, weight, bias)
    check_conv_geometry(strategy, stride, padding)
    name = task_conv_strategy(x.device, strategy, stride, padding)
    if name == "bmm":
        return _task_conv_bmm(x, weight, bias)
    if name == "blockdiag":
        return _task_conv_blockdiag(x, weight, bias, stride, padding)
    if name in ("triton", "explicit"):
        kernels = _TRITON_KERNELS if name == "triton" else _GROUPED_KERNELS
        with autocast_off:
            return _TaskConv.apply(x, weight, bias, kernels)
    return _grouped_forward(x, weight, bias, stride, padding)  # ATen's autograd


def _autocast_inputs(x: Tensor, weight: Tensor, bias: Tensor):
    """What autocast does to ``F.conv2d``'s inputs, done once for every strategy.

    Under autocast the floating-point inputs other than float64 are cast to the autocast dtype,
    as autocast casts a convolution's (so activations of the autocast dtype meet float32 weights without a dtype
    error). The strategies with their own autograd Functions ("explicit", "triton") then save
    and differentiate, to any order, tensors of that one dtype, as ATen's convolution autograd
    does under autocast; they run with autocast off, since their inputs are cast already. The
    casts are ordinary differentiable ops, so gradients reach float32 leaves in float32.
    Returns (x, weight, bias, a context that turns autocast off).
    """
    device_type = x.device.type
    # Devices without autocast (meta tensors, as under fake-tensor tracing) raise on the query.
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return x, weight, bias, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)
    # As autocast: every floating-point tensor but float64 is cast.
    x, weight, bias = (t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                       for t in (x, weight, bias))
    return x, weight, bias, torch.autocast(device_type, enabled=False)


# --- the C++ weight-gradient op (csrc/cpu/task_conv.cpp) --------------------------------------------

_WEIGHT_GRAD_OP = "mamlpp_fast::task_conv_weight_grad"
_HAS_WEIGHT_GRAD_OP = _backend.has_extension() and hasattr(torch.ops.mamlpp_fast, "task_conv_weight_grad")


def task_conv_weight_grad(x: Tensor, grad_out: Tensor, num_tasks: int) -> Tuple[Tensor, Tensor]:
    """The weight and bias gradients of ``task_conv`` (stride 1, padding 1) for cotangent grad_out.

    Args:
        x: [n, B*C_in, H, W], the convolution's input.
        grad_out: [n, B*C_out, H, W], the cotangent of its output.
        num_tasks: B.

    Returns:
        (grad_weight [B, C_out, C_in, 3, 3], grad_bias [B, C_out]), in x's dtype. On the CPU with
        the compiled extension this is one pass of ``torch.ops.mamlpp_fast.task_conv_weight_grad``
        over grad_out (fastest for channels-last tensors and few input channels, see
        ``CPU_WEIGHT_GRAD_MAX_C_IN``); elsewhere the grouped ATen convolution backward and a sum.
        Differentiable to any order in x and grad_out.
    """
    _check_weight_grad_args(x, grad_out, num_tasks)
    if _HAS_WEIGHT_GRAD_OP and x.device.type == "cpu":
        return tuple(torch.ops.mamlpp_fast.task_conv_weight_grad.default(x, grad_out, num_tasks))
    return _TaskConvWeightGrad.apply(x, grad_out, num_tasks, _GROUPED_KERNELS, True)


def _check_weight_grad_args(x: Tensor, grad_out: Tensor, num_tasks: int) -> None:
    # Mirrors task_conv_weight_grad_cpu's checks (csrc/cpu/task_conv.cpp).
    op = "task_conv_weight_grad"
    torch._check(x.dim() == 4, lambda: f"{op}: x must be 4-D, got shape {tuple(x.shape)}")
    torch._check(grad_out.dim() == 4, lambda: f"{op}: grad_out must be 4-D, got shape {tuple(grad_out.shape)}")
    torch._check(num_tasks > 0, lambda: f"{op}: num_tasks must be positive, got {num_tasks}")
    torch._check(x.dtype == grad_out.dtype,
                 lambda: f"{op}: x and grad_out must share one dtype, got {x.dtype} and {grad_out.dtype}")
    torch._check(x.dtype in _CPU_WEIGHT_GRAD_DTYPES,
                 lambda: f"{op}: x must be float32, float64 or bfloat16, got {x.dtype}")
    torch._check(x.device == grad_out.device,
                 lambda: f"{op}: x and grad_out must be on one device, got {x.device} and {grad_out.device}")
    torch._check(x.shape[0] == grad_out.shape[0] and x.shape[2:] == grad_out.shape[2:],
                 lambda: f"{op}: x [n, B*C_in, H, W] and grad_out [n, B*C_out, H, W] must agree in n, H "
                         f"and W, got {list(x.shape)} and {list(grad_out.shape)}")
    torch._check(x.shape[1] > 0 and grad_out.shape[1] > 0 and x.shape[1] % num_tasks == 0
                 and grad_out.shape[1] % num_tasks == 0,
                 lambda: f"{op}: the channels of x ({x.shape[1]}) and of grad_out ({grad_out.shape[1]}) "
                         f"must be positive multiples of num_tasks ({num_tasks})")


def _weight_grad_fake(x: Tensor, grad_out: Tensor, num_tasks: int) -> Tuple[Tensor, Tensor]:
    _check_weight_grad_args(x, grad_out, num_tasks)
    c_in, c_out = x.shape[1] // num_tasks, grad_out.shape[1] // num_tasks
    return x.new_empty(num_tasks, c_out, c_in, 3, 3), x.new_empty(num_tasks, c_out)


def _weight_grad_setup_context(ctx, inputs, output) -> None:
    x, grad_out, _ = inputs
    ctx.save_for_backward(x, grad_out)


def _weight_grad_backward(ctx, h: Optional[Tensor], h_bias: Optional[Tensor]):
    # The same formulas as _TaskConvWeightGrad.backward, on the grouped kernels, so every further
    # order is differentiable too.
    x, grad_out = ctx.saved_tensors
    return (*_weight_grad_cotangents(x, grad_out, h, h_bias, ctx.needs_input_grad[:2], _GROUPED_KERNELS), None)


if _HAS_WEIGHT_GRAD_OP:
    torch.library.register_fake(_WEIGHT_GRAD_OP, _weight_grad_fake)
    torch.library.register_autograd(_WEIGHT_GRAD_OP, _weight_grad_backward,
                                    setup_context=_weight_grad_setup_context)
