"""Outer-loop schedules of MAML++: multi-step loss weights (MSL) and cosine annealing (CA)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["per_step_loss_weights", "cosine_annealed_learning_rate", "EpochCosineSchedule"]


def per_step_loss_weights(num_steps: int, multi_step_loss_num_epochs: int, epoch: int) -> np.ndarray:
    """The MSL importance of each inner step's target loss (official
    `get_per_step_loss_importance_vector`, spec 1a).

    Every step starts at 1/N. Each epoch moves `1/N/E` of weight from each earlier step to the
    last one, with a floor of 0.03/N for the earlier steps and the matching cap for the last.

    Returns:
        float64 array of shape (num_steps,) that sums to 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if multi_step_loss_num_epochs < 1:
        raise ValueError(f"multi_step_loss_num_epochs must be >= 1, got {multi_step_loss_num_epochs}")
    weights = np.full(num_steps, 1.0 / num_steps)
    decay_rate = 1.0 / num_steps / multi_step_loss_num_epochs
    min_value_for_non_final_losses = 0.03 / num_steps
    for i in range(num_steps - 1):
        weights[i] = np.maximum(weights[i] - epoch * decay_rate, min_value_for_non_final_losses)
    weights[-1] = np.minimum(
        weights[-1] + epoch * (num_steps - 1) * decay_rate,
        1.0 - (num_steps - 1) * min_value_for_non_final_losses,
    )
    return weights


def cosine_annealed_learning_rate(base_lr: float, min_lr: float, epoch: int, total_epochs: int) -> float:
    """The closed form of `CosineAnnealingLR(T_max=total_epochs, eta_min=min_lr)` at `epoch`."""
    return min_lr + (base_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / total_epochs)) / 2.0


class EpochCosineSchedule:
    """Cosine annealing of the outer learning rate, evaluated once per epoch.

    The official code calls `scheduler.step(epoch=epoch)` at every iteration, which uses the
    closed form, so the rate is piecewise constant per epoch. Newer PyTorch deprecates the epoch
    argument, so the closed form is applied here directly. It has `state_dict` and
    `load_state_dict` like a torch scheduler.
    """

    def __init__(self, optimizer: Any, total_epochs: int, min_lr: float) -> None:
        self.optimizer = optimizer
        self.total_epochs = int(total_epochs)
        self.min_lr = float(min_lr)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0

    def step(self, epoch: Optional[int] = None) -> None:
        """Set the rates of `epoch` (the official call, `step(epoch=epoch)`); without an epoch,
        of the next one, like a torch scheduler's `step()`."""
        self.last_epoch = self.last_epoch + 1 if epoch is None else int(epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = cosine_annealed_learning_rate(base_lr, self.min_lr, self.last_epoch, self.total_epochs)

    def get_last_lr(self) -> List[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> List[float]:
        """The current rates (the official run_train_iter logs `scheduler.get_lr()[0]`)."""
        return self.get_last_lr()

    def state_dict(self) -> Dict[str, Any]:
        return {"total_epochs": self.total_epochs, "min_lr": self.min_lr,
                "base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the position (the epoch) only. The shape of the schedule (total_epochs, the
        learning rates) stays the one this object was built with from the current config, as in
        the official code, whose scheduler is rebuilt from the config and never saved: a run
        resumed with more total_epochs anneals over the new length instead of cycling."""
        self.step(state["last_epoch"])
