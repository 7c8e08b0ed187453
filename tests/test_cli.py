"""mamlpp-train / mamlpp-eval / python -m mamlpp_fast: end to end on a tiny budget, and clear
errors for bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from mamlpp_fast.cli import build_config, eval_main, main, train_main

TINY = ["--preset", "synthetic-tiny", "--no-progress", "--threads", "1"]
EXPERIMENT = "synthetic_tiny_5way_1shot"


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_train_then_eval_end_to_end(tmp_path, capsys):
    assert train_main(TINY + ["--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "epoch 2/2" in out
    assert "kernels: bn_lrelu_pool=" in out and "task_conv=explicit" in out  # which backend is active
    assert "activations channels_last" in out  # and which layout
    assert "data: synthetic" in out  # which data, how many classes
    folder = tmp_path / EXPERIMENT
    for name in ("config.json", "saved_models/train_model_1", "saved_models/train_model_2",
                 "saved_models/train_model_latest", "logs/summary.csv", "logs/summary.json",
                 "logs/test_summary.csv", "logs/test_summary.json", "logs/learning_curves.png",
                 "logs/inner_loop_learning_rates.png"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "logs" / "test_summary.json").read_text())
    assert summary["num_tasks"] == 4 and summary["num_models"] == 2
    assert 0.0 <= summary["test_accuracy_mean"] <= 1.0

    # Rerunning a finished experiment trains nothing and tests again (official behaviour).
    assert train_main(TINY + ["--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" not in out and "test accuracy:" in out

    assert eval_main(["--experiment", str(folder), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy: {summary['test_accuracy_mean']:.4f}" in out

    # Other settings never overwrite the official result: they get a name saying what differs.
    official = (folder / "logs" / "test_summary.json").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # evaluation's own settings are no "config differs" warning
        assert eval_main(["--experiment", str(folder), "--threads", "1", "--top-n", "1", "--num-tasks", "2"]) == 0
    out = capsys.readouterr().out
    assert "test_summary_top1_2tasks.json" in out and "ensemble of 1 model(s)" in out
    assert json.loads((folder / "logs" / "test_summary_top1_2tasks.json").read_text())["num_tasks"] == 2
    assert (folder / "logs" / "test_summary.json").read_text() == official
    # The run's own task count (4 here) is the official protocol again: its own summary name.
    assert eval_main(["--experiment", str(folder), "--threads", "1", "--num-tasks", "4"]) == 0
    assert f"written: {folder / 'logs' / 'test_summary'}.json" in capsys.readouterr().out
    assert json.loads((folder / "logs" / "test_summary.json").read_text())["test_accuracy_mean"] == summary["test_accuracy_mean"]
    assert eval_main(["--experiment", str(folder), "--threads", "1", "--top-n", "7"]) == 2
    assert "top_n (--top-n) must be between 1 and 5 (the validated epochs, or max(5, max_models_to_save)" \
        in capsys.readouterr().err

    assert eval_main(["--checkpoint", str(folder / "saved_models" / "train_model_2"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "ensemble of 1 model(s)" in out


def _trained_network(tmp_path, name, extra):
    """The network state after TINY's float64 training run with the extra arguments."""
    out = tmp_path / name
    assert train_main(TINY + ["--dtype", "float64", "--no-test", "--output-dir", str(out)] + extra) == 0
    return torch.load(out / EXPERIMENT / "saved_models" / "train_model_latest", weights_only=False)["network"]


def assert_same_training(actual_state, expected_state):
    for key, expected in expected_state.items():
        actual = actual_state[key]
        if ".conv.bias" in key or "-conv-bias" in key or key.endswith("running_mean"):
            # Conv biases have an exactly-zero gradient (BN removes them); Adam turns the rounding
            # noise into steps of ~lr * noise / eps, and running means include the bias.
            assert (actual - expected).abs().max().item() < 1e-8, key
        else:
            assert (actual - expected).norm().item() <= 1e-10 * expected.norm().item(), key


@pytest.mark.parametrize("name, extra, kernels", [
    # --task-chunk-size and --checkpoint-inner-steps change memory use, not the result.
    ("bounded", ["--task-chunk-size", "1", "--checkpoint-inner-steps"], "task_conv=explicit"),
    # and --conv-strategy (here one per layer) changes kernels, not the result.
    ("conv", ["--conv-strategy", "bmm, explicit,auto,blockdiag"], "task_conv=bmm,explicit,explicit,blockdiag"),
    # and --memory-format changes the activations' layout (the plain run: channels_last), not the result.
    ("nchw", ["--memory-format", "contiguous"], "activations contiguous"),
    # and --autocast is documented to leave a float64 run as it is.
    ("autocast", ["--autocast", "bfloat16"], "autocast bfloat16 (no effect in float64)"),
])
def test_speed_and_memory_options_match_the_plain_run(tmp_path, capsys, name, extra, kernels):
    optioned = _trained_network(tmp_path, name, extra)
    assert kernels in capsys.readouterr().out  # the option reached the learner
    assert_same_training(optioned, _trained_network(tmp_path, "plain", []))


def test_python_dash_m_entry_point(tmp_path):
    import mamlpp_fast

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(mamlpp_fast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-m", "mamlpp_fast", "train", *TINY, "--set", "total_epochs=1",
                           "--output-dir", str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "test accuracy:" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "mamlpp_fast", "fit"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown command 'fit'" in bad.stderr


def test_set_and_iters_per_epoch_override_the_preset():
    config = build_config(preset_name="synthetic-tiny", sets=["batch_size=3", "second_order=false",
                                                               "experiment_name=abc"], seed=7)
    assert config.batch_size == 3 and config.second_order is False and config.seed == 7
    assert config.experiment_name == "abc"
    official = build_config(preset_name="maml++_omniglot_20w1s", sets=["total_iter_per_epoch=10"])
    assert official.num_classes_per_set == 20 and official.total_iter_per_epoch == 10


def test_official_json_config(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"batch_size": 2, "dataset_name": "synthetic", "second_order": "false",
                                "num_classes_per_set": 5, "experiment_name": "from_json",
                                "weight_decay": 0.0, "max_pooling": True,
                                "number_of_evaluation_steps_per_iter": 2,
                                "number_of_training_steps_per_iter": 2}))
    config = build_config(config_path=str(path), sets=["cnn_num_filters=8"])
    assert config.batch_size == 2 and config.second_order is False and config.cnn_num_filters == 8


@pytest.mark.parametrize("argv, message", [
    (["--set", "no_such_key=1"], "unknown config key"),
    (["--set", "batch_size"], "--set: expected key=value"),
    (["--set", "batch_size=abc"], "batch_size must be an integer"),
    (["--preset", "nope"], "--preset: unknown preset 'nope'"),
    (["--config", "/no/such/file.json"], "--config: file '/no/such/file.json' does not exist"),
    (["--config", "x.json", "--preset", "synthetic-tiny"], "mutually exclusive"),
    (["--dtype", "int8"], "--dtype: expected float32 or float64"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    (["--backend", "fastest"], "--backend: expected one of"),
    (["--max-minutes", "-1"], "--max-minutes: must be > 0"),
    (["--max-iters", "0"], "--max-iters: must be >= 1"),
    (["--iters-per-epoch", "0"], "--iters-per-epoch: must be >= 1"),
    (["--threads", "0"], "--threads: must be >= 1"),
    (["--allocator", "jemalloc"], "argument --allocator: invalid choice: 'jemalloc'"),
    (["--dataset-dir", "/no/such/dir"], "--dataset-dir: '/no/such/dir' is not a folder"),
    (["--max-iters", "two"], "argument --max-iters: invalid int value"),
    (["--task-chunk-size", "0"], "--task-chunk-size: must be >= 1"),
    (["--conv-strategy", "fastest"], "--conv-strategy: expected one of"),
    (["--conv-strategy", "bmm,auto"], "--conv-strategy: a per-layer strategy needs 4 entries"),
    (["--set", "task_learnig_rate=0.1"], "(did you mean 'task_learning_rate'?)"),
    *([(["--backend", "triton"], "--backend: 'triton' cannot run on cpu here"),
       (["--backend", "cuda"], "--backend: 'cuda' cannot run on cpu here"),
       (["--conv-strategy", "triton,auto,auto,auto"], "--conv-strategy: ('triton', 'auto', 'auto', 'auto') "
                                                     "cannot run on cpu")]
      if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else []),
])
def test_bad_train_arguments_name_the_argument(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv + ["--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    # One line and a pointer to --help, not argparse's usage block or a traceback.
    assert "usage:" not in err and "Traceback" not in err and "(see mamlpp-train --help)" in err
    assert not any(tmp_path.iterdir())  # nothing was started


def test_a_bad_backend_environment_variable_is_named(tmp_path, capsys, monkeypatch):
    from mamlpp_fast import _backend

    monkeypatch.setattr(_backend, "_default_backend", "bogus")  # as MAMLPP_FAST_BACKEND=bogus at import
    with pytest.raises(SystemExit):
        train_main(TINY + ["--output-dir", str(tmp_path)])
    assert "MAMLPP_FAST_BACKEND='bogus' is not a backend" in capsys.readouterr().err


def test_resuming_with_another_config_is_refused_then_allowed_with_one_line_warnings(tmp_path, capsys):
    assert train_main(TINY + ["--output-dir", str(tmp_path), "--no-test", "--set", "total_epochs=1"]) == 0
    capsys.readouterr()
    changed = TINY + ["--output-dir", str(tmp_path), "--no-test", "--set", "total_epochs=2"]
    assert train_main(changed) == 2
    err = capsys.readouterr().err
    assert "mamlpp-train: error:" in err and "total_epochs: 1 -> 2" in err and "--allow-config-change" in err
    assert train_main(changed + ["--allow-config-change"]) == 0
    captured = capsys.readouterr()
    assert "mamlpp-train: warning: resuming" in captured.err and "total_epochs: 1 -> 2" in captured.err
    assert "UserWarning" not in captured.err and "warnings.warn" not in captured.err  # one line, no source
    assert "epoch 2/2" in captured.out


def test_max_iters_stops_mid_epoch_and_a_rerun_continues_there(tmp_path, capsys):
    assert train_main(TINY + ["--output-dir", str(tmp_path), "--no-test", "--max-iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "max_iters: stopped at iteration 1 (epoch 1: 1/3 trained)" in out
    assert train_main(TINY + ["--output-dir", str(tmp_path), "--no-test"]) == 0
    out = capsys.readouterr().out
    assert "at iteration 1 (epoch 1/2 in progress, 1/3)" in out and "epoch 2/2" in out


@pytest.mark.parametrize("argv, message", [
    ([], "--experiment or --checkpoint is required"),
    (["--checkpoint", "/no/such/ckpt"], "--checkpoint: '/no/such/ckpt' does not exist"),
    (["--experiment", "/no/such/run"], "--experiment: '/no/such/run' does not exist"),
    (["--top-n", "0", "--checkpoint", "x"], "--top-n: must be >= 1"),
])
def test_bad_eval_arguments_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_data_and_busy_errors_are_reported_without_traceback(tmp_path, capsys):
    from mamlpp_fast.experiment_lock import ExperimentLock

    # 30 images per class are more than the synthetic glyph set draws per class.
    assert train_main(TINY + ["--output-dir", str(tmp_path / "a"), "--set", "num_samples_per_class=30"]) == 2
    err = capsys.readouterr().err
    assert "mamlpp-train: error: data: num_samples_per_class" in err and "Traceback" not in err
    with ExperimentLock(str(tmp_path / "b" / EXPERIMENT)):  # another trainer is running
        assert train_main(TINY + ["--output-dir", str(tmp_path / "b")]) == 2
    assert "is training" in capsys.readouterr().err


def test_torchrun_batch_size_must_divide_over_the_ranks(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it
    with pytest.raises(SystemExit):
        train_main(TINY + ["--output-dir", str(tmp_path), "--set", "batch_size=3"])
    assert "batch_size=3 cannot be shared equally by 2 processes" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_eval_on_a_folder_without_checkpoints(tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_main(["--experiment", str(tmp_path)])
    assert "has no saved_models/train_model_latest" in capsys.readouterr().err


def test_main_usage(capsys):
    assert main([]) == 2
    assert "usage: python -m mamlpp_fast" in capsys.readouterr().out


# ---------------------------------------------------------------------- runs of one setting
def _train_run(tmp_path, *extra):
    assert train_main(TINY + ["--no-test", "--output-dir", str(tmp_path)] + list(extra)) == 0


def test_train_seed_runs_and_their_mean_and_std_over_runs(tmp_path, capsys):
    import numpy as np

    for train_seed in (0, 1, 2):
        _train_run(tmp_path, "--train-seed", str(train_seed))
    folders = [tmp_path / f"{EXPERIMENT}_train_seed{k}" for k in (0, 1, 2)]
    networks = []
    for k, folder in enumerate(folders):
        state = torch.load(folder / "saved_models" / "train_model_latest", map_location="cpu", weights_only=False)
        assert state["config"]["train_seed"] == k and state["config"]["experiment_name"] == folder.name
        networks.append(state["network"])
    # Other train seeds sample other tasks: the runs are not copies of each other.
    some_weight = next(key for key in networks[0] if key.endswith("conv.weight"))
    assert not torch.equal(networks[0][some_weight], networks[1][some_weight])
    capsys.readouterr()

    out_json = tmp_path / "summary" / "runs.json"
    # Several folders after one --experiment (as a shell's {0,1,2} expands them).
    argv = ["--threads", "1", "--runs-summary", str(out_json), "--experiment", *map(str, folders)]
    assert eval_main(argv) == 0
    out = capsys.readouterr().out
    aggregate = json.loads(out_json.read_text())
    each = [json.loads((folder / "logs" / "test_summary.json").read_text())["test_accuracy_mean"]
            for folder in folders]  # every run's own official result is written as usual
    assert aggregate["num_runs"] == 3 and [row["train_seed"] for row in aggregate["runs"]] == [0, 1, 2]
    assert [row["test_accuracy_mean"] for row in aggregate["runs"]] == each
    assert aggregate["test_accuracy_mean_over_runs"] == pytest.approx(np.mean(each), abs=1e-15)
    assert aggregate["test_accuracy_std_over_runs"] == pytest.approx(np.std(each), abs=1e-15)
    assert aggregate["test_accuracy_sample_std_over_runs"] == pytest.approx(np.std(each, ddof=1), abs=1e-15)
    assert aggregate["warnings"] == [] and aggregate["differing_config_keys"] == []
    assert f"over 3 runs: {np.mean(each):.4f} ± {np.std(each):.4f}" in out
    figure = out_json.with_suffix(".png")
    assert figure.is_file() and figure.stat().st_size > 1000 and f"written: {figure}" in out


def test_runs_that_are_not_one_setting_are_flagged(tmp_path, capsys):
    _train_run(tmp_path, "--set", "experiment_name=a")
    _train_run(tmp_path, "--set", "experiment_name=b")  # same train_seed and seed: the same run again
    _train_run(tmp_path, "--set", "experiment_name=c", "--set", "cnn_num_filters=4", "--train-seed", "3")
    capsys.readouterr()
    argv = ["--threads", "1"] + [arg for name in "abc" for arg in ("--experiment", str(tmp_path / name))]
    assert eval_main(argv) == 0
    out = capsys.readouterr().out
    assert "have the same train_seed and seed (0, 104)" in out
    assert "the runs' configs differ in ['cnn_num_filters']" in out
    assert (tmp_path / "c").is_dir()  # --set experiment_name wins over --train-seed's suffix


@pytest.mark.parametrize("argv_of, message", [
    (lambda run: ["--experiment", run, "--experiment", run], "--experiment: the same experiment folder is given twice"),
    (lambda run: ["--experiment", run, "--runs-summary", "x.json"], "--runs-summary: needs two or more"),
    (lambda run: ["--experiment", run, "--checkpoint", os.path.join(run, "saved_models", "train_model_1")],
     "pass experiment folders, or checkpoint files, not both"),
    (lambda run: ["--experiment", os.path.join(run, "config.json")], "is a file, not an experiment folder"),
])
def test_bad_multi_run_arguments_name_the_argument(tmp_path, capsys, argv_of, message):
    _train_run(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        eval_main(argv_of(str(tmp_path / EXPERIMENT)))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_summarize_runs_arithmetic_and_format():
    from mamlpp_fast.runs_summary import format_runs_summary, summarize_runs

    config = {"train_seed": 0, "seed": 104, "cnn_num_filters": 64, "experiment_name": "x"}
    runs = [{"experiment": f"r{k}", "config": dict(config, train_seed=k), "epochs_done": 100, "total_epochs": 100,
             "test": {"test_accuracy_mean": acc, "test_accuracy_ci95": 0.003}}
            for k, acc in enumerate([0.99, 0.995, 0.98])]
    summary = summarize_runs(runs)
    assert summary["test_accuracy_mean_over_runs"] == pytest.approx(0.988333333333333)
    assert summary["test_accuracy_std_over_runs"] == pytest.approx(0.0062360956446232)
    assert summary["test_accuracy_sample_std_over_runs"] == pytest.approx(0.0076376261582597)
    assert "over 3 runs: 0.9883 ± 0.0062" in format_runs_summary(summary)
    one = summarize_runs(runs[:1])
    assert one["test_accuracy_std_over_runs"] == 0.0 and "ddof=1: n/a" in format_runs_summary(one)
    runs[2]["epochs_done"] = 40
    assert any("not finished training" in text for text in summarize_runs(runs)["warnings"])
    with pytest.raises(ValueError, match="runs is empty"):
        summarize_runs([])


def test_eval_of_a_checkpoint_without_a_config_takes_the_given_preset(tmp_path, capsys):
    """Official checkpoints hold no config: --preset supplies it, and the test runs to the end."""
    _train_run(tmp_path)
    latest = tmp_path / EXPERIMENT / "saved_models" / "train_model_latest"
    state = torch.load(latest, map_location="cpu", weights_only=False)
    del state["config"]
    torch.save(state, latest)
    capsys.readouterr()
    assert eval_main(["--experiment", str(tmp_path / EXPERIMENT), "--preset", "synthetic-tiny", "--threads", "1"]) == 0
    assert "test accuracy:" in capsys.readouterr().out
