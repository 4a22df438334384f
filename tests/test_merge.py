"""merge: policies, cost model, channel removal, verification, and HF models through torch.export."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import tlc
from tlc.errors import VerificationError
from tlc.surgery import compose
from tlc.zoo.cifar import cifar_mobilenet_v2, cifar_resnet18

from .helpers import randomize_bn, rel_err, weight_layers


def _resnet():
    return randomize_bn(cifar_resnet18(width=8)).eval()


def test_merge_folds_every_batch_norm_and_keeps_the_model():
    model = _resnet().train()
    x = torch.randn(2, 3, 16, 16)
    dep = tlc.merge(model, x)
    assert model.training and not dep.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules())
    assert rel_err(model.eval()(x), dep(x)) < 1e-5


def test_policies_on_a_fully_linearized_mobilenet():
    model = randomize_bn(cifar_mobilenet_v2(width_mult=0.25)).eval()
    x = torch.randn(2, 3, 16, 16)
    sites = tlc.find_sites(model, x)
    results = {}
    for policy in ("never", "macs", "always"):
        lin = tlc.linearize(model, sites, x, policy=policy)
        dep = tlc.merge(lin, x)
        assert rel_err(lin(x), dep(x)) < 1e-4
        results[policy] = (tlc.measure.count_macs(lin, x), tlc.measure.count_macs(dep, x), tlc.measure.depth(dep, x))
    lin_macs = results["never"][0]
    assert results["never"][1] == lin_macs  # folds only
    assert results["macs"][1] <= lin_macs  # never adds MACs
    assert results["always"][2] < results["macs"][2] <= results["never"][2]


def test_default_policy_merges_a_linearized_inverted_residual_into_one_conv():
    model = randomize_bn(cifar_mobilenet_v2(width_mult=0.5)).eval()
    x = torch.randn(1, 3, 16, 16)
    block = "features.3.conv"  # stride-1 block with a residual connection
    names = [s.name for s in tlc.find_sites(model, x) if s.name.startswith(block)]
    assert len(names) == 2
    lin = tlc.linearize(model, names, x)
    dep = tlc.merge(lin, x)
    assert rel_err(lin(x), dep(x)) < 1e-5
    assert tlc.measure.count_macs(dep, x) < tlc.measure.count_macs(lin, x)
    assert tlc.measure.depth(dep, x) == tlc.measure.depth(model, x) - 2
    assert any("add" in r.replaces[-1] for r in dep.tlc_report.records)


def test_verification_catches_a_wrong_merge(monkeypatch):
    model = _resnet()
    x = torch.randn(1, 3, 16, 16)
    original = compose.scale_output_channels

    def corrupted(weight, bias, scale, shift=None):
        w, b = original(weight, bias, scale, shift)
        return w * 1.01, b

    monkeypatch.setattr(compose, "scale_output_channels", corrupted)
    with pytest.raises(VerificationError, match="bug in tlc's merge") as caught:
        tlc.merge(model, x)
    assert "when merged in float64" in str(caught.value)  # the float64 merge is wrong too


class _Cancelling(nn.Module):
    """h = (s*x0 + x1, s*x0), y = h0 - h1 = x1: exact in real arithmetic, but float32 rounds s*x0 + x1
    to about s*|x0|*6e-8, so the model's own float32 output is off by that much; merged, W2 @ W1 = [0, 1]."""

    def __init__(self, s: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[s, 1.0], [s, 0.0]]))
            self.fc2.weight.copy_(torch.tensor([[1.0, -1.0]]))

    def forward(self, x):
        return self.fc2(self.fc1(x))


def test_an_ill_conditioned_model_is_refused_as_such_not_as_a_bug():
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(VerificationError, match="ill-conditioned in float32") as caught:
        tlc.merge(_Cancelling(1e4), x, policy="always")
    assert "bug" not in str(caught.value)
    deployed64 = tlc.merge(_Cancelling(1e4).double(), x.double(), policy="always")  # the advice given works
    assert rel_err(x[:, 1:].double(), deployed64(x.double())) < 1e-12


def test_float32_noise_well_below_the_tolerance_is_accepted():
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    deployed = tlc.merge(_Cancelling(4.0), x, policy="always")
    assert deployed.tlc_report.max_relative_error < 1e-6


def test_shared_weights_are_left_unmerged_but_correct():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.fc(self.bn(self.fc(x)))

    model = randomize_bn(Tied()).eval()
    x = torch.randn(4, 5)
    dep = tlc.merge(model, x, policy="always")
    assert rel_err(model(x), dep(x)) < 1e-6
    assert tlc.measure.depth(dep, x) == 2


def test_hf_bert_ffn_collapses_to_one_linear_with_the_residual_folded():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    x = {"input_ids": torch.randint(5, 50, (2, 7)), "attention_mask": mask}
    sites = tlc.find_sites(model, x)
    assert [s.name for s in sites] == [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in (0, 1)]
    lin = tlc.linearize(model, sites, x)
    assert isinstance(lin, transformers.BertForSequenceClassification)
    dep = tlc.merge(lin, x)
    assert [r.layer for r in dep.tlc_report.records] == ["Linear(16->16)", "Linear(16->16)"]
    out = dep(**x)
    assert rel_err(lin(**x).logits, out.logits) < 1e-5
    other = {"input_ids": torch.randint(5, 50, (3, 11)), "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    assert rel_err(lin(**other).logits, dep(**other).logits) < 1e-5  # dynamic batch and length
    assert tlc.measure.depth(dep, x) == tlc.measure.depth(model, x) - 2
    half = tlc.merge(tlc.linearize(model, sites[:1], x), x)
    assert [s.name for s in tlc.find_sites(half, x)] == [sites[1].name]  # names survive the merge
    half = tlc.merge(tlc.linearize(model, sites[:1], x), x)
    assert [s.name for s in tlc.find_sites(half, x)] == [sites[1].name]  # names survive the merge


@pytest.mark.parametrize("rank,merged", [(4, False), (48, True)])
def test_linear_chain_is_kept_factorized_when_that_is_cheaper(rank, merged):
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(32, rank), nn.ReLU(), nn.Linear(rank, 32)

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    model = Chain().eval()
    x = torch.randn(4, 32)
    lin = tlc.linearize(model, ["act"], x)
    dep = tlc.merge(lin, x)
    assert rel_err(lin(x), dep(x)) < 1e-5
    layers = [m for m in dep.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == (1 if merged else 2)  # 32*32 MACs against 2*32*rank
    assert tlc.measure.count_macs(dep, x) == 4 * min(32 * 32, 2 * 32 * rank)


def test_block_with_projection_shortcut_folds_into_one_strided_conv():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1, self.r1 = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
            self.c2, self.b2 = nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
            self.proj = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
            self.r2 = nn.ReLU()

        def forward(self, x):
            return self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(x))))) + self.proj(x))

    model = randomize_bn(Block()).eval()
    x = torch.randn(2, 8, 15, 15)
    lin = tlc.linearize(model, ["r1"], x, policy="always")
    dep = tlc.merge(lin, x)
    assert rel_err(lin(x), dep(x)) < 1e-5
    convs = [m for m in dep.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].stride == (2, 2) and convs[0].kernel_size == (7, 7)
    assert [r.replaces[-1] for r in dep.tlc_report.records] == ["add(add)"]


@pytest.mark.parametrize("query", ["ndim", "dim"])
def test_a_rank_check_between_conv_and_batch_norm_does_not_stop_the_fold(query):
    class Checked(nn.Module):  # as timm's BatchNormAct2d: torch._assert(x.ndim == 4) before the norm
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            torch._assert((y.ndim if query == "ndim" else y.dim()) == 4, "expected a 4-D input")
            return self.bn(y)

    model = randomize_bn(Checked()).eval()
    x = torch.randn(2, 3, 8, 8)
    deployed = tlc.merge(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert rel_err(model(x), deployed(x)) < 1e-5


def test_hf_trace_of_a_one_row_example_is_quiet(caplog):
    """A batch-1 example (how tlc counts sites and MACs) must not make torch.export warn about specializing."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    x = {"input_ids": torch.randint(5, 50, (1, 7)), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    with caplog.at_level(logging.WARNING):
        assert len(tlc.find_sites(model, x)) == 1
    assert not [r for r in caplog.records if "specialized" in r.getMessage()]


def _collapse_all_off(model: nn.Module, x: torch.Tensor, names: list[str]) -> tuple[nn.Module, float, float]:
    """The training form with every channel of ``names`` off, and the MACs fraction its merge saves
    against the ranking's estimate of that saving."""
    from tlc.graph import trace
    from tlc.measure import count_macs
    from tlc.methods.tlc import collapse_savings

    channels = {s.name: s.channels for s in tlc.find_sites(model, x)}
    masks = {n: torch.zeros(channels[n]) for n in names}
    lin = tlc.linearize(model, names, x, masks=masks).eval()
    before, after = count_macs(tlc.merge(model, x), x), count_macs(tlc.merge(lin, x), x)
    estimate = collapse_savings(model, trace(model, x), masks, x, "macs")[tuple(names)]
    return lin, (before - after) / before, estimate


@pytest.mark.parametrize("site,shortcut,shallower", [
    ("layer1.1.relu1", "ChannelAffine", 2),  # identity shortcut: the block becomes a per-channel bias
    ("layer2.0.relu1", "Conv2d(8->16, 1x1, stride=2)", 1),  # projection shortcut: the constant joins its bias
])
def test_a_residual_block_whose_branch_is_constant_becomes_a_bias(site, shortcut, shallower):
    """With every channel of a basic block's first ReLU off, the branch is conv2(0) -> bn2: a constant. The
    merge drops both convolutions, adds the constant to the shortcut, and the ranking counts that saving."""
    from tlc.measure.structure import depth

    model, x = _resnet(), torch.randn(2, 3, 16, 16)
    lin, saved, estimate = _collapse_all_off(model, x, [site])
    dep = tlc.merge(lin, x)
    y = torch.randn(4, 3, 16, 16)
    assert rel_err(lin(y), dep(y)) < 1e-5
    assert weight_layers(dep) == weight_layers(tlc.merge(model, x)) - 2
    assert depth(dep, x) == depth(tlc.merge(model, x), x) - shallower
    assert saved > 0.05 and saved == pytest.approx(estimate, abs=1e-9)
    block = site.rsplit(".", 1)[0]
    record = next(r for r in dep.tlc_report.records if any(f"{block}.conv2" in op for op in r.replaces))
    assert record.layer == shortcut and record.weight_ops == (shortcut != "ChannelAffine")


class _ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.act0 = nn.Linear(6, 8), nn.ReLU()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.act0(self.fc0(x))
        return self.head(h + self.fc2(self.act(self.fc1(h))))


def test_a_constant_mlp_branch_folds_into_the_next_linear_layer():
    """The dense case (a transformer FFN): x + fc2(0) is x plus fc2's bias, which the head absorbs."""
    torch.manual_seed(0)
    model, x = _ResidualMLP().eval(), torch.randn(5, 6)
    lin, saved, estimate = _collapse_all_off(model, x, ["act"])
    dep = tlc.merge(lin, x)
    y = torch.randn(7, 6)
    assert rel_err(lin(y), dep(y)) < 1e-6
    assert rel_err(model.head(model.act0(model.fc0(y)) + model.fc2.bias), dep(y)) < 1e-6
    assert weight_layers(dep) == 2  # fc0 and the head with the branch's constant in its bias
    assert saved == pytest.approx(estimate, abs=1e-9)
