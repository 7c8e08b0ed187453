"""mamlpp_fast.tf32: TF32 switches read and set through the API each torch version has."""

from __future__ import annotations

import pytest
import torch

from mamlpp_fast.tf32 import conv_tf32_enabled, ieee_fp32

new_api = pytest.mark.skipif(not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"),
                             reason="torch without the fp32_precision API")


def test_ieee_fp32_turns_tf32_off_and_restores_the_settings():
    before = conv_tf32_enabled()
    with ieee_fp32():
        assert not conv_tf32_enabled()
    assert conv_tf32_enabled() == before


@new_api
@pytest.mark.parametrize("conv, cudnn, top, expected", [
    ("tf32", "none", "none", True), ("ieee", "tf32", "tf32", False),
    ("none", "tf32", "none", True), ("none", "none", "tf32", True), ("none", "none", "none", False),
])
def test_the_first_level_that_says_something_decides(conv, cudnn, top, expected):
    levels = [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cudnn, "fp32_precision"),
              (torch.backends, "fp32_precision")]
    before = [getattr(owner, name) for owner, name in levels]
    try:
        for (owner, name), value in zip(levels, (conv, cudnn, top)):
            setattr(owner, name, value)
        assert conv_tf32_enabled() is expected
    finally:
        for (owner, name), value in zip(levels, before):
            setattr(owner, name, value)


@new_api
def test_inside_the_block_the_new_api_reads_ieee_for_convolutions_and_matmuls():
    with ieee_fp32():
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
