"""Figures of an experiment (learning curves, the learned inner-loop learning rates) and of
several runs of one setting.

Both are drawn with matplotlib's Agg backend and written atomically (a temporary ``*.tmp.png``
renamed over the target), so a run killed while plotting leaves the previous figure intact. Each
function returns the path it wrote, or None without matplotlib (or with a broken backend), which
it says in a warning.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Mapping, Optional, Sequence

__all__ = ["plot_learning_curves", "plot_inner_loop_learning_rates", "plot_runs"]


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


def plot_runs(summary: Mapping, val_accuracies: Mapping[str, Sequence[float]], title: str,
              path: str) -> Optional[str]:
    """Runs of one setting side by side: each run's validation accuracy per epoch, and each
    run's test accuracy (95% interval over tasks) with the mean ± std over runs.

    Args:
        summary: `mamlpp_fast.runs_summary.summarize_runs`'s result.
        val_accuracies: experiment -> its per-epoch validation accuracies (epoch 1 first).
        title: the figure's title.
        path: where the PNG goes.
    """
    figure = _two_panel_figure(path)
    if figure is None:
        return None
    plt, fig, (ax_val, ax_test) = figure
    rows = summary["runs"]
    for row in rows:
        values = list(val_accuracies.get(row["experiment"], ()))
        ax_val.plot(range(1, len(values) + 1), values, "-", label=f"train_seed {row['train_seed']}")
    from matplotlib.ticker import MaxNLocator

    ax_val.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("validation accuracy")
    ax_val.grid(alpha=0.3)
    if ax_val.lines:
        ax_val.legend(fontsize=8)
    positions = range(len(rows))
    ax_test.errorbar(positions, [row["test_accuracy_mean"] for row in rows],
                     yerr=[row["test_accuracy_ci95"] for row in rows], fmt="o", capsize=4,
                     label="run (95% CI over tasks)")
    mean, std = summary["test_accuracy_mean_over_runs"], summary["test_accuracy_std_over_runs"]
    ax_test.axhline(mean, color="black", lw=1, label=f"mean {mean:.4f} ± {std:.4f} (std over runs)")
    ax_test.axhspan(mean - std, mean + std, color="black", alpha=0.1)
    ax_test.set_xticks(list(positions))
    ax_test.set_xticklabels([f"seed {row['train_seed']}" for row in rows])
    ax_test.set_ylabel("test accuracy (official protocol)")
    ax_test.grid(alpha=0.3)
    ax_test.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, plt, path)
