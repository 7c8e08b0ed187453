"""The Triton task_cross_entropy kernels, compiled on a GPU or in Triton's interpreter on the CPU.

Triton decides interpreter-or-compiler when a ``@triton.jit`` function is *defined*, i.e. when
``mamlpp_fast.kernels.task_cross_entropy`` is first imported. So the CPU cases only run in a
process that had ``TRITON_INTERPRET=1`` from the start: ``test_run_interpreted_cases`` re-runs this
file in such a process (from a temporary directory, so the installed package is what gets imported).

Every result is compared against plain PyTorch in float64 on the same logit values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamlpp_fast import _backend
from mamlpp_fast.testing import assert_close, run_interpreted_cases, triton_interpreter_broken

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not _backend.has_triton(), reason="triton is not importable"),
]

# (B, n, N). (3, 600, 5) and (2, 10, 300) span several row blocks of the forward kernel.
SHAPES = [(1, 1, 1), (3, 7, 5), (2, 20, 20), (4, 75, 5), (2, 5, 3), (3, 600, 5), (2, 10, 300)]
# On the GPU each distinct tile shape is one more compile (seconds in gpu_check's short lease): the
# odd sizes, several row blocks, many classes and a large meta-batch.
CUDA_SHAPES = [(1, 1, 1), (3, 7, 5), (2, 20, 20), (3, 600, 5), (64, 100, 20), (8, 75, 1000)]
DTYPES = [torch.float32, torch.float64]
interpreted = pytest.mark.skipif(not _backend.triton_interpret(),
                                 reason="runs inside the TRITON_INTERPRET=1 subprocess")


def make_inputs(shape, device="cpu", dtype=torch.float64, seed=0):
    """Random (logits [B, n, N] in dtype, labels [B, n] int64 in [0, N))."""
    B, n, N = shape
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, n, N, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, N, (B, n), generator=gen)
    return logits.to(device=device, dtype=dtype), labels.to(device)


def formula(logits, labels):
    """(loss, accuracy, lse) in float64 from PyTorch ops; out-of-range labels give NaN losses."""
    z = logits.double()
    B, n, N = z.shape
    valid = (labels >= 0) & (labels < N)
    terms = F.cross_entropy(z.reshape(B * n, N), torch.where(valid, labels, 0).reshape(-1),
                            reduction="none").view(B, n)
    terms = torch.where(valid, terms, torch.full_like(terms, float("nan")))
    accuracy = (z.argmax(-1) == labels).double().mean(1)
    # shifted by the row maximum even when it is infinite (NaN then), as log_softmax does
    top = z.max(-1, keepdim=True).values
    lse = (top + (z - top).exp().sum(-1, keepdim=True).log()).squeeze(-1)
    return terms.mean(1), accuracy, lse


def formula_grad(grad_loss, logits, labels):
    """torch.autograd.grad of sum_b grad_loss[b] * loss[b], in float64 (labels in range)."""
    z = logits.detach().double().requires_grad_()
    loss = formula(z, labels)[0]
    return torch.autograd.grad(loss, z, grad_loss.double())[0]


def assert_close_nan(actual, expected, dtype, msg=""):
    """assert_close, with NaN required exactly where the reference has NaN."""
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{msg}: NaN at {torch.isnan(actual).nonzero()}"
    assert_close(actual[~nan], expected[~nan], dtype=dtype, msg=msg)


def forward(logits, labels):
    from mamlpp_fast.kernels.task_cross_entropy import task_cross_entropy_forward

    out = task_cross_entropy_forward(logits, labels)
    B, n, _ = logits.shape
    for t, size in zip(out, [(B,), (B,), (B, n)]):
        assert t.dtype == logits.dtype and t.device == logits.device and t.shape == size
    return out


def check_forward(device, dtype, shape):
    logits, labels = make_inputs(shape, device, dtype)
    out = forward(logits, labels)
    assert_close(list(out), list(formula(logits, labels)), dtype=dtype,
                 msg=f"forward {dtype} {shape}")
    again = forward(logits, labels)
    assert all(torch.equal(a, b) for a, b in zip(out, again)), "forward is not deterministic"


def check_backward(device, dtype, shape):
    from mamlpp_fast.kernels.task_cross_entropy import task_cross_entropy_backward

    logits, labels = make_inputs(shape, device, dtype)
    gen = torch.Generator().manual_seed(1)
    grad_loss = torch.randn(shape[0], generator=gen, dtype=torch.float64)
    grad_loss = grad_loss.to(device=device, dtype=dtype)
    lse = forward(logits, labels)[2]
    grad = task_cross_entropy_backward(grad_loss, logits, labels, lse)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close(grad, formula_grad(grad_loss, logits, labels), dtype=dtype,
                 msg=f"backward {dtype} {shape}")


def check_ties(device, dtype):
    # Integer logits in {0, 1, 2}: most rows hold tied maxima; the first index wins.
    gen = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 3, (3, 9, 4), generator=gen).to(device=device, dtype=dtype)
    labels = torch.randint(0, 4, (3, 9), generator=gen).to(device)
    logits[0, 0] = torch.tensor([1.0, 3.0, 3.0, 0.0])
    labels[0, 0] = 2  # a tied maximum, but not the first: wrong
    logits[0, 1] = torch.tensor([1.0, 3.0, 3.0, 0.0])
    labels[0, 1] = 1  # the first tied maximum: right
    logits[1, 0] = float("-inf")  # all -inf: argmax 0, lse and the loss of task 1 NaN (as ATen)
    labels[1, 0] = 0
    out = forward(logits, labels)
    expected = formula(logits, labels)
    for a, e in zip(out, expected):
        assert_close_nan(a, e, dtype, msg=f"ties {dtype}")
    assert torch.isnan(out[2][1, 0]) and torch.isnan(out[0][1])
    assert torch.isfinite(out[0][[0, 2]]).all()


def check_nan_row(device, dtype):
    logits, labels = make_inputs((3, 6, 5), device, dtype)
    logits[1, 2, 3] = float("nan")
    logits[1, 2, 1] = float("nan")
    labels[1, 2] = 1  # the first NaN is the argmax (torch.argmax): a right answer
    logits[1, 4, 2] = float("nan")
    labels[1, 4] = 0  # wrong
    out = forward(logits, labels)
    expected = formula(logits, labels)
    assert int(logits[1].argmax(-1)[2]) == 1
    assert torch.isnan(out[0][1]) and torch.isfinite(out[0][[0, 2]]).all()
    for a, e in zip(out, expected):
        assert_close_nan(a, e, dtype, msg=f"NaN row {dtype}")


def check_out_of_range_labels(device, dtype):
    from mamlpp_fast.kernels.task_cross_entropy import task_cross_entropy_backward

    B, n, N = 4, 7, 5
    logits, labels = make_inputs((B, n, N), device, dtype)
    labels[0, 3] = N
    labels[2, 0] = -1
    labels[3, 6] = 10**12  # far outside the tensor: must never be dereferenced
    out = forward(logits, labels)
    expected = formula(logits, labels)
    assert torch.isnan(out[0][[0, 2, 3]]).all() and torch.isfinite(out[0][1])
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[2]).all()
    for a, e in zip(out, expected):
        assert_close_nan(a, e, dtype, msg=f"out-of-range labels {dtype}")
    # backward: no -1 term for an out-of-range label
    grad_loss = torch.linspace(-1.0, 2.0, B, dtype=dtype, device=device)
    grad = task_cross_entropy_backward(grad_loss, logits, labels, out[2])
    z = logits.double()
    valid = ((labels >= 0) & (labels < N)).unsqueeze(-1)
    onehot = F.one_hot(torch.where(valid.squeeze(-1), labels, 0), N).double() * valid
    ref = grad_loss.double().view(B, 1, 1) / n * (torch.softmax(z, -1) - onehot)
    assert_close(grad, ref, dtype=dtype, msg=f"out-of-range labels backward {dtype}")


def formula_double_grad(grad_grad_logits, grad_loss, logits, labels):
    """(grad_grad_loss [B], grad_logits [B, n, N]) in float64: torch.autograd.grad of the backward
    ``grad_loss[b] / n * (softmax(z) - onehot(y))`` (first taken by autograd, with create_graph)
    against ``grad_outputs = grad_grad_logits``. An out-of-range label has no onehot term."""
    z = logits.detach().double().requires_grad_()
    g = grad_loss.detach().double().requires_grad_()
    B, n, N = z.shape
    valid = (labels >= 0) & (labels < N)
    onehot = F.one_hot(torch.where(valid, labels, 0), N).double() * valid.unsqueeze(-1)
    loss = (torch.logsumexp(z, -1) - (onehot * z).sum(-1)).mean(1)
    grad_z = torch.autograd.grad(loss, z, g, create_graph=True)[0]
    expected = g.view(B, 1, 1) / n * (torch.softmax(z, -1) - onehot)
    assert_close(grad_z, expected, dtype=torch.float64, msg="reference backward")
    grad_g, grad_zz = torch.autograd.grad(grad_z, (g, z), grad_grad_logits.double())
    return grad_g.detach(), grad_zz.detach()


def double_backward(grad_grad_logits, grad_loss, logits, labels, lse):
    from mamlpp_fast.kernels.task_cross_entropy import task_cross_entropy_double_backward

    out = task_cross_entropy_double_backward(grad_grad_logits, grad_loss, logits, labels, lse)
    assert isinstance(out, tuple) and len(out) == 2
    for t, size in zip(out, [logits.shape[:1], logits.shape]):
        assert t.dtype == logits.dtype and t.device == logits.device and t.shape == size
    again = task_cross_entropy_double_backward(grad_grad_logits, grad_loss, logits, labels, lse)
    assert all(torch.equal(a, b) for a, b in zip(out, again)), \
        "double backward is not deterministic"
    return out


def double_backward_inputs(logits, seed=3):
    """(grad_grad_logits [B, n, N], non-contiguous; grad_loss [B]) in the logits' dtype/device."""
    B, n, N = logits.shape
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, n, generator=gen, dtype=torch.float64).transpose(1, 2)
    grad_loss = torch.randn(B, generator=gen, dtype=torch.float64)
    return (h.to(device=logits.device, dtype=logits.dtype),
            grad_loss.to(device=logits.device, dtype=logits.dtype))


def check_double_backward(device, dtype, shape):
    logits, labels = make_inputs(shape, device, dtype)
    h, grad_loss = double_backward_inputs(logits)
    lse = forward(logits, labels)[2]
    out = double_backward(h, grad_loss, logits, labels, lse)
    assert_close(list(out), list(formula_double_grad(h, grad_loss, logits, labels)), dtype=dtype,
                 msg=f"double backward {dtype} {shape}")


def check_double_backward_out_of_range(device, dtype):
    B, n, N = 4, 7, 5
    logits, labels = make_inputs((B, n, N), device, dtype)
    labels[0, 3] = N
    labels[2, 0] = -1
    labels[3, 6] = 10**12  # far outside the tensor: must never be dereferenced
    h, grad_loss = double_backward_inputs(logits)
    lse = forward(logits, labels)[2]
    out = double_backward(h, grad_loss, logits, labels, lse)
    assert all(torch.isfinite(t).all() for t in out)
    assert_close(list(out), list(formula_double_grad(h, grad_loss, logits, labels)), dtype=dtype,
                 msg=f"out-of-range labels double backward {dtype}")


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_interpreter(dtype, shape):
    check_forward("cpu", dtype, shape)
    check_backward("cpu", dtype, shape)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_double_backward_interpreter(dtype, shape):
    check_double_backward("cpu", dtype, shape)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_backward_out_of_range_labels_interpreter(dtype):
    check_double_backward_out_of_range("cpu", dtype)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_interpreter(dtype):
    check_ties("cpu", dtype)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_row_interpreter(dtype):
    check_nan_row("cpu", dtype)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_of_range_labels_interpreter(dtype):
    check_out_of_range_labels("cpu", dtype)


def check_op_gradients(device):
    # The Triton kernels under the op's autograd: gradcheck and gradgradcheck (gradgradcheck's
    # analytical second derivatives run the Triton double backward).
    from mamlpp_fast.ops import task_cross_entropy

    logits, labels = make_inputs((2, 5, 3), device)
    logits.requires_grad_()
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64, device=device)
    fn = lambda z: task_cross_entropy(z, labels, backend="triton")[0] * weights  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))
    assert torch.autograd.gradgradcheck(fn, (logits,))


@interpreted
def test_op_gradients_interpreter():
    check_op_gradients("cpu")


@interpreted
def test_too_many_classes_interpreter():
    from mamlpp_fast.kernels.task_cross_entropy import task_cross_entropy_forward

    logits, labels = make_inputs((1, 2, 1025))
    with pytest.raises(ValueError, match="1025"):
        task_cross_entropy_forward(logits, labels)


@pytest.mark.skipif(_backend.triton_interpret(), reason="this is the driver of the interpreter run")
@pytest.mark.skipif(bool(triton_interpreter_broken()), reason=triton_interpreter_broken())
def test_run_interpreted_cases(tmp_path):
    run_interpreted_cases(__file__, tmp_path)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_forward_backward_cuda(dtype, shape):
    check_forward("cuda", dtype, shape)
    check_backward("cuda", dtype, shape)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_double_backward_cuda(dtype, shape):
    check_double_backward("cuda", dtype, shape)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_rows_cuda(dtype):
    check_ties("cuda", dtype)
    check_nan_row("cuda", dtype)
    check_out_of_range_labels("cuda", dtype)
    check_double_backward_out_of_range("cuda", dtype)


@pytest.mark.cuda
def test_op_gradients_cuda():
    check_op_gradients("cuda")
