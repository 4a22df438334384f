"""The compression loop end to end on tiny models and data: steps, budget, outputs, save/load, resume."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import tlc
from tlc.errors import SpecError
from tlc.io.recipe import load
from tlc.methods.tlc import TLCConfig, Unit, _prefixes, official_count, tolerance_count
from tlc.run.config import RunConfig
from tlc.run.loop import compress
from tlc.train import FitConfig
from tlc.zoo.data import load_data
from tlc.zoo.models import build_model

from .helpers import same_weights, second_fine_tuning_interrupted, weight_layers

FAST = RunConfig(finetune=FitConfig(epochs=0.3, lr=0.01, batch_size=32), calibration_size=64,
                 calibration_batch_size=32, max_steps=2, latency_repeats=3, max_acc_drop=100.0)


@pytest.fixture(scope="module")
def digits():
    data = load_data("digits", seed=0, image_size=16)
    return data, Subset(data.train, range(256)), Subset(data.val, range(96))


@pytest.fixture(scope="module")
def trained(digits):
    data, train, _ = digits
    model, spec = build_model("tlc:cifar_mobilenet_v2", num_classes=10, in_channels=1, width_mult=0.25)
    tlc.train.fit(model, train, FitConfig(epochs=2, lr=0.05, batch_size=32), progress=False)
    return model.eval(), spec


def _run(model, digits, out=None, **overrides):
    data, train, val = digits
    return compress(model, train, val, config=FAST, **overrides, example_inputs=data.example_inputs(2), out_dir=out,
                    progress=False, log=None, model_spec=None, data_spec="digits")


def test_rules():
    assert tolerance_count([0.01, 0.03, 0.2, 0.04], 0.05) == 4  # the largest k within tolerance
    assert tolerance_count([0.3, 0.4], 0.05) == 1  # at least one
    gaps = {"a": -0.2, "b": -0.1, "c": 0.0, "d": 0.3}
    joint = {2: -0.25, 3: 0.01, 4: 0.5}
    assert official_count(["a", "b", "c", "d"], gaps, lambda s: joint[len(s)]) == 3  # off by one, as published
    assert official_count(["c", "a"], {"c": 0.1, "a": 0.2}, lambda s: -1.0) == 1
    order = [Unit(("a", "b"), 0.1, 0.0), Unit(("b",), 0.1, 0.0), Unit(("c",), 0.0, 0.0),
             Unit(("c",), 0.0, 0.0, whole_branch=True), Unit(("d", "e"), 0.0, 0.0)]
    prefixes = _prefixes(order, 4)
    assert [[s for u in p for s in u.sites] for p in prefixes] == [["a", "b"], ["a", "b", "c"]]
    assert not any(u.whole_branch for u in prefixes[-1])  # a site is collapsed one way only


def test_compress_records_steps_and_returns_an_exact_shallower_model(trained, digits, tmp_path):
    model, spec = trained
    data, _, val = digits
    result = _run(model, digits, tmp_path / "run")
    assert [s.step for s in result.steps] == [1, 2] and result.stop_reason == "max_steps (2) reached"
    assert result.chosen_step == 2
    x = data.example_inputs(2)
    with torch.no_grad():
        ref, out = result.training_model.eval()(x), result.model(x)
    assert ((ref - out).abs().max() / ref.abs().max()).item() < 1e-4
    assert result.compressed["activations"] < result.original["activations"]
    assert result.compressed["activations"] == 35 - sum(len(s.sites) for s in result.steps)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["chosen_step"] == 2 and len(report["steps"]) == 2 and report["network"]
    assert (tmp_path / "run" / "steps.csv").read_text().count("\n") == 3
    assert "val accuracy" in str(result)


def test_budget_rejects_a_step_and_keeps_the_previous_model(trained, digits, monkeypatch):
    import tlc.run.loop as engine

    model, _ = trained
    real_step = engine._try

    def second_over_budget(*args, **kwargs):  # at the latest the second step misses the (zero) budget
        record, candidate, edits = real_step(*args, **kwargs)
        record.within_budget = record.within_budget and record.step < 2
        return record, candidate, edits

    monkeypatch.setattr(engine, "_try", second_over_budget)
    result = _run(model, digits, max_acc_drop=0.0, max_steps=3, retry_single=False, rejection_patience=1,
                  finetune=FitConfig(epochs=0.05, lr=0.5, batch_size=32))
    rejected = [s for s in result.steps if not s.accepted]
    assert rejected and result.stop_reason == "accuracy budget spent"
    assert result.chosen_step == rejected[0].step - 1
    assert result.compressed["val_accuracy"] >= result.original["val_accuracy"] - 1e-9


def test_a_rejected_step_sets_its_sites_aside_and_tries_the_next_candidates(trained, digits, monkeypatch):
    import tlc.run.loop as engine

    model, _ = trained
    real_step = engine._try

    def over_budget(*args, **kwargs):  # every step misses the budget
        record, candidate, edits = real_step(*args, **kwargs)
        record.within_budget = False
        return record, candidate, edits

    monkeypatch.setattr(engine, "_try", over_budget)
    result = _run(model, digits, max_steps=5, retry_single=False, rejection_patience=2)
    assert [(s.step, s.accepted) for s in result.steps] == [(1, False), (2, False)]
    assert result.stop_reason == "accuracy budget spent (2 rejected steps in a row)"
    assert not set(result.steps[0].sites) & set(result.steps[1].sites)
    assert result.chosen_step == 0 and result.compressed["activations"] == result.original["activations"]


@pytest.mark.parametrize("keep_checkpoints", [False, True])
def test_after_a_rejected_step_the_next_kept_step_is_the_result(trained, digits, monkeypatch, tmp_path,
                                                                  keep_checkpoints):
    import tlc.run.loop as engine

    model, _ = trained
    real_step = engine._try

    def first_over_budget(loop, step, *args, **kwargs):
        record, candidate, edits = real_step(loop, step, *args, **kwargs)
        record.within_budget = step != 1
        return record, candidate, edits

    monkeypatch.setattr(engine, "_try", first_over_budget)
    result = _run(model, digits, tmp_path / "run" if keep_checkpoints else None, max_steps=2, retry_single=False)
    assert [(s.step, s.accepted) for s in result.steps] == [(1, False), (2, True)]
    assert result.chosen_step == 2
    assert result.compressed["activations"] == result.original["activations"] - len(result.steps[1].sites)


def test_a_run_started_before_a_setting_existed_still_resumes(trained, digits, tmp_path):
    """A checkpoint whose fingerprint lacks a setting added later resumes while that setting is at its default."""
    model, _ = trained
    data, train, val = digits
    out = tmp_path / "run"
    full = _run(model, digits, out, max_steps=1)
    for state_file in (out / "checkpoints").glob("step_*.json"):  # as an older tlc wrote them
        state = json.loads(state_file.read_text())
        fingerprint = json.loads(state["fingerprint"])
        del fingerprint["config"]["rejection_patience"]
        state["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
        state_file.write_text(json.dumps(state))

    def resume(**overrides):
        return compress(model, train, val, config=FAST, max_steps=1, **overrides,
                        example_inputs=data.example_inputs(2), out_dir=out, resume=True, progress=False, log=None,
                        model_spec=None, data_spec="digits")

    assert [s.sites for s in resume().steps] == [s.sites for s in full.steps]
    with pytest.raises(SpecError, match="other settings"):
        resume(rejection_patience=3)


def test_a_resumed_run_may_change_only_when_it_stops(trained, digits, tmp_path):
    """A run that reached max_steps goes on when resumed with a higher limit (other stopping rules may
    change too) and ends as an uninterrupted run; a setting that changes the steps is still refused."""
    model, _ = trained
    straight = _run(model, digits, tmp_path / "straight", max_steps=2)
    assert _run(model, digits, tmp_path / "cut", max_steps=1).stop_reason == "max_steps (1) reached"
    data, train, val = digits

    def resume(**overrides):
        return compress(model, train, val, config=FAST, **overrides, out_dir=tmp_path / "cut",
                        example_inputs=data.example_inputs(2), resume=True, progress=False, log=None,
                        model_spec=None, data_spec="digits")

    resumed = resume(max_steps=2, stop_accuracy=0.01, budget_patience=3)
    assert [s.sites for s in resumed.steps] == [s.sites for s in straight.steps]
    assert resumed.stop_reason == "max_steps (2) reached"
    for a, b in zip(resumed.training_model.state_dict().values(), straight.training_model.state_dict().values()):
        assert torch.equal(a, b)
    assert len(resume(max_steps=1).steps) == 2  # a lower limit ends the run where it is; done steps stay
    with pytest.raises(SpecError, match="other settings"):
        resume(max_steps=3, gap_tolerance=0.5)


def test_save_load_round_trip(trained, digits, tmp_path):
    model, spec = trained
    data, train, val = digits
    out = tmp_path / "run"
    result = compress(model, train, val, config=FAST, example_inputs=data.example_inputs(2), out_dir=out,
                      progress=False, log=None, model_spec=spec.to_json(), data_spec="digits")
    loaded = load(out)
    x = data.example_inputs(4)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    assert tlc.measure.depth(loaded, x) == result.compressed["depth"]


def test_resume_after_an_interruption_gives_the_same_result(trained, digits, tmp_path, monkeypatch):
    model, _ = trained
    full = _run(model, digits, tmp_path / "full")
    with second_fine_tuning_interrupted(monkeypatch):
        _run(model, digits, tmp_path / "cut")
    with pytest.raises(tlc.SpecError, match="already holds a run"):
        _run(model, digits, tmp_path / "cut")
    data, train, val = digits
    resumed = compress(model, train, val, config=FAST, example_inputs=data.example_inputs(2), out_dir=tmp_path / "cut",
                       resume=True, progress=False, log=None, model_spec=None, data_spec="digits")
    assert [s.sites for s in resumed.steps] == [s.sites for s in full.steps]
    assert resumed.report["wall_time_s"] >= sum(s.seconds for s in resumed.steps)  # the time before the cut counts
    assert same_weights(resumed.training_model, full.training_model)
    with pytest.raises(tlc.SpecError, match="other settings"):
        compress(model, train, val, config=FAST, seed=1, example_inputs=data.example_inputs(2),
                 out_dir=tmp_path / "cut", resume=True, progress=False, log=None, data_spec="digits")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT trained briefly on a separable word-list task (traced by torch.export)."""
    transformers = pytest.importorskip("transformers")
    tmp_path = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    g = torch.Generator().manual_seed(0)
    rows = ["text,label"]
    for i in range(120):
        label = i % 2
        words = [f"w{int(torch.randint(0, 20, (1,), generator=g)) + 20 * label}" for _ in range(3 + i % 5)]
        rows.append(f"{' '.join(words)},{label}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    data = load_data(f"textcsv:{tmp_path / 'data.csv'}", tokenizer=tokenizer, seed=0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    tlc.train.fit(model, data.train, FitConfig(epochs=3, lr=1e-3, optimizer="adamw", batch_size=16),
                  collate_fn=data.collate_fn, progress=False)
    return model.eval(), data


def test_bert_path_measures_gelu_statistics_and_merges_the_ffn(tiny_bert):
    model, data = tiny_bert
    result = compress(model, data.train, data.val, config=FAST, max_steps=1, calibration_size=24,
                      collate_fn=data.collate_fn,
                      example_inputs=data.example_inputs(2), progress=False, log=None)
    assert result.steps[0].sites[0].endswith("intermediate.intermediate_act_fn")
    assert result.compressed["depth"] < result.original["depth"]


def test_a_set_aside_site_of_an_exported_model_stays_out_of_the_next_ranking(tiny_bert, monkeypatch):
    """torch.export-traced models leave no gate node for a site that is not linearized: the savings of the
    step after a rejected one must not look one up for the set-aside site."""
    import tlc.run.loop as engine

    model, data = tiny_bert
    real_step = engine._try

    def over_budget(*args, **kwargs):
        record, candidate, edits = real_step(*args, **kwargs)
        record.within_budget = False
        return record, candidate, edits

    monkeypatch.setattr(engine, "_try", over_budget)
    settings = dict(max_steps=3, calibration_size=24, max_sites_per_step=1, retry_single=False, rejection_patience=2)
    result = compress(model, data.train, data.val, config=FAST, **settings, collate_fn=data.collate_fn,
                      example_inputs=data.example_inputs(2), progress=False, log=None)
    assert [len(s.sites) for s in result.steps] == [1, 1]
    assert result.steps[0].sites != result.steps[1].sites
    assert result.stop_reason == "accuracy budget spent (2 rejected steps in a row)"


def test_distillation_from_the_original_runs(trained, digits):
    from tlc.train import DistillConfig

    model, _ = trained
    result = _run(model, digits, max_steps=1, distill=DistillConfig(alpha=0.7, temperature=2.0))
    assert len(result.steps) == 1 and result.steps[0].finetune_epochs > 0


def test_save_load_round_trip_of_a_hugging_face_deploy_form(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tlc.zoo.models import parse_model_spec

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "hf")
    spec = parse_model_spec(f"hf:{tmp_path / 'hf'}", num_classes=2)
    model = spec.build().eval()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    x = {"input_ids": torch.randint(5, 50, (2, 7)), "attention_mask": mask}
    sites = tlc.find_sites(model, x)
    lin = tlc.linearize(model, sites[:1], x, masks={sites[0].name: (torch.arange(32) % 2).float()})
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.01)  # weights that differ from the folder's, as after fine-tuning
    deployed = tlc.merge(lin, x)
    tlc.save(deployed, tmp_path / "out", example_inputs=x, model_spec=spec.to_json())
    loaded = tlc.load(tmp_path / "out")
    other = {"input_ids": torch.randint(5, 50, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(loaded(**other).logits, deployed(**other).logits)


class _Net(nn.Module):
    """conv-bn-relu (r1) - conv-bn-relu (r2) - pool - linear; ``residual`` adds the input around r1's block."""

    def __init__(self, residual: bool):
        super().__init__()
        self.residual = residual
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.b1, self.r1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.fc = nn.Linear(8, 4)
        for bn in (self.b1, self.b2):
            bn.bias.data.uniform_(-0.5, 1.0)  # some channels off, most on

    def forward(self, x):
        x = self.c0(x)
        y = self.c2(self.r1(self.b1(self.c1(x))))
        y = self.r2(self.b2(y + x if self.residual else y))
        return self.fc(y.mean((2, 3)))


def _dead(model: nn.Module, *bns: str) -> nn.Module:
    """Every channel of these batch norms' activations off: N(beta, gamma^2) with beta < 0."""
    for name in bns:
        bn = model.get_submodule(name)
        bn.weight.data.fill_(0.1)
        bn.bias.data.fill_(-1.0)
    return model.eval()


def test_an_all_off_site_is_no_candidate_where_the_whole_signal_passes_it():
    from tlc.graph import trace
    from tlc.methods.base import NoCandidate
    from tlc.methods.tlc import select

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    calibration = [(torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,)))]
    config = TLCConfig()
    plain = _dead(_Net(residual=False), "b1")
    assert "r1" not in select(plain, trace(plain, x), calibration, x, config).gaps  # its collapse: a constant
    residual = _dead(_Net(residual=True), "b1")
    assert "r1" in select(residual, trace(residual, x), calibration, x, config).gaps  # the shortcut carries it
    both = _dead(_Net(residual=False), "b1", "b2")
    with pytest.raises(NoCandidate, match="no candidate left"):
        select(both, trace(both, x), calibration, x, config)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,)))
    result = compress(both, data, data, config=FAST, example_inputs=x, progress=False, log=None)
    assert result.steps == [] and result.stop_reason.startswith("no candidate left")


def _nearly_dead_branch() -> nn.Module:
    """The residual net with r1 off in every channel but 0, whose output c2 ignores: TLC's split and the
    whole branch off are the same function, and only the latter lets the merge drop c1 and c2."""
    torch.manual_seed(0)
    model = _dead(_Net(residual=True), "b1")
    model.b1.bias.data[0] = 1.0
    model.c2.weight.data[:, 0] = 0.0
    return model


def test_a_residual_branch_removed_whole_is_a_candidate_of_its_own(tmp_path):
    from tlc.graph import trace
    from tlc.methods.tlc import select, whole_branch_units

    x = torch.randn(2, 3, 8, 8)
    calibration = [(torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,)))]
    model = _nearly_dead_branch()
    graph = trace(model, x)
    config = TLCConfig()
    selection = select(model, graph, calibration, x, config, exclude=["r2"])
    assert selection.sites == ["r1"] and selection.whole_branches == ["r1"]
    assert not selection.masks["r1"].any()
    (whole,) = selection.units  # the same loss as TLC's split of r1, a larger saving
    assert whole.saving > selection.savings["r1"] and whole.gap == pytest.approx(selection.gaps["r1"], abs=1e-6)
    lin = tlc.linearize(model, selection.sites, x, selection.masks).eval()
    dep = tlc.merge(lin, x)
    assert weight_layers(dep) == weight_layers(tlc.merge(model, x)) - 2 == 2  # c1, c2 gone; c0 takes their bias, fc
    y = torch.randn(4, 3, 8, 8)
    assert torch.allclose(lin(y), dep(y), atol=1e-5)

    off = select(model, graph, calibration, x, dataclasses.replace(config, branch_removal=False), exclude=["r2"])
    assert off.whole_branches == [] and off.masks["r1"].any()
    plain = _Net(residual=False).eval()  # no shortcut: every channel off would make the output a constant
    assert whole_branch_units(plain, trace(plain, x), {"r1": torch.ones(8)}, {("r1",): 0.0}, x, "macs", None) == []

    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,)))
    result = compress(model, data, data, config=FAST, max_steps=1, example_inputs=x,
                      out_dir=tmp_path / "run", progress=False, log=None)
    step = result.steps[0]
    assert step.whole_branches == ["r1"] and "r1" in step.sites
    (row,) = csv.DictReader((tmp_path / "run" / "steps.csv").read_text().splitlines())
    assert row["whole_branches"] == "r1" and row["note"] == ""


def test_compress_refuses_to_report_success_when_its_folder_does_not_load_back(trained, digits, tmp_path,
                                                                               monkeypatch):
    """The output folder is loaded back and compared before compress returns: a folder that rebuilds
    another function is a clear error at the end of the run, not a broken result found later."""
    import tlc.io.recipe as recipe

    model, _ = trained
    real_load = recipe.load

    def load_with_a_drifted_weight(directory, **kwargs):
        loaded = real_load(directory, **kwargs)
        with torch.no_grad():
            next(p for p in loaded.parameters() if p.dim() > 1).mul_(1.5)
        return loaded

    monkeypatch.setattr(recipe, "load", load_with_a_drifted_weight)
    with pytest.raises(tlc.TLCError, match="loads back as another function"):
        _run(model, digits, tmp_path / "run", max_steps=1)
    assert (tmp_path / "run" / "report.json").is_file()  # what was written stays, for the bug report
