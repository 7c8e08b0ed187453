"""The meta-parameters of MAML++, laid out with the official module and parameter names.

`build_classifier` creates the parameter tree of the official `VGGReLUNormNetwork` and
`build_inner_loop_optimizer` the one of `LSLRGradientDescentLearningRule`, so that
`state_dict()` keys match official checkpoints:

- ``classifier.layer_dict.conv{i}.conv.{weight,bias}``
- ``classifier.layer_dict.conv{i}.norm_layer.{running_mean,running_var,bias,weight}``
- ``classifier.layer_dict.linear.{weights,bias}``
- ``inner_loop_optimizer.names_learning_rates_dict.layer_dict-conv0-conv-weight`` ...

These modules hold parameters only; the per-task reference and the task-batched MetaLearner
each run their own forward pass over them.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from .config import MAMLConfig

__all__ = [
    "seed_like_official",
    "build_classifier",
    "build_inner_loop_optimizer",
    "inner_loop_parameter_names",
    "adapts_in_inner_loop",
    "learning_rate_key",
    "feature_size",
    "conv_output_shapes",
]

BN_MOMENTUM = 0.1
BN_EPS = 1e-5
LAYER_NORM_EPS = 1e-5  # MetaLayerNormLayer's default
LEAKY_RELU_SLOPE = 0.01


def seed_like_official(seed: int) -> np.random.RandomState:
    """`set_torch_seed` of the official code: torch is seeded from RandomState(seed)."""
    rng = np.random.RandomState(seed=seed)
    torch.manual_seed(int(rng.randint(0, 999999)))
    return rng


def conv_output_shapes(config: MAMLConfig) -> List[Tuple[int, int, int]]:
    """(C, H, W) of each stage's convolution output, where its norm layer acts."""
    return [(config.cnn_num_filters, height, width) for height, width in config.conv_output_sizes()]


def feature_size(config: MAMLConfig) -> int:
    """Length of the flattened features that reach the linear layer. Without max-pooling the
    official network average-pools the last map with windows of its height (`avg_pool2d(out,
    out.shape[2])`): 1 x (W // H) positions per channel."""
    channels, height, width = conv_output_shapes(config)[-1]
    if config.max_pooling:
        return channels * (height // 2) * (width // 2)
    return channels * (width // height)


class _Holder(nn.Module):
    """A plain container: the official names are attribute paths of nested holders."""


def _layer_norm_holder(shape: Tuple[int, int, int]) -> nn.Module:
    """The official MetaLayerNormLayer over one conv output [C, H, W]: gamma frozen at 1, beta
    trained (by the outer loop, and by the inner loop too with
    `enable_inner_loop_optimizable_bn_params`); no running statistics and no per-step rows,
    whatever per_step_bn_statistics says."""
    norm = _Holder()
    norm.weight = nn.Parameter(torch.ones(*shape), requires_grad=False)
    norm.bias = nn.Parameter(torch.zeros(*shape))
    return norm


def _batch_norm_holder(config: MAMLConfig, channels: int) -> nn.Module:
    norm = _Holder()
    rows = (config.number_of_training_steps_per_iter,) if config.per_step_bn_statistics else ()
    # With inner-loop BN parameters the official layer replaces gamma and beta by single rows.
    affine_rows = rows if config.per_step_bn_affine else ()
    # Registration order matches the official MetaBatchNormLayer: running stats, then bias, then
    # weight. The running statistics are Parameters with requires_grad=False in the official code.
    norm.running_mean = nn.Parameter(torch.zeros(*rows, channels), requires_grad=False)
    norm.running_var = nn.Parameter(
        torch.ones(*rows, channels) if config.per_step_bn_statistics else torch.zeros(channels),
        requires_grad=False,
    )
    norm.bias = nn.Parameter(torch.zeros(*affine_rows, channels), requires_grad=config.learnable_bn_beta)
    norm.weight = nn.Parameter(torch.ones(*affine_rows, channels), requires_grad=config.learnable_bn_gamma)
    return norm


def build_classifier(config: MAMLConfig) -> nn.Module:
    """The official network's parameters, initialised as the official code does.

    Consumes the global torch RNG exactly like the official constructor: one
    `xavier_uniform_` per conv weight in stage order, then one for the linear weights.
    """
    classifier = _Holder()
    classifier.layer_dict = nn.ModuleDict()
    in_channels = config.image_channels
    for stage, shape in enumerate(conv_output_shapes(config)):
        block = _Holder()
        block.conv = _Holder()
        block.conv.weight = nn.Parameter(torch.empty(config.cnn_num_filters, in_channels, 3, 3))
        nn.init.xavier_uniform_(block.conv.weight)
        block.conv.bias = nn.Parameter(torch.zeros(config.cnn_num_filters))
        if config.norm_layer == "layer_norm":
            block.norm_layer = _layer_norm_holder(shape)
        else:
            block.norm_layer = _batch_norm_holder(config, config.cnn_num_filters)
        classifier.layer_dict[f"conv{stage}"] = block
        in_channels = config.cnn_num_filters
    linear = _Holder()
    linear.weights = nn.Parameter(torch.empty(config.num_classes_per_set, feature_size(config)))
    nn.init.xavier_uniform_(linear.weights)
    linear.bias = nn.Parameter(torch.zeros(config.num_classes_per_set))
    classifier.layer_dict["linear"] = linear
    if config.per_step_batch_norm:
        # The official constructor runs an all-zeros dummy batch through each new block
        # (`build_block`) and then through the whole network (`build_network`), both at step 0
        # in training mode. Every conv output is 0, so the batch variance is 0 and each
        # running_var[0] is scaled by (1 - momentum) twice: 1 -> 0.81. running_mean stays 0.
        with torch.no_grad():
            for stage in range(config.num_stages):
                norm = classifier.layer_dict[f"conv{stage}"].norm_layer
                norm.running_var[0].mul_((1.0 - BN_MOMENTUM) ** 2)
    return classifier


def adapts_in_inner_loop(name: str, param: nn.Parameter, config: MAMLConfig) -> bool:
    """The official `get_inner_loop_parameter_dict` filter: trainable, and not part of a norm
    layer unless `enable_inner_loop_optimizable_bn_params`."""
    return param.requires_grad and (config.enable_inner_loop_optimizable_bn_params or "norm_layer" not in name)


def inner_loop_parameter_names(classifier: nn.Module, config: MAMLConfig) -> List[str]:
    """Names of the classifier's parameters that the inner loop adapts (`adapts_in_inner_loop`)."""
    return [name for name, param in classifier.named_parameters() if adapts_in_inner_loop(name, param, config)]


def learning_rate_key(parameter_name: str) -> str:
    """Official LSLR key of an inner-loop parameter: dots become dashes."""
    return parameter_name.replace(".", "-")


def build_inner_loop_optimizer(config: MAMLConfig, parameter_names: List[str]) -> nn.Module:
    """LSLR rates: one vector of length S+1 per inner-loop tensor (the last entry is never used,
    as in the official code), initialised to `task_learning_rate`."""
    optimizer = _Holder()
    # Inserted one by one, in the network's order, as the official LSLR rule does: built from a
    # plain dict, ParameterDict would sort the keys, and Adam's state (indexed by position)
    # would not line up with an official checkpoint's.
    optimizer.names_learning_rates_dict = nn.ParameterDict()
    for name in parameter_names:
        optimizer.names_learning_rates_dict[learning_rate_key(name)] = nn.Parameter(
            torch.full((config.number_of_training_steps_per_iter + 1,), config.task_learning_rate),
            requires_grad=config.learnable_per_layer_per_step_inner_loop_learning_rate,
        )
    return optimizer
