"""Command-line entry points: ``mamlpp-train`` and ``mamlpp-eval``.

    mamlpp-train --preset synthetic-quick                 # about a minute on a laptop CPU
    mamlpp-train --preset maml++_omniglot_5w1s --dataset-dir /data/omniglot
    mamlpp-train --config experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_5_0.json
    mamlpp-train --preset maml++_omniglot_20w1s --set batch_size=4 --set total_epochs=50
    mamlpp-eval  --experiment runs/omniglot_maml++_5way_1shot   # top-5 ensemble test
    mamlpp-eval  --checkpoint runs/x/saved_models/train_model_12

``python -m mamlpp_fast train ...`` and ``python -m mamlpp_fast eval ...`` do the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["train_main", "eval_main", "main", "build_config", "CLI_PRESETS", "DEFAULT_PRESET"]

# Synthetic-data presets (the built-in procedural glyphs; no download needed).
_SYNTHETIC_BASE = dict(
    dataset_name="synthetic", dataset_path="synthetic",
    image_height=28, image_width=28, image_channels=1,
    num_classes_per_set=5, num_samples_per_class=1, num_target_samples=1,
)
CLI_PRESETS: Dict[str, Dict[str, Any]] = {
    # About a minute on 2 CPU cores; clearly above chance (20%).
    "synthetic-quick": dict(
        _SYNTHETIC_BASE, cnn_num_filters=32, batch_size=4,
        number_of_training_steps_per_iter=3, number_of_evaluation_steps_per_iter=3,
        second_order=False, multi_step_loss_num_epochs=3,
        total_epochs=5, total_iter_per_epoch=50, total_epochs_before_pause=100,
        num_evaluation_tasks=100, experiment_name="synthetic_quick_5way_1shot",
    ),
    # A few seconds: smoke tests of the pipeline.
    "synthetic-tiny": dict(
        _SYNTHETIC_BASE, cnn_num_filters=8, batch_size=2,
        number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2,
        multi_step_loss_num_epochs=2, total_epochs=2, total_iter_per_epoch=3,
        total_epochs_before_pause=100, num_evaluation_tasks=4,
        experiment_name="synthetic_tiny_5way_1shot",
    ),
}
DEFAULT_PRESET = "synthetic-quick"
_DTYPES = {"float32": "float32", "float": "float32", "fp32": "float32",
           "float64": "float64", "double": "float64", "fp64": "float64"}


class CLIError(Exception):
    """A bad command-line argument (the message names it)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with an error as one line and a pointer to --help instead of the usage block
    (which for these commands is a dozen lines that bury the message)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


@contextlib.contextmanager
def _one_line_warnings(prog: str):
    """Warnings printed as ``prog: warning: message`` (no source path and line) while a command
    runs; the previous display is restored after."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _all_preset_names() -> List[str]:
    from .config import preset_names

    return list(CLI_PRESETS) + preset_names()


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_sets(items: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--set: expected key=value, got {item!r}")
        out[key] = _parse_value(value.strip())
    return out


def build_config(config_path: Optional[str] = None, preset_name: Optional[str] = None,
                 sets: Sequence[str] = (), seed: Optional[int] = None):
    """The MAMLConfig of --config / --preset plus --set overrides and --seed."""
    from .config import MAMLConfig, preset, preset_names, unknown_keys_error

    overrides = _parse_sets(sets)
    if seed is not None:
        overrides["seed"] = seed
    if config_path is not None and preset_name is not None:
        raise CLIError("--config and --preset are mutually exclusive; pass one")
    try:
        if config_path is not None:
            if not os.path.isfile(config_path):
                raise CLIError(f"--config: file {config_path!r} does not exist")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = MAMLConfig.from_json(config_path)
            values = base.to_dict()
            unknown = sorted(set(overrides) - set(values))
            if unknown:
                raise CLIError(f"--set: {unknown_keys_error(unknown, values)}")
            values.update(overrides)
            return MAMLConfig.from_dict(values)
        name = preset_name or DEFAULT_PRESET
        if name in CLI_PRESETS:
            values = dict(CLI_PRESETS[name])
            values.update(overrides)
            return MAMLConfig.from_dict(values)
        if name not in preset_names():
            raise CLIError(f"--preset: unknown preset {name!r}; choose one of {_all_preset_names()}")
        return preset(name, **overrides)
    except CLIError:
        raise
    except (ValueError, TypeError) as error:
        where = "--config" if config_path is not None else "--set/--preset"
        raise CLIError(f"{where}: {error}") from None


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("experiment")
    group.add_argument("--config", metavar="PATH.json", help="an official experiment_config JSON file")
    group.add_argument("--preset", metavar="NAME",
                       help=f"a named config (default {DEFAULT_PRESET}); one of: {', '.join(_all_preset_names())}")
    group.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override an official config key (repeatable; VALUE parsed as JSON when possible)")
    group.add_argument("--seed", type=int, help="the official `seed` (network initialisation)")
    group.add_argument("--dataset-dir", metavar="DIR",
                       help="data set folder (default: the config's dataset_path, else $MAMLPP_FAST_DATA_DIR or $DATASET_DIR)")
    group.add_argument("--output-dir", default="runs", metavar="DIR",
                       help="parent of the experiment folder (default ./runs)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    group.add_argument("--dtype", default="float32", help="float32 (default) or float64")
    group.add_argument("--backend", default="auto", help="kernels: auto (default), aten, cpp, cuda or triton")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads for torch (default: torch's choice; 1 is much faster on a busy machine)")
    group.add_argument("--allocator", default="keep", choices=("keep", "system"),
                       help="keep (default): glibc keeps freed host memory for reuse instead of unmapping it, "
                            "which makes CPU meta-steps up to 1.5x faster (mamlpp_fast.allocator); "
                            "system: glibc's defaults")


def _resolve_runtime(args: argparse.Namespace):
    import torch

    dtype_name = _DTYPES.get(str(args.dtype).lower())
    if dtype_name is None:
        raise CLIError(f"--dtype: expected float32 or float64, got {args.dtype!r}")
    dtype = getattr(torch, dtype_name)
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise CLIError(f"--device: {args.device!r} is not a device (try cpu or cuda)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device: {args.device!r} requested but CUDA is not available")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.allocator == "keep":
        from .allocator import keep_freed_memory

        keep_freed_memory()  # a no-op where it does not apply (not glibc)
    from .meta_learner import _BACKENDS

    if args.backend not in _BACKENDS:
        raise CLIError(f"--backend: expected one of {list(_BACKENDS)}, got {args.backend!r}")
    if args.dataset_dir is not None and not os.path.isdir(args.dataset_dir):
        raise CLIError(f"--dataset-dir: {args.dataset_dir!r} is not a folder")
    return device, dtype


def _print_test(summary: Dict[str, Any]) -> None:
    print(
        f"test accuracy: {summary['test_accuracy_mean']:.4f} "
        f"± {summary['test_accuracy_ci95']:.4f} (95% CI over {summary['num_tasks']} tasks; "
        f"std over predictions {summary['test_accuracy_std']:.4f}; "
        f"ensemble of {summary['num_models']} model(s)"
        + (f", epochs {summary['epochs']})" if "epochs" in summary else ")"),
        flush=True,
    )


def _train_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mamlpp-train",
        description="Train a MAML++ experiment (resumes from saved_models/train_model_latest), "
                    "then test the top-5 validation epochs as an ensemble.",
    )
    _common_arguments(parser)
    parser.add_argument("--max-minutes", type=float, default=None, metavar="M",
                        help="stop cleanly at the end of the epoch that passes M minutes (rerun to resume)")
    parser.add_argument("--max-iters", type=int, default=None, metavar="N",
                        help="stop after N meta-iterations, with a checkpoint (mid-epoch too; an epoch "
                             "ending at N is validated first); rerun to resume")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume an experiment whose checkpoint was trained with another config, "
                             "continuing with the new values (without it that is refused, listing "
                             "the keys that differ)")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0, metavar="M",
                        help="also save train_model_latest mid-epoch every M minutes (default 10; 0: "
                             "only at epoch ends). SIGTERM and Ctrl-C always save after the current "
                             "iteration; a rerun resumes inside the epoch")
    parser.add_argument("--keep-best-only", action="store_true",
                        help="delete epoch checkpoints outside the best max(5, max_models_to_save) by "
                             "validation accuracy (the official code, and the default, keep every epoch's)")
    parser.add_argument("--train-seed", type=int, default=None, metavar="K",
                        help="the official train_seed (which tasks are sampled), with _train_seedK "
                             "appended to the experiment name: the paper's runs are train_seed 0, 1 "
                             "and 2, and mamlpp-eval --experiment ... (repeated) gives mean ± std over them")
    parser.add_argument("--iters-per-epoch", type=int, default=None, metavar="N",
                        help="shorthand for --set total_iter_per_epoch=N (short epochs for smoke runs)")
    parser.add_argument("--no-test", action="store_true", help="skip the test protocol at the end")
    parser.add_argument("--task-chunk-size", type=int, default=None, metavar="K",
                        help="memory-bounded meta-step: run the meta-batch K tasks at a time and "
                             "accumulate the meta-gradients (same result, less memory)")
    parser.add_argument("--checkpoint-inner-steps", action="store_true",
                        help="recompute each inner step in the outer backward instead of storing it")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="on CUDA, record the meta-step as a CUDA graph and replay it (same result, "
                             "far fewer kernel launches); elsewhere it warns and runs eagerly")
    parser.add_argument("--conv-strategy", default="auto", metavar="S",
                        help="how the task-batched convolutions run: auto (default), grouped, explicit, "
                             "bmm, triton (CUDA) or blockdiag, or one per conv layer, comma-separated "
                             "(e.g. triton,auto,auto,auto); all give the same results to rounding")
    parser.add_argument("--memory-format", default="auto", choices=("auto", "contiguous", "channels_last"),
                        help="layout of the activations: auto (default: channels_last where the fused "
                             "batch-norm stage runs on the compiled CPU kernels, else contiguous), "
                             "contiguous (NCHW) or channels_last; the same results to rounding")
    parser.add_argument("--autocast", default=None, choices=("bfloat16",),
                        help="opt-in mixed precision: the convolutions and the classifier under "
                             "torch.autocast in bfloat16, the rest in float32 (faster where the "
                             "hardware has fast bfloat16; changes the arithmetic, so off by default; "
                             "no effect with --dtype float64)")
    return parser


def _describe_kernels(learner) -> str:
    """What the learner's ops run on, e.g. "bn_lrelu_pool=cpp, lslr_update=cpp, task_conv=explicit;
    activations channels_last"."""
    import torch

    from . import _backend

    active = ", ".join(f"{op}={name}" for op, name in learner.active_backends.items())
    active += f"; activations {learner.active_memory_format}"
    if learner.autocast_dtype is not None:
        active += f"; autocast {str(learner.autocast_dtype).replace('torch.', '')}"
        if learner.dtype == torch.float64:
            active += " (no effect in float64)"
    if not _backend.has_extension():
        active += f" (compiled extension not loaded: {_backend._C_ERROR})"
    return active


def _conv_strategy(value: str, num_layers: int):
    """--conv-strategy as MetaLearner's conv_strategy: one name, or a tuple of one per layer."""
    from .ops.task_conv import per_layer_requests

    strategy = tuple(item.strip() for item in value.split(",")) if "," in value else value
    try:
        per_layer_requests(strategy, num_layers, argument="--conv-strategy")
    except ValueError as error:
        raise CLIError(str(error)) from None
    return strategy


def _with_train_seed(config, train_seed: int, named: bool):
    """--train-seed: the config with ``train_seed`` set and, unless --set named the experiment,
    ``_train_seed{K}`` appended to its name (each run of a setting gets its own folder)."""
    name = config.experiment_name if named else f"{config.experiment_name}_train_seed{train_seed}"
    try:
        return config.replace(train_seed=train_seed, experiment_name=name)
    except ValueError as error:
        raise CLIError(f"--train-seed: {error}") from None


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    with _one_line_warnings("mamlpp-train"):
        return _train_command(argv)


def _train_command(argv: Optional[Sequence[str]]) -> int:
    parser = _train_parser()
    args = parser.parse_args(argv)
    try:
        if args.max_minutes is not None and not args.max_minutes > 0:
            raise CLIError(f"--max-minutes: must be > 0, got {args.max_minutes}")
        if args.max_iters is not None and args.max_iters < 1:
            raise CLIError(f"--max-iters: must be >= 1, got {args.max_iters}")
        if not args.checkpoint_minutes >= 0:
            raise CLIError(f"--checkpoint-minutes: must be >= 0 (0: only at epoch ends), got "
                           f"{args.checkpoint_minutes}")
        sets = list(args.sets)
        if args.iters_per_epoch is not None:
            if args.iters_per_epoch < 1:
                raise CLIError(f"--iters-per-epoch: must be >= 1, got {args.iters_per_epoch}")
            sets.append(f"total_iter_per_epoch={args.iters_per_epoch}")
        config = build_config(args.config, args.preset, sets, args.seed)
        if args.train_seed is not None:
            set_keys = {item.split("=", 1)[0].strip() for item in sets}
            if "train_seed" in set_keys:
                raise CLIError("--train-seed: train_seed is also given with --set; pass it once")
            config = _with_train_seed(config, args.train_seed, named="experiment_name" in set_keys)
        if args.task_chunk_size is not None and args.task_chunk_size < 1:
            raise CLIError(f"--task-chunk-size: must be >= 1, got {args.task_chunk_size}")
        conv_strategy = _conv_strategy(args.conv_strategy, config.num_stages)
        device, dtype = _resolve_runtime(args)
    except CLIError as error:
        parser.error(str(error))
        return 2  # not reached
    from .distributed import destroy, init_from_env, torchrun_world_size

    distributed = None
    if torchrun_world_size() > 1:  # launched by torchrun: shard tasks over the ranks
        if config.batch_size % torchrun_world_size() != 0:
            parser.error(f"batch_size={config.batch_size} cannot be shared equally by {torchrun_world_size()} "
                         f"processes (--nproc_per_node): use a batch_size divisible by it")
        distributed = init_from_env(device=device)
        if distributed.device is not None:
            device = distributed.device
        if distributed.rank != 0:
            args.no_test = True  # rank 0 runs the test protocol and writes its summary
    try:
        try:
            trainer = _make_trainer(config, args, device, dtype, conv_strategy, distributed)
        except CLIError as error:
            parser.error(str(error))
        return _train_and_test(trainer, args, distributed)
    finally:
        if distributed is not None:  # gloo's threads must not outlive the interpreter (std::terminate)
            destroy(distributed)


def _make_trainer(config, args, device, dtype, conv_strategy, distributed):
    """The Trainer the command line describes; rank 0 prints what it trains and on which kernels."""
    from .trainer import Trainer

    trainer = Trainer(config, args.output_dir, device=device, dtype=dtype, backend=args.backend,
                      dataset_dir=args.dataset_dir, progress=False if args.no_progress else None,
                      max_minutes=args.max_minutes, max_iters=args.max_iters,
                      checkpoint_minutes=args.checkpoint_minutes or None,
                      keep_best_only=args.keep_best_only,
                      learner_options={"task_chunk_size": args.task_chunk_size,
                                       "checkpoint_inner_steps": args.checkpoint_inner_steps,
                                       "cuda_graphs": args.cuda_graphs,
                                       "conv_strategy": conv_strategy,
                                       "memory_format": args.memory_format,
                                       "autocast_dtype": args.autocast},
                      distributed=distributed, allow_config_change=args.allow_config_change)
    _build_learner(trainer)
    if distributed is None or distributed.is_main:
        print(f"experiment: {trainer.experiment_dir} ({config.num_classes_per_set}-way "
              f"{config.num_samples_per_class}-shot, {config.dataset_name}, {config.total_epochs} epochs x "
              f"{config.total_iter_per_epoch} iterations, batch {config.batch_size}, device {device}"
              + (f", {distributed.world_size} ranks" if distributed is not None else "") + ")", flush=True)
        print(f"kernels: {_describe_kernels(trainer.learner)}", flush=True)
    return trainer


def _build_learner(trainer) -> None:
    """Build the trainer's MetaLearner now: a backend or conv strategy this machine cannot run is
    an argument error (CLIError naming the option), not a traceback at the first meta-step."""
    try:
        _ = trainer.learner
    except ValueError as error:
        raise CLIError(_as_option(str(error))) from None


def _as_option(message: str) -> str:
    """A MetaLearner argument error in the command line's terms (backend= -> --backend)."""
    for argument, option in (("conv_strategy", "--conv-strategy"), ("memory_format", "--memory-format"),
                             ("autocast_dtype", "--autocast"), ("backend", "--backend")):
        if message.startswith(argument):
            return option + message[len(argument):]
    return message


def _train_and_test(trainer, args, distributed) -> int:
    from .data import DataError, DataNotFoundError
    from .experiment_lock import ExperimentBusyError
    from .trainer import ConfigChangedError, DistributedResumeError

    try:
        outcome = trainer.train()
        if outcome["stopped_because"] == "signal":
            # The conventional status of a process ended by a signal (a scheduler may requeue on it).
            number = getattr(signal, outcome["signal"] or "", signal.SIGTERM)
            return 128 + int(number)
        if outcome["finished"] and not args.no_test:
            _print_test(trainer.run_test())
    except (DataError, DataNotFoundError) as error:  # before RuntimeError, which DataError is
        print(f"mamlpp-train: error: data: {error}", file=sys.stderr)
        return 2
    except (ExperimentBusyError, DistributedResumeError, ConfigChangedError) as error:
        print(f"mamlpp-train: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if distributed is None:
            raise
        # A collective failed: most likely another rank died (or the group timed out).
        print(f"mamlpp-train: error: rank {distributed.rank}/{distributed.world_size}: a collective "
              f"failed, probably because another rank died ({error}). The last saved state (an "
              f"epoch end, or --checkpoint-minutes) is in {trainer.saved_models_dir}/train_model_latest; "
              f"rerun the same torchrun command to resume.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; train_model_latest holds the last saved state (epoch end, or "
              "--checkpoint-minutes), rerun to resume", file=sys.stderr)
        return 130
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mamlpp-eval",
        description="Test a trained experiment with the official protocol (top-5 validation "
                    "epochs, logits averaged), several runs of one setting (each tested, then "
                    "mean ± std over the runs, as the paper reports), or checkpoint files.",
    )
    parser.add_argument("--experiment", metavar="DIR", nargs="+", action="extend", default=[],
                        help="an experiment folder made by mamlpp-train; several (after one --experiment "
                             "or repeated) for runs of one setting, e.g. train_seed 0, 1, 2: each is "
                             "tested, then mean ± std over them")
    parser.add_argument("--checkpoint", metavar="PATH", action="append", default=[],
                        help="a checkpoint file, or an experiment folder (repeat the option to ensemble files)")
    parser.add_argument("--top-n", type=int, default=5, help="models in the ensemble (default 5)")
    parser.add_argument("--num-tasks", type=int, default=None,
                        help="test tasks (default: the config's num_evaluation_tasks), rounded down to "
                             "whole batches of batch_size as the official protocol runs them")
    parser.add_argument("--runs-summary", metavar="PATH.json", default=None,
                        help="with several experiments: also write the per-run results and the "
                             "mean ± std over runs to this JSON file, and a figure of them (same name, .png)")
    _common_arguments(parser)
    return parser


def _config_of_checkpoint(path: str) -> Dict[str, Any]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "network" not in state:
        raise CLIError(f"--checkpoint: {path!r} is not a MAML++ checkpoint")
    if "config" not in state:
        raise CLIError(f"--checkpoint: {path!r} holds no config (official checkpoint?); pass --config or --preset")
    return state["config"]


def _test_summary_name(args: argparse.Namespace, own_num_tasks: Optional[int], batch_size: int) -> str:
    """``test_summary`` for the official protocol (top 5, the run's own config, whose
    num_evaluation_tasks is ``own_num_tasks``); another name, saying what differs, for anything
    else, so that the official result is never overwritten. The task count in the name is the
    one tested: whole batches of ``batch_size``, as the official protocol runs them."""
    parts = []
    if args.top_n != 5:
        parts.append(f"top{args.top_n}")
    if args.num_tasks is not None and args.num_tasks != own_num_tasks:
        parts.append(f"{args.num_tasks // batch_size * batch_size}tasks")
    if args.sets or args.seed is not None or args.config is not None or args.preset is not None:
        parts.append("custom")
    return "_".join(["test_summary", *parts])


def _eval_targets(args: argparse.Namespace) -> Tuple[List[str], List[str]]:
    """(experiment folders, checkpoint files) from --experiment and --checkpoint."""
    targets = [(path, "--experiment") for path in args.experiment]
    targets += [(path, "--checkpoint") for path in args.checkpoint]
    if not targets:
        raise CLIError("--experiment or --checkpoint is required")
    folders: List[str] = []
    files: List[str] = []
    for path, option in targets:
        if os.path.isdir(path):
            folders.append(path)
        elif os.path.isfile(path) and option == "--checkpoint":
            files.append(path)
        elif os.path.isfile(path):
            raise CLIError(f"--experiment: {path!r} is a file, not an experiment folder (use --checkpoint)")
        else:
            raise CLIError(f"{option}: {path!r} does not exist")
    if folders and files:
        raise CLIError("--experiment/--checkpoint: pass experiment folders, or checkpoint files, not both")
    for folder in folders:
        if not os.path.isfile(os.path.join(folder, "saved_models", "train_model_latest")):
            raise CLIError(f"--experiment: {folder!r} has no saved_models/train_model_latest")
    if len(set(os.path.realpath(folder) for folder in folders)) < len(folders):
        raise CLIError("--experiment: the same experiment folder is given twice")
    return folders, files


def _eval_config(args: argparse.Namespace, probe: str, experiment_dir: Optional[str]):
    """(config, num_evaluation_tasks of the checkpoint's own config or None) for evaluating the
    checkpoint `probe`: --config/--preset when given, else the checkpoint's own config; then
    --set, --num-tasks and --seed."""
    from .config import MAMLConfig

    sets = list(args.sets)
    if args.num_tasks is not None:
        sets.append(f"num_evaluation_tasks={args.num_tasks}")
    if args.config is not None or args.preset is not None:
        return build_config(args.config, args.preset, sets, args.seed), None
    values = _config_of_checkpoint(probe)
    own_num_tasks = values.get("num_evaluation_tasks")
    if experiment_dir is not None:  # the folder names the experiment, wherever it moved
        values["experiment_name"] = os.path.basename(os.path.abspath(experiment_dir))
    overridden = _parse_sets(sets)
    values.update(overridden)
    if args.seed is not None:
        values["seed"] = args.seed
    try:
        return MAMLConfig.from_dict(values, ignored="accept"), own_num_tasks
    except ValueError as error:
        source = "--set" if overridden or args.seed is not None else "the checkpoint's config"
        raise CLIError(f"{source}: {error}") from None


def _test_experiment(args: argparse.Namespace, experiment_dir: str, config, own_num_tasks, device, dtype):
    """The official test of one experiment folder: (its Trainer, its summary), or an exit status
    after printing why it failed."""
    from .data import DataError, DataNotFoundError
    from .trainer import Trainer

    output_dir, name = os.path.split(os.path.abspath(experiment_dir))
    config = config.replace(experiment_name=name)
    trainer = Trainer(config, output_dir, device=device, dtype=dtype, backend=args.backend,
                      dataset_dir=args.dataset_dir, progress=False)
    try:
        _build_learner(trainer)
    except CLIError as error:
        print(f"mamlpp-eval: error: {error}", file=sys.stderr)
        return trainer, 2
    if not trainer.maybe_resume(training=False):
        print(f"mamlpp-eval: error: --experiment: could not load {experiment_dir!r}", file=sys.stderr)
        return trainer, 2
    if not trainer.finished:
        print(f"note: {experiment_dir}: training is not finished ({trainer.epochs_done}/{config.total_epochs} "
              f"epochs); testing the best epochs so far", file=sys.stderr)
    summary_name = _test_summary_name(args, own_num_tasks, int(config.batch_size))
    try:
        summary = trainer.run_test(top_n=args.top_n, summary_name=summary_name)
    except (DataError, DataNotFoundError) as error:
        print(f"mamlpp-eval: error: data: {error}", file=sys.stderr)
        return trainer, 2
    except ValueError as error:  # e.g. a top_n above the checkpoints a run keeps
        print(f"mamlpp-eval: error: {error}", file=sys.stderr)
        return trainer, 2
    except FileNotFoundError as error:
        # A training process still running on the experiment prunes checkpoints that fall
        # out of its top N (--keep-best-only); the next evaluation sees the new ranking.
        print(f"mamlpp-eval: error: {error}; if the experiment is still training with pruning, a "
              f"newer epoch may have replaced it: run mamlpp-eval again; else use a smaller --top-n",
              file=sys.stderr)
        return trainer, 2
    print(f"written: {os.path.join(trainer.logs_dir, trainer.test_summary_name)}.json", flush=True)
    return trainer, summary


def _trained_config(folder: str, trainer) -> Dict[str, Any]:
    """The config a run was trained with (not the evaluation's, which --config/--set change);
    the evaluation's for a checkpoint that holds none (the official code's)."""
    try:
        return _config_of_checkpoint(os.path.join(folder, "saved_models", "train_model_latest"))
    except CLIError:
        return trainer.config.to_dict()


def _report_runs(runs: List[Dict[str, Any]], val_accuracies: Dict[str, List[float]],
                 summary_path: Optional[str]) -> None:
    """Several runs of one setting: the table and mean ± std over runs; with `summary_path`,
    also that JSON and a figure beside it (same name, .png)."""
    from .plots import plot_runs
    from .runs_summary import format_runs_summary, summarize_runs

    aggregate = summarize_runs(runs)
    print(format_runs_summary(aggregate), flush=True)
    if summary_path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
    with open(summary_path, "w", encoding="utf-8") as handle:
        json.dump(aggregate, handle, indent=2)
        handle.write("\n")
    print(f"written: {summary_path}", flush=True)
    setting = re.sub(r"_train_seed\d+$", "", str(runs[0]["config"].get("experiment_name")))
    figure = plot_runs(aggregate, val_accuracies, f"{len(runs)} runs of {setting}",
                       os.path.splitext(summary_path)[0] + ".png")
    if figure is not None:
        print(f"written: {figure}", flush=True)


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    with _one_line_warnings("mamlpp-eval"):
        return _eval_command(argv)


def _eval_command(argv: Optional[Sequence[str]]) -> int:
    parser = _eval_parser()
    args = parser.parse_args(argv)
    try:
        if args.top_n < 1:
            raise CLIError(f"--top-n: must be >= 1, got {args.top_n}")
        if args.num_tasks is not None and args.num_tasks < 1:
            raise CLIError(f"--num-tasks: must be >= 1, got {args.num_tasks}")
        folders, files = _eval_targets(args)
        if args.runs_summary is not None and len(folders) < 2:
            raise CLIError("--runs-summary: needs two or more --experiment folders (runs of one setting)")
        if folders:
            configs = [_eval_config(args, os.path.join(folder, "saved_models", "train_model_latest"), folder)
                       for folder in folders]
        else:
            configs = [_eval_config(args, files[0], None)]
        device, dtype = _resolve_runtime(args)
    except CLIError as error:
        parser.error(str(error))
        return 2
    if not folders:
        from .data import DataError, DataNotFoundError
        from .trainer import Trainer

        trainer = Trainer(configs[0][0], os.path.dirname(os.path.abspath(files[0])), device=device, dtype=dtype,
                          backend=args.backend, dataset_dir=args.dataset_dir, progress=False)
        try:
            _build_learner(trainer)
        except CLIError as error:
            parser.error(str(error))
        try:
            summary = trainer.evaluate_checkpoints(files)
        except (DataError, DataNotFoundError) as error:
            print(f"mamlpp-eval: error: data: {error}", file=sys.stderr)
            return 2
        _print_test(summary)
        return 0
    runs = []
    val_accuracies: Dict[str, List[float]] = {}
    for folder, (config, own_num_tasks) in zip(folders, configs):
        trainer, summary = _test_experiment(args, folder, config, own_num_tasks, device, dtype)
        if not isinstance(summary, dict):
            return summary
        _print_test(summary)
        runs.append({"experiment": folder, "config": _trained_config(folder, trainer), "test": summary,
                     "epochs_done": trainer.epochs_done, "total_epochs": trainer.config.total_epochs})
        val_accuracies[folder] = list(trainer.state["per_epoch_statistics"]["val_accuracy_mean"])
    if len(runs) > 1:
        _report_runs(runs, val_accuracies, args.runs_summary)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "eval": eval_main}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mamlpp_fast {train,eval} [options]\n"
              "  train   train (and resume) an experiment, then test it (mamlpp-train)\n"
              "  eval    test an experiment or checkpoints (mamlpp-eval)")
        return 0 if argv else 2
    command = argv[0]
    if command not in commands:
        print(f"python -m mamlpp_fast: error: unknown command {command!r}; use train or eval", file=sys.stderr)
        return 2
    return commands[command](argv[1:])
