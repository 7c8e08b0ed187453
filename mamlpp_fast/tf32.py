"""TensorFloat-32 switches across torch versions.

torch >= 2.9 has a tree of ``fp32_precision`` settings ("tf32", "ieee" or "none" = inherit from
the parent: ``torch.backends.fp32_precision`` > ``torch.backends.cudnn.fp32_precision`` >
``torch.backends.cudnn.conv.fp32_precision``, and likewise for ``torch.backends.cuda.matmul``);
the older ``allow_tf32`` flags are deprecated, ``torch.backends.cuda.matmul.allow_tf32`` is gone in
torch 2.14, and reading a legacy flag after the new API has set its subtree differently raises.
So mamlpp_fast reads and sets TF32 through the new API when it exists, and the legacy flags only
on torches without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["conv_tf32_enabled", "disable_tf32", "ieee_fp32"]


def _has_precision_api() -> bool:
    return hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision")


def _effective(levels: list[str]) -> bool:
    # The first level that says something decides; "none" all the way up means IEEE fp32.
    for level in levels:
        if level != "none":
            return level == "tf32"
    return False


def conv_tf32_enabled() -> bool:
    """Whether float32 convolutions on CUDA may use TF32 (cuDNN's setting, which mamlpp_fast's
    Triton convolution follows too)."""
    if not _has_precision_api():
        return bool(torch.backends.cudnn.allow_tf32)
    return _effective([torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                       torch.backends.fp32_precision])


def _switches() -> tuple[list[tuple[object, str]], object]:
    """The (owner, attribute) pairs that control TF32 for convolutions and matmuls, and their
    IEEE value."""
    if _has_precision_api():
        return [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")], "ieee"
    return [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")], False  # torch < 2.9


def disable_tf32() -> None:
    """TF32 off for CUDA convolutions and matmuls, for the rest of the process (benchmarks)."""
    switches, off = _switches()
    for owner, name in switches:
        setattr(owner, name, off)


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """TF32 off for CUDA convolutions and matmuls inside the block (restored after), as the
    float32-within-1e-4-of-float64 checks need."""
    switches, _ = _switches()
    before = [getattr(owner, name) for owner, name in switches]
    try:
        disable_tf32()
        yield
    finally:
        for (owner, name), value in zip(switches, before):
            setattr(owner, name, value)
