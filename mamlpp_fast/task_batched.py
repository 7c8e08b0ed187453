"""The MAML++ network evaluated for all B tasks of a meta-batch at once.

Layout: the tasks become channel groups. Images of a meta-batch [B, N, K, C, H, W] are laid out
as [N*K, B*C, H, W] (task b's channel c is channel b*C + c). Then

- a conv with per-task weights is one grouped convolution (`groups=B`);
- per-task batch norm is ordinary batch norm over the B*C channels: each channel's statistics
  are taken over its own task's N*K images only;
- leaky ReLU and max-pool are elementwise/windowed and indifferent to the layout;
- the linear head is one batched matmul over tasks.

One launch per layer per step serves the whole meta-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .ops.task_conv import task_conv
from .parameters import BN_EPS, LEAKY_RELU_SLOPE

__all__ = [
    "to_task_channels",
    "StageStatistics",
    "StageFunction",
    "task_batched_logits",
    "per_task_cross_entropy",
    "fold_running_statistics",
]

# (x [n, B*C_in, H, W], weight [B, C_out, C_in, 3, 3], bias [B, C_out]) -> out [n, B*C_out, H, W]
ConvFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (x [n, G, H, W], weight [G], bias [G]) -> (y [n, G, H//2, W//2], mean [G], invstd [G])
StageFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class StageStatistics:
    """Batch statistics of one stage's BN input, per task and channel: mean and invstd [B, C]
    over `count` elements each (biased variance = invstd^-2 - eps)."""

    mean: torch.Tensor
    invstd: torch.Tensor
    count: int


def to_task_channels(images: torch.Tensor) -> torch.Tensor:
    """[B, N, K, C, H, W] -> [N*K, B*C, H, W], keeping each task's class-major image order."""
    b, n, k, c, h, w = images.shape
    return images.reshape(b, n * k, c, h, w).transpose(0, 1).reshape(n * k, b * c, h, w)


def task_batched_logits(
    images: torch.Tensor,
    conv_weights: Sequence[torch.Tensor],
    conv_biases: Sequence[torch.Tensor],
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor,
    bn_weights: Sequence[torch.Tensor],
    bn_biases: Sequence[torch.Tensor],
    stage: StageFunction,
    running_stats: Optional[Sequence[Tuple[torch.Tensor, torch.Tensor]]] = None,
    conv: Optional[Union[ConvFunction, Sequence[ConvFunction]]] = None,
) -> Tuple[torch.Tensor, List[StageStatistics]]:
    """Logits of every task's images with every task's own weights.

    Args:
        images: [n, B*C_in, H, W] from `to_task_channels`.
        conv_weights: per stage, [B, C_out, C_in, 3, 3].
        conv_biases: per stage, [B, C_out].
        linear_weight: [B, N, F]; linear_bias: [B, N].
        bn_weights, bn_biases: per stage, this step's BN row [C_out], shared by all tasks.
        stage: the fused BN + leaky ReLU + max-pool function.
        running_stats: per stage, (mean [C_out], var [C_out]) to normalise with instead of the
            batch statistics (evaluation with `bn_use_running_stats_in_evaluation`).
        conv: the task-batched convolution (x, weight, bias) -> out, or one per stage; default
            `mamlpp_fast.ops.task_conv` with its "auto" strategy.

    Returns:
        logits [B, n, N] and, unless `running_stats` is given, each stage's batch statistics.
    """
    num_tasks = linear_weight.shape[0]
    if conv is None or callable(conv):
        convs = [conv or task_conv] * len(conv_weights)
    else:
        convs = list(conv)
    if len(convs) != len(conv_weights):
        raise ValueError(f"conv: expected one convolution per stage ({len(conv_weights)}), got {len(convs)}")
    out = images
    statistics: List[StageStatistics] = []
    for index, (weight, bias) in enumerate(zip(conv_weights, conv_biases)):
        b, c_out = weight.shape[:2]
        out = convs[index](out, weight, bias)
        gamma = bn_weights[index].repeat(num_tasks)
        beta = bn_biases[index].repeat(num_tasks)
        if running_stats is not None:
            mean, var = running_stats[index]
            out = F.batch_norm(out, mean.repeat(num_tasks), var.repeat(num_tasks), gamma, beta,
                               training=False, eps=BN_EPS)
            out = F.max_pool2d(F.leaky_relu(out, LEAKY_RELU_SLOPE), kernel_size=2, stride=2)
            continue
        count = out.shape[0] * out.shape[2] * out.shape[3]
        out, mean, invstd = stage(out, gamma, beta)
        statistics.append(StageStatistics(mean.view(b, c_out), invstd.view(b, c_out), count))
    n = out.shape[0]
    features = out.reshape(n, num_tasks, -1).transpose(0, 1)
    logits = torch.baddbmm(linear_bias.unsqueeze(1), features, linear_weight.transpose(1, 2))
    return logits, statistics


def per_task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each task: logits [B, n, N], labels [B, n] -> [B]."""
    b, n, classes = logits.shape
    losses = F.cross_entropy(logits.reshape(b * n, classes), labels.reshape(b * n), reduction="none")
    return losses.view(b, n).mean(dim=1)


@torch.no_grad()
def fold_running_statistics(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    passes: Sequence[StageStatistics],
    momentum: float,
) -> None:
    """Apply, in one go, the sequence of momentum updates the per-task official loop makes.

    The official loop visits task 0's passes, then task 1's, ... and each `F.batch_norm` call
    does r <- (1 - m) r + m u (u: batch mean, or unbiased variance). After L updates
    r_L = (1 - m)^L r_0 + sum_j m (1 - m)^(L - 1 - j) u_j.

    Args:
        running_mean, running_var: the step's rows [C], updated in place.
        passes: the passes of this step in the official order within a task (support, then
            target), each with statistics [B, C].
    """
    means = torch.stack([p.mean for p in passes], dim=1)  # [B, P, C]
    variances = torch.stack(
        [(p.invstd.pow(-2) - BN_EPS) * (p.count / max(p.count - 1, 1)) for p in passes], dim=1
    )
    updates = means.shape[0] * means.shape[1]
    exponents = torch.arange(updates - 1, -1, -1, device=means.device, dtype=means.dtype)
    coefficients = (momentum * (1.0 - momentum) ** exponents).unsqueeze(1)  # [L, 1]
    decay = (1.0 - momentum) ** updates
    running_mean.mul_(decay).add_((coefficients * means.reshape(updates, -1)).sum(0).to(running_mean.dtype))
    running_var.mul_(decay).add_((coefficients * variances.reshape(updates, -1)).sum(0).to(running_var.dtype))
