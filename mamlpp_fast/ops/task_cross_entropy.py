"""``task_cross_entropy``: each task's mean cross-entropy and accuracy in one op.

MAML++ takes a loss per task at every inner step (support set) and target pass (query set), and
the accuracy of the last target pass. For logits ``z`` of shape ``(B, n, N)`` (B tasks, n samples,
N classes) and labels ``y`` of shape ``(B, n)``:

    lse[b, i]     = log sum_c exp(z[b, i, c])
    loss[b]       = 1/n sum_i (lse[b, i] - z[b, i, y[b, i]])
    accuracy[b]   = 1/n #{i : argmax_c z[b, i, c] == y[b, i]}     (first maximum, as torch.argmax)

Three registered ops (schemas in ``csrc/registration.cpp``, kernels in ``csrc/cpu``,
``csrc/cuda`` and ``kernels/task_cross_entropy.py``):

* ``task_cross_entropy_forward(logits, labels) -> (loss, accuracy, lse)``; ``accuracy`` and the
  row log-sum-exp ``lse`` carry no gradient (``lse`` is saved for the backward);
* ``task_cross_entropy_backward(grad_loss, logits, labels, lse) -> grad_logits``, with
  ``grad_logits = grad_loss[b] / n * (p - onehot(y))`` and ``p = exp(z - lse)``;
* ``task_cross_entropy_double_backward(grad_grad_logits, grad_loss, logits, labels, lse)
  -> (grad_grad_loss, grad_logits)``: the backward op's derivative, which second-order MAML's
  meta-gradient takes. With ``s = grad_loss[b] / n`` and incoming ``h = grad_grad_logits``:

      d grad_loss[b] = 1/n sum_{i,c} h (p - onehot(y))
      d logits       = s p (h - sum_c h p)

  (the softmax Jacobian applied to ``s h``; ``lse`` gets none: its dependence on the logits is
  inside ``p``, which this formula differentiates in full).

When a derivative of that derivative is being recorded (``create_graph=True`` in the backward
pass that reaches the backward op), the same formulas run as differentiable torch ops instead, so
every order is available.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from ..reference.ops import task_cross_entropy_reference

__all__ = ["task_cross_entropy", "task_cross_entropy_backend"]

_FWD = "mamlpp_fast::task_cross_entropy_forward"
_BWD = "mamlpp_fast::task_cross_entropy_backward"
_DBWD = "mamlpp_fast::task_cross_entropy_double_backward"
_OP_NAME = "task_cross_entropy"
_FLOATS = (torch.float32, torch.float64)


def task_cross_entropy(logits: Tensor, labels: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Each task's mean cross-entropy (differentiable to any order) and accuracy.

    Args:
        logits: ``(B, n, N)`` float32 or float64: n samples of each of B tasks, N classes.
        labels: ``(B, n)`` int64 class indices in ``[0, N)``.
        backend: "auto" (default: ``mamlpp_fast._backend.get_default_backend()``), "cpp", "cuda",
            "triton", "aten" (``F.cross_entropy`` + ``argmax``) or "reference".

    Returns:
        ``(loss, accuracy)``, each ``(B,)`` in the logits' dtype. ``accuracy`` has no gradient;
        ties go to the first maximal logit, as ``torch.argmax``. A label outside ``[0, N)`` raises
        on the CPU; on the GPU the fused kernels cannot raise without synchronising, so that
        task's loss is NaN instead (ATen's cross-entropy stops the device with an assert).

    Example:
        >>> logits = torch.randn(8, 20, 5)               # 8 tasks x 20 queries, 5-way
        >>> labels = torch.randint(0, 5, (8, 20))
        >>> loss, accuracy = task_cross_entropy(logits, labels)
        >>> loss.shape, accuracy.shape
        (torch.Size([8]), torch.Size([8]))
    """
    name = task_cross_entropy_backend(logits, backend=backend)
    if name in ("cpp", "cuda"):
        loss, accuracy, _ = torch.ops.mamlpp_fast.task_cross_entropy_forward.default(logits, labels)
        return loss, accuracy
    if name == "triton":  # the custom op checks its arguments (and so does its fake kernel)
        loss, accuracy, _ = _triton_ops()[0](logits, labels)
        return loss, accuracy
    _check_args(logits, labels)
    if name == "reference":
        return task_cross_entropy_reference(logits, labels)
    return _task_cross_entropy_aten(logits, labels)


def task_cross_entropy_backend(logits: Tensor, *, backend: str | None = None) -> str:
    """The backend ``task_cross_entropy(logits, ..., backend=backend)`` would run on."""
    requested = backend if backend is not None else _backend.get_default_backend()
    name = _backend.select_backend(_OP_NAME, logits.device, requested)
    if name in ("cpp", "cuda") and not _HAS_OP:
        # An _C built before this op existed: fall back rather than fail.
        if requested == "auto":
            return "aten"
        raise RuntimeError(f"{_OP_NAME}: backend {name!r} needs torch.ops.{_FWD.replace('::', '.')}, "
                           f"which the loaded mamlpp_fast._C lacks; reinstall the package")
    return name


def _task_cross_entropy_aten(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    b, n, classes = logits.shape
    losses = F.cross_entropy(logits.reshape(b * n, classes), labels.reshape(b * n), reduction="none")
    accuracy = logits.detach().argmax(dim=2).eq(labels).to(logits.dtype).mean(dim=1)
    return losses.view(b, n).mean(dim=1), accuracy


# --- validation (mirrors csrc/checks.h: check_task_cross_entropy_args) ---------------------------


def _check_args(logits: Tensor, labels: Tensor, op: str = _OP_NAME) -> None:
    torch._check(logits.dim() == 3, lambda: f"{op}: logits must be 3-D, got shape {tuple(logits.shape)}")
    torch._check(logits.dtype in _FLOATS, lambda: f"{op}: logits must be float32 or float64, got {logits.dtype}")
    torch._check(
        logits.shape[1] >= 1 and logits.shape[2] >= 1,
        lambda: f"{op}: logits must hold at least one sample and one class per task, got shape "
        f"{tuple(logits.shape)}",
    )
    torch._check(labels.dtype == torch.int64, lambda: f"{op}: labels must be int64, got {labels.dtype}")
    torch._check(
        labels.dim() == 2 and tuple(labels.shape) == tuple(logits.shape[:2]),
        lambda: f"{op}: labels must have shape [B, n] = {list(logits.shape[:2])} to match logits "
        f"[B, n, N], got {list(labels.shape)}",
    )
    torch._check(
        labels.device == logits.device,
        lambda: f"{op}: logits and labels must be on one device, got {logits.device} and {labels.device}",
    )


def _check_backward_args(grad_loss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor) -> None:
    op = "task_cross_entropy_backward"
    _check_args(logits, labels, op)
    b, n = logits.shape[:2]
    torch._check(tuple(grad_loss.shape) == (b,),
                 lambda: f"{op}: grad_loss must have shape [B] = [{b}], got {list(grad_loss.shape)}")
    torch._check(tuple(lse.shape) == (b, n),
                 lambda: f"{op}: lse must have shape [B, n] = [{b}, {n}], got {list(lse.shape)}")
    torch._check(
        grad_loss.dtype == logits.dtype and lse.dtype == logits.dtype,
        lambda: f"{op}: grad_loss, logits and lse must share one dtype, got {grad_loss.dtype}, "
        f"{logits.dtype} and {lse.dtype}",
    )


def _check_double_backward_args(grad_grad_logits: Tensor, grad_loss: Tensor, logits: Tensor, labels: Tensor,
                                lse: Tensor) -> None:
    op = "task_cross_entropy_double_backward"
    _check_backward_args(grad_loss, logits, labels, lse)
    torch._check(grad_grad_logits.shape == logits.shape,
                 lambda: f"{op}: grad_grad_logits must have the shape of logits {list(logits.shape)}, got "
                 f"{list(grad_grad_logits.shape)}")
    torch._check(grad_grad_logits.dtype == logits.dtype,
                 lambda: f"{op}: grad_grad_logits and logits must share one dtype, got {grad_grad_logits.dtype} "
                 f"and {logits.dtype}")


def _forward_fake(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _check_args(logits, labels)
    b, n = logits.shape[:2]
    return logits.new_empty((b,)), logits.new_empty((b,)), logits.new_empty((b, n))


def _backward_fake(grad_loss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor) -> Tensor:
    _check_backward_args(grad_loss, logits, labels, lse)
    return logits.new_empty(logits.shape)


def _double_backward_fake(grad_grad_logits: Tensor, grad_loss: Tensor, logits: Tensor, labels: Tensor,
                          lse: Tensor) -> tuple[Tensor, Tensor]:
    _check_double_backward_args(grad_grad_logits, grad_loss, logits, labels, lse)
    return logits.new_empty(grad_loss.shape), logits.new_empty(logits.shape)


# --- autograd (shared by the compiled ops and the Triton ops) ------------------------------------
# forward op -> its backward calls the matching backward op;
# backward op -> its backward calls the matching double-backward op, or, when that derivative is
#                itself being differentiated, runs the torch composition of the module docstring;
# double-backward op: no autograd of its own (the composition covers higher orders).


def _forward_setup_context(ctx, inputs, output) -> None:
    logits, labels = inputs
    _, accuracy, lse = output
    ctx.mark_non_differentiable(accuracy, lse)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(logits, labels, lse)


def _make_forward_backward(backward_op):
    def forward_backward(ctx, grad_loss, _grad_accuracy, _grad_lse):
        if not ctx.needs_input_grad[0]:
            return None, None
        logits, labels, lse = ctx.saved_tensors
        return backward_op(grad_loss.contiguous(), logits, labels, lse), None

    return forward_backward


def _backward_setup_context(ctx, inputs, output) -> None:
    grad_loss, logits, labels, lse = inputs
    if any(ctx.needs_input_grad[:2]):
        ctx.save_for_backward(grad_loss, logits, labels, lse)


def _make_backward_backward(double_backward_op):
    def backward_backward(ctx, grad_grad_logits):
        grad_loss, logits, labels, lse = ctx.saved_tensors
        need_grad_loss, need_logits = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: a third derivative may follow
            return _double_backward_composed(grad_grad_logits, grad_loss, logits, labels, need_grad_loss, need_logits)
        d_grad_loss, d_logits = double_backward_op(grad_grad_logits.contiguous(), grad_loss, logits, labels, lse)
        return (d_grad_loss if need_grad_loss else None), (d_logits if need_logits else None), None, None

    return backward_backward


def _double_backward_composed(grad_grad_logits, grad_loss, logits, labels, need_grad_loss, need_logits):
    """The double-backward formulas as differentiable torch ops (recomputing p from the logits)."""
    n = logits.shape[1]
    p = torch.softmax(logits, dim=2)
    d_grad_loss = d_logits = None
    if need_grad_loss:
        # An out-of-range label (a NaN loss on the GPU backends) has no one-hot term, as in the kernels.
        classes = logits.shape[2]
        valid = (labels >= 0) & (labels < classes)
        onehot = F.one_hot(labels.where(valid, 0), classes).to(logits.dtype) * valid.unsqueeze(2)
        d_grad_loss = (grad_grad_logits * (p - onehot)).sum(dim=(1, 2)) / n
    if need_logits:
        weighted = grad_grad_logits * (grad_loss / n).view(-1, 1, 1)
        d_logits = p * (weighted - (weighted * p).sum(dim=2, keepdim=True))
    return d_grad_loss, d_logits, None, None


def _register(forward_op, backward_op, double_backward_op) -> None:
    torch.library.register_fake(forward_op, _forward_fake)
    torch.library.register_fake(backward_op, _backward_fake)
    torch.library.register_fake(double_backward_op, _double_backward_fake)
    call = lambda op: op if callable(op) else _op_callable(op)  # noqa: E731
    torch.library.register_autograd(forward_op, _make_forward_backward(call(backward_op)),
                                    setup_context=_forward_setup_context)
    torch.library.register_autograd(backward_op, _make_backward_backward(call(double_backward_op)),
                                    setup_context=_backward_setup_context)


def _op_callable(qualified_name: str):
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


# Decided once at import (the library is loaded by mamlpp_fast._backend before this module).
_HAS_OP = _backend.has_extension() and hasattr(torch.ops.mamlpp_fast, "task_cross_entropy_forward")
if _HAS_OP:
    _register(_FWD, _BWD, _DBWD)


@functools.cache
def _triton_ops():
    # custom_ops wrapping the Triton launchers, so that they get the same autograd and fake kernels.
    from ..kernels import task_cross_entropy as kernels

    @torch.library.custom_op("mamlpp_fast::task_cross_entropy_forward_triton", mutates_args=())
    def forward_triton(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _check_args(logits, labels)
        return kernels.task_cross_entropy_forward(logits, labels)

    @torch.library.custom_op("mamlpp_fast::task_cross_entropy_backward_triton", mutates_args=())
    def backward_triton(grad_loss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor) -> Tensor:
        _check_backward_args(grad_loss, logits, labels, lse)
        return kernels.task_cross_entropy_backward(grad_loss, logits, labels, lse)

    @torch.library.custom_op("mamlpp_fast::task_cross_entropy_double_backward_triton", mutates_args=())
    def double_backward_triton(grad_grad_logits: Tensor, grad_loss: Tensor, logits: Tensor, labels: Tensor,
                               lse: Tensor) -> tuple[Tensor, Tensor]:
        _check_double_backward_args(grad_grad_logits, grad_loss, logits, labels, lse)
        return kernels.task_cross_entropy_double_backward(grad_grad_logits, grad_loss, logits, labels, lse)

    _register(forward_triton, backward_triton, double_backward_triton)
    return forward_triton, backward_triton, double_backward_triton
