"""Reference (pure-PyTorch, readable) versions of the fused mamlpp_fast ops.

Tests and benchmarks take their baseline from here. Everything is differentiable to any order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bn_lrelu_pool_reference"]


def bn_lrelu_pool_reference(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, slope: float = 0.01
) -> tuple[Tensor, Tensor, Tensor]:
    """batch_norm (batch statistics) -> leaky_relu -> max_pool2d(2, 2), one MAML++ conv stage.

    Args:
        x: ``(n, G, H, W)``; each of the G channels is normalised over its ``n * H * W`` elements.
        weight: ``(G,)`` batch-norm scale.
        bias: ``(G,)`` batch-norm shift.
        eps: added to the biased variance.
        slope: leaky-relu negative slope.

    Returns:
        ``y`` ``(n, G, H // 2, W // 2)``, and the batch ``mean`` and ``invstd = (var + eps)^-1/2``,
        both ``(G,)`` and detached (they feed running statistics, not the loss).
    """
    z = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    y = F.max_pool2d(F.leaky_relu(z, slope), kernel_size=2, stride=2)
    with torch.no_grad():
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        invstd = torch.rsqrt(var + eps)
    return y, mean, invstd
