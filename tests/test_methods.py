"""The method protocol: a method defined outside the package runs through the shared loop, its edits
replay on load, settings route to the run or the method, and recipes of the first format still load."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import tlc
from tlc.cli import main
from tlc.edits import Linearize, WeightMask, edit_from_json
from tlc.methods.base import Method, NoCandidate, Proposal, build_configs, method_class, register_method
from tlc.run.config import RunConfig
from tlc.train import FitConfig

from .helpers import randomize_bn, rel_err, same_weights

FAST = RunConfig(finetune=FitConfig(epochs=0.5, lr=0.01, batch_size=16), calibration_size=32,
                 calibration_batch_size=16, latency_repeats=2, max_acc_drop=100.0)


@dataclass
class WidestFirstConfig:
    keep_fraction: float = 0.5  # channels of the chosen site kept (the rest removed)


class WidestFirst(Method):
    """A toy method: each step collapses the remaining site with the most channels, keeping the first
    ``keep_fraction`` of them; a regularizer pulls the weights towards zero while fine-tuning."""

    name = "widest_first_test"
    Config = WidestFirstConfig
    presets = {"default": {}, "gentle": {"keep_fraction": 1.0, "max_steps": 1}}

    def __init__(self, config=None):
        super().__init__(config)
        self.loss_calls = 0

    def propose(self, model, graph, run, exclude):
        sites = [s for s in graph.sites if s.name not in exclude]
        if not sites:
            raise NoCandidate("no site left")
        site = max(sites, key=lambda s: (s.channels, s.name))
        keep = max(1, round(self.config.keep_fraction * site.channels))
        mask = torch.tensor([1.0] * keep + [0.0] * (site.channels - keep))
        return Proposal([Linearize.of({site.name: mask}, run.config.policy)], {"channels": site.channels},
                        label=f"widest site {site.name}")

    def loss(self, model, inputs, labels, outputs):
        self.loss_calls += 1
        return 1e-3 * sum(p.pow(2).sum() for p in model.parameters())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1, self.act1 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(12, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.act2(x + self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))))


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, 3, 8, 8), torch.randint(0, 4, (48,)))
    return randomize_bn(Residual()).eval(), data


def test_a_method_of_ones_own_runs_end_to_end_without_touching_the_library(toy, tmp_path):
    model, data = toy
    x = data[0][0].unsqueeze(0).repeat(2, 1, 1, 1)
    result = tlc.compress(model, data, data, method=WidestFirst, config=FAST, max_steps=2, example_inputs=x,
                          out_dir=tmp_path / "run", progress=False, log=None)
    assert [s.sites for s in result.steps] == [["act1"], ["stem.2"]]
    assert result.steps[0].removed_channels == 6 and result.steps[0].evidence == {"channels": 12}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["method"] == "widest_first_test" and report["steps"][1]["evidence"] == {"channels": 8}
    assert [e["kind"] for e in report["edits"]] == ["linearize", "linearize"]
    assert any("near chance" in w for w in report["warnings"])  # an untrained model on random labels
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["version"] == 2 and len(recipe["edits"]) == 2
    loaded = tlc.load(tmp_path / "run", model=Residual())
    assert rel_err(result.model(x), loaded(x)) <= 1e-6


def test_a_method_s_loss_hook_is_used_while_fine_tuning(toy):
    model, data = toy
    model = copy.deepcopy(model)
    method = WidestFirst()
    assert method.has_fit_hooks() and not method_class("tlc")().has_fit_hooks()
    from tlc.run import loop

    tlc.train.fit(model, data, FAST.finetune, hooks=loop._hooks(method), progress=False)
    assert method.loss_calls == 2  # 48 samples, batch 16, half an epoch: two steps


def test_presets_and_settings_route_to_the_run_or_the_method():
    run, own = build_configs(WidestFirst, "gentle")
    assert (run.preset, run.max_steps, own.keep_fraction) == ("gentle", 1, 1.0)
    run, own = build_configs(WidestFirst, "gentle", {"keep_fraction": 0.25, "max_acc_drop": 2.0})
    assert (run.max_steps, run.max_acc_drop, own.keep_fraction) == (1, 2.0, 0.25)
    with pytest.raises(tlc.SpecError, match="unknown setting.*gap_tolerance"):
        build_configs(WidestFirst, "default", {"gap_tolerance": 0.1})
    with pytest.raises(tlc.SpecError, match="no preset"):
        build_configs(WidestFirst, "paper")


def test_registered_methods_are_found_by_name():
    register_method(WidestFirst)
    assert method_class("widest_first_test") is WidestFirst
    assert {"tlc", "easier", "nepenthe", "widest_first_test"} <= set(tlc.available_methods())
    with pytest.raises(tlc.SpecError, match="unknown method"):
        method_class("nope")


METHOD_FILE = '''
from dataclasses import dataclass

import torch

from tlc.edits import Linearize
from tlc.methods.base import Method, NoCandidate, Proposal


@dataclass
class FirstConfig:
    pass


class FirstSite(Method):
    """Collapse the first remaining site, all channels linearized."""

    name = "first_site_file"
    Config = FirstConfig

    def propose(self, model, graph, run, exclude):
        sites = [s.name for s in graph.sites if s.name not in exclude]
        if not sites:
            raise NoCandidate("nothing left")
        return Proposal([Linearize.of({sites[0]: None}, run.config.policy)], {"first": sites[0]})
'''


def test_a_method_in_a_file_runs_from_the_command_line(tmp_path, capsys):
    method_file = tmp_path / "my_method.py"
    method_file.write_text(METHOD_FILE)
    out = tmp_path / "run"
    assert main(["compress", "--model", "tlc:tiny_cnn", "--data", "digits", "--out", str(out), "--quiet",
                 "--method", f"py:{method_file}:FirstSite", "--max-steps", "1", "--finetune-epochs", "0.2",
                 "--max-acc-drop", "100"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "first_site_file" and report["steps"][0]["evidence"]["first"]
    assert tlc.load(out) is not None
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["compress", "--method", f"py:{method_file}:FirstSite", "--help"])
    assert "method first_site_file: Collapse the first remaining site" in capsys.readouterr().out


def test_edits_round_trip_through_json_and_unknown_ones_are_refused():
    edit = Linearize.from_fields(["a", "b"], {"a": [1, 0, 1], "b": None}, "always", {"conv": [2, 2]})
    assert edit_from_json(json.loads(json.dumps(edit.to_json()))) == edit
    mask = WeightMask.of({"w": torch.tensor([1.0, 0.0, 0.0, 1.0])})
    assert edit_from_json(mask.to_json()) == WeightMask({"w": 0.5})
    with pytest.raises(tlc.SpecError, match="unknown edit kind"):
        edit_from_json({"kind": "explode"})
    with pytest.raises(tlc.SpecError, match="unknown fields"):
        edit_from_json({"kind": "linearize", "site_names": [], "code": "import os"})


def test_a_recipe_of_the_first_format_still_loads(toy, tmp_path):
    model, _ = toy
    x = torch.randn(2, 3, 8, 8)
    masks = {"act1": torch.tensor([0.0] * 12), "stem.2": torch.tensor([1.0, 0.0] * 4)}
    deployed = tlc.merge(tlc.linearize(model, list(masks), x, masks), x)
    tlc.save(deployed, tmp_path, example_inputs=x)
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    (edit,) = recipe.pop("edits")
    record = {"sites": edit["site_names"], "masks": edit["masks"], "paddings": edit["paddings"],
              "policy": recipe.pop("policy"), "exact": True, "zeros": recipe.pop("zeros")}
    (tmp_path / "recipe.json").write_text(json.dumps({**recipe, "version": 1, "record": record}))
    loaded = tlc.load(tmp_path, model=Residual())
    assert rel_err(deployed(x), loaded(x)) <= 1e-6


class TrainedThenRemoved(WidestFirst):
    """Trains once with its loss before the first step, then collapses without fine-tuning."""

    name = "trained_then_removed_test"

    def pretrain(self, run):
        return FitConfig(epochs=1.0, lr=0.01, batch_size=16)

    def propose(self, model, graph, run, exclude):
        proposal = super().propose(model, graph, run, exclude)
        proposal.finetune = False
        return proposal


def test_training_before_the_first_step_and_steps_without_fine_tuning(toy, tmp_path, monkeypatch):
    model, data = toy
    x = data[0][0].unsqueeze(0).repeat(2, 1, 1, 1)

    def run(out, **kwargs):
        return tlc.compress(model, data, data, method=TrainedThenRemoved, config=FAST, max_steps=2,
                            example_inputs=x, out_dir=out, progress=False, log=None, **kwargs)

    full = run(tmp_path / "full")
    assert [s.finetune_epochs for s in full.steps] == [0.0, 0.0]
    assert full.report["finetune_epochs_total"] == 1.0
    assert not torch.equal(full.training_model.state_dict()["conv1.weight"], model.conv1.weight)  # it trained
    import tlc.run.loop as engine

    real_fit = engine.fit

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(engine, "fit", real_fit)
    resumed = run(tmp_path / "cut", resume=True)
    assert same_weights(resumed.training_model, full.training_model)
    assert [s.sites for s in resumed.steps] == [s.sites for s in full.steps]


def test_a_run_that_failed_before_its_first_step_does_not_block_the_rerun(toy, tmp_path, monkeypatch):
    """What a run leaves when its first step fails (its baseline checkpoint, a fine-tuning folder) is cleared by
    the rerun; a run that trained before its first step is progress, and is refused without --resume."""
    import tlc.run.loop as engine

    model, data = toy
    x = data[0][0].unsqueeze(0).repeat(2, 1, 1, 1)

    def run(method, out):
        return tlc.compress(model, data, data, method=method, config=FAST, max_steps=1, example_inputs=x,
                            out_dir=out, progress=False, log=None)

    real_fit = engine.fit

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "fit", broken)
    with pytest.raises(RuntimeError):
        run(WidestFirst, tmp_path / "first")
    assert (tmp_path / "first" / "checkpoints" / "step_000.json").is_file()
    monkeypatch.setattr(engine, "fit", real_fit)
    assert len(run(WidestFirst, tmp_path / "first").steps) == 1

    calls = []

    def broken_after_training(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real_fit(*args, **kwargs)

    class TrainedThenHealed(TrainedThenRemoved):
        def propose(self, model, graph, run, exclude):
            proposal = super().propose(model, graph, run, exclude)
            proposal.finetune = True
            return proposal

    monkeypatch.setattr(engine, "fit", broken_after_training)
    with pytest.raises(RuntimeError):
        run(TrainedThenHealed, tmp_path / "trained")
    monkeypatch.setattr(engine, "fit", real_fit)
    with pytest.raises(tlc.SpecError, match="already holds a run"):
        run(TrainedThenHealed, tmp_path / "trained")
