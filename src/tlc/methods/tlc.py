"""TLC, "Till the Layers Collapse" (docs/methods.md, TLC): which sites to collapse at one step.

Per candidate site: the Gaussian model of its pre-activation gives the channel split (mu <= 0 ->
removed, else linearized); the loss gap of collapsing it is measured on calibration data; with
``latency_aware`` the order weighs each gap against the MACs the collapse saves once merged. With
``branch_removal``, a site whose residual branch the merge can turn into a bias is also a candidate
with every channel off (the whole branch removed), ranked by its own gap and saving. The multi-site
rule then takes as many of the best candidates as the joint gap allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from tlc._inputs import ExampleInputs
from tlc.criteria.gaussian import needs_measurement, site_models
from tlc.criteria.loss_gap import LossGaps
from tlc.criteria.stats import collect_site_stats
from tlc.edits import Linearize
from tlc.graph import Graph, trace
from tlc.methods.base import PAPER_RETRAINING, Method, NoCandidate, Proposal, register_method
from tlc.run.config import RunContext
from tlc.surgery.linearize import gate_nodes, linearize
from tlc.surgery.plan import Planner, dead_sites
from tlc.surgery.pricing import activation_shape, measure_first, resolve
from tlc.train import distributed

RULES = ("tolerance", "official")


@dataclass
class TLCConfig:
    """TLC's own settings (the shared ones: :class:`tlc.run.config.RunConfig`)."""

    gap_tolerance: float = 0.05  # joint loss gap (nats per sample) allowed for one step
    max_sites_per_step: int = 4
    multi_site_rule: str = "tolerance"
    latency_aware: bool = True
    branch_removal: bool = True  # latency-aware tolerance rule: a residual branch removed whole is a candidate

    def __post_init__(self) -> None:
        if self.multi_site_rule not in RULES:
            raise ValueError(f"multi_site_rule must be one of {', '.join(RULES)}, not {self.multi_site_rule!r}")
        if self.max_sites_per_step < 1:
            raise ValueError("max_sites_per_step must be >= 1")


# The published protocol: sign split, one validation batch for the gaps, the official multi-layer rule,
# full retraining per step (SGD 0.1, milestones at 50%/75%), stop at one activation left or validation
# accuracy < 20%.
PAPER = dict(
    multi_site_rule="official", latency_aware=False, branch_removal=False, max_sites_per_step=10**6,
    calibration_size=128, calibration_batch_size=128, retry_single=False,
    finetune=PAPER_RETRAINING,
    stop_accuracy=0.20, min_activations=1, continue_past_budget=True,
)


@dataclass(frozen=True)
class Unit:
    """Sites collapsed together as one candidate, with the MACs fraction it saves and its loss gap.
    ``whole_branch``: every channel off, so that the merge turns the residual branch behind the site into
    a bias on the shortcut (instead of TLC's channel split)."""

    sites: tuple[str, ...]
    saving: float
    gap: float
    whole_branch: bool = False

    def masks(self, split: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The channel masks this unit collapses its sites with, given TLC's split."""
        return {n: torch.zeros_like(split[n]) if self.whole_branch else split[n] for n in self.sites}


@dataclass
class Selection:
    """What one TLC step collapses, and the evidence for it."""

    sites: list[str]
    masks: dict[str, torch.Tensor]
    gaps: dict[str, float]
    savings: dict[str, float]
    joint_gap: float
    order: list[str]
    units: list[Unit] = field(default_factory=list)

    def first_unit(self) -> Selection:
        """The same selection cut down to its best unit (one site, or a pair that only pays together)."""
        unit = self.units[0]
        return Selection(list(unit.sites), {n: self.masks[n] for n in unit.sites}, self.gaps, self.savings,
                         unit.gap, self.order, [unit])

    @property
    def whole_branches(self) -> list[str]:
        """The chosen sites whose residual branch goes whole (every channel off)."""
        return [n for u in self.units if u.whole_branch for n in u.sites]


def disconnects(graph: Graph, name: str) -> bool:
    """Whether every path from the inputs to the output runs through site ``name``: with every channel
    off, its collapse makes the network's output a constant, which no fine-tuning can undo."""
    blocked = graph.site_node(graph.site(name))
    seen: set[fx.Node] = set()
    todo = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    while todo:
        node = todo.pop()
        if node in seen or node is blocked:
            continue
        seen.add(node)
        todo.extend(node.users)
    return not any(n.op == "output" for n in seen)


def site_masks(graph: Graph, calibration: Sequence[tuple[Any, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """TLC's channel split for every remaining site (BN lens, or measured statistics without BN)."""
    to_measure = needs_measurement(graph, graph.sites)
    measured = collect_site_stats(graph, to_measure, calibration) if to_measure else None
    return {name: m.mask for name, m in site_models(graph, graph.sites, measured).items()}


def collapse_savings(model: nn.Module, graph: Graph, masks: dict[str, torch.Tensor], example_inputs: ExampleInputs,
                     policy: str, pairs: bool = True) -> dict[tuple[str, ...], float]:
    """Fraction of the current (planned) deploy cost that collapsing each site saves once merged, and
    each pair of adjacent sites whose joint collapse saves more than the two alone (the two
    activations of an inverted residual only pay together; ``pairs=False`` skips them). Only the sites
    in ``masks`` are candidates; the others (set aside) stay activations. The cost is the policy's
    (:meth:`tlc.surgery.plan.Cost.amount`): MACs, or under "latency" the latency table's time of the
    layers and of the activations left, so that a collapse is weighed by what it saves on the clock."""
    names = [s.name for s in graph.sites if s.name in masks]
    everything = trace(linearize(model, names, example_inputs, masks, exact=False, policy=policy), example_inputs)
    gates = gate_nodes(everything)
    sites = {s.name: s for s in graph.sites}
    candidates = [(n,) for n in names] + [p for p in (adjacent_sites(graph) if pairs else [])
                                          if p[0] in masks and p[1] in masks]

    def costs(table: Any) -> dict[tuple[str, ...], float]:
        activation = {n: table.seconds(activation_shape(sites[n].activation, sites[n].shape)) if table else 0.0
                      for n in names}

        def cost(collapsed: set[str]) -> float:
            active = {gates[n] for n in collapsed}
            barriers = {node for n, node in gates.items() if n not in collapsed}
            planner = Planner(everything, policy, movable=active, barriers=barriers, table=table)
            left = sum(activation[n] for n in names if n not in collapsed)
            return planner.total_cost(planner.plan()).amount(policy) + left

        units = [(), *candidates]  # planned independently: split over the ranks of a distributed run
        return dict(zip(units, distributed.gather_map(lambda mine: [cost(set(u)) for u in mine], units)))

    table = resolve(policy, None)
    measure_first(costs, table)
    after = costs(table)
    now = after[()]
    scale = max(now, 1) if policy != "latency" else max(now, 1e-12)
    savings: dict[tuple[str, ...], float] = {(n,): max(now - after[(n,)], 0) / scale for n in names}
    for a, b in candidates[len(names):]:
        pair = max(now - after[(a, b)], 0) / scale
        if pair > savings[(a,)] + savings[(b,)] + 1e-12:
            savings[(a, b)] = pair
    return savings


def adjacent_sites(graph: Graph) -> list[tuple[str, str]]:
    """Pairs of sites separated by one linear segment (the output of one feeds it, the other reads it)."""
    segment_of = {name: seg.index for seg in graph.segments for name in seg.nodes}
    before: dict[str, int | None] = {}
    after: dict[str, set[int]] = {}
    for site in graph.sites:
        node = graph.site_node(site)
        before[site.name] = segment_of.get(graph.info[node].input.name)
        after[site.name] = {segment_of[u.name] for u in node.users if u.name in segment_of}
    pairs = []
    for a in graph.sites:
        for b in graph.sites:
            if a.name < b.name and (before[b.name] in after[a.name] or before[a.name] in after[b.name]):
                pairs.append((a.name, b.name))
    return pairs


def order_units(units: list[Unit], latency_aware: bool, tolerance: float) -> list[Unit]:
    """Best first: by gap, or (latency-aware) by MACs saved per unit of loss gap."""
    if not latency_aware:
        return sorted(units, key=lambda u: (u.gap, u.sites))
    eps = max(tolerance * 0.1, 1e-6)
    return sorted(units, key=lambda u: (-u.saving / (max(u.gap, 0.0) + eps), u.gap, u.sites))


def _prefixes(order: list[Unit], max_sites: int) -> list[list[Unit]]:
    """Growing unit sets taken from the ordered units (units sharing a site with one taken are skipped)."""
    chosen: list[Unit] = []
    prefixes = []
    for unit in order:
        if any(s in c.sites for c in chosen for s in unit.sites):
            continue
        if prefixes and sum(len(c.sites) for c in chosen) + len(unit.sites) > max_sites:
            break
        chosen = chosen + [unit]
        prefixes.append(chosen)
    return prefixes


def _masks(units: Sequence[Unit], split: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The channel masks of every site the units collapse."""
    return {n: m for u in units for n, m in u.masks(split).items()}


def whole_branch_units(model: nn.Module, graph: Graph, masks: dict[str, torch.Tensor],
                       savings: dict[tuple[str, ...], float], example_inputs: ExampleInputs, policy: str,
                       ranking: LossGaps) -> list[Unit]:
    """Candidates with every channel of one site off, for the sites where that saves more than TLC's split
    (the merge turns a residual branch whose site is all off into a bias, and drops the layers in front of an
    all-off site: the tensor after it is a constant, through activations too)."""
    zeros = {n: torch.zeros_like(m) for n, m in masks.items() if m.any() and not disconnects(graph, n)}
    if not zeros:
        return []
    whole = collapse_savings(model, graph, zeros, example_inputs, policy, pairs=False)
    names = [n for n in zeros if whole[(n,)] > savings[(n,)] + 1e-12]
    gaps = ranking.gaps([{n: zeros[n]} for n in names])
    return [Unit((n,), whole[(n,)], g, whole_branch=True) for n, g in zip(names, gaps)]


def official_count(order: list[str], gaps: dict[str, float], joint_gap: Callable[[list[str]], float]) -> int:
    """The published rule: when the best gap is negative, grow k = 2, 3, ... and stop at the first k
    whose joint gap turns positive, keeping that k (its off-by-one); otherwise one site."""
    if gaps[order[0]] >= 0 or len(order) == 1:
        return 1
    for k in range(2, len(order) + 1):
        if joint_gap(order[:k]) > 0:
            return k
    return len(order)


def tolerance_count(joint: list[float], tolerance: float) -> int:
    """The largest k whose joint gap stays within the tolerance; at least one."""
    within = [k for k in range(1, len(joint) + 1) if joint[k - 1] <= tolerance]
    return max(within) if within else 1


def select(model: nn.Module, graph: Graph, calibration: Sequence[tuple[Any, torch.Tensor]],
           example_inputs: ExampleInputs, config: TLCConfig, progress: bool = False,
           exclude: Sequence[str] = (), policy: str = "macs") -> Selection:
    """Rank the remaining sites of ``model`` (traced as ``graph``), except those in ``exclude`` (set aside
    after a rejected step) and those with every channel off that :func:`disconnects` the output, and
    choose this step's collapse; :class:`NoCandidate` when none is left."""
    masks = {n: m for n, m in site_masks(graph, calibration).items()
             if n not in exclude and (bool(m.any()) or not disconnects(graph, n))}
    if not masks:
        raise NoCandidate("no candidate left: every remaining activation was set aside or has every channel "
                          "off where all of the signal passes")
    ranking = LossGaps(graph, calibration, progress=progress)
    gaps = ranking.single_gaps(masks)

    def joint_gaps(site_sets: list[list[str]]) -> list[float]:
        return ranking.gaps([{n: masks[n] for n in sites} for sites in site_sets])

    savings: dict[tuple[str, ...], float] = {}
    units = [Unit((n,), 0.0, g) for n, g in gaps.items()]
    if config.latency_aware:
        savings = collapse_savings(model, graph, masks, example_inputs, policy)
        pairs = [u for u in savings if len(u) > 1]
        units = [Unit((n,), savings[(n,)], g) for n, g in gaps.items()]
        units += [Unit(p, savings[p], g) for p, g in zip(pairs, joint_gaps([list(p) for p in pairs]))]
        if config.branch_removal and config.multi_site_rule == "tolerance":
            units += whole_branch_units(model, graph, masks, savings, example_inputs, policy, ranking)
    order = order_units(units, config.latency_aware, config.gap_tolerance)
    if config.multi_site_rule == "official":
        names = [u.sites[0] for u in order]
        k = official_count(names, gaps, lambda sites: joint_gaps([sites])[0])
        units_chosen = [Unit((n,), savings.get((n,), 0.0), gaps[n]) for n in names[:k]]
        joint = gaps[names[0]] if k == 1 else joint_gaps([names[:k]])[0]
    else:
        prefixes = _prefixes(order, config.max_sites_per_step)
        joint_list = [order[0].gap] + ranking.gaps([_masks(p, masks) for p in prefixes[1:]])
        k = tolerance_count(joint_list, config.gap_tolerance)
        units_chosen, joint = prefixes[k - 1], joint_list[k - 1]
    chosen = _masks(units_chosen, masks)
    return Selection(list(chosen), chosen, gaps, {"+".join(u): v for u, v in savings.items()},
                     joint, [n for u in order for n in u.sites if len(u.sites) == 1 and not u.whole_branch],
                     units_chosen)


@register_method
class TLC(Method):
    """TLC on the method protocol: each step linearizes the chosen sites with TLC's channel masks."""

    name = "tlc"
    Config = TLCConfig
    presets = {"default": {}, "paper": PAPER}

    def propose(self, model: nn.Module, graph: Graph, run: RunContext, exclude: Sequence[str]) -> Proposal:
        """The best sites by loss gap (and saving); a site the deploy form no longer computes is no candidate."""
        exclude = [*exclude, *sorted(dead_sites(graph))]
        selection = select(model, graph, run.calibration, run.example_inputs, self.config, progress=run.progress,
                           exclude=exclude, policy=run.config.policy)
        proposal = _proposal(selection, run.config.policy)
        single = selection.first_unit()
        if len(single.sites) < len(selection.sites):
            proposal.fallback = _proposal(single, run.config.policy)
        return proposal


def _proposal(selection: Selection, policy: str) -> Proposal:
    whole = selection.whole_branches
    label = f"{', '.join(selection.sites)} (joint loss gap {selection.joint_gap:+.4f}" + (
        f"; whole residual branch off: {', '.join(whole)})" if whole else ")")
    evidence = {
        "joint_gap": float(selection.joint_gap),
        "whole_branches": whole,
        "gaps": {n: float(selection.gaps[n]) for n in selection.sites if n in selection.gaps},
        "savings": {k: float(v) for k, v in selection.savings.items()
                    if any(s in selection.sites for s in k.split("+"))},
    }
    return Proposal([Linearize.of(selection.masks, policy)], evidence, label=label)
