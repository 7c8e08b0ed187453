"""MAMLConfig: official keys, official JSON semantics, presets and validation."""

from __future__ import annotations

import json
import warnings

import pytest

from mamlpp_fast import MAMLConfig, preset, preset_names

# The released MAML++ Omniglot 20-way 1-shot config, key for key (spec section 3).
OFFICIAL_OMNIGLOT_20W1S = {
    "batch_size": 8, "image_height": 28, "image_width": 28, "image_channels": 1, "gpu_to_use": 0,
    "num_dataprovider_workers": 4, "max_models_to_save": 5, "dataset_name": "omniglot",
    "dataset_path": "omniglot", "reset_stored_paths": False,
    "experiment_name": "omniglot_1_8_0.1_64_20_0", "train_seed": 0, "val_seed": 0,
    "train_val_test_split": [0.70918052988, 0.03080714725, 0.2606284658],
    "indexes_of_folders_indicating_class": [-3, -2], "load_from_npz_files": False,
    "sets_are_pre_split": False, "load_into_memory": True, "init_inner_loop_learning_rate": 0.1,
    "train_in_stages": False, "multi_step_loss_num_epochs": 10, "minimum_per_task_contribution": 0.01,
    "num_evaluation_tasks": 600, "learnable_per_layer_per_step_inner_loop_learning_rate": True,
    "enable_inner_loop_optimizable_bn_params": False, "total_epochs": 100, "total_iter_per_epoch": 500,
    "continue_from_epoch": -2, "evaluate_on_test_set_only": False, "max_pooling": True,
    "per_step_bn_statistics": True, "learnable_batch_norm_momentum": False,
    "evalute_on_test_set_only": False, "learnable_bn_gamma": True, "learnable_bn_beta": True,
    "weight_decay": 0.0, "dropout_rate_value": 0.0, "min_learning_rate": 0.00001,
    "meta_learning_rate": 0.001, "total_epochs_before_pause": 100,
    "first_order_to_second_order_epoch": -1, "norm_layer": "batch_norm", "cnn_num_filters": 64,
    "num_stages": 4, "conv_padding": True, "number_of_training_steps_per_iter": 5,
    "number_of_evaluation_steps_per_iter": 5, "cnn_blocks_per_stage": 1, "num_classes_per_set": 20,
    "num_samples_per_class": 1, "num_target_samples": 1, "second_order": "true",
    "use_multi_step_loss_optimization": "true",
}


def test_official_json_loads_as_is(tmp_path):
    path = tmp_path / "omniglot_maml++-omniglot_1_8_0.1_64_20_0.json"
    path.write_text(json.dumps(OFFICIAL_OMNIGLOT_20W1S))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = MAMLConfig.from_json(path)
    messages = [str(w.message) for w in caught]
    assert any("ignored by the official code" in m for m in messages), messages
    assert not any("keys missing from the file" in m for m in messages), messages  # a released file sets them
    assert config.second_order is True and config.use_multi_step_loss_optimization is True
    assert config.num_classes_per_set == 20 and config.batch_size == 8
    # Missing from the file, so the official argparse defaults apply.
    assert config.task_learning_rate == 0.1 and config.seed == 104
    assert set(config.ignored_keys) >= {"weight_decay", "init_inner_loop_learning_rate", "gpu_to_use"}
    # It is the released MAML++ 20-way 1-shot preset in every key that matters.
    expected = preset("maml++_omniglot_20w1s")
    for key in ("batch_size", "num_classes_per_set", "num_samples_per_class", "num_target_samples",
                "number_of_training_steps_per_iter", "multi_step_loss_num_epochs", "min_learning_rate",
                "meta_learning_rate", "task_learning_rate", "cnn_num_filters", "per_step_bn_statistics",
                "learnable_per_layer_per_step_inner_loop_learning_rate", "second_order"):
        assert getattr(config, key) == getattr(expected, key), key


def test_unknown_keys_and_bad_values_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*not_a_key"):
        MAMLConfig.from_dict({"not_a_key": 1})
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        MAMLConfig(batch_size=0)
    with pytest.raises(ValueError, match="second_order must be a boolean"):
        MAMLConfig(second_order="maybe")
    with pytest.raises(ValueError, match="cnn_num_filters must be an integer"):
        MAMLConfig(cnn_num_filters=2.5)
    with pytest.raises(ValueError, match="norm_layer must be one of"):
        MAMLConfig(norm_layer="group_norm")
    with pytest.raises(ValueError, match="number_of_evaluation_steps_per_iter"):
        MAMLConfig(number_of_evaluation_steps_per_iter=3)
    with pytest.raises(ValueError, match="too small"):
        MAMLConfig(image_height=8, image_width=8)
    with pytest.raises(ValueError, match="meta_learning_rate"):
        MAMLConfig(meta_learning_rate=float("nan"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MAMLConfig.from_json(bad)
    with pytest.raises(ValueError, match="does not exist"):
        MAMLConfig.from_json(tmp_path / "missing.json")


def test_presets_cover_the_released_configs():
    names = preset_names()
    for setting in ("omniglot_5w1s", "omniglot_5w5s", "omniglot_20w1s", "omniglot_20w5s",
                    "mini-imagenet_5w1s", "mini-imagenet_5w5s"):
        assert f"maml++_{setting}" in names and f"maml_{setting}" in names
    mini = preset("maml++_mini-imagenet_5w1s")
    assert (mini.batch_size, mini.num_target_samples, mini.cnn_num_filters) == (2, 15, 48)
    assert mini.min_learning_rate == mini.meta_learning_rate  # CA is off in the release
    assert mini.clamps_meta_gradients and not preset("maml++_omniglot_5w1s").clamps_meta_gradients
    maml = preset("maml_omniglot_20w1s")
    assert not maml.use_multi_step_loss_optimization and not maml.per_step_bn_statistics
    assert not maml.learnable_per_layer_per_step_inner_loop_learning_rate
    paper = preset("maml++_mini-imagenet_5w1s_paper")
    assert (paper.batch_size, paper.first_order_to_second_order_epoch, paper.task_learning_rate) == (4, 10, 0.01)
    assert preset("maml++_omniglot_20w5s_paper").batch_size == 8
    assert preset("maml++_omniglot_5w1s_paper").batch_size == 16
    with pytest.raises(ValueError, match="unknown preset"):
        preset("maml++_cifar_5w1s")


def test_round_trip_through_json(tmp_path):
    config = preset("maml++_omniglot_5w5s", batch_size=3)
    path = tmp_path / "c.json"
    config.to_json(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MAMLConfig.from_json(path) == config


def test_gates():
    config = MAMLConfig(first_order_to_second_order_epoch=10, multi_step_loss_num_epochs=10)
    assert not config.uses_second_order(10) and config.uses_second_order(11)
    assert config.uses_multi_step_loss(9, training_phase=True)
    assert not config.uses_multi_step_loss(10, training_phase=True)
    assert not config.uses_multi_step_loss(0, training_phase=False)


def test_the_official_network_options_no_released_config_uses():
    """max_pooling=false (the argparse default) and layer norm build; what cannot work is refused."""
    config = MAMLConfig.from_dict({}, missing="argparse")  # every key at its argparse default
    assert config.max_pooling is False and config.conv_stride == 2
    assert MAMLConfig(norm_layer="layer_norm").per_step_batch_norm is False
    assert MAMLConfig(max_pooling=False, image_height=8, image_width=8).conv_stride == 2  # no pools to run out of
    MAMLConfig(max_pooling=False, image_height=28, image_width=84)  # wider than high: 1 x 3 pooled positions
    with pytest.raises(ValueError, match="average pool"):
        MAMLConfig(max_pooling=False, image_height=84, image_width=28)
    with pytest.raises(ValueError, match="layer norm keeps no running statistics"):
        MAMLConfig(norm_layer="layer_norm", bn_use_running_stats_in_evaluation=True)
    with pytest.raises(ValueError, match="too small for num_stages=4 with conv_padding=false.*stage 3's 3x3 convolution"):
        MAMLConfig(conv_padding=False)  # Omniglot: 28 -> 26 -> 13 -> 11 -> 5 -> 3 -> 1 -> nothing
    unpadded = preset("maml++_mini-imagenet_5w1s", conv_padding=False)
    assert unpadded.conv_output_sizes() == [(82, 82), (39, 39), (17, 17), (6, 6)]
    assert preset("maml++_mini-imagenet_5w1s", conv_padding=False, max_pooling=False).conv_output_sizes() == [
        (41, 41), (20, 20), (9, 9), (4, 4)]
    inner = MAMLConfig(enable_inner_loop_optimizable_bn_params=True)
    assert inner.per_step_batch_norm and not inner.per_step_bn_affine  # per-step statistics, one gamma/beta row
    with pytest.raises(ValueError, match="learnable_bn_gamma and learnable_bn_beta both"):
        MAMLConfig(enable_inner_loop_optimizable_bn_params=True, learnable_bn_gamma=False)
    MAMLConfig(enable_inner_loop_optimizable_bn_params=True, norm_layer="layer_norm", learnable_bn_gamma=False)


# ------------------------------------------------------------------ every preset against the
# spec's section 3 table. The expected values are written out from the spec text (released
# HEAD configs, MAML baselines, paper-era variants), never read from mamlpp_fast.config.

# Keys the spec 3 table gives with one value for all six released MAML++ configs.
SPEC_MAMLPP_ALL = {
    "number_of_training_steps_per_iter": 5,
    "number_of_evaluation_steps_per_iter": 5,
    "total_epochs": 100,
    "total_iter_per_epoch": 500,
    "meta_learning_rate": 1e-3,
    "task_learning_rate": 0.1,  # the LSLR init actually used: 0.1 everywhere, mini-ImageNet "default!"
    "second_order": True,
    "first_order_to_second_order_epoch": -1,  # spec 1b: -1 in all 36 configs, DA off
    "use_multi_step_loss_optimization": True,
    "learnable_per_layer_per_step_inner_loop_learning_rate": True,
    "per_step_bn_statistics": True,
    "learnable_bn_gamma": True,
    "learnable_bn_beta": True,
    "enable_inner_loop_optimizable_bn_params": False,
    "norm_layer": "batch_norm",
    "num_stages": 4,
    "max_pooling": True,
    "conv_padding": True,
    "num_evaluation_tasks": 600,
    "num_dataprovider_workers": 4,
    "seed": 104,  # spec 2: the argparse default; the configs set only train_seed / val_seed
    "train_seed": 0,  # spec 3: train_seed {0,1,2} (presets are the seed-0 files), val_seed = 0
    "val_seed": 0,
}
# Per-dataset columns of the table, image shapes from spec 2, data keys from spec 4.
SPEC_OMNIGLOT = {
    "batch_size": 8, "num_target_samples": 1, "min_learning_rate": 1e-5, "multi_step_loss_num_epochs": 10,
    "cnn_num_filters": 64, "image_height": 28, "image_width": 28, "image_channels": 1,
    "sets_are_pre_split": False, "train_val_test_split": [0.70918052988, 0.03080714725, 0.2606284658],
    "indexes_of_folders_indicating_class": [-3, -2], "load_into_memory": True,
}
SPEC_MINI_IMAGENET = {
    "batch_size": 2, "num_target_samples": 15, "min_learning_rate": 1e-3,  # CA off: min = meta lr
    "multi_step_loss_num_epochs": 15, "cnn_num_filters": 48, "image_height": 84, "image_width": 84,
    "image_channels": 3, "sets_are_pre_split": True,
}
SPEC_SETTINGS = {  # setting: (dataset columns, N-way, K-shot)
    "omniglot_5w1s": (SPEC_OMNIGLOT, 5, 1), "omniglot_5w5s": (SPEC_OMNIGLOT, 5, 5),
    "omniglot_20w1s": (SPEC_OMNIGLOT, 20, 1), "omniglot_20w5s": (SPEC_OMNIGLOT, 20, 5),
    "mini-imagenet_5w1s": (SPEC_MINI_IMAGENET, 5, 1), "mini-imagenet_5w5s": (SPEC_MINI_IMAGENET, 5, 5),
}
# "MAML baseline configs are identical except" these three keys (fixed alpha 0.1 for all).
SPEC_MAML_BASELINE = {
    "use_multi_step_loss_optimization": False,
    "learnable_per_layer_per_step_inner_loop_learning_rate": False,
    "per_step_bn_statistics": False,
}


def spec_paper_era(setting: str) -> dict:
    """Spec 3 "Paper-era configs differ": batch 16 for Omniglot (8 for 20w5s), 4 / 2 for
    mini-ImageNet 1-shot / 5-shot, first_order_to_second_order_epoch 10 for mini-ImageNet (-1 for
    Omniglot, spec 1b), LSLR init 0.1 / 0.01 (Omniglot / mini-ImageNet)."""
    if setting.startswith("omniglot"):
        return {"batch_size": 8 if setting == "omniglot_20w5s" else 16, "first_order_to_second_order_epoch": -1,
                "task_learning_rate": 0.1}
    return {"batch_size": 4 if setting.endswith("1s") else 2, "first_order_to_second_order_epoch": 10,
            "task_learning_rate": 0.01}


def spec_expected_config(name: str) -> dict:
    """The spec's values for preset `name`: maml++_<setting>, maml_<setting> or maml++_<setting>_paper."""
    method, rest = name.split("_", 1)
    paper = rest.endswith("_paper")
    setting = rest[:-len("_paper")] if paper else rest
    dataset, ways, shots = SPEC_SETTINGS[setting]
    expected = dict(SPEC_MAMLPP_ALL, **dataset, num_classes_per_set=ways, num_samples_per_class=shots)
    assert method in ("maml++", "maml") and not (paper and method == "maml")
    if method == "maml":
        expected.update(SPEC_MAML_BASELINE)
    if paper:
        expected.update(spec_paper_era(setting))
    return expected


def test_presets_are_exactly_the_spec_configs():
    """Spec 3: 6 settings x {MAML++, MAML} released configs, plus a paper-era MAML++ variant of each
    (spec 8 asks for one); every preset is one of them."""
    expected = {f"{m}_{s}" for m in ("maml++", "maml") for s in SPEC_SETTINGS}
    expected |= {f"maml++_{s}_paper" for s in SPEC_SETTINGS}
    assert sorted(preset_names()) == sorted(expected)


@pytest.mark.parametrize("name", preset_names())
def test_preset_matches_the_spec_table(name):
    """Spec 3 table (and its MAML-baseline and paper-era paragraphs), key by key, including the
    quirks: task_learning_rate 0.1 on mini-ImageNet although its file says 0.01, CA off there
    (min = meta lr), MSL for 10 / 15 epochs, second order from epoch -1."""
    config = preset(name)
    expected = spec_expected_config(name)
    mismatches = {key: (getattr(config, key), value) for key, value in expected.items()
                  if getattr(config, key) != value or type(getattr(config, key)) is not type(value)}
    assert mismatches == {}, "key: (preset, spec)"
    # Spec 1g / 4: 'imagenet' in dataset_name selects the gradient clamp, 'omniglot' the rotations.
    assert ("imagenet" in config.dataset_name) == name.split("_", 1)[1].startswith("mini-imagenet")
    assert ("omniglot" in config.dataset_name) == name.split("_", 1)[1].startswith("omniglot")
