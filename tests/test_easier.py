"""EASIER: the entropy of activation states, the step it proposes, and the method end to end through the loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import tlc
from tlc.criteria.entropy import channel_entropy, layer_entropy, site_entropies
from tlc.graph import trace
from tlc.methods.base import NoCandidate, build_configs, method_class
from tlc.methods.easier import EASIER, EASIERConfig, measure
from tlc.run.config import RunContext
from tlc.train import FitConfig
from tlc.zoo.data import load_data
from tlc.zoo.models import build_model

from .helpers import rel_err, same_weights, second_fine_tuning_interrupted

H_QUARTER = 0.8112781244591328  # bits of a channel ON a quarter of the time


def test_channel_and_layer_entropy_of_known_on_fractions():
    p = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.75])
    assert channel_entropy(p).tolist() == pytest.approx([0.0, 0.0, 1.0, H_QUARTER, H_QUARTER], abs=1e-12)
    assert layer_entropy(p) == pytest.approx((1.0 + 2 * H_QUARTER) / 5, abs=1e-12)  # EASIER: every channel
    assert layer_entropy(p, nondegenerate_only=True) == pytest.approx((1.0 + 2 * H_QUARTER) / 3, abs=1e-12)
    assert layer_entropy(torch.tensor([0.0, 1.0]), nondegenerate_only=True) == 0.0  # nothing switches


class Probe(nn.Module):
    """x in {1, 2, 3, 4} -> fc1 -> relu1 -> fc2 -> relu2 -> head, with the pre-activations set by hand.

    relu1's channels are ON for x > 0, 2, 3, 10: fractions 1, 1/2, 1/4, 0 of uniform x.
    relu2's channels read relu1's channel 0 (= x): ON for x + 1 > 0, -x - 1 > 0, x - 2.5 > 0 (1, 0, 1/2);
    ``dead`` turns every channel of relu2 off."""

    def __init__(self, inplace: bool = False, dead: bool = False):
        super().__init__()
        self.fc1, self.relu1 = nn.Linear(1, 4), nn.ReLU(inplace=inplace)
        self.fc2, self.relu2 = nn.Linear(4, 3), nn.ReLU()
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc1.weight.fill_(1.0)
            self.fc1.bias.copy_(torch.tensor([0.0, -2.0, -3.0, -10.0]))
            self.fc2.weight.zero_()
            self.fc2.weight[:, 0] = torch.tensor([1.0, -1.0, 1.0])
            self.fc2.bias.copy_(torch.tensor([-100.0, -1.0, -100.0]) if dead else torch.tensor([1.0, -1.0, -2.5]))

    def forward(self, x):
        return self.head(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


X = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(3).unsqueeze(1)  # each value a quarter of the samples
Y = torch.arange(12) % 2
ON1, ON2 = [1.0, 0.5, 0.25, 0.0], [1.0, 0.0, 0.5]
H1, H2 = (1.0 + H_QUARTER) / 4, 1.0 / 3


@pytest.mark.parametrize("inplace", [False, True])
def test_site_entropies_of_a_model_with_known_pre_activations(inplace):
    model = Probe(inplace=inplace).eval()
    graph = trace(model, X[:2])
    batches = [(X[:5], Y[:5]), (X[5:], Y[5:])]  # pooled over the batches, not averaged per batch
    measured = site_entropies(graph, batches)
    assert list(measured) == ["relu1", "relu2"]
    assert measured["relu1"][1].tolist() == ON1 and measured["relu2"][1].tolist() == ON2
    assert measured["relu1"][0] == pytest.approx(H1, abs=1e-12)
    assert measured["relu2"][0] == pytest.approx(H2, abs=1e-12)
    only = site_entropies(graph, [X], sites=["relu1"], nondegenerate_only=True)  # plain inputs work too
    assert list(only) == ["relu1"] and only["relu1"][0] == pytest.approx((1.0 + H_QUARTER) / 2, abs=1e-12)


def _context(preset: str = "default", **overrides) -> tuple[RunContext, EASIERConfig]:
    run, own = build_configs(EASIER, preset, overrides)
    data = TensorDataset(X, Y)
    return RunContext(run, X[:2], [(X, Y)], data, data, None, torch.device("cpu"), progress=False), own


def _propose(model, preset="default", exclude=(), **overrides):
    run, own = _context(preset, **overrides)
    return EASIER(own).propose(model, trace(model, X[:2]), run, list(exclude))


def test_default_takes_the_lowest_entropy_site_removing_its_never_on_channels():
    proposal = _propose(Probe().eval())
    (edit,) = proposal.edits
    assert edit.site_names == ("relu2",) and edit.masks == {"relu2": (1, 0, 1)}
    ev = proposal.evidence
    assert ev["site"] == "relu2" and ev["entropy"] == pytest.approx(H2)
    assert ev["candidates"] == {"relu1": pytest.approx(H1)}
    assert (ev["removed_channels"], ev["linearized_channels"], ev["entropy_data"]) == (1, 2, "calibration")
    nxt = _propose(Probe().eval(), exclude=["relu2"]).edits[0]  # set aside after a rejected step
    assert nxt.site_names == ("relu1",) and nxt.masks == {"relu1": (1, 1, 1, 0)}
    with pytest.raises(NoCandidate, match="no candidate left"):
        _propose(Probe().eval(), exclude=["relu1", "relu2"])


def test_paper_preset_makes_the_lowest_entropy_site_the_identity_measured_on_training_data():
    proposal = _propose(Probe().eval(), "paper")
    (edit,) = proposal.edits
    assert edit.site_names == ("relu2",) and edit.masks == {"relu2": None}
    assert proposal.evidence["entropy_data"] == "train" and proposal.evidence["removed_channels"] == 0
    run, own = build_configs(EASIER, "paper")
    assert (own.entropy_data, own.remove_off_channels, own.latency_aware) == ("train", False, False)
    assert run.finetune.epochs == 160 and run.finetune.milestones == (0.5, 0.75) and not run.retry_single
    assert run.continue_past_budget and run.stop_accuracy == 0.2 and run.min_activations == 1


def test_an_all_off_site_is_skipped_by_default_where_it_disconnects_the_output():
    dead = Probe(dead=True).eval()  # relu2: 0 bits, but removing every channel leaves a constant output
    assert _propose(dead).evidence["site"] == "relu1"
    paper = _propose(dead, "paper").edits[0]  # the identity there is harmless
    assert paper.site_names == ("relu2",) and paper.masks == {"relu2": None}
    with pytest.raises(NoCandidate):
        _propose(dead, exclude=["relu1"])


def test_latency_aware_choice_among_near_equal_entropies():
    """relu1's collapse saves more MACs (fc1 and fc2 become one 1x3 layer) than relu2's; within near_equal
    bits of the lowest entropy (relu2's) the larger saving wins, outside it the entropy decides."""
    ev = _propose(Probe().eval(), near_equal=0.5).evidence
    assert ev["savings"]["relu1"] > ev["savings"]["relu2"] > 0
    assert ev["site"] == "relu1" and ev["candidates"] == {"relu2": pytest.approx(H2)}
    assert _propose(Probe().eval(), near_equal=0.1).evidence["site"] == "relu2"  # 0.12 bits apart
    assert _propose(Probe().eval(), near_equal=0.5, latency_aware=False).evidence["site"] == "relu2"


def test_config_is_checked():
    with pytest.raises(ValueError, match="entropy_data"):
        EASIERConfig(entropy_data="test")
    with pytest.raises(ValueError, match="entropy_samples"):
        EASIERConfig(entropy_samples=0)
    assert method_class("easier") is EASIER


# ============================================================================ end to end

FAST = dict(finetune=FitConfig(epochs=0.3, lr=0.01, batch_size=32), calibration_size=64, calibration_batch_size=32,
            max_steps=2, latency_repeats=3, max_acc_drop=100.0, entropy_samples=96)
FAST_NEAR = EASIERConfig().near_equal  # the default preset may take a site this much above the lowest


@pytest.fixture(scope="module")
def digits():
    data = load_data("digits", seed=0, image_size=16, augment=True)  # the run fine-tunes on augmented images
    return data, Subset(data.train, range(192)), Subset(data.val, range(64))


@pytest.fixture(scope="module")
def trained():
    plain = load_data("digits", seed=0, image_size=16)
    torch.manual_seed(0)
    model, spec = build_model("tlc:tiny_cnn", num_classes=10, in_channels=1, width=16)
    tlc.train.fit(model, Subset(plain.train, range(192)),
                  FitConfig(epochs=15, lr=1e-2, optimizer="adamw", batch_size=16, weight_decay=0.0), progress=False)
    return model.eval(), spec


def _compress(trained, digits, out=None, preset="default", resume=False, **overrides):
    model, spec = trained
    data, train, val = digits
    return tlc.compress(model, train, val, method="easier", preset=preset, **{**FAST, **overrides},
                        example_inputs=data.example_inputs(2), out_dir=out, resume=resume, progress=False, log=None,
                        model_spec=spec.to_json(), data_spec="digits")


def test_compress_with_easier_gives_an_exact_shallower_model_that_loads_back(trained, digits, tmp_path):
    data, _, _ = digits
    result = _compress(trained, digits, tmp_path / "run")
    assert [s.step for s in result.steps] == [1, 2] and result.stop_reason == "max_steps (2) reached"
    for step in result.steps:
        assert step.sites == [step.evidence["site"]] and step.evidence["entropy_data"] == "calibration"
        assert step.evidence["entropy"] <= min(step.evidence["candidates"].values()) + FAST_NEAR
    assert result.steps[0].evidence["site"] not in result.steps[1].evidence["candidates"]
    assert result.compressed["activations"] == result.original["activations"] - 2
    x = data.example_inputs(4)
    with torch.no_grad():
        assert rel_err(result.training_model.eval()(x), result.model(x)) < 1e-4
        assert torch.equal(tlc.load(tmp_path / "run")(x), result.model(x))
    assert (tmp_path / "run" / "report.json").is_file() and (tmp_path / "run" / "steps.csv").is_file()
    assert result.report["method"] == "easier"


def test_paper_preset_resumes_after_an_interruption_with_identical_weights(trained, digits, tmp_path, monkeypatch):
    """The paper's protocol (its 20% accuracy floor lifted: the toy model falls below it once its first
    activation goes) draws augmented training images for the entropy; a resumed run draws the same ones."""

    paper = dict(preset="paper", stop_accuracy=None)
    full = _compress(trained, digits, tmp_path / "full", **paper)
    assert [s.step for s in full.steps] == [1, 2]
    for step in full.steps:  # the identity: no channel removed, every one linearized
        assert step.evidence["entropy_data"] == "train" and step.evidence["removed_channels"] == 0
        assert step.evidence["linearized_channels"] > 0 and step.removed_channels == 0
    with second_fine_tuning_interrupted(monkeypatch):
        _compress(trained, digits, tmp_path / "cut", **paper)
    resumed = _compress(trained, digits, tmp_path / "cut", resume=True, **paper)
    assert [s.sites for s in resumed.steps] == [s.sites for s in full.steps]
    assert [s.evidence for s in resumed.steps] == [s.evidence for s in full.steps]
    assert same_weights(resumed.training_model, full.training_model)



def test_training_data_entropy_is_a_fixed_draw_that_leaves_the_random_state_alone(trained, digits):
    """The augmented training sample is the same whatever the random state (a resumed run measures what
    the uninterrupted one did), and measuring it does not move the run's random state."""
    model, _ = trained
    data, train, val = digits
    run_config, own = build_configs(EASIER, "paper", {"entropy_samples": 64, "calibration_batch_size": 32})
    run = RunContext(run_config, data.example_inputs(2), [], train, val, None, torch.device("cpu"), progress=False)
    graph = trace(model, data.example_inputs(2))
    names = [s.name for s in graph.sites]
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        draws.append(measure(graph, run, own, names))
        assert torch.equal(torch.get_rng_state(), before)
    for name in names:
        assert draws[0][name][0] == draws[1][name][0] and torch.equal(draws[0][name][1], draws[1][name][1])
