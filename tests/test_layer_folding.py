"""Layer Folding (docs/methods.md): every site mixed with the identity, its regularizer and clamp, folds that
merge exactly for each activation kind (behind a batch norm or not, padding moved), and the method end to end
through the loop (exact merge, shallower, save/load, resume)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tlc
from tlc.edits import apply_edits
from tlc.graph import trace
from tlc.measure import depth
from tlc.methods.base import NoCandidate, build_configs, method_class
from tlc.methods.layer_folding import LayerFolding, LayerFoldingConfig
from tlc.run.config import RunContext
from tlc.surgery.learnable import LearnRound, MakeLearnable, MixActivation, learnable_modules
from tlc.train import FitConfig

from .helpers import (
    compress_on_digits,
    randomize_bn,
    rel_err,
    same_weights,
    second_fine_tuning_interrupted,
    trained_briefly,
    weight_layers,
)


class SmallCNN(nn.Module):
    """conv-(bn)-act-conv-(bn)-act, pool, fc. Folding act1 merges the two 3x3 convolutions into one 5x5 (1 -> 8
    channels: fewer MACs); folding act2 saves nothing (the pool follows)."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, bn: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 8, 3, padding=1), norm(8), act()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), norm(8), act()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _context(preset: str = "default", **overrides) -> tuple[RunContext, LayerFoldingConfig]:
    run, own = build_configs(LayerFolding, preset, overrides)
    data = TensorDataset(X, torch.tensor([0, 1]))
    return RunContext(run, X, [(X, torch.tensor([0, 1]))], data, data, None, torch.device("cpu"), progress=False), own


def test_paper_mixes_every_site_and_default_only_those_whose_fold_pays():
    model = SmallCNN().eval()
    run, own = _context("paper")
    assert LayerFolding(own).prepare(model, run) == [MakeLearnable(("act1", "act2"), "mix", 0.0)]
    run, own = _context()
    assert LayerFolding(own).prepare(model, run) == [MakeLearnable(("act1",), "mix", 0.1)]


def test_when_no_fold_pays_the_stop_reason_says_so():
    class Pooled(nn.Module):  # the only site feeds a pool: folding it merges nothing
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(1, 4, 3), nn.ReLU()
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))

    model = Pooled().eval()
    run, own = _context()
    method = LayerFolding(own)
    assert method.prepare(model, run) == []
    with pytest.raises(NoCandidate, match=r"none of the 1 activation site\(s\) pays: .* saves no MACs"):
        method.propose(model, trace(model, X), run, [])


@pytest.mark.parametrize("act, bn", [(nn.ReLU, True), (nn.ReLU6, False), (nn.GELU, True), (nn.SiLU, False),
                                     (nn.Hardswish, True)])
def test_a_site_at_one_folds_into_an_exact_merge(act, bn):
    """The paper's schedule at the fold: every site at a = 1 becomes the identity; the padding moved by the
    linearization keeps the merged 5x5 convolution exact."""
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN(act, bn)).eval()
    run, own = _context("paper")
    method = LayerFolding(own)
    (edit,) = method.prepare(model, run)
    learnable, _ = apply_edits(model, [edit, LearnRound(1, 0)], X)
    for module in learnable_modules(learnable).values():
        assert isinstance(module, MixActivation) and module.replaces == act.__name__.lower()
        module.weight.data.fill_(1.3)
    method.after_step(learnable)  # the clamp
    assert [m.value for m in learnable_modules(learnable).values()] == [1.0, 1.0]
    fold = method.propose(learnable, trace(learnable, X), run, [])
    assert fold.sites == ["act1", "act2"] and fold.evidence["fold"] and not fold.evidence["regularized"]
    folded, _ = apply_edits(learnable.eval(), fold.edits, X)
    assert method.loss(folded, X, None, None) is None  # nothing left to regularize
    deployed = tlc.merge(folded, X)
    with torch.no_grad():
        assert rel_err(folded(X), deployed(X)) <= 1e-4
    assert weight_layers(deployed) == 2 and depth(deployed, X) == 2  # one 5x5 convolution, the classifier


def test_the_regularizer_and_the_clamp():
    model = SmallCNN().eval()
    run, own = _context(init=0.5)
    method = LayerFolding(own)
    learnable, _ = method.prepare(model, run)[0].apply(model, X)
    (a,) = learnable_modules(learnable).values()
    assert float(method.loss(learnable, X, None, None).detach()) == pytest.approx(0.25 * 0.75)
    learnable.train()
    optimizer = torch.optim.SGD(learnable.parameters(), lr=1.0)
    for _ in range(5):
        optimizer.zero_grad()
        method.loss(learnable, X, None, None).backward()
        optimizer.step()
        method.after_step(learnable)
    assert a.value == 1.0  # pulled up, clamped at 1
    assert method.has_fit_hooks()


def test_config_is_checked():
    for bad in (dict(init=1.5), dict(threshold=0.0), dict(rounds=0), dict(patience=0), dict(lambda_reg=-0.1)):
        with pytest.raises(ValueError):
            LayerFoldingConfig(**bad)
    assert method_class("layer_folding") is LayerFolding
    run, own = build_configs(LayerFolding, "paper")
    assert (own.lambda_reg, own.threshold, own.init, own.rounds, own.paying_only) == (0.25, 0.9, 0.0, 1, False)
    assert run.finetune.lr == 1e-3 and run.finetune.epochs == 100 and run.continue_past_budget


# ============================================================================ end to end

FAST = dict(finetune=FitConfig(epochs=1.0, lr=0.05, batch_size=32, weight_decay=0.0), calibration_size=64,
            calibration_batch_size=32, max_steps=2, latency_repeats=3, max_acc_drop=100.0, init=0.85,
            lambda_reg=1.0)
_compress = partial(compress_on_digits, "layer_folding", FAST)


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    return trained_briefly(SmallCNN(), digits[1])




def test_compress_folds_into_an_exact_shallower_model_that_loads_back(trained, digits, tmp_path):
    data, _, _ = digits
    result = _compress(trained, digits, tmp_path / "run")
    first, second = result.steps
    assert first.sites == [] and second.sites == ["act1"] and second.evidence["values"]["act1"] >= 0.9
    assert result.compressed["depth"] == result.original["depth"] - 1
    x = data.example_inputs(4)
    with torch.no_grad():
        assert rel_err(result.training_model.eval()(x), result.model(x)) < 1e-4
        assert torch.equal(tlc.load(tmp_path / "run", model=SmallCNN())(x), result.model(x))
    assert (tmp_path / "run" / "report.json").is_file() and result.report["method"] == "layer_folding"


def test_paper_preset_folds_once_and_resumes_with_identical_weights(trained, digits, tmp_path, monkeypatch):
    """Every site mixed from a = 0.85: one regularized round, then the fold of those at >= 0.9 and a fine-tuning
    without the regularizer, where a site that did not fold keeps its trained a."""
    full = _compress(trained, digits, tmp_path / "full", preset="paper", max_steps=None)
    assert [s.evidence["fold"] for s in full.steps] == [False, True] and full.steps[1].sites
    assert full.compressed["depth"] < full.original["depth"]
    with second_fine_tuning_interrupted(monkeypatch):
        _compress(trained, digits, tmp_path / "cut", preset="paper", max_steps=None)
    resumed = _compress(trained, digits, tmp_path / "cut", preset="paper", resume=True, max_steps=None)
    assert [s.evidence for s in resumed.steps] == [s.evidence for s in full.steps]
    assert resumed.stop_reason == full.stop_reason
    assert same_weights(resumed.training_model, full.training_model)


def test_with_no_step_within_the_budget_the_result_is_the_original_not_its_prepared_mix(trained, digits, tmp_path):
    """The mix starts at a = 0.85, which changes what the network computes before any step: when no step fits
    the budget, the result must be the original as given (no make_learnable edit), not that prepared model."""
    data, _, _ = digits
    result = _compress(trained, digits, tmp_path / "run", max_acc_drop=0.0, max_steps=1,
                       finetune=FitConfig(epochs=0.1, lr=0.5, batch_size=32))
    assert result.chosen_step == 0 and result.edits == [] and result.report["sites_collapsed"] == []
    x = data.example_inputs(4)
    with torch.no_grad():
        assert rel_err(trained(x), result.model(x)) < 1e-5
        assert rel_err(trained(x), tlc.load(tmp_path / "run", model=SmallCNN())(x)) < 1e-5
    assert result.compressed["val_accuracy"] == result.original["val_accuracy"]
