"""Launch helpers shared by the Triton kernels (no Triton import here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_warps_for(block: int) -> int:
    """A warp count that gives each thread a few elements of a 1-D block."""
    return max(1, min(8, block // 256))


def grid_blocks(n: int, block: int, max_blocks: int = 1024) -> int:
    """Programs along one axis for ``n`` elements: one per block, capped (kernels stride beyond)."""
    return max(1, min(max_blocks, cdiv(n, block)))


def int64_table(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """Pack integer rows (pointers, sizes) into one contiguous int64 tensor on ``device``.

    One host-to-device copy per launch instead of one per row.
    """
    table = torch.tensor(rows, dtype=torch.int64)
    return table.to(device, non_blocking=True) if device.type != "cpu" else table


def accumulator_type(dtype: torch.dtype):
    """The Triton type sums are kept in: float64 for float64 tensors, else float32."""
    import triton.language as tl  # here, so that this module itself needs no Triton

    return tl.float64 if dtype == torch.float64 else tl.float32


def data_ptrs(tensors: Sequence[Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]
