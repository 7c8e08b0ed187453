"""The Triton lslr_update kernel, compiled on a GPU or in Triton's interpreter on the CPU.

Triton decides interpreter-or-compiler when a ``@triton.jit`` function is *defined*, i.e. when
``mamlpp_fast.kernels.lslr_update`` is first imported. So the CPU cases only run in a process that
had ``TRITON_INTERPRET=1`` from the start: ``test_run_interpreted_cases`` re-runs this file in such
a process (from a temporary directory, so the installed package is what gets imported).
"""

from __future__ import annotations

import pytest
import torch

from mamlpp_fast import _backend
from mamlpp_fast.testing import (assert_close, lslr_update_inputs, run_interpreted_cases,
                                 triton_interpreter_broken)

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not _backend.has_triton(), reason="triton is not importable"),
]

SHAPES = [(3, 5, 7), (1,), (2, 1, 3, 3), (5,)]
interpreted = pytest.mark.skipif(not _backend.triton_interpret(),
                                 reason="runs inside the TRITON_INTERPRET=1 subprocess")


def formula(params, grads, lr):
    return [p - lr[k] * g for k, (p, g) in enumerate(zip(params, grads))]


def check_forward(device, dtype, shared, batch):
    from mamlpp_fast.kernels.lslr_update import lslr_update_forward

    params, grads, lr = lslr_update_inputs(SHAPES, batch, shared=shared, device=device, dtype=dtype)
    out = lslr_update_forward(params, grads, lr)
    ref = formula(*lslr_update_inputs(SHAPES, batch, shared=shared, device=device))
    assert_close(out, ref, dtype=dtype, msg=f"triton {dtype} shared={shared}")


def check_op_gradients(device):
    from mamlpp_fast.ops import lslr_update

    # Small shapes and fast_mode: every forward evaluation is a (slow, when interpreted) launch.
    params, grads, lr = lslr_update_inputs([(2, 3), (1,), (3,)], 2, shared=[True, False, True],
                                           device=device, requires_grad=True)
    fn = lambda lr, *t: tuple(lslr_update(list(t[:3]), list(t[3:]), lr, backend="triton"))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (lr, *params, *grads), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (lr, *params, *grads), fast_mode=True)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_interpreter(dtype, shared, batch):
    check_forward("cpu", dtype, shared, batch)


@interpreted
def test_gradients_interpreter():
    check_op_gradients("cpu")


@interpreted
def test_empty_and_large_tensor_interpreter():
    from mamlpp_fast.kernels.lslr_update import lslr_update_forward

    # one tensor spans several blocks (grid-stride loop) next to an empty one
    params, grads, lr = lslr_update_inputs([(3000,), (0,), (2,)], 2, shared=True)
    assert_close(lslr_update_forward(params, grads, lr), formula(params, grads, lr))


@pytest.mark.skipif(_backend.triton_interpret(), reason="this is the driver of the interpreter run")
@pytest.mark.skipif(bool(triton_interpreter_broken()), reason=triton_interpreter_broken())
def test_run_interpreted_cases(tmp_path):
    run_interpreted_cases(__file__, tmp_path)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
def test_forward_cuda(dtype, shared):
    check_forward("cuda", dtype, shared, 4)


@pytest.mark.cuda
def test_gradients_cuda():
    check_op_gradients("cuda")
