"""Trainer: atomic checkpoints, exact resume (also after a real kill -9), best-N pruning and the
official top-5 logit-averaging test protocol. Tiny synthetic configs keep each test short."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from mamlpp_fast.cli import CLI_PRESETS
from mamlpp_fast.config import MAMLConfig
from mamlpp_fast.stop_signals import StopRequests
from mamlpp_fast.testing import call_after, read_until
from mamlpp_fast.trainer import Trainer, ensemble_logits_accuracy, top_epochs


def tiny_config(**overrides) -> MAMLConfig:
    values = dict(CLI_PRESETS["synthetic-tiny"])
    values.update(overrides)
    return MAMLConfig.from_dict(values)


def make_trainer(tmp_path, allow_config_change: bool = False, **overrides) -> Trainer:
    return Trainer(tiny_config(**overrides), tmp_path, progress=False, log=lambda message: None,
                   allow_config_change=allow_config_change)


@pytest.fixture(autouse=True)
def _one_thread():
    # Faster on a busy machine, and every run in a test uses the same thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same_tensors(a, b, where=""):
    assert set(a) == set(b), where
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}{key} differs"
        elif isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key], f"{where}{key}.")
        elif isinstance(a[key], (list, tuple)) and a[key] and isinstance(a[key][0], dict):
            for i, (x, y) in enumerate(zip(a[key], b[key])):
                assert_same_tensors(x, y, f"{where}{key}[{i}].")
        else:
            assert a[key] == b[key], f"{where}{key} differs"


# ---------------------------------------------------------------------- protocol arithmetic
def test_ensemble_averages_logits_not_probabilities_or_votes():
    # One task, three predictions, two classes. For prediction 0 the logit mean picks class 1
    # while both probability averaging and majority voting would pick class 0.
    a = np.array([[[0.0, 100.0], [1.0, 0.0], [0.0, 1.0]]])
    b = np.array([[[40.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    c = np.array([[[40.0, 0.0], [0.0, 5.0], [0.0, 1.0]]])
    targets = np.array([[1, 0, 0]])
    result = ensemble_logits_accuracy([a, b, c], targets)
    # mean logits: [26.7, 33.3] -> 1 (right), [0.67, 1.67] -> 1 (wrong), [0, 1] -> 1 (wrong)
    assert result["test_accuracy_mean"] == pytest.approx(1 / 3)
    assert result["num_models"] == 3 and result["num_tasks"] == 1
    assert result["test_accuracy_std"] == pytest.approx(np.std([1.0, 0.0, 0.0]))


def test_ensemble_statistics_by_hand():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(7, 5, 5)) for _ in range(4)]
    targets = rng.integers(0, 5, size=(7, 5))
    result = ensemble_logits_accuracy(logits, targets)
    correct = (np.mean(logits, axis=0).argmax(-1) == targets).astype(float)
    per_task = correct.mean(axis=1)
    assert result["test_accuracy_mean"] == pytest.approx(correct.mean())
    assert result["test_accuracy_std"] == pytest.approx(correct.std())
    assert result["test_accuracy_ci95"] == pytest.approx(1.96 * per_task.std() / np.sqrt(7))
    np.testing.assert_allclose(result["per_task_accuracy"], per_task)
    with pytest.raises(ValueError, match="empty"):
        ensemble_logits_accuracy([], targets)


def test_top_epochs_is_one_based_and_stable():
    assert top_epochs([0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.6], 5) == [3, 6, 2, 7, 4]
    assert top_epochs([0.5, 0.5, 0.5], 2) == [2, 3]  # ties go to the later epoch
    assert top_epochs([0.2], 5) == [1]
    assert top_epochs([], 5) == []


def test_run_test_uses_the_top5_epochs_and_averages_their_logits(tmp_path):
    trainer = make_trainer(tmp_path)
    accs = [0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.6]
    trainer.state["per_epoch_statistics"]["val_accuracy_mean"] = accs
    os.makedirs(trainer.saved_models_dir)
    rng = np.random.default_rng(1)
    fake = {}
    for epoch in range(1, 8):
        path = trainer.checkpoint_path(epoch)
        open(path, "wb").close()
        fake[path] = rng.normal(size=(6, 5, 5))
    targets = rng.integers(0, 5, size=(6, 5))
    seen = []

    def fake_test_logits(path=None):
        seen.append(path)
        return fake[path], targets

    trainer.test_logits = fake_test_logits
    summary = trainer.run_test()
    assert summary["epochs"] == [3, 6, 2, 7, 4]
    assert sorted(seen) == sorted(trainer.checkpoint_path(e) for e in (2, 3, 4, 6, 7))
    expected = ensemble_logits_accuracy([fake[trainer.checkpoint_path(e)] for e in (2, 3, 4, 6, 7)], targets)
    assert summary["test_accuracy_mean"] == pytest.approx(expected["test_accuracy_mean"])
    assert summary["test_accuracy_ci95"] == pytest.approx(expected["test_accuracy_ci95"])
    assert os.path.isfile(os.path.join(trainer.logs_dir, "test_summary.csv"))
    assert os.path.isfile(os.path.join(trainer.logs_dir, "test_summary.json"))


def test_test_logits_match_the_learners_own_accuracy(tmp_path):
    """The targets line up with the logits (class-major), so one model's protocol accuracy is
    the learner's accuracy on the same tasks."""
    trainer = make_trainer(tmp_path, num_evaluation_tasks=6)
    losses, accuracies, logits, targets = trainer._evaluate(trainer.data.get_test_batches())
    assert len(logits) == 3
    for acc, lg, tg in zip(accuracies, logits, targets):
        assert lg.shape == (2, 5, 5) and tg.shape == (2, 5)
        assert acc == pytest.approx(float(np.mean(lg.argmax(-1) == tg)), abs=1e-6)


# ---------------------------------------------------------------------- pruning
@pytest.mark.parametrize("max_models_to_save, kept", [(5, [2, 3, 4, 6, 7]), (3, [2, 3, 4, 6, 7]),
                                                      (6, [2, 3, 4, 5, 6, 7])])
def test_prune_keeps_the_best_n(tmp_path, max_models_to_save, kept):
    trainer = make_trainer(tmp_path, max_models_to_save=max_models_to_save)
    trainer.state["per_epoch_statistics"]["val_accuracy_mean"] = [0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.6]
    os.makedirs(trainer.saved_models_dir)
    for name in [*(f"train_model_{e}" for e in range(1, 8)), "train_model_latest", "notes.txt"]:
        open(os.path.join(trainer.saved_models_dir, name), "wb").close()
    assert trainer.prune_checkpoints() == kept
    left = sorted(os.listdir(trainer.saved_models_dir))
    assert left == sorted([f"train_model_{e}" for e in kept] + ["train_model_latest", "notes.txt"])


@pytest.mark.parametrize("keep_best_only, kept", [(False, range(1, 8)), (True, (2, 3, 4, 6, 7))],
                         ids=["official_keeps_all", "keep_best_only"])
def test_training_keeps_every_epoch_or_the_top5_plus_latest(tmp_path, keep_best_only, kept):
    trainer = Trainer(tiny_config(total_epochs=7, total_iter_per_epoch=1, num_evaluation_tasks=2), tmp_path,
                      progress=False, log=lambda message: None, keep_best_only=keep_best_only)
    scripted = iter([0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.6])
    trainer.validate = lambda: {"val_loss_mean": 1.0, "val_loss_std": 0.0,
                                "val_accuracy_mean": next(scripted), "val_accuracy_std": 0.0}
    outcome = trainer.train()
    assert outcome["finished"] and outcome["epochs_done"] == 7
    files = sorted(os.listdir(trainer.saved_models_dir))
    assert files == sorted([f"train_model_{e}" for e in kept] + ["train_model_latest"])
    if not keep_best_only:  # every epoch is there to test: any top-n up to all seven
        with pytest.raises(ValueError, match="top_n .* between 1 and 7"):
            trainer.run_test(top_n=8)
    assert trainer.state["best_epoch"] == 4 and trainer.state["best_val_acc"] == 0.9
    assert os.path.isfile(os.path.join(trainer.logs_dir, "summary.csv"))
    with open(os.path.join(trainer.logs_dir, "summary.csv")) as handle:
        assert len(handle.read().strip().splitlines()) == 8


# ---------------------------------------------------------------------- atomic writes and resume
def _final_state(trainer):
    return torch.load(trainer.checkpoint_path("latest"), map_location="cpu", weights_only=False)


def test_resume_in_process_gives_the_same_parameters(tmp_path):
    whole = make_trainer(tmp_path / "whole", total_epochs=3)
    assert whole.train()["finished"]
    runs = 0
    while True:
        part = make_trainer(tmp_path / "parts", total_epochs=3, total_epochs_before_pause=1)
        outcome = part.train()
        runs += 1
        if outcome["finished"]:
            break
        assert outcome["stopped_because"] == "total_epochs_before_pause"
    assert runs == 3
    a, b = _final_state(whole), _final_state(part)
    assert_same_tensors(a["network"], b["network"], "network.")
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer.")
    assert a["current_iter"] == b["current_iter"] == 9
    assert a["per_epoch_statistics"]["val_accuracy_mean"] == b["per_epoch_statistics"]["val_accuracy_mean"]
    assert a["per_epoch_statistics"]["train_loss_mean"] == b["per_epoch_statistics"]["train_loss_mean"]


def test_max_iters_stops_after_exactly_that_many_iterations_and_resumes_exactly(tmp_path):
    """max_iters=2 with 3 iterations per epoch stops mid-epoch (a checkpoint with the epoch's
    losses so far), at an epoch end after validating it; runs of 2 iterations end like one run."""
    whole = make_trainer(tmp_path / "whole", total_epochs=2)
    assert whole.train()["finished"]
    stops = []
    while True:
        part = Trainer(tiny_config(total_epochs=2), tmp_path / "parts", progress=False, max_iters=2,
                       log=lambda message: None)
        outcome = part.train()
        if outcome["finished"]:
            break
        assert outcome["stopped_because"] == "max_iters"
        stops.append((outcome["current_iter"], outcome["epochs_done"]))
        assert _final_state(part)["current_iter"] == outcome["current_iter"]  # saved where it stopped
    assert stops == [(2, 0), (4, 1)]  # mid-epoch 1; then mid-epoch 2, epoch 1 validated
    a, b = _final_state(whole), _final_state(part)
    assert a["current_iter"] == b["current_iter"] == 6
    assert_same_tensors(a["network"], b["network"], "network.")
    assert a["per_epoch_statistics"]["train_loss_mean"] == b["per_epoch_statistics"]["train_loss_mean"]
    assert a["per_epoch_statistics"]["val_accuracy_mean"] == b["per_epoch_statistics"]["val_accuracy_mean"]


def test_max_iters_at_an_epoch_end_validates_that_epoch_first(tmp_path):
    trainer = Trainer(tiny_config(total_epochs=3), tmp_path, progress=False, max_iters=3,
                      log=lambda message: None)
    outcome = trainer.train()
    assert not outcome["finished"] and outcome["stopped_because"] == "max_iters"
    assert outcome["current_iter"] == 3 and outcome["epochs_done"] == 1
    assert len(trainer.state["per_epoch_statistics"]["val_accuracy_mean"]) == 1


def test_resuming_with_another_config_is_refused_unless_allowed(tmp_path):
    from mamlpp_fast.trainer import ConfigChangedError

    assert make_trainer(tmp_path, total_epochs=1).train()["finished"]
    before = _final_state(make_trainer(tmp_path, total_epochs=1))["current_iter"]
    changed = make_trainer(tmp_path, total_epochs=2, task_learning_rate=0.05)
    with pytest.raises(ConfigChangedError, match="task_learning_rate: 0.1 -> 0.05.*total_epochs: 1 -> 2.*"
                                                 "allow_config_change=True"):
        changed.train()
    assert _final_state(changed)["current_iter"] == before  # nothing trained
    with pytest.raises(ConfigChangedError, match="another total_iter_per_epoch"):  # never, epochs count in it
        make_trainer(tmp_path, allow_config_change=True, total_epochs=2, total_iter_per_epoch=5).train()
    # Free to change: the pause length (and the data-loader workers, pruning).
    assert make_trainer(tmp_path, total_epochs=1, total_epochs_before_pause=7).maybe_resume()
    allowed = make_trainer(tmp_path, allow_config_change=True, total_epochs=2)
    with pytest.warns(UserWarning, match="total_epochs: 1 -> 2.*continues with the new values"):
        outcome = allowed.train()
    assert outcome["finished"] and outcome["epochs_done"] == 2


@pytest.mark.filterwarnings("ignore:omniglot at .* but the official Omniglot has")
def test_checkpoints_remember_the_data_folder_for_resume_and_evaluation(tmp_path, monkeypatch):
    """A run trained on --dataset-dir resumes, and is tested, from the same folder without it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("omniglot_fixtures", os.path.join(os.path.dirname(__file__),
                                                                                     "data", "conftest.py"))
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    # Enough classes for two in the validation split (the official proportions give it ~3%).
    tree = fixtures.make_omniglot_tree(tmp_path / "datasets" / "omniglot",
                                       n_background=(("Alpha", 40), ("Beta", 40)), n_evaluation=(("Zeta", 20),))
    monkeypatch.delenv("MAMLPP_FAST_DATA_DIR", raising=False)
    monkeypatch.delenv("DATASET_DIR", raising=False)
    monkeypatch.setenv("MAMLPP_FAST_CACHE_DIR", str(tmp_path / "cache"))
    config = tiny_config(dataset_name="omniglot_dataset", dataset_path="omniglot_dataset", total_epochs=1,
                         num_evaluation_tasks=2, num_classes_per_set=2)
    trained = Trainer(config, tmp_path / "runs", dataset_dir=str(tmp_path / "datasets"), progress=False,
                      log=lambda message: None)
    assert trained.train()["finished"]
    assert _final_state(trained)["data_root"] == str(tree.resolve())
    evaluator = Trainer(config, tmp_path / "runs", progress=False, log=lambda message: None)
    assert evaluator.maybe_resume(training=False)
    assert evaluator.data.dataset.info["root"] == str(tree.resolve())
    assert evaluator.run_test(top_n=1)["num_models"] == 1


def test_evaluation_task_counts_that_are_not_whole_batches_are_reported(tmp_path):
    trainer = make_trainer(tmp_path, total_epochs=1, num_evaluation_tasks=5)  # batch_size 2
    with pytest.warns(UserWarning, match="num_evaluation_tasks=5 is not a multiple of batch_size=2: .* 2 "
                                         "batches, 4 tasks"):
        trainer.train()


def test_the_trainer_passes_the_official_epoch_and_logs_the_annealed_rate(tmp_path):
    """Spec 7: run_train_iter(batch, epoch=int(current_iter / total_iter_per_epoch)); spec 1f: the
    outer rate of epoch e is CosineAnnealingLR's closed form, eta_min + (lr - eta_min) *
    (1 + cos(pi e / total_epochs)) / 2, and each epoch's logged learning_rate is that value."""
    import math

    trainer = make_trainer(tmp_path, total_epochs=3, total_iter_per_epoch=2, min_learning_rate=1e-4)
    epochs = []
    original = trainer.learner.run_train_iter

    def spy(batch, epoch):
        epochs.append(epoch)
        return original(batch, epoch=epoch)

    trainer.learner.run_train_iter = spy
    assert trainer.train()["finished"]
    assert epochs == [0, 0, 1, 1, 2, 2]
    config = trainer.config
    expected = [config.min_learning_rate + (config.meta_learning_rate - config.min_learning_rate)
                * (1 + math.cos(math.pi * e / config.total_epochs)) / 2 for e in range(3)]
    assert trainer.state["per_epoch_statistics"]["learning_rate"] == pytest.approx(expected, rel=1e-12)
    assert expected[0] > expected[1] > expected[2]


def test_epoch_lines_estimate_the_time_left(tmp_path):
    messages = []
    trainer = Trainer(tiny_config(total_epochs=2, total_iter_per_epoch=1, num_evaluation_tasks=2), tmp_path,
                      progress=False, log=messages.append)
    trainer.train()
    epoch_lines = [m for m in messages if m.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert epoch_lines[0].endswith(" left")  # one epoch to go
    assert "left" not in epoch_lines[1]  # the last epoch


def test_time_left_format():
    from mamlpp_fast.trainer import _time_left

    assert _time_left(600.0, 20) == ", about 3h20m left"
    assert _time_left(30.0, 3) == ", about 2m left"
    assert _time_left(100.0, 0) == ""
    assert _time_left(5.0, 4) == ", under a minute left"


def test_leftover_temp_file_is_ignored_and_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, total_epochs=2, total_epochs_before_pause=1)
    trainer.train()
    latest = trainer.checkpoint_path("latest")
    before = open(latest, "rb").read()
    # A crash in the middle of a write leaves a truncated temporary file next to the checkpoint.
    junk = os.path.join(trainer.saved_models_dir, "train_model_latest.x1y2z3.tmp")
    with open(junk, "wb") as handle:
        handle.write(before[: len(before) // 3])

    # A write that fails half way never touches the real file.
    def broken_save(obj, stream, *args, **kwargs):
        stream.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(1)
    monkeypatch.undo()
    assert open(latest, "rb").read() == before
    assert sorted(os.listdir(trainer.saved_models_dir)) == ["train_model_1", "train_model_latest",
                                                            "train_model_latest.x1y2z3.tmp"]

    resumed = make_trainer(tmp_path, total_epochs=2, total_epochs_before_pause=1)
    assert resumed.maybe_resume()
    assert resumed.state["current_iter"] == 3
    # Loading deletes nothing (mamlpp-eval loads while a trainer may be writing); the next
    # training run, holding the experiment's lock, cleans up.
    assert os.path.exists(junk)
    assert resumed.train()["finished"]
    assert not os.path.exists(junk)


def test_a_kill_between_the_last_checkpoint_and_its_logs_loses_no_log_row(tmp_path):
    trainer = make_trainer(tmp_path, total_epochs=2)
    assert trainer.train()["finished"]
    csv_path = os.path.join(trainer.logs_dir, "summary.csv")
    complete = open(csv_path).read()
    assert len(complete.strip().splitlines()) == 3
    # The state a kill right after train_model_latest of the last epoch leaves: logs one epoch behind.
    with open(csv_path, "w") as handle:
        handle.write("\n".join(complete.strip().splitlines()[:2]) + "\n")
    rerun = make_trainer(tmp_path, total_epochs=2)
    assert rerun.train()["finished"]  # nothing left to train
    assert open(csv_path).read() == complete


def test_resumes_an_official_experiment_folder(tmp_path):
    """train_model_latest as the official ExperimentBuilder writes it: network and optimizer,
    its counters, and per-epoch statistics without epoch / current_iter / epoch_seconds but with
    columns of its own."""
    trainer = make_trainer(tmp_path, total_epochs=3)
    learner = trainer.learner
    per_epoch = trainer.config.total_iter_per_epoch
    official_stats = {key: [0.5, 0.6] for key in ("train_loss_mean", "train_loss_std", "train_accuracy_mean",
                                                   "train_accuracy_std", "val_loss_mean", "val_loss_std",
                                                   "val_accuracy_mean", "val_accuracy_std")}
    official_stats["train_loss_importance_vector_0_mean"] = [0.2, 0.2]
    official_stats["train_learning_rate_mean"] = [1e-3, 1e-3]
    state = {"best_val_acc": 0.6, "best_val_iter": 2 * per_epoch, "current_iter": 2 * per_epoch,
             "best_epoch": 2, "per_epoch_statistics": official_stats,
             "network": learner.state_dict(), "optimizer": learner.optimizer.state_dict()}
    os.makedirs(trainer.saved_models_dir)
    torch.save(state, trainer.checkpoint_path("latest"))
    outcome = trainer.train()
    assert outcome["finished"] and outcome["epochs_done"] == 3
    stats = trainer.state["per_epoch_statistics"]
    assert stats["epoch"] == [1, 2, 3] and stats["current_iter"] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert stats["val_accuracy_mean"][:2] == [0.5, 0.6] and len(stats["val_accuracy_mean"]) == 3
    with open(os.path.join(trainer.logs_dir, "summary.csv")) as handle:
        assert len(handle.read().strip().splitlines()) == 4


def test_one_training_process_per_experiment(tmp_path):
    from mamlpp_fast.experiment_lock import ExperimentBusyError, ExperimentLock

    trainer = make_trainer(tmp_path, total_epochs=1)
    with ExperimentLock(trainer.experiment_dir):  # another trainer holds it
        with pytest.raises(ExperimentBusyError, match=f"pid {os.getpid()}.*another experiment_name"):
            trainer.train()
        assert not os.path.exists(trainer.checkpoint_path("latest"))
    assert trainer.train()["finished"]  # released: free to train
    with ExperimentLock(trainer.experiment_dir):  # and the trainer released it in turn
        pass


@pytest.mark.filterwarnings("ignore:resuming .* with a config that differs")
def test_data_that_fails_to_load_leaves_no_experiment_folder_behind(tmp_path):
    from mamlpp_fast.data import DataNotFoundError

    config = tiny_config(dataset_name="omniglot_dataset", dataset_path="omniglot_dataset")
    missing = str(tmp_path / "empty")  # a folder without the data set in it
    os.makedirs(missing)
    trainer = Trainer(config, tmp_path / "runs", dataset_dir=missing, progress=False, log=lambda m: None)
    with pytest.raises(DataNotFoundError):
        trainer.train()
    assert not os.path.exists(trainer.experiment_dir)  # no folder that looks like a run

    # A folder that was there before (a run's) is left as it was.
    finished = make_trainer(tmp_path / "runs2", total_epochs=1)
    assert finished.train()["finished"]
    before = sorted(os.listdir(finished.experiment_dir))
    again = Trainer(tiny_config(total_epochs=1, dataset_name="omniglot_dataset", dataset_path="omniglot_dataset",
                                experiment_name=finished.config.experiment_name),
                    tmp_path / "runs2", dataset_dir=missing, progress=False, log=lambda m: None,
                    allow_config_change=True)
    with pytest.raises(DataNotFoundError):
        again.train()
    assert sorted(os.listdir(finished.experiment_dir)) == before
    assert os.path.isfile(finished.checkpoint_path("latest"))


def test_a_trainer_that_finds_the_experiment_busy_removes_nothing(tmp_path, monkeypatch):
    # Two trainers start on a new experiment at once: both saw no folder, the other one created
    # it and holds the lock while it loads its data. This one must fail without touching either.
    from mamlpp_fast import trainer as trainer_module
    from mamlpp_fast.experiment_lock import LOCK_NAME, ExperimentBusyError, ExperimentLock

    trainer = make_trainer(tmp_path, total_epochs=1)
    with ExperimentLock(trainer.experiment_dir):
        real_exists = os.path.exists
        monkeypatch.setattr(trainer_module.os.path, "exists",
                            lambda path: False if path == trainer.experiment_dir else real_exists(path))
        with pytest.raises(ExperimentBusyError):
            trainer.train()
        monkeypatch.undo()
        assert os.listdir(trainer.experiment_dir) == [LOCK_NAME]


@pytest.mark.filterwarnings("ignore:resuming .* with a config that differs")
def test_data_that_differs_from_the_checkpoints_leaves_the_run_untouched(tmp_path, monkeypatch):
    # A refused resume (other splits) must not rewrite the run's config.json either.
    from mamlpp_fast import trainer as trainer_module
    from mamlpp_fast.data import DataConfigError

    finished = make_trainer(tmp_path, total_epochs=1)
    assert finished.train()["finished"]
    config_path = os.path.join(finished.experiment_dir, "config.json")
    before = open(config_path).read()
    other = make_trainer(tmp_path, allow_config_change=True, total_epochs=1, batch_size=1)  # another config.json
    monkeypatch.setattr(trainer_module, "_split_fingerprints",
                        lambda data: {"train": "0" * 16, "val": "0" * 16, "test": "0" * 16})
    with pytest.raises(DataConfigError, match="hold other classes"):
        other.train()
    assert open(config_path).read() == before


def test_stale_temp_files_are_those_of_dead_writers(tmp_path):
    from mamlpp_fast.experiment_lock import remove_stale_temp_files

    models, logs = tmp_path / "saved_models", tmp_path / "logs"
    models.mkdir()
    logs.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    stale = [models / "train_model_3.ab12cd.tmp", logs / f"summary.csv.{dead_pid}.tmp",
             logs / "learning_curves.png.tmp.png"]
    alive = [logs / f"test_summary.json.{os.getpid()}.tmp",  # e.g. a mamlpp-eval writing now
             models / "train_model_3", models / "other.tmp"]
    for path in stale + alive:
        path.write_text("x")
    removed = remove_stale_temp_files(str(models), str(logs))
    assert sorted(removed) == sorted(str(p) for p in stale)
    assert all(p.exists() for p in alive)


def _cli_env():
    # The subprocesses must run the package this process tests (the installed one, with the
    # compiled kernels). `python -m` puts the working directory first on sys.path, so they run
    # with cwd=tmp_path: from the repository root they would import the source folder, which in a
    # fresh clone has no compiled _C and falls back to the pure-PyTorch ops, whose different
    # rounding the MAML++ inner loop amplifies to ~1e-4 in 12 iterations (CI saw exactly that).
    env = dict(os.environ)
    import mamlpp_fast

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(mamlpp_fast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train_command(output_dir):
    return [sys.executable, "-m", "mamlpp_fast", "train", "--preset", "synthetic-tiny",
            "--set", "total_epochs=4", "--output-dir", str(output_dir), "--no-progress", "--no-test",
            "--threads", "1"]


def test_kill_minus_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    env = _cli_env()
    killed_dir = tmp_path / "killed"
    latest = killed_dir / "synthetic_tiny_5way_1shot" / "saved_models" / "train_model_latest"
    process = subprocess.Popen(_train_command(killed_dir), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not latest.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert latest.exists(), "the first checkpoint never appeared"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    state = torch.load(latest, map_location="cpu", weights_only=False)
    assert state["current_iter"] < 12
    resumed = subprocess.run(_train_command(killed_dir), env=env, cwd=tmp_path, check=True, capture_output=True,
                             text=True, timeout=300)
    from mamlpp_fast import _backend

    if _backend.has_extension():  # same ops (same rounding) in the subprocesses as in this process
        assert "compiled extension not loaded" not in resumed.stderr, resumed.stderr
    # The uninterrupted reference runs in this process (same config, one thread as well).
    whole = make_trainer(tmp_path / "whole", total_epochs=4)
    assert whole.train()["finished"]
    a = _final_state(whole)
    b = torch.load(latest, map_location="cpu", weights_only=False)
    assert a["current_iter"] == b["current_iter"] == 12
    assert_same_tensors(a["network"], b["network"], "network.")
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer.")


def test_inner_loop_learning_rates_figure_shows_the_learners_rates(tmp_path, monkeypatch):
    """Each inner-loop tensor's rates at steps 0..S-1, by official name (the unused last entry
    of the official vector left out), drawn after every epoch."""
    import mamlpp_fast.trainer as trainer_module

    drawn = []
    monkeypatch.setattr(trainer_module, "plot_inner_loop_learning_rates",
                        lambda rates, title, path: drawn.append((rates, path)))
    trainer = make_trainer(tmp_path, total_epochs=1, total_iter_per_epoch=1, num_evaluation_tasks=2)
    trainer.train()
    assert len(drawn) == 1 and drawn[0][1].endswith("logs/inner_loop_learning_rates.png")
    rates = drawn[0][0]
    learner = trainer.learner
    steps = trainer.config.number_of_training_steps_per_iter
    assert list(rates) == learner.inner_loop_parameter_names
    state = learner.state_dict()  # by the official LSLR key, not through learning_rates_for
    for name in learner.inner_loop_parameter_names:
        key = "inner_loop_optimizer.names_learning_rates_dict." + name.replace(".", "-")
        assert rates[name] == state[key][:steps].tolist()
    assert any(v != trainer.config.task_learning_rate for values in rates.values() for v in values)  # trained


@pytest.mark.filterwarnings("ignore:resuming .* with a config that differs")  # total_epochs 1 -> 2
def test_resuming_on_other_data_splits_is_refused_and_testing_warns(tmp_path, monkeypatch):
    """Checkpoints keep a fingerprint of each split's classes: a resumed run never trains on, and
    its test never silently uses, other classes than the run's."""
    from mamlpp_fast.data import DataConfigError
    from mamlpp_fast.data.sampler import FewShotDataset

    settings = dict(total_epochs=2, total_iter_per_epoch=1, num_evaluation_tasks=2)
    make_trainer(tmp_path, **dict(settings, total_epochs=1)).train()
    state = torch.load(tmp_path / tiny_config().experiment_name / "saved_models" / "train_model_latest",
                       weights_only=False)
    assert set(state["data_splits"]) == {"train", "val", "test"}
    real = FewShotDataset.split_fingerprints
    # Other data: e.g. another copy of the data set, or a loader that splits it otherwise.
    monkeypatch.setattr(FewShotDataset, "split_fingerprints",
                        lambda self: {**real(self), "test": "0123456789abcdef"})
    refused = make_trainer(tmp_path, allow_config_change=True, **settings)
    for _ in range(2):  # calling train() again must not slip past the check
        with pytest.raises(DataConfigError, match="test split\\(s\\) hold other classes .*than the ones "
                                                  ".*train_model_latest' was trained on"):
            refused.train()
    evaluator = make_trainer(tmp_path, **settings)
    assert evaluator.maybe_resume(training=False)
    with pytest.warns(UserWarning, match="not comparable"):
        summary = evaluator.run_test(top_n=1)
    assert evaluator.test_summary_name == "test_summary_otherdata"  # never over the run's own result
    assert not (tmp_path / tiny_config().experiment_name / "logs" / "test_summary.json").exists()
    assert summary["num_models"] == 1
    with pytest.raises(DataConfigError):  # nor does training after an evaluation's warning
        evaluator.train()
    single = make_trainer(tmp_path, **settings)  # one checkpoint file, as mamlpp-eval --checkpoint
    with pytest.warns(UserWarning, match="train_model_1' was trained on"):
        single.evaluate_checkpoints([str(tmp_path / tiny_config().experiment_name / "saved_models" / "train_model_1")])
    monkeypatch.setattr(FewShotDataset, "split_fingerprints", real)
    same = make_trainer(tmp_path, allow_config_change=True, **settings)
    same.train()  # the run's own data resumes as before
    assert same.epochs_done == 2


def test_split_fingerprints_follow_the_classes_and_their_order():
    from mamlpp_fast.data.sampler import FewShotDataset, SplitData

    def dataset(names, counts):
        split = SplitData(storage=np.zeros((len(names), 1, 1, 2, 2), np.uint8), class_ids=np.arange(len(names)),
                          counts=np.asarray(counts), class_names=tuple(names))
        return FewShotDataset(name="x", splits={"train": split}, lut=np.zeros((1, 256), np.float32))

    base = dataset(["a", "b"], [2, 2]).split_fingerprints()
    assert dataset(["a", "b"], [2, 2]).split_fingerprints() == base
    assert dataset(["b", "a"], [2, 2]).split_fingerprints() != base  # task sampling follows the order
    assert dataset(["a", "b"], [2, 1]).split_fingerprints() != base


# ---------------------------------------------------------------------- stop signals, mid-epoch resume
# SIGTERM / Ctrl-C stop after the current meta-iteration with a checkpoint, periodic mid-epoch
# checkpoints survive a crash, and a rerun resumes inside the epoch exactly as if it had never
# stopped (parameters, optimizer state and every statistic).
STOP_EPOCHS = 3  # the tiny preset has 3 iterations per epoch: 9 in all


def _sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)


def _uninterrupted(tmp_path):
    whole = make_trainer(tmp_path / "whole", total_epochs=STOP_EPOCHS)
    assert whole.train()["finished"]
    return _final_state(whole)


def _assert_same_run(a, b):
    assert a["current_iter"] == b["current_iter"] == 3 * STOP_EPOCHS
    assert_same_tensors(a["network"], b["network"], "network.")
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer.")
    for key, values in a["per_epoch_statistics"].items():
        if key != "epoch_seconds":
            assert values == b["per_epoch_statistics"][key], key
    assert "epoch_in_progress" not in b


def test_sigterm_mid_epoch_saves_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    part = make_trainer(tmp_path / "parts", total_epochs=STOP_EPOCHS)
    call_after(part.learner, 4, _sigterm_self)  # iteration 4: the first of epoch 2
    outcome = part.train()
    assert outcome["stopped_because"] == "signal" and outcome["signal"] == "SIGTERM"
    assert outcome["current_iter"] == 4 and not outcome["finished"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back

    saved = _final_state(part)
    assert saved["current_iter"] == saved["data_current_iter"] == 4
    record = saved["epoch_in_progress"]
    assert record["epoch_index"] == 1 and record["iterations"] == 1 and len(record["train_losses"]) == 1
    assert len(saved["per_epoch_statistics"]["val_accuracy_mean"]) == 1  # epoch 2 not validated
    assert not os.path.exists(part.checkpoint_path(2))  # the ensemble's files are epoch ends only

    messages = []
    resumed = Trainer(tiny_config(total_epochs=STOP_EPOCHS), tmp_path / "parts", progress=False, log=messages.append)
    assert resumed.train()["finished"]
    assert any("resumed from" in m and "epoch 2/3 in progress, 1/3" in m for m in messages), messages
    _assert_same_run(_uninterrupted(tmp_path), _final_state(resumed))


def _resume_to_the_end(folder):
    resumed = Trainer(tiny_config(total_epochs=STOP_EPOCHS), folder, progress=False, log=lambda message: None)
    outcome = resumed.train()
    assert outcome["finished"], outcome
    return resumed


@pytest.mark.parametrize("calls", [3, 9], ids=["first_epoch", "last_epoch"])
def test_a_signal_in_an_epochs_last_iteration_stops_before_its_validation(tmp_path, calls):
    trainer = make_trainer(tmp_path / "parts", total_epochs=STOP_EPOCHS)
    call_after(trainer.learner, calls, _sigterm_self)
    outcome = trainer.train()
    assert outcome["stopped_because"] == "signal" and outcome["current_iter"] == calls
    assert not outcome["finished"]  # all iterations may be done, but not the last validation
    assert outcome["epochs_done"] == calls // 3 - 1  # validated epochs
    saved = _final_state(trainer)
    assert saved["epoch_in_progress"]["iterations"] == 3  # trained, not validated
    assert len(saved["per_epoch_statistics"]["val_accuracy_mean"]) == calls // 3 - 1
    assert saved["epoch"] == calls // 3 - 1
    assert not os.path.exists(trainer.checkpoint_path(calls // 3))
    _assert_same_run(_uninterrupted(tmp_path), _final_state(_resume_to_the_end(tmp_path / "parts")))


def test_a_signal_during_the_final_validation_is_reported_and_no_test_starts(tmp_path):
    trainer = make_trainer(tmp_path, total_epochs=STOP_EPOCHS)
    validate = trainer.validate
    calls = []

    def validate_then_signal():
        calls.append(1)
        result = validate()
        if len(calls) == STOP_EPOCHS:  # the final epoch: training is finished, the signal still counts
            _sigterm_self()
        return result

    trainer.validate = validate_then_signal
    trainer.run_test = lambda *args, **kwargs: pytest.fail("the test protocol started after a stop signal")
    outcome = trainer.run_experiment()
    assert outcome["finished"] and outcome["stopped_because"] == "signal" and outcome["signal"] == "SIGTERM"
    assert "test" not in outcome
    assert "epoch_in_progress" not in _final_state(trainer)


def test_a_record_that_does_not_match_a_finished_run_trains_nothing_more(tmp_path):
    trainer = make_trainer(tmp_path, total_epochs=2)
    assert trainer.train()["finished"]
    path = trainer.checkpoint_path("latest")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["epoch_in_progress"] = {"epoch_index": 0, "iterations": 3}  # inconsistent with iteration 6
    torch.save(state, path)
    resumed = make_trainer(tmp_path, total_epochs=2)
    outcome = resumed.train()
    assert outcome["finished"] and outcome["current_iter"] == 6 and outcome["epochs_done"] == 2


def test_a_kill_during_validation_loses_only_the_validation(tmp_path):
    trainer = make_trainer(tmp_path / "parts", total_epochs=STOP_EPOCHS)
    validate = trainer.validate
    calls = []

    def crash_in_the_second_validation():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated kill")
        return validate()

    trainer.validate = crash_in_the_second_validation
    with pytest.raises(RuntimeError, match="simulated kill"):
        trainer.train()
    saved = _final_state(trainer)
    assert saved["current_iter"] == 6 and saved["epoch_in_progress"]["iterations"] == 3
    messages = []
    resumed = Trainer(tiny_config(total_epochs=STOP_EPOCHS), tmp_path / "parts", progress=False, log=messages.append)
    assert resumed.train()["finished"]
    assert any("epoch 2/3 trained, not yet validated" in m for m in messages), messages
    _assert_same_run(_uninterrupted(tmp_path), _final_state(resumed))


def test_train_again_in_the_same_process_after_a_signal_continues_the_epoch(tmp_path):
    trainer = make_trainer(tmp_path / "parts", total_epochs=STOP_EPOCHS)
    call_after(trainer.learner, 4, _sigterm_self)
    assert trainer.train()["stopped_because"] == "signal"
    assert trainer.train()["finished"]  # e.g. Ctrl-C in a notebook, then train() again
    _assert_same_run(_uninterrupted(tmp_path), _final_state(trainer))


def test_periodic_mid_epoch_checkpoints_survive_a_crash(tmp_path):
    crashing = Trainer(tiny_config(total_epochs=STOP_EPOCHS), tmp_path / "parts", progress=False,
                       checkpoint_minutes=1e-9, log=lambda message: None)

    def crash():
        raise RuntimeError("simulated crash")

    call_after(crashing.learner, 6, crash)  # inside iteration 6 (the last of epoch 2): never counted
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    saved = _final_state(crashing)
    assert saved["current_iter"] == 5  # saved after iteration 5 (mid-epoch 2)
    assert saved["epoch_in_progress"]["iterations"] == 2

    resumed = Trainer(tiny_config(total_epochs=STOP_EPOCHS), tmp_path / "parts", progress=False,
                      log=lambda message: None)
    assert resumed.train()["finished"]
    _assert_same_run(_uninterrupted(tmp_path), _final_state(resumed))


def test_without_a_stop_or_the_interval_only_trained_epochs_are_saved_before_validation(tmp_path):
    # With the default 10-minute interval the tiny run writes no partial epoch; each epoch's
    # trained state is written once before its validation (a kill there loses only that).
    trainer = make_trainer(tmp_path, total_epochs=2)
    writes = []
    original = trainer.save_progress
    trainer.save_progress = lambda record: (writes.append(record), original(record))
    assert trainer.train()["finished"]
    assert [(w["epoch_index"], w["iterations"]) for w in writes] == [(0, 3), (1, 3)]
    assert "epoch_in_progress" not in _final_state(trainer)


def test_an_epoch_record_that_does_not_match_the_iteration_is_dropped_with_a_warning(tmp_path):
    part = make_trainer(tmp_path, total_epochs=STOP_EPOCHS)
    call_after(part.learner, 4, _sigterm_self)
    part.train()
    path = part.checkpoint_path("latest")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["epoch_in_progress"]["iterations"] = 2  # as if written by a run with other epochs
    torch.save(state, path)
    resumed = make_trainer(tmp_path, total_epochs=STOP_EPOCHS)
    with pytest.warns(UserWarning, match="does not match iteration 4"):
        assert resumed.train()["finished"]
    assert len(_final_state(resumed)["per_epoch_statistics"]["train_loss_mean"]) == STOP_EPOCHS


@pytest.mark.parametrize("minutes", [0, -1.0, float("nan")])
def test_checkpoint_minutes_must_be_positive(tmp_path, minutes):
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        Trainer(tiny_config(), tmp_path, checkpoint_minutes=minutes)


# ---------------------------------------------------------------------- StopRequests alone
def test_stop_requests_sets_a_flag_and_a_second_ctrl_c_raises():
    before = signal.getsignal(signal.SIGINT)
    with StopRequests() as stop:
        assert stop.active and stop.requested is None
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.requested == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal keeps the first name
        time.sleep(0.01)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_requests_outside_the_main_thread_installs_nothing():
    seen = {}

    def run():
        with StopRequests() as stop:
            seen["active"] = stop.active

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == {"active": False}


@pytest.mark.parametrize("name", ["SIGNOPE", "SIGKILL", "SIGSTOP", "NSIG"])
def test_stop_requests_rejects_signals_it_cannot_catch(tmp_path, name):
    with pytest.raises(ValueError, match=f"signals: '{name}' is not a signal that can be caught"):
        StopRequests([name])
    with pytest.raises(ValueError, match=f"signals: '{name}'"):
        Trainer(tiny_config(), tmp_path, stop_signals=["SIGTERM", name])
    assert not any(tmp_path.iterdir())


def test_stop_requests_leaves_an_ignored_signal_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a job started with '&'
    try:
        with StopRequests() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stop.requested is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# ---------------------------------------------------------------------- the real CLI
def test_cli_sigterm_exits_143_and_the_rerun_finishes_the_epoch(tmp_path):
    command = [sys.executable, "-m", "mamlpp_fast", "train", "--preset", "synthetic-tiny",
               "--set", "total_epochs=1", "--iters-per-epoch", "40", "--output-dir", str(tmp_path / "runs"),
               "--no-progress", "--no-test", "--threads", "1", "--checkpoint-minutes", "1e-9"]
    env = dict(_cli_env(), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        lines = read_until(process.stdout, "saved progress at iteration 2 ", timeout=120)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines) + out
    assert process.returncode == 128 + signal.SIGTERM, (output, err[-2000:])
    assert "SIGTERM: stopped at iteration" in output and "rerun the same command to resume" in output
    latest = tmp_path / "runs" / "synthetic_tiny_5way_1shot" / "saved_models" / "train_model_latest"
    state = torch.load(latest, map_location="cpu", weights_only=False)
    assert 2 <= state["current_iter"] < 40 and state["epoch_in_progress"]["iterations"] == state["current_iter"]

    rerun = subprocess.run(command[:-2], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "epoch 1/1 in progress" in rerun.stdout
    final = torch.load(latest, map_location="cpu", weights_only=False)
    assert final["current_iter"] == 40 and "epoch_in_progress" not in final
    assert len(final["per_epoch_statistics"]["train_loss_mean"]) == 1
