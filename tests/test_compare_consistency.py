"""The latency ratio `compare` reports is consistent between two consecutive runs (within 15%)."""

from __future__ import annotations

import pytest
import torch

import tlc
from tlc.zoo.cifar import cifar_mobilenet_v2

from .helpers import randomize_bn


@pytest.mark.slow
def test_ratio_of_a_merged_model_is_stable_between_two_runs():
    model = randomize_bn(cifar_mobilenet_v2(width_mult=0.5)).eval()
    x = torch.randn(1, 3, 32, 32)
    deployed = tlc.merge(tlc.linearize(model, tlc.find_sites(model, x), x), x)
    ratios = [tlc.compare(model, deployed, x, batch_sizes=(1, 16), repeats=60, rounds=6).rows for _ in range(2)]
    for first, second in zip(*ratios):
        assert first["ratio"] > 1.0
        assert abs(first["ratio"] - second["ratio"]) / first["ratio"] < 0.15, (first["ratio"], second["ratio"])
