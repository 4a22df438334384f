"""LaCoOT (docs/methods.md): the max-sliced Wasserstein distance, the blocks found in traced graphs, the
block replaced by the identity (plain modules, graph modules, replay on load), the training term, the
step's choice, and the method end to end through the loop (evidence, exact merge, save/load, resume)."""

from __future__ import annotations

import copy
import io
import pickle
from functools import partial

import ot
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import Subset, TensorDataset

import tlc
from tlc.criteria.blocks import candidate_blocks
from tlc.criteria.transport import max_sliced_wasserstein, random_directions
from tlc.edits import ReplaceByIdentity, edit_from_json
from tlc.errors import SpecError, TLCError
from tlc.graph import trace
from tlc.methods.base import NoCandidate, build_configs, method_class
from tlc.methods.lacoot import LaCoOT, LaCoOTConfig, remove_taps, taps
from tlc.run.config import RunContext
from tlc.train import FitConfig, FitHooks, fit
from tlc.zoo.data import load_data

from .helpers import compress_on_digits, rel_err, same_weights, second_fine_tuning_interrupted

# ============================================================================ the distance


def test_max_sliced_wasserstein_is_zero_on_one_cloud_and_grows_with_a_shift():
    x = torch.randn(64, 12)
    assert float(max_sliced_wasserstein(x, x.clone(), seed=0)) == 0.0
    shift = torch.randn(12)
    one, two = (float(max_sliced_wasserstein(x, x + k * shift, seed=0)) for k in (1, 2))
    assert one > 0 and two == pytest.approx(2 * one, rel=1e-5)  # a translation moves every projection by <theta, s>
    assert one <= float(shift.norm()) + 1e-5  # no direction sees more than the whole shift
    assert float(max_sliced_wasserstein(x, 3 * x, seed=0)) > float(max_sliced_wasserstein(x, 2 * x, seed=0))


def test_max_sliced_wasserstein_is_pots_with_our_directions_and_differentiable():
    x, y = torch.randn(32, 5, 2, 2), torch.randn(32, 5, 2, 2) + 0.5
    theta = random_directions(20, 50, seed=3)
    assert torch.allclose(theta.norm(dim=0), torch.ones(50))
    pot = ot.sliced.max_sliced_wasserstein_distance(x.reshape(32, -1), y.reshape(32, -1), projections=theta, p=2)
    assert float(max_sliced_wasserstein(x, y, 50, 2, seed=3)) == pytest.approx(float(pot), rel=1e-6)
    a = x.clone().requires_grad_()
    max_sliced_wasserstein(a, y, seed=1).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    same = x.clone().requires_grad_()
    max_sliced_wasserstein(same, x, seed=1).backward()  # distance 0: a zero gradient, not NaN
    assert torch.equal(same.grad, torch.zeros_like(x))
    with pytest.raises(SpecError, match="different spaces"):
        max_sliced_wasserstein(torch.randn(4, 3), torch.randn(4, 5))


# ============================================================================ blocks


def _blocks(model: nn.Module, placement: str = "auto", size: int = 32):
    return candidate_blocks(trace(model.eval(), torch.randn(2, 3, size, size)), placement)


def test_resnet18_blocks_are_the_same_shape_basic_blocks():
    """8 BasicBlocks, 3 of which (layer2-4.0) downsample: 5 keep their input's shape. The paper measures the
    second block of each stage (its input is the first block's output): layer1.0 follows the max-pool."""
    model = torchvision.models.resnet18(num_classes=10)
    same = [n for n, m in model.named_modules() if isinstance(m, torchvision.models.resnet.BasicBlock)
            and m.downsample is None]
    blocks = _blocks(model)
    assert [b.path for b in blocks] == same == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert all(b.residual and b.measured == b.path and b.in_shape == b.out_shape for b in blocks)
    assert blocks[2].in_shape == (2, 128, 4, 4)
    assert [b.path for b in _blocks(model, "paper")] == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]


def test_mobilenet_v2_blocks_are_its_residual_inverted_residuals_and_depthwise_units():
    """Auto: the inverted residuals with a shortcut, and outside them the stride-1 depthwise conv-BN-ReLU6 of
    the blocks without one (channels change). Paper: the stride-1 depthwise unit of every inverted residual."""
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)  # torchvision's, at a quarter width
    depthwise = {}  # block index -> (path of its depthwise unit, has a shortcut)
    for i in range(1, 18):
        block = model.features[i]
        k = 0 if len(block.conv) == 3 else 1  # no expansion layer in front of it when the expansion is 1
        if block.conv[k][0].stride == (1, 1):
            depthwise[i] = (f"features.{i}.conv.{k}", block.use_res_connect)
    residual = [f"features.{i}" for i in range(1, 18) if model.features[i].use_res_connect]
    blocks = _blocks(model)
    assert [b.path for b in blocks if b.residual] == residual and len(residual) >= 10
    assert [b.path for b in blocks if not b.residual] == [p for p, res in depthwise.values() if not res]
    assert [b.path for b in _blocks(model, "paper")] == [p for p, _ in depthwise.values()]
    assert len(depthwise) == 13  # 17 inverted residuals, 4 of stride 2


def test_swin_t_blocks_are_its_transformer_blocks_measured_at_the_mlp_in_the_paper_placement():
    from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlock

    # swin_t's architecture (depths 2-2-6-2, window 7, stochastic depth 0.2) at a quarter of its width
    model = SwinTransformer([4, 4], 24, [2, 2, 6, 2], [3, 6, 12, 24], [7, 7], stochastic_depth_prob=0.2,
                            num_classes=10)
    expected = [n for n, m in model.named_modules() if isinstance(m, SwinTransformerBlock)]
    auto, paper = _blocks(model), _blocks(model, "paper")
    assert [b.path for b in auto] == [b.path for b in paper] == expected and len(expected) == 12
    assert all(b.measured == b.path for b in auto)
    assert all(b.measured == f"{b.path}.mlp" and b.measured_node.endswith("mlp_4") for b in paper)


class Residual(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), \
            nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), \
            nn.ReLU()

    def forward(self, x):
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


class Unit(nn.Sequential):
    """conv-BN-ReLU, channels and size kept."""

    def __init__(self, width: int):
        super().__init__(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())


class ToyNet(nn.Module):
    """stem, two residual blocks, a plain unit, a residual branch written in forward, a shared unit called twice,
    a downsampling conv, a third residual block, head."""

    def __init__(self, width: int = 4, channels: int = 1):
        super().__init__()
        self.stem, self.bn, self.relu = nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), \
            nn.ReLU()
        self.block1, self.block2, self.unit = Residual(width), Residual(width), Unit(width)
        self.branch, self.shared = Unit(width), Unit(width)
        self.down, self.bn_down = nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width)
        self.block3 = Residual(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.unit(self.block2(self.block1(self.relu(self.bn(self.stem(x))))))
        x = self.shared(self.shared(x + self.branch(x)))
        return self.fc(self.block3(self.bn_down(self.down(x))).mean((2, 3)))


def test_blocks_of_a_users_net_and_what_is_not_one():
    """Residual modules and a plain same-shape unit are blocks; a residual branch (the identity would double
    the signal), a module called twice and a downsampling layer are not."""
    blocks = _blocks(ToyNet(channels=3), size=8)
    assert [(b.path, b.residual) for b in blocks] == [("block1", True), ("block2", True), ("unit", False),
                                                      ("block3", True)]
    assert blocks[3].in_shape == (2, 8, 4, 4)
    assert [b.path for b in _blocks(ToyNet(channels=3), "paper", size=8)] == ["block2"]  # follows a Residual
    with pytest.raises(SpecError, match="placement"):
        _blocks(ToyNet(channels=3), "everywhere", size=8)


# ============================================================================ the edit


def test_replace_by_identity_on_a_module_and_on_a_linearized_graph_module():
    model, x = ToyNet().eval(), torch.randn(3, 1, 8, 8)
    edit = ReplaceByIdentity("block2")
    form, applied = edit.apply(model, x)
    assert applied == edit and edit.sites == ("block2",) and isinstance(form.block2, nn.Identity)
    assert isinstance(model.block2, Residual)  # the model is untouched
    with torch.no_grad():
        expected = model.fc(model.block3(model.bn_down(model.down(
            model.shared(model.shared((u := model.unit(model.block1(model.relu(model.bn(model.stem(x))))))
                                      + model.branch(u)))))).mean((2, 3)))
        assert torch.allclose(form(x), expected)
    assert edit_from_json(edit.to_json()) == edit and edit.to_json() == {"kind": "replace_by_identity",
                                                                          "module_path": "block2"}
    graph_form = tlc.linearize(model, ["block1.relu1"], x)  # an fx.GraphModule: the blocks are inlined
    assert isinstance(graph_form, torch.fx.GraphModule)
    replaced, _ = edit.apply(graph_form, x)
    with torch.no_grad():
        assert torch.equal(replaced(x), tlc.linearize(form, ["block1.relu1"], x)(x))
    assert not any("block2" in str(n.target) for n in replaced.graph.nodes)
    assert replaced._tlc_record["sites"] == ["block1.relu1"]
    with pytest.raises(TLCError, match="'down'.*one of the same shape"):
        ReplaceByIdentity("down").apply(graph_form, x)
    with pytest.raises(TLCError, match="'shared'.*more than once"):
        ReplaceByIdentity("shared").apply(graph_form, x)
    with pytest.raises(SpecError, match="'nothing'"):
        ReplaceByIdentity("nothing").apply(model, x)
    with pytest.raises(TLCError, match="'down'.*maps"):
        ReplaceByIdentity("down").apply(model, x)


class Pair(nn.Module):
    """A residual layer returning a tuple, as Hugging Face layers do: the identity cannot stand in for it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return (x + self.fc(x), None)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.fc = Pair(), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.layer(x)[0])


def test_a_module_returning_a_tuple_is_found_in_the_graph_but_refused():
    model, x = Stack().eval(), torch.randn(4, 6)
    assert [b.path for b in candidate_blocks(trace(model, x))] == ["layer"]  # the graph does not show the tuple
    with pytest.raises(TLCError, match="returns a tuple"):
        ReplaceByIdentity("layer").apply(model, x)
    data = TensorDataset(x, torch.tensor([0, 1, 0, 1]))
    run, own = build_configs(LaCoOT, "default")
    context = RunContext(run, x[:2], [(x, data.tensors[1])], data, data, None, torch.device("cpu"), progress=False)
    method, said = LaCoOT(own), []
    context.log = said.append
    method.prepare(model, context)
    assert method.blocks == [] and said == ["lacoot: layer is no candidate: it returns a tuple, not a tensor"]
    with pytest.raises(NoCandidate, match="none found"):
        method.propose(model, trace(model, x), context, [])
    with pytest.raises(SpecError, match="module_path"):
        edit_from_json({"kind": "replace_by_identity", "module_path": 3})


def test_replace_by_identity_replays_on_load(tmp_path):
    model, x = ToyNet().eval(), torch.randn(3, 1, 8, 8)
    form, applied = ReplaceByIdentity("block1").apply(model, x)
    tlc.save(form, tmp_path / "saved", example_inputs=x, edits=[applied])
    loaded = tlc.load(tmp_path / "saved", model=ToyNet())
    with torch.no_grad():
        assert isinstance(loaded.block1, nn.Identity) and torch.equal(loaded(x), form(x))


# ============================================================================ the training term


def _toy_data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_the_training_term_brings_block_outputs_towards_their_inputs():
    """The mean block distance, measured as the term itself (train mode, fixed directions, on copies that
    inherit the taps), falls with the term in training, not without it."""
    data, config = _toy_data(), FitConfig(epochs=4, lr=0.02, batch_size=16)
    start, x = ToyNet().eval(), data.tensors[0]
    method = LaCoOT(LaCoOTConfig(lambda_ot=2.0))
    method.blocks = candidate_blocks(trace(start, x[:2]))
    assert method.watch(start) == []

    def distance(model: nn.Module) -> float:
        probe = copy.deepcopy(model).train()
        torch.manual_seed(0)
        probe(x)
        return method.loss(probe, x, None, None).item() / method.config.lambda_ot

    plain, regularized = copy.deepcopy(start), copy.deepcopy(start)
    fit(plain, data, config, seed=0, progress=False)
    fit(regularized, data, config, seed=0, progress=False, hooks=FitHooks(loss=method.loss))
    before, without, with_term = distance(start), distance(plain), distance(regularized)
    assert with_term < 0.8 * without and with_term < 0.8 * before


def test_taps_follow_copies_record_only_training_and_are_inert_when_pickled():
    model, x = ToyNet(), torch.randn(8, 1, 8, 8)
    method = LaCoOT()
    with pytest.raises(TLCError, match="prepare"):
        method.loss(model, x, None, None)
    method.blocks = candidate_blocks(trace(model.eval(), x[:2]))
    assert method.loss(model, x, None, None) is None  # never watched: taps installed now, no term this batch
    assert len(taps(model)) == 2 * len(method.blocks)
    clone = copy.deepcopy(model).train()
    assert all(t.store is method.store for _, t in taps(clone))
    with torch.no_grad():
        clone(x)
    assert method.loss(clone, x, None, None) is None  # nothing recorded without gradients
    term = method.loss(clone, x, None, clone(x))
    assert term.requires_grad and term.item() > 0
    assert method.loss(clone, x, None, None) is None  # the record is taken once
    buffer = io.BytesIO()
    torch.save(clone, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert all(t.store is None for _, t in taps(restored))
    assert pickle.loads(pickle.dumps(taps(clone)[0][1])).store is None
    restored.train()(x)
    for model in (clone, restored):
        remove_taps(model)
        assert taps(model) == []


# ============================================================================ one step


def _context(data: TensorDataset, preset: str = "default", **overrides) -> tuple[RunContext, LaCoOTConfig]:
    run, own = build_configs(LaCoOT, preset, overrides)
    batch = (data.tensors[0], data.tensors[1])
    return RunContext(run, batch[0][:2], [batch], data, data, None, torch.device("cpu"), progress=False), own


def test_a_step_replaces_the_block_of_lowest_distance_and_sets_aside_rejected_ones():
    data = _toy_data()
    model = ToyNet().eval()
    with torch.no_grad():
        model.block2.bn2.weight.zero_()
        model.block2.bn2.bias.zero_()  # block2 = relu(x) = x on its non-negative input: distance 0
    run, own = _context(data)
    method = LaCoOT(own)
    method.prepare(model, run)
    graph = trace(model, run.example_inputs)
    proposal = method.propose(model, graph, run, [])
    assert [e.module_path for e in proposal.edits] == ["block2"] and proposal.sites == ["block2"]
    ev = proposal.evidence
    assert ev["block"] == "block2" and ev["distance"] == 0.0 and ev["removed_before"] == 0
    assert set(ev["candidates"]) == {"block1", "unit", "block3"} and min(ev["candidates"].values()) > 0
    nxt = method.propose(model, graph, run, ["block2"])
    assert nxt.evidence["block"] == min(ev["candidates"], key=ev["candidates"].get)
    with pytest.raises(NoCandidate, match="no block left"):
        method.propose(model, graph, run, ["block1", "block2", "unit", "block3"])
    replaced, _ = proposal.edits[0].apply(model, run.example_inputs)
    capped = LaCoOT(LaCoOTConfig(max_removed=1))
    capped.prepare(model, run)
    with pytest.raises(NoCandidate, match="max_removed=1"):
        capped.propose(replaced, trace(replaced, run.example_inputs), run, [])


def test_presets_and_config():
    run, own = build_configs(LaCoOT, "paper")
    assert (own.blocks, own.lambda_ot, own.projections, own.p) == ("paper", 5.0, 50, 2.0)
    assert run.finetune.epochs == 160 and run.finetune.lr == 0.1 and run.finetune.weight_decay == 1e-4
    assert run.continue_past_budget and not run.retry_single
    assert own.train_first == 160 and not own.heal  # trained once with the term, removals not healed
    _, default = build_configs(LaCoOT, "default")
    assert default == LaCoOTConfig() and default.blocks == "auto"
    for bad in (dict(lambda_ot=-1.0), dict(projections=0), dict(blocks="all"), dict(max_removed=0), dict(p=0.5),
                dict(train_first=0.0)):
        with pytest.raises(ValueError):
            LaCoOTConfig(**bad)
    assert method_class("lacoot") is LaCoOT


# ============================================================================ end to end

FAST = dict(finetune=FitConfig(epochs=0.5, lr=0.01, batch_size=32), calibration_size=64, calibration_batch_size=32,
            max_steps=2, latency_repeats=3, max_acc_drop=100.0)
_compress = partial(compress_on_digits, "lacoot", FAST)


@pytest.fixture(scope="module")
def digits():
    data = load_data("digits", seed=0, image_size=8, augment=True)
    return data, Subset(data.train, range(128)), Subset(data.val, range(64))


@pytest.fixture(scope="module")
def trained():
    plain = load_data("digits", seed=0, image_size=8)
    torch.manual_seed(0)
    model = ToyNet(width=4)
    fit(model, Subset(plain.train, range(128)), FitConfig(epochs=6, lr=2e-2, optimizer="adamw", batch_size=32,
                                                         weight_decay=0.0), progress=False)
    return model.eval()




def test_compress_with_lacoot_removes_blocks_exactly_and_resumes_identically(trained, digits, tmp_path, monkeypatch):
    data, _, _ = digits
    full = _compress(trained, digits, tmp_path / "full")
    assert [s.step for s in full.steps] == [1, 2] and full.stop_reason == "max_steps (2) reached"
    removed = [s.evidence["block"] for s in full.steps]
    for step in full.steps:
        assert step.sites == [step.evidence["block"]] and step.evidence["placement"] == "auto"
        assert step.evidence["distance"] <= min(step.evidence["candidates"].values())
    assert removed[0] not in full.steps[1].evidence["candidates"] and full.steps[1].evidence["removed_before"] == 1
    assert all(isinstance(full.training_model.get_submodule(p), nn.Identity) for p in removed)
    assert taps(full.training_model) == []  # no final fine-tuning: the taps came off
    assert full.compressed["depth"] < full.original["depth"] and full.compressed["macs"] < full.original["macs"]
    assert [e.to_json() for e in full.edits] == [{"kind": "replace_by_identity", "module_path": p} for p in removed]
    x = data.example_inputs(4)
    with torch.no_grad():
        assert rel_err(full.training_model.eval()(x), full.model(x)) < 1e-4
        assert torch.equal(tlc.load(tmp_path / "full", model=ToyNet(width=4))(x), full.model(x))
    assert (tmp_path / "full" / "report.json").is_file() and full.report["method"] == "lacoot"
    gone = [e for e in full.report["network"] if any(e["name"].startswith(p + ".") for p in removed)]
    assert gone and all(e["status"] == "removed" and e.get("into", None) is None for e in gone)
    assert all(e.get("status") != "removed" for e in full.report["network"] if e not in gone)
    with second_fine_tuning_interrupted(monkeypatch):
        _compress(trained, digits, tmp_path / "cut")
    resumed = _compress(trained, digits, tmp_path / "cut", resume=True)
    assert [s.sites for s in resumed.steps] == [s.sites for s in full.steps]
    assert same_weights(resumed.training_model, full.training_model)


def test_the_paper_protocol_trains_with_the_term_first_and_removes_without_healing(trained, digits, tmp_path):
    """``train_first`` trains once, with the distance term, before the first step; ``heal=False`` judges each
    removal without fine-tuning (the published protocol, here with a short first training)."""
    result = _compress(trained, digits, tmp_path / "run", train_first=0.5, heal=False)
    assert [s.finetune_epochs for s in result.steps] == [0.0, 0.0]
    assert result.report["finetune_epochs_total"] == 0.5
    assert result.compressed["depth"] < result.original["depth"]
