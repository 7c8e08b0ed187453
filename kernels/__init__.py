"""Triton kernels of mamlpp_fast, installed as ``mamlpp_fast.kernels``.

The source folder is the repository's top-level ``kernels/``; setup.py maps it onto the package.
Importing this package does not import Triton: each kernel module (``kernels/<op>.py``) is loaded
on first use, ``import mamlpp_fast.kernels.<op>`` or attribute access ``mamlpp_fast.kernels.<op>``,
so ``import mamlpp_fast`` works without Triton. Inside this folder, import only relatively
(a PyPI distribution named ``kernels`` exists).

Triton needs a GPU, or ``TRITON_INTERPRET=1`` set before a kernel module is imported to run the
kernels on CPU tensors in its interpreter (slow; for tests at small shapes).
"""

import importlib


def __getattr__(name: str):
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the kernel module exists but one of its imports (e.g. triton) does not
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
