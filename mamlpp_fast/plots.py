"""Figures of an experiment: learning curves and the learned inner-loop learning rates.

Both are drawn with matplotlib's Agg backend and written atomically (a temporary ``*.tmp.png``
renamed over the target), so a run killed while plotting leaves the previous figure intact. Each
function returns the path it wrote, or None without matplotlib (or with a broken backend), which
it says in a warning.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Mapping, Optional, Sequence

__all__ = ["plot_learning_curves", "plot_inner_loop_learning_rates"]


def _two_panel_figure(path: str, **subplots_options):
    """(pyplot, figure, (left, right) axes) on the Agg backend, or None (with a warning naming
    the figure) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except Exception as error:  # ImportError, or a broken backend
        warnings.warn(f"matplotlib unavailable ({error}); skipping {os.path.basename(path)}", stacklevel=3)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), **subplots_options)
    return plt, fig, axes


def _save(fig, plt, path: str) -> str:
    tmp = path + ".tmp.png"
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:  # a failed save leaves neither an open figure nor a temporary file behind
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_learning_curves(stats: Mapping[str, Sequence[float]], title: str, path: str) -> Optional[str]:
    """Train and validation loss and accuracy per epoch.

    Args:
        stats: per-epoch columns ``epoch``, ``train_loss_mean``, ``val_loss_mean``,
            ``train_accuracy_mean``, ``val_accuracy_mean`` (the trainer's summary).
        title: the figure's title (the experiment name).
        path: where the PNG goes.
    """
    figure = _two_panel_figure(path)
    if figure is None:
        return None
    plt, fig, (ax_loss, ax_acc) = figure
    epochs = stats["epoch"]
    for axis, metric, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        axis.plot(epochs, stats[f"train_{metric}_mean"], "o-", label="train")
        axis.plot(epochs, stats[f"val_{metric}_mean"], "s-", label="val")
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.legend()
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, plt, path)


def plot_inner_loop_learning_rates(rates: Dict[str, Sequence[float]], title: str, path: str) -> Optional[str]:
    """What LSLR learned: each inner-loop tensor's learning rate at each inner step.

    Args:
        rates: official parameter name (e.g. ``layer_dict.conv0.conv.weight``) -> its rates at
            steps 0..S-1 (the official vector's unused last entry left out).
        title: the figure's title.
        path: where the PNG goes.
    """
    figure = _two_panel_figure(path, sharey=True)
    if figure is None:
        return None
    from matplotlib.ticker import MaxNLocator

    plt, fig, (ax_weights, ax_biases) = figure
    for name, values in rates.items():
        axis = ax_biases if name.endswith("bias") else ax_weights
        label = name.replace("layer_dict.", "")
        axis.plot(range(len(values)), values, "o-", label=label)
    for axis, kind in ((ax_weights, "weights"), (ax_biases, "biases")):
        axis.set_title(kind)
        axis.set_xlabel("inner step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    ax_weights.set_ylabel("inner-loop learning rate")
    fig.suptitle(title)
    return _save(fig, plt, path)
