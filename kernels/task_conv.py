"""Triton implicit-GEMM kernels for ``task_conv``: per-task 3x3 convolutions, the task in the grid.

Layout (see ``mamlpp_fast.ops.task_conv``): x [n, B*C_in, H, W], weight [B, C_out, C_in, 3, 3],
out [n, B*C_out, H, W], stride 1, zero padding 1.

- ``task_conv_forward``: for task b, out[m, co] = sum_k A[m, k] W[co, k] with m = (image, h, w)
  over n*H*W output pixels, k = (ci, kh, kw) over C_in*9 taps, and A gathered from x on the fly
  (no im2col buffer). Grid (M tiles, C_out tiles, B).
- ``task_conv_weight_grad``: gw[b, co, (ci, kh, kw)] = sum_m gy[m, co] A[m, (ci, kh, kw)], the
  reduction over all n*H*W pixels of the task; grid (C_out tiles, C_in*9 tiles, B).
- The input gradient needs no kernel of its own: it is the forward convolution of gy with each
  task's weights transposed (C_in <-> C_out) and flipped (kh, kw -> 2-kh, 2-kw).

The differentiable op is ``mamlpp_fast.ops.task_conv(..., strategy="triton")``; this module holds
the kernels and their launchers only. float32 products use TF32 only when
``torch.backends.cudnn.allow_tf32`` allows it (the same switch as the cuDNN path), else IEEE fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import cdiv

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 16


@triton.jit
def _tap_offsets(m, k, H, W, C_IN, G_IN, b):
    """Offsets into x of A[m, k] for m = (image, h, w), k = (ci, kh, kw), with the padding mask."""
    hw = H * W
    image = m // hw
    pixel = m % hw
    h = pixel // W
    w = pixel % W
    ci = k // 9
    tap = k % 9
    kh = tap // 3
    kw = tap % 3
    hh = h[:, None] + kh[None, :] - 1
    ww = w[:, None] + kw[None, :] - 1
    inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    channel = b * C_IN + ci
    offsets = (image[:, None] * G_IN + channel[None, :]) * hw + hh * W + ww
    return offsets, inside


@triton.jit
def _task_conv_fwd_kernel(x_ptr, w_ptr, out_ptr, N_IMG, H, W, C_IN, C_OUT, G_IN, G_OUT,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    M = N_IMG * H * W
    K = C_IN * 9
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        offsets, inside = _tap_offsets(m, k, H, W, C_IN, G_IN, b)
        a_mask = inside & (m[:, None] < M) & (k[None, :] < K)
        a = tl.load(x_ptr + offsets, mask=a_mask, other=0.0)
        # weight[b, co, k] at (b * C_OUT + co) * K + k, loaded as [BLOCK_K, BLOCK_N]
        w_offsets = (b * C_OUT + co[None, :]) * K + k[:, None]
        w_mask = (co[None, :] < C_OUT) & (k[:, None] < K)
        wt = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0)
        acc += tl.dot(a, wt, input_precision=INPUT_PRECISION)
    hw = H * W
    image = m // hw
    pixel = m % hw
    out_offsets = (image[:, None] * G_OUT + b * C_OUT + co[None, :]) * hw + pixel[:, None]
    out_mask = (m[:, None] < M) & (co[None, :] < C_OUT)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _task_conv_wgrad_kernel(x_ptr, gy_ptr, gw_ptr, N_IMG, H, W, C_IN, C_OUT, G_IN, G_OUT,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    # Output tile: gw[b, co (BLOCK_M), k = (ci, kh, kw) (BLOCK_N)]; reduction over pixels p.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    P = N_IMG * H * W
    K = C_IN * 9
    hw = H * W
    co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for p0 in range(0, P, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        image = p // hw
        pixel = p % hw
        # gy^T tile [BLOCK_M (co), BLOCK_K (p)]
        gy_offsets = (image[None, :] * G_OUT + b * C_OUT + co[:, None]) * hw + pixel[None, :]
        gy_mask = (co[:, None] < C_OUT) & (p[None, :] < P)
        gyt = tl.load(gy_ptr + gy_offsets, mask=gy_mask, other=0.0)
        # A tile [BLOCK_K (p), BLOCK_N (k)]
        offsets, inside = _tap_offsets(p, k, H, W, C_IN, G_IN, b)
        a_mask = inside & (p[:, None] < P) & (k[None, :] < K)
        a = tl.load(x_ptr + offsets, mask=a_mask, other=0.0)
        acc += tl.dot(gyt, a, input_precision=INPUT_PRECISION)
    gw_offsets = (b * C_OUT + co[:, None]) * K + k[None, :]
    gw_mask = (co[:, None] < C_OUT) & (k[None, :] < K)
    tl.store(gw_ptr + gw_offsets, acc.to(gw_ptr.dtype.element_ty), mask=gw_mask)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _accumulator(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_int32(*tensors: Tensor) -> None:
    # Offsets are computed in int32 inside the kernels.
    for t in tensors:
        if t.numel() >= 2**31:
            raise ValueError(f"task_conv (triton): tensors of 2**31 or more elements are not supported, got {list(t.shape)}")


def task_conv_forward(x: Tensor, weight: Tensor) -> Tensor:
    """x [n, B*C_in, H, W], weight [B, C_out, C_in, 3, 3] -> [n, B*C_out, H, W] (no bias).
    Inputs are validated by the caller; they are made contiguous here."""
    x = x.contiguous()
    weight = weight.contiguous()
    b, c_out, c_in = weight.shape[:3]
    n, _, h, w = x.shape
    out = torch.empty((n, b * c_out, h, w), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _check_int32(x, out)
    grid = (cdiv(n * h * w, BLOCK_M), cdiv(c_out, BLOCK_N), b)
    _task_conv_fwd_kernel[grid](x, weight, out, n, h, w, c_in, c_out, b * c_in, b * c_out,
                                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                INPUT_PRECISION=_precision(x.dtype), ACC_DTYPE=_accumulator(x.dtype),
                                num_warps=4)
    return out


def task_conv_weight_grad(x: Tensor, grad_out: Tensor, num_tasks: int) -> Tensor:
    """x [n, B*C_in, H, W], grad_out [n, B*C_out, H, W] -> grad weight [B, C_out, C_in, 3, 3]."""
    x = x.contiguous()
    grad_out = grad_out.contiguous()
    n, g_in, h, w = x.shape
    c_in, c_out = g_in // num_tasks, grad_out.shape[1] // num_tasks
    gw = torch.empty((num_tasks, c_out, c_in, 3, 3), dtype=x.dtype, device=x.device)
    if gw.numel() == 0:
        return gw
    if n * h * w == 0:
        return gw.zero_()
    _check_int32(x, grad_out)
    grid = (cdiv(c_out, BLOCK_M), cdiv(c_in * 9, BLOCK_N), num_tasks)
    _task_conv_wgrad_kernel[grid](x, grad_out, gw, n, h, w, c_in, c_out, g_in, num_tasks * c_out,
                                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                  INPUT_PRECISION=_precision(x.dtype), ACC_DTYPE=_accumulator(x.dtype),
                                  num_warps=4)
    return gw
