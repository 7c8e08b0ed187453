"""The drop-in API: official state_dict names, checkpoints, input validation, adapt/predict."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamlpp_fast import MetaLearner, preset
from mamlpp_fast.reference import MAMLFewShotClassifier

TINY = dict(cnn_num_filters=8, number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2,
            batch_size=2)


def official_state_dict_keys(num_stages: int = 4) -> list:
    """Written out from spec section 2 ("State_dict names"), not from our own code."""
    keys = []
    for i in range(num_stages):
        keys += [f"classifier.layer_dict.conv{i}.conv.weight", f"classifier.layer_dict.conv{i}.conv.bias"]
        keys += [f"classifier.layer_dict.conv{i}.norm_layer.{k}" for k in ("running_mean", "running_var", "bias", "weight")]
    keys += ["classifier.layer_dict.linear.weights", "classifier.layer_dict.linear.bias"]
    for i in range(num_stages):
        keys += [f"inner_loop_optimizer.names_learning_rates_dict.layer_dict-conv{i}-conv-{k}" for k in ("weight", "bias")]
    keys += ["inner_loop_optimizer.names_learning_rates_dict.layer_dict-linear-weights",
             "inner_loop_optimizer.names_learning_rates_dict.layer_dict-linear-bias"]
    return keys


def numpy_batch(config, seed=0, num_tasks=None):
    rng = np.random.RandomState(seed)
    b = num_tasks or config.batch_size
    n, k, t = config.num_classes_per_set, config.num_samples_per_class, config.num_target_samples
    labels = np.arange(n).reshape(1, n, 1)
    return (rng.rand(b, n, k, *config.image_shape).astype(np.float32),
            rng.rand(b, n, t, *config.image_shape).astype(np.float32),
            np.tile(labels, (b, 1, k)).astype(np.float32),  # the official loader yields float labels
            np.tile(labels, (b, 1, t)).astype(np.float32))


@pytest.fixture
def config():
    return preset("maml++_omniglot_5w1s", **TINY)


def test_state_dict_has_the_official_names_and_shapes():
    learner = MetaLearner(preset("maml++_omniglot_20w1s"))
    state = learner.state_dict()
    assert sorted(state) == sorted(official_state_dict_keys())
    assert state["classifier.layer_dict.conv0.norm_layer.weight"].shape == (5, 64)
    assert state["classifier.layer_dict.linear.weights"].shape == (20, 64)
    assert state["inner_loop_optimizer.names_learning_rates_dict.layer_dict-conv0-conv-weight"].shape == (6,)
    assert torch.all(state["inner_loop_optimizer.names_learning_rates_dict.layer_dict-conv0-conv-weight"] == 0.1)
    # The official constructor's two dummy passes leave running_var[0] at 0.81.
    assert torch.allclose(state["classifier.layer_dict.conv0.norm_layer.running_var"][0], torch.tensor(0.81))
    # 10 inner-loop tensors, 60 LSLR scalars, BN gamma/beta trained by Adam only.
    assert len(learner.inner_loop_parameter_names) == 10
    trainable = sum(p.numel() for p in learner.trainable_parameters())
    assert trainable == 112_724 + 4 * 2 * 5 * 64 + 60


@pytest.mark.parametrize("name, variant, linear_inputs, norm_shapes", [
    # Strided convolutions, 28 -> 14 -> 7 -> 4 -> 2, then a 2x2 average pool: 64 features.
    ("maml++_omniglot_20w1s", dict(max_pooling=False), 64, [(5, 64)] * 4),
    # 84 -> 42 -> 21 -> 11 -> 6, then a 6x6 average pool: 48 features.
    ("maml++_mini-imagenet_5w1s", dict(max_pooling=False), 48, [(5, 48)] * 4),
    # Layer norm over each conv output, before its max-pool.
    ("maml++_omniglot_20w1s", dict(norm_layer="layer_norm"), 64,
     [(64, 28, 28), (64, 14, 14), (64, 7, 7), (64, 3, 3)]),
    ("maml++_omniglot_20w1s", dict(norm_layer="layer_norm", max_pooling=False), 64,
     [(64, 14, 14), (64, 7, 7), (64, 4, 4), (64, 2, 2)]),
    # Unpadded: 84 -> 82 -> 41 -> 39 -> 19 -> 17 -> 8 -> 6 -> 3: 48 * 3 * 3 features.
    ("maml++_mini-imagenet_5w1s", dict(conv_padding=False, norm_layer="layer_norm"), 432,
     [(48, 82, 82), (48, 39, 39), (48, 17, 17), (48, 6, 6)]),
])
def test_network_variants_have_the_official_parameters(name, variant, linear_inputs, norm_shapes):
    """Shapes worked out by hand from the official VGGReLUNormNetwork (spec section 2)."""
    config = preset(name, **variant)
    learner = MetaLearner(config)
    state = learner.state_dict()
    assert state["classifier.layer_dict.linear.weights"].shape == (config.num_classes_per_set, linear_inputs)
    layer_norm = variant.get("norm_layer") == "layer_norm"
    for stage, shape in enumerate(norm_shapes):
        prefix = f"classifier.layer_dict.conv{stage}.norm_layer."
        names = [k[len(prefix):] for k in state if k.startswith(prefix)]
        # MetaLayerNormLayer registers weight then bias and keeps no running statistics.
        assert names == (["weight", "bias"] if layer_norm else ["running_mean", "running_var", "bias", "weight"])
        assert state[prefix + "weight"].shape == state[prefix + "bias"].shape == shape
    norm = learner.classifier.layer_dict["conv0"].norm_layer
    if layer_norm:
        assert not norm.weight.requires_grad and norm.bias.requires_grad  # gamma frozen at 1, as officially
        assert torch.all(norm.weight == 1) and learner.running_statistics() == []
    assert len(learner.inner_loop_parameter_names) == 10  # norm layers stay out of the inner loop
    conv_and_linear = 64 * 9 + 64 + 3 * (64 * 64 * 9 + 64) if "omniglot" in name else 48 * 27 + 48 + 3 * (48 * 48 * 9 + 48)
    conv_and_linear += config.num_classes_per_set * (linear_inputs + 1)
    norm_parameters = sum(int(np.prod(s)) for s in norm_shapes) * (1 if layer_norm else 2)
    assert sum(p.numel() for p in learner.trainable_parameters()) == conv_and_linear + norm_parameters + 60


@pytest.mark.parametrize("norm_layer", ["batch_norm", "layer_norm"])
def test_inner_loop_norm_parameters_have_the_official_layout(norm_layer):
    """enable_inner_loop_optimizable_bn_params: the official MetaBatchNormLayer replaces gamma and
    beta by (C,) rows (per-step running statistics stay), and get_inner_loop_parameter_dict, which
    also names the LSLR rates, keeps the trainable norm parameters."""
    config = preset("maml++_omniglot_20w1s", enable_inner_loop_optimizable_bn_params=True, norm_layer=norm_layer)
    learner = MetaLearner(config)
    state = learner.state_dict()
    rates = "inner_loop_optimizer.names_learning_rates_dict."
    adapted_norm = ["weight", "bias"] if norm_layer == "batch_norm" else ["bias"]  # layer-norm gamma is frozen
    for stage in range(4):
        for name in adapted_norm:
            assert f"layer_dict.conv{stage}.norm_layer.{name}" in learner.inner_loop_parameter_names
            assert state[f"{rates}layer_dict-conv{stage}-norm_layer-{name}"].shape == (6,)
    assert len(learner.inner_loop_parameter_names) == 10 + 4 * len(adapted_norm)
    if norm_layer == "batch_norm":
        assert state["classifier.layer_dict.conv2.norm_layer.weight"].shape == (64,)
        assert state["classifier.layer_dict.conv2.norm_layer.running_mean"].shape == (5, 64)
    fast = learner.adapt(*numpy_batch(config, num_tasks=3)[0::2])
    assert fast["layer_dict.conv1.norm_layer.bias"].shape[0] == 3  # adapted per task


def test_strided_network_refuses_conv_strategies_without_a_stride():
    config = preset("maml++_omniglot_5w1s", max_pooling=False, **TINY)
    with pytest.raises(ValueError, match="conv_strategy: stride [12] and padding [01] .* run with the strategies"):
        MetaLearner(config, conv_strategy="explicit")
    with pytest.raises(ValueError, match="conv_strategy: stride [12] and padding [01] .* run with the strategies"):
        MetaLearner(preset("maml++_mini-imagenet_5w1s", conv_padding=False), conv_strategy="bmm")
    learner = MetaLearner(config, conv_strategy=("blockdiag", "auto", "grouped", "auto"))
    assert learner.active_backends["bn_lrelu_pool"] == "aten"  # no max-pool to fuse with
    assert learner.active_backends["task_conv"] == "blockdiag,grouped,grouped,grouped"


def test_same_seed_gives_the_same_init_as_the_reference(config):
    a, b = MetaLearner(config), MAMLFewShotClassifier(config)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_official_checkpoint_file_loads(tmp_path, config):
    source = MAMLFewShotClassifier(config)
    state = {"network": {k: v.clone() + 0.5 for k, v in source.state_dict().items()}, "current_iter": 7}
    torch.save(state, tmp_path / "train_model_3")
    learner = MetaLearner(config)
    loaded = learner.load_model(str(tmp_path), "train_model", 3)
    assert loaded["current_iter"] == 7
    for key, value in state["network"].items():
        assert torch.equal(learner.state_dict()[key], value), key


def test_save_load_round_trip_continues_identically(tmp_path, config):
    learner = MetaLearner(config).double()
    learner.run_train_iter(numpy_batch(config, 0), epoch=1)
    learner.save_model(tmp_path / "train_model_latest", state={"current_iter": 1})
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    clone = MetaLearner(config).double()
    state = clone.load_model(tmp_path, "train_model", "latest")
    assert state["current_iter"] == 1 and clone.current_epoch == 1
    batch = numpy_batch(config, 1)
    a, _ = learner.run_train_iter(batch, epoch=2)
    b, _ = clone.run_train_iter(batch, epoch=2)
    assert a["loss"].item() == b["loss"].item()
    for (name, x), (_, y) in zip(learner.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(x, y), name


def test_load_rejects_a_mismatched_checkpoint(tmp_path, config):
    other = MetaLearner(preset("maml++_omniglot_20w1s", **TINY))
    with pytest.raises(ValueError, match="shape"):
        MetaLearner(config).load_state_dict(other.state_dict())
    with pytest.raises(FileNotFoundError):
        MetaLearner(config).load_model(tmp_path, "train_model", 9)


def _snapshot(learner):
    return (copy.deepcopy(learner.state_dict()), copy.deepcopy(learner.optimizer.state_dict()),
            learner.current_epoch, learner.optimizer.param_groups[0]["lr"])


def _bad_batches(config):
    good = numpy_batch(config)
    x_s, x_t, y_s, y_t = good
    nan = x_s.copy()
    nan[0, 0, 0, 0, 0, 0] = np.nan
    out_of_range = y_t.copy()
    out_of_range[0, 0, 0] = 5
    fractional = y_s.copy()
    fractional[0, 1, 0] = 0.5
    return [
        ((x_s[0], x_t, y_s, y_t), "x_support_set must have shape"),
        ((x_s, x_t[:1], y_s, y_t[:1]), "x_target_set has 1 tasks"),
        ((x_s, x_t[:, :3], y_s, y_t[:, :3]), "x_target_set has 3 classes"),
        ((x_s, x_t, y_s[:, :, :0], y_t), "y_support_set must have shape"),
        ((x_s[..., :20, :20], x_t, y_s, y_t), "x_support_set images must be"),
        ((x_s, x_t, y_s, out_of_range), r"y_target_set labels must be in \[0, 5\)"),
        ((x_s, x_t, fractional, y_t), "y_support_set must hold whole-number"),
        ((nan, x_t, y_s, y_t), "x_support_set contains NaN"),
        ((x_s.astype(np.int64), x_t, y_s, y_t), "x_support_set must hold floating point"),
        ((x_s, x_t, y_s.astype(bool), y_t), "y_support_set must hold integer"),
        ((torch.from_numpy(x_s).to("meta"), x_t, y_s, y_t), "x_support_set is on meta"),
        ((x_s, x_t, y_s), "data_batch must be a tuple"),
        ((x_s, "images", y_s, y_t), "x_target_set must be a numpy array or a torch.Tensor"),
    ]


def test_bad_input_raises_and_changes_nothing(config):
    learner = MetaLearner(config)
    learner.run_train_iter(numpy_batch(config), epoch=0)
    before = _snapshot(learner)
    for batch, message in _bad_batches(config):
        for call in (lambda: learner.run_train_iter(batch, epoch=4), lambda: learner.run_validation_iter(batch)):
            with pytest.raises(ValueError, match=message):
                call()
            after = _snapshot(learner)
            assert after[2:] == before[2:]
            for key, value in before[0].items():
                assert torch.equal(after[0][key], value), key
    with pytest.raises(ValueError, match="epoch must be"):
        learner.run_train_iter(numpy_batch(config), epoch=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        MetaLearner(config, backend="fast")


@pytest.mark.parametrize("strategy, message", [
    ("fastest", "conv_strategy: expected one of .* got 'fastest'"),
    (("grouped", "bmm"), "conv_strategy: a per-layer strategy needs 4 entries, one per conv layer, got 2"),
    (("grouped", "bmm", "fastest", "auto"), "conv_strategy: expected one of .* got 'fastest'"),
    (4, "conv_strategy: expected a strategy name or one per conv layer, got 4"),
])
def test_bad_conv_strategy_names_the_argument(config, strategy, message):
    with pytest.raises(ValueError, match=message):
        MetaLearner(config, conv_strategy=strategy)


def test_per_layer_conv_strategy_is_reported(config):
    mixed = MetaLearner(config, conv_strategy=["bmm", "auto", "auto", "explicit"])
    assert mixed.conv_strategy == ("bmm", "auto", "auto", "explicit")  # a tuple: hashable
    assert mixed.active_backends["task_conv"] == "bmm,explicit,explicit,explicit"  # "auto" on the CPU
    uniform = MetaLearner(config, conv_strategy=("auto",) * 4)
    assert uniform.active_backends["task_conv"] == "explicit"
    uniform.conv_strategy = "bmm"  # changing it later takes effect, and is checked
    assert uniform.active_backends["task_conv"] == "bmm"
    with pytest.raises(ValueError, match="conv_strategy: a per-layer strategy needs 4 entries"):
        uniform.conv_strategy = ("bmm",)
    assert uniform.conv_strategy == "bmm"


def test_per_layer_conv_strategy_reaches_each_layer(config, monkeypatch):
    import mamlpp_fast.meta_learner as meta_learner_module

    calls = []
    real_task_conv = meta_learner_module.task_conv

    def recording_task_conv(x, weight, bias, strategy, **geometry):
        calls.append((weight.shape[2], strategy))  # (C_in, strategy): C_in tells the layers apart
        return real_task_conv(x, weight, bias, strategy=strategy, **geometry)

    monkeypatch.setattr(meta_learner_module, "task_conv", recording_task_conv)
    learner = MetaLearner(config, conv_strategy=("bmm", "explicit", "auto", "grouped"))
    learner.run_validation_iter(numpy_batch(config))
    filters = config.cnn_num_filters
    layer_calls = [(1, "bmm"), (filters, "explicit"), (filters, "auto"), (filters, "grouped")]
    assert calls and len(calls) % 4 == 0
    assert calls == layer_calls * (len(calls) // 4)


def test_learner_computes_in_its_own_dtype(config):
    learner = MetaLearner(config).double()
    losses, logits = learner.run_train_iter(numpy_batch(config), epoch=0)
    assert logits.dtype == torch.float64 and losses["loss"].dtype == torch.float64
    losses, logits = learner.run_validation_iter(numpy_batch(config))
    assert logits.dtype == torch.float64 and logits.shape == (2, 5, 5)


def test_adapt_then_predict_equals_the_evaluation_pass(config):
    learner = MetaLearner(config).double()
    x_s, x_t, y_s, y_t = numpy_batch(config)
    _, eval_logits = learner.run_validation_iter((x_s, x_t, y_s, y_t))
    fast = learner.adapt(x_s, y_s.astype(np.int64))
    assert fast["layer_dict.conv1.conv.weight"].shape == (2, 8, 8, 3, 3)
    logits = learner.predict(torch.from_numpy(x_t).reshape(2, 5, 1, 28, 28), fast)
    assert torch.allclose(logits, eval_logits, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="steps must be in"):
        learner.adapt(x_s, y_s, steps=5)
    with pytest.raises(ValueError, match="query_x"):
        learner.predict(x_t[:, :, 0, 0], fast)
    query = torch.from_numpy(x_t)
    with pytest.raises(ValueError, match="query_x has 1 tasks but fast_weights were adapted on 2 tasks"):
        learner.predict(query[:1], fast)
    with pytest.raises(ValueError, match="fast_weights lacks \\['layer_dict.conv0.conv.weight'\\]"):
        learner.predict(query, {k: v for k, v in fast.items() if k != "layer_dict.conv0.conv.weight"})
    one_task = {name: weight[0] for name, weight in fast.items()}  # no task dimension
    with pytest.raises(ValueError, match="fast_weights\\['layer_dict.conv0.conv.weight'\\] must have shape "
                                         "\\[B, \\*\\[8, 1, 3, 3\\]\\]"):
        learner.predict(query[:1], one_task)
    with pytest.raises(ValueError, match="different numbers of tasks: \\[1, 2\\]"):
        learner.predict(query, {**fast, "layer_dict.linear.bias": fast["layer_dict.linear.bias"][:1]})
    with pytest.raises(ValueError, match="the dict that adapt\\(\\) returns, got list"):
        learner.predict(query, list(fast.values()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_backend_or_conv_strategy_the_device_cannot_run_fails_at_construction(config, monkeypatch):
    from mamlpp_fast import _backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for backend in ("cuda", "triton"):
        with pytest.raises(ValueError, match=f"backend: '{backend}' cannot run on cpu here; usable here: "):
            MetaLearner(config, backend=backend)
    with pytest.raises(ValueError, match="conv_strategy: 'triton' cannot run on cpu here"):
        MetaLearner(config, conv_strategy="triton")
    monkeypatch.setattr(_backend, "_default_backend", "bogus")
    with pytest.raises(ValueError, match="MAMLPP_FAST_BACKEND='bogus' is not a backend"):
        MetaLearner(config)


def test_meta_step_trains(config):
    learner = MetaLearner(config)
    batch = numpy_batch(config)
    first = learner.meta_step(batch)["loss"].item()
    for _ in range(15):
        last = learner.meta_step(batch)["loss"].item()
    assert last < first


@pytest.mark.filterwarnings("ignore:args. ignoring keys")  # asserted once below; the error cases repeat it
@pytest.mark.parametrize("cls", [MetaLearner, MAMLFewShotClassifier])
def test_official_positional_constructor(cls, config):
    """Code written for the official class: cls(im_shape, device, args), args an argparse-like
    object with the official runtime entries beside the config keys."""
    import argparse

    args = argparse.Namespace(**{k: v for k, v in config.to_dict().items() if k != "ignored_keys"},
                              use_cuda=False, name_of_args_json_file="x.json", weight_decay=0.0,
                              a_runtime_entry=1)
    im_shape = (2, *config.image_shape)
    with pytest.warns(UserWarning, match="ignoring keys .*a_runtime_entry") as record:
        learner = cls(im_shape, torch.device("cpu"), args)
    assert not any("use_cuda" in str(w.message) for w in record)  # always set by get_args(): silent
    with pytest.warns(UserWarning):
        reference = cls(args=args, device=torch.device("cpu"), im_shape=im_shape)
    assert learner.config == reference.config and "weight_decay" in learner.config.ignored_keys
    assert not learner.use_cuda
    for a, b in zip(learner.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)  # same seed, same init
    with pytest.raises(TypeError, match="official \\(im_shape, device, args\\)"):
        cls(config, "cpu")
    with pytest.raises(TypeError, match="device given both"):
        cls(im_shape, "cpu", args, device="cpu")
    args.num_of_gpus = 2  # the official loader would draw twice the tasks per iteration
    with pytest.raises(ValueError, match="num_of_gpus=2 is not supported"):
        cls(im_shape, "cpu", args)


def test_msl_weights_are_a_fresh_tensor_per_call(config):
    learner = MetaLearner(config)
    weights = learner.get_per_step_loss_importance_vector()
    expected = weights.clone()
    weights.mul_(0)  # a caller's in-place edit
    assert torch.equal(learner.get_per_step_loss_importance_vector(), expected)


def test_scheduler_has_the_torch_scheduler_calls_the_official_code_makes(config):
    learner = MetaLearner(preset("maml++_omniglot_5w1s", **dict(TINY, total_epochs=10)))
    learner.scheduler.step(epoch=3)
    at_3 = learner.scheduler.get_lr()[0]
    assert at_3 == learner.optimizer.param_groups[0]["lr"] < config.meta_learning_rate
    learner.scheduler.step()  # no epoch: the next one
    assert learner.scheduler.last_epoch == 4 and learner.scheduler.get_lr()[0] < at_3


def test_reference_net_forward_has_the_official_signature(config):
    """net_forward(x, y, weights, backup_running_statistics, training, num_step), positionally
    and by keyword, as the official forward calls it."""
    learner = MAMLFewShotClassifier(config)
    weights = learner.get_inner_loop_parameter_dict(learner.classifier.named_parameters())
    x = torch.rand(5, *config.image_shape)
    y = torch.arange(5)
    positional = learner.net_forward(x, y, weights, False, True, 1)
    keywords = learner.net_forward(x=x, y=y, weights=weights, backup_running_statistics=True, training=True,
                                   num_step=1)
    assert positional[1].shape == (5, config.num_classes_per_set)
    assert torch.equal(positional[0], keywords[0]) and torch.equal(positional[1], keywords[1])


@pytest.mark.parametrize("cls", [MetaLearner, MAMLFewShotClassifier])
def test_official_outputs_have_the_official_types(cls, config):
    """What the official ExperimentBuilder consumes: float accuracy, numpy MSL weights, a list
    of per-task numpy logits; the values are those of the default (tensor) outputs."""
    plain, official = cls(config).double(), cls(config, official_outputs=True).double()
    batch = numpy_batch(config)
    for run in ("run_train_iter", "run_validation_iter"):
        args = (batch, 0) if run == "run_train_iter" else (batch,)
        expected, expected_preds = getattr(plain, run)(*args)
        losses, preds = getattr(official, run)(*args)
        assert isinstance(losses["accuracy"], float) and losses["accuracy"] == float(expected["accuracy"])
        assert isinstance(losses["loss_importance_vector_0"], np.ndarray)
        assert isinstance(preds, list) and len(preds) == config.batch_size
        assert all(isinstance(p, np.ndarray) and p.shape == (5, 5) for p in preds)
        np.testing.assert_array_equal(np.stack(preds), expected_preds.numpy())


def test_official_per_task_calls_agree_between_metalearner_and_reference(config):
    """net_forward and apply_inner_loop_update, called directly as official code may: the
    task-batched learner (as a batch of one) gives the reference's loss, logits, updated weights,
    gradients through them, and running statistics (float64)."""
    learners = [MetaLearner(config).double(), MAMLFewShotClassifier(config).double()]
    learners[1].load_state_dict(learners[0].state_dict())
    x = torch.rand(5, *config.image_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(5)
    results = []
    for learner in learners:
        weights = learner.get_inner_loop_parameter_dict(learner.classifier.named_parameters())
        loss, _ = learner.net_forward(x, y, weights, False, True, 1)
        updated = learner.apply_inner_loop_update(loss, weights, use_second_order=True, current_step_idx=1)
        target_loss, logits = learner.net_forward(x, y, updated, backup_running_statistics=True, training=True,
                                                  num_step=1)
        target_loss.backward()
        grads = {name: param.grad.clone() for name, param in learner.named_parameters() if param.grad is not None}
        results.append((loss.detach(), logits.detach(), {k: v.detach() for k, v in updated.items()}, grads,
                        dict(learner.state_dict())))
    for ours, reference in zip(results[0], results[1]):
        if isinstance(ours, dict):
            assert ours.keys() == reference.keys()
            for key in ours:
                torch.testing.assert_close(ours[key], reference[key], rtol=1e-10, atol=1e-13, msg=key)
        else:
            torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-13)
    # The pass folded into step 1's running statistics (two passes), not step 0's.
    mean = learners[0].classifier.layer_dict["conv0"].norm_layer.running_mean
    assert mean[1].abs().sum() > 0 and mean[0].abs().sum() == 0


# ------------------------------------------------------------------ spec checks independent of
# the shared code. MetaLearner and the reference both build their meta-parameters, optimizer and
# outer loop in learner_base.py / parameters.py, so comparing them cannot catch a fault there.
# The expectations below come from the spec (/work/shared/docs/mamlpp-spec.md); the package is
# only observed, never asked how it computes them.

LEARNERS = [MetaLearner, MAMLFewShotClassifier]


def official_trainable_names(num_stages: int = 4, lslr_trainable: bool = True) -> list:
    """Adam's parameters in official order (spec 1g: "all requires_grad parameters of the whole
    module": the classifier, then the LSLR rates). Within a stage: conv weight and bias, then the
    BN beta and gamma (the official MetaBatchNormLayer registers running_mean, running_var, bias,
    weight; the running statistics have requires_grad=False, spec 1c). LSLR rates are inserted one
    by one in the order of the inner-loop tensors (spec 1e)."""
    classifier = []
    for i in range(num_stages):
        classifier += [f"classifier.layer_dict.conv{i}.conv.weight", f"classifier.layer_dict.conv{i}.conv.bias",
                       f"classifier.layer_dict.conv{i}.norm_layer.bias",
                       f"classifier.layer_dict.conv{i}.norm_layer.weight"]
    classifier += ["classifier.layer_dict.linear.weights", "classifier.layer_dict.linear.bias"]
    rates = []
    if lslr_trainable:
        inner = [n[len("classifier."):] for n in classifier if "norm_layer" not in n]
        rates = ["inner_loop_optimizer.names_learning_rates_dict." + n.replace(".", "-") for n in inner]
    return classifier + rates


ADAM_CASES = [
    ("maml++_omniglot_5w1s", {}, 1e-3),
    ("maml++_mini-imagenet_5w1s", {}, 1e-3),
    ("maml_omniglot_20w1s", {}, 1e-3),
    ("maml++_omniglot_5w1s", {"meta_learning_rate": 0.0025}, 0.0025),
]


def _optimizer_parameter_names(learner) -> list:
    names_of = {id(p): n for n, p in learner.named_parameters()}
    return [names_of.get(id(p), "<not a module parameter>") for g in learner.optimizer.param_groups for p in g["params"]]


@pytest.mark.parametrize("cls", LEARNERS)
@pytest.mark.parametrize("name, overrides, expected_lr", ADAM_CASES)
def test_adam_has_the_official_settings(cls, name, overrides, expected_lr):
    """Spec 1g: optim.Adam(trainable_parameters(), lr=meta_learning_rate, amsgrad=False), default
    betas (0.9, 0.999) and eps 1e-8, no weight decay, in every param group (one, as officially)."""
    learner = cls(preset(name, cnn_num_filters=4, **overrides))
    optimizer = learner.optimizer
    assert type(optimizer) is torch.optim.Adam
    assert len(optimizer.param_groups) == 1
    for settings in [optimizer.defaults, *optimizer.param_groups]:
        assert settings["lr"] == expected_lr
        assert settings["betas"] == (0.9, 0.999)
        assert settings["eps"] == 1e-8
        assert settings["amsgrad"] is False
        assert settings["weight_decay"] == 0
        assert not settings.get("maximize", False)
        assert not settings.get("decoupled_weight_decay", False)


@pytest.mark.parametrize("cls", LEARNERS)
@pytest.mark.parametrize("name, overrides, expected_lr", ADAM_CASES)
def test_adam_parameters_are_the_classifier_in_official_order_then_the_lslr_rates(cls, name, overrides,
                                                                                   expected_lr):
    """Spec 1g: Adam gets all requires_grad parameters of the module (conv/linear, per-step BN
    gamma/beta, LSLR rates), classifier first (in the official registration order), then the
    LSLR rates (only when learnable: not for the MAML baseline, spec 3)."""
    learner = cls(preset(name, cnn_num_filters=4, **overrides))
    expected = official_trainable_names(lslr_trainable=not name.startswith("maml_"))
    got = _optimizer_parameter_names(learner)
    classifier = [n for n in expected if n.startswith("classifier.")]
    assert got[:len(classifier)] == classifier
    assert sorted(got[len(classifier):]) == sorted(expected[len(classifier):])
    assert len(got) == len(set(got)) == len(expected)


@pytest.mark.parametrize("cls", LEARNERS)
@pytest.mark.parametrize("name", ["maml++_omniglot_5w1s", "maml++_mini-imagenet_5w1s"])
def test_adam_lslr_rates_are_in_the_official_insertion_order(cls, name):
    """Spec 1e/1g: the official initialise() inserts one rate per inner-loop tensor, key by key,
    in the network's parameter order (conv{i} weight, conv{i} bias, ..., linear weights, bias);
    Adam, and so the position-indexed optimizer state_dict, follows that order."""
    learner = cls(preset(name, cnn_num_filters=4))
    assert _optimizer_parameter_names(learner) == official_trainable_names()


@pytest.mark.parametrize("cls", LEARNERS)
@pytest.mark.parametrize("name, clamps", [
    ("maml++_mini-imagenet_5w1s", True),
    ("maml++_mini-imagenet_5w5s", True),
    ("maml_mini-imagenet_5w1s", True),
    ("maml++_omniglot_5w1s", False),
    ("maml++_omniglot_20w5s", False),
    ("maml_omniglot_5w1s", False),
])
def test_meta_gradient_clamp_applies_to_imagenet_classifier_gradients_only(cls, name, clamps):
    """Spec 1g: only if 'imagenet' in dataset_name, param.grad.clamp_(-10, 10) element-wise on the
    classifier's parameters (BN gamma/beta included); the LSLR rates are not clamped; Omniglot
    clamps nothing."""
    learner = cls(preset(name, cnn_num_filters=4)).double()
    generator = torch.Generator().manual_seed(0)
    coefficients = {}
    loss = torch.zeros((), dtype=torch.float64)
    for key, param in learner.named_parameters():
        if param.requires_grad:
            # d loss / d param = the coefficient, uniform in (-30, 30): most entries beyond +-10.
            coefficient = (torch.rand(param.shape, generator=generator, dtype=torch.float64) - 0.5) * 60
            coefficient.view(-1)[0], coefficient.view(-1)[-1] = 25.0, -25.0  # beyond +-10 in every tensor
            coefficients[key] = coefficient
            loss = loss + (coefficients[key] * param).sum()
    assert any(k.startswith("inner_loop_optimizer.") for k in coefficients) == name.startswith("maml++")
    learner.meta_update(loss)  # the official meta_update: backward, clamp, Adam step
    for key, param in learner.named_parameters():
        if not param.requires_grad:
            continue
        expected = coefficients[key]
        assert expected.abs().max() > 10  # the clamp would bite here
        if clamps and key.startswith("classifier."):
            expected = expected.clamp(-10, 10)
        assert torch.equal(param.grad, expected), key


def official_initial_weights(config, flatten_features: int) -> dict:
    """Spec 2: torch seeded from args.seed as the official set_torch_seed does
    (RandomState(seed).randint(0, 999999) -> torch.manual_seed), then one xavier_uniform_ per conv
    weight in stage order (the network is built stage by stage) and one for the linear weights."""
    torch.manual_seed(int(np.random.RandomState(config.seed).randint(0, 999999)))
    weights = {}
    in_channels = config.image_channels
    for stage in range(4):
        w = torch.empty(config.cnn_num_filters, in_channels, 3, 3)
        torch.nn.init.xavier_uniform_(w)
        weights[f"layer_dict.conv{stage}.conv.weight"] = w
        in_channels = config.cnn_num_filters
    w = torch.empty(config.num_classes_per_set, flatten_features)
    torch.nn.init.xavier_uniform_(w)
    weights["layer_dict.linear.weights"] = w
    return weights


@pytest.mark.parametrize("cls", LEARNERS)
@pytest.mark.parametrize("name, filters, flatten_features", [
    # Filters and flatten F from the spec 2 table.
    ("maml++_omniglot_20w1s", 64, 64),
    ("maml_omniglot_5w5s", 64, 64),
    ("maml++_mini-imagenet_5w1s", 48, 1200),
])
def test_initialisation_is_the_official_seeded_xavier_uniform(cls, name, filters, flatten_features):
    """Spec 2: xavier_uniform_ conv/linear weights from torch seeded by args.seed (argparse default
    104), zero biases, BN gamma 1 / beta 0, LSLR at task_learning_rate 0.1; identical for
    train_seed 0, 1, 2 and whatever the global torch RNG state was."""
    learners = []
    for train_seed in (0, 1, 2):
        torch.manual_seed(1000 + train_seed)  # the caller's RNG state must not matter
        config = preset(name, train_seed=train_seed)
        assert config.seed == 104
        learners.append(cls(config))
    config = learners[0].config
    assert config.cnn_num_filters == filters
    expected = official_initial_weights(config, flatten_features)
    for learner in learners:
        params = dict(learner.classifier.named_parameters())
        for key, value in expected.items():
            assert params[key].dtype == torch.float32
            assert torch.equal(params[key].detach(), value), key
            fan_out, fan_in = value.shape[0] * value[0][0].numel(), value[0].numel()
            assert params[key].abs().max() <= (6.0 / (fan_in + fan_out)) ** 0.5
        for stage in range(4):
            assert torch.equal(params[f"layer_dict.conv{stage}.conv.bias"], torch.zeros(filters))
            assert torch.all(params[f"layer_dict.conv{stage}.norm_layer.weight"] == 1)
            assert torch.all(params[f"layer_dict.conv{stage}.norm_layer.bias"] == 0)
        assert torch.equal(params["layer_dict.linear.bias"], torch.zeros(config.num_classes_per_set))
        for rate in learner.inner_loop_optimizer.names_learning_rates_dict.values():
            assert torch.all(rate == 0.1)
        for a, b in zip(learner.state_dict().values(), learners[0].state_dict().values()):
            assert torch.equal(a, b)
    # The seed does matter: another args.seed gives another init.
    other = cls(preset(name, seed=105)).classifier.layer_dict["conv0"].conv.weight
    assert not torch.equal(other, expected["layer_dict.conv0.conv.weight"])


@pytest.mark.parametrize("cls", LEARNERS)
@pytest.mark.parametrize("name", ["maml_omniglot_5w1s", "maml_mini-imagenet_5w1s"])
def test_maml_baseline_has_fixed_inner_rates_and_per_layer_statistics(cls, name):
    """Spec 3: the MAML baseline has learnable_per_layer_per_step_inner_loop_learning_rate=false,
    i.e. a fixed alpha = task_learning_rate = 0.1 for all (mini-ImageNet included), and
    per_step_bn_statistics=false, which gives (C,) running statistics with running_var initialised
    to zeros (spec 1c) and (C,) gamma/beta (spec 1d)."""
    torch.set_num_threads(1)
    overrides = dict(TINY, cnn_num_filters=4)
    if "imagenet" in name:  # still the mini-ImageNet preset (dataset, rates), on small images
        overrides.update(num_target_samples=2, image_height=28, image_width=28)
    config = preset(name, **overrides)
    learner = cls(config)
    rates = learner.inner_loop_optimizer.names_learning_rates_dict
    in_optimizer = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
    assert len(rates) == 10
    for rate in rates.values():
        assert rate.requires_grad is False and id(rate) not in in_optimizer
        assert rate.shape == (config.number_of_training_steps_per_iter + 1,) and torch.all(rate == 0.1)
    norms = [learner.classifier.layer_dict[f"conv{i}"].norm_layer for i in range(4)]
    for norm in norms:
        assert norm.running_mean.shape == norm.running_var.shape == (4,)
        assert torch.all(norm.running_mean == 0) and torch.all(norm.running_var == 0)
        assert norm.weight.shape == norm.bias.shape == (4,)
        assert norm.weight.requires_grad and norm.bias.requires_grad  # BN gamma/beta: outer loop only
    conv0 = learner.classifier.layer_dict["conv0"].conv.weight.detach().clone()
    learner.run_train_iter(numpy_batch(config), epoch=0)
    assert not torch.equal(learner.classifier.layer_dict["conv0"].conv.weight, conv0)  # a meta-step was taken
    for rate in rates.values():
        assert torch.all(rate == 0.1) and rate.grad is None
    # Without per-step statistics the official layer passes running_mean=None to F.batch_norm
    # (meta_neural_network_architectures.py, MetaBatchNormLayer.forward): nothing is tracked.
    for norm in norms:
        assert torch.all(norm.running_mean == 0) and torch.all(norm.running_var == 0)


def _official_network(x, weights, gammas, betas, step):
    """Spec 2: 4 x (conv3x3 stride 1 pad 1 -> batch norm with the batch's statistics and the
    per-step gamma/beta row `step` (spec 1c/1d) -> leaky_relu(0.01) -> max_pool 2x2), flatten,
    linear."""
    out = x
    for i in range(4):
        out = F.conv2d(out, weights[f"layer_dict.conv{i}.conv.weight"], weights[f"layer_dict.conv{i}.conv.bias"],
                       stride=1, padding=1)
        out = F.batch_norm(out, None, None, gammas[i][step], betas[i][step], training=True, momentum=0.1, eps=1e-5)
        out = F.max_pool2d(F.leaky_relu(out, 0.01), kernel_size=2, stride=2, padding=0)
    return F.linear(out.flatten(1), weights["layer_dict.linear.weights"], weights["layer_dict.linear.bias"])


def first_order_lslr_gradients(learner, batch):
    """d meta-loss / d alpha[k][i] under first order, from spec 1b: the inner gradients g_i are
    constants and theta_{i+1} = theta_i - alpha[i] g_i passes gradients to theta_i unchanged, so
    d loss / d alpha[k][i] = -< sum_{j >= i} w_j dCE_target(theta_{j+1}) / d theta_{j+1}[k], g_i[k] >,
    averaged over tasks (spec 1a: mean over tasks; MSL weights w_j = 1/N at epoch 0)."""
    config = learner.config
    steps = config.number_of_training_steps_per_iter
    msl_weights = [1.0 / steps] * steps
    names = official_trainable_names()[:4 * 4 + 2]
    inner = [n[len("classifier."):] for n in names if "norm_layer" not in n]
    params = dict(learner.named_parameters())
    theta0 = {n: params["classifier." + n].detach() for n in inner}
    alphas = {n: params["inner_loop_optimizer.names_learning_rates_dict." + n.replace(".", "-")].detach()
              for n in inner}
    gammas = [params[f"classifier.layer_dict.conv{i}.norm_layer.weight"].detach() for i in range(4)]
    betas = [params[f"classifier.layer_dict.conv{i}.norm_layer.bias"].detach() for i in range(4)]
    x_support, x_target, y_support, y_target = (torch.as_tensor(a).double() for a in batch)
    num_tasks = x_support.shape[0]
    expected = {n: torch.zeros(steps + 1, dtype=torch.float64) for n in inner}
    for b in range(num_tasks):
        xs, xt = x_support[b].flatten(0, 1), x_target[b].flatten(0, 1)  # class-major (N*K, C, H, W)
        ys, yt = y_support[b].flatten().long(), y_target[b].flatten().long()
        theta = dict(theta0)
        support_grads, target_grads = [], []
        for i in range(steps):
            leaf = {n: v.clone().requires_grad_() for n, v in theta.items()}
            grads = torch.autograd.grad(F.cross_entropy(_official_network(xs, leaf, gammas, betas, i), ys),
                                        list(leaf.values()))
            support_grads.append(dict(zip(inner, grads)))
            theta = {n: theta[n] - alphas[n][i] * support_grads[i][n] for n in inner}
            leaf = {n: v.clone().requires_grad_() for n, v in theta.items()}
            grads = torch.autograd.grad(F.cross_entropy(_official_network(xt, leaf, gammas, betas, i), yt),
                                        list(leaf.values()))
            target_grads.append(dict(zip(inner, grads)))
        for n in inner:
            for i in range(steps):
                downstream = sum(msl_weights[j] * target_grads[j][n] for j in range(i, steps))
                expected[n][i] += -(downstream * support_grads[i][n]).sum() / num_tasks
    return expected


@pytest.mark.parametrize("cls", LEARNERS)
@pytest.mark.parametrize("order", [
    dict(second_order=False),
    dict(second_order=True, first_order_to_second_order_epoch=10),  # DA: first order at epoch 0
])
def test_lslr_rates_train_under_first_order(cls, order):
    """Spec 1b: first order, the inner gradients are constants but theta - alpha * g still
    back-propagates into alpha (d/d alpha = -g): "LSLR therefore still trains under first order".
    The rates' meta-gradients equal that formula; the unused last entry (spec 1e) gets none."""
    torch.set_num_threads(1)
    config = preset("maml++_omniglot_5w1s", **dict(TINY, cnn_num_filters=4, **order))
    learner = cls(config).double()
    batch = numpy_batch(config)
    expected = first_order_lslr_gradients(learner, batch)
    losses, _ = learner.train_forward_prop(data_batch=learner.prepare_batch(batch), epoch=0)
    learner.optimizer.zero_grad()
    losses["loss"].backward()
    rates = learner.inner_loop_optimizer.names_learning_rates_dict
    steps = config.number_of_training_steps_per_iter
    # A conv bias feeds batch norm with batch statistics, which removes it: its gradients, and so
    # its rates' meta-gradients, are zero up to rounding. Every other rate must train.
    trained = [n for n in expected if not n.endswith(".conv.bias")]
    for n, value in expected.items():
        grad = rates[n.replace(".", "-")].grad
        assert grad is not None and grad[steps] == 0, n
        torch.testing.assert_close(grad, value, rtol=1e-8, atol=1e-12, msg=n)
        if n in trained:
            assert torch.all(value[:steps].abs() > 1e-6), n
    # And a training iteration moves every trained rate (Adam's first step is about lr * sign).
    before = {k: v.detach().clone() for k, v in rates.items()}
    learner.run_train_iter(batch, epoch=0)
    for n in trained:
        rate, old = rates[n.replace(".", "-")], before[n.replace(".", "-")]
        assert torch.all((rate[:steps] - old[:steps]).abs() > 1e-4) and rate[steps] == old[steps], n


# ---------------------------------------------------------------------- Adam state across versions
def _trained_learner(seed=0):
    from mamlpp_fast.testing import make_task_batch

    config = preset("maml++_omniglot_5w1s", cnn_num_filters=4, number_of_training_steps_per_iter=2,
                    number_of_evaluation_steps_per_iter=2)
    learner = MetaLearner(config).double()
    for iteration in range(2):
        learner.run_train_iter(make_task_batch(config, 2, seed=seed + iteration), 0)
    return config, learner


def _adam_state_by_name(learner):
    names = [name for name, param in learner.named_parameters() if param.requires_grad]
    state = learner.optimizer.state_dict()["state"]
    return {names[index]: value for index, value in state.items()}


@pytest.mark.parametrize("written_by", ["now", "official", "trainer_before_the_fix", "save_model_before_the_fix"])
def test_each_lslr_rate_keeps_its_own_adam_moments_through_a_checkpoint(tmp_path, written_by):
    """Checkpoints written now and official ones index Adam's state in the network's order;
    mamlpp_fast's from before the LSLR order fix (the trainer's, or save_model's alone) had the
    rates sorted by name: those are re-indexed on load, so each rate gets its own moments back."""
    config, learner = _trained_learner()
    expected = _adam_state_by_name(learner)
    state = {"mamlpp_fast_checkpoint_version": 1}
    learner.save_model(str(tmp_path / "model_1"), state)
    saved = torch.load(tmp_path / "model_1", weights_only=False)
    assert saved["mamlpp_fast_lslr_order"] == "network"
    if written_by != "now":
        del saved["mamlpp_fast_lslr_order"]
    if written_by in ("official", "save_model_before_the_fix"):
        del saved["mamlpp_fast_checkpoint_version"]
    if written_by == "official":  # the official save_model writes the network and optimizer only
        del saved["scheduler"], saved["current_epoch"]
    if written_by.endswith("before_the_fix"):  # the same moments, at the old rates' positions
        names = [name for name, param in learner.named_parameters() if param.requires_grad]
        rates = [name for name in names if "names_learning_rates_dict" in name]
        first = names.index(rates[0])
        # The old order: what torch's ParameterDict made of the plain dict the rates were built in.
        old_keys = list(torch.nn.ParameterDict({name.rsplit(".", 1)[1]: torch.nn.Parameter(torch.zeros(1))
                                                for name in rates}).keys())
        new_to_old = {names.index(name): first + old_keys.index(name.rsplit(".", 1)[1]) for name in rates}
        assert new_to_old != {index: index for index in new_to_old}  # the orders do differ
        saved["optimizer"]["state"] = {new_to_old.get(i, i): v for i, v in saved["optimizer"]["state"].items()}
    torch.save(saved, tmp_path / "model_1")
    fresh = MetaLearner(config).double()
    fresh.load_model(str(tmp_path), "model", 1)
    loaded = _adam_state_by_name(fresh)
    assert set(loaded) == set(expected)
    for name, moments in expected.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded[name][key], moments[key]), (name, key)
