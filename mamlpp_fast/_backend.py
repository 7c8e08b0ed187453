"""Which compute backends this installation can use.

Importing this module loads the compiled library ``mamlpp_fast._C`` when it is present, which
registers the C++/CUDA kernels under ``torch.ops.mamlpp_fast``. A missing or broken ``_C`` is
logged once and never raises: every op has a pure-PyTorch path.

Backends:
    ``reference``  readable pure-PyTorch code (``mamlpp_fast.reference``), always available;
    ``aten``       the fused PyTorch composition used as the fallback (``torch._foreach_*``), always;
    ``cpp``        the compiled CPU kernels in ``_C``;
    ``cuda``       CUDA kernels compiled into ``_C`` (usable only with a GPU);
    ``triton``     Triton kernels in ``mamlpp_fast.kernels`` (a GPU, or ``TRITON_INTERPRET=1`` on CPU).

Set ``MAMLPP_FAST_DISABLE_EXT=1`` before importing to behave as if ``_C`` were absent.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

__all__ = [
    "available_backends",
    "cpu_kernel_threads",
    "describe_backends",
    "extension_error",
    "get_default_backend",
    "has_cuda_extension",
    "has_extension",
    "has_triton",
    "select_backend",
    "set_default_backend",
    "triton_interpret",
]

_log = logging.getLogger("mamlpp_fast")

_C = None
_C_ERROR: str | None = None

if os.environ.get("MAMLPP_FAST_DISABLE_EXT") == "1":
    _C_ERROR = "disabled by MAMLPP_FAST_DISABLE_EXT=1"
else:
    try:
        from . import _C  # noqa: F811  (loading the library registers torch.ops.mamlpp_fast.*)
    except Exception as exc:  # ImportError, or an OSError/undefined symbol from an ABI mismatch
        _C = None
        _C_ERROR = f"{type(exc).__name__}: {exc}"
        _log.warning(
            "mamlpp_fast: compiled extension not loaded (%s); using the pure-PyTorch ops", _C_ERROR
        )


def has_extension() -> bool:
    """True when the compiled library ``mamlpp_fast._C`` is loaded (and not disabled)."""
    return _C is not None


def extension_error() -> str | None:
    """Why ``_C`` is not loaded, or None when it is."""
    return _C_ERROR


def has_cuda_extension() -> bool:
    """True when CUDA kernels were compiled into ``_C`` (independent of a GPU being present)."""
    if not has_extension():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("mamlpp_fast::lslr_update", "CUDA")


@functools.lru_cache(maxsize=None)
def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # not installed, or broken (e.g. no compiler/driver bits)
        return None
    return getattr(triton, "__version__", "unknown")


def has_triton() -> bool:
    """True when ``import triton`` works. Launching also needs a GPU or ``triton_interpret()``."""
    return _triton_version() is not None


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """Backends usable in this process, from most portable to most specialised.

    ``cuda`` and ``triton`` need a GPU (``triton`` also runs under ``TRITON_INTERPRET=1``).
    """
    backends = ["reference", "aten"]
    if has_extension():
        backends.append("cpp")
    gpu = torch.cuda.is_available()
    if gpu and has_cuda_extension():
        backends.append("cuda")
    if has_triton() and (gpu or triton_interpret()):
        backends.append("triton")
    return backends


def cpu_kernel_threads() -> int | None:
    """How many threads the compiled CPU kernels use now (at::parallel_for inside ``_C``), or None
    without the extension. Below ``torch.get_num_threads()`` means ``_C`` was built without the
    OpenMP flag its at::parallel_for needs."""
    if not has_extension() or not hasattr(torch.ops.mamlpp_fast, "parallel_width"):
        return None
    return int(torch.ops.mamlpp_fast.parallel_width(1024))


def describe_backends() -> str:
    """A one-paragraph, human-readable summary of what this installation can run."""
    parts = [f"mamlpp_fast with torch {torch.__version__}"]
    if has_extension():
        width = cpu_kernel_threads()
        threads = "" if width is None else f"on {width} of {torch.get_num_threads()} threads"
        if has_cuda_extension():
            kernels = "with CUDA kernels" + (f"; CPU kernels {threads}" if threads else "")
        else:
            kernels = "CPU kernels only" + (f", {threads}" if threads else "")
        parts.append(f"compiled extension loaded ({kernels})")
    else:
        parts.append(f"compiled extension not loaded ({_C_ERROR})")
    gpu = torch.cuda.is_available()
    parts.append(f"GPU: {torch.cuda.get_device_name(0)}" if gpu else "no GPU visible")
    version = _triton_version()
    if version is None:
        parts.append("triton not importable")
    elif triton_interpret():
        parts.append(f"triton {version} (CPU interpreter, TRITON_INTERPRET=1)")
    elif gpu:
        parts.append(f"triton {version} (compiled kernels)")
    else:
        parts.append(f"triton {version} installed (its kernels need a GPU; TRITON_INTERPRET=1 interprets them)")
    parts.append("usable backends: " + ", ".join(available_backends()))
    return "; ".join(parts) + "."


# --- backend selection shared by the ops in mamlpp_fast.ops -------------------------------------

BACKENDS = ("reference", "aten", "cpp", "cuda", "triton")
_default_backend = os.environ.get("MAMLPP_FAST_BACKEND", "auto")


def set_default_backend(name: str) -> None:
    """Force one backend for every op call that passes no ``backend=`` ("auto" restores the default).

    The environment variable ``MAMLPP_FAST_BACKEND`` sets the initial value.
    """
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    global _default_backend
    _default_backend = name


def get_default_backend() -> str:
    return _default_backend


def select_backend(op: str, device: torch.device, requested: str | None = None) -> str:
    """The backend an op call on ``device`` will use.

    ``requested`` (an op's ``backend=`` argument) wins over the module default; "auto" picks, for
    CUDA tensors: the CUDA kernels compiled into ``_C`` (one launch, metadata passed by value),
    else Triton, else the ATen composition; for CPU tensors: the C++ kernels, else ATen. An explicit
    request that cannot run here raises, naming what is available.
    """
    name = requested if requested is not None else _default_backend
    if name == "auto":
        if device.type == "cuda":
            if has_cuda_extension():
                return "cuda"
            return "triton" if has_triton() else "aten"
        if device.type == "cpu" and has_extension():
            return "cpp"
        return "aten"
    if name not in BACKENDS:
        source = f"backend {name!r}" if requested is not None else f"MAMLPP_FAST_BACKEND={name!r}"
        raise ValueError(f"{op}: unknown {source}; expected 'auto' or one of {BACKENDS}")
    ok = {
        "reference": True,
        "aten": True,
        "cpp": has_extension() and device.type == "cpu",
        "cuda": has_cuda_extension() and device.type == "cuda",
        "triton": has_triton() and (device.type == "cuda" or triton_interpret()),
    }[name]
    if not ok:
        raise RuntimeError(
            f"{op}: backend {name!r} cannot run on {device.type} tensors here. {describe_backends()}"
        )
    return name
