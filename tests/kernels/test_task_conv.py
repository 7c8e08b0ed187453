"""The Triton task_conv kernels (implicit GEMM, task index in the grid), compiled on a GPU or in
Triton's interpreter on the CPU, against the grouped convolution: forward, both gradients, and
the double backward that second-order MAML needs (gradcheck / gradgradcheck in float64).

As in test_lslr_update.py, the interpreter cases run in a subprocess started with
``TRITON_INTERPRET=1`` (Triton decides interpreter-or-compiler when a kernel is defined).
"""

from __future__ import annotations

import pytest
import torch

from mamlpp_fast import _backend
from mamlpp_fast.testing import run_interpreted_cases, triton_interpreter_broken
from mamlpp_fast.testing import task_conv_inputs as inputs

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not _backend.has_triton(), reason="triton is not importable"),
]
interpreted = pytest.mark.skipif(not _backend.triton_interpret(),
                                 reason="runs inside the TRITON_INTERPRET=1 subprocess")

# (n images, B tasks, C_in, C_out, H, W): odd sizes, a 1-channel first layer, more channels than
# one 64-wide tile, and H*W not a multiple of the 64-pixel tile.
SHAPES = [(2, 2, 1, 4, 5, 5), (3, 3, 2, 3, 7, 6), (1, 1, 17, 70, 3, 3), (5, 2, 3, 5, 28, 28)]



def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def check_against_grouped(device, shape, dtype=torch.float64, rtol=1e-12):
    from mamlpp_fast.ops import task_conv

    x, weight, bias = inputs(*shape, device=device, dtype=dtype)
    out = task_conv(x, weight, bias, strategy="triton")
    ref = task_conv(*(t.double() for t in (x, weight, bias)), strategy="grouped")
    assert out.dtype == dtype and out.shape == ref.shape
    assert relative_error(out.double(), ref) < rtol
    cot = torch.randn(ref.shape, dtype=torch.float64, device=device)
    grads = torch.autograd.grad((out * cot.to(dtype)).sum(), (x, weight, bias))
    refs = torch.autograd.grad((ref * cot).sum(), (x, weight, bias))
    for name, g, r in zip(("x", "weight", "bias"), grads, refs):
        assert relative_error(g.double(), r) < rtol, name


def check_second_order(device, shape=(2, 2, 2, 3, 4, 5), fast_mode=False):
    from mamlpp_fast.ops import task_conv

    x, weight, bias = inputs(*shape, device=device)
    fn = lambda *a: task_conv(*a, strategy="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias), fast_mode=fast_mode)
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias), fast_mode=fast_mode)


@interpreted
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_matches_grouped_interpreter(shape):
    check_against_grouped("cpu", shape)


def check_weight_grad_splits(device, shape, splits, dtype=torch.float64, rtol=1e-12):
    """The chunked pixel reduction of the weight gradient, forced to each of `splits` chunks,
    against the grouped convolution's weight gradient."""
    from mamlpp_fast.kernels.task_conv import task_conv_weight_grad
    from mamlpp_fast.ops import task_conv

    n, num_tasks, _, c_out, h, w = shape
    x, weight, bias = inputs(*shape, device=device, dtype=dtype)
    grad_out = torch.randn(n, num_tasks * c_out, h, w, dtype=dtype, device=device)
    expected = torch.autograd.grad((task_conv(x, weight, bias, strategy="grouped") * grad_out).sum(), weight)[0]
    for split in splits:
        actual = task_conv_weight_grad(x.detach(), grad_out, num_tasks, split=split)
        assert actual.shape == expected.shape
        assert relative_error(actual, expected) < rtol, split


@interpreted
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1]])
def test_weight_grad_split_interpreter(shape):
    # 1 chunk, uneven chunks, and more chunks requested than there are pixel tiles.
    check_weight_grad_splits("cpu", shape, splits=(1, 2, 3, 1000))


@pytest.mark.parametrize("programs,pixels,multiprocessors", [
    (8, 15680, 132),   # Omniglot's 1-channel first layer, B=8, on an H200
    (72, 3920, 132),   # Omniglot 64->64 at 14x14
    (72, 980, 132),    # ... at 7x7
    (1000, 100, 132),  # already enough programs
    (1, 1, 1), (3, 17, 1), (1, 10**6, 200),
])
def test_weight_grad_split_covers_every_pixel_once(programs, pixels, multiprocessors):
    from mamlpp_fast.kernels.task_conv import _MIN_TILES_PER_CHUNK, BLOCK_K, weight_grad_split

    chunks, chunk = weight_grad_split(programs, pixels, multiprocessors)
    assert chunks >= 1 and chunk % BLOCK_K == 0
    assert (chunks - 1) * chunk < pixels <= chunks * chunk  # every chunk non-empty, all pixels covered
    if chunks > 1:
        assert chunk >= _MIN_TILES_PER_CHUNK * BLOCK_K
        assert programs * (chunks - 1) < 2 * multiprocessors  # no more chunks than filling the GPU needs
    elif pixels >= 2 * _MIN_TILES_PER_CHUNK * BLOCK_K:
        assert programs >= 2 * multiprocessors  # left unsplit only when the grid is already full


def test_weight_grad_split_fills_an_h200_for_the_first_layer():
    from mamlpp_fast.kernels.task_conv import weight_grad_split

    chunks, _ = weight_grad_split(8, 20 * 28 * 28, 132)
    assert 8 * chunks >= 2 * 132


def test_weight_grad_split_rejects_bad_arguments():
    from mamlpp_fast.kernels.task_conv import task_conv_weight_grad, weight_grad_split

    with pytest.raises(ValueError, match="programs, pixels and multiprocessors"):
        weight_grad_split(0, 10, 1)
    x, _, _ = inputs(*SHAPES[0], device="cpu")
    with pytest.raises(ValueError, match="split must be >= 1"):
        task_conv_weight_grad(x.detach(), torch.zeros(2, 8, 5, 5, dtype=x.dtype), 2, split=0)


@interpreted
def test_gradcheck_and_gradgradcheck_interpreter():
    # Every numerical-Jacobian evaluation is an interpreted launch: random-projection checks
    # (fast_mode) on a small shape keep this to seconds; the GPU runs the full checks.
    check_second_order("cpu", shape=(1, 2, 1, 2, 3, 4), fast_mode=True)


def check_second_order_under_autocast(device, dtype):
    """The triton strategy to second order under autocast against F.conv2d's own autocast."""
    from mamlpp_fast.ops import task_conv

    x, weight, bias = inputs(4, 2, 3, 5, 7, 7, device=device, dtype=torch.float32)

    def run(strategy):
        with torch.autocast(device, dtype=dtype):
            out = task_conv(x, weight, bias, strategy=strategy)
            gx, gw = torch.autograd.grad(out.float().square().sum(), (x, weight), create_graph=True)
            grads = torch.autograd.grad(gx.float().square().sum() + gw.float().sum(), (x, weight, bias))
        return out, grads

    (out, grads), (expected, expected_grads) = run("triton"), run("grouped")
    assert out.dtype == dtype
    assert relative_error(out.double(), expected.double()) < 1e-2
    for name, g, e in zip(("x", "weight", "bias"), grads, expected_grads):
        assert g.dtype == torch.float32, name
        assert relative_error(g.double(), e.double()) < 2e-2, name


@interpreted
def test_second_order_under_autocast_interpreter():
    # float16: the interpreter's tl.dot gives garbage for bfloat16 operands (numpy has no
    # bfloat16), which compiled Triton does not; the CUDA case runs both.
    check_second_order_under_autocast("cpu", torch.float16)


@pytest.mark.skipif(_backend.triton_interpret(), reason="this is the driver of the interpreter run")
@pytest.mark.skipif(bool(triton_interpreter_broken()), reason=triton_interpreter_broken())
def test_run_interpreted_cases(tmp_path):
    run_interpreted_cases(__file__, tmp_path)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_grouped_cuda(shape):
    check_against_grouped("cuda", shape)


@pytest.mark.cuda
def test_float32_within_1e4_of_float64_cuda(no_tf32):  # the kernels then use IEEE fp32
    check_against_grouped("cuda", (20, 8, 64, 64, 14, 14), dtype=torch.float32, rtol=1e-4)


@pytest.mark.cuda
def test_weight_grad_split_cuda():
    # The automatic split at an Omniglot first layer (many chunks on any GPU), and forced splits.
    check_weight_grad_splits("cuda", (20, 8, 1, 64, 28, 28), splits=(None, 1, 5))


@pytest.mark.cuda
def test_gradcheck_and_gradgradcheck_cuda():
    check_second_order("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_second_order_under_autocast_cuda(dtype):
    check_second_order_under_autocast("cuda", dtype)
