"""NEPENTHE, entropy-guided unstructured pruning as a depth reducer (arXiv 2404.16890; docs/methods.md).

Each step is one pruning round. The state entropy of every remaining site is measured on the run's
calibration data (:func:`tlc.criteria.entropy.site_entropies`: channel i is ON with frequency p_i, its
entropy h(p_i) in bits; the layer entropy H_l averages the channels with 0 < p_i < 1). A site whose
layer entropy is 0 (every channel always ON or always OFF) acts as a linear map on that data: it is
linearized in this step (always-OFF channels removed, always-ON ones the identity), except where every
channel is OFF and the whole signal passes that site. The layers before the other sites are scored
``s_l = H_l * mean |W_l|`` (non-zero weights) and share ``rho`` of the active weights (below) after
:func:`tlc.criteria.pruning.allocate` (low score, more pruning); within a layer the smallest magnitudes
go (:func:`tlc.criteria.pruning.magnitude_masks`). Pruning lowers the entropy of the layers it hits, so
that later rounds find more sites to linearize.

Choices of this implementation:

- the prunable weights are fixed once, from the model as given: the convolution or linear layer right
  before each site (:func:`tlc.criteria.pruning.prunable_layers`; shortcut projections and the classifier
  are not). A weight is *active* while it is unpruned and its site is still an activation whose entropy
  is not 0.
- the schedule is on the active weights: after round k at most ``(1 - rho)^k`` of the prunable weights
  are active, i.e. each round prunes ``rho`` of what is active. Without linearization that is the
  paper's schedule (sparsity ``1 - (1 - rho)^k``); the layer of a site whose entropy falls to 0 (and
  which is linearized, where it can be) leaves the active weights at once, which counts as progress. So
  the rounds done are read back from the weights, the sites left and their entropies (a resumed run needs
  nothing else; a model that comes with zeros starts further along).
- a layer whose site is linearized is pruned no further (its zeros stay): the merge multiplies it into
  the next layer, where its zeros would not survive, so pruning it would cost accuracy for nothing.
- a zero score (an entropy-0 layer) takes no part in the allocation (``S / s_l`` has no value there): that
  layer is linearized instead of pruned.
- pruned weights stay exactly zero while fine-tuning: the ``loss`` hook (which adds nothing to the loss)
  reads the masks off the weights' zeros before each optimizer step and ``after_step`` multiplies the
  weights by them again after it.

Unstructured sparsity is not a speed-up by itself (dense kernels multiply the zeros too). What the
deploy form gains in depth, MACs and latency comes from the linearized sites, which the loop merges at
the end and the report measures.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tlc.criteria.entropy import site_entropies
from tlc.criteria.pruning import allocate, magnitude_masks, prunable_layers
from tlc.edits import Edit, Linearize, WeightMask, weight_masks
from tlc.errors import TLCError
from tlc.graph import Graph, trace
from tlc.methods.base import PAPER_RETRAINING, Method, NoCandidate, Proposal, register_method
from tlc.methods.tlc import disconnects
from tlc.run.config import RunContext


@dataclass
class NEPENTHEConfig:
    """NEPENTHE's own settings (the shared ones: :class:`tlc.run.config.RunConfig`)."""

    rho: float = 0.5  # fraction of the active prunable weights pruned per round
    rounds: int = 9  # pruning rounds at most (one per step)
    linearize_at_zero_entropy: bool = True  # linearize the sites whose layer entropy is 0 as they appear
    entropy_epsilon: float = 0.0  # a layer entropy (bits) at or below this counts as 0 (channels ON where p > 1/2)

    def __post_init__(self) -> None:
        if not 0 < self.rho < 1:
            raise ValueError(f"rho must be in (0, 1), not {self.rho}")
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if self.entropy_epsilon < 0:
            raise ValueError("entropy_epsilon must be >= 0")


# The published schedule: 9 rounds of rho = 0.5, each followed by the group's full retraining (SGD 0.1,
# milestones at 50%/75%), every round kept whatever its accuracy (the result: the best within the budget).
PAPER = dict(
    rounds=9, rho=0.5, retry_single=False, continue_past_budget=True,
    finetune=PAPER_RETRAINING,
)

# tlc's protocol: short fine-tuning (RunConfig's default). A rejected round that linearized sites is
# retried as the pruning alone (its fallback); a rejected pruning would only be proposed again, identical,
# from the same model, so one rejected step ends the run.
DEFAULT: dict[str, Any] = dict(rejection_patience=1)


def round_target(total: int, rho: float, k: int) -> int:
    """Active weights (of ``total`` prunable ones) allowed after round ``k``: ``total * (1 - rho)^k``
    rounded, and at least one fewer per round (while any is left)."""
    return max(min(round(total * (1.0 - rho) ** k), total - k), 0)


def rounds_done(active: int, total: int, rho: float, rounds: int) -> int:
    """How many rounds of the schedule a model with ``active`` of its ``total`` prunable weights still active
    has done (a round ends on its target, so the weights and the sites left tell)."""
    return sum(1 for k in range(1, rounds + 1) if active <= round_target(total, rho, k))


def _mean_magnitude(w: torch.Tensor) -> float:
    """Mean |w| over the non-zero weights (0 when every weight is pruned)."""
    kept = w.detach()[w.detach() != 0]
    return float(kept.abs().mean()) if kept.numel() else 0.0


def _zero_entropy_masks(graph: Graph, entropies: Mapping[str, tuple[float, torch.Tensor]], zero: Sequence[str],
                        exclude: Sequence[str]) -> dict[str, torch.Tensor]:
    """The channel masks of the zero-entropy sites to linearize: 1 where the channel is always ON, 0 where
    always OFF; not the sites in ``exclude``, nor those all OFF where the whole signal passes."""
    masks = {}
    for name in zero:
        mask = (entropies[name][1] > 0.5).float()
        if name not in exclude and (bool(mask.any()) or not disconnects(graph, name)):
            masks[name] = mask
    return masks


@dataclass
class _Weights:
    """The prunable weights of one model and where the schedule stands: kept (non-zero) weights per
    parameter, and the sites still activations with a non-zero entropy."""

    params: dict[str, nn.Parameter]
    reference: dict[str, str]  # site -> parameter
    kept: dict[str, int]
    sites: set[str]
    rho: float
    rounds: int

    @classmethod
    def of(cls, model: nn.Module, graph: Graph, reference: Mapping[str, str], zero: Collection[str],
           config: NEPENTHEConfig) -> _Weights:
        """The weights of ``model`` (traced as ``graph``) whose sites are in ``reference``; ``zero``: the
        sites of zero entropy."""
        params = dict(model.named_parameters())
        reference = {s: p for s, p in reference.items() if p in params}
        return cls(params, reference, {p: int(params[p].count_nonzero()) for p in reference.values()},
                   {s.name for s in graph.sites} - set(zero), config.rho, config.rounds)

    @property
    def total(self) -> int:
        return sum(self.params[p].numel() for p in self.reference.values())

    @property
    def active(self) -> dict[str, str]:
        """Site -> parameter of the layers whose site is an activation of non-zero entropy."""
        return {s: p for s, p in self.reference.items() if s in self.sites}

    def rounds_done(self, counts: Mapping[str, int] | None = None) -> int:
        """Rounds done (once ``counts`` more weights are pruned)."""
        left = sum(self.kept[p] - (counts or {}).get(p, 0) for p in self.active.values())
        return rounds_done(left, self.total, self.rho, self.rounds)

    def excess(self) -> int:
        """Active weights beyond the next round's target: what the round prunes."""
        left = sum(self.kept[p] for p in self.active.values())
        return max(left - round_target(self.total, self.rho, self.rounds_done() + 1), 0)


@dataclass
class _Round:
    """What one round decides: per-site entropy, the layers' scores, counts and new masks, the sites to
    linearize."""

    entropies: dict[str, float]
    scores: dict[str, float]
    counts: dict[str, int]
    masks: dict[str, torch.Tensor]
    linearize: dict[str, torch.Tensor]

    def evidence(self, weights: _Weights) -> dict[str, Any]:
        """The round as recorded: its number, the rounds done after it and, over the prunable weights, the
        fraction pruned (in all and per layer) and still active after it; entropies, scores, allocation,
        linearized sites."""
        total = weights.total
        after = {p: weights.kept[p] - self.counts.get(p, 0) for p in weights.reference.values()}
        active = sum(after[p] for p in weights.active.values())
        return {
            "round": weights.rounds_done() + 1,
            "rounds_done": weights.rounds_done(self.counts),
            "sparsity": 1 - sum(after.values()) / total,
            "active": active / total,
            "target_active": round_target(total, weights.rho, weights.rounds_done() + 1) / total,
            "pruned": sum(self.counts.values()),
            "layer_sparsity": {p: 1 - k / weights.params[p].numel() for p, k in after.items()},
            "entropy": self.entropies,
            "scores": self.scores,
            "allocation": {p: c for p, c in self.counts.items() if c},
            "linearized": list(self.linearize),
        }


@register_method
class NEPENTHE(Method):
    """NEPENTHE on the method protocol: each step prunes one round and linearizes the zero-entropy sites."""

    name = "nepenthe"
    Config = NEPENTHEConfig
    presets = {"default": DEFAULT, "paper": PAPER}

    def __init__(self, config: NEPENTHEConfig | None = None):
        super().__init__(config)
        self.reference: dict[str, str] | None = None  # site -> its prunable parameter, of the model as given
        self._masks: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ protocol
    def prepare(self, model: nn.Module, run: RunContext) -> list[Edit]:
        """Fix the prunable weights: the layers before the sites of the model as given (no edit)."""
        self.track(model, trace(model, run.example_inputs))
        return []

    def track(self, model: nn.Module, graph: Graph) -> None:
        """Take ``model`` (traced as ``graph``) as the one whose prunable layers the schedule counts."""
        params = dict(model.named_parameters())
        self.reference = {s: p for s, p in prunable_layers(graph).items() if p in params}

    def propose(self, model: nn.Module, graph: Graph, run: RunContext, exclude: Sequence[str]) -> Proposal:
        if self.reference is None:
            self.track(model, graph)
        if not any(p in dict(model.named_parameters()) for p in (self.reference or {}).values()):
            raise NoCandidate("nothing to prune: no convolution or linear layer feeds an activation site")
        measured = site_entropies(graph, run.calibration, nondegenerate_only=True)
        zero = [n for n, (h, _) in measured.items() if h <= self.config.entropy_epsilon]
        weights = _Weights.of(model, graph, self.reference or {}, zero, self.config)
        if weights.rounds_done() >= self.config.rounds:
            raise NoCandidate(f"{self.config.rounds} pruning rounds done "
                              f"({1 - sum(weights.kept.values()) / weights.total:.1%} of the prunable weights pruned)")
        plan = self._plan(weights, graph, measured, zero, exclude)
        proposal = _proposal(plan, weights, self.config, run.config.policy)
        if plan.linearize and plan.masks:  # over budget: the same pruning without the linearization
            proposal.fallback = _proposal(dataclasses.replace(plan, linearize={}), weights, self.config,
                                          run.config.policy)
        return proposal

    def loss(self, model: nn.Module, inputs: Any, labels: torch.Tensor, outputs: torch.Tensor) -> None:
        """No loss term: reads the pruning masks off the weights' zeros before the optimizer step moves them."""
        if self.reference is None:
            raise TLCError("NEPENTHE's fine-tuning hooks need the prunable layers: call prepare() or propose() first")
        self._masks[model] = weight_masks(model, list(self.reference.values()))
        return None

    def after_step(self, model: nn.Module) -> None:
        """Pruned weights back to exactly zero after each optimizer step (masks read by :meth:`loss`)."""
        masks = self._masks.get(model)
        if masks is None:
            raise TLCError("NEPENTHE.after_step needs its loss hook to run first in the same step (pass both: "
                           "FitHooks(loss=method.loss, after_step=method.after_step))")
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            params[name].mul_(mask)

    # ------------------------------------------------------------------ one round
    def _plan(self, weights: _Weights, graph: Graph, measured: Mapping[str, tuple[float, torch.Tensor]],
              zero: Sequence[str], exclude: Sequence[str]) -> _Round:
        """The next round, from the sites' (entropy, ON fractions) ``measured``: the ``zero``-entropy sites
        to linearize (not those in ``exclude``), the scores of the active layers, the allocation of the
        excess over the round's target and the masks."""
        config = self.config
        linearize = _zero_entropy_masks(graph, measured, zero, exclude) if config.linearize_at_zero_entropy else {}
        scores = {p: measured[s][0] * _mean_magnitude(weights.params[p]) for s, p in weights.active.items()}
        able = sum(weights.kept[p] for p, score in scores.items() if score > 0 and math.isfinite(score))
        counts = allocate(scores, {p: weights.kept[p] for p in scores}, min(weights.excess(), able))
        if not any(counts.values()) and not linearize:
            raise NoCandidate("nothing left to prune or linearize: every active layer has a zero score or no "
                              "weight left")
        pruned = [p for p, c in counts.items() if c]
        masks = magnitude_masks({p: weights.params[p] for p in pruned}, counts,
                                {p: (weights.params[p].detach() != 0).to(weights.params[p].dtype) for p in pruned})
        return _Round({n: h for n, (h, _) in measured.items()}, scores, counts, masks, linearize)


def _proposal(plan: _Round, weights: _Weights, config: NEPENTHEConfig, policy: str) -> Proposal:
    """The round's edits (the linearization, then the cumulative weight masks), evidence and log line."""
    edits: list[Edit] = []
    if plan.linearize:
        edits.append(Linearize.of(plan.linearize, policy))
    if plan.masks:
        edits.append(WeightMask.of(plan.masks))
    evidence = plan.evidence(weights)
    label = (f"round {evidence['round']}/{config.rounds}: prune {evidence['pruned']} weights "
             f"(sparsity {evidence['sparsity']:.1%}, active {evidence['active']:.1%})")
    if plan.linearize:
        label += f"; linearize {', '.join(plan.linearize)} (zero entropy)"
    return Proposal(edits, evidence, label=label)


__all__ = ["NEPENTHE", "NEPENTHEConfig", "PAPER", "round_target", "rounds_done"]
