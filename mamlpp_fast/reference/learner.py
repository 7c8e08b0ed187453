"""The reference MAML++ learner: tasks one after another, exactly as the official code runs them.

This is the oracle that tests and benchmarks compare against. It favours clarity over speed and
follows `few_shot_learning_system.py` of the official code (spec section 1) step by step,
including its quirks:

- BN always normalises with the current batch's statistics (`training=True` is hard-coded);
  support and target batches are normalised separately, so evaluation is transductive.
- The target pass after update i uses BN index i, the same as the support pass at step i.
- The per-step running statistics are updated in place by `F.batch_norm` but never read; the
  evaluation "backup/restore" is a no-op because the backup aliases the live tensor (issue
  #42), so validation batches leak into them. `bn_restore_stats_after_evaluation` fixes that and
  `bn_use_running_stats_in_evaluation` makes evaluation normalise with them.
- MSL is gated on `epoch < multi_step_loss_num_epochs` in training only; otherwise only the
  final step's target loss counts, with weight 1.
- First-order inner gradients are constants, yet `theta - alpha * g` still trains alpha.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..learner_base import FewShotLearnerBase, TaskBatch
from ..parameters import BN_EPS, BN_MOMENTUM, LAYER_NORM_EPS, LEAKY_RELU_SLOPE

__all__ = ["MAMLFewShotClassifier"]


class MAMLFewShotClassifier(FewShotLearnerBase):
    """Per-task MAML++ with the official class name and API (see `FewShotLearnerBase`)."""

    # ------------------------------------------------------------------ network
    def _task_forward(
        self, x: torch.Tensor, y: torch.Tensor, weights: Dict[str, torch.Tensor], training: bool, num_step: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """`net_forward` (see the base class), the official `VGGReLUNormNetwork.forward`: per stage
        conv, norm, leaky ReLU and (max_pooling) a 2x2 max-pool; without max-pooling the convs
        have stride 2 and the last map is average-pooled. F.batch_norm folds the running statistics."""
        out = x
        for stage in range(self.config.num_stages):
            prefix = f"layer_dict.conv{stage}"
            out = F.conv2d(out, weights[f"{prefix}.conv.weight"], weights[f"{prefix}.conv.bias"],
                           stride=self.config.conv_stride, padding=self.config.conv_padding_size)
            out = self._normalise(out, stage, weights, training, num_step)
            out = F.leaky_relu(out, LEAKY_RELU_SLOPE)
            if self.config.max_pooling:
                out = F.max_pool2d(out, kernel_size=2, stride=2, padding=0)
        if not self.config.max_pooling:
            out = F.avg_pool2d(out, out.shape[2])
        out = out.reshape(out.shape[0], -1)
        logits = F.linear(out, weights["layer_dict.linear.weights"], weights["layer_dict.linear.bias"])
        return F.cross_entropy(logits, y), logits

    def _normalise(
        self, out: torch.Tensor, stage: int, weights: Dict[str, torch.Tensor], training: bool, num_step: int
    ) -> torch.Tensor:
        """The stage's MetaBatchNormLayer (the step's rows; batch statistics unless the
        evaluation fix says otherwise) or MetaLayerNormLayer (over each image's C, H, W), with
        gamma and beta from `weights` where the inner loop adapts them."""
        norm = self.classifier.layer_dict[f"conv{stage}"].norm_layer
        weight, bias = self.norm_affine(weights, stage, num_step)
        if self.config.norm_layer == "layer_norm":
            return F.layer_norm(out, norm.weight.shape, weight, bias, eps=LAYER_NORM_EPS)
        use_running_stats = (not training) and self.config.bn_use_running_stats_in_evaluation
        if self.config.per_step_bn_statistics:
            running_mean, running_var = norm.running_mean[num_step], norm.running_var[num_step]
        else:
            running_mean = running_var = None
        return F.batch_norm(
            out,
            running_mean,
            running_var,
            weight,
            bias,
            training=not use_running_stats,
            momentum=BN_MOMENTUM,
            eps=BN_EPS,
        )

    # ------------------------------------------------------------------ inner loop
    def forward(
        self,
        data_batch: TaskBatch,
        epoch: int,
        use_second_order: bool,
        use_multi_step_loss_optimization: bool,
        num_steps: int,
        training_phase: bool,
    ):
        """Inner loops of all tasks, one after another.

        Returns:
            (losses, target_logits) where losses["loss"] is the mean over tasks of each task's
            (MSL-weighted) target loss, with its graph, and target_logits is [B, N*T, N].
        """
        x_support_set, x_target_set, y_support_set, y_target_set = data_batch
        use_msl = (
            use_multi_step_loss_optimization
            and training_phase
            and epoch < self.config.multi_step_loss_num_epochs
        )
        restore_stats = (not training_phase) and self.config.bn_restore_stats_after_evaluation
        saved_stats = self._copy_running_statistics() if restore_stats else None
        importance = self.get_per_step_loss_importance_vector()
        total_losses: List[torch.Tensor] = []
        correct: List[torch.Tensor] = []
        per_task_target_preds: List[torch.Tensor] = []
        for x_s, y_s, x_t, y_t in zip(x_support_set, y_support_set, x_target_set, y_target_set):
            c, h, w = x_s.shape[-3:]
            x_s, y_s = x_s.reshape(-1, c, h, w), y_s.reshape(-1)
            x_t, y_t = x_t.reshape(-1, c, h, w), y_t.reshape(-1)
            weights = self.get_inner_loop_parameter_dict(self.classifier.named_parameters())
            task_losses: List[torch.Tensor] = []
            target_preds: Optional[torch.Tensor] = None
            for num_step in range(num_steps):
                support_loss, _ = self.net_forward(x_s, y_s, weights, training=training_phase, num_step=num_step)
                weights = self.apply_inner_loop_update(support_loss, weights, use_second_order, num_step)
                target_loss = None
                if use_msl:
                    target_loss, target_preds = self.net_forward(x_t, y_t, weights, training=training_phase, num_step=num_step)
                    task_losses.append(importance[num_step] * target_loss)
                elif num_step == self.config.number_of_training_steps_per_iter - 1:
                    target_loss, target_preds = self.net_forward(x_t, y_t, weights, training=training_phase, num_step=num_step)
                    task_losses.append(target_loss)
                self._record(num_step, support_loss, weights, target_loss)
            assert target_preds is not None  # config validation guarantees a final step
            per_task_target_preds.append(target_preds.detach())
            correct.append(target_preds.argmax(dim=1).eq(y_t))
            total_losses.append(torch.sum(torch.stack(task_losses)))
        if saved_stats is not None:
            self._restore_running_statistics(saved_stats)
        losses = {
            "loss": torch.mean(torch.stack(total_losses)),
            "accuracy": torch.cat(correct).to(self.dtype).mean(),
        }
        for index, item in enumerate(importance):
            losses[f"loss_importance_vector_{index}"] = item.detach()
        return losses, torch.stack(per_task_target_preds)

    def _copy_running_statistics(self):
        return [(mean.detach().clone(), var.detach().clone()) for mean, var in self.running_statistics()]

    def _restore_running_statistics(self, saved) -> None:
        with torch.no_grad():
            for (mean, var), (old_mean, old_var) in zip(self.running_statistics(), saved):
                mean.copy_(old_mean)
                var.copy_(old_var)
