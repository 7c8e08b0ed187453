"""`torchfunc` peer: MAML++ with torch.func, the approach of PyTorch's public functorch MAML
example: `functional_call` of the module with fast weights, `torch.func.grad` for the inner
gradients, and `vmap` over the tasks of the meta-batch; the meta-gradient comes from an
ordinary `loss.backward()` through the vmapped inner loops.

Semantics are the full MAML++ of `common.py`:

- BN with batch statistics under vmap: `F.batch_norm(..., None, None, training=True)`, so each
  task (vmap slice) is normalised over its own batch, as in the per-task loop.
- Second order: `torch.func.grad` of the support loss at the fast weights, which stay connected
  to the meta-parameters; first order: the grad is taken at detached fast weights, so it is a
  constant while ``theta - alpha * g`` still back-propagates into theta and alpha. The BN
  gamma/beta enter that support gradient detached too (they are closed over, not arguments of
  `grad`, so they would otherwise stay on the outer tape and make g depend on them).

Differences from the official code: none in losses or gradients. Running statistics are not
tracked (see `common.py`).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .common import PeerLearner, TaskTensors

__all__ = ["TorchFuncMAML"]


class TorchFuncMAML(PeerLearner):
    name = "torchfunc"

    def meta_loss(self, tasks: TaskTensors, epoch: int) -> torch.Tensor:
        use_msl, weights = self.loss_weights(epoch)
        second_order = self.config.uses_second_order(epoch)
        params = dict(self.net.named_parameters())
        inner = {n: params[n] for n in self.inner_names}
        outer = {n: p for n, p in params.items() if n not in inner}
        rates = {n: self.rate(n) for n in self.inner_names}
        net, steps = self.net, self.num_steps

        # First order: the support gradient is a constant, also with respect to BN gamma/beta.
        frozen = outer if second_order else {k: v.detach() for k, v in outer.items()}

        def logits(fast: Dict[str, torch.Tensor], x: torch.Tensor, step: int, bn=outer) -> torch.Tensor:
            return functional_call(net, {**fast, **bn}, (x, step))

        def task_loss(fast, x_s, y_s, x_t, y_t):
            losses = []
            for step in range(steps):
                def support_loss(f):
                    return F.cross_entropy(logits(f, x_s, step, frozen), y_s)

                at = fast if second_order else {k: v.detach() for k, v in fast.items()}
                grads = grad(support_loss)(at)
                fast = {k: fast[k] - rates[k][step] * grads[k] for k in fast}
                if use_msl:
                    losses.append(weights[step] * F.cross_entropy(logits(fast, x_t, step), y_t))
                elif step == steps - 1:
                    losses.append(F.cross_entropy(logits(fast, x_t, step), y_t))
            return torch.sum(torch.stack(losses))

        x_s, y_s, x_t, y_t = tasks
        per_task = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(inner, x_s, y_s, x_t, y_t)
        return per_task.mean()
