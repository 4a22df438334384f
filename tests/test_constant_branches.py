"""A per-channel constant stays constant through activations: layers behind an all-off site go.

A residual branch whose first site is all off becomes a bias on its shortcut even when a second
activation follows inside the branch (ResNet-50 bottleneck, MobileNetV2 inverted residual); in a plain
chain the layers in front of an all-off site are dropped and the constant is read from a tensor. A conv
that zero-pads a non-zero constant is not constant (its borders see 0) and stays; the structure comes
from the recorded zeros, so a saved deploy form reloads from a freshly built model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import Bottleneck

import tlc
from tlc.measure import depth
from tlc.surgery.constants import ChannelConstant

from .helpers import randomize_bn, rel_err, weight_layers


class _Net(nn.Module):
    """stem conv-bn-relu, one block, pooled linear head."""

    def __init__(self, block: nn.Module, width: int, out: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = block
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out, 5))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def _bottleneck(projection: bool = False) -> nn.Module:
    if projection:  # stride 2, 16 -> 32 channels: the shortcut is a 1x1 strided conv + bn
        down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        return _Net(Bottleneck(16, 8, stride=2, downsample=down), 16, 32)
    return _Net(Bottleneck(32, 8), 32, 32)


def _inverted_residual() -> nn.Module:
    return _Net(InvertedResidual(16, 16, 1, 6), 16, 16)


def _all_off(model: nn.Module, x: torch.Tensor, site: str) -> nn.Module:
    """The training form with every channel of ``site`` off."""
    channels = {s.name: s.channels for s in tlc.find_sites(model, x)}
    return tlc.linearize(model, [site], x, masks={site: torch.zeros(channels[site])}).eval()


@pytest.mark.parametrize("build,site,shortcut", [
    (_bottleneck, "block.relu#0", "ChannelAffine"),  # after bn1; relu#1 stays inside the branch
    (lambda: _bottleneck(projection=True), "block.relu#0", "Conv2d(16->32, 1x1, stride=2)"),
    (_inverted_residual, "block.conv.0.2", "ChannelAffine"),  # after the expansion; the dw ReLU6 stays
])
def test_a_branch_whose_first_site_is_all_off_becomes_a_bias(build, site, shortcut):
    torch.manual_seed(0)
    model, x = randomize_bn(build()).eval(), torch.randn(2, 3, 12, 12)
    lin = _all_off(model, x, site)
    dep = tlc.merge(lin, x)
    y = torch.randn(3, 3, 14, 14)  # another batch and size: nothing is tied to the example's shape
    assert rel_err(lin(y), dep(y)) <= 1e-5
    plain = tlc.merge(model, x)
    assert weight_layers(dep) == weight_layers(plain) - 3  # the branch's three convs are gone
    assert depth(dep, x) < depth(plain, x)
    assert not any(isinstance(m, ChannelConstant) for m in dep.modules())  # absorbed, not materialized
    record = next(r for r in dep.tlc_report.records if any("block.conv" in op for op in r.replaces))
    assert record.layer == shortcut and "add(add)" in record.replaces
    assert sum(op.startswith("conv(") for op in record.replaces) == 3 + (shortcut != "ChannelAffine")


class _Chain(nn.Module):
    """conv-bn-relu, a strided conv-bn-relu, a padded 3x3 conv-bn-relu, a 1x1 conv, pooled."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, second_bias: bool = True, bn: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.c1, self.b1, self.r1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=second_bias), norm(8), act()
        self.c3, self.b3, self.r3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c4 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.r1(self.b1(self.c1(x)))
        x = self.r2(self.b2(self.c2(x)))
        x = self.r3(self.b3(self.c3(x)))
        return self.c4(x).mean((2, 3))


@pytest.mark.parametrize("policy", ["macs", "never"])
def test_the_layers_in_front_of_an_all_off_site_are_dropped_and_padding_stays_exact(policy, tmp_path):
    """r1 all off: c2(0) -> b2 -> r2 is a per-channel constant c, read from a ChannelConstant; c1 and c2
    never run. c3 zero-pads c, so its border outputs differ from its inner ones: c3 stays a conv."""
    torch.manual_seed(0)
    model, x = randomize_bn(_Chain()).eval(), torch.randn(2, 3, 11, 11)
    lin = _all_off(model, x, "r1")
    dep = tlc.merge(lin, x, policy=policy)
    y = torch.randn(3, 3, 15, 13)
    assert rel_err(lin(y), dep(y)) <= 1e-5
    assert weight_layers(dep) == weight_layers(tlc.merge(model, x)) - 2  # c1 and c2
    constants = [m for m in dep.modules() if isinstance(m, ChannelConstant)]
    assert len(constants) == 1 and constants[0].value.numel() == 8
    assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.padding == (1, 1) for m in dep.modules())

    if policy == "macs":  # exported with a dynamic batch, checked by ONNX Runtime on another batch size too
        pytest.importorskip("onnxruntime")
        from tlc.io.export import export_onnx

        export_onnx(dep, x, tmp_path / "chain.onnx")
    seen = {}
    lin.c3.register_forward_hook(lambda m, i, o: seen.update(c3=o))
    lin(y)  # the padded conv of a constant: borders differ, so treating it as constant would be wrong
    assert (seen["c3"][:, :, 0, 0] - seen["c3"][:, :, 3, 3]).abs().max() > 1e-3


@pytest.mark.parametrize("act,constant_after", [(nn.ReLU, True), (nn.Softplus, False)])
def test_an_activation_keeps_a_zero_constant_zero_only_when_act_of_0_is_0(act, constant_after):
    """c2 has no bias and no batch norm: its output is 0. relu(0) = 0, so c3's padding pads 0 with 0 and
    c3 is constant too; softplus(0) = log 2, so c3's borders differ and c3 must stay."""
    torch.manual_seed(0)
    model, x = randomize_bn(_Chain(act, second_bias=False, bn=False)).eval(), torch.randn(2, 3, 11, 11)
    lin = _all_off(model, x, "r1")
    dep = tlc.merge(lin, x)
    y = torch.randn(2, 3, 9, 12)
    assert rel_err(lin(y), dep(y)) <= 1e-5
    convs = sum(isinstance(m, nn.Conv2d) for m in dep.modules())
    assert convs == (0 if constant_after else 2)  # c3 and c4 are constants, or run on the constant


@pytest.mark.parametrize("build,site", [
    (_bottleneck, "block.relu#0"),
    (_inverted_residual, "block.conv.0.2"),
    (lambda: _Chain(second_bias=False), "r1"),
])
def test_a_collapsed_branch_reloads_from_a_freshly_built_model(build, site, tmp_path):
    """A fresh model's batch norms have shift 0: planned from its own values, b2 -> r2 would be 0 and
    the layers after it constants too. The recorded zeros rebuild the saved structure instead."""
    torch.manual_seed(0)
    model, x = randomize_bn(build()).eval(), torch.randn(2, 3, 12, 12)
    deployed = tlc.merge(_all_off(model, x, site), x)
    tlc.save(deployed, tmp_path / "run", example_inputs=x)
    loaded = tlc.load(tmp_path / "run", model=build())
    assert sorted(loaded.state_dict()) == sorted(deployed.state_dict())
    y = torch.randn(3, 3, 12, 12)
    assert rel_err(deployed(y), loaded(y)) <= 1e-6


class _ProjectedBlock(nn.Module):
    """c0-relu, a block (c1-b1-r1-c2-b2 + 1x1 projection) then r2 and a padded 3x3 conv c3."""

    def __init__(self):
        super().__init__()
        self.c0, self.r0 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.c1, self.b1, self.r1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.proj = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.r2, self.c3 = nn.ReLU(), nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        h = self.r0(self.c0(x))
        return self.c3(self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(h))))) + self.proj(h)))


def test_moving_padding_across_a_sum_grows_its_constant_term_exactly():
    """r1 all off and r2 linearized: c3's padding moves onto the projection, and the constant branch
    must grow as much. c2 reads 0, so padding it more keeps b2 constant; the training form stays the
    function the deploy form computes (one conv from r0's output)."""
    torch.manual_seed(0)
    model, x = randomize_bn(_ProjectedBlock()).eval(), torch.randn(2, 3, 10, 10)
    lin = tlc.linearize(model, ["r1", "r2"], x, {"r1": torch.zeros(8)}).eval()
    assert lin._tlc_record["paddings"] == {"c3": [0, 0], "c2": [2, 2], "proj.0": [1, 1]}
    dep = tlc.merge(lin, x)
    y = torch.randn(3, 3, 13, 11)
    assert rel_err(lin(y), dep(y)) <= 1e-5
    assert weight_layers(dep) == 2  # c0, and c3 with the projection and the branch's constant folded in


def test_a_site_behind_an_all_off_site_is_dead_and_tlc_does_not_propose_it(monkeypatch):
    """The second site of an inverted residual all off: the expand layers and the first site feed only the
    constant, the deploy form drops them, so collapsing the first site would change nothing."""
    import tlc.methods.tlc as tlc_method
    from tlc.graph import trace
    from tlc.methods.base import build_configs
    from tlc.run.config import RunContext
    from tlc.surgery.plan import dead_sites

    torch.manual_seed(0)
    block = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 1), InvertedResidual(8, 8, 1, 4), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    names = [s.name for s in tlc.find_sites(block, x)]
    first, second = names[0], names[1]
    lin = _all_off(block, x, second)
    assert dead_sites(trace(block, x)) == set() and dead_sites(trace(lin, x)) == {first}
    # the first all off instead: the second reads a constant and is one (relu6(c)), computed by nothing
    assert dead_sites(trace(_all_off(block, x, first), x)) == {second}
    seen = {}

    def capture(*args, exclude=(), **kwargs):
        seen["exclude"] = list(exclude)
        raise tlc_method.NoCandidate("captured")

    monkeypatch.setattr(tlc_method, "select", capture)
    run, own = build_configs(tlc_method.TLC)
    context = RunContext(run, x, [], None, None, None, torch.device("cpu"), progress=False)
    with pytest.raises(tlc_method.NoCandidate):
        tlc_method.TLC(own).propose(lin, trace(lin, x), context, ["elsewhere"])
    assert seen["exclude"] == ["elsewhere", first]
