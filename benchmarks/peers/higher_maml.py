"""`higher` peer: MAML++ with higher 0.2.1's `innerloop_ctx` (task loop).

Per task, `higher.innerloop_ctx(net, sgd, copy_initial_weights=False)` monkey-patches the
network into a functional model whose fast weights start at the meta-parameters, and a
differentiable SGD. The inner optimiser has one parameter group per inner-loop tensor (conv
and linear weights and biases; BN gamma/beta are in no group, so they are not adapted), and
each step passes the LSLR rates as tensors through ``diffopt.step(loss, override={"lr": [...]})``
so they receive meta-gradients.

Where higher differs in cost (not in result):

- `diffopt.step` differentiates the support loss with respect to *every* fast parameter that
  requires grad, including the BN gamma/beta that no group updates; those gradients are
  computed and dropped.
- First order: higher's own `track_higher_grads=False` detaches the new fast weights, which
  would cut the meta-gradient to theta and to the rates entirely. MAML++ first order keeps
  ``theta - alpha * g`` with g a constant, so we keep tracking and pass a `grad_callback` that
  detaches the gradients. The support-gradient is then still built with `create_graph=True`
  (higher always does when tracking), which costs graph memory a plain first-order loop does
  not.

Losses and gradients equal the official code's (test: tests/test_bench_peers.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import higher

from .common import PeerLearner, TaskTensors

__all__ = ["HigherMAML"]


def _detach_all(grads):
    return [None if g is None else g.detach() for g in grads]


class HigherMAML(PeerLearner):
    name = "higher"

    def __init__(self, config, dtype=torch.float32, device="cpu", autocast_dtype=None) -> None:
        super().__init__(config, dtype=dtype, device=device, autocast_dtype=autocast_dtype)
        params = dict(self.net.named_parameters())
        self.inner_sgd = torch.optim.SGD([{"params": [params[n]]} for n in self.inner_names],
                                         lr=config.task_learning_rate)

    def meta_loss(self, tasks: TaskTensors, epoch: int) -> torch.Tensor:
        use_msl, weights = self.loss_weights(epoch)
        callback = None if self.config.uses_second_order(epoch) else _detach_all
        total = []
        for x_s, y_s, x_t, y_t in zip(*tasks):
            losses = []
            with higher.innerloop_ctx(self.net, self.inner_sgd, copy_initial_weights=False,
                                      track_higher_grads=True) as (fnet, diffopt):
                for step in range(self.num_steps):
                    support_loss = F.cross_entropy(fnet(x_s, step), y_s)
                    rates = [self.rate(n)[step] for n in self.inner_names]
                    diffopt.step(support_loss, override={"lr": rates}, grad_callback=callback)
                    if use_msl:
                        losses.append(weights[step] * F.cross_entropy(fnet(x_t, step), y_t))
                    elif step == self.num_steps - 1:
                        losses.append(F.cross_entropy(fnet(x_t, step), y_t))
            total.append(torch.sum(torch.stack(losses)))
        return torch.mean(torch.stack(total))
