"""Triton kernels for ``task_cross_entropy``: per-task mean cross-entropy, accuracy and row
log-sum-exp of logits ``z [B, n, N]`` with int64 labels ``y [B, n]``, the logits' gradient, and
that gradient's derivative (the double backward).

- ``task_cross_entropy_forward``: one program per task b (grid ``(B,)``). It walks the task's n
  rows in blocks of BLOCK_ROWS rows, each a ``[BLOCK_ROWS, BLOCK_N]`` tile (BLOCK_N = the next
  power of two >= N, so a row is one tile row), and computes per row
  ``lse = m + log(sum_c exp(z_c - m))`` (m the row maximum, also when infinite: a row holding
  +inf, or only -inf, gets NaN, as ATen's ``log_softmax``/``cross_entropy``), the argmax (the
  first maximal index; a NaN counts as the maximum, as ``torch.argmax``), and the terms
  ``lse - z_y`` and ``argmax == y``. Each tile row keeps its own running sums, reduced once at
  the end: the n rows of a task are summed in a fixed order (no atomics; deterministic).
  ``loss[b]`` and ``accuracy[b]`` are the sums over n. A label outside ``[0, N)`` is never
  dereferenced: its ``z_y`` reads as NaN (so ``loss[b]`` is NaN) and the row counts as wrong.
  Sums are in float32 for float32 logits, float64 for float64.
- ``task_cross_entropy_backward``: elementwise,
  ``grad[b, i, c] = grad_loss[b] / n * (exp(z[b, i, c] - lse[b, i]) - [c == y[b, i]])``, over
  ``[BLOCK_ROWS, BLOCK_N]`` tiles of the ``[B*n, N]`` rows; a grid of row tiles, capped (each
  program then strides over further tiles). An out-of-range label adds no ``-1`` term.
- ``task_cross_entropy_double_backward``: the derivative of that gradient
  (``s_b (p - onehot(y))``, ``s_b = grad_loss[b] / n``, ``p = exp(z - lse)``) against an incoming
  ``h = grad_grad_logits [B, n, N]``. One program per task b (grid ``(B,)``), walking its n rows in
  ``[BLOCK_ROWS, BLOCK_N]`` tiles as the forward. Per row it forms ``hp = sum_c h p``, stores
  ``grad_logits[b, i, c] = s_b * p * (h - hp)`` and adds ``sum_c h (p - [c == y]) = hp - h_y`` to
  that tile row's running sum; the sums are reduced once at the end (fixed order, no atomics;
  deterministic) into ``grad_grad_loss[b] = total / n``. An out-of-range label has no onehot
  term (``h_y`` reads as 0; never dereferenced). Sums and ``p`` in float32 for float32 logits,
  float64 for float64.

Outputs have the logits' dtype. The differentiable op is ``mamlpp_fast.ops.task_cross_entropy``;
this module holds only the kernels and their launchers (inputs validated by the caller). Run on
CPU tensors with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import accumulator_type, grid_blocks, num_warps_for

__all__ = [
    "task_cross_entropy_backward",
    "task_cross_entropy_double_backward",
    "task_cross_entropy_forward",
]

MAX_CLASSES = 1024  # N per row tile; more classes would need a loop over column blocks
TILE_ELEMENTS = 2048  # BLOCK_ROWS * BLOCK_N, at most


@triton.jit
def _task_ce_fwd_kernel(
    z_ptr, y_ptr, loss_ptr, acc_ptr, lse_ptr, n, N,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    first_row = b.to(tl.int64) * n
    rows = tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    loss_sum = tl.zeros([BLOCK_ROWS], dtype=ACC)
    correct = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    for start in range(0, n, BLOCK_ROWS):
        i = start + rows
        row_ok = i < n
        r = first_row + i
        mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(z_ptr + r[:, None] * N + cols[None, :], mask=mask, other=0.0).to(ACC)
        # padding columns never win; padding rows read as zeros (finite, unused)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # argmax: the first NaN if the row holds one, else the first index of the maximum.
        is_nan = z != z
        first_nan = tl.min(tl.where(is_nan & mask, cols[None, :], BLOCK_N), axis=1)
        m = tl.max(tl.where(is_nan, float("-inf"), z), axis=1)
        first_max = tl.min(tl.where((z == m[:, None]) & mask, cols[None, :], BLOCK_N), axis=1)
        arg = tl.where(first_nan < BLOCK_N, first_nan, first_max)
        # lse; a NaN anywhere in the row makes the sum NaN, and so does an infinite maximum.
        s = tl.sum(tl.exp(z - m[:, None]), axis=1)
        lse = m + tl.log(s)
        tl.store(lse_ptr + r, lse.to(lse_ptr.dtype.element_ty), mask=row_ok)

        y = tl.load(y_ptr + r, mask=row_ok, other=0)
        y_ok = (y >= 0) & (y < N)
        z_y = tl.load(z_ptr + r * N + y, mask=row_ok & y_ok, other=float("nan")).to(ACC)
        loss_sum += tl.where(row_ok, lse - z_y, 0.0)
        correct += (row_ok & y_ok & (arg == y)).to(tl.int32)
    total = tl.sum(loss_sum, axis=0)
    hits = tl.sum(correct, axis=0).to(ACC)
    out_dtype = loss_ptr.dtype.element_ty
    tl.store(loss_ptr + b, (total / n).to(out_dtype))
    tl.store(acc_ptr + b, (hits / n).to(out_dtype))


@triton.jit
def _task_ce_bwd_kernel(
    g_ptr, z_ptr, y_ptr, lse_ptr, out_ptr, n, N, R,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    step = tl.num_programs(0) * BLOCK_ROWS
    for start in range(tl.program_id(0) * BLOCK_ROWS, R, step):
        r = start + rows.to(tl.int64)
        row_ok = r < R
        mask = row_ok[:, None] & col_ok[None, :]
        offs = r[:, None] * N + cols[None, :]
        z = tl.load(z_ptr + offs, mask=mask, other=0.0)
        lse = tl.load(lse_ptr + r, mask=row_ok, other=0.0)
        y = tl.load(y_ptr + r, mask=row_ok, other=-1)
        scale = tl.load(g_ptr + r // n, mask=row_ok, other=0.0) / n
        p = tl.exp(z - lse[:, None])
        # an out-of-range label matches no stored column (a padding column it may equal is masked)
        p = tl.where(cols[None, :] == y[:, None], p - 1.0, p)
        tl.store(out_ptr + offs, (scale[:, None] * p).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _task_ce_dbwd_kernel(
    h_ptr, g_ptr, z_ptr, y_ptr, lse_ptr, ggl_ptr, out_ptr, n, N,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    first_row = b.to(tl.int64) * n
    rows = tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    scale = tl.load(g_ptr + b).to(ACC) / n
    task_sum = tl.zeros([BLOCK_ROWS], dtype=ACC)
    for start in range(0, n, BLOCK_ROWS):
        i = start + rows
        row_ok = i < n
        r = first_row + i
        mask = row_ok[:, None] & col_ok[None, :]
        offs = r[:, None] * N + cols[None, :]
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
        lse = tl.load(lse_ptr + r, mask=row_ok, other=0.0).to(ACC)
        y = tl.load(y_ptr + r, mask=row_ok, other=-1)
        # padding (rows or columns) holds p = 0 and h = 0: it adds nothing to the sums below
        p = tl.where(mask, tl.exp(z - lse[:, None]), 0.0)
        hp = tl.sum(h * p, axis=1)
        grad = scale * p * (h - hp[:, None])
        tl.store(out_ptr + offs, grad.to(out_ptr.dtype.element_ty), mask=mask)
        # sum_c h (p - [c == y]) = hp - h_y; an out-of-range label matches no stored column (h is
        # 0 on padding columns), so h_y = 0
        h_y = tl.sum(tl.where(cols[None, :] == y[:, None], h, 0.0), axis=1)
        task_sum += tl.where(row_ok, hp - h_y, 0.0)
    total = tl.sum(task_sum, axis=0)
    tl.store(ggl_ptr + b, (total / n).to(ggl_ptr.dtype.element_ty))


def _blocks(n_rows: int, N: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_N) for rows of N classes; at most TILE_ELEMENTS per tile."""
    if N > MAX_CLASSES:
        raise ValueError(f"task_cross_entropy (triton): N = {N} classes is more than the "
                         f"{MAX_CLASSES} one row tile holds")
    block_n = triton.next_power_of_2(max(1, N))
    block_rows = max(1, min(triton.next_power_of_2(max(1, n_rows)), TILE_ELEMENTS // block_n))
    return block_rows, block_n


def task_cross_entropy_forward(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss [B], accuracy [B], lse [B, n])`` of logits ``[B, n, N]`` and labels ``[B, n]``
    (validated by the caller), in the logits' dtype."""
    z = logits.contiguous()
    y = labels.contiguous()
    B, n, N = z.shape
    block_rows, block_n = _blocks(n, N)
    loss = z.new_empty(B)
    accuracy = z.new_empty(B)
    lse = z.new_empty(B, n)
    if B == 0:
        return loss, accuracy, lse
    acc = accumulator_type(z.dtype)
    _task_ce_fwd_kernel[(B,)](
        z, y, loss, accuracy, lse, n, N,
        BLOCK_ROWS=block_rows, BLOCK_N=block_n, ACC=acc,
        num_warps=num_warps_for(block_rows * block_n),
    )
    return loss, accuracy, lse


def task_cross_entropy_backward(
    grad_loss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor
) -> Tensor:
    """``grad_logits [B, n, N]`` for ``grad_loss [B]`` and the forward's ``lse [B, n]`` (inputs
    validated by the caller), in the logits' dtype."""
    z = logits.contiguous()
    B, n, N = z.shape
    out = torch.empty_like(z)
    R = B * n
    if R == 0:
        return out
    block_rows, block_n = _blocks(R, N)
    grid = (grid_blocks(R, block_rows),)
    _task_ce_bwd_kernel[grid](
        grad_loss.contiguous(), z, labels.contiguous(), lse.contiguous(), out, n, N, R,
        BLOCK_ROWS=block_rows, BLOCK_N=block_n,
        num_warps=num_warps_for(block_rows * block_n),
    )
    return out


def task_cross_entropy_double_backward(
    grad_grad_logits: Tensor, grad_loss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor]:
    """``(grad_grad_loss [B], grad_logits [B, n, N])``: the derivative of the backward's
    ``grad_logits`` against ``grad_grad_logits [B, n, N]``, for ``grad_loss [B]`` and the forward's
    ``lse [B, n]`` (inputs validated by the caller), in the logits' dtype."""
    z = logits.contiguous()
    B, n, N = z.shape
    block_rows, block_n = _blocks(n, N)
    grad_grad_loss = z.new_empty(B)
    grad_logits = torch.empty_like(z, memory_format=torch.contiguous_format)
    if B == 0:
        return grad_grad_loss, grad_logits
    acc = accumulator_type(z.dtype)
    _task_ce_dbwd_kernel[(B,)](
        grad_grad_logits.contiguous(), grad_loss.contiguous(), z, labels.contiguous(),
        lse.contiguous(), grad_grad_loss, grad_logits, n, N,
        BLOCK_ROWS=block_rows, BLOCK_N=block_n, ACC=acc,
        num_warps=num_warps_for(block_rows * block_n),
    )
    return grad_grad_loss, grad_logits
