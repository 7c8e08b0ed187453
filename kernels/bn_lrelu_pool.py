"""Triton forward kernel of bn_lrelu_pool (batch_norm with batch statistics -> leaky_relu ->
max_pool2d(2, 2)) on the grouped ``(n, G, H, W)`` layout; see mamlpp_fast/ops/bn_lrelu_pool.py.

One program per channel g: two reduction loops (mean, then squared deviations) over the channel's
``n*H*W`` elements, then one loop over its ``n*(H/2)*(W/2)`` pooling windows writing ``y`` and the
uint8 argmax (first max in row-major window order, NaN wins, as ATen).

The backward here is a PyTorch composition over the kernel's argmax. Under ``create_graph`` it
recomputes the batch statistics from ``x`` with differentiable ops, so the backward is itself
differentiable and the op works to any order (second-order MAML). Run on CPU tensors with
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import accumulator_type

__all__ = ["BnLreluPoolFunction", "bn_lrelu_pool", "bn_lrelu_pool_forward"]


@triton.jit
def _bn_lrelu_pool_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, invstd_ptr, idx_ptr,
    n, G, H, W, Ho, Wo, eps, slope,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    g = tl.program_id(0)
    HW = H * W
    M = n * HW
    offs = tl.arange(0, BLOCK)

    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, M, BLOCK):
        e = start + offs
        i = e // HW
        v = tl.load(x_ptr + (i * G + g) * HW + (e - i * HW), mask=e < M, other=0.0)
        acc += v.to(ACC)
    mu = tl.sum(acc, axis=0) / M
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, M, BLOCK):
        e = start + offs
        i = e // HW
        v = tl.load(x_ptr + (i * G + g) * HW + (e - i * HW), mask=e < M, other=0.0).to(ACC)
        d = tl.where(e < M, v - mu, 0.0)
        acc += d * d
    var = tl.sum(acc, axis=0) / M
    invstd = 1.0 / tl.sqrt(var + eps)

    x_dtype = x_ptr.dtype.element_ty
    mean_s = mu.to(x_dtype)
    invstd_s = invstd.to(x_dtype)
    tl.store(mean_ptr + g, mean_s)
    tl.store(invstd_ptr + g, invstd_s)
    # z = x * alpha + shift, the same evaluation as csrc/bn_lrelu_pool.h (bn_affine).
    alpha = tl.load(w_ptr + g) * invstd_s
    shift = tl.load(b_ptr + g) - mean_s * alpha

    P = Ho * Wo
    NP = n * P
    for start in range(0, NP, BLOCK):
        e = start + offs
        mask = e < NP
        i = e // P
        rem = e - i * P
        oh = rem // Wo
        ow = rem - oh * Wo
        base = x_ptr + (i * G + g) * HW + 2 * oh * W + 2 * ow
        z = tl.load(base, mask=mask, other=0.0) * alpha + shift
        best = tl.where(z > 0, z, z * slope)
        arg = tl.zeros([BLOCK], dtype=tl.int32)
        for k in tl.static_range(1, 4):
            z = tl.load(base + (k // 2) * W + (k % 2), mask=mask, other=0.0) * alpha + shift
            a = tl.where(z > 0, z, z * slope)
            take = (a > best) | (a != a)
            best = tl.where(take, a, best)
            arg = tl.where(take, k, arg)
        out = (i * G + g) * P + rem
        tl.store(y_ptr + out, best, mask=mask)
        tl.store(idx_ptr + out, arg.to(tl.uint8), mask=mask)


def bn_lrelu_pool_forward(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, negative_slope: float = 0.01
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernel: ``(y, mean, invstd, indices)`` as the compiled op returns them."""
    assert x.dim() == 4 and x.is_contiguous(), "x must be a contiguous (n, G, H, W) tensor"
    n, G, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    y = x.new_empty(n, G, Ho, Wo)
    mean, invstd = x.new_empty(G), x.new_empty(G)
    indices = torch.empty(n, G, Ho, Wo, dtype=torch.uint8, device=x.device)
    block = min(1024, triton.next_power_of_2(max(32, n * H * W)))
    acc = accumulator_type(x.dtype)
    _bn_lrelu_pool_fwd_kernel[(G,)](
        x, weight.contiguous(), bias.contiguous(), y, mean, invstd, indices,
        n, G, H, W, Ho, Wo, eps, negative_slope,
        BLOCK=block, ACC=acc, num_warps=max(1, min(8, block // 128)),
    )
    return y, mean, invstd, indices


def _bn_lrelu_pool_backward_torch(gy, x, weight, bias, mean, invstd, indices, slope):
    # u = D * P^T gy;  gb = sum u;  gw = sum u xh;  gx = w r (u - <u> - xh <u xh>)
    n, G, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    k = indices.long()
    rows = torch.arange(Ho, device=x.device).view(1, 1, Ho, 1) * 2 + k // 2
    cols = torch.arange(Wo, device=x.device).view(1, 1, 1, Wo) * 2 + k % 2
    flat = (rows * W + cols).reshape(n, G, -1)
    # Out of place, so that autograd differentiates it in gy (double backward).
    scattered = torch.zeros(n, G, H * W, dtype=x.dtype, device=x.device).scatter(2, flat, gy.reshape(n, G, -1))
    shape = (1, G, 1, 1)
    alpha = weight * invstd
    z = x * alpha.view(shape) + (bias - mean * alpha).view(shape)
    # Scalars in torch.where would make a float32 mask; keep x's dtype.
    u = scattered.view(n, G, H, W) * torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))
    xh = (x - mean.view(shape)) * invstd.view(shape)
    gb = u.sum((0, 2, 3))
    gw = (u * xh).sum((0, 2, 3))
    M = n * H * W
    gx = alpha.view(shape) * (u - (gb / M).view(shape) - xh * (gw / M).view(shape))
    return gx, gw, gb


class BnLreluPoolFunction(torch.autograd.Function):
    """Triton forward, PyTorch backward (differentiable again under ``create_graph``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, negative_slope):
        y, mean, invstd, indices = bn_lrelu_pool_forward(x, weight, bias, eps, negative_slope)
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(x, weight, bias, mean, invstd, indices)
        ctx.eps, ctx.negative_slope = eps, negative_slope
        return y, mean, invstd

    @staticmethod
    def backward(ctx, gy, _gmean, _ginvstd):
        x, weight, bias, mean, invstd, indices = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph: the backward depends on x through the batch statistics too, which the
            # kernel's saved values would hide from autograd.
            var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
            invstd = torch.rsqrt(var + ctx.eps)
        gx, gw, gb = _bn_lrelu_pool_backward_torch(
            gy, x, weight, bias, mean, invstd, indices, ctx.negative_slope
        )
        return gx, gw, gb, None, None


def bn_lrelu_pool(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, negative_slope: float = 0.01
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, invstd)`` with the Triton forward; differentiable to any order."""
    return BnLreluPoolFunction.apply(x.contiguous(), weight, bias, eps, negative_slope)
