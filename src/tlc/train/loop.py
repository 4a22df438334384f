"""The fine-tuning loop run after every compression step, and evaluation.

`fit` is deterministic given its seed: each epoch builds its own loader, shuffled by a generator seeded
from ``(seed, epoch)``, and reseeds torch's global RNG (dropout, augmentation) from ``(seed, epoch)``, so the
data order and random draws of an epoch depend on nothing that happened before it. That, plus checkpoints
at epoch ends holding the model, optimizer, scheduler and grad-scaler state, makes a resumed run end with
the same weights, bit for bit, as an uninterrupted one (on the CPU; on a GPU only as far as its kernels are
deterministic). The caller's RNG state is left as it was.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tlc._inputs import ExampleInputs, as_call, logits, to_device
from tlc._progress import progress_bar
from tlc.errors import SpecError, TLCError
from tlc.train import distributed
from tlc.train.checkpoint import (
    complete_checkpoints,
    latest_complete,
    load_checkpoint,
    read_state,
    remove_checkpoint,
    save_checkpoint,
)
from tlc.train.config import FitConfig  # defined there, still importable from here
from tlc.train.distill import DistillConfig, distillation_loss
from tlc.train.hooks import FitHooks
from tlc.train.optim import build_optimizer, build_scheduler

CHECKPOINT_PREFIX = "epoch-"
NON_FINITE = "non-finite loss"
_SYNC_EVERY = 16  # steps between host-device syncs (loss check, progress bar); saves a sync per step on GPUs
_DATA_STREAM, _GLOBAL_STREAM = 0, 1


@dataclass
class FitResult:
    """What a `fit` call did. `epochs`, `steps`, `epoch_losses` and `samples_seen` describe the weights
    the model holds on return (so they exclude an epoch discarded by the non-finite guard);
    `wall_seconds` is the time of this call alone."""

    epochs: float  # epochs completed, fractional for a partial last epoch
    steps: int  # optimizer steps
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss per sample, per epoch
    stopped_reason: str | None = None  # None when the run completed, or e.g. "non-finite loss"
    wall_seconds: float = 0.0
    samples_seen: int = 0  # training samples over all processes (padded duplicates included)
    resumed_from: str | None = None  # name of the checkpoint the run continued from


def fit(
    model: nn.Module,
    train_data: Dataset,
    config: FitConfig,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    teacher: nn.Module | None = None,
    distill: DistillConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    description: str = "fine-tune",
    hooks: FitHooks | None = None,
) -> FitResult:
    """Fine-tune `model` in place on `train_data` (batches of ``(inputs, labels)``) and report the run.

    With a `teacher`, the loss is `distillation_loss` (default `DistillConfig` unless `distill` is given).
    With `checkpoint_dir`, a checkpoint is written at each epoch end (only the latest is kept); `resume`
    continues from it (a fresh start when there is none), and refuses one written with another config,
    seed, distillation setting or number of processes. If the loss turns NaN or infinite, training stops
    and the model gets back the weights it had at the start of that epoch (those of the last checkpoint).
    The model is left on `device`, in the train/eval modes it came with.
    `hooks` add a loss term to every step and act after every optimizer step (see `FitHooks`); they are
    not recorded in checkpoints, so pass the same hooks again when resuming.
    """
    started = time.perf_counter()
    config.validate()
    if distill is not None and teacher is None:
        raise SpecError("fit got a DistillConfig but no teacher: pass teacher=... or drop distill")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(f"fit: seed={seed!r} must be a non-negative integer")
    if resume and checkpoint_dir is None:
        raise SpecError("fit: resume=True needs the checkpoint_dir to resume from")
    if hooks is not None and not isinstance(hooks, FitHooks):
        raise SpecError(f"fit: hooks={hooks!r} must be a FitHooks or None")
    run = _Run(model, train_data, config, collate_fn, torch.device(device), seed, teacher, distill, hooks)
    resumed_from = run.prepare(Path(checkpoint_dir), resume) if checkpoint_dir is not None else None
    show = progress and distributed.is_main_process()
    stopped = None
    with _modes_restored(model), _modes_restored(teacher), torch.random.fork_rng(devices=_cuda_devices()):
        model.train()
        if teacher is not None:
            teacher.eval()
        for epoch in range(run.epoch, run.num_epochs):
            if not run.train_epoch(epoch, show, description):
                stopped = NON_FINITE
                warnings.warn(
                    f"{description}: non-finite loss in epoch {epoch + 1}; training stopped and the weights "
                    f"restored to those after step {run.step}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            if checkpoint_dir is not None:
                run.save(Path(checkpoint_dir))
    if config.channels_last:
        model.to(memory_format=torch.contiguous_format)
    distributed.broadcast_state(model)  # the same buffers (batch-norm statistics) on every rank
    return FitResult(
        epochs=run.step / run.batches_per_epoch,
        steps=run.step,
        epoch_losses=list(run.epoch_losses),
        stopped_reason=stopped,
        wall_seconds=time.perf_counter() - started,
        samples_seen=run.samples_seen,
        resumed_from=resumed_from,
    )


def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy, top-1 accuracy and sample count of `model` on `data`, in eval mode without grad.

    The model is moved to `device` and keeps the modes it came with. In a distributed run a dataset is
    split between the ranks and the counts are summed; a DataLoader is taken to yield this rank's share.
    `max_batches` (per rank) limits the evaluation to the first batches.
    """
    if max_batches is not None and max_batches < 1:
        raise SpecError(f"evaluate: max_batches={max_batches} must be None or at least 1")
    device = torch.device(device)
    if isinstance(data, DataLoader):
        loader = data
    else:
        loader = DataLoader(distributed.shard(data), batch_size=batch_size, collate_fn=collate_fn)
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, samples
    model.to(device)
    with _modes_restored(model), torch.no_grad():
        model.eval()
        batches = itertools.islice(loader, max_batches)
        show = progress and distributed.is_main_process()
        for inputs, labels in progress_bar(batches, total=total, desc="evaluate", enabled=show):
            labels = labels.to(device)
            logits = logits_of(model, to_device(inputs, device)).float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum")
            sums[1] += (logits.argmax(dim=-1) == labels).sum()
            sums[2] += labels.numel()
    loss, correct, samples = distributed.all_reduce_sum(sums).tolist()
    if samples == 0:
        raise SpecError("evaluate: the data yielded no samples")
    return {"loss": loss / samples, "accuracy": correct / samples, "samples": int(samples)}


def drop_other_world(checkpoint_dir: str | Path) -> str | None:
    """Delete the checkpoints of `checkpoint_dir` that another number of processes wrote (`fit` refuses to
    resume them: the data each rank saw differs) and return the latest one's name, None when there is none.
    Callers that resume an interrupted run with another number of processes restart that fine-tuning."""
    world, dropped = distributed.world_size(), None
    for name in complete_checkpoints(checkpoint_dir, CHECKPOINT_PREFIX):
        if read_state(checkpoint_dir, name).get("run", {}).get("world_size", 1) != world:
            remove_checkpoint(checkpoint_dir, name)
            dropped = name
    return dropped


def logits_of(model: nn.Module, inputs: ExampleInputs) -> torch.Tensor:
    """Run `model` on a batch's inputs (a tensor, or a dict of keyword tensors) and return its logits
    (the output itself, or its ``.logits`` as for Hugging Face models)."""
    args, kwargs = as_call(inputs)
    return logits(model(*args, **kwargs))


class _Run:
    """The state of one fine-tuning run: model, optimizer, schedule, and how far it got."""

    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        config: FitConfig,
        collate_fn: Callable[[list[Any]], Any] | None,
        device: torch.device,
        seed: int,
        teacher: nn.Module | None,
        distill: DistillConfig | None,
        hooks: FitHooks | None = None,
    ) -> None:
        if len(data) == 0:
            raise SpecError("fit: the training data is empty")
        world = distributed.world_size()
        if config.batch_size % world:
            raise SpecError(
                f"FitConfig.batch_size={config.batch_size} (the global batch) does not split evenly over "
                f"{world} processes; use a multiple of {world}"
            )
        self.model, self.data, self.config, self.collate_fn = model, data, config, collate_fn
        self.device, self.seed, self.teacher = device, seed, teacher
        self.distill = (distill or DistillConfig()) if teacher is not None else None
        self.hooks = hooks or FitHooks()
        self.batch_size = config.batch_size // world
        self.batches_per_epoch = len(self._loader(0))
        self.total_steps = max(1, math.floor(config.epochs * self.batches_per_epoch + 0.5))
        self.num_epochs = math.ceil(self.total_steps / self.batches_per_epoch)
        model.to(device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, config, self.hooks.own_lr(model))
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.amp_dtype = _amp_dtype(config.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.trained = distributed.wrap_model(model, device)
        self.epoch, self.step, self.samples_seen = 0, 0, 0
        self.epoch_losses: list[float] = []
        self.last_lr = config.lr  # learning rate of the latest step, for the progress bar

    # ------------------------------------------------------------------------------------ checkpoints

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it (JSON-normalised)."""
        run = {
            "config": asdict(self.config),
            "distill": asdict(self.distill) if self.distill is not None else None,
            "seed": self.seed,
            "world_size": distributed.world_size(),
        }
        return json.loads(json.dumps(run))

    def prepare(self, directory: Path, resume: bool) -> str | None:
        """Load the latest checkpoint of `directory` when resuming; refuse to overwrite one otherwise. In a
        distributed run rank 0 reads it and hands it to the others (only rank 0 needs the folder)."""
        found = distributed.on_main(self._read, directory, resume)
        if found is None:
            return None
        name, tensors, state, optimizer = found
        try:
            self.model.load_state_dict(tensors)
        except RuntimeError as e:
            raise TLCError(f"checkpoint {directory / name} does not fit the model: {e}") from e
        self.optimizer.load_state_dict(optimizer["optimizer"])
        self.scheduler.load_state_dict(optimizer["scheduler"])
        self.scaler.load_state_dict(optimizer["scaler"])
        self.epoch, self.step, self.samples_seen = state["epoch"], state["step"], state["samples_seen"]
        self.epoch_losses = list(state["epoch_losses"])
        return name

    def _read(self, directory: Path, resume: bool) -> tuple | None:
        """(name, tensors, state, optimizer state) of the checkpoint to resume from, None when there is none."""
        name = latest_complete(directory, CHECKPOINT_PREFIX)
        if name is None:
            return None
        if not resume:
            raise SpecError(
                f"{directory} already holds checkpoint {name}; pass resume=True to continue that run, or use "
                "an empty checkpoint_dir"
            )
        tensors, state, optimizer = load_checkpoint(directory, name)
        differences = _differences(state.get("run", {}), self.identity())
        if differences:
            raise SpecError(
                f"checkpoint {directory / name} belongs to another run ({'; '.join(differences)}); resume "
                "with the same settings or use an empty checkpoint_dir"
            )
        if optimizer is None:
            raise TLCError(f"checkpoint {directory / name} has no optimizer state and cannot be resumed")
        return name, tensors, state, optimizer

    def save(self, directory: Path) -> None:
        """Write this epoch's checkpoint (rank 0 only) and delete the older ones."""
        if distributed.is_main_process():
            state = {
                "epoch": self.epoch,
                "step": self.step,
                "samples_seen": self.samples_seen,
                "epoch_losses": self.epoch_losses,
                "run": self.identity(),
                "rng": _rng_record(),  # for the record: each epoch reseeds, so resuming does not need it
            }
            optimizer = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
            }
            name = f"{CHECKPOINT_PREFIX}{self.epoch:04d}"
            save_checkpoint(directory, name, tensors=self.model.state_dict(), state=state, optimizer=optimizer)
            for old in complete_checkpoints(directory, CHECKPOINT_PREFIX):
                if old != name:
                    remove_checkpoint(directory, old)
        distributed.barrier()

    # ---------------------------------------------------------------------------------------- training

    def train_epoch(self, epoch: int, show: bool, description: str) -> bool:
        """Run one epoch (or the part of it the run still needs). On a non-finite loss, put the weights
        of the epoch's start back and return False."""
        torch.manual_seed(_derive_seed(self.seed, epoch, _GLOBAL_STREAM, distributed.rank()))
        start_step, start_state = self.step, _snapshot(self.model)
        steps = min(self.batches_per_epoch, self.total_steps - self.step)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        bar = progress_bar(total=steps, desc=f"{description} {epoch + 1}/{self.num_epochs}", unit="batch",
                           enabled=show)
        with bar:
            for i, (inputs, labels) in enumerate(itertools.islice(self._loader(epoch), steps)):
                loss = self._train_step(inputs, labels).detach()
                loss_sum += loss.double() * labels.shape[0]
                bad += (~torch.isfinite(loss)).double()
                count += labels.shape[0]
                bar.update()
                if (i + 1) % _SYNC_EVERY == 0 or i + 1 == steps:
                    total_loss, total_bad, total_count = self._totals(loss_sum, bad, count)
                    if total_bad:
                        self.step = start_step
                        self.model.load_state_dict(start_state)
                        return False
                    bar.set_postfix(loss=f"{total_loss / total_count:.4f}", lr=f"{self.last_lr:.3g}")
        self.epoch = epoch + 1
        self.epoch_losses.append(total_loss / total_count)
        self.samples_seen += int(total_count)
        return True

    def _totals(self, loss_sum: torch.Tensor, bad: torch.Tensor, count: int) -> list[float]:
        """Loss sum, non-finite loss count and sample count of the epoch so far, over all ranks (a sync)."""
        local = torch.stack([loss_sum, bad, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        return distributed.all_reduce_sum(local).tolist()

    def _train_step(self, inputs: ExampleInputs, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns the (graph-attached) loss."""
        inputs, labels = to_device(inputs, self.device), labels.to(self.device)
        if self.config.channels_last and isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = logits_of(self.trained, inputs)
            if self.teacher is None:
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)
            else:
                with torch.no_grad():
                    teacher_logits = logits_of(self.teacher, inputs)
                loss = distillation_loss(
                    logits, teacher_logits, labels, self.distill, label_smoothing=self.config.label_smoothing
                )
            extra = self.hooks.extra_loss(self.model, inputs, labels, logits)
            if extra is not None:
                loss = loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.hooks.step_done(self.model)
        self.step += 1
        return loss

    def _loader(self, epoch: int) -> DataLoader:
        """The epoch's loader: order and worker seeds depend only on (seed, epoch, rank)."""
        sampler = distributed.train_sampler(self.data, self.seed, epoch)
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, _DATA_STREAM, distributed.rank()))
        return DataLoader(
            self.data,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator,
            num_workers=self.config.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
        )


def _derive_seed(*words: int) -> int:
    """A 64-bit seed mixed from non-negative integers (independent streams for distinct tuples)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0])


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the `amp` setting on `device`, or None for full precision."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state (parameters and buffers)."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


@contextlib.contextmanager
def _modes_restored(model: nn.Module | None) -> Iterator[None]:
    """Put every submodule back in the train/eval mode it had on entry."""
    modes = [(m, m.training) for m in model.modules()] if model is not None else []
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _cuda_devices() -> list[int]:
    """The CUDA devices whose RNG `fit` must leave as it found them."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _rng_record() -> dict[str, Any]:
    """torch's CPU and CUDA RNG states, base64-encoded."""
    encode = lambda state: base64.b64encode(state.numpy().tobytes()).decode("ascii")
    record: dict[str, Any] = {"cpu": encode(torch.get_rng_state())}
    if torch.cuda.is_available():
        record["cuda"] = [encode(state) for state in torch.cuda.get_rng_state_all()]
    return record


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every setting that differs, config fields listed one by one."""
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(old.keys() | new.keys())
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _flatten(run: dict[str, Any]) -> dict[str, Any]:
    """A run identity with its config fields lifted to the top level."""
    return {**run.get("config", {}), **{k: v for k, v in run.items() if k != "config"}}
