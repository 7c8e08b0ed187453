"""`torch.optim.Adam`'s step, split so that its tensor work can be recorded in a CUDA graph.

A CUDA graph replays kernels with the arguments they were recorded with. Adam's step has two
things that change from step to step and that the eager optimizer passes as Python numbers: the
learning rate (MAML++ anneals it every epoch) and the bias corrections 1 - beta^t. `GraphAdam`
moves both into small device tensors that the host refreshes before each replay, and splits the
step in three:

- `stage()` (host, before a replay): computes -lr / (1 - beta1^t) and sqrt(1 - beta2^t) in double
  precision, exactly as the eager optimizer does, and writes them into the device scalars with
  `fill_` (a kernel launch, no synchronisation);
- `update(params, grads)` (device only, recorded once): the moment updates and the parameter step,
  the same operations as the eager multi-tensor Adam with the two scalars read from the device
  tensors;
- `commit(params)` (host, after a replay): advances the optimizer's step counters.

This is what `torch.optim.Adam(capturable=True)` achieves; here the optimizer itself stays an
ordinary, non-capturable Adam: its state (the step counters are CPU tensors), its state_dict and
its checkpoints are those of the official code, so a checkpoint moves between graphed and eager
runs, and between GPU and CPU, unchanged. Step counters live on the host, so `stage()` reads
them without a device synchronisation.

The state the step writes is the optimizer's own (`optimizer.state[p]["exp_avg"]`, ...), so a
graph recorded with `update` holds those tensors' addresses: replacing them (`load_state_dict`)
needs a new recording; `state_addresses()` gives what to key a recording on.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.optim.optimizer as optimizer_module

__all__ = ["GraphAdam"]

_SUPPORTED_DTYPES = {torch.float32, torch.float64}


def _step_counter_dtype() -> torch.dtype:
    """The dtype eager Adam gives a new step counter (float32, or float64 under a float64
    default dtype)."""
    rule = getattr(optimizer_module, "_get_scalar_dtype", None)
    if rule is not None:
        return rule()
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class GraphAdam:
    """Adam's step on `optimizer`'s own state, with no host synchronisation in `update`.

    Args:
        optimizer: a `torch.optim.Adam` with default options apart from lr, betas and eps
            (`unsupported_reason` says what else is refused, and why).

    Per meta-step: `stage()`, then `update(params, grads)` (run or replayed), then
    `commit(params)`; the result equals `optimizer.step()` with `.grad = grads` (to rounding of
    the last bit: the eager kernels may fuse a multiply-add that `update` performs in two).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        reason = self.unsupported_reason(optimizer)
        if reason is not None:
            raise ValueError(f"optimizer: {reason}")
        self.optimizer = optimizer
        # Per param group: [-lr / (1 - beta1^t), sqrt(1 - beta2^t)] as two 0-dim device tensors,
        # allocated on first use (outside any recording) and refreshed by stage().
        self._scalars: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ eligibility
    @staticmethod
    def unsupported_reason(optimizer: torch.optim.Optimizer) -> Optional[str]:
        """Why `optimizer`'s step cannot be split as above, or None when it can."""
        if type(optimizer) is not torch.optim.Adam:
            return f"the graph-safe step is Adam's; the optimizer is {type(optimizer).__name__}"
        if getattr(optimizer, "_optimizer_step_pre_hooks", None) or getattr(optimizer, "_optimizer_step_post_hooks", None):
            return "the optimizer has step hooks, which a replayed step would skip"
        global_hooks = (getattr(optimizer_module, "_global_optimizer_pre_hooks", None),
                        getattr(optimizer_module, "_global_optimizer_post_hooks", None))
        if any(global_hooks):
            return "global optimizer step hooks are registered, which a replayed step would skip"
        for index, group in enumerate(optimizer.param_groups):
            for option, plain in (("amsgrad", False), ("maximize", False), ("capturable", False),
                                  ("differentiable", False), ("decoupled_weight_decay", False)):
                if bool(group.get(option, plain)) != plain:
                    return f"param group {index} sets {option}={group[option]!r} (only {plain} is supported)"
            if group.get("weight_decay", 0) != 0:
                return f"param group {index} sets weight_decay={group['weight_decay']!r} (only 0 is supported)"
            if group.get("fused"):
                return f"param group {index} uses the fused Adam, which steps on its own"
            for option in ("lr", "eps"):
                if isinstance(group[option], torch.Tensor):
                    return f"param group {index} has a tensor {option} (a Python float is expected)"
            if any(isinstance(beta, torch.Tensor) for beta in group["betas"]):
                return f"param group {index} has tensor betas (Python floats are expected)"
            dtypes = {param.dtype for param in group["params"]}
            devices = {param.device for param in group["params"]}
            if len(dtypes) > 1 or len(devices) > 1:
                return (f"param group {index} mixes dtypes {sorted(map(str, dtypes))} or devices "
                        f"{sorted(map(str, devices))}; one of each is supported")
            if dtypes - _SUPPORTED_DTYPES:
                # Eager Adam computes half/bfloat16 updates in float32 and views complex tensors
                # as real; this step does neither, so it would round (or square) differently.
                return f"param group {index} has {dtypes.pop()} parameters (float32 or float64 are supported)"
        return None

    # ------------------------------------------------------------------ host side
    def initialise_state(self) -> None:
        """Create the state of every parameter that has none, as Adam's first step would (zero
        moments, a CPU step counter at 0), so that a recording can refer to it."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state[param]
                if len(state) == 0:
                    # On the host, as a non-capturable Adam keeps it (also under a default device).
                    state["step"] = torch.tensor(0.0, dtype=_step_counter_dtype(), device="cpu")
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def state_addresses(self) -> Tuple:
        """The storage of the optimizer state (and the constants `update` records): a recording
        of `update` is valid while this is unchanged."""
        out = []
        for group in self.optimizer.param_groups:
            out.append((tuple(group["betas"]), group["eps"]))
            for param in group["params"]:
                state = self.optimizer.state.get(param, {})
                out.append(tuple(state[key].data_ptr() if key in state else None for key in ("exp_avg", "exp_avg_sq")))
        return tuple(out)

    def stage(self, params: Sequence[torch.Tensor]) -> None:
        """Write the coming step's learning-rate and bias-correction scalars of each param group
        that holds some of `params` (the parameters the step will update). The scalars follow the
        parameters' device and dtype; new scalars mean a recording of `update` is stale, which
        the parameters' new storage already says."""
        for index, group, members in self._groups_of(params):
            steps = {float(self.optimizer.state[param]["step"]) for param in members}
            if len(steps) != 1:
                # Every parameter trained together steps together; anything else is not a state
                # this class produced or an eager Adam over the same parameters would.
                raise RuntimeError(f"param group {index}: the parameters' Adam step counts differ ({sorted(steps)})")
            step = steps.pop() + 1
            beta1, beta2 = group["betas"]
            neg_step_size = -(group["lr"] / (1 - beta1 ** step))
            bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
            scalars = self._scalars.get(index)
            like = members[0]
            if scalars is None or scalars[0].device != like.device or scalars[0].dtype != like.dtype:
                scalars = (torch.zeros((), dtype=like.dtype, device=like.device),
                           torch.zeros((), dtype=like.dtype, device=like.device))
                self._scalars[index] = scalars
            scalars[0].fill_(neg_step_size)
            scalars[1].fill_(bias_correction2_sqrt)

    def commit(self, params: Sequence[torch.Tensor]) -> None:
        """Advance the step counters of `params` after their update ran."""
        torch._foreach_add_([self.optimizer.state[param]["step"] for param in params], 1)

    # ------------------------------------------------------------------ device side
    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Adam's moment and parameter updates of `params` with `grads`, in place, reading the
        scalars written by the last `stage(params)`. No host synchronisation: safe to record."""
        if len(params) != len(grads):
            raise ValueError(f"params and grads must pair up; got {len(params)} and {len(grads)}")
        grad_of = {id(param): grad for param, grad in zip(params, grads)}
        for index, group, members in self._groups_of(params):
            if index not in self._scalars:
                raise RuntimeError("GraphAdam.update needs stage() first (it allocates the scalars)")
            neg_step_size, bias_correction2_sqrt = self._scalars[index]
            beta1, beta2 = group["betas"]
            member_grads = [grad_of[id(param)] for param in members]
            exp_avgs = [self.optimizer.state[param]["exp_avg"] for param in members]
            exp_avg_sqs = [self.optimizer.state[param]["exp_avg_sq"] for param in members]
            # The eager multi-tensor Adam's operations, in its order.
            torch._foreach_lerp_(exp_avgs, member_grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, member_grads, member_grads, 1 - beta2)
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denominators, bias_correction2_sqrt)
            torch._foreach_add_(denominators, group["eps"])
            steps = torch._foreach_div(exp_avgs, denominators)
            torch._foreach_mul_(steps, neg_step_size)
            torch._foreach_add_(list(members), steps)

    # ------------------------------------------------------------------ helpers
    def _groups_of(self, params: Sequence[torch.Tensor]) -> List[Tuple[int, dict, List[torch.Tensor]]]:
        """(group index, group, the members of `params` in it, in group order) per group."""
        wanted = {id(param) for param in params}
        found = 0
        out = []
        for index, group in enumerate(self.optimizer.param_groups):
            members = [param for param in group["params"] if id(param) in wanted]
            if members:
                out.append((index, group, members))
                found += len(members)
        if found != len(wanted):
            raise ValueError("params: some tensors are not parameters of the optimizer")
        return out
