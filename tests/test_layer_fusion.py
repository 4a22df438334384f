"""Layer Fusion (docs/methods.md): the similarity measures, the tie edit, tied weights through merge, save/load,
ONNX and measurement, and the method end to end through the loop (report, resume)."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tlc
from tlc.criteria.similarity import (
    candidate_pairs,
    cosine,
    linear_cka,
    output_cka,
    similarities,
    weight_wasserstein,
)
from tlc.edits import TieWeights, edit_from_json, tied_layers
from tlc.errors import SpecError
from tlc.io.recipe import weights_bytes
from tlc.measure import count_params
from tlc.methods.base import NoCandidate, build_configs, method_class
from tlc.methods.layer_fusion import LayerFusion, LayerFusionConfig
from tlc.run.config import RunContext
from tlc.surgery.merge import merge
from tlc.train import FitConfig

from .helpers import (
    compress_on_digits,
    rel_err,
    same_weights,
    second_fine_tuning_interrupted,
    trained_briefly,
)


class Stack(nn.Module):
    """A stem conv-bn, three conv-bn-relu blocks of one shape, two linear-relu layers of one shape, a head."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                                                   nn.ReLU()) for _ in range(3)])
        self.mlp = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = x.mean((2, 3))
        for layer in self.mlp:
            x = torch.relu(layer(x))
        return self.head(x)


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
BLOCK_WEIGHT = [8, 8, 3, 3]


def _stack(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack().eval()


def _fused(model: nn.Module) -> tuple[nn.Module, list[TieWeights]]:
    """``model`` with blocks 0 and 2 tied, then block 1 joining them (a tie of three), and the two MLP layers."""
    first, second = TieWeights.from_fields([("blocks.0.0", "blocks.2.0")]), \
        TieWeights.from_fields([("blocks.1.0", "blocks.0.0"), ("mlp.0", "mlp.1")])
    fused, _ = first.apply(model, X)
    fused, _ = second.apply(fused, X)
    return fused, [first, second]


# ============================================================================ similarity


def test_the_measures_on_weights_with_known_answers():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert cosine(a, 2 * a) == pytest.approx(1.0) and cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == pytest.approx(0.0)
    values = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert weight_wasserstein(values, values.flip(0)) == pytest.approx(0.0)  # the same values, in any order
    assert weight_wasserstein(values, values + 0.5) == pytest.approx(0.5)
    assert weight_wasserstein(values, torch.tensor([0.0, 1.0, 2.0, 7.0])) == pytest.approx(1.0)  # 4 moved by 4 / 4


def test_linear_cka_with_known_answers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    assert linear_cka(x, 3 * x @ q + 1) == pytest.approx(1.0)  # orthogonal transform, isotropic scale, shift
    u = torch.tensor([1.0, -1.0, 1.0, -1.0])  # two centred, orthogonal features of equal norm
    v = torch.tensor([1.0, 1.0, -1.0, -1.0])
    assert linear_cka(torch.stack([u, v], 1), u[:, None]) == pytest.approx(1 / math.sqrt(2))


def test_cka_of_layer_outputs_over_several_batches():
    """``b`` computes twice what ``a`` does: CKA 1 over any batches; ``c`` reads another input: below 1."""

    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False), nn.Linear(4, 3)
            with torch.no_grad():
                self.b.weight.copy_(2 * self.a.weight)

        def forward(self, x):
            return self.a(x) + self.b(x) + self.c(x.flip(1) ** 2)

    torch.manual_seed(0)
    model = Three()
    batches = [(torch.randn(16, 4), torch.zeros(16, dtype=torch.long)) for _ in range(3)]
    pairs = candidate_pairs(model, by_name=False)
    assert [p.name for p in pairs] == ["a=b"]  # c has a bias: another shape of layer
    assert output_cka(model, batches, pairs) == {"a=b": pytest.approx(1.0)}
    model.c.bias = None
    (ab, ac, bc) = candidate_pairs(model, by_name=False)
    values = similarities(model, [ab, ac], "cka", batches)
    assert values["a=b"] == pytest.approx(1.0) and values["a=c"] < 0.9


def test_candidate_pairs_by_type_shape_and_name():
    model = _stack()
    assert [p.name for p in candidate_pairs(model)] == [
        "blocks.0.0=blocks.1.0", "blocks.0.0=blocks.2.0", "blocks.1.0=blocks.2.0", "mlp.0=mlp.1"]
    model.extra = nn.Linear(8, 8)  # the MLP's shape, another name: a candidate only without the name rule
    assert "mlp.0=extra" not in [p.name for p in candidate_pairs(model)]
    assert "mlp.0=extra" in [p.name for p in candidate_pairs(model, by_name=False)]
    fused, _ = _fused(_stack())
    assert candidate_pairs(fused) == []  # every unit of a group is already one


# ============================================================================ the tie


def test_a_fused_pair_is_one_parameter_holding_the_mean_and_gets_both_gradients():
    model = _stack()
    edit = TieWeights.from_fields([("mlp.0", "mlp.1")])
    fused, applied = edit.apply(model, X)
    assert applied == edit and edit_from_json(json.loads(json.dumps(edit.to_json()))) == edit
    assert edit.sites == ("mlp.0=mlp.1",)
    assert fused.mlp[0].weight is fused.mlp[1].weight and fused.mlp[0].bias is fused.mlp[1].bias
    assert model.mlp[0].weight is not model.mlp[1].weight  # the model given is untouched
    assert torch.allclose(fused.mlp[0].weight, (model.mlp[0].weight + model.mlp[1].weight) / 2)
    assert len([p for p in fused.parameters()]) == len(list(model.parameters())) - 2

    untied = _stack()  # the same function with two separate parameters: its two gradients add up
    untied.load_state_dict(fused.state_dict())
    x = torch.randn(4, 1, 8, 8)
    fused(x).square().sum().backward()
    untied(x).square().sum().backward()
    assert torch.allclose(fused.mlp[0].weight.grad, untied.mlp[0].weight.grad + untied.mlp[1].weight.grad)
    assert torch.allclose(fused.mlp[1].bias.grad, untied.mlp[0].bias.grad + untied.mlp[1].bias.grad)


def test_a_tie_grows_and_never_splits_and_bad_ties_are_refused():
    model = _stack()
    fused, _ = _fused(model)
    assert tied_layers(fused) == [("blocks.0.0", "blocks.1.0", "blocks.2.0"), ("mlp.0", "mlp.1")]
    w = [model.blocks[i][0].weight for i in range(3)]
    assert torch.allclose(fused.blocks[1][0].weight, ((w[0] + w[2]) / 2 + (w[0] + w[2]) / 2 + w[1]) / 3)
    assert count_params(fused) == count_params(model) - 2 * (8 * 8 * 9 + 8) - (8 * 8 + 8)
    assert count_params(fused, unique=False) == count_params(model)
    measured = tlc.measure(fused, X, latency=False)
    assert measured["params"] == count_params(model) and measured["unique_params"] == count_params(fused)
    for groups, message in (([("stem", "blocks.0.0")], "differ"), ([("mlp.0", "nowhere")], "no such submodule"),
                            ([("mlp.0", "blocks.0.2")], "no weight")):
        with pytest.raises(SpecError, match=message):
            TieWeights.from_fields(groups).apply(model, X)
    for bad in ([["mlp.0"]], [["mlp.0", "mlp.0"]], "mlp.0", [["mlp.0", 3]]):
        with pytest.raises(SpecError):
            edit_from_json({"kind": "tie_weights", "groups": bad})


# ============================================================================ downstream: merge, save/load, ONNX


def test_the_merge_keeps_the_tie_and_merges_everything_else_exactly():
    fused, _ = _fused(_stack())
    deployed = merge(fused, X)
    assert [r.replaces for r in deployed.tlc_report.records] == [["conv(stem)", "bn(bn)"]]  # the untied conv folds
    assert tied_layers(deployed) == tied_layers(fused)
    assert deployed.get_submodule("blocks.0.0").weight is deployed.get_submodule("blocks.2.0").weight
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert rel_err(fused(x), deployed(x)) < 1e-5

    chain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).eval()  # linear o linear: merged unless tied
    assert len(merge(chain, torch.randn(2, 4)).tlc_report.records) == 1
    tied, _ = TieWeights.from_fields([("0", "1")]).apply(chain, None)
    kept = merge(tied, torch.randn(2, 4))
    assert kept.tlc_report.records == [] and kept.get_submodule("0").weight is kept.get_submodule("1").weight


def test_save_writes_a_shared_tensor_once_and_load_restores_the_tie(tmp_path):
    from safetensors import safe_open

    fused, edits = _fused(_stack())
    deployed = merge(fused, X)
    tlc.save(deployed, tmp_path / "m", example_inputs=X, edits=edits)
    with safe_open(str(tmp_path / "m" / "weights.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "blocks.0.0.weight" in keys and not {"blocks.1.0.weight", "blocks.2.0.weight", "mlp.1.weight"} & keys
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert recipe["aliases"]["blocks.2.0.weight"] == "blocks.0.0.weight"
    assert (tmp_path / "m" / "weights.safetensors").stat().st_size == weights_bytes(deployed) < weights_bytes(
        _stack())
    loaded = tlc.load(tmp_path / "m", model=Stack())
    assert loaded.get_submodule("blocks.1.0").weight is loaded.get_submodule("blocks.2.0").weight
    assert loaded.get_submodule("mlp.0").bias is loaded.get_submodule("mlp.1").bias
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), deployed(x))

    for aliases, message in (({"blocks.2.0.weight": "nowhere.weight"}, "does not have"),
                             ({"blocks.2.0.weight": "mlp.0.weight"}, "cannot share"),
                             ({"blocks.2.0.weight": "blocks.1.0.weight", "blocks.1.0.weight": "blocks.0.0.weight"},
                              "stored weight"),
                             ({"blocks.2.0.weight": 3}, "malformed")):
        (tmp_path / "m" / "recipe.json").write_text(json.dumps({**recipe, "aliases": aliases}))
        with pytest.raises(SpecError, match=message):
            tlc.load(tmp_path / "m", model=Stack())


def test_onnx_holds_one_initializer_per_shared_tensor(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from tlc.io.export import export_onnx

    fused, _ = _fused(_stack())
    path = export_onnx(merge(fused, X), X, tmp_path / "fused.onnx")
    shapes = [list(init.dims) for init in onnx.load(str(path)).graph.initializer]
    assert shapes.count(BLOCK_WEIGHT) == 1 and shapes.count([8, 8]) == 1


# ============================================================================ the method


def _context(preset: str = "default", **overrides) -> tuple[RunContext, LayerFusionConfig]:
    run, own = build_configs(LayerFusion, preset, overrides)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    data = TensorDataset(x, y)
    return RunContext(run, X, [(x[:16], y[:16]), (x[16:], y[16:])], data, data, None, torch.device("cpu"),
                      progress=False), own


def test_the_steps_the_presets_propose():
    model = _stack()
    run, own = _context("paper")
    assert (own.measure, own.shortlist, own.pairs_per_step) == ("cosine", 0, 1)
    assert run.config.continue_past_budget and not run.config.retry_single and run.config.finetune.epochs == 160
    paper = LayerFusion(own).propose(model, None, run, [])
    values = similarities(model, candidate_pairs(model), "cosine")
    best = max(values, key=values.get)
    assert paper.sites == [best] and paper.evidence["pairs"][0]["value"] == pytest.approx(values[best])
    assert "gaps" not in paper.evidence and paper.fallback is None
    assert paper.evidence["unique_params"] == count_params(model) - paper.evidence["params_shared"]

    run, own = _context(pairs_per_step=2, shortlist=4, measure="wasserstein")
    step = LayerFusion(own).propose(model, None, run, [])
    gaps = step.evidence["gaps"]
    assert len(gaps) == 4 and len(step.sites) == 2 and step.fallback.sites == step.sites[:1]
    first = min(gaps, key=gaps.get)
    assert step.sites[0] == first and step.evidence["pairs"][0]["gap"] == pytest.approx(gaps[first])
    assert step.evidence["joint_gap"] is not None and step.fallback.evidence["joint_gap"] == pytest.approx(gaps[first])
    assert not set(step.sites[0].split("=")) & set(step.sites[1].split("="))  # no layer in two pairs of a step

    run, own = _context(measure="cka", shortlist=0)
    cka = LayerFusion(own).propose(model, None, run, [])
    assert cka.evidence["measure"] == "cka" and 0 <= cka.evidence["pairs"][0]["value"] <= 1 + 1e-9

    names = [p.name for p in candidate_pairs(model)]
    rest = LayerFusion(own).propose(model, None, run, names[:-1])  # all but one set aside
    assert rest.sites == names[-1:]
    with pytest.raises(NoCandidate, match="set aside"):
        LayerFusion(own).propose(model, None, run, names)
    run, own = _context(target_ratio=0.9)
    method = LayerFusion(own)
    method.prepare(model, run)
    with pytest.raises(NoCandidate, match="target ratio"):
        method.propose(_fused(model)[0], None, run, [])
    assert method_class("layer_fusion") is LayerFusion
    for bad in (dict(measure="kl"), dict(pairs_per_step=0), dict(shortlist=-1), dict(target_ratio=1.0)):
        with pytest.raises(ValueError):
            LayerFusionConfig(**bad)


FAST = dict(finetune=FitConfig(epochs=1.0, lr=0.02, batch_size=32, weight_decay=0.0), calibration_size=64,
            calibration_batch_size=32, max_steps=2, latency_repeats=3, max_acc_drop=100.0, shortlist=2)
_compress = partial(compress_on_digits, "layer_fusion", FAST)


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    return trained_briefly(Stack(), digits[1])




def test_compress_fuses_layers_reports_honestly_and_resumes(trained, digits, tmp_path, monkeypatch):
    from tlc.report.tables import format_table

    data, _, _ = digits
    result = _compress(trained, digits, tmp_path / "full")
    assert [len(s.sites) for s in result.steps] == [1, 1] and all(s.accepted for s in result.steps)
    before, after = result.original, result.compressed
    assert before["unique_params"] == before["params"] and after["unique_params"] < after["params"]
    # the merge folds the untied batch norms (a few params); fusion removes whole weights from storage
    assert 0 <= before["params"] - after["params"] < before["unique_params"] - after["unique_params"]
    assert count_params(result.training_model) == result.steps[-1].evidence["unique_params"]
    assert after["weights_bytes"] < before["weights_bytes"]
    assert after["weights_bytes"] == (tmp_path / "full" / "weights.safetensors").stat().st_size
    assert (after["depth"], after["activations"]) == (before["depth"], before["activations"])
    assert len(tied_layers(result.model)) >= 1 and tied_layers(result.model) == tied_layers(result.training_model)
    table = format_table(json.loads((tmp_path / "full" / "report.json").read_text()))
    assert "unique params" in table and "weights file" in table
    x = data.example_inputs(8)
    loaded = tlc.load(tmp_path / "full", model=Stack())
    assert tied_layers(loaded) == tied_layers(result.model)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
        assert rel_err(result.training_model.eval()(x), result.model(x)) < 1e-4

    with second_fine_tuning_interrupted(monkeypatch):
        _compress(trained, digits, tmp_path / "cut")
    resumed = _compress(trained, digits, tmp_path / "cut", resume=True)
    assert [s.evidence for s in resumed.steps] == [s.evidence for s in result.steps]
    assert same_weights(resumed.training_model, result.training_model)
    assert tied_layers(resumed.training_model) == tied_layers(result.training_model)
