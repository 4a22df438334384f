"""Settings every method shares: the accuracy budget, stopping rules, calibration data, fine-tuning,
distillation, merge policy and seed (a method's own settings live in its config, see tlc.methods)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from tlc._inputs import ExampleInputs
from tlc.surgery.plan import POLICIES
from tlc.train import DistillConfig, FitConfig


@dataclass
class RunConfig:
    """The loop's settings, whatever the method. Presets of a method may change them (the paper protocol
    of TLC retrains 160 epochs per step and stops below 20% accuracy, say)."""

    preset: str = "default"
    max_acc_drop: float = 1.0  # points of top-1 (or task metric) below the original, on validation data
    max_steps: int | None = None
    target_macs_ratio: float | None = None  # stop once deploy MACs <= this fraction of the original
    target_speedup: float | None = None  # stop once measured batch-1 speed-up >= this
    calibration_size: int = 1024
    calibration_batch_size: int = 64
    policy: str = "macs"
    finetune: FitConfig = field(default_factory=lambda: FitConfig(epochs=1.0, lr=0.01, schedule="cosine"))
    final_finetune_epochs: float = 0.0
    distill: DistillConfig | None = None
    stop_accuracy: float | None = None  # stop when validation accuracy falls below this fraction
    min_activations: int = 0  # stop when this many activations are left
    continue_past_budget: bool = False  # keep going after the budget is spent (result: best within budget)
    budget_patience: int | None = None  # with continue_past_budget: stop after this many steps over budget in a row
    retry_single: bool = True  # a rejected step is retried with the proposal's fallback (TLC: its best site alone)
    rejection_patience: int = 2  # stop after this many rejected steps in a row; a rejected step's sites are
    # set aside and the next-best candidates are tried from the last accepted model (1: stop at the first)
    latency_repeats: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_acc_drop < 0:
            raise ValueError("max_acc_drop must be >= 0 (points of accuracy)")
        if self.rejection_patience < 1:
            raise ValueError("rejection_patience must be >= 1 (1 stops at the first rejected step)")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.calibration_size < 1 or self.calibration_batch_size < 1:
            raise ValueError("calibration_size and calibration_batch_size must be >= 1")


# Settings that only decide when the run ends: a resumed run may change them (stop a long run early, or
# let one that reached max_steps go on: the checks made before a step are not stored, only made again),
# since the steps already done do not depend on them.
STOP_SETTINGS = ("max_steps", "target_macs_ratio", "target_speedup", "stop_accuracy", "min_activations",
                 "budget_patience", "final_finetune_epochs")


@dataclass
class RunContext:
    """What a method sees of the run: settings, data and where it runs (read-only by convention)."""

    config: RunConfig
    example_inputs: ExampleInputs
    calibration: Sequence[tuple[Any, torch.Tensor]]
    train_data: Dataset
    val_data: Dataset
    collate_fn: Callable | None
    device: torch.device
    progress: bool = True
    log: Callable[[str], None] = lambda _message: None
