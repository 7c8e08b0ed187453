"""``bn_lrelu_pool``: one MAML++ conv stage after the conv, fused into one op family.

    batch_norm(x, batch statistics) -> leaky_relu -> max_pool2d(kernel 2, stride 2)

on the grouped meta-batch layout ``x: (n, G, H, W)`` with ``G = B * C`` (task b's channel c is
channel ``b * C + c``), so per-task batch norm is ordinary per-channel batch norm of the G channels.

Three registered ops (schemas in ``csrc/registration.cpp``, kernels in ``csrc/cpu`` and ``csrc/cuda``):

* ``bn_lrelu_pool_forward(x, weight, bias, eps, negative_slope) -> (y, mean, invstd, indices)``;
  ``indices`` (uint8, pooled shape) is the argmax position 0..3 inside each 2x2 window.
* ``bn_lrelu_pool_backward(grad_y, x, weight, bias, mean, invstd, indices, negative_slope)
  -> (grad_x, grad_weight, grad_bias)``. ``mean``/``invstd``/``indices`` must be the forward's
  outputs for ``x``: they are saved statistics, not free inputs, and get no gradient. An index
  outside 0..3 raises on the CPU; the CUDA kernels read its two low bits (no device-side check,
  which would need a synchronisation), so it never addresses memory outside the window.
* ``bn_lrelu_pool_double_backward(grad_y, x, weight, bias, mean, invstd, indices, grad_grad_x?,
  grad_grad_weight?, grad_grad_bias?, negative_slope) -> (grad_grad_y, grad_x, grad_weight)``: the
  backward of the backward op. It has **no autograd formula**: second-order MAML needs exactly two
  levels (the inner-loop gradient and its derivative), so a third derivative raises.

The math (per channel, ``<.>`` = mean over its ``M = n*H*W`` elements, ``xh = (x - mean) * invstd``,
``D = 1 where z > 0 else slope``, ``P`` = the gather at the argmax positions):

    backward:  u = D * P^T gy;  grad_bias = sum u;  grad_weight = sum u xh;
               grad_x = w r (u - <u> - xh <u xh>)
    double:    A = <u>, Bu = <u xh>, C = <hx xh>
               grad_gy = P(D * (w r (hx - <hx> - xh C) + hw xh + hb))
               S = sum hx (u - A - xh Bu);  grad_w = r S
               q = -w r (Bu hx + C u) + hw u;  grad_x = r (q - <q> - xh <q xh>) - w S r^2 xh / M

(verified against autograd of the reference composition by gradgradcheck and by direct comparison
in tests/ops/test_bn_lrelu_pool.py). The bias gets no second-order gradient: it only moves the
piecewise-constant masks ``D`` and ``P``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..reference.ops import bn_lrelu_pool_reference

__all__ = ["bn_lrelu_pool", "bn_lrelu_pool_backend", "bn_lrelu_aten", "takes_bfloat16_natively"]

_FWD = "mamlpp_fast::bn_lrelu_pool_forward"
_BWD = "mamlpp_fast::bn_lrelu_pool_backward"
_DBWD = "mamlpp_fast::bn_lrelu_pool_double_backward"
_OP_NAME = "bn_lrelu_pool"
_FLOATS = (torch.float32, torch.float64)


def takes_bfloat16_natively(x: Tensor, backend: str | None = None) -> bool:
    """Whether ``bn_lrelu_pool(x, ...)`` for bfloat16 x runs kernels that read and write bfloat16
    (the "cpp" backend with channels-last x), rather than casting x to float32 and y back."""
    return _reads_bfloat16(bn_lrelu_pool_backend(x, backend=backend), x)


def _reads_bfloat16(backend_name: str, x: Tensor) -> bool:
    return backend_name == "cpp" and is_channels_last(x)


def bn_lrelu_pool(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-5,
    negative_slope: float = 0.01,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm (batch statistics) + leaky ReLU + 2x2 max pool, differentiable to second order.

    Args:
        x: ``(n, G, H, W)`` conv output, float32 or float64, ``H, W >= 2``. Each of the G channels
            is normalised over its ``n * H * W`` elements (biased variance, as in training mode).
            Or bfloat16 (a convolution's output under bfloat16 autocast) with float32 weight and
            bias: computed in float32, ``y`` and the gradients of x rounded to bfloat16, exactly
            as casting x to float32 and y back. The "cpp" backend's channels-last kernels read
            and write bfloat16 themselves (no passes for the casts); elsewhere the casts run.
        weight: ``(G,)`` batch-norm scale (gamma).
        bias: ``(G,)`` batch-norm shift (beta).
        eps: added to the variance.
        negative_slope: leaky-ReLU slope for negative inputs.
        backend: "auto" (default: ``mamlpp_fast._backend.get_default_backend()``), "cpp", "cuda",
            "aten" (``torch.native_batch_norm`` + ``leaky_relu`` + ``max_pool2d``), "reference"
            or "triton" (Triton forward kernel, PyTorch-composed backward, any order).

    Returns:
        ``(y, mean, invstd)``: ``y`` is ``(n, G, H // 2, W // 2)`` (odd trailing rows/columns are
        dropped, as ``max_pool2d`` does; channels-last when ``x`` is, on the "cpp" backend, whose
        kernels take that layout as it is), ``mean`` and ``invstd = (var + eps)^-1/2`` are ``(G,)``
        batch statistics for running-statistics bookkeeping; they carry no gradient.

    Example:
        >>> x = torch.randn(20, 2 * 64, 28, 28)   # 20 images, 2 tasks x 64 channels
        >>> y, mean, invstd = bn_lrelu_pool(x, torch.ones(128), torch.zeros(128))
        >>> y.shape
        torch.Size([20, 128, 14, 14])
    """
    name = bn_lrelu_pool_backend(x, backend=backend)
    if x.dtype == torch.bfloat16 and not _reads_bfloat16(name, x):
        _check_forward(x, weight, bias, eps)
        y, mean, invstd = bn_lrelu_pool(x.float(), weight, bias, eps, negative_slope, backend=backend)
        return y.to(torch.bfloat16), mean, invstd
    if name in ("cpp", "cuda"):
        y, mean, invstd, _ = torch.ops.mamlpp_fast.bn_lrelu_pool_forward.default(
            x if name == "cpp" and is_channels_last(x) else x.contiguous(), weight, bias, eps, negative_slope
        )
        return y, mean, invstd
    _check_forward(x, weight, bias, eps)
    if name == "triton":
        from ..kernels.bn_lrelu_pool import bn_lrelu_pool as triton_bn_lrelu_pool

        return triton_bn_lrelu_pool(x.contiguous(), weight, bias, eps, negative_slope)
    if name == "reference":
        return bn_lrelu_pool_reference(x, weight, bias, eps, negative_slope)
    return _bn_lrelu_pool_aten(x, weight, bias, eps, negative_slope)


def bn_lrelu_pool_backend(x: Tensor, *, backend: str | None = None) -> str:
    """The backend ``bn_lrelu_pool(x, ..., backend=backend)`` would run on.

    "auto" never picks Triton: its backward is a PyTorch composition (slower than the CUDA
    kernels' and not measured against ATen's on a GPU), so the ATen composition is the fallback
    when the compiled op is missing.
    """
    requested = backend if backend is not None else _backend.get_default_backend()
    name = _backend.select_backend(_OP_NAME, x.device, requested)
    if requested == "auto" and name == "triton":
        return "aten"
    if name in ("cpp", "cuda") and not _has_op():
        # An _C built before this op existed: fall back rather than fail.
        return "aten" if requested == "auto" else _missing_op(name)
    return name


def bn_lrelu_aten(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, negative_slope: float = 0.01
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm with batch statistics, then leaky ReLU, without the pool (the official
    max_pooling=false stage), as an ATen composition differentiable to any order.

    Args:
        x: ``(n, G, H, W)``; weight, bias: ``(G,)``.

    Returns:
        ``y`` ``(n, G, H, W)``, and the batch ``mean`` and ``invstd`` ``(G,)``, detached.
    """
    # native_batch_norm returns the batch statistics for free; its backward is double-differentiable.
    z, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    return F.leaky_relu(z, negative_slope), mean.detach(), invstd.detach()


def _bn_lrelu_pool_aten(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, slope: float
) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, invstd = bn_lrelu_aten(x, weight, bias, eps, slope)
    return F.max_pool2d(y, kernel_size=2, stride=2), mean, invstd


def _has_op() -> bool:
    return _HAS_OP


def is_channels_last(x: Tensor) -> bool:
    """Whether the CPU kernels take ``x`` in channels-last layout: 4-D, channels-last contiguous
    and not also NCHW-contiguous (as csrc/cpu/bn_lrelu_pool_nhwc.h)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _kernel_layout(x: Tensor) -> torch.memory_format:
    """The layout of the compiled kernels' outputs for ``x``: channels-last where the CPU
    kernels take channels-last ``x``, else NCHW (the CUDA kernels take NCHW only)."""
    if x.device.type != "cuda" and is_channels_last(x):
        return torch.channels_last
    return torch.contiguous_format


def _missing_op(name: str) -> str:
    raise RuntimeError(
        f"{_OP_NAME}: backend {name!r} requested, but the loaded mamlpp_fast._C has no "
        "bn_lrelu_pool ops (rebuild the extension)"
    )


# --- validation (mirrors csrc/bn_lrelu_pool.h) ---------------------------------------------------


def _check_x(op: str, x: Tensor, bfloat16_ok: bool = True) -> None:
    # bfloat16_ok: the public function takes bfloat16 x on every backend (casting where the kernels
    # do not read it); the compiled ops take it channels-last on the CPU only.
    torch._check(x.dim() == 4, lambda: f"{op}: x must be 4-D [n, G, H, W], got shape {list(x.shape)}")
    torch._check(x.dtype in _FLOATS or (bfloat16_ok and x.dtype == torch.bfloat16),
                 lambda: f"{op}: x must be float32 or float64"
                 + (" (or bfloat16)" if bfloat16_ok else " (or bfloat16 in channels-last layout)")
                 + f", got {x.dtype}")
    torch._check(x.shape[0] >= 1, lambda: f"{op}: x must hold at least one image, got shape {list(x.shape)}")
    torch._check(
        x.shape[2] >= 2 and x.shape[3] >= 2,
        lambda: f"{op}: x must have H >= 2 and W >= 2 for 2x2 max pooling, got shape {list(x.shape)}",
    )


def _check_channel_vec(op: str, name: str, t: Tensor, x: Tensor) -> None:
    G = x.shape[1]
    torch._check(
        t.dim() == 1 and t.shape[0] == G,
        lambda: f"{op}: {name} must have shape [G] = [{G}] (one entry per channel of x), "
        f"got shape {list(t.shape)}",
    )
    want = _param_dtype(x)
    torch._check(t.dtype == want,
                 lambda: f"{op}: {name} must have x's dtype (float32 for bfloat16 x): expected {want}, got {t.dtype}")
    torch._check(
        t.device == x.device, lambda: f"{op}: {name} must be on x's device {x.device}, got {t.device}"
    )


def _param_dtype(x: Tensor) -> torch.dtype:
    """The dtype of weight, bias, mean and invstd: x's, float32 for bfloat16 x."""
    return torch.float32 if x.dtype == torch.bfloat16 else x.dtype


def _pooled_shape(x: Tensor) -> list[int]:
    n, G, H, W = x.shape
    return [n, G, H // 2, W // 2]


def _check_pooled(op: str, name: str, t: Tensor, x: Tensor) -> None:
    want = _pooled_shape(x)
    torch._check(
        list(t.shape) == want,
        lambda: f"{op}: {name} must have shape {want} (x pooled 2x2), got {list(t.shape)}",
    )
    torch._check(
        t.device == x.device, lambda: f"{op}: {name} must be on x's device {x.device}, got {t.device}"
    )


def _check_forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, op: str = _OP_NAME,
                   bfloat16_ok: bool = True) -> None:
    _check_x(op, x, bfloat16_ok)
    _check_channel_vec(op, "weight", weight, x)
    _check_channel_vec(op, "bias", bias, x)
    torch._check(eps > 0, lambda: f"{op}: eps must be positive, got {eps}")


def _compiled_bfloat16_ok(x: Tensor) -> bool:
    # As csrc/bn_lrelu_pool.h: the compiled ops take bfloat16 x channels-last on the CPU only.
    return x.device.type != "cuda" and is_channels_last(x)


def _check_layout(op: str, x: Tensor) -> torch.memory_format:
    """The compiled kernels take NCHW x, and on the CPU channels-last x; returns their output layout."""
    layout = _kernel_layout(x)
    torch._check(x.is_contiguous() or layout == torch.channels_last,
                 lambda: f"{op}: x must be contiguous (NCHW)" + (" or channels-last" if x.device.type != "cuda" else ""))
    return layout


def _check_backward(op, grad_y, x, weight, bias, mean, invstd, indices) -> None:
    _check_x(op, x, bfloat16_ok=_compiled_bfloat16_ok(x))
    _check_layout(op, x)
    for name, t in (("weight", weight), ("bias", bias), ("mean", mean), ("invstd", invstd)):
        _check_channel_vec(op, name, t, x)
    _check_pooled(op, "grad_y", grad_y, x)
    torch._check(
        grad_y.dtype == x.dtype, lambda: f"{op}: grad_y must have x's dtype {x.dtype}, got {grad_y.dtype}"
    )
    _check_pooled(op, "indices", indices, x)
    torch._check(indices.dtype == torch.uint8, lambda: f"{op}: indices must be uint8, got {indices.dtype}")


# --- fake (meta) kernels ---------------------------------------------------------------------------


def _forward_fake(x, weight, bias, eps, negative_slope):
    op = "bn_lrelu_pool_forward"
    _check_forward(x, weight, bias, eps, op, bfloat16_ok=_compiled_bfloat16_ok(x))
    layout = _check_layout(op, x)
    pooled = _pooled_shape(x)
    G = x.shape[1]
    # torch.empty with a memory format, as the kernels allocate (strides of size-1 dims included).
    return (
        torch.empty(pooled, dtype=x.dtype, device=x.device, memory_format=layout),
        weight.new_empty([G]),  # the statistics in the parameters' dtype
        weight.new_empty([G]),
        torch.empty(pooled, dtype=torch.uint8, device=x.device, memory_format=layout),
    )


def _backward_fake(grad_y, x, weight, bias, mean, invstd, indices, negative_slope):
    _check_backward("bn_lrelu_pool_backward", grad_y, x, weight, bias, mean, invstd, indices)
    grad_x = torch.empty_like(x, memory_format=_kernel_layout(x))
    return grad_x, torch.empty_like(weight), torch.empty_like(bias)


def _double_backward_fake(
    grad_y, x, weight, bias, mean, invstd, indices, grad_grad_x, grad_grad_weight, grad_grad_bias,
    negative_slope,
):
    op = "bn_lrelu_pool_double_backward"
    _check_backward(op, grad_y, x, weight, bias, mean, invstd, indices)
    for name, h, like in (
        ("grad_grad_x", grad_grad_x, x),
        ("grad_grad_weight", grad_grad_weight, weight),
        ("grad_grad_bias", grad_grad_bias, bias),
    ):
        if h is not None:
            torch._check(
                h.shape == like.shape,
                lambda: f"{op}: {name} must have shape {list(like.shape)}, got {list(h.shape)}",
            )
            torch._check(h.dtype == like.dtype, lambda: f"{op}: {name} must have dtype {like.dtype}, got {h.dtype}")
    layout = _kernel_layout(x)
    return (torch.empty(grad_y.shape, dtype=x.dtype, device=x.device, memory_format=layout),
            torch.empty_like(x, memory_format=layout), torch.empty_like(weight))


# --- autograd --------------------------------------------------------------------------------------
# forward op   -> its backward calls the backward op;
# backward op  -> its backward calls the double-backward op;
# double-backward op: no autograd (the third derivative is never needed by MAML).


def _forward_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps, negative_slope = inputs
    _, mean, invstd, indices = output
    ctx.mark_non_differentiable(mean, invstd, indices)
    ctx.negative_slope = negative_slope
    # Every input gradient needs u = D * P^T gy, hence x, the affine parameters and statistics.
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(x, weight, bias, mean, invstd, indices)


def _forward_backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_indices):
    x, weight, bias, mean, invstd, indices = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.mamlpp_fast.bn_lrelu_pool_backward.default(
        grad_y, x, weight, bias, mean, invstd, indices, ctx.negative_slope
    )
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return (
        grad_x if need_x else None,
        grad_weight if need_w else None,
        grad_bias if need_b else None,
        None,
        None,
    )


def _backward_setup_context(ctx, inputs, output) -> None:
    grad_y, x, weight, bias, mean, invstd, indices, negative_slope = inputs
    ctx.negative_slope = negative_slope
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(grad_y, x, weight, bias, mean, invstd, indices)


def _backward_backward(ctx, grad_grad_x, grad_grad_weight, grad_grad_bias):
    grad_y, x, weight, bias, mean, invstd, indices = ctx.saved_tensors
    d_grad_y, d_x, d_weight = torch.ops.mamlpp_fast.bn_lrelu_pool_double_backward.default(
        grad_y, x, weight, bias, mean, invstd, indices,
        grad_grad_x, grad_grad_weight, grad_grad_bias, ctx.negative_slope,
    )
    need_gy, need_x, need_w = ctx.needs_input_grad[:3]
    # bias, mean, invstd, indices: no gradient (masks and saved statistics), see the module docstring.
    return (
        d_grad_y if need_gy else None,
        d_x if need_x else None,
        d_weight if need_w else None,
        None, None, None, None, None,
    )


def _register() -> None:
    torch.library.register_fake(_FWD, _forward_fake)
    torch.library.register_fake(_BWD, _backward_fake)
    torch.library.register_fake(_DBWD, _double_backward_fake)
    torch.library.register_autograd(_FWD, _forward_backward, setup_context=_forward_setup_context)
    torch.library.register_autograd(_BWD, _backward_backward, setup_context=_backward_setup_context)


# Decided once at import (the library is loaded by mamlpp_fast._backend before this module), which
# also keeps the check out of torch.compile traces.
_HAS_OP = _backend.has_extension() and hasattr(torch.ops.mamlpp_fast, "bn_lrelu_pool_forward")
if _HAS_OP:
    _register()
