"""Opt-in mixed precision for MetaLearner: the convolutions and the classifier under
`torch.autocast`, the arithmetic of everything else in float32.

`MetaLearner(..., autocast_dtype="bfloat16")` runs each network pass under autocast, so the
convolutions (the bulk of a meta-iteration's work) and the linear classifier compute in bfloat16,
while the weights, the LSLR update, the batch-norm stage's arithmetic, the loss and the Adam step
stay float32. (float16 is not offered: its narrow exponent range needs loss scaling, and MAML
would need it in the inner loop's gradients as well as the outer one's.) Derivatives of every
order run in the dtypes autocast recorded.

Where the fused batch-norm stage meets the convolutions' bfloat16 outputs:

- on the CPU with channels-last activations (MetaLearner's default there) its compiled kernels
  read and write bfloat16 activations themselves, computing in float32: exactly what casting the
  input up and the output down would give, without the casts' passes over memory;
- elsewhere (NCHW, CUDA, the ATen composition) each convolution's output is cast to float32 for
  the stage, as autocast itself keeps normalisation layers in float32, and the first convolution
  stays float32 throughout (see FLOAT32_MAX_C_IN).

This changes the arithmetic, so it is off by default: the official code, and every equality
test against `mamlpp_fast.reference`, is float32 or float64. Measured on a 2-core AVX-512 CPU
with bfloat16 dot products (benchmarks/RESULTS.md, 2026-12-01): second-order meta-iterations
22-30% faster than float32 (Omniglot 20w1s 0.51 against 0.73 s, mini-ImageNet 5w1s 0.84
against 1.14 s), and on the real Omniglot data five epochs of 5w1s and two of 20w1s at
float32's accuracy (with the casts; the bfloat16 stage rounds the same values). Single
meta-gradients are not comparable to float32's (see RESULTS: rounding flips max-pool argmaxes).
It has no effect on a float64 learner (autocast leaves float64 alone).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Optional

import torch

__all__ = ["check_autocast_dtype", "autocast_context", "float32_output", "float32_conv", "runs_in_float32",
           "AUTOCAST_DTYPES", "FLOAT32_MAX_C_IN"]

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}

# Where the batch-norm stage takes float32 only (it is cast to), convolutions whose input has at
# most this many channels per task (MAML++'s first layer, which reads the 1 or 3 image channels)
# stay in float32 under the learner's autocast. They do 9-27 multiply-adds per output element, so
# memory bounds them, not arithmetic: in bfloat16 they were no faster, and the casts of their
# outputs (the network's largest activations) and of those outputs' gradients cost more than the
# convolutions (Omniglot 20w1s, second order: 35 of 625 ms). Where the stage reads bfloat16, the
# first convolution runs in bfloat16 like the others (half the bytes through the stage).
FLOAT32_MAX_C_IN = 4


def runs_in_float32(c_in: int) -> bool:
    """Whether a convolution with c_in input channels per task stays float32 under autocast."""
    return c_in <= FLOAT32_MAX_C_IN


def check_autocast_dtype(value: Any) -> Optional[torch.dtype]:
    """None, or torch.bfloat16 for "bfloat16" / torch.bfloat16; ValueError naming the argument
    otherwise."""
    if value is None:
        return None
    if value is torch.bfloat16 or (isinstance(value, str) and value in AUTOCAST_DTYPES):
        return torch.bfloat16
    raise ValueError(f"autocast_dtype must be None or 'bfloat16' (torch.bfloat16), got {value!r}"
                     + ("; float16 would need loss scaling in the inner and outer loops, which "
                        "mamlpp_fast does not do" if value in ("float16", torch.float16) else ""))


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """`torch.autocast` for `device` in `dtype`, or a null context for None. The cast cache is
    off: the inner loop's fast weights are new tensors every step, and a cache would hold casts
    across CUDA-graph capture."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def float32_output(conv: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
    """conv(x, weight, bias) with a bfloat16 result cast to float32 (the batch-norm stage computes
    in float32). Only the learner's own bfloat16 autocast produces one (it is the innermost
    autocast context, so an outer one cannot change the dtype); other results pass through."""
    out = conv(x, weight, bias)
    return out.float() if out.dtype == torch.bfloat16 else out


def float32_conv(conv: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """conv(x, weight, bias) in float32 with autocast off (see FLOAT32_MAX_C_IN). Inputs of another
    floating dtype but float64 are cast to float32; float32 ones pass through without a copy."""
    x, weight, bias = (t.float() if t.is_floating_point() and t.dtype != torch.float64 else t
                       for t in (x, weight, bias))
    with torch.autocast(x.device.type, enabled=False):
        return conv(x, weight, bias)
