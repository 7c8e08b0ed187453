"""The paper's way of reporting: one number per independent run, then mean ± std over the runs.

MAML++'s ± values are the standard deviation over three runs that differ only in ``train_seed``
(0, 1, 2: which tasks are sampled; the network initialisation, ``seed``, is the same). Each
run's own number is the official test protocol's (top-5 validation epochs, logits averaged).
The 95% interval that one run's test reports is about its 600 test tasks; the spread over runs
is about training, and is what the paper's ± measures.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

__all__ = ["summarize_runs", "format_runs_summary", "RUN_VARYING_KEYS"]

# Config keys that runs of one setting may differ in: names, seeds and operational settings.
RUN_VARYING_KEYS = frozenset({
    "experiment_name", "train_seed", "seed", "total_epochs_before_pause", "num_dataprovider_workers",
    "dataset_path",
})


def summarize_runs(runs: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Aggregate the official test results of several runs.

    Args:
        runs: one mapping per run with ``experiment`` (its folder), ``config`` (its config as a
            dict), ``test`` (its test summary: ``test_accuracy_mean``, ``test_accuracy_ci95``,
            ...), ``epochs_done`` and ``total_epochs``.

    Returns:
        dict with ``num_runs``, ``test_accuracy_mean_over_runs``, ``test_accuracy_std_over_runs``
        (numpy's std, ddof=0, as the official code computes its stds),
        ``test_accuracy_sample_std_over_runs`` (ddof=1; NaN for one run), ``runs`` (one row
        each), ``differing_config_keys`` (keys outside `RUN_VARYING_KEYS` whose values differ:
        the runs are not one setting) and ``warnings`` (sentences for the user).
    """
    if len(runs) == 0:
        raise ValueError("runs is empty: nothing to summarize")
    rows: List[Dict[str, Any]] = []
    for run in runs:
        config, test = run["config"], run["test"]
        rows.append({
            "experiment": str(run["experiment"]),
            "train_seed": config.get("train_seed"),
            "seed": config.get("seed"),
            "epochs_done": int(run["epochs_done"]),
            "total_epochs": int(run["total_epochs"]),
            "test_accuracy_mean": float(test["test_accuracy_mean"]),
            "test_accuracy_ci95": float(test.get("test_accuracy_ci95", math.nan)),
            "num_tasks": test.get("num_tasks"),
            "epochs": list(test.get("epochs", [])),
        })
    accuracies = np.array([row["test_accuracy_mean"] for row in rows], dtype=np.float64)
    differing = _differing_keys([run["config"] for run in runs])
    warnings: List[str] = []
    unfinished = [row["experiment"] for row in rows if row["epochs_done"] < row["total_epochs"]]
    if unfinished:
        warnings.append(f"not finished training (their best epochs so far were tested): {unfinished}")
    seen: Dict[Any, str] = {}
    for row in rows:
        key = (row["train_seed"], row["seed"])
        if key in seen:
            warnings.append(f"{seen[key]!r} and {row['experiment']!r} have the same train_seed and seed "
                            f"{key}: the same run twice is not two independent runs")
        seen.setdefault(key, row["experiment"])
    if differing:
        warnings.append(f"the runs' configs differ in {differing}: the aggregate mixes settings")
    return {
        "num_runs": len(rows),
        "test_accuracy_mean_over_runs": float(accuracies.mean()),
        "test_accuracy_std_over_runs": float(accuracies.std()),
        "test_accuracy_sample_std_over_runs": float(accuracies.std(ddof=1)) if len(rows) > 1 else math.nan,
        "runs": rows,
        "differing_config_keys": differing,
        "warnings": warnings,
    }


def _differing_keys(configs: Sequence[Mapping[str, Any]]) -> List[str]:
    keys = set().union(*(set(config) for config in configs)) - RUN_VARYING_KEYS
    missing = object()
    return sorted(key for key in keys
                  if any(config.get(key, missing) != configs[0].get(key, missing) for config in configs[1:]))


def format_runs_summary(summary: Mapping[str, Any]) -> str:
    """A table of the runs and the mean ± std line, as `mamlpp-eval` prints it."""
    rows = summary["runs"]
    width = max(len("experiment"), *(len(row["experiment"]) for row in rows))
    lines = [f"{'experiment':<{width}}  train_seed  seed  epochs    test accuracy (95% CI over tasks)"]
    for row in rows:
        epochs = f"{row['epochs_done']}/{row['total_epochs']}"
        lines.append(f"{row['experiment']:<{width}}  {str(row['train_seed']):>10}  {str(row['seed']):>4}  "
                     f"{epochs:<8}  {row['test_accuracy_mean']:.4f} ± {row['test_accuracy_ci95']:.4f}")
    sample = summary["test_accuracy_sample_std_over_runs"]
    lines.append(
        f"over {summary['num_runs']} runs: {summary['test_accuracy_mean_over_runs']:.4f} "
        f"± {summary['test_accuracy_std_over_runs']:.4f} (std over runs, the paper's ±; ddof=1: "
        + ("n/a" if math.isnan(sample) else f"{sample:.4f}") + ")"
    )
    lines.extend(f"warning: {text}" for text in summary["warnings"])
    return "\n".join(lines)
