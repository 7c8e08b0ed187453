"""mamlpp_fast.ops.task_conv: every strategy against a per-task F.conv2d loop, gradients to
second order (gradcheck / gradgradcheck in float64), float32 against float64, and input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamlpp_fast import _backend
from mamlpp_fast.ops import task_conv, task_conv_strategy
from mamlpp_fast.ops.task_conv import FLEXIBLE_STRATEGIES, STRATEGIES
from mamlpp_fast.testing import task_conv_inputs as inputs

ATEN_STRATEGIES = ("grouped", "explicit", "bmm", "blockdiag")  # the Triton kernels have their own tests in tests/kernels


def skip_unless_runnable(strategy, device):
    if strategy == "triton" and not (device == "cuda" and _backend.has_triton()):
        pytest.skip("the triton strategy runs on CUDA here (interpreter cases: tests/kernels)")


def per_task_loop(x, weight, bias, stride=1, padding=1):
    """The reference pattern: task t's channels through task t's own conv."""
    b, c_out, c_in = weight.shape[:3]
    outs = [F.conv2d(x[:, t * c_in:(t + 1) * c_in], weight[t], bias[t], stride=stride, padding=padding)
            for t in range(b)]
    return torch.cat(outs, dim=1)



# Odd sizes on purpose: n*K not a power of two, H in {28, 7, 5, 3} and non-square.
SHAPES = [(5, 2, 1, 4, 28, 28), (3, 3, 4, 5, 7, 7), (4, 1, 3, 2, 5, 5), (2, 2, 2, 3, 3, 6)]


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_per_task_loop_with_gradients(device, strategy, shape):
    skip_unless_runnable(strategy, device)
    x, weight, bias = inputs(*shape, device=device)
    out = task_conv(x, weight, bias, strategy=strategy)
    expected = per_task_loop(x, weight, bias)
    assert out.shape == expected.shape and out.is_contiguous()
    assert relative_error(out, expected) < 1e-12
    cotangent = torch.randn_like(expected)
    grads = torch.autograd.grad((out * cotangent).sum(), (x, weight, bias))
    expected_grads = torch.autograd.grad((expected * cotangent).sum(), (x, weight, bias))
    for name, g, e in zip(("x", "weight", "bias"), grads, expected_grads):
        assert relative_error(g, e) < 1e-12, name


def second_order(conv, x, weight, bias):
    """Gradients in (x, weight, bias) of a function of the first-order gradients, the pattern of
    MAML's outer gradient through the inner one."""
    out = conv(x, weight, bias)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, weight), create_graph=True)
    return torch.autograd.grad(gx.square().sum() + (gw * weight).sum(), (x, weight, bias))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_second_order_gradients_match_per_task_loop(device, strategy):
    skip_unless_runnable(strategy, device)
    inputs_ = inputs(3, 2, 3, 4, 7, 7, device=device)
    for g, e in zip(second_order(lambda *a: task_conv(*a, strategy=strategy), *inputs_),
                    second_order(per_task_loop, *inputs_)):
        assert relative_error(g, e) < 1e-12


def second_order_through_param_grads(conv, x, weight, bias, uses):
    """MAML's pattern with the inner gradient of the bias too (the LSLR update steps both): the
    outer function reads the weight gradient, the bias gradient or both."""
    out = conv(x, weight, bias)
    gw, gb = torch.autograd.grad(out.square().sum(), (weight, bias), create_graph=True)
    outer = out.sum() * 0.5
    if "weight" in uses:
        outer = outer + (gw * weight).sum()
    if "bias" in uses:
        outer = outer + (gb.square() * bias).sum()
    return torch.autograd.grad(outer, (x, weight, bias))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("uses", [("weight",), ("bias",), ("weight", "bias")])
def test_second_order_through_the_bias_gradient_matches_per_task_loop(device, strategy, uses):
    # "explicit"/"triton" take the bias gradient beside the weight gradient, and its cotangent
    # becomes the backward convolution's bias; with only one of the two read, the other's
    # cotangent is None.
    skip_unless_runnable(strategy, device)
    inputs_ = inputs(3, 2, 3, 4, 7, 7, device=device)
    ours = second_order_through_param_grads(lambda *a: task_conv(*a, strategy=strategy), *inputs_, uses)
    expected = second_order_through_param_grads(per_task_loop, *inputs_, uses)
    for name, g, e in zip(("x", "weight", "bias"), ours, expected):
        assert relative_error(g, e) < 1e-12, name


@pytest.mark.parametrize("strategy", ATEN_STRATEGIES)
def test_gradcheck_and_gradgradcheck(strategy):
    x, weight, bias = inputs(2, 2, 2, 3, 5, 4)
    fn = lambda *a: task_conv(*a, strategy=strategy)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


def test_broadcast_step_zero_weights():
    """Step-0 weights are the meta-parameters expanded over tasks (a stride-0 view)."""
    x, weight, bias = inputs(4, 3, 2, 5, 7, 7)
    shared_w = weight[0].detach().clone().requires_grad_()
    shared_b = bias[0].detach().clone().requires_grad_()
    expanded_w, expanded_b = shared_w.expand(3, *shared_w.shape), shared_b.expand(3, *shared_b.shape)
    results = []
    for strategy in ATEN_STRATEGIES:
        out = task_conv(x, expanded_w, expanded_b, strategy=strategy)
        results.append((out, *torch.autograd.grad(out.square().sum(), (shared_w, shared_b))))
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert relative_error(a, e) < 1e-12


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32_within_1e4_of_float64(device, strategy, no_tf32):
    skip_unless_runnable(strategy, device)
    x, weight, bias = inputs(20, 8, 64, 64, 14, 14, device=device, seed=3)
    expected = task_conv(x, weight, bias, strategy=strategy)
    with torch.no_grad():
        out = task_conv(x.float(), weight.float(), bias.float(), strategy=strategy)
    assert out.dtype == torch.float32
    assert relative_error(out.double(), expected) < 1e-4


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32_gradients_within_1e4_of_float64(device, strategy, no_tf32):
    # First and second order (the MAML pattern), Omniglot's second layer with 8 tasks.
    skip_unless_runnable(strategy, device)
    x, weight, bias = inputs(20, 8, 64, 64, 14, 14, device=device, seed=4)
    cotangent = torch.randn(20, 8 * 64, 14, 14, dtype=torch.float64, device=device)

    def both_orders(x, weight, bias):
        x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
        out = task_conv(x, weight, bias, strategy=strategy)
        first = torch.autograd.grad((out * cotangent.to(out.dtype)).sum(), (x, weight, bias), create_graph=True)
        second = torch.autograd.grad(first[0].square().sum() + first[1].square().sum(), (x, weight))
        return [t.detach() for t in (*first, *second)]

    for got, expected in zip(both_orders(x.float(), weight.float(), bias.float()), both_orders(x, weight, bias)):
        assert got.dtype == torch.float32
        assert relative_error(got.double(), expected) < 1e-4


def test_strategy_choice():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # "auto": the fastest end to end (benchmarks/RESULTS.md), for MAML++'s stride 1 and padding 1
    assert task_conv_strategy(cpu) == "explicit"
    assert task_conv_strategy(cuda) == "grouped"
    # The official network's stride 2 and padding 0 run on the ATen strategies only.
    for stride, padding in ((2, 1), (1, 0), (2, 0)):
        assert task_conv_strategy(cpu, "auto", stride, padding) == "grouped"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # explicit casts as autocast does
        assert task_conv_strategy(cpu) == "explicit"
    assert task_conv_strategy(cpu, "explicit") == "explicit"
    assert task_conv_strategy(cpu, "bmm") == "bmm"
    assert task_conv_strategy(cpu, "blockdiag") == "blockdiag"
    assert task_conv_strategy(cuda, "grouped") == "grouped"


def second_order_under_autocast(strategy, x, weight, bias, device_type="cpu", dtype=torch.bfloat16):
    """The MAML pattern under autocast: the output, and float32 gradients of a function of the
    first-order gradients."""
    with torch.autocast(device_type, dtype=dtype):
        out = task_conv(x, weight, bias, strategy=strategy)
        grad_x, grad_w = torch.autograd.grad(out.float().square().sum(), (x, weight), create_graph=True)
        grads = torch.autograd.grad(grad_x.float().square().sum() + grad_w.float().sum(), (x, weight, bias))
    return out, grads


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_second_order_under_autocast_matches_aten_autocast(device, strategy):
    # "grouped" is F.conv2d under ATen's autocast; "explicit" (the CPU's auto) and "triton" cast
    # their inputs themselves and must give what ATen gives, saved tensors and double backward
    # included. bfloat16 on the CPU, float16 on CUDA (each device's autocast default).
    skip_unless_runnable(strategy, device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x, weight, bias = inputs(4, 2, 3, 5, 7, 7, dtype=torch.float32, device=device)
    out, grads = second_order_under_autocast(strategy, x, weight, bias, device, dtype)
    expected_out, expected_grads = second_order_under_autocast("grouped", x, weight, bias, device, dtype)
    assert out.dtype == dtype
    assert relative_error(out.float(), expected_out.float()) < 1e-2
    for name, g, e in zip(("x", "weight", "bias"), grads, expected_grads):
        assert g.dtype == torch.float32, name  # the leaves' dtype, through the casts
        assert relative_error(g, e) < 2e-2, name


@pytest.mark.parametrize("strategy", ATEN_STRATEGIES)
def test_autocast_casts_float16_inputs_too(strategy):
    # autocast casts every floating-point input but float64, float16 under bfloat16 autocast too.
    x, weight, bias = inputs(4, 2, 3, 5, 7, 7, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task_conv(x.half(), weight, bias, strategy=strategy)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("strategy", ("auto",) + ATEN_STRATEGIES)
def test_meta_tensors_give_the_output_shape(strategy):
    # Fake-tensor tracing (torch.compile, opcheck) runs on the meta device, which has no autocast.
    x, weight, bias = (t.detach().to("meta") for t in inputs(4, 2, 3, 5, 7, 6, dtype=torch.float32))
    assert task_conv(x, weight, bias, strategy=strategy).shape == (4, 10, 7, 6)


@pytest.mark.parametrize("strategy", ATEN_STRATEGIES)
def test_autocast_activations_meet_float32_weights(strategy):
    # Under autocast a layer's input is the previous layer's bfloat16 output while the weights
    # stay float32: cast together, as F.conv2d's autocast does, instead of a dtype error; the
    # result is the same strategy on inputs cast by hand, outside autocast.
    x, weight, bias = inputs(4, 2, 3, 5, 7, 7, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task_conv(x.bfloat16(), weight, bias, strategy=strategy)
    expected = task_conv(*(t.bfloat16() for t in (x, weight, bias)), strategy=strategy)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_bad_inputs_name_the_argument():
    x, weight, bias = inputs(2, 2, 3, 4, 5, 5)
    with pytest.raises(ValueError, match="x must be"):
        task_conv(x[:, :5], weight, bias)
    with pytest.raises(ValueError, match="weight must be"):
        task_conv(x, weight[..., :2], bias)
    with pytest.raises(ValueError, match="bias must be"):
        task_conv(x, weight, bias[:, :3])
    with pytest.raises(ValueError, match="dtype"):
        task_conv(x.float(), weight, bias)
    with pytest.raises(ValueError, match="strategy"):
        task_conv(x, weight, bias, strategy="fft")
    if not _backend.triton_interpret():
        with pytest.raises(RuntimeError, match="triton"):
            task_conv(x, weight, bias, strategy="triton")  # CPU tensors, no interpreter


# The official network's other convolutions: stride 2 (max_pooling=false), padding 0
# (conv_padding=false), and both.
GEOMETRIES = [(2, 1), (1, 0), (2, 0)]


@pytest.mark.parametrize("strategy", ("auto",) + FLEXIBLE_STRATEGIES)
@pytest.mark.parametrize("stride, padding", GEOMETRIES)
@pytest.mark.parametrize("shape", [(5, 2, 1, 4, 28, 28), (3, 3, 4, 5, 7, 7), (2, 2, 2, 3, 3, 6), (4, 1, 3, 2, 4, 3)])
def test_official_geometries_match_per_task_loop_to_second_order(strategy, stride, padding, shape):
    """Odd, even and non-square sizes: with stride 2, 28 -> 14 and 7 -> 4; unpadded, 3x6 -> 1x4."""
    x, weight, bias = inputs(*shape)
    out = task_conv(x, weight, bias, strategy=strategy, stride=stride, padding=padding)
    expected = per_task_loop(x, weight, bias, stride=stride, padding=padding)
    h, w = shape[4:]
    size = lambda n: (n + 2 * padding - 3) // stride + 1  # noqa: E731
    assert out.shape == expected.shape == (shape[0], shape[1] * shape[3], size(h), size(w))
    assert relative_error(out, expected) < 1e-12

    ours = lambda *a: task_conv(*a, strategy=strategy, stride=stride, padding=padding)  # noqa: E731
    loop = lambda *a: per_task_loop(*a, stride=stride, padding=padding)  # noqa: E731
    for name, g, e in zip(("x", "weight", "bias"), second_order(ours, x, weight, bias),
                          second_order(loop, x, weight, bias)):
        assert relative_error(g, e) < 1e-12, name


@pytest.mark.parametrize("strategy", FLEXIBLE_STRATEGIES)
@pytest.mark.parametrize("stride, padding", GEOMETRIES)
def test_official_geometries_gradcheck_and_gradgradcheck(strategy, stride, padding):
    x, weight, bias = inputs(2, 2, 2, 3, 5, 4)
    fn = lambda *a: task_conv(*a, strategy=strategy, stride=stride, padding=padding)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES) - set(FLEXIBLE_STRATEGIES) - {"triton"}))
@pytest.mark.parametrize("stride, padding", GEOMETRIES)
def test_official_geometries_are_refused_where_the_kernels_have_none(strategy, stride, padding):
    x, weight, bias = inputs(2, 2, 3, 4, 5, 5)
    with pytest.raises(ValueError, match=f"stride {stride} and padding {padding} .* run with the strategies"):
        task_conv(x, weight, bias, strategy=strategy, stride=stride, padding=padding)


def test_bad_stride_or_padding_names_the_argument():
    x, weight, bias = inputs(2, 2, 3, 4, 5, 5)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        task_conv(x, weight, bias, stride=3)
    with pytest.raises(ValueError, match="padding must be 0 or 1"):
        task_conv(x, weight, bias, padding=2)
