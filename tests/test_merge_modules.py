"""Module-level merge functions: exact on random inputs, inputs never mutated, clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tlc.errors import MergeError
from tlc.surgery.merge import fold_bn, fold_residual, merge_convs, merge_linears

from .helpers import randomize_bn, rel_err


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("layer,bn,shape", [
    (nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, eps=1e-3), (2, 3, 9, 9)),
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), nn.BatchNorm2d(4), (2, 4, 9, 9)),
    (nn.Conv1d(3, 5, 5, stride=2), nn.BatchNorm1d(5), (2, 3, 20)),
    (nn.Linear(6, 5), nn.BatchNorm1d(5), (4, 6)),
])
def test_fold_bn(layer, bn, shape):
    randomize_bn(bn)
    layer.eval(), bn.eval()
    before = copy.deepcopy((layer, bn))
    x = torch.randn(*shape)
    folded = fold_bn(layer, bn)
    assert rel_err(bn(layer(x)), folded(x)) < 1e-6
    assert type(folded) is type(layer)
    assert _same_state(layer, before[0]) and _same_state(bn, before[1])


def test_merge_convs_strided_and_grouped():
    c1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    c2 = nn.Conv2d(8, 6, 3, stride=1, padding=0, groups=2)
    x = torch.randn(2, 4, 17, 17)
    merged = merge_convs(c1, c2)
    assert merged.kernel_size == (7, 7) and merged.stride == (2, 2) and merged.groups == 2
    assert rel_err(c2(c1(x)), merged(x)) < 1e-6


def test_merge_depthwise_stays_depthwise():
    c1 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    c2 = nn.Conv2d(8, 8, 3, groups=8)
    merged = merge_convs(c1, c2)
    assert merged.groups == 8 and merged.kernel_size == (5, 5)
    x = torch.randn(1, 8, 12, 12)
    assert rel_err(c2(c1(x)), merged(x)) < 1e-6


def test_merge_convs_refuses_inner_padding():
    with pytest.raises(MergeError, match="pads its input"):
        merge_convs(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))


def test_merge_linears():
    a, b = nn.Linear(5, 9), nn.Linear(9, 3)
    x = torch.randn(7, 5)
    assert rel_err(b(a(x)), merge_linears(a, b)(x)) < 1e-6
    with pytest.raises(MergeError):
        merge_linears(a, nn.Conv2d(1, 1, 1))


def test_fold_residual_conv_and_linear():
    conv = nn.Conv2d(6, 6, 5, padding=2)
    x = torch.randn(2, 6, 10, 10)
    assert rel_err(x + conv(x), fold_residual(conv)(x)) < 1e-6
    lin = nn.Linear(7, 7)
    t = torch.randn(3, 4, 7)
    assert rel_err(t + lin(t), fold_residual(lin)(t)) < 1e-6
    with pytest.raises(MergeError, match="stride"):
        fold_residual(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    with pytest.raises(MergeError, match="spatial size"):
        fold_residual(nn.Conv2d(4, 4, 3))
