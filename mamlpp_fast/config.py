"""MAML++ experiment configuration with the official argument names.

`MAMLConfig` mirrors the arguments of the official code (HowToTrainYourMAMLPytorch,
`utils/parser_utils.py` plus the keys its experiment_config JSON files add). Its defaults are
the released MAML++ Omniglot 5-way 1-shot config, so `MAMLConfig()` is a working MAML++ setup.

`MAMLConfig.from_json(path)` reads an official JSON config as it is, with the official
semantics: the strings "true"/"false" become booleans, a key missing from the file takes the
*argparse* default of the official code (not ours: e.g. `task_learning_rate` falls back to 0.1,
`seed` to 104), and keys that the official code reads but ignores (`IGNORED_KEYS`, e.g. the
`weight_decay` every released file carries) are accepted and reported in `config.ignored_keys`.
Everywhere else (`from_dict`, `preset` overrides, the command line's `--set`) such a key would
have no effect, so it raises `ValueError`, like a key nobody knows.

Two fixes of official quirks are available behind flags and are off by default:
`bn_use_running_stats_in_evaluation` and `bn_restore_stats_after_evaluation` (spec 1c).

The network options of the official code that no released config uses work too, built as the
official `VGGReLUNormNetwork` builds them:

- `max_pooling=false` (the official argparse default): stride-2 convolutions and a final average
  pool instead of 2x2 max-pools;
- `conv_padding=false`: unpadded convolutions;
- `norm_layer="layer_norm"`: MetaLayerNormLayer over each conv output [C, H, W], gamma frozen at
  1, beta trained (outside the inner loop unless the next option says otherwise), no per-step
  rows or running statistics;
- `enable_inner_loop_optimizable_bn_params=true`: the norm layers' trainable parameters join the
  inner loop (with LSLR rates of their own) as single (C,) rows, adapted per task.

The fused stage kernel serves batch norm followed by a max-pool; other stages run their ATen
composition, and strided or unpadded convolutions run on ATen's grouped convolution.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Tuple

__all__ = ["MAMLConfig", "preset", "preset_names", "ARGPARSE_DEFAULTS", "IGNORED_KEYS", "NORM_LAYERS",
           "conv_output_size"]

# Defaults of the official argparse parser, used for keys a JSON file leaves out.
ARGPARSE_DEFAULTS: Dict[str, Any] = {
    "batch_size": 32,
    "image_height": 28,
    "image_width": 28,
    "image_channels": 1,
    "indexes_of_folders_indicating_class": [-2, -3],
    "train_val_test_split": [0.73982737361, 0.26, 0.13008631319],
    "samples_per_iter": 1,
    "seed": 104,
    "num_dataprovider_workers": 4,
    "max_models_to_save": 5,
    "dataset_name": "omniglot_dataset",
    "dataset_path": "datasets/omniglot_dataset",
    "num_target_samples": 15,
    "second_order": False,
    "total_epochs": 200,
    "total_iter_per_epoch": 500,
    "min_learning_rate": 0.00001,
    "meta_learning_rate": 0.001,
    "task_learning_rate": 0.1,
    "norm_layer": "batch_norm",
    "max_pooling": False,
    "per_step_bn_statistics": False,
    "num_classes_per_set": 20,
    "number_of_training_steps_per_iter": 1,
    "number_of_evaluation_steps_per_iter": 1,
    "cnn_num_filters": 64,
    "num_samples_per_class": 1,
}

# Official keys that the released JSON files set and ARGPARSE_DEFAULTS has no value for (the
# evaluation fixes are mamlpp_fast's own flags, not official keys).
_OWN_FLAGS = frozenset({"bn_use_running_stats_in_evaluation", "bn_restore_stats_after_evaluation"})


def _keys_without_argparse_default() -> set:
    known = {f.name for f in dataclasses.fields(MAMLConfig)} - {"ignored_keys"}
    return known - set(ARGPARSE_DEFAULTS) - _OWN_FLAGS


# Keys that the official code accepts but never reads (spec section 3, "Unused keys"), plus
# argparse options of the official parser that have no effect on MAML++ at their released
# values (the few whose other values matter are checked in from_dict).
IGNORED_KEYS = frozenset(
    {
        "weight_decay",
        "dropout_rate_value",
        "learnable_batch_norm_momentum",
        "minimum_per_task_contribution",
        "cnn_blocks_per_stage",
        "cnn_num_blocks",
        "train_in_stages",
        "load_from_npz_files",
        "evalute_on_test_set_only",
        "evaluate_on_test_set_only",
        "continue_from_epoch",
        "init_inner_loop_learning_rate",
        "gpu_to_use",
        "meta_opt_bn",
        "hypernetwork_scale",
        "full_context_unroll_k",
        "use_full_context_embeddings",
        "grad_penalty",
        "use_gdrive",
        "name_of_args_json_file",
        "reset_stored_filepaths",
        "reset_stored_paths",
        "reverse_channels",
        "labels_as_int",
        "architecture_name",
        "num_of_gpus",
        "samples_per_iter",
    }
)

# The official MetaConvNormLayerReLU builds MetaBatchNormLayer or MetaLayerNormLayer.
NORM_LAYERS = ("batch_norm", "layer_norm")


def conv_output_size(size: int, stride: int, padding: int) -> int:
    """Output size of the official 3x3 convolution along one axis."""
    return (size + 2 * padding - 3) // stride + 1


# Ignored keys that the official code does read: its data loader draws
# num_of_gpus * batch_size * samples_per_iter tasks per iteration (spec section 4). mamlpp_fast
# draws batch_size tasks, so in an official file they are accepted only at their default, 1.
_TASKS_PER_ITERATION_KEYS = ("samples_per_iter", "num_of_gpus")

# Ignored keys whose true value the official data code acts on, which mamlpp_fast does not
# implement, so only false is accepted: reverse_channels flips RGB to BGR, labels_as_int casts
# the class labels to int (which fails on Omniglot's and mini-ImageNet's folder names), and
# reset_stored_filepaths rebuilds the class lists the official code ships (datasets/*.json)
# from indexes_of_folders_indicating_class.
_FALSE_ONLY_KEYS = {
    "reverse_channels": "the official loader flips RGB images to BGR then",
    "labels_as_int": "the official loader casts the class folder names to int then (and fails)",
    "reset_stored_filepaths": "the official loader then rebuilds the class lists it ships for "
                              "dataset_name 'omniglot_dataset' from indexes_of_folders_indicating_class",
}

# Keys holding numpy RandomState seeds, which must lie in [0, 2**32).
_SEED_KEYS = ("seed", "train_seed", "val_seed")

# What `dataset_name` selects: the data loaders (`mamlpp_fast.data.make_dataset`) match these
# substrings, and so do the official code's `'omniglot' in dataset_name` (augmentation) and
# `'imagenet' in dataset_name` (gradient clamp) tests. Values: examples of accepted names.
_DATASET_FAMILIES = {
    "omniglot": ("omniglot", "omniglot_dataset"),
    "imagenet": ("mini_imagenet_full_size", "mini-imagenet", "mini_imagenet"),
    "synthetic": ("synthetic", "synthetic_glyphs"),
}



def unknown_keys_error(unknown: Iterable[str], known: Iterable[str]) -> ValueError:
    """The error for config keys that do not exist, with the closest known key for each typo."""
    unknown, known = sorted(unknown), sorted(known)
    matches = {key: match[0] for key in unknown for match in [difflib.get_close_matches(key, known, n=1)] if match}
    hints = ([repr(match) for match in matches.values()] if len(unknown) == 1
             else [f"{match!r} for {key!r}" for key, match in matches.items()])
    return ValueError(f"unknown config key(s) {unknown}" + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                      + f"; known keys are the official argument names: {known}")

@dataclass
class MAMLConfig:
    """Hyperparameters of a MAML++ experiment, named as in the official code.

    The defaults reproduce the released MAML++ Omniglot 5-way 1-shot config
    (`omniglot_maml++-omniglot_1_8_0.1_64_5_0.json`).
    """

    # Tasks and images.
    batch_size: int = 8
    image_height: int = 28
    image_width: int = 28
    image_channels: int = 1
    num_classes_per_set: int = 5
    num_samples_per_class: int = 1
    num_target_samples: int = 1
    # Inner loop.
    number_of_training_steps_per_iter: int = 5
    number_of_evaluation_steps_per_iter: int = 5
    task_learning_rate: float = 0.1
    learnable_per_layer_per_step_inner_loop_learning_rate: bool = True
    second_order: bool = True
    first_order_to_second_order_epoch: int = -1
    use_multi_step_loss_optimization: bool = True
    multi_step_loss_num_epochs: int = 10
    # Network.
    norm_layer: str = "batch_norm"
    num_stages: int = 4
    cnn_num_filters: int = 64
    max_pooling: bool = True
    conv_padding: bool = True
    per_step_bn_statistics: bool = True
    learnable_bn_gamma: bool = True
    learnable_bn_beta: bool = True
    enable_inner_loop_optimizable_bn_params: bool = False
    # Outer loop.
    meta_learning_rate: float = 0.001
    min_learning_rate: float = 0.00001
    total_epochs: int = 100
    total_iter_per_epoch: int = 500
    total_epochs_before_pause: int = 100
    seed: int = 104
    # Data and experiment bookkeeping.
    dataset_name: str = "omniglot"
    dataset_path: str = "omniglot"
    sets_are_pre_split: bool = False
    train_val_test_split: List[float] = field(
        default_factory=lambda: [0.70918052988, 0.03080714725, 0.2606284658]
    )
    indexes_of_folders_indicating_class: List[int] = field(default_factory=lambda: [-3, -2])
    train_seed: int = 0
    val_seed: int = 0
    num_evaluation_tasks: int = 600
    experiment_name: str = "omniglot_1_8_0.1_64_5_0"
    num_dataprovider_workers: int = 4
    max_models_to_save: int = 5
    load_into_memory: bool = True
    # Fixes of official quirks (not official keys; off by default, so behaviour is faithful).
    bn_use_running_stats_in_evaluation: bool = False
    bn_restore_stats_after_evaluation: bool = False
    # Keys of the source JSON that the official code ignores (filled by from_json).
    ignored_keys: Tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        self._coerce_and_validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any], *, missing: str = "ours", ignored: str = "reject"
    ) -> "MAMLConfig":
        """Build a config from a mapping of official keys.

        Args:
            values: official keys to values; "true"/"false" strings are accepted as booleans.
            missing: "ours" fills absent keys with this class's defaults; "argparse" fills them
                with the official argparse defaults first (what the official code does).
            ignored: what to do with keys the official code ignores (`IGNORED_KEYS`): "reject"
                (the default: such a key would have no effect, so it is an error) or "accept"
                (record them in `ignored_keys`; what `from_json` does, to read official files
                as they are). `samples_per_iter` and `num_of_gpus` are accepted only at 1.
        """
        if missing not in ("ours", "argparse"):
            raise ValueError(f"missing must be 'ours' or 'argparse', got {missing!r}")
        if ignored not in ("reject", "accept"):
            raise ValueError(f"ignored must be 'reject' or 'accept', got {ignored!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"ignored_keys"}
        kwargs: Dict[str, Any] = {}
        if missing == "argparse":
            kwargs.update({k: v for k, v in ARGPARSE_DEFAULTS.items() if k in known})
        ignored_found = []
        unknown = []
        for key, value in values.items():
            if key in known:
                kwargs[key] = _parse_bool_string(value)
            elif key in IGNORED_KEYS:
                ignored_found.append(key)
            else:
                unknown.append(key)
        if unknown:
            raise unknown_keys_error(unknown, known)
        for key in _TASKS_PER_ITERATION_KEYS:
            if key in ignored_found and not _is_number(values[key], 1):
                raise ValueError(
                    f"{key}={values[key]!r} is not supported: the official data loader draws "
                    f"num_of_gpus * batch_size * samples_per_iter tasks per iteration, mamlpp_fast "
                    f"draws batch_size; set {key} to 1 and multiply batch_size instead"
                )
        for key, effect in _FALSE_ONLY_KEYS.items():
            if key in ignored_found and _parse_bool_string(values[key]) not in (False, None):
                advice = "set it to false" if ignored == "accept" else "remove it"
                raise ValueError(f"{key}={values[key]!r} is not supported: {effect}; {advice}")
        if ignored_found and ignored == "reject":
            raise ValueError(
                f"config key(s) {sorted(ignored_found)} would have no effect: mamlpp_fast does "
                f"not read them (IGNORED_KEYS); remove them (official JSON files that carry them "
                f"are read as they are by MAMLConfig.from_json)"
            )
        return cls(**kwargs, ignored_keys=tuple(sorted(ignored_found)))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "MAMLConfig":
        """Read an official experiment_config JSON file, with the official semantics."""
        try:
            with open(path, "r", encoding="utf-8") as handle:
                values = json.load(handle)
        except FileNotFoundError:
            raise ValueError(f"config file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {str(path)!r} must hold a JSON object, got {type(values).__name__}")
        config = cls.from_dict(values, missing="argparse", ignored="accept")
        unset = sorted(_keys_without_argparse_default() - set(values))
        if unset:
            # The official code reads these from the file (the released files all set them);
            # e.g. without the LSLR flag it fails (its issue #38). Say what fills them here.
            warnings.warn(
                f"{os.path.basename(str(path))}: keys missing from the file, which have no official "
                f"argparse default that mamlpp_fast knows of: using mamlpp_fast's (MAML++) values "
                f"{ {key: getattr(config, key) for key in unset} }",
                stacklevel=2,
            )
        if config.ignored_keys:
            warnings.warn(
                f"{os.path.basename(str(path))}: keys ignored by the official code and by "
                f"mamlpp_fast: {list(config.ignored_keys)}",
                stacklevel=2,
            )
        return config

    def to_dict(self) -> Dict[str, Any]:
        """The official keys and values (JSON-serialisable)."""
        out = dataclasses.asdict(self)
        out.pop("ignored_keys")
        return out

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)

    def replace(self, **changes: Any) -> "MAMLConfig":
        """A copy with some keys changed (validated)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived values
    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.image_channels, self.image_height, self.image_width)

    @property
    def per_step_batch_norm(self) -> bool:
        """Batch norm with one row of running statistics per inner step (BNRS). The official
        layer norm ignores `per_step_bn_statistics`."""
        return self.norm_layer == "batch_norm" and bool(self.per_step_bn_statistics)

    @property
    def per_step_bn_affine(self) -> bool:
        """Batch norm with one row of gamma and beta per inner step (BNWB). With
        `enable_inner_loop_optimizable_bn_params` the official layer keeps one (C,) gamma and
        beta instead, which the inner loop adapts per task like the conv weights."""
        return self.per_step_batch_norm and not self.enable_inner_loop_optimizable_bn_params

    @property
    def conv_stride(self) -> int:
        """1 with max-pooling stages, 2 with the official max_pooling=false strided convolutions."""
        return 1 if self.max_pooling else 2

    @property
    def conv_padding_size(self) -> int:
        """The official `padding=args.conv_padding`: True pads by 1 pixel, False by none."""
        return int(bool(self.conv_padding))

    def conv_output_sizes(self) -> List[Tuple[int, int]]:
        """(H, W) of each stage's convolution output, where its norm layer acts. Raises
        ValueError where the official network could not be built (a map shrinks below one
        pixel, or the final average pool does not fit)."""
        height, width = self.image_height, self.image_width
        sizes = []
        for stage in range(self.num_stages):
            height = conv_output_size(height, self.conv_stride, self.conv_padding_size)
            width = conv_output_size(width, self.conv_stride, self.conv_padding_size)
            if height < 1 or width < 1:
                raise ValueError(
                    f"image_height x image_width {self.image_height}x{self.image_width} is too small for "
                    f"num_stages={self.num_stages} with conv_padding={str(bool(self.conv_padding)).lower()} "
                    f"and max_pooling={str(bool(self.max_pooling)).lower()}: stage {stage}'s 3x3 "
                    f"convolution has no output (use fewer stages, padded convolutions or larger images)"
                )
            sizes.append((height, width))
            if self.max_pooling:
                height, width = height // 2, width // 2
                if height < 1 or width < 1:
                    raise ValueError(
                        f"image_height x image_width {self.image_height}x{self.image_width} is too "
                        f"small for num_stages={self.num_stages} 2x2 max-pools (stage {stage})"
                    )
        if not self.max_pooling and width < height:
            raise ValueError(
                f"max_pooling=false: the final average pool takes windows of the feature map's "
                f"height ({height}x{height}), wider than its width ({width}); use image_width >= "
                f"image_height"
            )
        return sizes

    @property
    def clamps_meta_gradients(self) -> bool:
        """The official code clamps classifier gradients to [-10, 10] for imagenet datasets."""
        return "imagenet" in self.dataset_name

    def uses_second_order(self, epoch: int) -> bool:
        """Derivative-order annealing: second order only after `first_order_to_second_order_epoch`."""
        return bool(self.second_order) and epoch > self.first_order_to_second_order_epoch

    def uses_multi_step_loss(self, epoch: int, training_phase: bool) -> bool:
        """The MSL gate of the official `forward`."""
        return (
            bool(self.use_multi_step_loss_optimization)
            and training_phase
            and epoch < self.multi_step_loss_num_epochs
        )

    # ------------------------------------------------------------------ validation
    def _coerce_and_validate(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "ignored_keys":
                continue
            value = _parse_bool_string(getattr(self, f.name))
            setattr(self, f.name, _coerce(f.name, f.type, value))
        positive = (
            "batch_size", "image_height", "image_width", "image_channels", "num_classes_per_set",
            "num_samples_per_class", "num_target_samples", "number_of_training_steps_per_iter",
            "number_of_evaluation_steps_per_iter", "num_stages", "cnn_num_filters", "total_epochs",
            "total_iter_per_epoch", "num_evaluation_tasks", "multi_step_loss_num_epochs",
            "total_epochs_before_pause",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in _SEED_KEYS:
            value = getattr(self, name)
            if not 0 <= value < 2**32:
                raise ValueError(
                    f"{name} must be in [0, 2**32) (a numpy RandomState seed), got {value}"
                )
        if self.num_classes_per_set < 2:
            raise ValueError(f"num_classes_per_set must be >= 2, got {self.num_classes_per_set}")
        for name in ("meta_learning_rate", "min_learning_rate"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value}")
        if self.min_learning_rate > self.meta_learning_rate:
            raise ValueError(
                f"min_learning_rate ({self.min_learning_rate}) must be <= meta_learning_rate "
                f"({self.meta_learning_rate}): cosine annealing goes from meta_learning_rate down "
                f"to min_learning_rate (equal values turn it off)"
            )
        if not math.isfinite(self.task_learning_rate):
            raise ValueError(f"task_learning_rate must be finite, got {self.task_learning_rate}")
        if self.norm_layer not in NORM_LAYERS:
            raise ValueError(f"norm_layer must be one of {NORM_LAYERS}, got {self.norm_layer!r}")
        if (self.enable_inner_loop_optimizable_bn_params and self.norm_layer == "batch_norm"
                and self.learnable_bn_gamma != self.learnable_bn_beta):
            # The official MetaBatchNormLayer then reads params["weight"] and params["bias"] from
            # the inner-loop weights, which hold only the trainable one: a KeyError.
            raise ValueError(
                "enable_inner_loop_optimizable_bn_params=true with batch norm needs learnable_bn_gamma "
                "and learnable_bn_beta both true or both false (the official layer adapts gamma and "
                "beta together and fails otherwise)"
            )
        if self.bn_use_running_stats_in_evaluation and self.norm_layer != "batch_norm":
            raise ValueError(
                "bn_use_running_stats_in_evaluation=true needs norm_layer='batch_norm': layer norm "
                "keeps no running statistics"
            )
        if self.bn_use_running_stats_in_evaluation and not self.per_step_bn_statistics:
            # Without per-step statistics the official layer passes running_mean=None, so no
            # running statistics are tracked; the (C,) running_var keeps its zero initialisation.
            # (bn_restore_stats_after_evaluation has no such dependency: with nothing tracked,
            # restoring the statistics is a harmless no-op.)
            raise ValueError(
                "bn_use_running_stats_in_evaluation=true needs per_step_bn_statistics=true: "
                "without per-step BN statistics no running statistics are tracked (running_var "
                "stays 0), so evaluation would normalise with meaningless statistics"
            )
        if self.number_of_evaluation_steps_per_iter != self.number_of_training_steps_per_iter:
            # The official code indexes per-step BN and LSLR by step and only records target
            # predictions at step number_of_training_steps_per_iter - 1 (issue #28).
            raise ValueError(
                "number_of_evaluation_steps_per_iter must equal number_of_training_steps_per_iter "
                f"({self.number_of_evaluation_steps_per_iter} != "
                f"{self.number_of_training_steps_per_iter}): the official code breaks otherwise"
            )
        self.conv_output_sizes()  # raises where the network cannot be built
        self._validate_train_val_test_split()
        self._validate_dataset_name()
        self._validate_experiment_name()

    def _validate_train_val_test_split(self) -> None:
        split = self.train_val_test_split
        if len(split) != 3:
            raise ValueError(f"train_val_test_split must have 3 fractions, got {split!r}")
        for value in split:
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"train_val_test_split: each fraction must be a number in [0, 1], got {split!r}"
                )
        # The official load_dataset splits the classes at int(f0 * n) and int((f0 + f1) * n);
        # the test split is the rest, so the third value is never read (the released Omniglot
        # default [0.73982737361, 0.26, 0.13008631319] sums to more than 1).
        if split[0] + split[1] > 1.0:
            raise ValueError(
                f"train_val_test_split: the train and validation fractions must sum to <= 1, got "
                f"{split[0]} + {split[1]} = {split[0] + split[1]}"
            )
        self.train_val_test_split = [float(value) for value in split]

    def _validate_dataset_name(self) -> None:
        # A name must select exactly one family, matched without case as the loaders do. (The
        # official gradient clamp tests 'imagenet' in dataset_name with case, and so does
        # clamps_meta_gradients: 'Mini_ImageNet' loads mini-ImageNet without the clamp, as there.)
        families = [family for family in _DATASET_FAMILIES if family in self.dataset_name.lower()]
        if len(families) != 1:
            examples = [name for names in _DATASET_FAMILIES.values() for name in names]
            why = "matches several data sets" if families else "is not a supported data set"
            raise ValueError(
                f"dataset_name {self.dataset_name!r} {why}: use one of {examples}, or any name "
                f"containing exactly one of {list(_DATASET_FAMILIES)}"
            )

    def _validate_experiment_name(self) -> None:
        # The experiment folder is {output_dir}/{experiment_name}. Nested names ('omniglot/seed0')
        # and absolute paths are fine, as in the official code (os.path.abspath of the name); a
        # '..' part (leaving the output folder) or a name that is the output folder is not.
        name = self.experiment_name
        if not name.strip() or "\0" in name:
            raise ValueError(f"experiment_name must be a folder name, got {name!r}")
        parts = [part for part in re.split(r"[\\/]", name) if part not in ("", ".")]
        if not parts or ".." in parts:
            raise ValueError(
                f"experiment_name must name a folder inside the output folder (--output-dir), without "
                f"'..' parts, got {name!r}"
            )


def _parse_bool_string(value: Any) -> Any:
    """The official parser turns any value whose str() is "true"/"false" into a bool."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _is_number(value: Any, equal_to: Any = None) -> bool:
    """A finite int or float (not a bool), optionally equal to `equal_to`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return equal_to is None or value == equal_to


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    annotation = str(annotation)
    if annotation == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name} must be a boolean (or 'true'/'false'), got {value!r}")
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if annotation == "str":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    if annotation.startswith("List"):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return list(value)
    return value


# ---------------------------------------------------------------------- presets
_OMNIGLOT = dict(
    image_height=28, image_width=28, image_channels=1, cnn_num_filters=64, batch_size=8,
    num_target_samples=1, multi_step_loss_num_epochs=10, min_learning_rate=0.00001,
    dataset_name="omniglot", dataset_path="omniglot", sets_are_pre_split=False,
    train_val_test_split=[0.70918052988, 0.03080714725, 0.2606284658],
    total_epochs_before_pause=100,
)
_MINI_IMAGENET = dict(
    image_height=84, image_width=84, image_channels=3, cnn_num_filters=48, batch_size=2,
    num_target_samples=15, multi_step_loss_num_epochs=15, min_learning_rate=0.001,
    dataset_name="mini_imagenet_full_size", dataset_path="mini_imagenet_full_size",
    sets_are_pre_split=True, train_val_test_split=[0.64, 0.16, 0.20],
    total_epochs_before_pause=101,
)
_MAML_BASELINE = dict(
    use_multi_step_loss_optimization=False,
    learnable_per_layer_per_step_inner_loop_learning_rate=False,
    per_step_bn_statistics=False,
)
_SETTINGS = {
    "omniglot_5w1s": dict(_OMNIGLOT, num_classes_per_set=5, num_samples_per_class=1),
    "omniglot_5w5s": dict(_OMNIGLOT, num_classes_per_set=5, num_samples_per_class=5),
    "omniglot_20w1s": dict(_OMNIGLOT, num_classes_per_set=20, num_samples_per_class=1),
    "omniglot_20w5s": dict(_OMNIGLOT, num_classes_per_set=20, num_samples_per_class=5),
    "mini-imagenet_5w1s": dict(_MINI_IMAGENET, num_classes_per_set=5, num_samples_per_class=1),
    "mini-imagenet_5w5s": dict(_MINI_IMAGENET, num_classes_per_set=5, num_samples_per_class=5),
}


def _paper_era(setting: str) -> Dict[str, Any]:
    """Configs before May 2019 (spec section 3): bigger Omniglot batches, DA and LSLR 0.01 on
    mini-ImageNet (then read from init_inner_loop_learning_rate)."""
    if setting.startswith("omniglot"):
        return dict(batch_size=8 if setting == "omniglot_20w5s" else 16)
    shots = _SETTINGS[setting]["num_samples_per_class"]
    return dict(batch_size=4 if shots == 1 else 2, first_order_to_second_order_epoch=10,
                task_learning_rate=0.01)


def preset_names() -> List[str]:
    """All preset names: maml++_<setting>, maml_<setting> and maml++_<setting>_paper."""
    names = []
    for setting in _SETTINGS:
        names += [f"maml++_{setting}", f"maml_{setting}", f"maml++_{setting}_paper"]
    return names


def preset(name: str, **overrides: Any) -> MAMLConfig:
    """A released config by name, e.g. ``preset("maml++_omniglot_20w1s", batch_size=4)``.

    `maml++_<setting>` are the six released MAML++ configs, `maml_<setting>` the MAML
    baselines, and `maml++_<setting>_paper` the paper-era variants.
    """
    parts = name.split("_", 1)
    if len(parts) != 2 or parts[0] not in ("maml", "maml++"):
        raise ValueError(f"name: unknown preset {name!r}; choose one of {preset_names()}")
    method, rest = parts
    paper = rest.endswith("_paper")
    setting = rest[: -len("_paper")] if paper else rest
    if setting not in _SETTINGS or (paper and method != "maml++"):
        raise ValueError(f"name: unknown preset {name!r}; choose one of {preset_names()}")
    values: Dict[str, Any] = dict(_SETTINGS[setting])
    if method == "maml":
        values.update(_MAML_BASELINE)
    if paper:
        values.update(_paper_era(setting))
    shots = values["num_samples_per_class"]
    values["experiment_name"] = (
        f"{setting.split('_')[0]}_{method}_{values['num_classes_per_set']}way_{shots}shot"
        + ("_paper" if paper else "")
    )
    values.update(overrides)
    # Through from_dict, so that an override is checked like any key: unknown keys and keys that
    # would have no effect raise the same ValueError as from_dict (and --set) everywhere else.
    return MAMLConfig.from_dict(values)
