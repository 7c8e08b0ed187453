"""mamlpp_fast.ops.task_cross_entropy against F.cross_entropy and argmax, with gradients to third
order (second-order MAML differentiates the inner-loop gradient of this loss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamlpp_fast import _backend
from mamlpp_fast.ops import task_cross_entropy, task_cross_entropy_backend
from mamlpp_fast.testing import assert_close, op_backends, run_without_extension
from torch.utils._python_dispatch import TorchDispatchMode

needs_ext = pytest.mark.skipif(not _backend.has_extension(), reason="compiled extension not loaded")

# (B, n, N): Omniglot 20w1s support/target, mini-ImageNet 5w5s target, and odd sizes.
# (3, 300, 5): more rows per task than a CUDA block has threads; (2, 6, 1000): many classes.
SHAPES = [(8, 20, 20), (2, 75, 5), (3, 7, 5), (1, 1, 1), (4, 5, 3), (2, 13, 37), (3, 300, 5), (2, 6, 1000)]


def make_inputs(shape, device="cpu", dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    b, n, classes = shape
    logits = (3 * torch.randn(b, n, classes, generator=gen, dtype=torch.float64)).to(device, dtype)
    labels = torch.randint(0, classes, (b, n), generator=gen).to(device)
    return logits.requires_grad_(requires_grad), labels


def formula(logits, labels):
    """The official per-task loss: F.cross_entropy over a task's samples, and argmax accuracy."""
    b, n, classes = logits.shape
    losses = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1), reduction="none").view(b, n)
    accuracy = (logits.argmax(dim=2) == labels).to(logits.dtype).mean(dim=1)
    return losses.mean(dim=1), accuracy


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_cross_entropy_and_argmax(device, shape):
    logits, labels = make_inputs(shape, device)
    loss_ref, acc_ref = formula(logits, labels)
    for backend in op_backends(device):
        loss, accuracy = task_cross_entropy(logits, labels, backend=backend)
        assert loss.shape == accuracy.shape == (shape[0],) and loss.dtype == accuracy.dtype == logits.dtype
        assert_close(loss, loss_ref, msg=f"loss, backend={backend}")
        assert torch.equal(accuracy, acc_ref), f"accuracy, backend={backend}"


def test_float32_within_tolerance_of_float64(device):
    logits64, labels = make_inputs((8, 20, 20), device, requires_grad=True)
    loss64, _ = formula(logits64, labels)
    (grad64,) = torch.autograd.grad(loss64.sum(), logits64)
    for backend in op_backends(device):
        logits32 = logits64.detach().float().requires_grad_()
        loss32, acc32 = task_cross_entropy(logits32, labels, backend=backend)
        (grad32,) = torch.autograd.grad(loss32.sum(), logits32)
        assert_close(loss32, loss64, dtype=torch.float32, msg=f"loss, backend={backend}")
        assert_close(grad32, grad64, dtype=torch.float32, msg=f"grad, backend={backend}")


def test_ties_go_to_the_first_maximum_and_nan_rows_to_their_first_nan(device):
    logits = torch.tensor([[[1.0, 3.0, 3.0], [2.0, 2.0, 0.0], [0.0, float("nan"), float("nan")]],
                           [[0.0, 0.0, 0.0], [5.0, 1.0, 5.0], [1.0, 2.0, 3.0]]], dtype=torch.float64,
                          device=device)
    labels = torch.tensor([[1, 1, 1], [0, 2, 2]], device=device)
    expected_acc = (logits.argmax(dim=2) == labels).double().mean(dim=1)  # [2/3, 2/3]
    for backend in op_backends(device):
        loss, accuracy = task_cross_entropy(logits, labels, backend=backend)
        assert torch.equal(accuracy, expected_acc), backend
        assert loss[0].isnan() and loss[1].isfinite(), backend  # a NaN row spoils its task only


def test_infinite_logits_follow_aten(device):
    logits = torch.tensor([[[float("inf"), 0.0], [1.0, 2.0]], [[float("-inf"), 0.0], [3.0, 1.0]]],
                          dtype=torch.float64, device=device)
    labels = torch.tensor([[1, 1], [1, 0]], device=device)
    loss_ref, acc_ref = formula(logits, labels)
    for backend in op_backends(device):
        loss, accuracy = task_cross_entropy(logits, labels, backend=backend)
        torch.testing.assert_close(loss, loss_ref, equal_nan=True, msg=backend)  # [NaN, finite]
        assert torch.equal(accuracy, acc_ref), backend


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 4, 1)], ids=str)
def test_gradcheck_and_gradgradcheck(device, shape):
    for backend in op_backends(device):
        logits, labels = make_inputs(shape, device, seed=1, requires_grad=True)
        weights = torch.randn(shape[0], dtype=torch.float64, device=device)

        def fn(z, backend=backend):
            return task_cross_entropy(z, labels, backend=backend)[0] * weights

        assert torch.autograd.gradcheck(fn, (logits,)), backend
        assert torch.autograd.gradgradcheck(fn, (logits,)), backend


def test_derivatives_to_third_order_match_the_formula(device):
    # MAML's use: the inner gradient is taken with create_graph, and the meta-gradient differentiates
    # it; a third derivative checks that the double backward is itself differentiable.
    shape = (4, 20, 5)
    for backend in op_backends(device):
        results = []
        for impl in (lambda z, y: formula(z, y)[0], lambda z, y: task_cross_entropy(z, y, backend=backend)[0]):
            logits, labels = make_inputs(shape, device, seed=2, requires_grad=True)
            loss = (impl(logits, labels) * torch.arange(1, 5, device=device)).sum()
            (first,) = torch.autograd.grad(loss, logits, create_graph=True)
            (second,) = torch.autograd.grad((first.sin() * logits).sum(), logits, create_graph=True)
            (third,) = torch.autograd.grad(second.square().sum(), logits)
            results.append((first, second, third))
        for order, (actual, expected) in enumerate(zip(results[1], results[0]), start=1):
            assert_close(actual, expected, msg=f"derivative {order}, backend={backend}")


def test_gradient_of_the_backward_reaches_grad_loss(device):
    # In MAML the backward op's grad_loss input carries the MSL weights' path: the double backward
    # must return its gradient, not only the logits'.
    logits, labels = make_inputs((3, 7, 5), device, requires_grad=True)
    for backend in op_backends(device):
        weights = torch.rand(3, dtype=torch.float64, device=device, requires_grad=True)
        loss = (task_cross_entropy(logits, labels, backend=backend)[0] * weights).sum()
        (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
        got = torch.autograd.grad(grad.cos().sum(), weights)[0]
        loss_ref = (formula(logits, labels)[0] * weights).sum()
        (grad_ref,) = torch.autograd.grad(loss_ref, logits, create_graph=True)
        expected = torch.autograd.grad(grad_ref.cos().sum(), weights)[0]
        assert_close(got, expected, msg=backend)


class _OpLog(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("create_graph", [False, True], ids=["meta_backward", "recorded"])
def test_second_derivatives_and_which_double_backward_runs(device, create_graph):
    # The meta-backward of second-order MAML: the inner gradient was taken with create_graph, the
    # outer one is not; there the fused double-backward op runs (w.r.t. logits and grad_loss). When
    # the outer one records a graph too, the torch composition runs instead (any order).
    for backend in op_backends(device):
        results = []
        for impl in (lambda z, y: formula(z, y)[0], lambda z, y: task_cross_entropy(z, y, backend=backend)[0]):
            logits, labels = make_inputs((4, 20, 5), device, seed=3, requires_grad=True)
            weights = torch.linspace(0.5, 2.0, 4, dtype=torch.float64, device=device).requires_grad_()
            (first,) = torch.autograd.grad((impl(logits, labels) * weights).sum(), logits, create_graph=True)
            with _OpLog() as log:
                results.append(torch.autograd.grad((first.sin() * logits).sum(), (logits, weights),
                                                   create_graph=create_graph))
        assert_close(list(results[1]), list(results[0]), msg=f"backend={backend}")
        fused = any("task_cross_entropy_double_backward" in name for name in log.names)
        if backend in ("cpp", "cuda", "triton"):
            assert fused != create_graph, f"backend={backend}: fused double backward ran: {fused}"


def test_accuracy_has_no_gradient_and_non_contiguous_logits_work(device):
    logits, labels = make_inputs((3, 6, 4), device, requires_grad=True)
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not strided.is_contiguous()
    for backend in op_backends(device):
        loss, accuracy = task_cross_entropy(strided, labels, backend=backend)
        assert not accuracy.requires_grad
        assert_close(loss, formula(logits, labels)[0], msg=backend)


@needs_ext
def test_opcheck(device):
    for requires_grad in (False, True):
        logits, labels = make_inputs((3, 7, 5), device, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.mamlpp_fast.task_cross_entropy_forward.default, (logits, labels))
        _, _, lse = torch.ops.mamlpp_fast.task_cross_entropy_forward.default(logits.detach(), labels)
        grad_loss = torch.randn(3, dtype=torch.float64, device=device, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.mamlpp_fast.task_cross_entropy_backward.default,
                              (grad_loss, logits, labels, lse))
        grad_grad_logits = torch.randn_like(logits.detach())
        torch.library.opcheck(torch.ops.mamlpp_fast.task_cross_entropy_double_backward.default,
                              (grad_grad_logits, grad_loss.detach(), logits.detach(), labels, lse))


def test_torch_compile_fullgraph():
    logits, labels = make_inputs((3, 7, 5), dtype=torch.float32)
    compiled = torch.compile(lambda z, y: task_cross_entropy(z, y), fullgraph=True, backend="eager")
    loss, accuracy = compiled(logits, labels)
    loss_ref, acc_ref = formula(logits, labels)
    assert_close(loss, loss_ref)
    assert torch.equal(accuracy, acc_ref)


BAD_INPUTS = [
    # (description, mutate(logits, labels) -> (logits, labels), message fragment)
    ("logits 2-D", lambda z, y: (z[0], y), "logits must be 3-D"),
    ("logits int", lambda z, y: (z.long(), y), "logits must be float32 or float64"),
    ("labels int32", lambda z, y: (z, y.int()), "labels must be int64"),
    ("labels shape", lambda z, y: (z, y[:, :3]), "labels must have shape [B, n] = [3, 7]"),
    ("no samples", lambda z, y: (z[:, :0], y[:, :0]), "at least one sample and one class"),
]


@pytest.mark.parametrize("name,mutate,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_name_the_argument(name, mutate, message):
    bad = mutate(*make_inputs((3, 7, 5)))
    for backend in ["aten", "reference", *(["cpp"] if _backend.has_extension() else [])]:
        with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            task_cross_entropy(*bad, backend=backend)


@needs_ext
def test_out_of_range_labels_raise_on_the_cpu():
    logits, labels = make_inputs((2, 4, 5))
    labels[1, 2] = 5
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 5\).*got 5 at flat position 6"):
        task_cross_entropy(logits, labels, backend="cpp")
    labels[1, 2] = -1
    with pytest.raises(RuntimeError, match="got -1"):
        task_cross_entropy(logits, labels, backend="cpp")


def test_backend_choice_is_observable_and_overridable():
    logits, _ = make_inputs((2, 3, 4))
    assert task_cross_entropy_backend(logits) == ("cpp" if _backend.has_extension() else "aten")
    assert task_cross_entropy_backend(logits, backend="reference") == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        task_cross_entropy_backend(logits, backend="fortran")
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
        task_cross_entropy_backend(logits, backend="cuda")


def test_fallback_without_extension(tmp_path):
    """With MAMLPP_FAST_DISABLE_EXT=1 the op runs (and differentiates) on the pure-torch path."""
    script = """
        import torch
        from mamlpp_fast import _backend
        from mamlpp_fast.ops import task_cross_entropy, task_cross_entropy_backend
        assert not _backend.has_extension()
        z = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 5, (3, 7))
        assert task_cross_entropy_backend(z) == "aten"
        loss, accuracy = task_cross_entropy(z, y)
        ref = torch.nn.functional.cross_entropy(z.reshape(-1, 5), y.reshape(-1), reduction="none")
        assert torch.allclose(loss, ref.view(3, 7).mean(1))
        assert torch.autograd.gradgradcheck(lambda z: task_cross_entropy(z, y)[0], (z,))
        print("fallback ok")
        """
    assert "fallback ok" in run_without_extension(script, tmp_path)


@pytest.mark.cuda
def test_out_of_range_labels_on_the_gpu_give_a_nan_loss_without_stopping_the_device():
    # The GPU kernels cannot raise without a host sync: that task's loss is NaN, the row counts as
    # wrong, and neither derivative reads past the row (no one-hot term), on every order.
    logits, labels = make_inputs((3, 7, 5), "cuda", requires_grad=True)
    labels[1, 2] = 5
    for backend in [b for b in op_backends("cuda") if b in ("cuda", "triton")]:
        loss, accuracy = task_cross_entropy(logits, labels, backend=backend)
        assert loss[1].isnan() and loss[[0, 2]].isfinite().all(), backend
        assert accuracy.isfinite().all(), backend
        weights = torch.ones(3, dtype=torch.float64, device="cuda", requires_grad=True)
        for create_graph in (False, True):
            (first,) = torch.autograd.grad((loss * weights).sum(), logits, create_graph=True)
            second = torch.autograd.grad(first.square().sum(), (logits, weights), create_graph=create_graph)
            assert first[[0, 2]].isfinite().all() and all(t[[0, 2]].isfinite().all() for t in second), backend
        torch.cuda.synchronize()
