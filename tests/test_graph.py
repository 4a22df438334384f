"""Tracing, site discovery and naming, segments, and the refusals of models tlc cannot analyse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tlc
from tlc.errors import TraceError, UnknownSiteError
from tlc.ops import register_activation


class SharedRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.c2(self.act(self.c1(x))))


def test_torchvision_resnet_sites_are_per_call():
    model = torchvision.models.resnet18(num_classes=3)
    x = torch.randn(1, 3, 32, 32)
    sites = tlc.find_sites(model, x)
    names = [s.name for s in sites]
    assert len(sites) == 17 and len(set(names)) == 17
    assert "layer1.0.relu#0" in names and "layer1.0.relu#1" in names and "relu" in names
    site = next(s for s in sites if s.name == "layer2.1.relu#0")
    assert (site.channels, site.channel_dim, site.activation, site.bn) == (128, 1, "relu", "layer2.1.bn1")
    assert next(s for s in sites if s.name == "layer2.1.relu#1").bn is None  # after the residual add
    assert names == [s.name for s in tlc.find_sites(model, x)]  # stable


def test_graph_print_lists_sites_and_segments():
    graph = tlc.trace(SharedRelu(), torch.randn(1, 3, 8, 8))
    text = str(graph)
    assert "act#0" in text and "act#1" in text and "segments:" in text
    assert graph.backend == "fx" and len(graph.segments) == 2


def test_functional_and_custom_activations():
    class Swishy(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    register_activation(Swishy, "swish")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(4, 8), nn.Linear(8, 2), Swishy()

        def forward(self, x):
            return self.fc2(self.act(F.gelu(self.fc1(x))))

    sites = tlc.find_sites(Net(), torch.randn(3, 4))
    assert [s.activation for s in sites] == ["gelu", "swish"]
    assert sites[1].name == "act"


def test_trace_does_not_touch_the_model():
    model = torchvision.models.mobilenet_v2(num_classes=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tlc.trace(model, torch.randn(2, 3, 32, 32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inplace_op_read_elsewhere_is_refused():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            z = torch.relu_(y)
            return z + y  # y was overwritten in place

    with pytest.raises(TraceError, match="in-place"):
        tlc.trace(Bad(), torch.randn(1, 3, 8, 8))


def test_untraceable_model_gets_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum().item() > 0:  # data-dependent Python control flow
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(TraceError, match="DataDependent cannot be traced"):
        tlc.trace(DataDependent(), torch.randn(2, 4))


def test_unknown_site_name_suggests_close_ones():
    model = SharedRelu()
    with pytest.raises(UnknownSiteError, match=r"no activation site named 'act#9'; did you mean act#1, act#0\?"):
        tlc.linearize(model, ["act#9"], torch.randn(1, 3, 8, 8))


def test_bad_example_inputs():
    with pytest.raises(TypeError, match="example_inputs"):
        tlc.trace(SharedRelu(), 3)
