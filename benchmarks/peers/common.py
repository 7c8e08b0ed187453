"""What every peer provider shares: the MAML++ network as a plain `nn.Module`, the official
initialisation, the outer loop (MSL weights, mean over tasks, clamping, Adam) and batch handling.

Each peer (`torchfunc_maml`, `l2l_maml`, `higher_maml`) only implements `meta_loss`, the inner
loops of a meta-batch, in its library's idiom. Everything around it is written once here, so
that the timings compare inner-loop machinery and not incidental differences.

Semantics (spec sections 1-2), identical for every peer unless its docstring says otherwise:

- network: ``num_stages`` x (conv3x3 pad 1 -> batch norm with the current batch's statistics ->
  leaky_relu(0.01) -> max_pool 2x2) -> flatten -> linear;
- per-step BN gamma/beta of shape (S, C), meta-learned in the outer loop only;
- LSLR: one learnable rate vector of length S+1 per inner-loop tensor (conv and linear weights
  and biases), ``theta_{i+1} = theta_i - alpha[k][i] * grad``;
- MSL weights of `per_step_loss_weights` at the given epoch while ``epoch <
  multi_step_loss_num_epochs``, else only the final step's target loss;
- second order unless the config says otherwise; first order keeps the ``theta - alpha * g``
  path (g a constant), so the LSLR rates still train;
- meta-loss = mean over tasks; Adam(meta_learning_rate, cosine value at the epoch) on all
  meta-parameters; imagenet datasets clamp classifier gradients to +-10.

One difference every peer shares: the per-step BN *running* statistics are not tracked. The
official code updates them but never reads them in training (spec 1c), so losses and gradients
are unaffected; only that bookkeeping work (a few tiny in-place updates per stage) is skipped.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mamlpp_fast.config import MAMLConfig
from mamlpp_fast.parameters import (
    BN_EPS,
    LEAKY_RELU_SLOPE,
    build_classifier,
    build_inner_loop_optimizer,
    feature_size,
    inner_loop_parameter_names,
    learning_rate_key,
    seed_like_official,
)
from mamlpp_fast.schedules import cosine_annealed_learning_rate, per_step_loss_weights

__all__ = ["MAMLConvNet", "PeerLearner", "TaskTensors"]

# (x_support [B, N*K, C, H, W], y_support [B, N*K], x_target [B, N*T, C, H, W], y_target [B, N*T])
TaskTensors = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class MAMLConvNet(nn.Module):
    """The official `VGGReLUNormNetwork` as an ordinary module; ``forward(x, step)``.

    BN gamma/beta are direct parameters ``bn_weight_{i}`` / ``bn_bias_{i}`` of shape (S, C)
    (no ParameterList, so higher's monkey-patching and learn2learn's cloning see plain
    attributes), indexed by the inner step.
    """

    def __init__(self, config: MAMLConfig, autocast_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.num_stages = config.num_stages
        # Mixed precision with MetaLearner(autocast_dtype=...)'s scope: each network pass under
        # autocast, the logits (and so the loss) float32, every derivative outside autocast.
        self.autocast_dtype = autocast_dtype
        steps, filters = config.number_of_training_steps_per_iter, config.cnn_num_filters
        self.convs = nn.ModuleList()
        in_channels = config.image_channels
        for stage in range(config.num_stages):
            self.convs.append(nn.Conv2d(in_channels, filters, 3, padding=1, bias=True))
            self.register_parameter(f"bn_weight_{stage}", nn.Parameter(torch.ones(steps, filters)))
            self.register_parameter(f"bn_bias_{stage}", nn.Parameter(torch.zeros(steps, filters)))
            in_channels = filters
        self.linear = nn.Linear(feature_size(config), config.num_classes_per_set)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self._logits(x, step)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, cache_enabled=False):
            return self._logits(x, step).float()

    def _logits(self, x: torch.Tensor, step: int) -> torch.Tensor:
        out = x
        for stage, conv in enumerate(self.convs):
            out = F.conv2d(out, conv.weight, conv.bias, padding=1)
            gamma = getattr(self, f"bn_weight_{stage}")[step]
            beta = getattr(self, f"bn_bias_{stage}")[step]
            out = F.batch_norm(out, None, None, gamma, beta, training=True, eps=BN_EPS)
            out = F.leaky_relu(out, LEAKY_RELU_SLOPE)
            out = F.max_pool2d(out, kernel_size=2, stride=2)
        return self.linear(out.reshape(out.shape[0], -1))

    @staticmethod
    def official_names(num_stages: int) -> Dict[str, str]:
        """Our parameter name -> the official state_dict name."""
        names = {}
        for i in range(num_stages):
            base = f"classifier.layer_dict.conv{i}"
            names[f"convs.{i}.weight"] = f"{base}.conv.weight"
            names[f"convs.{i}.bias"] = f"{base}.conv.bias"
            names[f"bn_weight_{i}"] = f"{base}.norm_layer.weight"
            names[f"bn_bias_{i}"] = f"{base}.norm_layer.bias"
        names["linear.weight"] = "classifier.layer_dict.linear.weights"
        names["linear.bias"] = "classifier.layer_dict.linear.bias"
        return names

    @staticmethod
    def inner_names(num_stages: int) -> List[str]:
        """Inner-loop tensors in the official order (conv0 w, b, ..., linear w, b)."""
        names = []
        for i in range(num_stages):
            names += [f"convs.{i}.weight", f"convs.{i}.bias"]
        return names + ["linear.weight", "linear.bias"]


class PeerLearner:
    """Outer loop shared by the peers. Subclasses implement `meta_loss(tasks, epoch)`."""

    name = "peer"

    def __init__(self, config: MAMLConfig, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", autocast_dtype: Optional[torch.dtype] = None) -> None:
        if not config.per_step_batch_norm or not config.learnable_per_layer_per_step_inner_loop_learning_rate:
            raise ValueError("peer providers implement MAML++ (per-step batch norm, learnable LSLR) only, "
                             f"got norm_layer={config.norm_layer!r}, per_step_bn_statistics="
                             f"{config.per_step_bn_statistics}")
        if not (config.max_pooling and config.conv_padding) or config.enable_inner_loop_optimizable_bn_params:
            raise ValueError("peer providers implement the released network (max_pooling=true, conv_padding="
                             "true, BN parameters outside the inner loop) only")
        self.config = config
        self.dtype, self.device = dtype, torch.device(device)
        self.num_steps = config.number_of_training_steps_per_iter
        self.net = MAMLConvNet(config, autocast_dtype)
        self.to_official = MAMLConvNet.official_names(config.num_stages)
        self.inner_names = MAMLConvNet.inner_names(config.num_stages)
        # The official initialisation (same RNG use as the official constructor), then copied in.
        seed_like_official(config.seed)
        official = build_classifier(config)
        rates = build_inner_loop_optimizer(config, inner_loop_parameter_names(official, config))
        state = {f"classifier.{k}": v for k, v in official.state_dict().items()}
        with torch.no_grad():
            for ours, theirs in self.to_official.items():
                self.net.get_parameter(ours).copy_(state[theirs])
        self.net.to(device=self.device, dtype=dtype)
        # LSLR rates keyed by *our* inner-parameter name (official key: learning_rate_key).
        official_rate = {k: v for k, v in rates.names_learning_rates_dict.items()}
        self.rates = nn.ParameterDict({
            name.replace(".", "_"): nn.Parameter(
                official_rate[learning_rate_key(self.to_official[name].removeprefix("classifier."))]
                .detach().clone().to(device=self.device, dtype=dtype))
            for name in self.inner_names
        })
        self.optimizer = torch.optim.Adam(self.meta_parameters().values(), lr=config.meta_learning_rate)

    # ------------------------------------------------------------------ helpers
    def rate(self, inner_name: str) -> torch.Tensor:
        return self.rates[inner_name.replace(".", "_")]

    def meta_parameters(self) -> Dict[str, torch.Tensor]:
        """Every trainable meta-parameter under its official state_dict name."""
        out = {self.to_official[n]: p for n, p in self.net.named_parameters()}
        for name in self.inner_names:
            key = learning_rate_key(self.to_official[name].removeprefix("classifier."))
            out[f"inner_loop_optimizer.names_learning_rates_dict.{key}"] = self.rate(name)
        return out

    def loss_weights(self, epoch: int) -> Tuple[bool, torch.Tensor]:
        """(use MSL?, per-step weights); stored like the official code, in the default dtype."""
        weights = per_step_loss_weights(self.num_steps, self.config.multi_step_loss_num_epochs, epoch)
        use_msl = self.config.uses_multi_step_loss(epoch, training_phase=True)
        return use_msl, torch.tensor(weights, dtype=torch.get_default_dtype()).to(self.device)

    def tasks(self, batch: Sequence[torch.Tensor]) -> TaskTensors:
        """(x_s [B,N,K,C,H,W], x_t, y_s [B,N,K], y_t) -> flattened per-task tensors."""
        x_s, x_t, y_s, y_t = (torch.as_tensor(t) for t in batch)
        b = x_s.shape[0]
        shape = tuple(x_s.shape[-3:])
        cast = dict(device=self.device, dtype=self.dtype)
        return (x_s.to(**cast).reshape(b, -1, *shape), y_s.to(self.device).long().reshape(b, -1),
                x_t.to(**cast).reshape(b, -1, *shape), y_t.to(self.device).long().reshape(b, -1))

    # ------------------------------------------------------------------ the outer loop
    def meta_loss(self, tasks: TaskTensors, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def run_train_iter(self, batch: Sequence[torch.Tensor], epoch: int = 0) -> torch.Tensor:
        """One meta-iteration: inner loops, outer backward, clamp, Adam. Returns the loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_annealed_learning_rate(self.config.meta_learning_rate,
                                                        self.config.min_learning_rate, epoch,
                                                        self.config.total_epochs)
        loss = self.meta_loss(self.tasks(batch), epoch)
        self.optimizer.zero_grad()
        loss.backward()
        if self.config.clamps_meta_gradients:
            for p in self.net.parameters():
                if p.grad is not None:
                    p.grad.clamp_(-10, 10)
        self.optimizer.step()
        return loss.detach()
