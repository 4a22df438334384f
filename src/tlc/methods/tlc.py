"""TLC, "Till the Layers Collapse" (METHODS.md section 1): which sites to collapse at one step.

Per candidate site: the Gaussian model of its pre-activation gives the channel split (mu <= 0 ->
removed, else linearized); the loss gap of collapsing it is measured on calibration data; with
``latency_aware`` the order weighs each gap against the MACs the collapse saves once merged. The
multi-site rule then takes as many of the best candidates as the joint gap allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from tlc._inputs import ExampleInputs
from tlc.criteria.gaussian import needs_measurement, site_models
from tlc.criteria.loss_gap import LossGaps
from tlc.criteria.stats import collect_site_stats
from tlc.graph import Graph, trace
from tlc.surgery.linearize import gate_nodes, linearize
from tlc.surgery.plan import Planner
from tlc.train import DistillConfig, FitConfig

PRESETS = ("default", "paper")
RULES = ("tolerance", "official")


@dataclass
class TLCConfig:
    """Settings of a TLC compression run. ``TLCConfig.paper()`` gives the published protocol."""

    preset: str = "default"
    max_acc_drop: float = 1.0  # points of top-1 (or task metric) below the original, on validation data
    max_steps: int | None = None
    target_macs_ratio: float | None = None  # stop once deploy MACs <= this fraction of the original
    target_speedup: float | None = None  # stop once measured batch-1 speed-up >= this
    gap_tolerance: float = 0.05  # joint loss gap (nats per sample) allowed for one step
    max_sites_per_step: int = 4
    multi_site_rule: str = "tolerance"
    latency_aware: bool = True
    calibration_size: int = 1024
    calibration_batch_size: int = 64
    policy: str = "macs"
    finetune: FitConfig = field(default_factory=lambda: FitConfig(epochs=1.0, lr=0.01, schedule="cosine"))
    final_finetune_epochs: float = 0.0
    distill: DistillConfig | None = None
    stop_accuracy: float | None = None  # stop when validation accuracy falls below this fraction
    min_activations: int = 0  # stop when this many activations are left
    continue_past_budget: bool = False  # keep going after the budget is spent (result: best within budget)
    retry_single: bool = True  # a rejected multi-site step is retried with its best site alone
    latency_repeats: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, not {self.preset!r}")
        if self.multi_site_rule not in RULES:
            raise ValueError(f"multi_site_rule must be one of {', '.join(RULES)}, not {self.multi_site_rule!r}")
        if self.max_acc_drop < 0:
            raise ValueError("max_acc_drop must be >= 0 (points of accuracy)")
        if self.max_sites_per_step < 1:
            raise ValueError("max_sites_per_step must be >= 1")

    @classmethod
    def paper(cls, **overrides: Any) -> TLCConfig:
        """The published protocol: sign split, one validation batch for the gaps, the official
        multi-layer rule, full retraining per step (SGD 0.1, milestones at 50%/75%), stop at one
        activation left or validation accuracy < 20%."""
        base = cls(
            preset="paper", multi_site_rule="official", latency_aware=False, calibration_size=128,
            calibration_batch_size=128, max_sites_per_step=10**6, retry_single=False,
            finetune=FitConfig(epochs=160.0, lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step",
                               milestones=(0.5, 0.75), gamma=0.1),
            stop_accuracy=0.20, min_activations=1, continue_past_budget=True,
        )
        return replace(base, **overrides)


@dataclass
class Selection:
    """What one TLC step collapses, and the evidence for it."""

    sites: list[str]
    masks: dict[str, torch.Tensor]
    gaps: dict[str, float]
    savings: dict[str, float]
    joint_gap: float
    order: list[str]


def site_masks(graph: Graph, calibration: Sequence[tuple[Any, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """TLC's channel split for every remaining site (BN lens, or measured statistics without BN)."""
    to_measure = needs_measurement(graph, graph.sites)
    measured = collect_site_stats(graph, to_measure, calibration) if to_measure else None
    return {name: m.mask for name, m in site_models(graph, graph.sites, measured).items()}


def collapse_savings(model: nn.Module, graph: Graph, masks: dict[str, torch.Tensor], example_inputs: ExampleInputs,
                     policy: str) -> dict[str, float]:
    """MACs each site's collapse saves once merged: the larger of its saving now and its share of the
    saving of collapsing every site (which credits sites that only pay together, like the two
    activations of an inverted residual)."""
    names = [s.name for s in graph.sites]
    everything = trace(linearize(model, names, example_inputs, masks, exact=False, policy=policy), example_inputs)
    gates = gate_nodes(everything)

    def cost(collapsed: set[str]) -> int:
        active = {gates[n] for n in collapsed}
        barriers = {node for n, node in gates.items() if n not in collapsed}
        planner = Planner(everything, policy, movable=active, barriers=barriers)
        return planner.total_cost(planner.plan()).macs

    now, full = cost(set()), cost(set(names))
    scale = max(now, 1)
    return {n: max(now - cost({n}), cost(set(names) - {n}) - full, 0) / scale for n in names}


def order_candidates(gaps: dict[str, float], savings: dict[str, float] | None, tolerance: float) -> list[str]:
    """Best first: by gap, or (latency-aware) by MACs saved per unit of loss gap."""
    if savings is None:
        return sorted(gaps, key=lambda n: (gaps[n], n))
    eps = max(tolerance * 0.1, 1e-6)
    return sorted(gaps, key=lambda n: (-savings.get(n, 0.0) / (max(gaps[n], 0.0) + eps), gaps[n], n))


def official_count(order: list[str], gaps: dict[str, float], joint: list[float]) -> int:
    """The published rule: when some gap is negative, grow k = 2, 3, ... and stop at the first k whose
    joint gap turns positive, keeping that k (its off-by-one); otherwise one site."""
    if gaps[order[0]] >= 0 or len(order) == 1:
        return 1
    for k in range(2, len(order) + 1):
        if joint[k - 1] > 0:
            return k
    return len(order)


def tolerance_count(joint: list[float], tolerance: float) -> int:
    """The largest k whose joint gap stays within the tolerance; at least one."""
    within = [k for k in range(1, len(joint) + 1) if joint[k - 1] <= tolerance]
    return max(within) if within else 1


def select(model: nn.Module, graph: Graph, calibration: Sequence[tuple[Any, torch.Tensor]],
           example_inputs: ExampleInputs, config: TLCConfig) -> Selection:
    """Rank the remaining sites of ``model`` (traced as ``graph``) and choose this step's collapse."""
    masks = site_masks(graph, calibration)
    ranking = LossGaps(graph, calibration)
    gaps = ranking.single_gaps(masks)
    savings = collapse_savings(model, graph, masks, example_inputs, config.policy) if config.latency_aware else None
    order = order_candidates(gaps, savings, config.gap_tolerance)
    depth = min(len(order), config.max_sites_per_step)
    joint = [gaps[order[0]]] + ranking.gaps([{n: masks[n] for n in order[:k]} for k in range(2, depth + 1)])
    if config.multi_site_rule == "official":
        k = official_count(order[:depth], gaps, joint)
    else:
        k = tolerance_count(joint, config.gap_tolerance)
    chosen = order[:k]
    return Selection(chosen, {n: masks[n] for n in chosen}, gaps, savings or {}, joint[k - 1], order)
