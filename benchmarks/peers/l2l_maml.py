"""`learn2learn` peer: MAML++ with learn2learn 0.2.0's `l2l.algorithms.MAML` (task loop).

Per task, `maml.clone()` gives a differentiable copy of the network (learn2learn's
`clone_module`); each inner step takes `torch.autograd.grad` of the support loss with respect to
the clone's inner-loop tensors and applies ``-alpha[k][step] * g`` with learn2learn's
`update_module`, the same machinery `MAML.adapt` and `MetaSGD.adapt` use.

Where learn2learn cannot express MAML++ directly, and what we did:

- `MAML.adapt` has one global, fixed learning rate and `MetaSGD` one learnable rate *per
  element*, neither per step. LSLR (a learnable scalar per tensor per step) is therefore our own
  `ParameterDict`, fed to `update_module` as the update list; `adapt` itself is not called.
- `adapt` would also update the BN gamma/beta of the clone; MAML++ adapts conv/linear only, so
  BN entries of the update list are None (the clone's BN tensors are still cloned each task).
- First order: `autograd.grad(..., create_graph=False)`, like `MAML(first_order=True)`;
  ``theta - alpha * g`` still trains theta and alpha, as in the official code.

Losses and gradients equal the official code's (test: tests/test_bench_peers.py). learn2learn
needs torchvision to import: the benchmark process installs `_torchvision_stub` when the real
one is unusable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._torchvision_stub import install as _install_torchvision_stub
from .common import PeerLearner, TaskTensors

_install_torchvision_stub()
import learn2learn as l2l  # noqa: E402

__all__ = ["L2LMAML"]


class L2LMAML(PeerLearner):
    name = "learn2learn"

    def __init__(self, config, dtype=torch.float32, device="cpu", autocast_dtype=None) -> None:
        super().__init__(config, dtype=dtype, device=device, autocast_dtype=autocast_dtype)
        self.maml = l2l.algorithms.MAML(self.net, lr=config.task_learning_rate,
                                        first_order=not config.second_order, allow_unused=True)

    def meta_loss(self, tasks: TaskTensors, epoch: int) -> torch.Tensor:
        use_msl, weights = self.loss_weights(epoch)
        second_order = self.config.uses_second_order(epoch)
        inner = set(self.inner_names)
        total = []
        for x_s, y_s, x_t, y_t in zip(*tasks):
            learner = self.maml.clone()
            net = learner.module
            losses = []
            for step in range(self.num_steps):
                support_loss = F.cross_entropy(learner(x_s, step), y_s)
                named = list(net.named_parameters())
                grads = torch.autograd.grad(support_loss, [p for n, p in named if n in inner],
                                            create_graph=second_order)
                grads_by_name = dict(zip([n for n, _ in named if n in inner], grads))
                updates = [-self.rate(n)[step] * grads_by_name[n] if n in inner else None
                           for n, _ in named]
                l2l.update_module(net, updates=updates)
                if use_msl:
                    losses.append(weights[step] * F.cross_entropy(learner(x_t, step), y_t))
                elif step == self.num_steps - 1:
                    losses.append(F.cross_entropy(learner(x_t, step), y_t))
            total.append(torch.sum(torch.stack(losses)))
        return torch.mean(torch.stack(total))
