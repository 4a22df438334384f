"""LayerCollapse (Shabgahi, Shariff, Koushanfar; arXiv 2311.17943; docs/methods.md): the activation between
two fully connected layers (an MLP head, a transformer FFN, the VGG classifier) becomes a PReLU with one
slope ``alpha``, and fine-tuning adds ``lc * sum (alpha - 1)^2`` to the loss. A site whose slope comes
within ``threshold`` of 1 is linear enough to collapse: it becomes the identity and the merge turns the two
layers into one (kept factorized where the rank makes that cheaper: the merge planner decides). A site that
does not reach it keeps its trained slope, as a PReLU.

The step protocol (shared with :mod:`tlc.methods.layer_folding`, see :func:`learnable_step`): each step
snaps the sites whose parameter crossed the threshold during the previous step's fine-tuning (the first
step has nothing to snap: it trains) and marks one more round of training
(:class:`tlc.surgery.learnable.LearnRound`); the accuracy after the snap is what the loop measures after
the step. ``rounds`` fixes a schedule instead: that many regularized rounds, then one collapse, whose
fine-tuning is no longer regularized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from tlc.edits import Edit, Linearize
from tlc.graph import Graph, Site, trace
from tlc.methods.base import Method, NoCandidate, Proposal, register_method
from tlc.methods.tlc import collapse_savings
from tlc.ops import Kind
from tlc.run.config import RunContext
from tlc.surgery.learnable import MakeLearnable, PReLUActivation, learnable_modules, plan_round, regularizer
from tlc.surgery.plan import POLICY_UNITS

ORDERS = ("depth", "savings")
_PASS = (Kind.IDENTITY, Kind.BN, Kind.SCALE)  # what may sit between an FC layer and its activation (dropout, norm)


@dataclass
class LayerCollapseConfig:
    """LayerCollapse's own settings (the shared ones: :class:`tlc.run.config.RunConfig`)."""

    lc: float = 0.2  # strength of the regularizer lc * sum (alpha - 1)^2
    threshold: float = 0.05  # a site collapses once |alpha - 1| < threshold
    init: float = 0.01  # the PReLU slope the sites start with
    fraction: float = 0.5  # of the activations between two FC layers, the share made learnable
    order: str = "savings"  # which come first: "depth" (the deepest, as the paper) or "savings" (merged MACs saved)
    paying_only: bool = True  # only activations whose collapse saves MACs once merged
    rounds: int | None = None  # a fixed schedule: rounds of regularized fine-tuning, then one collapse
    patience: int = 3  # without a schedule: stop after this many rounds in a row with nothing to collapse
    param_lr: float | None = 0.01  # learning rate of the slopes (None: the fine-tuning's, as the paper)

    def __post_init__(self) -> None:
        check_learnable_settings(self.threshold, self.rounds, self.patience, lc=self.lc, param_lr=self.param_lr)
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], not {self.fraction}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {self.order!r}")


# The published protocol: the deepest half of the MLP activations, PReLU slopes from 0.01, lc = 0.2, the
# run's fine-tuning with the regularizer, then every site with |alpha - 1| < 0.05 collapsed (its fine-tuning
# no longer regularized); every step kept whatever its accuracy (the result: the best within the budget).
PAPER: dict[str, Any] = dict(order="depth", paying_only=False, rounds=1, retry_single=False,
                             continue_past_budget=True, param_lr=None)


def check_learnable_settings(threshold: float, rounds: int | None, patience: int, param_lr: float | None = None,
                             **strengths: float) -> None:
    """Refuse out-of-range settings shared by the learnable-activation methods."""
    if param_lr is not None and not param_lr > 0:
        raise ValueError(f"param_lr must be > 0 (or None: the fine-tuning's), not {param_lr}")
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, not {threshold}")
    if rounds is not None and rounds < 1:
        raise ValueError("rounds must be >= 1 (or None: no fixed schedule)")
    if patience < 1:
        raise ValueError("patience must be >= 1")
    for name, value in strengths.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, not {value}")


def between_fc_layers(graph: Graph, site: Site) -> bool:
    """Whether ``site`` sits between two fully connected layers (through dropout, norms and scales only):
    an MLP's activation, the unit LayerCollapse collapses."""
    node = graph.site_node(site)
    x = graph.info[node].input
    while x is not None and graph.info[x].kind in _PASS:
        x = graph.info[x].input
    users: list[fx.Node] = list(node.users)
    while len(users) == 1 and graph.info[users[0]].kind in _PASS:
        users = list(users[0].users)
    return (x is not None and graph.info[x].kind is Kind.LINEAR and len(users) == 1
            and graph.info[users[0]].kind is Kind.LINEAR)


def merge_savings(model: nn.Module, graph: Graph, names: Sequence[str], run: RunContext) -> dict[str, float]:
    """The fraction of the deploy MACs that collapsing each named site alone saves once merged (0: the
    merge planner would keep the two layers factorized)."""
    if not names:
        return {}
    sites = {s.name: s for s in graph.sites}
    masks = {n: torch.ones(sites[n].channels) for n in names}
    saved = collapse_savings(model, graph, masks, run.example_inputs, run.config.policy, pairs=False)
    return {n: float(saved[(n,)]) for n in names}


def learnable_lr(model: nn.Module, lr: float | None) -> dict[str, float]:
    """{name: ``lr``} for the parameters of the model's learnable activations (empty when ``lr`` is None)."""
    if lr is None:
        return {}
    owned = {id(p) for m in learnable_modules(model).values() for p in m.parameters()}
    return {name: lr for name, p in model.named_parameters() if id(p) in owned}


def none_paying(what: str, found: int, paying_only: bool, policy: str) -> str:
    """Why a learnable-activation method has nothing to learn: no ``what`` at all, or ``found`` of them but
    none whose collapse pays under the merge ``policy`` (``paying_only``)."""
    if not found or not paying_only:
        return f"no {what}: nothing to make learnable"
    return (f"none of the {found} {what}(s) pays: collapsing any one alone saves no {POLICY_UNITS[policy]} "
            f"once merged (merge policy {policy!r}; paying_only=false makes them learnable all the same)")


def learnable_step(model: nn.Module, exclude: Sequence[str], threshold: float, rounds: int | None, patience: int,
                   policy: str, verb: str, none_chosen: str | None = None) -> Proposal:
    """The step of a learnable-activation method (:func:`tlc.surgery.learnable.plan_round`): snap the sites
    that reached the threshold (``verb``: what the paper calls it) and mark the next round of training; the
    fallback of a step that snaps several sites snaps the one nearest to linear alone. ``none_chosen`` says
    why the method made no site learnable (the run's stop reason when it did not)."""
    if none_chosen and not learnable_modules(model):
        raise NoCandidate(none_chosen)
    plan = plan_round(model, exclude, threshold, rounds, patience)
    if isinstance(plan, str):
        raise NoCandidate(plan)
    values = {s: round(v, 6) for s, v in plan.values.items()}

    def proposal(snap: Sequence[str]) -> Proposal:
        edits: list[Edit] = [Linearize.of({s: None for s in snap}, policy)] if snap else []
        evidence = {"round": plan.learn.number, "threshold": threshold, "values": values, "snapped": list(snap),
                    "fold": plan.fold, "regularized": plan.learn.regularized}
        if snap:
            label = f"{verb} {', '.join(f'{s} ({values[s]:.4f})' for s in snap)}"
        else:
            closest = min(values, key=lambda s: abs(values[s] - 1.0))
            label = f"{verb}: nothing reached {threshold:g} (closest: {closest} at {values[closest]:.4f})"
        if not plan.fold and len(values) > len(snap):
            label += f"; round {plan.learn.number}: train {len(values) - len(snap)} learnable activation(s)"
        return Proposal([*edits, plan.learn], evidence, label=label)

    main = proposal(plan.snap)
    if len(plan.snap) > 1 and not plan.fold:
        main.fallback = proposal(plan.snap[:1])
    return main


class LearnableActivationMethod(Method):
    """What LayerCollapse and Layer Folding share: the steps of :func:`learnable_step` (``verb``: what the
    paper calls a snap), ``none_chosen`` (why :meth:`prepare` made nothing learnable) and the learnable
    parameters' own learning rate (``config.param_lr``)."""

    verb = ""
    none_chosen: str | None = None

    def propose(self, model: nn.Module, graph: Graph, run: RunContext, exclude: Sequence[str]) -> Proposal:
        config = self.config
        return learnable_step(model, exclude, config.threshold, config.rounds, config.patience, run.config.policy,
                              self.verb, self.none_chosen)

    def param_lr(self, model: nn.Module) -> dict[str, float]:
        """The learnable parameters at ``param_lr``: at a transformer's fine-tuning rate (2e-5) they would
        hardly move in an epoch."""
        return learnable_lr(model, self.config.param_lr)

    def made_learnable(self, run: RunContext, chosen: Sequence[str], candidates: int, what: str, made: str,
                       form: str) -> list[Edit]:
        """The prepare edit making ``chosen`` learnable activations of ``form`` (logged as ``made``); with none
        chosen out of ``candidates`` ``what``s, why (kept as the run's stop reason) and no edit."""
        self.none_chosen = None if chosen else none_paying(what, candidates, self.config.paying_only,
                                                           run.config.policy)
        run.log(f"{self.name}: {self.none_chosen or made}")
        return [MakeLearnable(tuple(chosen), form, self.config.init)] if chosen else []


@register_method
class LayerCollapse(LearnableActivationMethod):
    """LayerCollapse on the method protocol: PReLU slopes trained towards 1, collapsed once near it."""

    name = "layer_collapse"
    verb = "collapse"
    Config = LayerCollapseConfig
    presets = {"default": {}, "paper": PAPER}

    def prepare(self, model: nn.Module, run: RunContext) -> list[Edit]:
        """The chosen MLP activations become PReLUs with slope ``init`` (none: nothing to do, the run stops)."""
        config = self.config
        graph = trace(model, run.example_inputs)
        order = {s.name: i for i, s in enumerate(graph.sites)}
        names = between = [s.name for s in graph.sites if between_fc_layers(graph, s)]
        savings = merge_savings(model, graph, names, run) if config.paying_only or config.order == "savings" else {}
        if config.paying_only:
            names = [n for n in names if savings[n] > 0]
        if config.order == "depth":
            ranked = sorted(names, key=lambda n: -order[n])
        else:
            ranked = sorted(names, key=lambda n: (-savings[n], -order[n]))
        chosen = sorted(ranked[:math.ceil(config.fraction * len(ranked))], key=order.__getitem__)
        return self.made_learnable(run, chosen, len(between), "activation between two fully connected layers",
                                   f"{', '.join(chosen)} made PReLUs (slope {config.init:g})", "prelu")

    def loss(self, model: nn.Module, inputs: Any, labels: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor | None:
        """``lc * sum (alpha - 1)^2`` over the model's PReLU sites still regularized."""
        return regularizer(model, self.config.lc, PReLUActivation)


__all__ = ["PAPER", "LayerCollapse", "LayerCollapseConfig", "LearnableActivationMethod", "between_fc_layers",
           "check_learnable_settings", "learnable_lr", "learnable_step", "merge_savings", "none_paying"]
