"""NEPENTHE (docs/methods.md): the budget allocation and magnitude masks by hand, the prunable layers of a
residual net, pruned weights kept at zero through fine-tuning, zero-entropy sites linearized, and the
method end to end through the loop (evidence, exact merge, save/load, resume)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

import tlc
from tlc.criteria.pruning import allocate, magnitude_masks, prunable_layers
from tlc.edits import Linearize, WeightMask, apply_edits
from tlc.errors import TLCError
from tlc.graph import trace
from tlc.methods.base import NoCandidate, build_configs, method_class
from tlc.methods.nepenthe import NEPENTHE, NEPENTHEConfig, round_target, rounds_done
from tlc.run.config import RunConfig, RunContext
from tlc.run.loop import compress
from tlc.train import FitConfig, FitHooks, fit
from tlc.zoo.data import load_data

from .helpers import rel_err, same_weights, second_fine_tuning_interrupted

FAST = RunConfig(finetune=FitConfig(epochs=0.3, lr=0.01, batch_size=32), calibration_size=64,
                 calibration_batch_size=32, max_steps=2, latency_repeats=3, max_acc_drop=100.0)


class _Block(nn.Module):
    """conv-bn-relu1-conv-bn, plus the shortcut (a 1x1 projection when the shape changes), then relu2."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + (x if self.down is None else self.down(x)))


class _ResNet(nn.Module):
    """stem (conv-bn-relu), an identity block, a projection block, pool, classifier."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.relu = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.b1, self.b2 = _Block(4, 4, 1), _Block(4, 8, 2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.b2(self.b1(self.relu(self.bn(self.stem(x))))).mean((2, 3)))


LAYERS = {"relu": "stem.weight", "b1.relu1": "b1.conv1.weight", "b1.relu2": "b1.conv2.weight",
          "b2.relu1": "b2.conv1.weight", "b2.relu2": "b2.conv2.weight"}


@pytest.fixture(scope="module")
def digits():
    data = load_data("digits", seed=0, image_size=16)
    return data, Subset(data.train, range(256)), Subset(data.val, range(96))


@pytest.fixture(scope="module")
def trained(digits):
    _, train, _ = digits
    torch.manual_seed(0)
    model = _ResNet()
    fit(model, train, FitConfig(epochs=2, lr=0.05, batch_size=32), progress=False)
    return model.eval()


def _run(model, digits, out=None, **overrides):
    data, train, val = digits
    return compress(model, train, val, method="nepenthe", config=FAST, example_inputs=data.example_inputs(2),
                    out_dir=out, progress=False, log=None, **overrides)


# ============================================================================ criteria


def test_allocate_by_hand():
    scores = {"a": 1.0, "b": 1.0, "c": 2.0, "dead": 0.0}
    room = {"a": 1000, "b": 1000, "c": 1000, "dead": 1000}
    # S = 1 + 1 + 2 = 4 (the zero score takes no part); S/s = 4, 4, 2; softmax: e^4 / (2 e^4 + e^2) =
    # 1 / (2 + e^-2) = 0.468311 for a and b, e^-2 / (2 + e^-2) = 0.063379 for c. Of 100: 46.83, 46.83, 6.34;
    # floors 46 + 46 + 6 = 98, the 2 units left to the largest fractions (a, b).
    assert allocate(scores, room, 100) == {"a": 47, "b": 47, "c": 6, "dead": 0}
    # a holds 20 only: capped; the other 80 go to b and c as e^4 : e^2, b = 80 / (1 + e^-2) = 70.4638 and
    # c = 9.5362; floors 70 + 9 = 79, the unit left to c (.536 > .464).
    assert allocate(scores, {**room, "a": 20}, 100) == {"a": 20, "b": 70, "c": 10, "dead": 0}
    # b holds 60 too: its 70.46 is capped in turn and c takes the 20 left.
    assert allocate(scores, {**room, "a": 20, "b": 60}, 100) == {"a": 20, "b": 60, "c": 20, "dead": 0}
    uneven = allocate({"x": 0.3, "y": 0.7, "z": 1.1}, {"x": 50, "y": 400, "z": 400}, 333)
    assert sum(uneven.values()) == 333 and uneven["x"] == 50  # the lowest score first, up to its cap
    with pytest.raises(ValueError, match="cannot prune"):
        allocate(scores, {**room, "a": 20, "b": 60, "c": 10}, 100)  # 90 left where the scores are positive


def test_the_schedule_reads_its_rounds_back():
    assert [round_target(1000, 0.5, k) for k in range(4)] == [1000, 500, 250, 125]
    assert [rounds_done(round_target(1000, 0.5, k), 1000, 0.5, 9) for k in range(10)] == list(range(10))
    assert rounds_done(501, 1000, 0.5, 9) == 0 and rounds_done(3, 1000, 0.5, 3) == 3
    assert round_target(3, 0.1, 1) == 2  # at least one weight per round


def test_magnitude_masks_prune_the_smallest_and_keep_earlier_zeros():
    w = torch.tensor([[0.5, -0.1, 9.0, 2.0], [-0.05, 0.3, -3.0, 0.2]])
    current = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # 9.0 was pruned before
    other = torch.randn(5)
    masks = magnitude_masks({"w": w, "o": other}, {"w": 3}, {"w": current})
    # the 3 smallest |w| still kept: 0.05, 0.1, 0.2; 9.0 stays pruned although it is the largest
    assert masks["w"].tolist() == [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]
    assert torch.equal(masks["o"], torch.ones(5)) and current[0, 2] == 0  # no count: unchanged; input untouched
    with pytest.raises(ValueError, match="cannot prune 8"):
        magnitude_masks({"w": w}, {"w": 8}, {"w": current})


def test_prunable_layers_are_the_convolutions_before_the_sites():
    x = torch.randn(2, 1, 16, 16)
    model = _ResNet().eval()
    assert prunable_layers(trace(model, x)) == LAYERS  # not b2.down.0 (the shortcut) nor fc
    lin = tlc.linearize(model, ["b1.relu1"], x)
    assert prunable_layers(trace(lin, x)) == {k: v for k, v in LAYERS.items() if k != "b1.relu1"}


# ============================================================================ the method's pieces


def _context(x, data, calibration):
    return RunContext(RunConfig(), x, calibration, data, data, None, torch.device("cpu"), progress=False)


def test_after_step_keeps_pruned_weights_exactly_zero_through_fit():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    data = TensorDataset(torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,)))
    model = _ResNet()
    method = NEPENTHE()
    method.prepare(model, _context(x, data, []))
    params = dict(model.named_parameters())
    masks = {p: (torch.rand_like(params[p]) > 0.5).float() for p in LAYERS.values()}
    pruned, _ = apply_edits(model, [WeightMask.of(masks)], x)
    plain = _ResNet()
    plain.load_state_dict(pruned.state_dict())
    before = {n: p.detach().clone() for n, p in pruned.named_parameters()}
    config = FitConfig(epochs=2, lr=0.1, batch_size=16)
    fit(pruned, data, config, progress=False, hooks=FitHooks(loss=method.loss, after_step=method.after_step))
    fit(plain, data, config, progress=False)
    for name, mask in masks.items():
        weight = dict(pruned.named_parameters())[name]
        assert torch.all(weight[mask == 0] == 0)  # exactly zero after 8 optimizer steps with momentum
        assert not torch.equal(weight[mask == 1], before[name][mask == 1])  # the others did train
        assert torch.any(dict(plain.named_parameters())[name][mask == 0] != 0)  # without the hooks they move
    with pytest.raises(TLCError, match="loss hook"):
        method.after_step(_ResNet())


def test_zero_entropy_sites_are_linearized_and_left_out_of_the_allocation():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    model = _ResNet().eval()
    for bn, bias in (("b1.bn1", -10.0), ("b2.bn1", 10.0)):  # b1.relu1 always OFF, b2.relu1 always ON
        model.get_submodule(bn).weight.data.fill_(0.01)
        model.get_submodule(bn).bias.data.fill_(bias)
    calibration = [(torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,)))]
    method = NEPENTHE()
    run = _context(x, TensorDataset(*calibration[0]), calibration)
    method.prepare(model, run)
    proposal = method.propose(model, trace(model, x), run, [])
    linearize, prune = proposal.edits
    assert isinstance(linearize, Linearize) and linearize.sites == ("b1.relu1", "b2.relu1")
    assert linearize.masks == {"b1.relu1": (0, 0, 0, 0), "b2.relu1": (1,) * 8}
    evidence = proposal.evidence
    assert evidence["entropy"]["b1.relu1"] == evidence["entropy"]["b2.relu1"] == 0.0
    assert set(evidence["allocation"]) <= {"stem.weight", "b1.conv2.weight", "b2.conv2.weight"}
    # 1188 prunable weights (36 + 144 + 144 + 288 + 576); the conv1s leave the active ones with their sites:
    # 756 active, round 1 allows round(1188 / 2) = 594, so 162 are pruned.
    assert evidence["pruned"] == 162 and evidence["active"] == 594 / 1188 and evidence["rounds_done"] == 1
    assert isinstance(prune, WeightMask) and sum(prune.sparsity.values()) > 0
    assert proposal.fallback is not None and [type(e) for e in proposal.fallback.edits] == [WeightMask]
    aside = method.propose(model, trace(model, x), run, ["b2.relu1"])  # set aside: not linearized again
    assert aside.edits[0].sites == ("b1.relu1",) and aside.evidence["pruned"] == 162
    after, _ = apply_edits(model, proposal.edits, x)
    one_round = NEPENTHE(NEPENTHEConfig(rounds=1))
    one_round.prepare(model, run)
    with pytest.raises(NoCandidate, match="1 pruning rounds done"):  # read back from the weights and sites
        one_round.propose(after, trace(after, x), run, [])
    model.bn.bias.data.fill_(-10.0)  # the stem's relu all OFF: every later site sees constants
    dead = method.propose(model, trace(model, x), run, [])
    assert dead.evidence["entropy"]["relu"] == dead.evidence["entropy"]["b1.relu2"] == 0.0
    assert dead.sites == ["b1.relu1", "b2.relu1"]  # relu and b1.relu2 all OFF where the whole signal passes


def test_presets():
    run, own = build_configs(NEPENTHE, "paper")
    assert (own.rounds, own.rho, run.finetune.epochs, run.finetune.lr, run.finetune.milestones) == (
        9, 0.5, 160.0, 0.1, (0.5, 0.75))
    assert not run.retry_single and run.continue_past_budget
    run, own = build_configs(NEPENTHE, "default")
    assert run.finetune == RunConfig().finetune and run.rejection_patience == 1 and own.linearize_at_zero_entropy


# ============================================================================ end to end


def test_compress_prunes_rho_of_the_active_weights_per_round_and_merges_exactly(trained, digits, tmp_path):
    data, _, val = digits
    assert method_class("nepenthe") is NEPENTHE
    result = _run(trained, digits, tmp_path / "run")
    assert [s.step for s in result.steps] == [1, 2] and result.stop_reason == "max_steps (2) reached"
    evidence = [s.evidence for s in result.steps]
    assert [e["round"] for e in evidence] == [1, 2] == [e["rounds_done"] for e in evidence]
    total = sum(dict(trained.named_parameters())[p].numel() for p in LAYERS.values())
    # half of the active prunable weights go per round: 1188 -> 594 -> 297 active
    assert [e["active"] for e in evidence] == [round_target(total, 0.5, k) / total for k in (1, 2)] == [0.5, 0.25]
    assert evidence[0]["sparsity"] == 0.5 and evidence[0]["linearized"] == []
    # round 1 took b1.relu2's entropy to 0: round 2 linearizes it, its 144 weights leave the active ones
    # (pruned no further) and the other layers lose the rest of the round's half
    assert evidence[1]["linearized"] == result.steps[1].sites == ["b1.relu2"]
    assert evidence[1]["layer_sparsity"]["b1.conv2.weight"] == evidence[0]["layer_sparsity"]["b1.conv2.weight"]
    assert evidence[1]["sparsity"] == pytest.approx(0.5 + (594 - 297 - 144 * (1 - evidence[0]["layer_sparsity"][
        "b1.conv2.weight"])) / total)
    assert result.compressed["activations"] == result.original["activations"] - 1
    params = dict(result.training_model.named_parameters())
    for name, sparsity in evidence[-1]["layer_sparsity"].items():  # every pruned weight is still exactly zero
        assert int((params[name] == 0).sum()) == round(sparsity * params[name].numel())
    x = torch.stack([val[i][0] for i in range(8)])
    with torch.no_grad():
        assert rel_err(result.training_model.eval()(x), result.model(x)) < 1e-4
        assert torch.equal(tlc.load(tmp_path / "run", model=_ResNet())(x), result.model(x))
    assert (tmp_path / "run" / "report.json").is_file() and result.report["method"] == "nepenthe"


def test_resume_after_an_interruption_gives_the_same_weights(trained, digits, tmp_path, monkeypatch):
    full = _run(trained, digits, tmp_path / "full")
    with second_fine_tuning_interrupted(monkeypatch):
        _run(trained, digits, tmp_path / "cut")
    resumed = _run(trained, digits, tmp_path / "cut", resume=True)
    assert [s.evidence for s in resumed.steps] == [s.evidence for s in full.steps]
    assert same_weights(resumed.training_model, full.training_model)
