"""Reference (pure-PyTorch, readable) versions of the fused mamlpp_fast ops.

Tests and benchmarks take their baseline from here. Everything is differentiable to any order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bn_lrelu_pool_reference", "task_cross_entropy_reference"]


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


def task_cross_entropy_reference(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each task's mean cross-entropy and accuracy, written out.

    Args:
        logits: ``(B, n, N)``; labels: ``(B, n)`` int64 class indices.

    Returns:
        ``(loss, accuracy)``, each ``(B,)``: ``loss[b] = -mean_i log_softmax(z[b, i])[y[b, i]]``
        and ``accuracy[b] = mean_i [argmax_c z[b, i, c] == y[b, i]]`` (no gradient).
    """
    loss = -F.log_softmax(logits, dim=2).gather(2, labels.unsqueeze(2)).squeeze(2).mean(dim=1)
    accuracy = (logits.detach().argmax(dim=2) == labels).to(logits.dtype).mean(dim=1)
    return loss, accuracy
