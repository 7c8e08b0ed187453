"""Shared test and benchmark helpers: one tolerance table, assertion helpers and input factories.

Tolerance policy: compare every kernel against float64 PyTorch math.
  * float64 kernels: near machine precision (the table below).
  * float32 kernels: within ``TOLERANCES[torch.float32]`` of the float64 result.
  * bf16/fp16: the FlashAttention rule, ``max|kernel - ref64| <= 2 * max|eager_low - ref64|``
    (``assert_close_relative_to_eager``), since absolute bounds there are shape dependent.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "call_after",
    "convolution_input_dtypes",
    "free_port",
    "read_until",
    "META_STEP_RTOL",
    "OMNIGLOT_20WAY_SHAPES",
    "TOLERANCES",
    "Tolerance",
    "assert_close",
    "assert_close_relative_to_eager",
    "assert_tensors_match",
    "is_inert",
    "make_task_batch",
    "error_summary",
    "lslr_update_inputs",
    "seeded",
    "tolerance",
]


class Tolerance(NamedTuple):
    atol: float
    rtol: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-8),
    torch.float32: Tolerance(atol=1e-5, rtol=1e-4),
    torch.float16: Tolerance(atol=1e-3, rtol=1e-3),
    torch.bfloat16: Tolerance(atol=1e-2, rtol=1.6e-2),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES[dtype]


def error_summary(actual: Tensor, expected: Tensor) -> str:
    diff = (actual.detach().double() - expected.detach().double()).abs()
    if diff.numel() == 0:
        return "empty tensors"
    rel = diff / expected.detach().double().abs().clamp_min(1e-30)
    return (
        f"max abs err {diff.max().item():.3e}, mean abs err {diff.mean().item():.3e}, "
        f"max rel err {rel.max().item():.3e} (shape {tuple(actual.shape)}, {actual.dtype})"
    )


def assert_close(
    actual: Tensor | Sequence[Tensor],
    expected: Tensor | Sequence[Tensor],
    *,
    dtype: torch.dtype | None = None,
    msg: str = "",
) -> None:
    """``torch.testing.assert_close`` with the table's tolerances for ``dtype`` (default: actual's).

    Lists are compared element-wise; failures report max/mean errors and the element index.
    """
    if isinstance(actual, Tensor):
        actual, expected = [actual], [expected]
    assert len(actual) == len(expected), f"{msg}: {len(actual)} tensors vs {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{msg}[{i}]: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        tol = tolerance(dtype or a.dtype)
        torch.testing.assert_close(
            a.detach().to(e.dtype), e.detach(), atol=tol.atol, rtol=tol.rtol,
            msg=lambda _m, i=i, a=a, e=e: f"{msg}[{i}]: {error_summary(a, e)}",
        )


def assert_close_relative_to_eager(actual: Tensor, eager_low: Tensor, ref64: Tensor, *,
                                   factor: float = 2.0, msg: str = "") -> None:
    """Low-precision rule: the kernel may be at most ``factor`` times worse than eager PyTorch."""
    err = (actual.double() - ref64.double()).abs().max().item()
    base = (eager_low.double() - ref64.double()).abs().max().item()
    assert err <= factor * base + 1e-12, f"{msg}: kernel err {err:.3e} > {factor} x eager err {base:.3e}"


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Seed torch and random for a block, restoring the previous CPU RNG state after it."""
    state, py_state = torch.random.get_rng_state(), random.getstate()
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
        random.setstate(py_state)


# The inner-loop parameters of MAML++'s 4-conv Omniglot 20-way model (64 filters, 1 input channel):
# conv weights, conv biases, then the linear classifier. (BN gamma/beta are not inner-loop adapted.)
OMNIGLOT_20WAY_SHAPES: tuple[tuple[int, ...], ...] = (
    (64, 1, 3, 3), (64,),
    (64, 64, 3, 3), (64,),
    (64, 64, 3, 3), (64,),
    (64, 64, 3, 3), (64,),
    (20, 64), (20,),
)


def lslr_update_inputs(
    shapes: Sequence[Sequence[int]],
    batch: int,
    *,
    shared: bool | Sequence[bool] = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    requires_grad: bool = False,
    seed: int = 0,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Random ``(params, grads, lr)`` for ``lslr_update``.

    ``params[k]`` is ``(*shapes[k])`` when ``shared`` (or ``shared[k]``), else ``(batch, *shapes[k])``;
    ``grads[k]`` is ``(batch, *shapes[k])``; ``lr`` is ``(len(shapes),)`` in [0.05, 0.15].
    """
    flags = [shared] * len(shapes) if isinstance(shared, bool) else list(shared)
    gen = torch.Generator().manual_seed(seed)

    def make(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        t = torch.rand(shape, generator=gen, dtype=torch.float64) * scale + shift
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    params = [make(*s, scale=2.0, shift=-1.0) if f else make(batch, *s, scale=2.0, shift=-1.0)
              for s, f in zip(shapes, flags)]
    grads = [make(batch, *s, scale=2.0, shift=-1.0) for s in shapes]
    lr = make(len(shapes), scale=0.1, shift=0.05)
    return params, grads, lr


# ---------------------------------------------------------------- whole meta-steps (float64)

# Whole meta-steps are compared in float64 to this relative tolerance.
META_STEP_RTOL = 1e-10


def make_task_batch(config, num_tasks: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Random images and class-major labels with a config's shapes:
    (x_support [B,N,K,C,H,W], x_target [B,N,T,C,H,W], y_support [B,N,K], y_target [B,N,T])."""
    gen = torch.Generator().manual_seed(seed)
    n, k, t = config.num_classes_per_set, config.num_samples_per_class, config.num_target_samples
    x_s = torch.randn(num_tasks, n, k, *config.image_shape, generator=gen, dtype=dtype)
    x_t = torch.randn(num_tasks, n, t, *config.image_shape, generator=gen, dtype=dtype)
    labels = torch.arange(n).view(1, n, 1)
    return x_s, x_t, labels.expand(num_tasks, n, k).clone(), labels.expand(num_tasks, n, t).clone()


def task_conv_inputs(n, b, c_in, c_out, h, w, device="cpu", dtype=torch.float64, seed=0):
    """Random (x [n, B*C_in, H, W], weight [B, C_out, C_in, 3, 3], bias [B, C_out]) for
    ``task_conv``, requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, b * c_in, h, w, generator=gen, dtype=dtype)
    weight = torch.randn(b, c_out, c_in, 3, 3, generator=gen, dtype=dtype) * 0.3
    bias = torch.randn(b, c_out, generator=gen, dtype=dtype)
    return [t.to(device).requires_grad_() for t in (x, weight, bias)]


def run_interpreted_cases(test_file: str, cwd) -> None:
    """Re-run the ``-k interpreter`` tests of ``test_file`` in a fresh pytest process with
    ``TRITON_INTERPRET=1`` (Triton decides interpreter-or-compiler when a kernel is defined, so
    the variable must be set before the kernel module is imported), and assert they all passed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           os.path.abspath(test_file), "-k", "interpreter"]
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    last = run.stdout.strip().splitlines()[-1]
    assert " passed" in run.stdout and "skipped" not in last, run.stdout[-2000:]


def op_backends(device: str) -> list[str]:
    """The backends an op test compares on ``device``: the pure-PyTorch ones, the compiled
    kernels when loaded (C++ on the CPU, CUDA on a GPU) and Triton on a GPU (the interpreter
    cases live in tests/kernels)."""
    from . import _backend

    names = ["reference", "aten"]
    if _backend.has_extension():
        names.append("cpp" if device == "cpu" else "cuda")
    if device == "cuda" and _backend.has_triton():
        names.append("triton")
    return names


def run_without_extension(script: str, cwd) -> str:
    """Run ``script`` (Python source, dedented here) in a fresh interpreter with
    ``MAMLPP_FAST_DISABLE_EXT=1``, i.e. on the pure-PyTorch paths, from ``cwd`` (not the source
    tree, so the installed package is imported); assert it exits 0 and return its stdout."""
    import os
    import subprocess
    import sys
    import textwrap

    env = {**os.environ, "MAMLPP_FAST_DISABLE_EXT": "1"}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout


def triton_interpreter_broken() -> str:
    """Why Triton's CPU interpreter cannot run our kernels here, or "" when it can: triton 3.6's
    interpreter fails on `range` loops with numpy >= 2.4 ("only 0-dimensional arrays can be
    converted to Python scalars"; see ../shared/docs/toolchain.md). The GPU image has numpy 2.5."""
    import numpy

    try:
        import triton
    except ImportError:
        return "triton is not importable"
    numpy_version = tuple(int(p) for p in numpy.__version__.split(".")[:2])
    triton_version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    if triton_version <= (3, 6) and numpy_version >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter breaks with numpy {numpy.__version__} "
                "(needs numpy<2.4); the compiled kernels are tested on the GPU instead")
    return ""


def is_inert(name: str) -> bool:
    """Conv biases (and their LSLR rates) have an exact gradient of zero: the batch norm that
    follows each conv subtracts them again. Implementations differ there only by rounding noise."""
    return ".conv.bias" in name or "-conv-bias" in name


def assert_tensors_match(actual: dict, expected: dict, what: str, rtol: float = META_STEP_RTOL,
                         inert_floor: float = 1e-3) -> None:
    """Each tensor within `rtol` (L2, relative) of the expected one. Inert tensors (see
    `is_inert`) are compared against a floor of `inert_floor` times the norm of all expected
    tensors. After Adam steps use inert_floor=1: Adam divides the inert tensors' rounding-noise
    gradients by sqrt(v) + eps, so their values are noise far above the gradients' noise."""
    assert actual.keys() == expected.keys(), f"{what}: keys differ"
    if not expected:
        return  # e.g. the running statistics of a layer-norm network: there are none
    scale = torch.sqrt(sum(e.double().pow(2).sum() for e in expected.values())).item()
    for name, e in expected.items():
        a = actual[name].to(e.device)
        assert a.shape == e.shape, f"{what} {name}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        err = (a - e).norm().item()
        bound = rtol * (max(e.norm().item(), inert_floor * scale) if is_inert(name) else e.norm().item())
        assert err <= bound, f"{what} {name}: |diff| {err:.3e} > {bound:.3e} (|ref| {e.norm().item():.3e})"


def assert_states_match_after_adam(actual: dict, expected: dict, what: str, rtol: float = META_STEP_RTOL,
                                   noise: float = 1e-8) -> None:
    """Two learners' state_dicts after Adam steps: each tensor within `rtol` (L2, relative),
    except the inert tensors (see `is_inert`) and the running means, which are compared to
    `noise` (absolute, max). Adam turns the conv biases' zero-gradient rounding noise into steps
    of about lr * noise / eps ~ 1e-10, different for any last-bit difference upstream, and the
    running means include the conv biases."""
    assert actual.keys() == expected.keys(), f"{what}: keys differ"
    for name, e in expected.items():
        a = actual[name].to(e.device)
        assert a.shape == e.shape, f"{what} {name}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        if is_inert(name) or name.endswith("running_mean"):
            err = (a - e).abs().max().item() if e.numel() else 0.0
            assert err < noise, f"{what} {name}: max |diff| {err:.3e} >= {noise:.1e}"
        else:
            err = (a - e).norm().item()
            assert err <= rtol * e.norm().item(), f"{what} {name}: |diff| {err:.3e} > {rtol:.0e} x |ref| {e.norm().item():.3e}"


def call_collecting_warnings(category: type, fn, *args, **kwargs):
    """Call `fn(*args, **kwargs)`; return (its result, the messages of the warnings of
    `category` it emitted), whatever the active warning filters say."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, category)]


@contextlib.contextmanager
def convolution_input_dtypes() -> Iterator[set]:
    """Within the block, collect the dtype of the input of every ``aten.convolution`` call into
    the yielded set (e.g. to check that autocast ran the convolutions in bfloat16)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set = set()

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                seen.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with _Record():
        yield seen


def call_after(learner, calls: int, action) -> None:
    """Make `learner.run_train_iter` run `action()` right after its `calls`-th meta-iteration
    (e.g. send this process a signal at a chosen iteration)."""
    original = learner.run_train_iter
    count = [0]

    def run_train_iter(*args, **kwargs):
        result = original(*args, **kwargs)
        count[0] += 1
        if count[0] == calls:
            action()
        return result

    learner.run_train_iter = run_train_iter


def read_until(stream, prefix: str, timeout: float) -> list:
    """The lines of the text `stream` up to and including the first one starting with `prefix`;
    all of them if none does before the stream ends or `timeout` seconds pass."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            break
    return lines


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a test's rendezvous (MASTER_PORT).
    Another process may take it before the ranks do; tests give the ranks a short timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
