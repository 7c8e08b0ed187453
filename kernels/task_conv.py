"""Triton implicit-GEMM kernels for ``task_conv``: per-task 3x3 convolutions, the task in the grid.

Layout (see ``mamlpp_fast.ops.task_conv``): x [n, B*C_in, H, W], weight [B, C_out, C_in, 3, 3],
out [n, B*C_out, H, W], stride 1, zero padding 1.

- ``task_conv_forward``: for task b, out[m, co] = sum_k A[m, k] W[co, k] with m = (image, h, w)
  over n*H*W output pixels, k = (ci, kh, kw) over C_in*9 taps, and A gathered from x on the fly
  (no im2col buffer). Grid (M tiles, C_out tiles, B).
- ``task_conv_weight_grad``: gw[b, co, (ci, kh, kw)] = sum_m gy[m, co] A[m, (ci, kh, kw)], the
  reduction over all n*H*W pixels of the task, split into chunks summed in parallel (a grid of
  C_out tiles x C_in*9 tiles x B alone has too few programs to fill a GPU); grid (C_out tiles,
  C_in*9 tiles, B x chunks), then one sum over the chunks' partial results.
- The input gradient needs no kernel of its own: it is the forward convolution of gy with each
  task's weights transposed (C_in <-> C_out) and flipped (kh, kw -> 2-kh, 2-kw).

The differentiable op is ``mamlpp_fast.ops.task_conv(..., strategy="triton")``; this module holds
the kernels and their launchers only. float32 products use TF32 only when cuDNN's convolutions
may (``mamlpp_fast.tf32.conv_tf32_enabled``: the same switch as the cuDNN path), else IEEE fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..tf32 import conv_tf32_enabled
from ._utils import accumulator_type, cdiv

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 16
_MIN_TILES_PER_CHUNK = 8  # pixel tiles per weight-gradient chunk, at least


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
def _task_conv_wgrad_kernel(x_ptr, gy_ptr, gw_ptr, N_IMG, H, W, C_IN, C_OUT, G_IN, G_OUT, SPLIT, CHUNK,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    # Output tile: gw[s, b, co (BLOCK_M), k = (ci, kh, kw) (BLOCK_N)], the partial sum over the
    # pixels p of chunk s (p in [s * CHUNK, (s + 1) * CHUNK)); the launcher adds the chunks.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    b = pid_z // SPLIT
    s = pid_z % SPLIT
    P = N_IMG * H * W
    K = C_IN * 9
    hw = H * W
    num_tasks = G_OUT // C_OUT
    co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    p_start = s * CHUNK
    p_end = tl.minimum(p_start + CHUNK, P)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for p0 in range(p_start, p_end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        image = p // hw
        pixel = p % hw
        # gy^T tile [BLOCK_M (co), BLOCK_K (p)]
        gy_offsets = (image[None, :] * G_OUT + b * C_OUT + co[:, None]) * hw + pixel[None, :]
        gy_mask = (co[:, None] < C_OUT) & (p[None, :] < p_end)
        gyt = tl.load(gy_ptr + gy_offsets, mask=gy_mask, other=0.0)
        # A tile [BLOCK_K (p), BLOCK_N (k)]
        offsets, inside = _tap_offsets(p, k, H, W, C_IN, G_IN, b)
        a_mask = inside & (p[:, None] < p_end) & (k[None, :] < K)
        a = tl.load(x_ptr + offsets, mask=a_mask, other=0.0)
        acc += tl.dot(gyt, a, input_precision=INPUT_PRECISION)
    gw_offsets = ((s * num_tasks + b) * C_OUT + co[:, None]) * K + k[None, :]
    gw_mask = (co[:, None] < C_OUT) & (k[None, :] < K)
    tl.store(gw_ptr + gw_offsets, acc.to(gw_ptr.dtype.element_ty), mask=gw_mask)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and conv_tf32_enabled():
        return "tf32"
    return "ieee"


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
                                INPUT_PRECISION=_precision(x.dtype), ACC_DTYPE=accumulator_type(x.dtype),
                                num_warps=4)
    return out


def weight_grad_split(programs: int, pixels: int, multiprocessors: int) -> tuple[int, int]:
    """(chunks, pixels per chunk) for the weight gradient's reduction over a task's ``pixels``.

    Without a split the grid has only ``programs`` = C_out tiles x (C_in*9) tiles x B programs
    (72 for Omniglot's 64->64 layers at B=8, 8 for its 1-channel first layer), each summing
    thousands of pixels in series: far fewer than a GPU has multiprocessors. Chunks raise that to
    about two programs per multiprocessor, but each chunk keeps at least ``_MIN_TILES_PER_CHUNK``
    pixel tiles, so the partial sums stay a small fraction of the work. Chunk lengths are whole
    tiles; the last chunk may be shorter.
    """
    if programs < 1 or pixels < 1 or multiprocessors < 1:
        raise ValueError(f"programs, pixels and multiprocessors must be >= 1, got {programs}, {pixels}, {multiprocessors}")
    tiles = cdiv(pixels, BLOCK_K)
    wanted = cdiv(2 * multiprocessors, programs)
    chunks = max(1, min(wanted, tiles // _MIN_TILES_PER_CHUNK))
    chunk = cdiv(tiles, chunks) * BLOCK_K
    return cdiv(pixels, chunk), chunk


def _multiprocessors(device: torch.device) -> int:
    # The interpreter runs programs one after another on the CPU: no split pays there.
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def task_conv_weight_grad(x: Tensor, grad_out: Tensor, num_tasks: int, split: Optional[int] = None) -> Tensor:
    """x [n, B*C_in, H, W], grad_out [n, B*C_out, H, W] -> grad weight [B, C_out, C_in, 3, 3].

    ``split`` forces the number of pixel chunks summed in parallel (tests); by default
    `weight_grad_split` picks it from the device's multiprocessor count.
    """
    x = x.contiguous()
    grad_out = grad_out.contiguous()
    n, g_in, h, w = x.shape
    c_in, c_out = g_in // num_tasks, grad_out.shape[1] // num_tasks
    shape = (num_tasks, c_out, c_in, 3, 3)
    if num_tasks * c_out * c_in == 0:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    pixels = n * h * w
    if pixels == 0:
        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    _check_int32(x, grad_out)
    block_n = 16 if c_in * 9 <= 16 else BLOCK_N  # a 1-channel first layer has only 9 taps
    tiles = (cdiv(c_out, BLOCK_M), cdiv(c_in * 9, block_n))
    if split is None:
        chunks, chunk = weight_grad_split(tiles[0] * tiles[1] * num_tasks, pixels, _multiprocessors(x.device))
    else:
        if split < 1:
            raise ValueError(f"split must be >= 1, got {split}")
        chunk = cdiv(cdiv(pixels, split), BLOCK_K) * BLOCK_K
        chunks = cdiv(pixels, chunk)
    partial = torch.empty((chunks, *shape), dtype=x.dtype, device=x.device)
    grid = (*tiles, num_tasks * chunks)
    _task_conv_wgrad_kernel[grid](x, grad_out, partial, n, h, w, c_in, c_out, g_in, num_tasks * c_out,
                                  chunks, chunk,
                                  BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
                                  INPUT_PRECISION=_precision(x.dtype), ACC_DTYPE=accumulator_type(x.dtype),
                                  num_warps=4)
    return partial[0] if chunks == 1 else partial.sum(0)
