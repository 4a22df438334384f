"""LayerCollapse (docs/methods.md): which activations it makes PReLUs, its regularizer, the steps it proposes,
and the method end to end through the loop (exact merge, shallower, save/load, resume)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tlc
from tlc.graph import trace
from tlc.methods.base import NoCandidate, build_configs, method_class
from tlc.methods.layer_collapse import LayerCollapse, LayerCollapseConfig, between_fc_layers
from tlc.run.config import RunContext
from tlc.surgery.learnable import LearnRound, MakeLearnable, PReLUActivation, learnable_modules
from tlc.train import FitConfig

from .helpers import (
    compress_on_digits,
    rel_err,
    same_weights,
    second_fine_tuning_interrupted,
    trained_briefly,
)


class HeadCNN(nn.Module):
    """conv-bn-relu, pool, then the classifier fc-relu-dropout-fc-relu-fc (two MLP activations)."""

    def __init__(self, hidden: int = 32, bottleneck: int | None = None):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        mid = bottleneck or hidden
        self.classifier = nn.Sequential(nn.Linear(32, mid), nn.ReLU(), nn.Dropout(0.1), nn.Linear(mid, hidden),
                                        nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _context(preset: str = "default", **overrides) -> tuple[RunContext, LayerCollapseConfig]:
    run, own = build_configs(LayerCollapse, preset, overrides)
    data = TensorDataset(X, torch.tensor([0, 1]))
    return RunContext(run, X, [(X, torch.tensor([0, 1]))], data, data, None, torch.device("cpu"), progress=False), own


def _prepare(model: nn.Module, preset: str = "default", **overrides) -> list:
    run, own = _context(preset, **overrides)
    return LayerCollapse(own).prepare(model.eval(), run)


def test_the_activations_between_two_fully_connected_layers():
    model = HeadCNN().eval()
    graph = trace(model, X)
    assert [s.name for s in graph.sites if between_fc_layers(graph, s)] == ["classifier.1", "classifier.4"]


def test_paper_takes_the_deepest_half_and_default_only_what_pays_in_the_merge():
    """With a 4-wide bottleneck, collapsing classifier.1 would turn 32x4 + 4x32 MACs into 32x32: the merge
    keeps them factorized, so the default preset leaves that activation alone."""
    (paper,) = _prepare(HeadCNN(), "paper")
    assert paper == MakeLearnable(("classifier.4",), "prelu", 0.01)  # deepest half (of 2: one)
    narrow = HeadCNN(bottleneck=4)
    assert _prepare(narrow, "paper", fraction=1.0)[0].site_names == ("classifier.1", "classifier.4")
    assert _prepare(narrow, fraction=1.0)[0].site_names == ("classifier.4",)
    assert _prepare(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)), "paper") == []


def test_the_regularizer_and_the_steps_it_proposes():
    model = HeadCNN().eval()
    run, own = _context(threshold=0.05, patience=2)
    method = LayerCollapse(own)
    (edit,) = method.prepare(model, run)
    learnable, _ = edit.apply(model, X)
    first = method.propose(learnable, trace(learnable, X), run, [])  # nothing trained yet: a round
    assert first.sites == [] and first.edits == [LearnRound(1, 1)] and first.evidence["snapped"] == []
    learnable, _ = first.edits[0].apply(learnable, X)
    (alpha,) = learnable_modules(learnable).values()
    assert isinstance(alpha, PReLUActivation) and alpha.value == pytest.approx(0.01)
    term = method.loss(learnable, X, None, None)
    assert float(term.detach()) == pytest.approx(0.2 * 0.99 ** 2, rel=1e-5)
    with torch.no_grad():
        alpha.weight.fill_(0.97)
    step = method.propose(learnable, trace(learnable, X), run, [])
    assert step.sites == ["classifier.4"] and step.edits[-1] == LearnRound(2, 0) and step.fallback is None
    assert step.evidence["values"] == {"classifier.4": pytest.approx(0.97)}
    with pytest.raises(NoCandidate, match="2 round"):  # set aside, and two rounds in a row with nothing
        method.propose(LearnRound(3, 2).apply(learnable, X)[0], trace(learnable, X), run, ["classifier.4"])


def test_the_slopes_train_at_their_own_rate_under_a_transformers_fine_tuning_rate():
    """AdamW at 2e-5 moves a parameter by about 2e-5 a step: the slopes get ``param_lr`` (default 0.01) instead,
    the rest of the network keeps its rate; the paper preset leaves them at the network's."""
    model = HeadCNN().eval()
    run, own = _context()
    method = LayerCollapse(own)
    (edit,) = method.prepare(model, run)
    learnable, _ = edit.apply(model, X)
    (site, alpha), = learnable_modules(learnable).items()
    names = method.param_lr(learnable)
    assert names == {n: 0.01 for n, p in learnable.named_parameters() if p is alpha.weight}
    assert LayerCollapse(_context("paper")[1]).param_lr(learnable) == {}
    data = TensorDataset(X.repeat(8, 1, 1, 1), torch.tensor([0, 1] * 8))
    conv_before = learnable.conv.weight.detach().clone()
    tlc.train.fit(learnable, data, FitConfig(epochs=2.0, lr=2e-5, optimizer="adamw", batch_size=4, warmup_steps=0,
                                            schedule="constant", weight_decay=0.0),
                  hooks=tlc.train.FitHooks(loss=method.loss, param_lr=method.param_lr), progress=False)
    assert alpha.value > 0.01 + 8 * 0.005  # 8 steps at about 0.01 each towards 1
    assert (learnable.conv.weight - conv_before).abs().max() < 8 * 2e-5 * 1.5


def test_config_is_checked():
    for bad in (dict(fraction=0.0), dict(order="width"), dict(threshold=0.0), dict(rounds=0), dict(patience=0),
                dict(lc=-1.0)):
        with pytest.raises(ValueError):
            LayerCollapseConfig(**bad)
    assert method_class("layer_collapse") is LayerCollapse
    run, own = build_configs(LayerCollapse, "paper")
    assert (own.lc, own.threshold, own.init, own.fraction, own.order, own.rounds) == (0.2, 0.05, 0.01, 0.5, "depth", 1)
    assert not own.paying_only and run.continue_past_budget and not run.retry_single


# ============================================================================ end to end

FAST = dict(finetune=FitConfig(epochs=1.0, lr=0.05, batch_size=32, weight_decay=0.0), calibration_size=64,
            calibration_batch_size=32, max_steps=2, latency_repeats=3, max_acc_drop=100.0, init=0.9, lc=1.0,
            threshold=0.1)
_compress = partial(compress_on_digits, "layer_collapse", FAST)


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    return trained_briefly(HeadCNN(), digits[1])




def test_compress_collapses_the_trained_slope_into_an_exact_shallower_model(trained, digits, tmp_path):
    data, _, _ = digits
    result = _compress(trained, digits, tmp_path / "run")
    first, second = result.steps
    assert first.sites == [] and first.evidence["round"] == 1  # trains first
    assert second.sites == ["classifier.4"] and abs(second.evidence["values"]["classifier.4"] - 1) < 0.1
    assert result.compressed["depth"] == result.original["depth"] - 1
    assert result.compressed["activations"] == result.original["activations"] - 1
    x = data.example_inputs(4)
    with torch.no_grad():
        assert rel_err(result.training_model.eval()(x), result.model(x)) < 1e-4
        assert torch.equal(tlc.load(tmp_path / "run", model=HeadCNN())(x), result.model(x))
    assert (tmp_path / "run" / "report.json").is_file() and result.report["method"] == "layer_collapse"
    assert result.report["sites_collapsed"] == ["classifier.4"]


def test_paper_preset_collapses_once_and_resumes_with_identical_weights(trained, digits, tmp_path, monkeypatch):
    full = _compress(trained, digits, tmp_path / "full", preset="paper", max_steps=None)
    assert [s.evidence["fold"] for s in full.steps] == [False, True]
    assert full.stop_reason == "no learnable activation left"  # the fold snapped the only one
    assert full.steps[1].sites == ["classifier.4"] and not full.steps[1].evidence["regularized"]
    with second_fine_tuning_interrupted(monkeypatch):
        _compress(trained, digits, tmp_path / "cut", preset="paper", max_steps=None)
    resumed = _compress(trained, digits, tmp_path / "cut", preset="paper", resume=True, max_steps=None)
    assert [s.evidence for s in resumed.steps] == [s.evidence for s in full.steps]
    assert same_weights(resumed.training_model, full.training_model)
    assert same_weights(resumed.model, full.model)
