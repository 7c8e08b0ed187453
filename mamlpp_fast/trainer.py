"""The experiment loop of MAML++: the official `ExperimentBuilder` semantics, done right.

`Trainer(config, output_dir)` owns an experiment folder ``{output_dir}/{experiment_name}/``::

    config.json               the config of the latest training run
    .lock                     held by the process that is training it
    saved_models/
        train_model_{epoch}   one checkpoint per epoch (1-based), all kept as officially;
                              with keep_best_only, only the best N by validation
                              accuracy, N = max(5, max_models_to_save)
        train_model_latest    the newest checkpoint; a rerun resumes from it
    logs/
        summary.csv, summary.json      per-epoch statistics (rewritten atomically)
        test_summary.csv, .json        the test protocol's result
        learning_curves.png            train/val loss and accuracy per epoch
        inner_loop_learning_rates.png  the LSLR rates learned so far, per tensor and step

What it does, as the official code does:

- ``total_iter_per_epoch`` meta-iterations per epoch, passing ``epoch = current_iter //
  total_iter_per_epoch`` to ``run_train_iter``;
- at the end of each epoch, validation on the same ``num_evaluation_tasks`` fixed tasks, then
  ``train_model_{epoch}`` and ``train_model_latest``;
- a pause after ``total_epochs_before_pause`` epochs of one process (rerun to continue);
- when all ``total_epochs`` are done, the test protocol: the top-5 epochs by validation
  accuracy, the same test tasks through each, logits averaged over the models, argmax.

What it does better:

- checkpoints are written atomically (temporary file, fsync, rename), so a kill -9 at any
  moment leaves the previous checkpoint intact; a leftover temporary file is ignored (and
  deleted by the next training run), and the logs are rewritten from the checkpoint on resume;
- one process trains an experiment at a time (a lock on the folder); `mamlpp-eval` can test
  the best epochs so far while it runs;
- checkpoints hold a fingerprint of each data split's classes: a run is not resumed on other
  splits (another data folder, or a loader that splits it otherwise), and testing it on them warns;
- checkpoints also hold the RNG states (torch, numpy, python ``random``, the learner's RNG) and
  the data position, so a resumed run continues bit for bit like an uninterrupted one (given
  the same ops and thread count: the compiled kernels and the pure-PyTorch fallback round
  differently, and the inner loop amplifies that to ~1e-4 within a few iterations);
- the official code keeps every epoch's checkpoint (``max_models_to_save`` is read but never
  used), and so does this trainer by default; ``keep_best_only`` keeps only the best
  ``max(5, max_models_to_save)`` (the test ensemble needs the top 5);
- an optional time budget (``max_minutes``), which stops cleanly at the end of the current
  epoch, or iteration budget (``max_iters``), which stops after exactly that many iterations
  with a checkpoint (mid-epoch too);
- no lost epoch: every ``checkpoint_minutes`` (default 10) ``train_model_latest`` is also
  written mid-epoch, with the epoch's losses so far; SIGTERM (a scheduler's time limit or
  preemption, torchrun) and Ctrl-C stop after the current meta-iteration and write it too. A
  rerun resumes inside the epoch, and the epoch's statistics are those of an uninterrupted run;
- the test result also gets a 95% confidence interval over per-task accuracies.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import re
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .config import MAMLConfig
from .experiment_lock import LOCK_NAME, ExperimentLock, remove_stale_temp_files
from .data.paths import DataConfigError
from .learner_base import atomic_torch_save, resolve_config
from .plots import plot_inner_loop_learning_rates, plot_learning_curves
from .stop_signals import DEFAULT_STOP_SIGNALS, StopRequests

__all__ = [
    "Trainer",
    "DistributedResumeError",
    "ensemble_logits_accuracy",
    "top_epochs",
    "CHECKPOINT_PREFIX",
    "LATEST",
]

CHECKPOINT_PREFIX = "train_model"
LATEST = "latest"
TEST_ENSEMBLE_SIZE = 5
_EPOCH_FILE = re.compile(r"^" + CHECKPOINT_PREFIX + r"_(\d+)$")
_STAT_KEYS = (
    "train_loss_mean", "train_loss_std", "train_accuracy_mean", "train_accuracy_std",
    "learning_rate", "val_loss_mean", "val_loss_std", "val_accuracy_mean", "val_accuracy_std",
)


class DistributedResumeError(RuntimeError):
    """Under torchrun, the ranks did not resume from the same checkpoint."""


class ConfigChangedError(ValueError):
    """Resuming a run with a config other than the one it was trained with, without
    ``allow_config_change`` (the message lists the keys, old -> new)."""


# Config keys a resumed run may change without allow_config_change: they do not change what is
# computed (the official parser's pause length and data-loader workers; pruning of checkpoints).
_FREE_ON_RESUME = frozenset({"total_epochs_before_pause", "num_dataprovider_workers", "max_models_to_save"})


# ---------------------------------------------------------------------- helpers
def top_epochs(val_accuracies: Sequence[float], n: int) -> List[int]:
    """The 1-based epochs of the ``n`` best validation accuracies, best last.

    Like the official ``np.argsort(val_accuracy_mean)[-n:]`` but with a stable sort, so ties
    go to the later epoch and the choice is reproducible. Pruning and the test protocol use the
    same rule, so the top 5 are always among the kept checkpoints.
    """
    if n <= 0 or len(val_accuracies) == 0:
        return []
    order = np.argsort(np.asarray(val_accuracies, dtype=np.float64), kind="stable")
    return [int(i) + 1 for i in order[-n:]]


def ensemble_logits_accuracy(per_model_logits: Sequence[np.ndarray], targets: np.ndarray) -> Dict[str, Any]:
    """The official test protocol's arithmetic.

    Args:
        per_model_logits: one array [tasks, N*T, N] of target logits per model.
        targets: [tasks, N*T] integer labels, in the same (class-major) order as the logits.

    Returns:
        dict with ``test_accuracy_mean`` (mean over every prediction), ``test_accuracy_std``
        (official: std over individual predictions), ``test_accuracy_task_std`` (std over
        per-task accuracies), ``test_accuracy_ci95`` (1.96 * task std / sqrt(tasks)),
        ``num_tasks``, ``num_models`` and ``per_task_accuracy``.
    """
    if len(per_model_logits) == 0:
        raise ValueError("per_model_logits is empty: no model to evaluate")
    stacked = np.stack([np.asarray(x, dtype=np.float64) for x in per_model_logits])
    if stacked.ndim != 4:
        raise ValueError(f"each model's logits must be [tasks, N*T, N], got {list(stacked.shape[1:])}")
    mean_logits = stacked.mean(axis=0)
    predictions = mean_logits.argmax(axis=2)
    targets = np.asarray(targets).reshape(predictions.shape)
    correct = (predictions == targets).astype(np.float64)
    per_task = correct.mean(axis=1)
    num_tasks = int(per_task.shape[0])
    task_std = float(per_task.std())
    return {
        "test_accuracy_mean": float(correct.mean()),
        "test_accuracy_std": float(correct.std()),
        "test_accuracy_task_std": task_std,
        "test_accuracy_ci95": 1.96 * task_std / math.sqrt(max(num_tasks, 1)),
        "num_tasks": num_tasks,
        "num_models": int(stacked.shape[0]),
        "per_task_accuracy": per_task,
    }


def _split_fingerprints(data: Any) -> Optional[Dict[str, str]]:
    """`FewShotDataset.split_fingerprints` of a data loader's data set; None for data objects
    without one (a custom loader handed to the Trainer)."""
    dataset = getattr(data, "dataset", None)
    return dataset.split_fingerprints() if hasattr(dataset, "split_fingerprints") else None


def _fingerprints_number(fingerprints: Optional[Dict[str, str]]) -> int:
    """The split fingerprints as one int64 (for comparing them across ranks); 0 for None."""
    if fingerprints is None:
        return 0
    digest = hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: fits a signed int64


def _atomic_write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _csv_text(rows: List[Dict[str, Any]], keys: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(keys), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return out.getvalue()


def _rng_state(learner) -> Dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "learner": learner.rng.get_state() if getattr(learner, "rng", None) is not None else None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(learner, state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("learner") is not None and getattr(learner, "rng", None) is not None:
        learner.rng.set_state(state["learner"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception as error:  # a different number of GPUs
            warnings.warn(f"could not restore the CUDA RNG state: {error}", stacklevel=2)


def _remove_unstarted_experiment(experiment_dir: str) -> None:
    """Remove a folder that `train()` created but never started a run in: it holds nothing but
    the lock file. Anything else in it is left alone."""
    try:
        if os.listdir(experiment_dir) == [LOCK_NAME]:
            os.unlink(os.path.join(experiment_dir, LOCK_NAME))
        os.rmdir(experiment_dir)
    except OSError:
        pass  # not empty, or gone already: leave it


def _to_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _data_root(data: Any) -> Optional[str]:
    """The absolute folder the data set was read from, when the loader says (None for synthetic
    or custom data)."""
    info = getattr(getattr(data, "dataset", None), "info", None) or {}
    root = info.get("root") if isinstance(info, dict) else None
    return os.path.abspath(root) if root else None


def _resolve_dataset_path(config: MAMLConfig, dataset_dir: Optional[str]) -> Optional[str]:
    """The root the data loader should search: --dataset-dir, else the config's dataset_path
    when it is an existing folder, else None (the environment variables decide)."""
    if dataset_dir is not None:
        if not os.path.isdir(dataset_dir):
            raise ValueError(f"--dataset-dir: {dataset_dir!r} is not a folder")
        return dataset_dir
    if "synthetic" in config.dataset_name.lower():
        return None
    path = config.dataset_path
    if path and os.path.isdir(path):
        return path
    return None


# ---------------------------------------------------------------------- the trainer
def _time_left(epoch_seconds: float, epochs_left: int) -> str:
    """Text such as ', about 3h20m left' at the last epoch's pace; empty when no epoch is left."""
    if epochs_left <= 0:
        return ""
    minutes = int(round(epoch_seconds * epochs_left / 60.0))
    if minutes < 1:
        return ", under a minute left"
    hours, minutes = divmod(minutes, 60)
    return f", about {hours}h{minutes:02d}m left" if hours else f", about {minutes}m left"


class _EpochRecord:
    """One epoch's training losses and accuracies, which an earlier process may have begun.

    The losses of this process stay unsynchronised device tensors until the epoch ends (or a
    mid-epoch checkpoint needs them); those of the earlier part come as float64 arrays. Both
    are float32 values widened to float64, so the statistics are bit-identical to those of an
    uninterrupted epoch.
    """

    def __init__(self, epoch_index: int, losses: Sequence[float] = (), accuracies: Sequence[float] = (),
                 learning_rate: float = float("nan"), seconds: float = 0.0) -> None:
        self.epoch_index = int(epoch_index)
        self._earlier_losses = np.asarray(losses, dtype=np.float64)
        self._earlier_accuracies = np.asarray(accuracies, dtype=np.float64)
        self._earlier_seconds = float(seconds)
        self._started = time.time()
        self._losses: List[torch.Tensor] = []
        self._accuracies: List[torch.Tensor] = []
        self.learning_rate = float(learning_rate)

    @classmethod
    def from_checkpoint(cls, saved: Dict[str, Any]) -> "_EpochRecord":
        return cls(saved["epoch_index"], saved["train_losses"], saved["train_accuracies"],
                   saved.get("learning_rate", float("nan")), saved.get("seconds", 0.0))

    def add(self, out: Dict[str, Any]) -> None:
        """Record one `run_train_iter` result."""
        self._losses.append(out["loss"].detach())
        self._accuracies.append(torch.as_tensor(out["accuracy"]).detach())
        self.learning_rate = out["learning_rate"]

    @property
    def count(self) -> int:
        return len(self._earlier_losses) + len(self._losses)

    @property
    def last_loss(self) -> float:
        return _to_float(self._losses[-1]) if self._losses else float(self._earlier_losses[-1])

    @property
    def last_accuracy(self) -> float:
        return _to_float(self._accuracies[-1]) if self._accuracies else float(self._earlier_accuracies[-1])

    def train_losses(self) -> np.ndarray:
        """[count] float64."""
        return self._joined(self._earlier_losses, self._losses)

    def train_accuracies(self) -> np.ndarray:
        """[count] float64."""
        return self._joined(self._earlier_accuracies, self._accuracies)

    @staticmethod
    def _joined(earlier: np.ndarray, recent: List[torch.Tensor]) -> np.ndarray:
        if not recent:
            return earlier
        device = recent[0].device  # one copy off the device, not one per iteration
        values = torch.stack([value.to(device).reshape(()) for value in recent]).double().cpu().numpy()
        return np.concatenate([earlier, values])

    def seconds(self) -> float:
        """Training time of the epoch so far, over every process that trained part of it."""
        return self._earlier_seconds + time.time() - self._started

    def to_checkpoint(self) -> Dict[str, Any]:
        """The ``epoch_in_progress`` entry of a mid-epoch checkpoint (plain Python values)."""
        return {
            "epoch_index": self.epoch_index,
            "iterations": self.count,
            "train_losses": self.train_losses().tolist(),
            "train_accuracies": self.train_accuracies().tolist(),
            "learning_rate": float(self.learning_rate),
            "seconds": self.seconds(),
        }


class Trainer:
    """Train, validate, checkpoint, resume and test one MAML++ experiment.

    Args:
        config: a `MAMLConfig` (or anything `resolve_config` accepts).
        output_dir: parent folder of the experiment folder ``{experiment_name}/``.
        device, dtype, backend: passed to `MetaLearner`.
        dataset_dir: where the data set lives (default: the config's ``dataset_path`` when it is
            a folder, else the folder a resumed run was trained on when it still exists, else
            ``$MAMLPP_FAST_DATA_DIR`` / ``$DATASET_DIR``).
        progress: show a tqdm bar; None shows one when stderr is a terminal.
        max_minutes: stop cleanly at the end of the first epoch that ends after this many
            minutes of this process's training.
        max_iters: stop after this many meta-iterations of this process, with a checkpoint
            (mid-epoch too: train() again, or a rerun, continues inside the epoch; an epoch whose
            last iteration is the budget's is validated first).
        checkpoint_minutes: also write ``train_model_latest`` mid-epoch when this many minutes
            have passed since the last checkpoint (None: only at epoch ends).
        stop_signals: signal names that stop training after the current meta-iteration,
            with a checkpoint (an empty tuple leaves the signals' default actions).
        keep_best_only: delete epoch checkpoints outside the best ``max(5,
            max_models_to_save)`` by validation accuracy (the official code keeps them all).
        log: where one-line messages go (default: print to stdout).
        learner, data: prebuilt objects (tests); built from the config otherwise.
        prefetch: batches the data loader builds ahead in a background thread.
        distributed: a `mamlpp_fast.distributed.DistributedContext` (torchrun): every rank
            reads the same meta-batches and trains on its slice of the tasks; only rank 0
            writes checkpoints, logs and messages. Validation runs on every rank unsharded.
        allow_config_change: resume a run whose checkpoint was trained with another config,
            continuing with the new values (one warning lists them). Without it such a resume
            raises `ConfigChangedError`; ``total_iter_per_epoch`` can never change.
    """

    def __init__(
        self,
        config: Any,
        output_dir: Union[str, os.PathLike] = "runs",
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
        dataset_dir: Optional[str] = None,
        progress: Optional[bool] = None,
        max_minutes: Optional[float] = None,
        max_iters: Optional[int] = None,
        checkpoint_minutes: Optional[float] = 10.0,
        stop_signals: Sequence[str] = DEFAULT_STOP_SIGNALS,
        keep_best_only: bool = False,
        log: Optional[Callable[[str], None]] = None,
        learner: Any = None,
        data: Any = None,
        prefetch: int = 3,
        distributed: Any = None,
        learner_options: Optional[Dict[str, Any]] = None,
        allow_config_change: bool = False,
    ) -> None:
        self.config = resolve_config(config)
        self.allow_config_change = bool(allow_config_change)
        if max_minutes is not None and not (max_minutes > 0):
            raise ValueError(f"max_minutes must be > 0, got {max_minutes!r}")
        if max_iters is not None and int(max_iters) < 1:
            raise ValueError(f"max_iters must be >= 1, got {max_iters!r}")
        if checkpoint_minutes is not None and not (checkpoint_minutes > 0):
            raise ValueError(f"checkpoint_minutes must be > 0 (or None for epoch ends only), got "
                             f"{checkpoint_minutes!r}")
        StopRequests(stop_signals)  # bad names fail here, not when training starts
        self.output_dir = os.fspath(output_dir)
        self.experiment_dir = os.path.join(self.output_dir, self.config.experiment_name)
        self.saved_models_dir = os.path.join(self.experiment_dir, "saved_models")
        self.logs_dir = os.path.join(self.experiment_dir, "logs")
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.dataset_dir = dataset_dir
        self.progress = progress
        self.max_minutes = max_minutes
        self.max_iters = None if max_iters is None else int(max_iters)
        self.checkpoint_minutes = checkpoint_minutes
        self.stop_signals = tuple(stop_signals)
        self.keep_best_only = bool(keep_best_only)
        self.log = log if log is not None else (lambda message: print(message, flush=True))
        self.prefetch = int(prefetch)
        self.distributed = distributed
        # Extra MetaLearner arguments, e.g. {"task_chunk_size": 2, "checkpoint_inner_steps": True}.
        self.learner_options = dict(learner_options or {})
        self.is_main = distributed is None or distributed.is_main
        self._learner = learner
        self._data = data
        self.state: Dict[str, Any] = self._fresh_state()
        self.resumed_from: Optional[str] = None
        self._resumed_data_splits: Optional[Dict[str, str]] = None
        # The data folder the resumed checkpoint was trained on (used when none is given).
        self._saved_data_root: Optional[str] = None
        # The interrupted epoch's losses so far, from a mid-epoch checkpoint (see save_progress).
        self._epoch_in_progress: Optional[Dict[str, Any]] = None
        self.data_matches_run = True  # False once evaluation found other splits than the run's
        self._rounding_noted = False  # see _note_evaluation_rounding

    # ------------------------------------------------------------------ lazily built parts
    @property
    def learner(self):
        if self._learner is None:
            from .meta_learner import MetaLearner

            self._learner = MetaLearner(self.config, backend=self.backend, device=self.device, dtype=self.dtype,
                                        **self.learner_options)
        return self._learner

    @property
    def data(self):
        if self._data is None:
            from .data import MetaLearningDataLoader

            root = _resolve_dataset_path(self.config, self.dataset_dir)
            if root is None and self._saved_data_root and os.path.isdir(self._saved_data_root):
                root = self._saved_data_root  # where the run was trained (mamlpp-eval needs no --dataset-dir)
            self._data = MetaLearningDataLoader(
                self.config, current_iter=self.state["current_iter"], prefetch=self.prefetch,
                dataset_path=root,
            )
        return self._data

    def _check_data_splits(self, expected: Optional[Dict[str, str]], source: str, training: bool) -> None:
        """The data's splits must be those the checkpoint `source` was trained on (`expected`,
        its fingerprints): other classes would mix into the run (training: refused) or into its
        test, whose classes may have been trained on (evaluation: one warning, and
        `data_matches_run` turns False, which gives the test summary another name)."""
        found = _split_fingerprints(self.data)
        if not expected or found is None:
            return  # a fresh run, a checkpoint from before fingerprints (or the official code's)
        differing = sorted(name for name in expected if found.get(name) != expected[name])
        if not differing:
            return
        message = (f"the data's {'/'.join(differing)} split(s) hold other classes (or image counts) than "
                   f"the ones {source!r} was trained on ({self.data.describe()})")
        if training:
            raise DataConfigError(f"{message}: point the data path to the run's data, or use another "
                                  f"experiment_name to start afresh")
        if self.data_matches_run:
            warnings.warn(f"{message}: the results are not comparable with the run's", stacklevel=3)
        self.data_matches_run = False

    @property
    def keep_top_n(self) -> int:
        return max(TEST_ENSEMBLE_SIZE, int(self.config.max_models_to_save))

    @property
    def total_iters(self) -> int:
        return int(self.config.total_epochs) * int(self.config.total_iter_per_epoch)

    @property
    def epochs_done(self) -> int:
        """Epochs trained and validated."""
        done = int(self.state["current_iter"]) // int(self.config.total_iter_per_epoch)
        return done - 1 if self._validation_pending() else done

    @property
    def finished(self) -> bool:
        """All iterations trained and every epoch validated."""
        return int(self.state["current_iter"]) >= self.total_iters and not self._validation_pending()

    def _resumable_record(self) -> Optional[Dict[str, Any]]:
        """The saved record of the epoch in progress when it matches the current iteration."""
        saved = self._epoch_in_progress
        if saved is None:
            return None
        per_epoch = int(self.config.total_iter_per_epoch)
        index, count = saved.get("epoch_index"), saved.get("iterations")
        if (isinstance(index, int) and isinstance(count, int) and 0 < count <= per_epoch
                and index * per_epoch + count == int(self.state["current_iter"])
                and len(saved.get("train_losses", ())) == len(saved.get("train_accuracies", ())) == count):
            return saved
        return None

    def _validation_pending(self) -> bool:
        """Whether an epoch's iterations are all done but its validation is not (a stop or a
        kill between the two)."""
        record = self._resumable_record()
        return record is not None and record["iterations"] == int(self.config.total_iter_per_epoch)

    def checkpoint_path(self, index: Union[int, str]) -> str:
        return os.path.join(self.saved_models_dir, f"{CHECKPOINT_PREFIX}_{index}")

    @staticmethod
    def _fresh_state() -> Dict[str, Any]:
        return {
            "current_iter": 0,
            "best_val_acc": 0.0,
            "best_val_iter": 0,
            "best_epoch": 0,
            "per_epoch_statistics": {key: [] for key in ("epoch", "current_iter", *_STAT_KEYS, "epoch_seconds")},
        }

    # ------------------------------------------------------------------ folders and resume
    def _make_folders(self) -> None:
        """The experiment's folders, and config.json with this run's config (the checkpoints
        keep the config each epoch was trained with)."""
        os.makedirs(self.saved_models_dir, exist_ok=True)
        os.makedirs(self.logs_dir, exist_ok=True)
        _atomic_write_text(os.path.join(self.experiment_dir, "config.json"),
                           json.dumps(self.config.to_dict(), indent=2) + "\n")

    def maybe_resume(self, training: bool = True) -> bool:
        """Load ``train_model_latest`` when it exists (learner, optimizer, scheduler, counters,
        statistics, RNG states and data position). Returns whether it resumed.

        With ``training`` (the default) a config that differs from the checkpoint's is reported;
        evaluation (``training=False``) changes settings such as the number of tasks on purpose.
        """
        path = self.checkpoint_path(LATEST)
        if not os.path.isfile(path):
            return False
        state = self.learner.load_model(self.saved_models_dir, CHECKPOINT_PREFIX, LATEST)
        saved_config = state.get("config")
        if saved_config is not None:
            current = self.config.to_dict()
            differing = sorted(
                key for key, value in current.items()
                if key in saved_config and saved_config[key] != value and key not in _FREE_ON_RESUME
            )
            if differing and training:
                changes = ", ".join(f"{key}: {saved_config[key]!r} -> {current[key]!r}" for key in differing)
                if "total_iter_per_epoch" in differing:
                    raise ConfigChangedError(
                        f"cannot resume {path!r} with another total_iter_per_epoch ({changes}): the run's "
                        f"epochs are counted in it. Use another experiment_name (--set experiment_name=...) "
                        f"for a new run")
                if not self.allow_config_change:
                    raise ConfigChangedError(
                        f"{path!r} was trained with another config ({changes}). Use another experiment_name "
                        f"(--set experiment_name=...) for a new run, or continue this one with the new values "
                        f"with allow_config_change=True (mamlpp-train --allow-config-change)")
                warnings.warn(
                    f"resuming {path!r} with a config that differs from the one it was trained "
                    f"with ({changes}): the run continues with the new values (the cosine "
                    f"schedule follows total_epochs and the learning rates of the new config)",
                    stacklevel=3,
                )
        self._saved_data_root = state.get("data_root")
        for key in ("current_iter", "best_val_acc", "best_val_iter", "best_epoch", "per_epoch_statistics"):
            if key in state:
                self.state[key] = state[key]
        self.state["current_iter"] = int(self.state["current_iter"])
        self.state["per_epoch_statistics"] = self._complete_statistics(self.state["per_epoch_statistics"])
        if "rng_state" in state:
            _set_rng_state(self.learner, state["rng_state"])
        self._resumed_data_splits = state.get("data_splits")
        self._epoch_in_progress = state.get("epoch_in_progress")
        self.resumed_from = path
        if self._data is not None:
            self._data.current_iter = int(state.get("data_current_iter", self.state["current_iter"]))
        return True

    def _complete_statistics(self, stats: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        """Per-epoch statistics with exactly the columns this trainer writes. The official
        ExperimentBuilder's have no ``epoch``, ``current_iter`` or ``epoch_seconds`` (derived here
        from the epoch count, so that its checkpoints resume) and a few columns of its own (MSL
        weights, learning-rate spread), dropped: new epochs would not fill them. The checkpoint
        that was loaded keeps them."""
        epochs = len(stats.get("val_accuracy_mean", []))
        per_epoch = int(self.config.total_iter_per_epoch)
        derived = {"epoch": lambda i: i + 1, "current_iter": lambda i: (i + 1) * per_epoch}
        complete = {}
        for key in ("epoch", "current_iter", *_STAT_KEYS, "epoch_seconds"):
            if key in stats:
                complete[key] = list(stats[key])
            else:
                make = derived.get(key, lambda i: float("nan"))
                complete[key] = [make(i) for i in range(epochs)]
        return complete

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self, epoch: int) -> Dict[str, Any]:
        """Counters, statistics, config, RNG states and data position (the learner adds its own)."""
        state = dict(self.state)
        state["config"] = self.config.to_dict()
        state["rng_state"] = _rng_state(self.learner)
        state["data_current_iter"] = int(self.state["current_iter"])
        # A custom data object has no fingerprint: keep the one the run was resumed with.
        state["data_splits"] = _split_fingerprints(self.data) or self._resumed_data_splits
        state["data_root"] = _data_root(self.data) or self._saved_data_root
        state["epoch"] = int(epoch)
        state["mamlpp_fast_checkpoint_version"] = 1
        return state

    def save_checkpoint(self, epoch: int) -> None:
        """``train_model_{epoch}`` then ``train_model_latest``, both atomic; then, with
        ``keep_best_only``, prune. Only rank 0 writes under torchrun."""
        if not self.is_main:
            return
        state = self._checkpoint_state(epoch)
        self.learner.save_model(self.checkpoint_path(epoch), state)
        # save_model put the network, optimizer and scheduler in `state`; write the same again.
        atomic_torch_save(state, self.checkpoint_path(LATEST))
        if self.keep_best_only:
            self.prune_checkpoints()

    def save_progress(self, epoch_in_progress: Dict[str, Any]) -> None:
        """A mid-epoch ``train_model_latest`` (atomic): everything `save_checkpoint` writes, plus
        the epoch's record so far (see `_EpochRecord.to_checkpoint`); its ``epoch`` entry counts
        the validated epochs. Written every ``checkpoint_minutes``, on a stop signal, and after
        each epoch's last iteration, before its validation (a record with all of the epoch's
        iterations: a rerun validates it first). The epoch checkpoints, which the test ensemble
        reads, are only written after validation."""
        if not self.is_main:
            return
        state = self._checkpoint_state(len(self.state["per_epoch_statistics"]["epoch"]))  # validated epochs
        state["epoch_in_progress"] = epoch_in_progress
        self.learner.save_model(self.checkpoint_path(LATEST), state)

    def prune_checkpoints(self) -> List[int]:
        """Delete epoch checkpoints outside the best ``keep_top_n`` by validation accuracy.
        Returns the kept epochs."""
        stats = self.state["per_epoch_statistics"]
        keep = set(top_epochs(stats["val_accuracy_mean"], self.keep_top_n))
        if not os.path.isdir(self.saved_models_dir):
            return sorted(keep)
        for name in os.listdir(self.saved_models_dir):
            match = _EPOCH_FILE.match(name)
            if match and int(match.group(1)) not in keep:
                try:
                    os.unlink(os.path.join(self.saved_models_dir, name))
                except OSError:
                    pass
        return sorted(keep)

    # ------------------------------------------------------------------ logs
    def write_logs(self) -> None:
        if not self.is_main:
            return
        stats = self.state["per_epoch_statistics"]
        rows = [
            {key: stats[key][i] for key in stats} for i in range(len(stats["epoch"]))
        ]
        keys = list(stats.keys())
        _atomic_write_text(os.path.join(self.logs_dir, "summary.csv"), _csv_text(rows, keys))
        summary = {
            "experiment_name": self.config.experiment_name,
            "current_iter": int(self.state["current_iter"]),
            "best_val_acc": float(self.state["best_val_acc"]),
            "best_val_iter": int(self.state["best_val_iter"]),
            "best_epoch": int(self.state["best_epoch"]),
            "per_epoch_statistics": rows,
        }
        _atomic_write_text(os.path.join(self.logs_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
        # Every epoch, so that a run stopped at any point (kill -9 included) has its figures.
        for plot, figure in ((self.plot_learning_curves, "learning_curves.png"),
                             (self.plot_inner_loop_learning_rates, "inner_loop_learning_rates.png")):
            try:
                plot()
            except Exception as error:  # a plot must never lose a run
                warnings.warn(f"could not write {figure}: {error}", stacklevel=2)

    def plot_learning_curves(self) -> Optional[str]:
        """``logs/learning_curves.png``; skipped with a warning without matplotlib."""
        stats = self.state["per_epoch_statistics"]
        if not stats["epoch"] or not self.is_main:
            return None
        return plot_learning_curves(stats, self.config.experiment_name,
                                    os.path.join(self.logs_dir, "learning_curves.png"))

    def plot_inner_loop_learning_rates(self) -> Optional[str]:
        """``logs/inner_loop_learning_rates.png``: the learner's LSLR rates now, per inner-loop
        tensor and step; skipped with a warning without matplotlib."""
        if not self.is_main:
            return None
        learner = self.learner
        names = learner.inner_loop_parameter_names
        steps = self.config.number_of_training_steps_per_iter
        rates = {name: rate.detach()[:steps].tolist() for name, rate in zip(names, learner.learning_rates_for(names))}
        title = f"{self.config.experiment_name}: inner-loop learning rates after epoch {self.epochs_done}"
        return plot_inner_loop_learning_rates(rates, title, os.path.join(self.logs_dir, "inner_loop_learning_rates.png"))

    # ------------------------------------------------------------------ evaluation
    def _note_evaluation_rounding(self) -> None:
        """Once: the official protocol evaluates int(num_evaluation_tasks / batch_size) whole
        batches, so a count that is not a multiple of batch_size is rounded down; say so."""
        tasks, batch = int(self.config.num_evaluation_tasks), int(self.config.batch_size)
        if self._rounding_noted or tasks % batch == 0 or tasks < batch:
            return
        self._rounding_noted = True
        warnings.warn(f"num_evaluation_tasks={tasks} is not a multiple of batch_size={batch}: as the official "
                      f"code, validation and test run int({tasks} / {batch}) = {tasks // batch} batches, "
                      f"{tasks // batch * batch} tasks", stacklevel=3)

    def _evaluate(self, batches) -> Tuple[List[float], List[float], List[np.ndarray], List[np.ndarray]]:
        self._note_evaluation_rounding()
        losses, accuracies, logits, targets = [], [], [], []
        learner = self.learner
        try:
            for batch in batches:
                data_batch = tuple(batch[:4])
                out, preds = learner.run_validation_iter(data_batch)
                losses.append(out["loss"])
                accuracies.append(out["accuracy"])
                logits.append(preds.detach().float().cpu().numpy())
                y_target = batch[3]
                y_target = y_target.cpu().numpy() if isinstance(y_target, torch.Tensor) else np.asarray(y_target)
                targets.append(y_target.reshape(y_target.shape[0], -1))
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        return [_to_float(v) for v in losses], [_to_float(v) for v in accuracies], logits, targets

    def validate(self) -> Dict[str, float]:
        """Loss and accuracy on the fixed validation tasks (mean and std over batches)."""
        losses, accuracies, _, _ = self._evaluate(self.data.get_val_batches())
        if not losses:
            raise ValueError(
                f"num_evaluation_tasks={self.config.num_evaluation_tasks} gives no validation batch "
                f"of batch_size={self.config.batch_size}; raise num_evaluation_tasks"
            )
        return {
            "val_loss_mean": float(np.mean(losses)),
            "val_loss_std": float(np.std(losses)),
            "val_accuracy_mean": float(np.mean(accuracies)),
            "val_accuracy_std": float(np.std(accuracies)),
        }

    def test_logits(self, checkpoint_path: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Load a checkpoint (when given) and return (logits [tasks, N*T, N], targets [tasks, N*T])
        over the fixed test tasks."""
        if checkpoint_path is not None:
            folder, name = os.path.split(checkpoint_path)
            prefix, _, index = name.rpartition("_")
            if not prefix:
                raise ValueError(f"checkpoint: {checkpoint_path!r} is not named <name>_<index>")
            state = self.learner.load_model(folder or ".", prefix, index)
            if self._saved_data_root is None:  # data not built yet: the folder this model was trained on
                self._saved_data_root = state.get("data_root")
            self._check_data_splits(state.get("data_splits"), checkpoint_path, training=False)
        _, _, logits, targets = self._evaluate(self.data.get_test_batches())
        if not logits:
            raise ValueError(
                f"num_evaluation_tasks={self.config.num_evaluation_tasks} gives no test batch "
                f"of batch_size={self.config.batch_size}; raise num_evaluation_tasks"
            )
        return np.concatenate(logits), np.concatenate(targets)

    def evaluate_checkpoints(self, checkpoint_paths: Sequence[str]) -> Dict[str, Any]:
        """The ensemble test on explicit checkpoint files (logits averaged over them)."""
        per_model, targets = [], None
        for path in checkpoint_paths:
            logits, model_targets = self.test_logits(path)
            per_model.append(logits)
            if targets is None:
                targets = model_targets
            elif not np.array_equal(targets, model_targets):
                raise RuntimeError("the test tasks differ between models; the data is not deterministic")
        return ensemble_logits_accuracy(per_model, targets)

    def run_test(self, top_n: int = TEST_ENSEMBLE_SIZE, summary_name: str = "test_summary") -> Dict[str, Any]:
        """The official protocol: the top-``top_n`` epochs by validation accuracy, the same test
        tasks through each, logits averaged, argmax. Writes ``logs/{summary_name}.csv``/``.json``
        (`mamlpp-eval` gives runs with other settings another name, so that the official
        result is not overwritten)."""
        stats = self.state["per_epoch_statistics"]
        # Fewer validated epochs than top_n: all of them (the official slice does the same).
        bound = max(self.keep_top_n, len(stats["val_accuracy_mean"]))
        if not 1 <= int(top_n) <= bound:
            raise ValueError(f"top_n (--top-n) must be between 1 and {bound} (the validated epochs, or "
                             f"max(5, max_models_to_save) if fewer), got {top_n}")
        epochs = top_epochs(stats["val_accuracy_mean"], top_n)
        if not epochs:
            raise ValueError(f"no validated epoch in {self.experiment_dir!r}: train first")
        paths = [self.checkpoint_path(epoch) for epoch in epochs]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"checkpoints of the top-{top_n} epochs are missing: {missing} (runs trained with "
                f"keep_best_only / --keep-best-only, and all runs of mamlpp_fast before it kept every "
                f"epoch by default, keep the best {self.keep_top_n} epochs only)")
        result = self.evaluate_checkpoints(paths)
        if not self.data_matches_run:  # never over the run's own result
            summary_name = f"{summary_name}_otherdata"
        summary = {
            "test_accuracy_mean": result["test_accuracy_mean"],
            "test_accuracy_std": result["test_accuracy_std"],
            "test_accuracy_task_std": result["test_accuracy_task_std"],
            "test_accuracy_ci95": result["test_accuracy_ci95"],
            "num_tasks": result["num_tasks"],
            "num_models": result["num_models"],
            "epochs": epochs,
            "val_accuracy_of_epochs": [float(stats["val_accuracy_mean"][e - 1]) for e in epochs],
        }
        os.makedirs(self.logs_dir, exist_ok=True)
        row = dict(summary, epochs=" ".join(str(e) for e in epochs),
                   val_accuracy_of_epochs=" ".join(f"{v:.6f}" for v in summary["val_accuracy_of_epochs"]))
        _atomic_write_text(os.path.join(self.logs_dir, f"{summary_name}.csv"), _csv_text([row], list(row)))
        _atomic_write_text(os.path.join(self.logs_dir, f"{summary_name}.json"), json.dumps(summary, indent=2) + "\n")
        self.test_summary = summary
        self.test_summary_name = summary_name
        return summary

    # ------------------------------------------------------------------ training
    def _progress_enabled(self) -> bool:
        if self.progress is not None:
            return bool(self.progress)
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False

    def train(self) -> Dict[str, Any]:
        """Train until ``total_epochs`` are done, or a pause or ``max_minutes`` stops it at an
        epoch end, or ``max_iters`` or a stop signal after the current meta-iteration (with a
        mid-epoch checkpoint).

        Resumes from ``train_model_latest`` first (mid-epoch too). Holds the experiment's lock
        throughout (a second training process on the same experiment gets
        `ExperimentBusyError`). Returns a dict with ``finished``, ``stopped_because`` ("finished",
        "total_epochs_before_pause", "max_minutes", "max_iters" or "signal"), ``signal`` (its
        name, e.g. "SIGTERM", or None), ``epochs_done``, ``current_iter`` and ``seconds``.
        """
        if not self.is_main:
            self._prepare_training()
            return self._train()
        fresh = not os.path.exists(self.experiment_dir)
        with ExperimentLock(self.experiment_dir):
            started = False
            try:
                # Holding the lock, no other trainer writes here: leftovers are a crash's.
                remove_stale_temp_files(self.saved_models_dir, self.logs_dir, CHECKPOINT_PREFIX)
                # Resume and every check first, then config.json: data that fails to load or
                # does not match the run's (or the other ranks') must not leave a folder behind
                # that looks like a run, nor overwrite a run's config.json.
                self._prepare_training()
                self._make_folders()
                started = True
                return self._train()
            except BaseException:
                if fresh and not started:  # still holding the lock: no other trainer is here
                    _remove_unstarted_experiment(self.experiment_dir)
                raise

    def _prepare_training(self) -> None:
        """Resume, build and check the data, and (torchrun) agree with the other ranks on the
        checkpoint and the data, then make the ranks' learners bit-identical."""
        if self.resumed_from is None and self.state["current_iter"] == 0:
            if self.maybe_resume() and self.is_main:
                self.log(f"resumed from {self.resumed_from} at iteration {self.state['current_iter']} "
                         f"({self._position()})")
                # A kill between a checkpoint and its log write left the logs an epoch behind.
                self.write_logs()
        describe = getattr(self.data, "describe", None)
        self._check_data_splits(self._resumed_data_splits, self.resumed_from, training=True)
        if self.is_main and describe is not None:  # after the lock: a busy experiment loads nothing
            self.log(f"data: {describe()}")
        learner = self.learner
        if self.distributed is not None:
            # Every rank must have resumed from the same checkpoint (or none): the experiment
            # folder has to be shared. Otherwise ranks would train different iterations and hang.
            if not self.distributed.same_on_all_ranks(int(self.state["current_iter"])):
                raise DistributedResumeError(
                    f"rank {self.distributed.rank}: the ranks resumed at different iterations (this one at "
                    f"{self.state['current_iter']}): every rank must see the same experiment folder "
                    f"{self.experiment_dir!r} (a shared file system), or all start afresh")
            # Each rank compared its data with the checkpoint; a fresh run needs the ranks'
            # copies compared with each other (one rank on other splits would mix classes).
            fingerprints = _split_fingerprints(self.data)
            if not self.distributed.same_on_all_ranks(_fingerprints_number(fingerprints)):
                raise DataConfigError(
                    f"rank {self.distributed.rank}: the ranks read different data (this one: "
                    f"{describe() if describe is not None else type(self.data).__name__}, "
                    f"split fingerprints {fingerprints}): every rank must read the same data set")
            # Every rank resumed from the same file (or starts fresh): make them bit-identical.
            self.distributed.broadcast_module(learner)
            learner.distributed = self.distributed

    def _train(self) -> Dict[str, Any]:
        """The training loop (after `_prepare_training`)."""
        cfg = self.config
        per_epoch = int(cfg.total_iter_per_epoch)
        learner = self.learner
        data = self.data
        start_time = time.time()
        self._last_save = start_time
        iters_this_run = 0
        epochs_this_run = 0
        stopped_because = "finished"
        stop_signal: Optional[str] = None
        out_of_iterations = False  # max_iters reached inside an epoch
        bar = None
        if self._progress_enabled() and not self.finished and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_iters, initial=int(self.state["current_iter"]), mininterval=1.0,
                       unit="it", dynamic_ncols=True, desc=cfg.experiment_name, file=sys.stderr)
        if bar is not None:
            say = lambda message: bar.write(message, file=sys.stderr)  # noqa: E731
        else:
            say = self.log if self.is_main else (lambda message: None)
        try:
            with StopRequests(self.stop_signals) as stop:
                while not self.finished:
                    record = self._take_epoch_record()
                    first = int(self.state["current_iter"])
                    remaining = per_epoch - record.count
                    batches = data.get_train_batches(total_batches=remaining, current_iter=first) if remaining else ()
                    try:
                        for batch in batches:
                            current = int(self.state["current_iter"])
                            out, _ = learner.run_train_iter(tuple(batch[:4]), epoch=current // per_epoch)
                            record.add(out)
                            self.state["current_iter"] = current + 1
                            iters_this_run += 1
                            if bar is not None:
                                bar.update(1)
                                if record.count % 20 == 0 or record.count == per_epoch:
                                    bar.set_postfix(epoch=record.epoch_index + 1, loss=f"{record.last_loss:.4f}",
                                                    acc=f"{record.last_accuracy:.4f}", refresh=False)
                            stop_signal = self._stop_requested(stop)
                            if stop_signal is not None:
                                break
                            if (self.max_iters is not None and iters_this_run >= self.max_iters
                                    and record.count < per_epoch):
                                out_of_iterations = True  # mid-epoch (at an epoch end: validate first)
                                break
                            if record.count < per_epoch and self._progress_due():
                                self._save_progress(record)
                                say(f"saved progress at iteration {current + 1} (epoch {record.epoch_index + 1}: "
                                    f"{record.count}/{per_epoch})")
                    finally:
                        close = getattr(batches, "close", None)
                        if close is not None:
                            close()
                    if remaining and record.count == per_epoch:
                        # Trained, not yet validated: a kill during validation loses only the validation.
                        self._save_progress(record)
                    if stop_signal is not None or out_of_iterations:
                        if record.count < per_epoch:
                            self._save_progress(record)
                        # Kept in memory too: train() again in this process continues the epoch.
                        self._epoch_in_progress = record.to_checkpoint()
                        stopped_because = "signal" if stop_signal is not None else "max_iters"
                        say(f"{stop_signal or 'max_iters'}: stopped at iteration {self.state['current_iter']} "
                            f"(epoch {record.epoch_index + 1}: {record.count}/{per_epoch} trained), saved to "
                            f"{self.checkpoint_path(LATEST)}")
                        break
                    self._finish_epoch(record, say)
                    if remaining:  # total_epochs_before_pause counts epochs trained here
                        epochs_this_run += 1
                    stop_signal = self._stop_requested(stop)  # arrived during validation
                    if stop_signal is not None:
                        stopped_because = "signal"
                        say(f"{stop_signal}: stopped after epoch {record.epoch_index + 1}")
                        break
                    if self.finished:
                        break
                    if epochs_this_run >= int(cfg.total_epochs_before_pause):
                        stopped_because = "total_epochs_before_pause"
                        break
                    if self.max_minutes is not None:
                        out_of_time = time.time() - start_time >= 60.0 * self.max_minutes
                        if self.distributed is not None:
                            # Clocks differ between ranks (rank 0 also writes checkpoints and logs):
                            # stop together when any rank is out of time, or the others would hang
                            # in the next epoch's first collective.
                            out_of_time = not self.distributed.all_ok(not out_of_time)
                        if out_of_time:
                            stopped_because = "max_minutes"
                            break
                    if self.max_iters is not None and iters_this_run >= self.max_iters:
                        stopped_because = "max_iters"
                        break
        finally:
            if bar is not None:
                bar.close()
        if not self.finished and self.is_main:
            self.log(f"paused at {self._position()} ({stop_signal or stopped_because}); "
                     f"rerun the same command to resume")
        return {
            "finished": self.finished,
            "stopped_because": stopped_because,
            "signal": stop_signal,
            "epochs_done": self.epochs_done,
            "current_iter": int(self.state["current_iter"]),
            "seconds": time.time() - start_time,
        }

    def _position(self) -> str:
        """Where training stands, e.g. "epoch 69/100" or "epoch 70/100 in progress, 212/500"."""
        total = self.config.total_epochs
        record = self._resumable_record()
        if record is None:
            return f"epoch {self.epochs_done}/{total}"
        index, count, per_epoch = record["epoch_index"], record["iterations"], int(self.config.total_iter_per_epoch)
        if count == per_epoch:
            return f"epoch {index + 1}/{total} trained, not yet validated"
        return f"epoch {index + 1}/{total} in progress, {count}/{per_epoch}"

    def _take_epoch_record(self) -> "_EpochRecord":
        """The record of the epoch that the current iteration belongs to: continued from a
        mid-epoch checkpoint when it was saved at exactly this iteration (possibly with all of
        the epoch's iterations done and its validation to run), else a new one."""
        current = int(self.state["current_iter"])
        saved, matching = self._epoch_in_progress, self._resumable_record()
        self._epoch_in_progress = None
        if matching is not None:
            return _EpochRecord.from_checkpoint(matching)
        if saved is not None:
            warnings.warn(f"the checkpoint's record of epoch {saved.get('epoch_index')} ({saved.get('iterations')} "
                          f"iterations) does not match iteration {current}: that epoch's training loss and "
                          f"accuracy will cover only the iterations run from here", stacklevel=3)
        return _EpochRecord(current // int(self.config.total_iter_per_epoch))

    def _save_progress(self, record: "_EpochRecord") -> None:
        if self.is_main:  # the record's values come off the device only where they are written
            self.save_progress(record.to_checkpoint())
        self._last_save = time.time()

    def _stop_requested(self, stop: StopRequests) -> Optional[str]:
        """The name of the stop signal that arrived, if any (under torchrun: on any rank, agreed
        by a collective, so that all ranks stop after the same iteration)."""
        requested = stop.requested
        if self.distributed is not None and stop.active:
            if not self.distributed.all_ok(requested is None) and requested is None:
                requested = "stop signal on another rank"
        return requested

    def _progress_due(self) -> bool:
        return (self.is_main and self.checkpoint_minutes is not None
                and time.time() - self._last_save >= 60.0 * self.checkpoint_minutes)

    def _finish_epoch(self, record: "_EpochRecord", say: Callable[[str], None]) -> None:
        """Validate, record the epoch's statistics, write its checkpoint and logs, report."""
        cfg = self.config
        train_losses, train_accs = record.train_losses(), record.train_accuracies()
        val = self.validate()
        epoch = record.epoch_index + 1
        stats = self.state["per_epoch_statistics"]
        entry = {
            "epoch": epoch,
            "current_iter": int(self.state["current_iter"]),
            "train_loss_mean": float(train_losses.mean()),
            "train_loss_std": float(train_losses.std()),
            "train_accuracy_mean": float(train_accs.mean()),
            "train_accuracy_std": float(train_accs.std()),
            "learning_rate": float(record.learning_rate),
            **val,
            "epoch_seconds": round(record.seconds(), 3),
        }
        for key, value in entry.items():
            stats.setdefault(key, []).append(value)
        # Strictly better, as the official code: on a tie the logged best epoch stays the
        # earlier one (the test ensemble, top_epochs, ranks ties the other way).
        if val["val_accuracy_mean"] > self.state["best_val_acc"]:
            self.state["best_val_acc"] = val["val_accuracy_mean"]
            self.state["best_val_iter"] = int(self.state["current_iter"])
            self.state["best_epoch"] = epoch
        self.save_checkpoint(epoch)
        self._last_save = time.time()
        self.write_logs()
        say(
            f"epoch {epoch}/{cfg.total_epochs}: train loss {entry['train_loss_mean']:.4f} "
            f"acc {entry['train_accuracy_mean']:.4f} | val loss {val['val_loss_mean']:.4f} "
            f"acc {val['val_accuracy_mean']:.4f} (best {self.state['best_val_acc']:.4f} "
            f"@ epoch {self.state['best_epoch']}) | {entry['epoch_seconds']:.1f}s"
            + _time_left(entry["epoch_seconds"], cfg.total_epochs - epoch)
        )

    def run_experiment(self) -> Dict[str, Any]:
        """Train (resuming if possible) and, when every epoch is done, run the test protocol."""
        outcome = self.train()
        if outcome["finished"] and outcome["stopped_because"] != "signal":  # a stop means stop now
            outcome["test"] = self.run_test()
        return outcome
