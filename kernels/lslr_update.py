"""Triton multi-tensor kernel for ``lslr_update``: ``out[k] = theta_k - lr[k] * grads[k]``.

One launch covers all P tensors. Program (i, t) handles tensor t and strides over its elements
from block i; a table of raw data pointers (one int64 tensor) says where each tensor lives, and
the kernel casts them back to typed pointers. A shared ``theta_k`` of shape ``[*s_k]`` is read at
``offset % inner`` so it broadcasts over the B tasks without a copy.

The differentiable op is ``mamlpp_fast.ops.lslr_update(..., backend="triton")``; this module holds
only the kernel and its launcher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import data_ptrs, grid_blocks, int64_table, num_warps_for

BLOCK_SIZE = 1024


@triton.jit
def _lslr_update_fwd_kernel(table_ptr, lr_ptr, P, BLOCK: tl.constexpr):
    # table rows: 0 out pointers, 1 theta pointers, 2 grad pointers, 3 numel(out), 4 numel(theta)
    t = tl.program_id(1)
    dtype = lr_ptr.dtype.element_ty
    out = tl.load(table_ptr + t).to(tl.pointer_type(dtype))
    theta = tl.load(table_ptr + P + t).to(tl.pointer_type(dtype))
    grad = tl.load(table_ptr + 2 * P + t).to(tl.pointer_type(dtype))
    n = tl.load(table_ptr + 3 * P + t)
    inner = tl.load(table_ptr + 4 * P + t)
    rate = tl.load(lr_ptr + t)
    step = tl.num_programs(0) * BLOCK
    for start in range(tl.program_id(0) * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        g = tl.load(grad + offs, mask=mask)
        th = tl.load(theta + offs % inner, mask=mask)
        tl.store(out + offs, th - rate * g, mask=mask)


def lslr_update_forward(params: Sequence[Tensor], grads: Sequence[Tensor], lr: Tensor) -> list[Tensor]:
    """Launch the kernel. Inputs as in ``mamlpp_fast.ops.lslr_update`` (validated by the caller)."""
    theta = [p.contiguous() for p in params]
    g = [x.contiguous() for x in grads]
    out = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in grads]
    P = len(out)
    if P == 0 or max(o.numel() for o in out) == 0:
        return out
    table = int64_table(
        [data_ptrs(out), data_ptrs(theta), data_ptrs(g), [o.numel() for o in out],
         [t.numel() for t in theta]],
        lr.device,
    )
    max_numel = max(o.numel() for o in out)
    grid = (grid_blocks(max_numel, BLOCK_SIZE), P)
    _lslr_update_fwd_kernel[grid](table, lr.contiguous(), P, BLOCK=BLOCK_SIZE,
                                  num_warps=num_warps_for(BLOCK_SIZE))
    return out
