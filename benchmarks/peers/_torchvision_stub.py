"""A stand-in for `torchvision`, installed in the benchmark process only, so that learn2learn
0.2.0 imports beside torch 2.13.0+cpu (no torchvision build on our indexes works with it:
"operator torchvision::nms does not exist"; see docs/toolchain.md).

learn2learn's vision and data modules import torchvision at import time (classes to subclass,
transforms built at module level). `l2l.algorithms.MAML` and `l2l.utils` never use it. Every
`torchvision` / `torchvision.*` module is an empty module whose missing attributes are inert
placeholder classes: they can be subclassed, called and instantiated, and do nothing.

`install()` only acts when the real torchvision cannot be imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__all__ = ["install"]


class _Placeholder:
    """Accepts any construction; any attribute is another placeholder."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs):
        return _Placeholder()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder()


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (_Placeholder,), {"__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []  # a package: submodules resolve through this finder too
        module.__version__ = "0.0.0+stub"
        return module

    def exec_module(self, module) -> None:
        pass


def install() -> bool:
    """Put the stub on sys.meta_path unless a working torchvision exists. Returns True if used."""
    if any(isinstance(f, _StubFinder) for f in sys.meta_path):
        return True
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _StubFinder())
    return True
