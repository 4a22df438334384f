"""Fine-tuning (tlc.train): the loop, schedules, distillation, checkpoints, resume, guards, torchrun."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import tlc
import tlc.train.checkpoint as checkpoint_module
from tlc.errors import SpecError, TLCError
from tlc.train import (
    DistillConfig,
    FitConfig,
    FitHooks,
    FitResult,
    atomic_write_json,
    atomic_write_text,
    build_scheduler,
    distillation_loss,
    evaluate,
    fit,
    latest_complete,
    load_checkpoint,
    logits_of,
    lr_factor,
    save_checkpoint,
)
from tlc.zoo.cifar import tiny_cnn
from tlc.zoo.data import load_data

from .ddp_worker import hook_mask, hook_target, toy_data, toy_model

QUICK = dict(batch_size=64, optimizer="adamw", lr=3e-2, weight_decay=0.0)  # learns digits in a few epochs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: a second intra-op thread only adds OpenMP spinning on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


class Probe(nn.Module):
    """Wraps a model: counts training forwards, applies dropout to the input (so the RNG matters), and on
    a chosen training forward raises (a simulated crash) or feeds NaN (a diverging run)."""

    def __init__(self, inner: nn.Module, *, crash_at: int | None = None, nan_at: int | None = None) -> None:
        super().__init__()
        self.inner, self.crash_at, self.nan_at = inner, crash_at, nan_at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.crash_at:
                raise KeyboardInterrupt("simulated crash")
            if self.nan_at is not None and self.calls >= self.nan_at:
                x = x * float("nan")
        return self.inner(F.dropout(x, 0.1, self.training))


def probe(seed: int = 0, **kwargs) -> Probe:
    torch.manual_seed(seed)
    return Probe(tiny_cnn(10, 1, width=4), **kwargs)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------- the loop


def test_fit_learns_digits_and_leaves_modes_and_rng_alone(digits):
    torch.manual_seed(0)
    model = tiny_cnn(10, 1, width=8)
    before = evaluate(model, digits.val)
    model.eval()
    model.bn1.train()  # mixed modes must come back as they were
    torch.manual_seed(123)
    expected_draw = torch.rand(4)
    torch.manual_seed(123)
    result = fit(model, digits.train, FitConfig(epochs=3, **QUICK), progress=False)
    assert torch.equal(torch.rand(4), expected_draw)  # the caller's RNG stream is untouched
    after = evaluate(model, digits.val)
    assert result.stopped_reason is None
    assert result.steps == 3 * math.ceil(1257 / 64) and result.epochs == 3.0
    assert result.samples_seen == 3 * 1257
    assert len(result.epoch_losses) == 3 and result.epoch_losses[-1] < 0.5 * result.epoch_losses[0]
    assert before["accuracy"] < 0.3 and after["accuracy"] > 0.8
    assert after["loss"] < 0.5 * before["loss"]
    assert not model.training and model.bn1.training and not model.fc.training


def test_evaluate_equals_a_manual_count(digits):
    torch.manual_seed(0)
    model = tiny_cnn(10, 1, width=4)
    fit(model, digits.train, FitConfig(epochs=1, **QUICK), progress=False)
    model.train()
    metrics = evaluate(model, digits.val, batch_size=64)  # 270 = 4 full batches and one of 14
    assert model.training
    model.eval()
    with torch.no_grad():
        inputs, labels = next(iter(DataLoader(digits.val, batch_size=len(digits.val))))
        logits = model(inputs)
    assert metrics["samples"] == 270
    assert metrics["accuracy"] == (logits.argmax(1) == labels).sum().item() / 270
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    first = evaluate(model, DataLoader(digits.val, batch_size=100), max_batches=2)
    assert first["samples"] == 200
    assert first["accuracy"] == (logits[:200].argmax(1) == labels[:200]).sum().item() / 200


def test_fractional_epochs_stop_after_the_right_number_of_batches():
    data = TensorDataset(torch.randn(100, 1, 8, 8), torch.randint(0, 10, (100,)))  # 10 batches of 10
    for epochs, steps in ((1.5, 15), (0.25, 3), (0.01, 1)):  # round half up, at least one batch
        model = probe()
        result = fit(model, data, FitConfig(epochs=epochs, batch_size=10), progress=False)
        assert model.calls == steps and result.steps == steps
        assert result.epochs == steps / 10 and result.samples_seen == 10 * steps
        assert len(result.epoch_losses) == math.ceil(steps / 10)


def test_frozen_parameters_stay_put_and_all_frozen_is_refused(digits):
    torch.manual_seed(0)
    model = tiny_cnn(10, 1, width=4)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    before = state_of(model)
    fit(model, digits.train, FitConfig(epochs=0.2, **QUICK), progress=False)
    after = state_of(model)
    for name, _ in model.named_parameters():
        assert torch.equal(before[name], after[name]) != name.startswith("fc."), name
    model.fc.requires_grad_(False)
    with pytest.raises(SpecError, match="nothing to fine-tune"):
        fit(model, digits.train, FitConfig(), progress=False)


def test_all_options_together(digits):
    """bf16 autocast, channels_last, clipping, smoothing, step schedule with warmup, SGD: runs and learns."""
    torch.manual_seed(0)
    model = tiny_cnn(10, 1, width=4)
    config = FitConfig(
        epochs=2, batch_size=32, lr=0.2, schedule="step", warmup_steps=5, grad_clip=1.0, label_smoothing=0.1,
        amp="bf16", channels_last=True,
    )  # fmt: skip
    result = fit(model, digits.train, config, progress=False)
    assert result.stopped_reason is None and result.epoch_losses[1] < result.epoch_losses[0]
    assert all(p.is_contiguous() for p in model.parameters())
    assert evaluate(model, digits.val)["accuracy"] > 0.3  # chance is 0.1


def test_progress_bar_shows_epoch_loss_and_lr(digits, capsys):
    torch.manual_seed(0)
    fit(tiny_cnn(10, 1, width=4), digits.train, FitConfig(epochs=0.1, **QUICK), description="step 3")
    err = capsys.readouterr().err
    assert "step 3 1/1" in err and "loss=" in err and "lr=" in err
    fit(tiny_cnn(10, 1, width=4), digits.train, FitConfig(epochs=0.1, **QUICK), progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"optimizer": "adam"}, "optimizer"), ({"epochs": 0}, "epochs"), ({"milestones": (0.5, 1.5)}, "milestones"),
     ({"amp": "fp8"}, "amp"), ({"grad_clip": 0.0}, "grad_clip"), ({"label_smoothing": 1.0}, "label_smoothing")],
)  # fmt: skip
def test_config_refuses_bad_values_by_name(changes, field):
    with pytest.raises(SpecError, match=f"FitConfig.{field}="):
        FitConfig(**changes)


# ------------------------------------------------------------------------------------------- schedule


def test_schedule_values_at_chosen_steps():
    cosine, step = FitConfig(schedule="cosine"), FitConfig(schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert lr_factor(0, 10, cosine) == 1.0
    assert lr_factor(5, 10, cosine) == pytest.approx(0.5)
    assert lr_factor(9, 10, cosine) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    assert [lr_factor(s, 8, step) for s in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    warm = FitConfig(schedule="constant", warmup_steps=4)
    assert [lr_factor(s, 10, warm) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    warm_cosine = FitConfig(schedule="cosine", warmup_steps=4)
    assert lr_factor(1, 10, warm_cosine) == pytest.approx(0.5 * 0.5 * (1 + math.cos(0.1 * math.pi)))


def test_scheduler_sets_the_optimizer_learning_rate_step_by_step():
    config = FitConfig(lr=0.4, schedule="cosine", warmup_steps=2)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(optimizer, config, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.4 * lr_factor(s, 6, config) for s in range(6)])


@settings(max_examples=60, deadline=None)
@given(
    schedule=st.sampled_from(["cosine", "step", "constant"]),
    warmup=st.integers(0, 20),
    total=st.integers(1, 200),
)
def test_schedule_is_bounded_and_never_rises_after_warmup(schedule, warmup, total):
    config = FitConfig(schedule=schedule, warmup_steps=warmup)
    factors = [lr_factor(s, total, config) for s in range(total)]
    assert all(0 < f <= 1 for f in factors)
    after = factors[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))


# ------------------------------------------------------------------------------------------- distillation


def test_distillation_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 3
    labels = torch.randint(0, 7, (5,), generator=g)
    config = DistillConfig(alpha=0.3, temperature=2.5)
    s, t, T = student.double(), teacher.double(), 2.5
    p_t = torch.softmax(t / T, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, 1))).sum() / 5
    ce = -torch.log_softmax(s, 1)[torch.arange(5), labels].mean()
    expected = 0.7 * ce + 0.3 * T**2 * kl
    assert distillation_loss(student, teacher, labels, config).item() == pytest.approx(expected.item(), rel=1e-5)
    hard_only = distillation_loss(student, teacher, labels, DistillConfig(alpha=0.0), label_smoothing=0.1)
    assert torch.equal(hard_only, F.cross_entropy(student, labels, label_smoothing=0.1))
    assert distillation_loss(teacher, teacher, labels, DistillConfig(alpha=1.0)).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(SpecError, match="alpha"):
        DistillConfig(alpha=1.5)


def test_fit_with_a_teacher_keeps_the_teacher_frozen_in_eval_mode(digits):
    torch.manual_seed(0)
    teacher = tiny_cnn(10, 1, width=8)
    fit(teacher, digits.train, FitConfig(epochs=2, **QUICK), progress=False)
    teacher_state = state_of(teacher)
    modes = []
    teacher.register_forward_hook(lambda m, i, o: modes.append((m.training, torch.is_grad_enabled())))
    torch.manual_seed(1)
    student = tiny_cnn(10, 1, width=4)
    inputs, labels = next(iter(DataLoader(digits.val, batch_size=len(digits.val))))

    def gap_to_teacher() -> float:  # the soft term alone, on the validation images
        with torch.no_grad():
            return distillation_loss(student.eval()(inputs), teacher(inputs), labels, DistillConfig(1.0, 2.0)).item()

    teacher.eval()
    gap_before = gap_to_teacher()
    teacher.train()
    result = fit(
        student, digits.train, FitConfig(epochs=2, **QUICK), teacher=teacher, distill=DistillConfig(1.0, 2.0),
        progress=False,
    )  # fmt: skip
    assert set(modes[1:]) == {(False, False)} and len(modes) == 1 + result.steps
    assert teacher.training
    assert_same_state(teacher_state, state_of(teacher))
    assert result.epoch_losses[1] < result.epoch_losses[0]
    teacher.eval()
    assert gap_to_teacher() < 0.7 * gap_before  # the student moved towards the teacher (0.82 -> 0.47)
    with pytest.raises(SpecError, match="no teacher"):
        fit(student, digits.train, FitConfig(), distill=DistillConfig(), progress=False)


# ------------------------------------------------------------------------------------------- text models


class TokenData(Dataset):
    """Padded token sequences as dicts; the label is whether the first token is in the upper half."""

    def __init__(self, n: int = 96, length: int = 8, vocab: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        lengths = torch.randint(2, length + 1, (n,), generator=g)
        self.mask = (torch.arange(length)[None] < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.labels = (self.ids[:, 0] >= vocab // 2).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.labels[i]


def test_dict_inputs_and_logits_outputs_with_a_tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    data = TokenData()
    inputs, _ = next(iter(DataLoader(data, batch_size=4)))
    assert isinstance(inputs, dict) and logits_of(model, inputs).shape == (4, 2)
    before = evaluate(model, data, batch_size=32)
    result = fit(model, data, FitConfig(epochs=6, batch_size=16, optimizer="adamw", lr=5e-3), progress=False)
    after = evaluate(model, data, batch_size=32)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert after["loss"] < before["loss"] and after["samples"] == 96


def test_logits_of_refuses_an_output_without_logits():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(SpecError, match=r"\.logits"):
        logits_of(Pair(), torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------- checkpoint files


def small_checkpoint(directory: Path, name: str, value: float) -> None:
    weight = torch.full((3, 2), value)
    save_checkpoint(
        directory, name, tensors={"w": weight, "tied": weight, "t": weight.t()}, state={"value": value},
        optimizer={"momentum": torch.full((2,), value), "step": 3},
    )  # fmt: skip


def test_checkpoint_round_trip_with_tied_and_strided_tensors(tmp_path):
    small_checkpoint(tmp_path, "epoch-0001", 1.0)
    tensors, state, optimizer = load_checkpoint(tmp_path, "epoch-0001")
    assert state == {"value": 1.0} and optimizer["step"] == 3
    assert torch.equal(optimizer["momentum"], torch.ones(2))
    assert torch.equal(tensors["w"], torch.ones(3, 2)) and torch.equal(tensors["t"], torch.ones(2, 3))
    assert tensors["w"].data_ptr() != tensors["tied"].data_ptr()


def test_an_interrupted_write_leaves_the_previous_checkpoint_complete(tmp_path, monkeypatch):
    small_checkpoint(tmp_path, "epoch-0001", 1.0)
    real_replace = os.replace

    def crash_before_json(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt("killed before the JSON was renamed into place")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", crash_before_json)
    with pytest.raises(KeyboardInterrupt):
        small_checkpoint(tmp_path, "epoch-0002", 2.0)
    monkeypatch.undo()
    assert (tmp_path / "epoch-0002.safetensors").exists()  # data renamed, but the checkpoint is incomplete
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json") == ["epoch-0001.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert latest_complete(tmp_path, "epoch-") == "epoch-0001"
    tensors, state, _ = load_checkpoint(tmp_path, "epoch-0001")
    assert state == {"value": 1.0} and torch.equal(tensors["w"], torch.ones(3, 2))
    with pytest.raises(TLCError, match="incomplete"):
        load_checkpoint(tmp_path, "epoch-0002")
    (tmp_path / ".epoch-0003.json.x1y2.tmp").write_text("{")  # a temp file left by a hard kill
    assert latest_complete(tmp_path, "epoch-") == "epoch-0001"


def disk_full(*args, **kwargs):
    raise OSError("disk full")


def killed(*args, **kwargs):
    raise KeyboardInterrupt("killed")


def test_rewriting_a_name_invalidates_it_until_the_new_one_is_complete(tmp_path, monkeypatch):
    small_checkpoint(tmp_path, "last", 1.0)
    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        small_checkpoint(tmp_path, "last", 2.0)
    assert latest_complete(tmp_path, "last") is None
    monkeypatch.undo()
    small_checkpoint(tmp_path, "last", 3.0)
    assert load_checkpoint(tmp_path, "last")[1] == {"value": 3.0}


def test_latest_complete_orders_names_naturally(tmp_path):
    for name in ("epoch-9", "epoch-10", "other-99"):
        small_checkpoint(tmp_path, name, 0.0)
    assert latest_complete(tmp_path, "epoch-") == "epoch-10"
    assert latest_complete(tmp_path / "missing", "epoch-") is None


def test_atomic_text_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"accuracy": 0.5})
    monkeypatch.setattr(checkpoint_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "half")
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


_unpickled: list[str] = []


def _record_unpickling() -> None:
    _unpickled.append("code ran")


class Payload:
    def __reduce__(self):
        return _record_unpickling, ()


def test_optimizer_state_is_loaded_with_weights_only(tmp_path):
    param = nn.Parameter(torch.randn(4))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(4)
    optimizer.step()
    save_checkpoint(tmp_path, "a", tensors={"p": param}, state={}, optimizer=optimizer.state_dict())
    restored = torch.optim.SGD([nn.Parameter(torch.zeros(4))], lr=0.5, momentum=0.9)
    restored.load_state_dict(load_checkpoint(tmp_path, "a")[2])
    assert torch.equal(restored.state_dict()["state"][0]["momentum_buffer"], torch.ones(4))
    assert restored.param_groups[0]["lr"] == 0.1
    torch.save({"optimizer": Payload()}, tmp_path / "a.optim.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path, "a")
    assert _unpickled == []


# ------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_after_a_crash_ends_bit_identical(digits, tmp_path, optimizer):
    config = FitConfig(epochs=3, batch_size=128, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-2)
    batches = math.ceil(1257 / 128)
    reference = probe(seed=0)
    expected = fit(reference, digits.train, config, checkpoint_dir=tmp_path / "a", progress=False)
    assert [p.name for p in sorted((tmp_path / "a").iterdir())] == [
        "epoch-0003.json", "epoch-0003.optim.pt", "epoch-0003.safetensors",
    ]  # fmt: skip

    crashing = probe(seed=0, crash_at=batches + 4)  # dies in the middle of the second epoch
    with pytest.raises(KeyboardInterrupt):
        fit(crashing, digits.train, config, checkpoint_dir=tmp_path / "b", progress=False)
    assert latest_complete(tmp_path / "b", "epoch-") == "epoch-0001"

    restarted = probe(seed=7)  # a new process rebuilds the model; its own init must not matter
    result = fit(restarted, digits.train, config, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert result.resumed_from == "epoch-0001" and restarted.calls == 2 * batches
    assert_same_state(state_of(reference), state_of(restarted))
    assert result.epoch_losses == expected.epoch_losses and result.steps == expected.steps == 3 * batches
    assert result.samples_seen == expected.samples_seen

    again = fit(probe(seed=3), digits.train, config, checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert again.resumed_from == "epoch-0003" and again.steps == 3 * batches and again.epochs == 3.0


def test_resume_refuses_another_run_and_fresh_runs_refuse_old_checkpoints(digits, tmp_path):
    config = FitConfig(epochs=0.2, **QUICK)
    fit(probe(), digits.train, config, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(SpecError, match="resume=True"):
        fit(probe(), digits.train, config, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(SpecError, match="epochs: 0.2 -> 3"):
        fit(probe(), digits.train, FitConfig(epochs=3, **QUICK), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(SpecError, match="seed: 0 -> 1"):
        fit(probe(), digits.train, config, checkpoint_dir=tmp_path, resume=True, seed=1)
    fresh = fit(probe(), digits.train, config, checkpoint_dir=tmp_path / "new", resume=True, progress=False)
    assert fresh.resumed_from is None and fresh.steps == 4


# ------------------------------------------------------------------------------------------- non-finite guard


def test_a_non_finite_loss_restores_the_last_good_weights(digits, tmp_path):
    config = FitConfig(epochs=3, batch_size=128, lr=0.05)
    batches = math.ceil(1257 / 128)
    model = probe(nan_at=batches + 3)  # NaN inputs from the 3rd step of epoch 2 on: weights and BN stats go NaN
    with pytest.warns(RuntimeWarning, match="non-finite loss in epoch 2"):
        result = fit(model, digits.train, config, checkpoint_dir=tmp_path, progress=False)
    assert result.stopped_reason == "non-finite loss"
    assert result.steps == batches and result.epochs == 1.0 and len(result.epoch_losses) == 1
    good, state, _ = load_checkpoint(tmp_path, latest_complete(tmp_path, "epoch-"))
    assert state["epoch"] == 1
    assert_same_state(good, state_of(model))
    assert all(torch.isfinite(v.float()).all() for v in good.values())

    no_dir = probe(nan_at=batches + 3)
    with pytest.warns(RuntimeWarning):
        assert fit(no_dir, digits.train, config, progress=False).stopped_reason == "non-finite loss"
    assert_same_state(good, state_of(no_dir))

    first_epoch = probe(nan_at=2)
    initial = state_of(first_epoch)
    with pytest.warns(RuntimeWarning, match="epoch 1"):
        result = fit(first_epoch, digits.train, config, progress=False)
    assert result.steps == 0 and result.epoch_losses == []
    assert_same_state(initial, state_of(first_epoch))


# ------------------------------------------------------------------------------------------- hooks

TOY = FitConfig(epochs=2, batch_size=16, lr=0.1)  # 90 samples: 6 steps per epoch


def toy_fit(hooks: FitHooks | None = None, config: FitConfig = TOY, **kwargs) -> tuple[nn.Module, FitResult]:
    """`toy_model` (seed 0) fine-tuned on `toy_data` with `hooks`; returns the model and the FitResult."""
    torch.manual_seed(0)
    model = toy_model()
    return model, fit(model, toy_data(), config, hooks=hooks, progress=False, **kwargs)


def l2_pull(target: torch.Tensor, coefficient: float, calls: list | None = None):
    """A loss hook pulling layer 0's weight towards `target`; records what it is called with in `calls`."""

    def loss(model, inputs, labels, outputs):
        if calls is not None:
            calls.append((model, inputs.shape, labels.shape, outputs.shape, outputs.requires_grad))
        return coefficient * (model[0].weight - target).square().sum()

    return loss


def test_no_hooks_and_empty_hooks_train_exactly_as_before():
    plain, expected = toy_fit()
    for hooks in (None, FitHooks(), FitHooks(loss=lambda *args: None)):
        model, result = toy_fit(hooks)
        assert_same_state(state_of(plain), state_of(model))
        assert result.epoch_losses == expected.epoch_losses
    model, result = toy_fit(FitHooks(loss=lambda *args: torch.tensor(5.0, dtype=torch.float64)))
    assert_same_state(state_of(plain), state_of(model))  # a constant term has no gradient...
    assert result.epoch_losses == pytest.approx([x + 5 for x in expected.epoch_losses], abs=1e-5)  # ...but counts


def test_a_loss_hook_regularizes_the_weights():
    target = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    plain, _ = toy_fit()
    calls = []
    pulled, result = toy_fit(FitHooks(loss=l2_pull(target, 0.5, calls)))
    assert (pulled[0].weight - target).norm() < 0.5 * (plain[0].weight - target).norm()  # 2.5 against 8.5
    assert len(calls) == result.steps == 12
    assert all(c[0] is pulled and c[4] for c in calls)  # the model itself and graph-attached logits
    assert {c[1:4] for c in calls} == {((16, 4), (16,), (16, 3)), ((10, 4), (10,), (10, 3))}  # 90 = 5 * 16 + 10


def test_a_loss_hook_runs_inside_autocast_and_is_added_in_float32():
    target = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    seen = []

    def pull(model, inputs, labels, outputs):
        seen.append((torch.is_autocast_enabled("cpu"), outputs.dtype))
        return (model[0](inputs) - inputs @ target.t()).square().mean()  # a bf16 term under autocast

    plain, _ = toy_fit(config=FitConfig(epochs=2, batch_size=16, lr=0.1, amp="bf16"))
    pulled, result = toy_fit(FitHooks(loss=pull), config=FitConfig(epochs=2, batch_size=16, lr=0.1, amp="bf16"))
    assert set(seen) == {(True, torch.bfloat16)} and result.stopped_reason is None
    assert (pulled[0].weight - target).norm() < (plain[0].weight - target).norm()


def test_after_step_keeps_a_pruning_mask():
    mask = (torch.rand(16, 4, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    grad_modes = []

    def prune(model):
        grad_modes.append(torch.is_grad_enabled())
        model[0].weight.mul_(mask)  # in place on a leaf that requires grad: needs the no_grad fit provides

    torch.manual_seed(0)
    initial = toy_model()[0].weight.detach() * mask
    free, _ = toy_fit()
    masked, result = toy_fit(FitHooks(after_step=prune))
    weight = masked[0].weight.detach()
    assert grad_modes == [False] * result.steps and result.steps == 12
    assert (weight[mask == 0] == 0).all() and (weight[mask == 1] != initial[mask == 1]).all()
    assert (free[0].weight[mask == 0] != 0).all()  # without the hook the pruned weights come back


def test_resume_with_hooks_ends_bit_identical(digits, tmp_path):
    """A regularizer drawing random projections (from the RNG fit reseeds) and a mask kept after each step."""
    config = FitConfig(epochs=3, batch_size=128, lr=0.05)
    batches = math.ceil(1257 / 128)
    mask = (torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(3)) > 0.5).float()

    def sliced(model, inputs, labels, outputs):
        projections = torch.randn(8, 4)
        return 0.1 * (model.inner.fc.weight @ projections).square().mean()

    hooks = FitHooks(loss=sliced, after_step=lambda model: model.inner.conv1.weight.mul_(mask))
    reference = probe(seed=0)
    expected = fit(reference, digits.train, config, hooks=hooks, checkpoint_dir=tmp_path / "a", progress=False)
    plain = probe(seed=0)
    fit(plain, digits.train, config, progress=False)
    assert not torch.equal(plain.inner.fc.weight, reference.inner.fc.weight)  # the hooks did change the run
    assert (reference.inner.conv1.weight[mask == 0] == 0).all()

    crashing = probe(seed=0, crash_at=batches + 4)
    with pytest.raises(KeyboardInterrupt):
        fit(crashing, digits.train, config, hooks=hooks, checkpoint_dir=tmp_path / "b", progress=False)
    assert latest_complete(tmp_path / "b", "epoch-") == "epoch-0001"
    restarted = probe(seed=7)
    result = fit(restarted, digits.train, config, hooks=hooks, checkpoint_dir=tmp_path / "b", resume=True,
                 progress=False)  # fmt: skip
    assert result.resumed_from == "epoch-0001" and restarted.calls == 2 * batches
    assert_same_state(state_of(reference), state_of(restarted))
    assert result.epoch_losses == expected.epoch_losses


def test_a_non_finite_hook_loss_restores_the_last_good_weights(digits, tmp_path):
    config = FitConfig(epochs=3, batch_size=128, lr=0.05)
    batches = math.ceil(1257 / 128)
    calls = []

    def diverging(model, inputs, labels, outputs):
        calls.append(1)
        return model.inner.fc.weight.sum() * (float("inf") if len(calls) > batches + 2 else 0.0)

    model = probe()
    with pytest.warns(RuntimeWarning, match="non-finite loss in epoch 2"):
        result = fit(model, digits.train, config, hooks=FitHooks(loss=diverging), checkpoint_dir=tmp_path,
                     progress=False)  # fmt: skip
    assert result.stopped_reason == "non-finite loss" and result.steps == batches
    good, _, _ = load_checkpoint(tmp_path, "epoch-0001")
    assert_same_state(good, state_of(model))


def test_bad_hooks_are_refused():
    with pytest.raises(SpecError, match="FitHooks.after_step"):
        FitHooks(after_step="prune")
    with pytest.raises(SpecError, match="FitHooks or None"):
        toy_fit(lambda *args: None)
    with pytest.raises(SpecError, match=r"scalar tensor or None, got \(16, 4\)"):
        toy_fit(FitHooks(loss=lambda model, *args: model[0].weight))
    with pytest.raises(SpecError, match="got float"):
        toy_fit(FitHooks(loss=lambda *args: 1.0))


def test_fit_config_lives_in_its_own_module_and_is_still_importable_from_loop():
    import inspect

    import tlc.train.config
    import tlc.train.loop
    import tlc.train.optim

    def train_imports(module) -> set[str]:
        return set(re.findall(r"^\s*from (tlc\.train\.\w+) import", inspect.getsource(module), re.MULTILINE))

    assert tlc.train.loop.FitConfig is tlc.train.config.FitConfig is tlc.train.optim.FitConfig is FitConfig
    assert train_imports(tlc.train.optim) == {"tlc.train.config"}  # no import cycle loop <-> optim any more
    assert train_imports(tlc.train.config) == set()


# ------------------------------------------------------------------------------------------- torchrun


def test_two_cpu_processes_under_torchrun_end_identical(tmp_path):
    source = str(Path(tlc.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(Path(__file__).with_name("ddp_worker.py")), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["main"] for r in ranks] == [True, False] and ranks[0]["world_size"] == 2
    assert_same_state(ranks[0]["state"], ranks[1]["state"])
    assert_same_state(ranks[0]["hooked_state"], ranks[1]["hooked_state"])  # despite rank-dependent loss terms
    for r in ranks:  # each rank ran both hooks at every step, on the module itself rather than the DDP wrapper
        assert r["hooked_seen"] == ["Sequential"] * 2 * r["hooked_steps"] and r["hooked_steps"] == 6 * 2
    hooked, plain = ranks[0]["hooked_state"], ranks[0]["state"]
    assert (hooked["3.weight"][hook_mask() == 0] == 0).all() and (hooked["3.weight"][hook_mask() == 1] != 0).all()
    assert (hooked["0.weight"] - hook_target()).norm() < 0.5 * (plain["0.weight"] - hook_target()).norm()
    assert ranks[0]["result"] == {**ranks[1]["result"], "wall_seconds": ranks[0]["result"]["wall_seconds"]}
    assert ranks[0]["result"]["samples_seen"] == 2 * 90 and ranks[0]["result"]["steps"] == 2 * 6
    assert latest_complete(tmp_path / "checkpoints", "epoch-") == "epoch-0002"
    model = toy_model()
    model.load_state_dict(ranks[0]["state"])
    single = evaluate(model, toy_data())
    for r in ranks:
        assert r["metrics"]["samples"] == 90
        assert r["metrics"]["accuracy"] == single["accuracy"]
        assert r["metrics"]["loss"] == pytest.approx(single["loss"], rel=1e-6)


@pytest.mark.parametrize(("env", "enabled", "disabled"), [("1", True, True), (None, True, False), (None, False, True)])
def test_progress_bars_follow_the_caller_and_tqdm_disable(env, enabled, disabled):
    environ = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"} | ({"TQDM_DISABLE": env} if env else {})
    code = f"from tlc._progress import progress_bar; print(progress_bar(range(3), enabled={enabled}).disable)"
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(disabled)
