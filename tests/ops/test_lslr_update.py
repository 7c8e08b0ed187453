"""mamlpp_fast.ops.lslr_update against the plain-torch formula, with gradients to second order."""

from __future__ import annotations

import pytest
import torch

from mamlpp_fast import _backend
from mamlpp_fast.ops import lslr_update, lslr_update_backend
from mamlpp_fast.testing import (OMNIGLOT_20WAY_SHAPES, assert_close, lslr_update_inputs,
                                 op_backends, run_without_extension)

ODD_SHAPES = [(3, 5, 7), (1,), (64, 1, 3, 3)]
needs_ext = pytest.mark.skipif(not _backend.has_extension(), reason="compiled extension not loaded")


def formula(params, grads, lr):
    return [p - lr[k] * g for k, (p, g) in enumerate(zip(params, grads))]


@pytest.mark.parametrize("shared", [False, True, [True, False, True]], ids=["batched", "shared", "mixed"])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_formula(device, shared, batch):
    params, grads, lr = lslr_update_inputs(ODD_SHAPES, batch, shared=shared, device=device)
    expected = formula(params, grads, lr)
    for backend in op_backends(device):
        out = lslr_update(params, grads, lr, backend=backend)
        assert [o.shape for o in out] == [torch.Size([batch, *s]) for s in ODD_SHAPES]
        assert_close(out, expected, msg=f"backend={backend}")


def test_omniglot_shapes_float32_vs_float64(device):
    params64, grads64, lr64 = lslr_update_inputs(OMNIGLOT_20WAY_SHAPES, 8, shared=True, device=device)
    expected = formula(params64, grads64, lr64)
    to32 = lambda ts: [t.float() for t in ts]  # noqa: E731
    for backend in op_backends(device):
        out = lslr_update(to32(params64), to32(grads64), lr64.float(), backend=backend)
        assert all(o.dtype == torch.float32 for o in out)
        assert_close(out, expected, dtype=torch.float32, msg=f"float32 backend={backend}")


@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
def test_gradcheck_and_gradgradcheck(device, shared):
    # fast_mode checks random projections of the Jacobian: the full one of [2, 64, 1, 3, 3] is big.
    shapes = [(3, 5, 7), (1,), (64, 1, 3, 3)]
    for backend in op_backends(device):
        params, grads, lr = lslr_update_inputs(
            shapes, 2, shared=shared, device=device, requires_grad=True, seed=1
        )
        P = len(shapes)

        def fn(lr, *flat, backend=backend):
            return tuple(lslr_update(list(flat[:P]), list(flat[P:]), lr, backend=backend))

        inputs = (lr, *params, *grads)
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True), backend
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True), backend
        # and full Jacobians on small odd shapes
        p, g, r = lslr_update_inputs([(3, 1, 5), (1,), (2, 1)], 2, shared=shared, device=device,
                                     requires_grad=True, seed=3)
        assert torch.autograd.gradcheck(fn, (r, *p, *g)), f"{backend} (full Jacobian)"
        assert torch.autograd.gradgradcheck(fn, (r, *p, *g)), f"{backend} (full Jacobian)"


def test_grads_match_formula_autograd(device):
    # The MAML++ shapes, B=4, shared params: compare first and second derivatives with autograd of
    # the formula, as second-order MAML uses them.
    shapes = [(4, 1, 3, 3), (4,), (5, 4)]
    for backend in op_backends(device):
        results = []
        for impl in (formula, lambda p, g, lr: lslr_update(p, g, lr, backend=backend)):
            params, grads, lr = lslr_update_inputs(shapes, 4, shared=True, device=device,
                                                   requires_grad=True, seed=2)
            out = impl(params, grads, lr)
            loss = sum((o.sin() * (k + 1)).sum() for k, o in enumerate(out))
            first = torch.autograd.grad(loss, [*params, *grads, lr], create_graph=True)
            second = torch.autograd.grad(sum(f.square().sum() for f in first), [*params, *grads, lr])
            results.append((first, second))
        (f_ref, s_ref), (f_op, s_op) = results
        assert_close(list(f_op), list(f_ref), msg=f"first-order grads, backend={backend}")
        assert_close(list(s_op), list(s_ref), msg=f"second-order grads, backend={backend}")


@pytest.mark.parametrize("needs", ["params", "grads", "lr", "params+lr"])
def test_partial_requires_grad(device, needs):
    # First-order MAML: grads are constants; only some inputs need gradients.
    for backend in op_backends(device):
        params, grads, lr = lslr_update_inputs([(3, 5), (2,)], 2, shared=[True, False], device=device)
        wanted = {"params": params, "grads": grads, "lr": [lr]}
        leaves = [t.requires_grad_() for key in needs.split("+") for t in wanted[key]]
        out = lslr_update(params, grads, lr, backend=backend)
        got = torch.autograd.grad(sum(o.sum() for o in out), leaves)
        ref = torch.autograd.grad(sum(o.sum() for o in formula(params, grads, lr)), leaves)
        assert_close(list(got), list(ref), msg=f"backend={backend}, needs={needs}")


@needs_ext
@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared"])
def test_opcheck(device, shared):
    for requires_grad in (False, True):
        params, grads, lr = lslr_update_inputs(
            [(3, 5, 7), (1,), (4, 1, 3, 3)], 2, shared=shared, device=device,
            requires_grad=requires_grad,
        )
        torch.library.opcheck(torch.ops.mamlpp_fast.lslr_update.default, (params, grads, lr))


def test_torch_compile_fullgraph():
    params, grads, lr = lslr_update_inputs([(3, 5), (4,)], 2, shared=True, dtype=torch.float32)
    compiled = torch.compile(lambda p, g, lr: lslr_update(p, g, lr), fullgraph=True, backend="eager")
    assert_close(compiled(params, grads, lr), formula(params, grads, lr))


BAD_INPUTS = [
    # (description, mutate(params, grads, lr) -> (params, grads, lr), message fragment)
    ("length", lambda p, g, lr: (p[:2], g, lr), "params and grads must have the same length"),
    ("lr 2-D", lambda p, g, lr: (p, g, lr[None]), "lr must be 1-D"),
    ("lr count", lambda p, g, lr: (p, g, lr[:2]), "lr must hold one rate per parameter tensor"),
    ("lr int", lambda p, g, lr: (p, g, lr.long()), "lr must be float32 or float64"),
    ("dtype", lambda p, g, lr: ([p[0].float(), *p[1:]], g, lr), "params[0], grads[0] and lr must share one dtype"),
    ("shape", lambda p, g, lr: ([p[0], p[1][:, :1, :1, :1], p[2]], g, lr), "params[1] must have shape"),
    ("batch", lambda p, g, lr: (p, [g[0], g[1][:1], g[2]], lr), "grads[1] has 1 tasks"),
    ("scalar grad", lambda p, g, lr: ([p[0], p[1], p[2][0, 0]], [g[0], g[1], g[2][0, 0]], lr),
     "grads[2] must have a leading task dimension"),
]


@pytest.mark.parametrize("name,mutate,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_name_the_argument(name, mutate, message):
    params, grads, lr = lslr_update_inputs([(3, 5), (2, 1, 3, 3), (1,)], 3)
    bad = mutate(params, grads, lr)
    for backend in ["aten", "reference", *(["cpp"] if _backend.has_extension() else [])]:
        with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            lslr_update(*bad, backend=backend)


def test_backend_choice_is_observable_and_overridable():
    params, grads, lr = lslr_update_inputs([(3,)], 2)
    expected = "cpp" if _backend.has_extension() else "aten"
    assert lslr_update_backend(params, grads, lr) == expected
    assert lslr_update_backend(params, grads, lr, backend="reference") == "reference"
    _backend.set_default_backend("aten")
    try:
        assert lslr_update_backend(params, grads, lr) == "aten"
    finally:
        _backend.set_default_backend("auto")
    with pytest.raises(ValueError, match="unknown backend"):
        lslr_update(params, grads, lr, backend="fortran")
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
        lslr_update(params, grads, lr, backend="cuda")


def test_fallback_without_extension(tmp_path):
    """With MAMLPP_FAST_DISABLE_EXT=1 the op runs (and differentiates) on the pure-torch path."""
    script = """
        import torch
        from mamlpp_fast import _backend
        from mamlpp_fast.ops import lslr_update, lslr_update_backend
        from mamlpp_fast.testing import lslr_update_inputs
        assert not _backend.has_extension()
        p, g, lr = lslr_update_inputs([(3, 5, 7), (1,)], 2, shared=True, requires_grad=True)
        assert lslr_update_backend(p, g, lr) == "aten"
        out = lslr_update(p, g, lr)
        ref = [p[k] - lr[k] * g[k] for k in range(2)]
        assert all(torch.allclose(a, b) for a, b in zip(out, ref))
        f = lambda lr, *t: tuple(lslr_update(list(t[:2]), list(t[2:]), lr))
        assert torch.autograd.gradgradcheck(f, (lr, *p, *g))
        print("fallback ok")
        """
    assert "fallback ok" in run_without_extension(script, tmp_path)
