"""Shared fixtures. Tests import the INSTALLED mamlpp_fast (pytest runs in importlib mode and the
repository root is never on sys.path); tests/test_packaging.py checks that."""

from __future__ import annotations

import pytest
import torch


def _cuda() -> bool:
    # Called lazily (at collection of parametrized cases / in fixtures), never at import time.
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = None
    for item in items:
        if "cuda" in item.keywords:
            if skip_cuda is None:
                skip_cuda = pytest.mark.skip(reason="needs a CUDA device") if not _cuda() else False
            if skip_cuda:
                item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    return request.param


@pytest.fixture
def no_tf32():
    """TF32 off for CUDA convolutions and matmuls during the test, on every torch version."""
    from mamlpp_fast.tf32 import ieee_fp32

    with ieee_fp32():
        yield
