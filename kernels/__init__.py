"""Triton kernels of mamlpp_fast, installed as ``mamlpp_fast.kernels``.

The source folder is the repository's top-level ``kernels/``; setup.py maps it onto the package.
Importing this package does not import Triton: each kernel module is loaded on first attribute
access (``mamlpp_fast.kernels.lslr_update``), so ``import mamlpp_fast`` works without Triton.
Inside this folder, import only relatively (a PyPI distribution named ``kernels`` exists).

Triton needs a GPU, or ``TRITON_INTERPRET=1`` set before the kernel module is imported to run
the kernels on CPU tensors in its interpreter (slow; for tests at small shapes).
"""

import importlib

_KERNEL_MODULES = ("lslr_update",)

__all__ = list(_KERNEL_MODULES)


def __getattr__(name: str):
    if name in _KERNEL_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
