"""The record of one compression step (report.json's ``steps``, one row of steps.csv)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepRecord:
    """One compression step: what was changed, what it cost, what it gave. ``evidence`` is the method's
    own account of its choice (TLC: loss gaps and savings; EASIER: entropies; NEPENTHE: sparsity)."""

    step: int
    sites: list[str]
    removed_channels: int
    linearized_channels: int
    joint_gap: float | None
    val_accuracy: float
    val_loss: float
    within_budget: bool
    accepted: bool
    activations: int
    params: int
    macs: int
    depth: int
    speedup: float
    finetune_epochs: float
    seconds: float
    note: str = ""
    whole_branches: list[str] = field(default_factory=list)  # sites collapsed all off: their branch became a bias
    evidence: dict[str, Any] = field(default_factory=dict)
    speedup_q1: float | None = None  # quartiles of the per-round latency ratios behind `speedup`
    speedup_q3: float | None = None


NON_FINITE = "non-finite loss"
