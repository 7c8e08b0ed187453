"""The reference network against an independent reading of the official layers (spec section 2).

The float64 equivalence tests compare MetaLearner with the reference, and both share the
parameter tree, the norm-layer lookup and the inner-loop filter; a misreading of the official
code there would pass them. This file writes the official `VGGReLUNormNetwork` forward and the
LSLR step again, from the spec and the official layer semantics, over the state_dict by official
name only, and checks the reference's `net_forward` and `apply_inner_loop_update` against it for
the released network and every option no released config uses.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamlpp_fast import preset
from mamlpp_fast.reference import MAMLFewShotClassifier

SMALL = dict(cnn_num_filters=6, number_of_training_steps_per_iter=3, number_of_evaluation_steps_per_iter=3)
CASES = [
    ("maml++_omniglot_5w1s", {}),
    ("maml++_omniglot_5w1s", dict(max_pooling=False)),
    ("maml++_omniglot_5w1s", dict(norm_layer="layer_norm")),
    ("maml++_omniglot_5w1s", dict(enable_inner_loop_optimizable_bn_params=True)),
    ("maml++_omniglot_5w1s", dict(enable_inner_loop_optimizable_bn_params=True, norm_layer="layer_norm",
                                  max_pooling=False)),
    ("maml_omniglot_5w1s", {}),  # shared BN, no per-step rows
    ("maml++_omniglot_5w1s", dict(num_stages=3)),
    ("maml++_mini-imagenet_5w1s", dict(conv_padding=False)),
    ("maml++_mini-imagenet_5w1s", dict(conv_padding=False, max_pooling=False)),
    ("maml++_mini-imagenet_5w1s", dict(conv_padding=False, norm_layer="layer_norm")),  # LN over unpadded maps
]


def official_logits(config, state, x, step, adapted):
    """VGGReLUNormNetwork.forward: conv (stride 2 without max-pooling, padding int(conv_padding)),
    norm, leaky_relu(0.01), max_pool2d(2, 2) per stage; without max-pooling avg_pool2d(out,
    out.shape[2]) at the end; then F.linear with `weights`. A parameter comes from `adapted` (the
    inner loop's copy) when it is there, else from the state; a per-step BN tensor is indexed by
    the step unless the inner loop adapts it (MetaBatchNormLayer.forward)."""

    def param(name):
        return adapted[name] if name in adapted else state[f"classifier.{name}"]

    out = x
    for i in range(config.num_stages):
        out = F.conv2d(out, param(f"layer_dict.conv{i}.conv.weight"), param(f"layer_dict.conv{i}.conv.bias"),
                       stride=1 if config.max_pooling else 2, padding=1 if config.conv_padding else 0)
        gamma, beta = param(f"layer_dict.conv{i}.norm_layer.weight"), param(f"layer_dict.conv{i}.norm_layer.bias")
        if config.norm_layer == "layer_norm":
            out = F.layer_norm(out, out.shape[1:], gamma, beta, eps=1e-5)
        else:
            if config.per_step_bn_statistics and not config.enable_inner_loop_optimizable_bn_params:
                gamma, beta = gamma[step], beta[step]
            out = F.batch_norm(out, None, None, gamma, beta, training=True, eps=1e-5)
        out = F.leaky_relu(out, 0.01)
        if config.max_pooling:
            out = F.max_pool2d(out, kernel_size=2, stride=2, padding=0)
    if not config.max_pooling:
        out = F.avg_pool2d(out, out.shape[2])
    return F.linear(out.reshape(out.shape[0], -1), param("layer_dict.linear.weights"), param("layer_dict.linear.bias"))


def official_inner_loop_names(config, learner):
    """get_inner_loop_parameter_dict: trainable, and no "norm_layer" unless the option says so."""
    return [name for name, p in learner.classifier.named_parameters()
            if p.requires_grad and (config.enable_inner_loop_optimizable_bn_params or "norm_layer" not in name)]


@pytest.mark.parametrize("name, variant", CASES, ids=[f"{n}-{','.join(v) or 'released'}" for n, v in CASES])
def test_reference_follows_the_official_layers(name, variant):
    config = preset(name, **{**SMALL, **variant})
    torch.manual_seed(0)
    learner = MAMLFewShotClassifier(config).double()
    with torch.no_grad():  # every parameter off its init (gamma rows, frozen ones, LSLR rates)
        for key, p in learner.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
            if key.startswith("inner_loop_optimizer"):
                p.abs_()
    state = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    n = config.num_classes_per_set * config.num_samples_per_class
    x = torch.randn(n, *config.image_shape, dtype=torch.float64)
    y = torch.arange(config.num_classes_per_set).repeat_interleave(config.num_samples_per_class)

    names = official_inner_loop_names(config, learner)
    weights = learner.get_inner_loop_parameter_dict(learner.classifier.named_parameters())
    assert list(weights) == names
    for step in range(config.number_of_training_steps_per_iter):
        loss, logits = learner.net_forward(x, y, weights, num_step=step)
        expected = official_logits(config, state, x, step, {k: v.detach() for k, v in weights.items()})
        assert torch.allclose(logits, expected, rtol=1e-12, atol=1e-12), f"logits at step {step}"
        # The LSLR step: theta - alpha[name][step] * grad, with alpha keyed by the dashed name.
        grads = torch.autograd.grad(loss, list(weights.values()), retain_graph=True)
        updated = learner.apply_inner_loop_update(loss, weights, use_second_order=False, current_step_idx=step)
        for (key, old), grad in zip(weights.items(), grads):
            rate = state[f"inner_loop_optimizer.names_learning_rates_dict.{key.replace('.', '-')}"][step]
            assert torch.allclose(updated[key], old - rate * grad, rtol=1e-12, atol=1e-14), f"{key} at step {step}"
        weights = {k: v.detach().requires_grad_() for k, v in updated.items()}
