"""mamlpp_fast.ops.task_conv_weight_grad: the C++ weight- and bias-gradient kernel of task_conv
(csrc/cpu/task_conv.cpp) against ATen's grouped convolution backward, its derivatives to second
order, its determinism, its checks, and its use inside task_conv ("explicit" on the CPU)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from mamlpp_fast import _backend
from mamlpp_fast.ops import task_conv, task_conv_weight_grad

# The module (mamlpp_fast.ops.task_conv is also the name of the function the package exports).
task_conv_module = importlib.import_module("mamlpp_fast.ops.task_conv")

pytestmark = pytest.mark.skipif(not _backend.has_extension(), reason="needs the compiled extension")

OP = torch.ops.mamlpp_fast.task_conv_weight_grad.default if _backend.has_extension() else None

# (n, B, C_in, C_out, H, W): MAML++'s first layers (1 and 3 input channels), two input channels,
# the generic one-channel-at-a-time path (C_in = 5), output channels with a partial vector block
# (20 = 16 + 4) and with none full (8), odd sizes (n*H*W not a power of two; H in 28, 84, 7, 5).
SHAPES = [(3, 2, 1, 64, 28, 28), (2, 2, 3, 48, 84, 84), (4, 3, 2, 32, 7, 7), (2, 2, 5, 16, 5, 9),
          (3, 2, 1, 20, 6, 5), (2, 3, 3, 8, 5, 5), (1, 1, 4, 17, 1, 1)]


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def make_inputs(n, b, c_in, c_out, h, w, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, b * c_in, h, w, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(n, b * c_out, h, w, generator=gen, dtype=torch.float64)
    return channels_last(x).to(dtype), channels_last(grad_out).to(dtype)


def aten_weight_grad(x, grad_out, num_tasks):
    """ATen's grouped convolution backward and a channel sum, in float64."""
    x, grad_out = x.double(), grad_out.double()
    c_in, c_out = x.shape[1] // num_tasks, grad_out.shape[1] // num_tasks
    weight = x.new_empty(num_tasks * c_out, c_in, 3, 3)
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], num_tasks, [False, True, False])
    return grad_w.view(num_tasks, c_out, c_in, 3, 3), grad_out.sum((0, 2, 3)).view(num_tasks, c_out)


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_aten_in_float64(shape):
    x, grad_out = make_inputs(*shape)
    grad_w, grad_b = OP(x, grad_out, shape[1])
    expected_w, expected_b = aten_weight_grad(x, grad_out, shape[1])
    assert grad_w.shape == expected_w.shape and grad_b.shape == expected_b.shape
    assert grad_w.dtype == grad_b.dtype == torch.float64
    assert relative_error(grad_w, expected_w) < 1e-12
    assert relative_error(grad_b, expected_b) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_within_1e4_of_float64(shape):
    x, grad_out = make_inputs(*shape)
    grad_w, grad_b = OP(x.float(), grad_out.float(), shape[1])
    expected_w, expected_b = aten_weight_grad(x, grad_out, shape[1])
    assert grad_w.dtype == torch.float32
    assert relative_error(grad_w, expected_w) < 1e-4
    assert relative_error(grad_b, expected_b) < 1e-4


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_bfloat16_accumulates_in_float32(shape):
    # The bfloat16 inputs themselves are the data: their exact float64 gradient against the
    # kernel's bfloat16 result differs by the output's rounding (2^-8 relative), not by the
    # accumulation over up to 14,000 products.
    x, grad_out = make_inputs(*shape, dtype=torch.bfloat16)
    grad_w, grad_b = OP(x, grad_out, shape[1])
    expected_w, expected_b = aten_weight_grad(x, grad_out, shape[1])
    assert grad_w.dtype == torch.bfloat16
    assert relative_error(grad_w, expected_w) < 5e-3
    assert relative_error(grad_b, expected_b) < 5e-3


def test_contiguous_inputs_give_the_same_result():
    x, grad_out = make_inputs(2, 2, 3, 32, 9, 7)
    expected = OP(x, grad_out, 2)
    actual = OP(x.contiguous(), grad_out.contiguous(), 2)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def test_result_does_not_depend_on_the_thread_count():
    x, grad_out = make_inputs(5, 2, 3, 48, 30, 17, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(x, grad_out, 2)
        torch.set_num_threads(max(2, threads))
        many = OP(x, grad_out, 2)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_empty_batch_gives_zero_gradients():
    x, grad_out = make_inputs(0, 2, 1, 16, 5, 5)
    grad_w, grad_b = OP(x, grad_out, 2)
    assert grad_w.shape == (2, 16, 1, 3, 3) and not grad_w.any() and not grad_b.any()


def test_gradcheck_and_gradgradcheck():
    x, grad_out = make_inputs(2, 2, 3, 16, 4, 5)
    x.requires_grad_()
    grad_out.requires_grad_()
    fn = lambda a, g: task_conv_weight_grad(a, g, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, grad_out))
    assert torch.autograd.gradgradcheck(fn, (x, grad_out))


def test_opcheck():
    x, grad_out = make_inputs(2, 2, 1, 16, 5, 6)
    torch.library.opcheck(OP, (x.requires_grad_(), grad_out.requires_grad_(), 2))


def test_meta_tensors_give_the_shapes():
    x = torch.empty(3, 2 * 3, 9, 9, device="meta")
    grad_out = torch.empty(3, 2 * 48, 9, 9, device="meta")
    grad_w, grad_b = OP(x, grad_out, 2)
    assert grad_w.shape == (2, 48, 3, 3, 3) and grad_b.shape == (2, 48)


@pytest.mark.parametrize("bad, message", [
    (lambda x, g: (x[0], g, 2), "x must be 4-D"),
    (lambda x, g: (x, g.float(), 2), "x and grad_out must share one dtype"),
    (lambda x, g: (x.half(), g.half(), 2), "x must be float32, float64 or bfloat16"),
    (lambda x, g: (x, g[:, :, :4], 2), "must agree in n, H and W"),
    (lambda x, g: (x, g, 4), "must be positive multiples of num_tasks"),
    (lambda x, g: (x, g, 0), "num_tasks must be positive"),
])
def test_bad_inputs_name_the_argument(bad, message):
    x, grad_out = make_inputs(2, 2, 3, 20, 5, 5)
    with pytest.raises(RuntimeError, match=message):
        OP(*bad(x, grad_out))
    with pytest.raises(RuntimeError, match=message):
        task_conv_weight_grad(*bad(x, grad_out))


def per_task_loop(x, weight, bias):
    b, c_out, c_in = weight.shape[:3]
    return torch.cat([F.conv2d(x[:, t * c_in:(t + 1) * c_in], weight[t], bias[t], padding=1) for t in range(b)], 1)


def second_order(conv, x, weight, bias):
    # MAML's pattern: the outer gradient through the inner (weight and bias) gradients.
    out = conv(x, weight, bias)
    gx, gw, gb = torch.autograd.grad(out.square().sum(), (x, weight, bias), create_graph=True)
    outer = gx.square().sum() + (gw * weight).sum() + (gb.square() * bias).sum()
    return torch.autograd.grad(outer, (x, weight, bias))


def test_task_conv_uses_the_kernel_for_few_channel_channels_last_layers(monkeypatch):
    calls = []
    real = task_conv_module._cpu_weight_grad_applies

    def spy(x, grad_out, num_tasks):
        used = real(x, grad_out, num_tasks)
        calls.append(used)
        return used

    monkeypatch.setattr(task_conv_module, "_cpu_weight_grad_applies", spy)
    x, weight, bias = (t.requires_grad_() for t in (
        channels_last(torch.randn(3, 2 * 3, 7, 7, dtype=torch.float64)),
        torch.randn(2, 16, 3, 3, 3, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)))
    ours = second_order(lambda *a: task_conv(*a, strategy="explicit"), x, weight, bias)
    assert any(calls), "the C++ weight-gradient kernel was never chosen"
    expected = second_order(per_task_loop, x, weight, bias)
    for name, g, e in zip(("x", "weight", "bias"), ours, expected):
        assert relative_error(g, e) < 1e-12, name


@pytest.mark.parametrize("c_in, c_out, layout, used", [
    (1, 64, "channels_last", True), (3, 48, "channels_last", True), (4, 16, "channels_last", True),
    (5, 64, "channels_last", False),  # more input channels than the kernel is faster for
    (3, 8, "channels_last", False),  # fewer output channels than one vector
    (3, 48, "contiguous", False),  # oneDNN's NCHW path stays
])
def test_kernel_choice(c_in, c_out, layout, used):
    x = torch.randn(2, 2 * c_in, 5, 5)
    grad_out = torch.randn(2, 2 * c_out, 5, 5)
    if layout == "channels_last":
        x, grad_out = channels_last(x), channels_last(grad_out)
    assert task_conv_module._cpu_weight_grad_applies(x, grad_out, 2) is used


def test_max_c_in_zero_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(task_conv_module, "CPU_WEIGHT_GRAD_MAX_C_IN", 0)
    x, grad_out = make_inputs(2, 2, 1, 64, 5, 5)
    assert not task_conv_module._cpu_weight_grad_applies(x, grad_out, 2)
