"""``lslr_update``: the MAML++ inner-loop step with learned per-layer per-step rates (LSLR).

One call updates every fast weight of every task::

    out[k] = theta_k - lr[k] * grads[k]

``theta_k = params[k]`` is either task-batched ``[B, *s_k]`` or shared ``[*s_k]`` (the meta-parameters
at step 0, broadcast over the B tasks). The op is differentiable with respect to params, grads and lr,
to any order (second-order MAML differentiates through it):

    d theta_k = g_out_k                (summed over the task dim when theta_k is shared)
    d grads_k = -lr[k] * g_out_k
    d lr[k]   = -<g_out_k, grads_k>

The backward is written with differentiable torch ops, so its own backward comes for free.

Backends (see ``mamlpp_fast._backend.select_backend``): ``cpp``/``cuda`` run the compiled
``torch.ops.mamlpp_fast.lslr_update``, ``triton`` the multi-tensor kernel in
``mamlpp_fast.kernels.lslr_update`` (wrapped as ``torch.ops.mamlpp_fast.lslr_update_triton``),
``aten`` a ``torch._foreach_*`` composition and ``reference`` the textbook per-tensor loop.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _backend

__all__ = ["lslr_update", "lslr_update_backend"]

_OP = "mamlpp_fast::lslr_update"


def lslr_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    lr: Tensor,
    *,
    backend: str | None = None,
) -> list[Tensor]:
    """Apply one LSLR gradient step to the fast weights of all tasks at once.

    Args:
        params: P tensors; ``params[k]`` is ``(B, *s_k)`` (per-task fast weights) or ``(*s_k)``
            (weights shared by all tasks, e.g. the meta-parameters at inner step 0).
        grads: P tensors; ``grads[k]`` is ``(B, *s_k)``, the per-task gradient of ``params[k]``.
        lr: ``(P,)``, the learned rate of each tensor at the current step.
        backend: "auto" (default: ``mamlpp_fast._backend.get_default_backend()``), "cpp", "cuda",
            "triton", "aten" or "reference". ``lslr_update_backend`` reports the choice.

    Returns:
        P new tensors, ``out[k]`` of shape ``(B, *s_k)``: ``params[k] - lr[k] * grads[k]``.
        All inputs must share one device and one dtype (float32 or float64).

    Example:
        >>> theta = [torch.randn(64, 1, 3, 3), torch.randn(64)]
        >>> g = [torch.randn(8, 64, 1, 3, 3), torch.randn(8, 64)]
        >>> fast = lslr_update(theta, g, torch.full((2,), 0.1))
        >>> fast[0].shape
        torch.Size([8, 64, 1, 3, 3])
    """
    params, grads = list(params), list(grads)
    name = lslr_update_backend(params, grads, lr, backend=backend)
    if name in ("cpp", "cuda"):
        return list(torch.ops.mamlpp_fast.lslr_update.default(params, grads, lr))
    if name == "triton":
        return list(_triton_op()(params, grads, lr))
    _check_args(params, grads, lr)
    if name == "aten":
        return _lslr_update_aten(params, grads, lr)
    return _lslr_update_reference(params, grads, lr)


def lslr_update_backend(
    params: Sequence[Tensor], grads: Sequence[Tensor], lr: Tensor, *, backend: str | None = None
) -> str:
    """The backend ``lslr_update(params, grads, lr, backend=backend)`` would run on."""
    return _backend.select_backend("lslr_update", lr.device, backend)


# --- pure-PyTorch paths ---------------------------------------------------------------------------


def _lslr_update_reference(params: list[Tensor], grads: list[Tensor], lr: Tensor) -> list[Tensor]:
    return [p - lr[k] * g for k, (p, g) in enumerate(zip(params, grads))]


def _lslr_update_aten(params: list[Tensor], grads: list[Tensor], lr: Tensor) -> list[Tensor]:
    # Two foreach kernels instead of 2P launches; broadcasting of shared params still works, and
    # the foreach ops have autograd formulas to any order.
    if not params:
        return []
    return list(torch._foreach_sub(params, torch._foreach_mul(grads, list(lr.unbind()))))


# --- validation (mirrors csrc/checks.h: check_lslr_update_args) ----------------------------------


def _check_args(params: Sequence[Tensor], grads: Sequence[Tensor], lr: Tensor) -> None:
    op = "lslr_update"
    torch._check(
        len(params) == len(grads),
        lambda: f"{op}: params and grads must have the same length, got {len(params)} and {len(grads)}",
    )
    torch._check(lr.dim() == 1, lambda: f"{op}: lr must be 1-D, got shape {tuple(lr.shape)}")
    torch._check(
        lr.dtype in (torch.float32, torch.float64),
        lambda: f"{op}: lr must be float32 or float64, got {lr.dtype}",
    )
    torch._check(
        lr.shape[0] == len(params),
        lambda: f"{op}: lr must hold one rate per parameter tensor: expected {len(params)} "
        f"entries, got {lr.shape[0]}",
    )
    batch = None
    for k, (p, g) in enumerate(zip(params, grads)):
        torch._check(
            g.dim() >= 1,
            lambda: f"{op}: grads[{k}] must have a leading task dimension, got shape {tuple(g.shape)}",
        )
        batch = g.shape[0] if batch is None else batch
        torch._check(
            g.shape[0] == batch,
            lambda: f"{op}: grads[{k}] has {g.shape[0]} tasks in dim 0, but grads[0] has {batch}",
        )
        torch._check(
            p.dtype == lr.dtype and g.dtype == lr.dtype,
            lambda: f"{op}: params[{k}], grads[{k}] and lr must share one dtype, got "
            f"{p.dtype}, {g.dtype} and {lr.dtype}",
        )
        torch._check(
            p.device == lr.device and g.device == lr.device,
            lambda: f"{op}: params[{k}], grads[{k}] and lr must be on one device, got "
            f"{p.device}, {g.device} and {lr.device}",
        )
        torch._check(
            p.shape == g.shape or p.shape == g.shape[1:],
            lambda: f"{op}: params[{k}] must have shape [B, *s] or [*s] where grads[{k}] is "
            f"[B, *s] = {list(g.shape)}, got {list(p.shape)}",
        )


def _fake(params: list[Tensor], grads: list[Tensor], lr: Tensor) -> list[Tensor]:
    _check_args(params, grads, lr)
    return [g.new_empty(g.shape) for g in grads]


# --- autograd (shared by the C++/CUDA op and the Triton op) ---------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    params, grads, lr = inputs
    ctx.shared = [p.dim() < g.dim() for p, g in zip(params, grads)]
    # ctx.needs_input_grad is flattened over the list arguments (and its layout is not public), so
    # read requires_grad from the inputs themselves.
    ctx.need = (
        any(p.requires_grad for p in params),
        any(g.requires_grad for g in grads),
        lr.requires_grad,
    )
    # d grads needs lr; d lr needs grads. Save only what the requested gradients use.
    ctx.save_for_backward(*(grads if ctx.need[2] else []), *([lr] if ctx.need[1] else []))


def _backward(ctx, grad_outs: list[Tensor]):
    need_params, need_grads, need_lr = ctx.need
    saved = list(ctx.saved_tensors)
    lr = saved.pop() if need_grads else None
    grads = saved if need_lr else None
    # List arguments need a list back (one None per element when no gradient is wanted), e.g. the
    # first-order inner loop, where grads do not require grad.
    d_params = d_grads = [None] * len(grad_outs)
    d_lr = None
    if need_params:
        d_params = [go.sum(0) if sh else go for go, sh in zip(grad_outs, ctx.shared)]
    if need_grads:
        d_grads = list(torch._foreach_mul(grad_outs, list((-lr).unbind()))) if grad_outs else []
    if need_lr:
        d_lr = -torch.stack([torch.dot(go.reshape(-1), g.reshape(-1)) for go, g in zip(grad_outs, grads)])
    return d_params, d_grads, d_lr


def _register(op) -> None:
    torch.library.register_fake(op, _fake)
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


if _backend.has_extension():
    _register(_OP)


@functools.cache
def _triton_op():
    # A custom_op (opaque to torch.compile) rather than triton_op: the launcher builds a table of
    # raw data pointers, which cannot be traced through fake tensors.
    from ..kernels.lslr_update import lslr_update_forward

    @torch.library.custom_op("mamlpp_fast::lslr_update_triton", mutates_args=())
    def lslr_update_triton(params: list[Tensor], grads: list[Tensor], lr: Tensor) -> list[Tensor]:
        _check_args(params, grads, lr)
        return lslr_update_forward(params, grads, lr)

    _register(lslr_update_triton)
    return lslr_update_triton
