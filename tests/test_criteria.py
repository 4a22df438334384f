"""TLC criteria: Gaussian neuron model, measured statistics, loss gaps (prefix-cached = naive)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tlc
from tlc.criteria.gaussian import (
    bn_lens,
    channel_split,
    error_likelihood,
    off_probability,
    site_models,
    state_entropy,
)
from tlc.criteria.loss_gap import LossGaps
from tlc.criteria.stats import collect_site_stats

from .helpers import randomize_bn


def test_gaussian_formulas_on_known_values():
    mu = torch.tensor([1.0, -1.0, 0.0, 2.0, -0.5])
    sigma = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    torch.testing.assert_close(off_probability(mu, sigma),
                               torch.tensor([phi(-1), phi(1), 0.5, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(error_likelihood(mu, sigma),
                               torch.tensor([phi(-1), phi(-1), 0.5, 0.0, 0.0], dtype=torch.float64))
    assert channel_split(mu).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(state_entropy(torch.tensor([0.5, 0.0, 1.0])),
                               torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.fc1, self.act2, self.fc2 = nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(self.act2(self.fc1(x)))


def test_bn_lens_reads_gamma_and_beta():
    model = BNNet().eval()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        model.bn.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    graph = tlc.trace(model, torch.randn(2, 3, 8, 8))
    gamma, beta = bn_lens(graph, graph.site("act"))
    assert gamma.tolist() == [1.0, -2.0, 0.5, 3.0] and beta.tolist() == [0.5, -1.0, 0.0, 2.0]
    assert bn_lens(graph, graph.site("act2")) is None
    with pytest.raises(KeyError, match="measure"):
        site_models(graph, graph.sites)


def test_measured_statistics_of_a_known_distribution():
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU(inplace=True)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.act(x * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([0.0, 1.0, -3.0])))

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4000, 3, generator=g) for _ in range(3)]
    graph = tlc.trace(Shift(), batches[0][:2])
    stats = collect_site_stats(graph, graph.sites, batches)["act"]
    torch.testing.assert_close(stats.mean, torch.tensor([0.0, 1.0, -3.0], dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(stats.std, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), atol=0.03, rtol=0)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    expected_on = torch.tensor([0.5, phi(0.5), phi(-6)], dtype=torch.float64)
    torch.testing.assert_close(stats.on_fraction, expected_on, atol=0.02, rtol=0)
    assert stats.count == 12000  # read before the in-place ReLU: negative values were seen


def test_statistics_exclude_padding_tokens():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.act, self.out = nn.Embedding(10, 2), nn.GELU(), nn.Linear(2, 2)

        def forward(self, input_ids, attention_mask):
            return self.out(self.act(self.emb(input_ids))).mean(1)

    model = Tokens()
    with torch.no_grad():
        model.emb.weight.zero_()
        model.emb.weight[0] = torch.tensor([100.0, -100.0])  # id 0 is the padding token
        model.emb.weight[1] = torch.tensor([1.0, 3.0])
    ids = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    graph = tlc.trace(model, batch)
    stats = collect_site_stats(graph, graph.sites, [batch])["act"]
    assert stats.count == 3
    assert stats.mean.tolist() == [1.0, 3.0] and stats.std.tolist() == [0.0, 0.0]


def _naive_gap(model, names, masks, batches, x):
    lin = tlc.linearize(model, names, x, masks={n: masks[n] for n in names if masks.get(n) is not None},
                        exact=False).eval()
    total = base = 0.0
    with torch.no_grad():
        for inputs, labels in batches:
            total += F.cross_entropy(lin(inputs), labels, reduction="sum").item()
            base += F.cross_entropy(model(inputs), labels, reduction="sum").item()
    return (total - base) / sum(len(labels) for _, labels in batches)


def test_prefix_cached_gaps_equal_naive_gaps():
    from tlc.zoo.cifar import cifar_resnet18

    model = randomize_bn(cifar_resnet18(width=8, num_classes=5)).eval()
    x = torch.randn(2, 3, 16, 16)
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))) for _ in range(2)]
    graph = tlc.trace(model, x)
    masks = {s.name: (torch.arange(s.channels) % 3 != 0).float() for s in graph.sites}
    gaps = LossGaps(graph, batches)
    cached = gaps.single_gaps(masks)
    for name in [s.name for s in graph.sites][::4]:
        assert cached[name] == pytest.approx(_naive_gap(model, [name], masks, batches, x), abs=1e-5)
    joint = [graph.sites[1].name, graph.sites[6].name]
    got = gaps.gaps([{n: masks[n] for n in joint}])[0]
    assert got == pytest.approx(_naive_gap(model, joint, masks, batches, x), abs=1e-5)
    assert gaps.base_loss() > 0
