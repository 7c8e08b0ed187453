"""MAMLConfig validation: bad values raise a ValueError that names the key, and every name and
value the presets and the released configs use still passes."""

from __future__ import annotations

import json
import warnings

import pytest

from mamlpp_fast import MAMLConfig, preset, preset_names
from mamlpp_fast.cli import CLI_PRESETS, CLIError, build_config
from mamlpp_fast.config import ARGPARSE_DEFAULTS, IGNORED_KEYS

# Values of the released experiment_config files (spec section 3) and of the argparse defaults.
RELEASED_SPLITS = [
    [0.70918052988, 0.03080714725, 0.2606284658],  # Omniglot configs
    [0.73982737361, 0.26, 0.13008631319],  # argparse default: sums to > 1 (third value unused)
    [0.64, 0.16, 0.20],
]
RELEASED_EXPERIMENT_NAMES = [
    "omniglot_1_8_0.1_64_5_0", "omniglot_1_8_0.1_64_20_2", "omniglot_5_8_0.1_64_20_1",
    "mini-imagenet_1_2_0.01_48_5_0", "mini-imagenet_5_2_0.01_48_5_2",
]


def all_preset_configs():
    return [preset(name) for name in preset_names()] + [
        MAMLConfig.from_dict(values) for values in CLI_PRESETS.values()
    ]


# ---------------------------------------------------------------------- 1. BN running statistics
def test_running_stats_in_evaluation_needs_per_step_statistics():
    with pytest.raises(ValueError, match="bn_use_running_stats_in_evaluation.*per_step_bn_statistics"):
        MAMLConfig(bn_use_running_stats_in_evaluation=True, per_step_bn_statistics=False)
    with pytest.raises(ValueError, match="bn_use_running_stats_in_evaluation.*per_step_bn_statistics"):
        preset("maml_omniglot_5w1s", bn_use_running_stats_in_evaluation=True)
    assert MAMLConfig(bn_use_running_stats_in_evaluation=True).per_step_bn_statistics
    # Restoring statistics that are never tracked is a no-op: allowed.
    config = preset("maml_omniglot_5w1s", bn_restore_stats_after_evaluation=True)
    assert config.bn_restore_stats_after_evaluation and not config.per_step_bn_statistics


# ---------------------------------------------------------------------- 2. seeds
@pytest.mark.parametrize("key", ["seed", "train_seed", "val_seed"])
def test_seeds_must_be_numpy_seeds(key):
    for bad in (-1, 2**32, 10**20):
        with pytest.raises(ValueError, match=rf"^{key} must be in \[0, 2\*\*32\)"):
            MAMLConfig(**{key: bad})
    for good in (0, 104, 2**32 - 1):
        assert getattr(MAMLConfig(**{key: good}), key) == good


# ---------------------------------------------------------------------- 3. dataset_name
@pytest.mark.parametrize("name", ["cifar", "", "tiny", "synthetic_omniglot", "omniglot_imagenet", "Synthetic_Omniglot"])
def test_unsupported_dataset_name_lists_the_accepted_names(name):
    with pytest.raises(ValueError, match=r"dataset_name .*omniglot_dataset.*mini_imagenet_full_size.*synthetic"):
        MAMLConfig(dataset_name=name)


@pytest.mark.parametrize("name", ["omniglot", "omniglot_dataset", "mini_imagenet_full_size", "mini-imagenet",
                                  "mini_imagenet", "synthetic", "synthetic_glyphs", "Omniglot", "MINI_IMAGENET"])
def test_supported_dataset_names(name):
    assert MAMLConfig(dataset_name=name).dataset_name == name


def test_presets_and_defaults_use_supported_names():
    assert {config.dataset_name for config in all_preset_configs()} == {
        "omniglot", "mini_imagenet_full_size", "synthetic"}
    assert MAMLConfig(dataset_name=ARGPARSE_DEFAULTS["dataset_name"]).dataset_name == "omniglot_dataset"


# ---------------------------------------------------------------------- 4. total_epochs_before_pause
def test_total_epochs_before_pause_is_at_least_one():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="total_epochs_before_pause must be >= 1"):
            MAMLConfig(total_epochs_before_pause=bad)
    assert MAMLConfig(total_epochs_before_pause=1).total_epochs_before_pause == 1


# ---------------------------------------------------------------------- 5. train_val_test_split
@pytest.mark.parametrize("split", [
    [-0.1, 0.5, 0.5], [0.5, 1.5, 0.0], [0.5, 0.2, 1.01], [0.5, 0.2, -0.3],
    [0.5, float("nan"), 0.1], [0.5, True, 0.1], ["0.5", 0.2, 0.3],
])
def test_split_fractions_in_unit_interval(split):
    with pytest.raises(ValueError, match=r"train_val_test_split: each fraction must be a number in \[0, 1\]"):
        MAMLConfig(train_val_test_split=split)


def test_split_train_and_validation_sum_to_at_most_one():
    with pytest.raises(ValueError, match="train_val_test_split: the train and validation fractions must sum"):
        MAMLConfig(train_val_test_split=[0.8, 0.3, 0.0])
    with pytest.raises(ValueError, match="train_val_test_split must have 3 fractions"):
        MAMLConfig(train_val_test_split=[0.8, 0.2])
    assert MAMLConfig(train_val_test_split=[0.8, 0.2, 0.0]).train_val_test_split == [0.8, 0.2, 0.0]
    assert MAMLConfig(train_val_test_split=[1, 0, 0]).train_val_test_split == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("split", RELEASED_SPLITS)
def test_released_splits_pass(split):
    assert MAMLConfig(train_val_test_split=split).train_val_test_split == split


# ---------------------------------------------------------------------- 6. learning rates
def test_min_learning_rate_at_most_meta_learning_rate():
    with pytest.raises(ValueError, match=r"min_learning_rate \(0.01\) must be <= meta_learning_rate \(0.001\)"):
        MAMLConfig(min_learning_rate=0.01)
    with pytest.raises(ValueError, match="min_learning_rate .* meta_learning_rate"):
        preset("maml++_omniglot_5w1s", meta_learning_rate=0.000001)
    equal = MAMLConfig(min_learning_rate=0.001, meta_learning_rate=0.001)  # CA off, as on mini-ImageNet
    assert equal.min_learning_rate == equal.meta_learning_rate


# ---------------------------------------------------------------------- 7. experiment_name
@pytest.mark.parametrize("name", ["", "   ", ".", "./", "..", "../escape", "runs/../../up", "..\\up", "x\0y"])
def test_experiment_name_names_a_folder_inside_the_output_folder(name):
    with pytest.raises(ValueError, match="^experiment_name must"):
        MAMLConfig(experiment_name=name)


def test_released_preset_and_nested_experiment_names_pass():
    # Nested and absolute names work in the official code (os.path.abspath of the name).
    names = RELEASED_EXPERIMENT_NAMES + ["omniglot_maml++_5way_1shot", "a..b", ".hidden", "...",
                                         "omniglot/seed0", "/abs/path", "a\\b"]
    for name in names:
        assert MAMLConfig(experiment_name=name).experiment_name == name
    assert all(config.experiment_name for config in all_preset_configs())


# ---------------------------------------------------------------------- 8. keys with no effect
NO_EFFECT = ["weight_decay=0.5", "samples_per_iter=4", "dropout_rate_value=0.3", "gpu_to_use=1"]


@pytest.mark.parametrize("item", NO_EFFECT)
@pytest.mark.parametrize("name", list(CLI_PRESETS) + ["maml++_omniglot_5w1s", "maml_mini-imagenet_5w5s"])
def test_set_of_a_key_without_effect_is_rejected_whatever_the_preset(name, item):
    key = item.split("=")[0]
    with pytest.raises(CLIError, match=key):
        build_config(preset_name=name, sets=[item])


@pytest.mark.parametrize("item", NO_EFFECT)
def test_set_of_a_key_without_effect_is_rejected_with_a_config_file(tmp_path, item):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"dataset_name": "synthetic", "max_pooling": True, "weight_decay": 0.0}))
    with pytest.raises(CLIError, match=item.split("=")[0]):
        build_config(config_path=str(path), sets=[item])


def test_from_dict_and_preset_reject_ignored_keys_with_the_same_error():
    for key in ("weight_decay", "samples_per_iter", "init_inner_loop_learning_rate"):
        value = 1 if key == "samples_per_iter" else 0.5
        with pytest.raises(ValueError, match=rf"\['{key}'\] would have no effect"):
            MAMLConfig.from_dict({key: value})
        with pytest.raises(ValueError, match=rf"\['{key}'\] would have no effect"):
            preset("maml++_omniglot_20w1s", **{key: value})
    with pytest.raises(ValueError, match="unknown config key.*not_a_key"):
        preset("maml++_omniglot_20w1s", not_a_key=1)
    # Opting in (what from_json does) records them.
    config = MAMLConfig.from_dict({"weight_decay": 0.5}, ignored="accept")
    assert config.ignored_keys == ("weight_decay",)
    with pytest.raises(ValueError, match="ignored must be"):
        MAMLConfig.from_dict({}, ignored="maybe")


def test_official_json_keeps_its_ignored_keys_but_not_a_changed_batch(tmp_path):
    base = {"dataset_name": "omniglot", "max_pooling": True, "per_step_bn_statistics": True,
            "experiment_name": "omniglot_1_8_0.1_64_5_0", "weight_decay": 0.0, "gpu_to_use": 0,
            "init_inner_loop_learning_rate": 0.1}
    assert IGNORED_KEYS >= {"weight_decay", "gpu_to_use", "init_inner_loop_learning_rate"}
    path = tmp_path / "official.json"
    path.write_text(json.dumps(dict(base, samples_per_iter=1, num_of_gpus=1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = MAMLConfig.from_json(path)
    assert set(config.ignored_keys) == {"weight_decay", "gpu_to_use", "init_inner_loop_learning_rate",
                                        "samples_per_iter", "num_of_gpus"}
    for key in ("samples_per_iter", "num_of_gpus"):
        path.write_text(json.dumps(dict(base, **{key: 2})))
        with pytest.raises(ValueError, match=rf"{key}=2 is not supported.*batch_size"):
            MAMLConfig.from_json(path)
    # The official data code acts on these when true (flips channels, fails, rebuilds its class
    # lists); false, as every released file has them, is what mamlpp_fast implements.
    for key, effect in (("reverse_channels", "BGR"), ("labels_as_int", "int"), ("reset_stored_filepaths", "rebuild")):
        path.write_text(json.dumps(dict(base, **{key: "false"})))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert key in MAMLConfig.from_json(path).ignored_keys
        path.write_text(json.dumps(dict(base, **{key: "true"})))
        with pytest.raises(ValueError, match=rf"{key}='true' is not supported: .*{effect}"):
            MAMLConfig.from_json(path)


def test_a_json_without_the_keys_the_official_code_has_no_default_for_says_what_fills_them(tmp_path):
    """The official code reads e.g. learnable_per_layer_per_step_inner_loop_learning_rate from the
    file only (no argparse default, its issue #38): a file without it would fail there; here it
    loads with MAML++'s value, and a warning names each such key and the value used."""
    path = tmp_path / "short.json"
    path.write_text(json.dumps({"batch_size": 4, "dataset_name": "omniglot_dataset", "experiment_name": "short",
                                "use_multi_step_loss_optimization": "false"}))
    with pytest.warns(UserWarning, match="keys missing from the file") as caught:
        config = MAMLConfig.from_json(path)
    message = next(str(w.message) for w in caught if "keys missing" in str(w.message))
    assert "'learnable_per_layer_per_step_inner_loop_learning_rate': True" in message
    assert "'per_step_bn_statistics'" not in message  # it has an argparse default (False), used silently
    assert "use_multi_step_loss_optimization" not in message  # the file sets it
    assert config.per_step_bn_statistics is False and config.use_multi_step_loss_optimization is False


def test_a_learner_takes_an_official_json_dict_as_it_is():
    """MetaLearner(json.load(official_file)) reads the dict like the file: the keys the official
    code ignores are recorded, not refused (drop-in use)."""
    from mamlpp_fast.learner_base import resolve_config

    values = dict(preset("maml++_omniglot_5w1s").to_dict(), weight_decay=0.0, samples_per_iter=1)
    values.pop("ignored_keys", None)
    config = resolve_config(values)
    assert set(config.ignored_keys) == {"weight_decay", "samples_per_iter"}
    with pytest.raises(ValueError, match="samples_per_iter=2 is not supported"):
        resolve_config(dict(values, samples_per_iter=2))


def test_dataset_name_case_follows_the_official_clamp_test():
    """The loaders ignore case; the official imagenet gradient clamp does not, nor does ours."""
    assert MAMLConfig(dataset_name="mini_imagenet_full_size").clamps_meta_gradients
    assert not MAMLConfig(dataset_name="Mini_ImageNet").clamps_meta_gradients
