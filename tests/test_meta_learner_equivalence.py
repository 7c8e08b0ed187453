"""MetaLearner (all tasks at once) against the per-task reference, in float64.

Same init, same data: logits, per-step losses, fast weights after every step, meta-loss and
every meta-gradient must agree to 1e-10 relative.

One exactness caveat is mathematical, not numerical: a conv bias feeds straight into batch norm
with batch statistics, which subtracts it again, so its exact gradient (and that of its LSLR
rates) is zero. Both implementations produce rounding noise there (~1e-16). Such tensors are
compared against a floor of 1e-3 of the norm of all tensors of the same kind, and after Adam
steps (which scale that noise by lr / eps) against an absolute bound.
"""

from __future__ import annotations

import importlib
import warnings
from typing import List

import pytest
import torch

from mamlpp_fast import MetaLearner, _backend, preset
from mamlpp_fast.reference import MAMLFewShotClassifier
from mamlpp_fast.testing import META_STEP_RTOL, assert_states_match_after_adam, assert_tensors_match, make_task_batch

RTOL = META_STEP_RTOL
make_batch = make_task_batch


def make_pair(config, backend: str = "auto", device: str = "cpu", conv_strategy: str = "auto",
              memory_format: str = "auto"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = MAMLFewShotClassifier(config).double()
        learner = MetaLearner(config, backend=backend, device=device, conv_strategy=conv_strategy,
                              memory_format=memory_format).double()
    learner.load_state_dict(reference.state_dict())
    return reference, learner


def meta_gradients(learner, batch, epoch: int, training: bool = True):
    learner.zero_grad(set_to_none=True)
    learner.trace = []
    prepared = learner.prepare_batch(batch)
    forward = learner.train_forward_prop if training else learner.evaluation_forward_prop
    losses, logits = forward(prepared, epoch)
    if training:
        losses["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in learner.named_parameters() if p.grad is not None}
    trace, learner.trace = learner.trace, None
    return losses, logits, grads, trace


def stack_reference_trace(trace: List[dict], num_tasks: int) -> List[dict]:
    """Per-task reference records -> per-step records with a leading task axis."""
    steps = len(trace) // num_tasks
    merged = []
    for step in range(steps):
        records = [trace[task * steps + step] for task in range(num_tasks)]
        assert all(r["step"] == step for r in records)
        merged.append({
            "support_loss": torch.stack([r["support_loss"] for r in records]),
            "fast_weights": {
                name: torch.stack([r["fast_weights"][name] for r in records])
                for name in records[0]["fast_weights"]
            },
            "target_loss": None if records[0]["target_loss"] is None
            else torch.stack([r["target_loss"] for r in records]),
        })
    return merged


def compare_one_pass(config, num_tasks: int, epoch: int = 0, training: bool = True, backend: str = "auto",
                     device: str = "cpu", conv_strategy: str = "auto", memory_format: str = "auto"):
    reference, learner = make_pair(config, backend, device, conv_strategy, memory_format)
    batch = make_batch(config, num_tasks)
    ref_losses, ref_logits, ref_grads, ref_trace = meta_gradients(reference, batch, epoch, training)
    losses, logits, grads, trace = meta_gradients(learner, batch, epoch, training)

    assert_tensors_match({"logits": logits}, {"logits": ref_logits}, "target logits")
    assert_tensors_match({"loss": losses["loss"].detach(), "accuracy": losses["accuracy"]},
                         {"loss": ref_losses["loss"].detach(), "accuracy": ref_losses["accuracy"]}, "metrics")
    ref_steps = stack_reference_trace(ref_trace, num_tasks)
    assert len(trace) == len(ref_steps)
    for step, (mine, theirs) in enumerate(zip(trace, ref_steps)):
        assert_tensors_match({"support": mine["support_loss"]}, {"support": theirs["support_loss"]},
                             f"support loss, step {step}")
        assert (mine["target_loss"] is None) == (theirs["target_loss"] is None), f"target pass at step {step}"
        if theirs["target_loss"] is not None:
            assert_tensors_match({"target": mine["target_loss"]}, {"target": theirs["target_loss"]},
                                 f"target loss, step {step}")
        assert_tensors_match(mine["fast_weights"], theirs["fast_weights"], f"fast weights after step {step}")
    if training:
        assert grads.keys() == ref_grads.keys()
        assert len(grads) > 0
        assert_tensors_match(grads, ref_grads, "meta-gradient")
    # The per-step running statistics (dead state in the official code) must also agree.
    assert_tensors_match(
        {k: v for k, v in learner.state_dict().items() if "running" in k},
        {k: v for k, v in reference.state_dict().items() if "running" in k},
        "running statistics",
    )
    return losses, ref_losses


SMALL = dict(cnn_num_filters=16, number_of_training_steps_per_iter=3, number_of_evaluation_steps_per_iter=3)


@pytest.mark.parametrize(
    "name, overrides, num_tasks",
    [
        ("maml++_omniglot_5w1s", SMALL, 1),
        ("maml++_omniglot_5w1s", SMALL, 8),
        ("maml++_omniglot_5w5s", SMALL, 2),
        ("maml++_omniglot_20w1s", dict(SMALL, num_target_samples=2), 2),
        ("maml++_omniglot_20w5s", SMALL, 2),
        ("maml++_omniglot_20w1s", {}, 2),  # the released network and step count
        ("maml_omniglot_5w1s", SMALL, 2),  # MAML baseline: no MSL, fixed rates, shared BN
        ("maml++_mini-imagenet_5w1s", dict(SMALL, cnn_num_filters=8, num_target_samples=2), 2),
    ],
)
@pytest.mark.parametrize("second_order", [True, False])
def test_training_pass_matches_reference(name, overrides, num_tasks, second_order):
    config = preset(name, second_order=second_order, **overrides)
    compare_one_pass(config, num_tasks)


@pytest.mark.skipif(not _backend.has_extension(), reason="needs the compiled extension")
@pytest.mark.parametrize("name, overrides", [
    ("maml++_omniglot_20w1s", dict(SMALL, num_target_samples=2)),  # 1 input channel
    ("maml++_mini-imagenet_5w1s", dict(SMALL, num_target_samples=2)),  # 3 input channels, 84x84
])
@pytest.mark.parametrize("second_order", [True, False])
def test_first_layer_weight_gradient_kernel_matches_reference(monkeypatch, name, overrides, second_order):
    """The C++ first-layer weight-gradient kernel (task_conv_weight_grad) is what the CPU learner
    runs for MAML++'s few-channel first layer, in the inner loop and in the outer backward."""
    task_conv_module = importlib.import_module("mamlpp_fast.ops.task_conv")
    chosen = []
    real = task_conv_module._cpu_weight_grad_applies
    monkeypatch.setattr(task_conv_module, "_cpu_weight_grad_applies",
                        lambda *args: chosen.append(real(*args)) or chosen[-1])
    compare_one_pass(preset(name, second_order=second_order, **overrides), 2)
    assert any(chosen), "the kernel was never chosen"


# The official network options no released config uses (spec section 2): strided convolutions
# with a final average pool instead of max-pools, layer norm instead of batch norm, and the norm
# layers' parameters adapted by the inner loop.
INNER_BN = dict(enable_inner_loop_optimizable_bn_params=True)
VARIANTS = [
    dict(max_pooling=False),
    dict(norm_layer="layer_norm"),
    dict(norm_layer="layer_norm", max_pooling=False),
    INNER_BN,                                                    # (C,) gamma and beta, per task
    dict(INNER_BN, per_step_bn_statistics=False, bn_restore_stats_after_evaluation=True),
    dict(INNER_BN, learnable_bn_gamma=False, learnable_bn_beta=False),  # nothing left to adapt
    dict(INNER_BN, bn_use_running_stats_in_evaluation=True),
    dict(INNER_BN, norm_layer="layer_norm"),                     # the layer-norm beta, per task
    dict(num_stages=3),                                          # num_stages is an official key too
]


def _variant_cases():
    """Second order for every variant and both data sets; first order (a subset of the same
    graph) for two of them, on Omniglot, to keep CI short."""
    omniglot = ("maml++_omniglot_20w1s", dict(SMALL, num_target_samples=2))
    imagenet = ("maml++_mini-imagenet_5w1s", dict(SMALL, cnn_num_filters=8, num_target_samples=2))
    cases = [(variant, *data, True) for variant in VARIANTS for data in (omniglot, imagenet)]
    return cases + [(variant, *omniglot, False) for variant in (VARIANTS[0], INNER_BN)]


@pytest.mark.parametrize("variant, name, overrides, second_order", _variant_cases(),
                         ids=lambda v: ",".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else str(v))
def test_network_variants_match_reference(variant, name, overrides, second_order):
    config = preset(name, second_order=second_order, **{**overrides, **variant})
    compare_one_pass(config, 2)
    compare_one_pass(config, 2, training=False)


@pytest.mark.parametrize("max_pooling", [True, False])
@pytest.mark.parametrize("second_order", [True, False])
def test_unpadded_convolutions_match_reference(max_pooling, second_order):
    """conv_padding=false: 84 -> 82 -> 41 -> ... -> 3 (max-pools) or 84 -> 41 -> 20 -> 9 -> 4
    (strided); Omniglot's 28 pixels do not survive it (refused, as the official code fails)."""
    config = preset("maml++_mini-imagenet_5w1s", second_order=second_order, conv_padding=False,
                    max_pooling=max_pooling, **dict(SMALL, cnn_num_filters=8, num_target_samples=2))
    compare_one_pass(config, 2)
    compare_one_pass(config, 2, training=False)


def test_network_variant_trains_like_the_reference_over_iterations():
    """Adam steps on the layer-norm biases (trained by the outer loop only) and the strided network."""
    config = preset("maml++_omniglot_5w1s", total_epochs=4, max_pooling=False, norm_layer="layer_norm", **SMALL)
    reference, learner = make_pair(config)
    for iteration, epoch in enumerate([0, 1, 2]):
        batch = make_batch(config, 2, seed=iteration)
        ref_losses, _ = reference.run_train_iter(batch, epoch)
        losses, _ = learner.run_train_iter(batch, epoch)
        assert losses["loss"].item() == pytest.approx(ref_losses["loss"].item(), rel=RTOL)
    assert "layer_dict.conv1.norm_layer.bias" not in learner.inner_loop_parameter_names
    moved = learner.state_dict()["classifier.layer_dict.conv1.norm_layer.bias"]
    assert moved.abs().max() > 0, "the outer loop must train the layer-norm biases"
    assert_states_match_after_adam(learner.state_dict(), reference.state_dict(), "parameters")


@pytest.mark.parametrize("name, overrides", [
    ("maml++_omniglot_20w1s", dict(SMALL, num_target_samples=2)),
    ("maml++_mini-imagenet_5w1s", dict(SMALL, cnn_num_filters=8, num_target_samples=2)),
])
@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("conv_strategy", ["grouped", "bmm"])
def test_conv_strategies_match_reference(name, overrides, second_order, conv_strategy):
    """The strategies that "auto" does not pick on the CPU, with the fused ops: ATen's grouped
    convolution under ATen's autograd (CUDA's "auto") and im2col + batched matmul."""
    config = preset(name, second_order=second_order, **overrides)
    compare_one_pass(config, 2, conv_strategy=conv_strategy)
    compare_one_pass(config, 2, conv_strategy=conv_strategy, training=False)


@pytest.mark.parametrize("name, overrides, num_tasks", [
    ("maml++_omniglot_20w1s", dict(SMALL, num_target_samples=2), 2),
    ("maml++_omniglot_5w1s", SMALL, 3),  # 3 x 16 = 48 channels: a partial 16-channel chunk
    ("maml++_mini-imagenet_5w1s", dict(SMALL, cnn_num_filters=8, num_target_samples=2), 2),  # 5x5 features
])
@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("backend, conv_strategy", [("auto", "auto"), ("auto", "grouped"), ("aten", "auto")])
@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])
def test_memory_formats_match_reference(name, overrides, num_tasks, second_order, backend, conv_strategy,
                                        memory_format):
    """Activations in either layout ("auto" is channels_last on the CPU, so the other tests run
    that): the fused stage's CPU kernels ("auto") or the ATen composition, under the explicit
    ("auto") or ATen's grouped convolutions."""
    config = preset(name, second_order=second_order, **overrides)
    for training in (True, False):
        compare_one_pass(config, num_tasks, training=training, backend=backend, conv_strategy=conv_strategy,
                         memory_format=memory_format)


def test_channels_last_reaches_the_fused_stage_and_bad_values_are_refused():
    config = preset("maml++_omniglot_5w1s", **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = MetaLearner(config, memory_format="channels_last").double()
    assert learner.active_memory_format == "channels_last"
    layouts = []
    stage = learner._stage

    def spy(x, weight, bias):
        layouts.append(not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))
        return stage(x, weight, bias)

    learner._stage = spy
    meta_gradients(learner, make_batch(config, 2), epoch=0)
    # One task of 1-channel images is both layouts at once, and oneDNN answers it in NCHW: the
    # learner turns that first convolution's output channels-last.
    meta_gradients(learner, make_batch(config, 1), epoch=0)
    assert layouts and all(layouts), layouts
    with pytest.raises(ValueError, match="memory_format must be one of"):
        learner.memory_format = "nhwc"
    # "auto": channels-last where the fused stage runs on the compiled CPU kernels only.
    learner.memory_format = "auto"
    assert learner.active_memory_format == ("channels_last" if learner.active_backends["bn_lrelu_pool"] == "cpp"
                                            else "contiguous")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert MetaLearner(config, backend="aten").active_memory_format == "contiguous"
        layer_norm = preset("maml++_omniglot_5w1s", norm_layer="layer_norm", **SMALL)
        assert MetaLearner(layer_norm).active_memory_format == "contiguous"


@pytest.mark.parametrize("second_order", [True, False])
def test_per_layer_conv_strategies_match_reference(second_order):
    """A different strategy for each conv layer (as a GPU may want for the 1-channel first layer)."""
    config = preset("maml++_omniglot_20w1s", second_order=second_order, **dict(SMALL, num_target_samples=2))
    mix = ("blockdiag", "explicit", "bmm", "auto")
    compare_one_pass(config, 2, conv_strategy=mix)
    compare_one_pass(config, 2, conv_strategy=mix, training=False)


@pytest.mark.parametrize("use_msl, epoch", [(True, 0), (True, 4), (True, 10), (False, 0)])
def test_multi_step_loss_gate_matches_reference(use_msl, epoch):
    config = preset("maml++_omniglot_5w1s", use_multi_step_loss_optimization=use_msl, **SMALL)
    compare_one_pass(config, num_tasks=2, epoch=epoch)  # also checks which steps had a target pass


def test_derivative_order_annealing_switches_after_the_configured_epoch():
    config = preset("maml++_omniglot_5w1s", first_order_to_second_order_epoch=2, **SMALL)
    assert not config.uses_second_order(2)
    assert config.uses_second_order(3)
    for epoch in (2, 3):
        compare_one_pass(config, num_tasks=2, epoch=epoch)
    batch = make_batch(config, 2)
    annealed = make_pair(config)[1]
    first_order = make_pair(config.replace(second_order=False))[1]
    name = "classifier.layer_dict.conv1.conv.weight"
    at = {epoch: (meta_gradients(annealed, batch, epoch)[2][name],
                  meta_gradients(first_order, batch, epoch)[2][name]) for epoch in (2, 3)}
    assert torch.equal(*at[2]), "epoch 2 must still be first order"
    assert (at[3][0] - at[3][1]).norm() > 1e-6 * at[3][1].norm(), "epoch 3 must be second order"


def test_first_and_second_order_meta_gradients_differ():
    config = preset("maml++_omniglot_5w1s", **SMALL)
    _, learner = make_pair(config)
    batch = make_batch(config, 2)
    grads = {}
    for order in (True, False):
        learner.config.second_order = order
        grads[order] = meta_gradients(learner, batch, epoch=0)[2]
    name = "classifier.layer_dict.conv1.conv.weight"
    assert (grads[True][name] - grads[False][name]).norm() > 1e-6 * grads[True][name].norm()


@pytest.mark.parametrize("name, overrides", [
    ("maml++_omniglot_20w1s", SMALL),
    ("maml++_mini-imagenet_5w5s", dict(SMALL, cnn_num_filters=8, num_target_samples=2)),
])
def test_evaluation_pass_matches_reference(name, overrides):
    compare_one_pass(preset(name, **overrides), num_tasks=2, training=False)


@pytest.mark.parametrize("fix", ["bn_use_running_stats_in_evaluation", "bn_restore_stats_after_evaluation"])
def test_evaluation_fixes_match_reference(fix):
    config = preset("maml++_omniglot_5w1s", **{fix: True}, **SMALL)
    reference, learner = make_pair(config)
    batch = make_batch(config, 2)
    for model in (reference, learner):
        model.run_train_iter(batch, epoch=0)
    # Evaluate both from the same state. After Adam, the conv biases (whose true gradient is zero)
    # hold Adam-normalised rounding noise of ~1e-10 that differs between the two; with running
    # statistics that noise no longer cancels in batch norm and would put the logits' agreement at
    # the edge of 1e-10 for reasons that have nothing to do with the evaluation path under test.
    # The training step itself is compared in test_several_train_iterations_end_with_equal_parameters.
    reference.load_state_dict(learner.state_dict())
    before = {k: v.clone() for k, v in learner.state_dict().items() if "running" in k}
    ref_losses, ref_logits = reference.run_validation_iter(batch)
    losses, logits = learner.run_validation_iter(batch)
    assert_tensors_match({"logits": logits}, {"logits": ref_logits}, "evaluation logits")
    after = {k: v for k, v in learner.state_dict().items() if "running" in k}
    assert_tensors_match(after, before, "running statistics untouched by evaluation")


def test_several_train_iterations_end_with_equal_parameters():
    """Adam, cosine annealing across epochs, MSL decay and a validation pass in between."""
    config = preset("maml++_omniglot_5w1s", total_epochs=4, **SMALL)
    reference, learner = make_pair(config)
    for iteration, epoch in enumerate([0, 0, 1, 2, 3]):
        batch = make_batch(config, 2, seed=iteration)
        ref_losses, _ = reference.run_train_iter(batch, epoch)
        losses, _ = learner.run_train_iter(batch, epoch)
        assert losses["learning_rate"] == ref_losses["learning_rate"]
        assert losses["loss"].item() == pytest.approx(ref_losses["loss"].item(), rel=RTOL)
        if iteration == 2:
            reference.run_validation_iter(batch)
            learner.run_validation_iter(batch)
    assert learner.optimizer.param_groups[0]["lr"] < config.meta_learning_rate
    assert_states_match_after_adam(learner.state_dict(), reference.state_dict(), "parameters and running stats")


@pytest.mark.cuda
@pytest.mark.parametrize("second_order", [True, False])
@pytest.mark.parametrize("backend, conv_strategy", [("auto", "auto"), ("aten", "grouped"), ("auto", "explicit"),
                                                    ("auto", "bmm"), ("auto", "triton"),
                                                    ("auto", ("triton", "auto", "auto", "auto"))])
@pytest.mark.parametrize("name, overrides", [
    ("maml++_omniglot_20w1s", SMALL),
    ("maml++_mini-imagenet_5w1s", dict(SMALL, cnn_num_filters=8, num_target_samples=2)),
])
def test_gpu_meta_step_matches_cpu_reference_in_float64(name, overrides, second_order, backend, conv_strategy):
    """The whole meta-step on the GPU (float64 kernels) against the CPU reference."""
    config = preset(name, second_order=second_order, **overrides)
    for training in (True, False):
        compare_one_pass(config, num_tasks=4, backend=backend, device="cuda", conv_strategy=conv_strategy,
                         training=training)


@pytest.mark.cuda
@pytest.mark.parametrize("name, variant", [  # a few, to keep the lease's test step short
    ("maml++_omniglot_20w1s", dict(max_pooling=False)),
    ("maml++_omniglot_20w1s", dict(norm_layer="layer_norm", max_pooling=False)),
    ("maml++_omniglot_20w1s", INNER_BN),
    ("maml++_omniglot_20w1s", dict(INNER_BN, norm_layer="layer_norm")),
    ("maml++_mini-imagenet_5w1s", dict(conv_padding=False, cnn_num_filters=8)),
], ids=lambda v: ",".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else v)
def test_gpu_network_variants_match_cpu_reference_in_float64(name, variant):
    config = preset(name, **{**SMALL, "num_target_samples": 2, **variant})
    for training in (True, False):
        compare_one_pass(config, num_tasks=4, device="cuda", training=training)
