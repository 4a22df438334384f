"""Learnable activations (tlc.surgery.learnable): sites under torch.fx and torch.export, exact merge at 1 and
after the snap, the regularizers, the replay on load, ranking and ONNX export with them in the network, and
the round planner both methods share."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tlc
from tlc.criteria.loss_gap import LossGaps
from tlc.edits import Linearize, apply_edits, edit_from_json
from tlc.errors import SpecError
from tlc.graph import find_sites, trace
from tlc.measure import depth
from tlc.surgery.learnable import (
    LearnableActivation,
    LearnRound,
    MakeLearnable,
    MixActivation,
    PReLUActivation,
    learnable_modules,
    plan_round,
    regularizer,
)
from tlc.surgery.merge import merge

from .helpers import randomize_bn, rel_err, weight_layers

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
MLP = ["act", "act2"]


class Head(nn.Module):
    """conv-bn-relu (in place), pool, then an MLP head fc1-gelu-dropout-fc2-relu-fc3. ``export_only`` adds a
    branch on a shape, which torch.fx cannot trace (torch.export does)."""

    def __init__(self, export_only: bool = False):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.fc1, self.act, self.drop = nn.Linear(16, 24), nn.GELU(), nn.Dropout()
        self.fc2, self.act2, self.fc3 = nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 3)
        self.export_only = export_only
        randomize_bn(self)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.relu(self.bn(self.conv(x))), 2).flatten(1)
        if self.export_only and x.shape[0] > 0:
            x = x * 2.0
        return self.fc3(self.act2(self.fc2(self.drop(self.act(self.fc1(x))))))


def _learnable(form: str, export_only: bool = False, value: float | None = None) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = Head(export_only).eval()
    learnable, _ = MakeLearnable(("relu", *MLP), form, 0.3).apply(model, X)
    if value is not None:
        with torch.no_grad():
            for module in learnable_modules(learnable).values():
                module.weight.fill_(value)
    return model, learnable.eval()


@pytest.mark.parametrize("export_only", [False, True])
@pytest.mark.parametrize("form", ["prelu", "mix"])
def test_learnable_activations_are_sites_with_the_names_they_replace(form, export_only):
    model, learnable = _learnable(form, export_only)
    before = find_sites(model, X)
    graph = trace(learnable, X)
    assert graph.backend == ("export" if export_only else "fx")
    assert [s.name for s in graph.sites] == [s.name for s in before] == ["relu", *MLP]
    assert [s.channels for s in graph.sites] == [s.channels for s in before]
    modules = learnable_modules(learnable)
    assert list(modules) == ["relu", *MLP]
    kind = PReLUActivation if form == "prelu" else MixActivation
    assert all(type(m) is kind and m.value == pytest.approx(0.3) for m in modules.values())
    if not export_only:  # one node per site, labelled by its form
        labels = ["prelu"] * 3 if form == "prelu" else ["mix:relu", "mix:gelu", "mix:relu"]
        assert [s.activation for s in graph.sites] == labels
    with torch.no_grad():  # on a ReLU site both forms at 0.3 are a PReLU of slope 0.3
        assert modules["relu"](torch.tensor([-2.0, 3.0])).tolist() == pytest.approx([-0.6, 3.0])


@pytest.mark.parametrize("export_only", [False, True])
@pytest.mark.parametrize("form", ["prelu", "mix"])
def test_at_one_the_site_merges_exactly_and_stays_exact_once_snapped(form, export_only):
    _, learnable = _learnable(form, export_only, value=1.0)
    with torch.no_grad():
        reference = learnable(X)
        assert rel_err(reference, merge(learnable, X)(X)) <= 1e-4
        snapped, (applied,) = apply_edits(learnable, [Linearize.of({n: None for n in MLP})], X)
        assert applied.site_names == tuple(MLP)
        assert rel_err(reference, snapped(X)) <= 1e-4  # at 1 the snap changes nothing
        deployed = merge(snapped, X)
        assert rel_err(reference, deployed(X)) <= 1e-4
    assert [s.name for s in trace(snapped, X).sites] == ["relu"]
    assert list(learnable_modules(snapped)) == ["relu"]  # the one not snapped keeps its module
    assert depth(deployed, X) == depth(learnable, X) - 2  # fc1, fc2, fc3 -> one layer


def test_a_snapped_conv_site_merges_exactly_with_its_padding_moved():
    """conv(pad 1)-bn-mix-conv(pad 1): the snap moves the second padding so the merged 5x5 conv is exact."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 3, 3, padding=1))).eval()
    learnable, _ = MakeLearnable(("2",), "mix", 0.95).apply(model, X)
    snapped, (applied,) = apply_edits(learnable.eval(), [Linearize.of({"2": None})], X)
    assert applied.paddings  # recorded for the replay
    deployed = merge(snapped, X)
    with torch.no_grad():
        assert rel_err(snapped(X), deployed(X)) <= 1e-4
    assert weight_layers(deployed) == 1


def test_the_regularizers_pull_the_parameter_towards_one():
    torch.manual_seed(0)
    for form, start, strength in (("prelu", 0.01, 0.2), ("mix", 0.3, 0.25)):
        _, learnable = _learnable(form, value=start)
        learnable.train()
        modules = learnable_modules(learnable)
        term = regularizer(learnable, strength)
        expected = sum((start - 1) ** 2 if form == "prelu" else abs(1 - start ** 2) for _ in modules)
        assert float(term.detach()) == pytest.approx(strength * expected, rel=1e-5)
        optimizer = torch.optim.SGD(learnable.parameters(), lr=0.2)
        for _ in range(10):  # the regularizer alone; the task loss takes part through the forward (DDP-safe)
            optimizer.zero_grad()
            (learnable(X).square().mean() * 0 + regularizer(learnable, strength)).backward()
            optimizer.step()
        assert all(abs(m.value - 1) < abs(start - 1) - 0.1 for m in modules.values()), form
        assert all(m.weight.grad is not None for m in modules.values())
    assert regularizer(learnable, 1.0, PReLUActivation) is None  # only the mix sites there
    for module in modules.values():
        module.regularized = False
    assert regularizer(learnable, 1.0) is None


def test_mix_is_clamped_and_crosses_at_its_threshold():
    mix = MixActivation("s", "relu", 1.4, function=F.relu)
    mix.clamp_()
    assert mix.value == 1.0 and mix.near_linear(0.9)
    mix.weight.data.fill_(-0.2)
    mix.clamp_()
    assert mix.value == 0.0 and not mix.near_linear(0.9)
    prelu = PReLUActivation("s", 0.96)
    assert prelu.near_linear(0.05) and not PReLUActivation("s", 0.94).near_linear(0.05)
    assert isinstance(prelu, LearnableActivation) and prelu.penalty().item() == pytest.approx(0.0016, rel=1e-5)


def test_an_in_place_activation_is_mixed_out_of_place():
    """The trained mix reads x twice: the wrapped in-place ReLU must not overwrite it (else backward fails)."""
    _, learnable = _learnable("mix", value=0.5)
    learnable.train()
    learnable(X).sum().backward()
    assert learnable_modules(learnable)["relu"].weight.grad is not None


def test_edits_round_trip_and_replay_on_a_fresh_model(tmp_path):
    model, learnable = _learnable("prelu")
    with torch.no_grad():
        learnable_modules(learnable)["act2"].weight.fill_(0.97)
    edits = [MakeLearnable(("relu", *MLP), "prelu", 0.3), LearnRound(2, 1), Linearize.of({"act": None})]
    for edit in edits:
        assert edit_from_json(edit.to_json()) == edit
    trained, applied = apply_edits(learnable, edits[1:], X)
    assert learnable_modules(trained)["act2"].round == 2 and learnable_modules(trained)["act2"].idle == 1
    deployed = merge(trained.eval(), X)
    tlc.save(deployed, tmp_path / "d", example_inputs=X, edits=[edits[0], *applied])
    loaded = tlc.load(tmp_path / "d", model=Head())  # a fresh model: its own random weights
    with torch.no_grad():
        assert torch.equal(loaded(X), deployed(X))
    assert [s.name for s in trace(loaded, X).sites] == ["relu", "act2"]
    with pytest.raises(SpecError, match="already a learnable"):
        MakeLearnable(("act2",), "mix").apply(learnable, X)
    with pytest.raises(SpecError, match="form"):
        MakeLearnable(("act",), "swish")
    for bad in ({"kind": "make_learnable", "site_names": "act"}, {"kind": "make_learnable", "site_names": ["act"],
                "init": "nan"}, {"kind": "learn_round", "number": -1}, {"kind": "learn_round", "number": 1,
                                                                          "regularized": "yes"}):
        with pytest.raises(SpecError):  # a recipe.json is data from elsewhere
            edit_from_json(bad)


def test_ranking_sees_a_learnable_site_at_one_as_linear():
    _, learnable = _learnable("mix", value=0.2)
    with torch.no_grad():
        learnable_modules(learnable)["act2"].weight.fill_(1.0)
    labels = torch.tensor([0, 1, 2, 0])
    gaps = LossGaps(trace(learnable, X), [(X, labels)]).single_gaps({"act": None, "act2": None})
    assert abs(gaps["act2"]) < 1e-5 and abs(gaps["act"]) > 1e-4


@pytest.mark.parametrize("form", ["prelu", "mix"])
def test_onnx_export_of_a_deploy_form_with_learnable_sites(form, tmp_path):
    pytest.importorskip("onnxruntime")
    _, learnable = _learnable(form, value=0.4)
    path = tlc.export_onnx(merge(learnable, X), X, tmp_path / "m.onnx")  # verified against PyTorch
    assert path.is_file()


def _with(model: nn.Module, **state) -> nn.Module:
    for module in learnable_modules(model).values():
        for key, value in state.items():
            setattr(module, key, value)
    return model


def test_plan_round_without_a_schedule_snaps_what_crossed_and_stops_after_patience():
    _, learnable = _learnable("prelu", value=0.5)
    first = plan_round(learnable, [], 0.05, None, 2)
    assert first.snap == () and first.learn == LearnRound(1, 1) and not first.fold  # trains first
    modules = learnable_modules(learnable)
    modules["act"].weight.data.fill_(0.97)
    modules["act2"].weight.data.fill_(1.01)
    _with(learnable, round=1, idle=1)
    plan = plan_round(learnable, [], 0.05, None, 2)
    assert plan.snap == ("act2", "act") and plan.learn == LearnRound(2, 0)  # nearest to linear first
    assert plan_round(learnable, ["act2"], 0.05, None, 2).snap == ("act",)  # set aside: not snapped
    _with(learnable, round=3, idle=2)
    assert isinstance(plan_round(learnable, ["act", "act2"], 0.05, None, 2), str)  # patience spent
    assert plan_round(learnable, ["act", "act2"], 0.05, None, 3).learn == LearnRound(4, 3)


def test_plan_round_with_a_schedule_trains_then_folds_once():
    _, learnable = _learnable("mix", value=0.95)
    plan = plan_round(learnable, [], 0.9, 1, 1)
    assert plan.snap == () and plan.learn == LearnRound(1, 0)  # crossed already, but the schedule trains first
    _with(learnable, round=1)
    fold = plan_round(learnable, ["relu"], 0.9, 1, 1)
    assert fold.fold and set(fold.snap) == set(MLP) and fold.learn == LearnRound(2, 0, regularized=False)
    _with(learnable, round=2, regularized=False)
    assert plan_round(learnable, [], 0.9, 1, 1) == "folded after 1 round(s) of training"
    assert plan_round(Head(), [], 0.9, 1, 1) == "no learnable activation left"
