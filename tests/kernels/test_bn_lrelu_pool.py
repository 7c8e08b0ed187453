"""Triton bn_lrelu_pool forward (under TRITON_INTERPRET=1 on CPU) against the reference composition."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from mamlpp_fast.testing import triton_interpreter_broken

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from mamlpp_fast.kernels.bn_lrelu_pool import bn_lrelu_pool, bn_lrelu_pool_forward
    from mamlpp_fast.reference.ops import bn_lrelu_pool_reference

    torch.manual_seed(0)
    for shape in [(3, 4, 5, 7), (2, 3, 6, 6), (1, 2, 3, 2)]:
        for dtype in (torch.float64, torch.float32):
            x = torch.randn(shape, dtype=dtype) * 2 + 0.3
            w = torch.randn(shape[1], dtype=dtype)
            b = torch.randn(shape[1], dtype=dtype)
            y, mean, invstd, idx = bn_lrelu_pool_forward(x, w, b)
            y_ref, mean_ref, invstd_ref = bn_lrelu_pool_reference(x, w, b)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            for got, ref in ((y, y_ref), (mean, mean_ref), (invstd, invstd_ref)):
                assert (got - ref).abs().max() <= tol * max(ref.abs().max(), 1), (shape, dtype)
            a = F.leaky_relu(F.batch_norm(x, None, None, w, b, training=True), 0.01)
            _, flat = F.max_pool2d(a, 2, 2, return_indices=True)
            W = shape[3]
            assert torch.equal(idx.long(), (flat // W % 2) * 2 + flat % W % 2), (shape, dtype)
    # ties: constant channels pick the first window position, as ATen
    x = torch.ones(2, 3, 4, 4, dtype=torch.float64)
    assert (bn_lrelu_pool_forward(x, torch.ones(3, dtype=x.dtype), torch.zeros(3, dtype=x.dtype))[3] == 0).all()
    # first-order gradients through the autograd.Function
    x = torch.randn(3, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    got = torch.autograd.grad(bn_lrelu_pool(x, w, b)[0], (x, w, b), gy)
    ref = torch.autograd.grad(bn_lrelu_pool_reference(x, w, b)[0], (x, w, b), gy)
    for g, r in zip(got, ref):
        assert (g - r).abs().max() <= 1e-12 * r.abs().max()
    # second order (MAML's outer gradient through the inner one) against the reference, then
    # gradcheck / gradgradcheck of the Triton path itself
    def second_order(fn):
        y = fn(x, w, b)[0]
        gx, gw = torch.autograd.grad(y, (x, w), gy, create_graph=True)
        # beta reaches the first-order gradients only through leaky ReLU's mask: no path to b
        return torch.autograd.grad(gx.square().sum() + (gw * w).sum(), (x, w))
    for g, r in zip(second_order(bn_lrelu_pool), second_order(bn_lrelu_pool_reference)):
        assert (g - r).abs().max() <= 1e-10 * r.abs().max()
    x, w, b = (t.detach()[:2, :2, :3, :4].clone().requires_grad_() if t.dim() == 4 else t.detach()[:2].clone().requires_grad_()
               for t in (x, w, b))
    # fast_mode: the interpreter runs the kernel once per probe (the comparison above covers the maths)
    assert torch.autograd.gradcheck(lambda *a: bn_lrelu_pool(*a)[0], (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda *a: bn_lrelu_pool(*a)[0], (x, w, b), fast_mode=True)
    print("triton ok")
    """
)


@pytest.mark.skipif(bool(triton_interpreter_broken()), reason=triton_interpreter_broken())
def test_triton_forward_under_interpreter(tmp_path):
    # TRITON_INTERPRET must be set before triton compiles the kernel: run in a fresh process.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "triton ok" in run.stdout
