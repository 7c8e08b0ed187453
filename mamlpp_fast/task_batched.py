"""The MAML++ network evaluated for all B tasks of a meta-batch at once.

Layout: the tasks become channel groups. Images of a meta-batch [B, N, K, C, H, W] are laid out
as [N*K, B*C, H, W] (task b's channel c is channel b*C + c). Then

- a conv with per-task weights is one grouped convolution (`groups=B`);
- per-task batch norm is ordinary batch norm over the B*C channels: each channel's statistics
  are taken over its own task's N*K images only;
- leaky ReLU and max-pool are elementwise/windowed and indifferent to the layout;
- layer norm (norm_layer="layer_norm") normalises each image of each task over its own
  channels: a view [n, B, C, H, W];
- the linear head is one batched matmul over tasks.

One launch per layer per step serves the whole meta-batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .ops.bn_lrelu_pool import bn_lrelu_aten
from .ops.task_conv import task_conv
from .parameters import BN_EPS, LAYER_NORM_EPS, LEAKY_RELU_SLOPE

__all__ = [
    "to_task_channels",
    "StageStatistics",
    "StageFunction",
    "task_batched_logits",
    "runs_fused_stage",
    "task_channels",
    "task_layer_norm",
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


def runs_fused_stage(norm_layer: str, max_pooling: bool) -> bool:
    """Whether a network's stages run the fused `stage` function (batch norm with batch
    statistics, leaky ReLU, 2x2 max-pool); layer norm and unpooled stages run ATen ops."""
    return norm_layer == "batch_norm" and max_pooling


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
    *,
    norm_layer: str = "batch_norm",
    max_pooling: bool = True,
) -> Tuple[torch.Tensor, List[StageStatistics]]:
    """Logits of every task's images with every task's own weights.

    Args:
        images: [n, B*C_in, H, W] from `to_task_channels`.
        conv_weights: per stage, [B, C_out, C_in, 3, 3].
        conv_biases: per stage, [B, C_out].
        linear_weight: [B, N, F]; linear_bias: [B, N].
        bn_weights, bn_biases: per stage, the norm layer's affine parameters: batch norm, this
            step's row [C_out] shared by all tasks or [B, C_out] adapted per task; layer norm,
            [C_out, H', W'] shared or [B, C_out, H', W'] per task.
        stage: the fused BN + leaky ReLU + max-pool function (batch norm with max-pooling; the
            other architectures run their ATen composition).
        running_stats: per stage, (mean [C_out], var [C_out]) to normalise with instead of the
            batch statistics (evaluation with `bn_use_running_stats_in_evaluation`).
        conv: the task-batched convolution (x, weight, bias) -> out, or one per stage; default
            `mamlpp_fast.ops.task_conv` with its "auto" strategy, padding 1 and stride 1 (2
            without max-pooling). For conv_padding=false pass convolutions with padding 0.
        norm_layer: "batch_norm" or "layer_norm" (the official MetaLayerNormLayer: each image
            normalised over its C_out, H', W').
        max_pooling: True: 2x2 max-pool after each stage. False (official max_pooling=false): the
            convolutions are strided (as `conv` must be) and the last map is average-pooled with
            windows of its height.

    Returns:
        logits [B, n, N] and, for batch norm without `running_stats`, each stage's batch
        statistics (empty for layer norm, which keeps none).
    """
    num_tasks = linear_weight.shape[0]
    if conv is None:
        conv = functools.partial(task_conv, stride=1 if max_pooling else 2)  # padding 1, as released
    convs = [conv] * len(conv_weights) if callable(conv) else list(conv)
    if len(convs) != len(conv_weights):
        raise ValueError(f"conv: expected one convolution per stage ({len(conv_weights)}), got {len(convs)}")
    out = images
    statistics: List[StageStatistics] = []
    for index, (weight, bias) in enumerate(zip(conv_weights, conv_biases)):
        b, c_out = weight.shape[:2]
        out = convs[index](out, weight, bias)
        pooled = False
        if norm_layer == "layer_norm":
            out = F.leaky_relu(task_layer_norm(out, num_tasks, bn_weights[index], bn_biases[index]), LEAKY_RELU_SLOPE)
        elif running_stats is not None:
            mean, var = running_stats[index]
            out = F.batch_norm(out, mean.repeat(num_tasks), var.repeat(num_tasks),
                               task_channels(bn_weights[index], num_tasks), task_channels(bn_biases[index], num_tasks),
                               training=False, eps=BN_EPS)
            out = F.leaky_relu(out, LEAKY_RELU_SLOPE)
        else:
            count = out.shape[0] * out.shape[2] * out.shape[3]
            gamma, beta = task_channels(bn_weights[index], num_tasks), task_channels(bn_biases[index], num_tasks)
            if runs_fused_stage(norm_layer, max_pooling):
                out, mean, invstd = stage(out, gamma, beta)
                pooled = True
            else:
                out, mean, invstd = bn_lrelu_aten(out, gamma, beta, BN_EPS, LEAKY_RELU_SLOPE)
            statistics.append(StageStatistics(mean.view(b, c_out), invstd.view(b, c_out), count))
        if max_pooling and not pooled:
            out = F.max_pool2d(out, kernel_size=2, stride=2)
    if not max_pooling:
        out = F.avg_pool2d(out, out.shape[2])
    n = out.shape[0]
    features = out.reshape(n, num_tasks, -1).transpose(0, 1)
    logits = torch.baddbmm(linear_bias.unsqueeze(1), features, linear_weight.transpose(1, 2))
    return logits, statistics


def task_channels(param: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """A per-channel BN parameter in the task-channel layout [B*C]: [C] (shared by the tasks)
    is repeated, [B, C] (adapted per task) flattened."""
    return param.repeat(num_tasks) if param.dim() == 1 else param.reshape(-1)


def task_layer_norm(x: torch.Tensor, num_tasks: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Layer norm of each image of each task over its own C, H, W: x [n, B*C, H, W], weight
    [C, H, W] and bias [C, H, W] (shared by the tasks) or [B, C, H, W] (adapted per task) ->
    [n, B*C, H, W]."""
    n, _, height, width = x.shape
    per_task = x.reshape(n, num_tasks, -1, height, width)
    if bias.dim() == 4:  # [B, C, H, W]: adapted per task by the inner loop
        normalised = F.layer_norm(per_task, weight.shape, weight, None, eps=LAYER_NORM_EPS) + bias
    else:
        normalised = F.layer_norm(per_task, weight.shape, weight, bias, eps=LAYER_NORM_EPS)
    return normalised.reshape(x.shape)


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
