"""Decide which linear operations become one layer: the cost model and the merge plan.

Linear operations (conv, linear, batch norm, gates, identities, residual adds) form regions between
the non-linear ones. Inside a region, every tensor that must exist (it feeds a non-linear op, the
output, or an op with several inputs from different regions) is produced from a *single entry*
tensor. Between that entry and the tensor, the nodes every path goes through (the dominators) form a
spine; a dynamic programme over the spine chooses where to cut, each piece between two cuts becoming
one layer (merged) or staying as it is (residual blocks then recurse into their branches).

Policies: ``"macs"`` (default) minimises multiply-accumulates, so a merge never adds MACs;
``"latency"`` minimises the sum of the layers' measured latencies (a latency table, see
:mod:`tlc.surgery.pricing`), so a merge is made where it pays on the clock even when it adds MACs;
``"always"`` minimises the number of layers (depth), subject to a size cap; ``"never"`` only folds
batch norms and gates into their conv/linear and removes gated channels.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx

from tlc.graph import Graph
from tlc.ops import LINEAR_KINDS, Kind
from tlc.surgery import affine, pricing
from tlc.surgery.affine import Infeasible, Map
from tlc.surgery.constants import Constant, dead_nodes, find_constants, shape_steps

POLICIES = ("macs", "latency", "always", "never")
POLICY_UNITS = {"macs": "MACs", "latency": "time", "always": "MACs", "never": "MACs"}  # what savings count
MAX_MERGED_WEIGHT_NUMEL = 1 << 25


@dataclass(frozen=True)
class Cost:
    macs: int = 0
    weight_ops: int = 0
    elementwise: int = 0
    changes: int = 0
    seconds: float = 0.0  # the latency table's price (latency policy only)

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.weight_ops + other.weight_ops,
                    self.elementwise + other.elementwise, self.changes + other.changes, self.seconds + other.seconds)

    def key(self, policy: str) -> tuple[float, ...]:
        if policy == "always":
            return (self.weight_ops, self.macs, self.elementwise, self.changes)
        if policy == "latency":  # ties (equal prices) broken as "macs" does
            return (round(self.seconds, 12), self.macs, self.weight_ops, self.elementwise, self.changes)
        return (self.macs, self.weight_ops, self.elementwise, self.changes)

    def amount(self, policy: str) -> float:
        """What the policy counts savings in: seconds under "latency", MACs otherwise."""
        return self.seconds if policy == "latency" else float(self.macs)


@dataclass(frozen=True)
class MergeGroup:
    """Operations ``members`` (topological order, ending at ``exit``) computed from ``entry`` as one op."""

    entry: fx.Node
    exit: fx.Node
    members: tuple[fx.Node, ...]


@dataclass
class Plan:
    """How each needed tensor of the linear regions is produced in the deploy form."""

    merged: dict[fx.Node, MergeGroup] = field(default_factory=dict)  # exit node -> group
    kept: set[fx.Node] = field(default_factory=set)  # linear ops kept as they are
    padding_moves: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)  # conv node -> new padding
    removed: dict[fx.Node, frozenset[int]] = field(default_factory=dict)  # merged exit -> channels dropped
    # per-channel constants (never computed: absorbed into a bias, or read from a ChannelConstant), the
    # operations only they read (dropped), and the constants the deploy form reads: {constant: (the tensor
    # its shape comes from, the steps from that shape to its own)}, see :mod:`tlc.surgery.constants`
    constants: dict[fx.Node, Constant] = field(default_factory=dict)
    dead: set[fx.Node] = field(default_factory=set)
    materialized: dict[fx.Node, tuple[fx.Node, tuple]] = field(default_factory=dict)

    def is_realized(self, node: fx.Node) -> bool:
        return node in self.merged or node in self.kept


@dataclass
class _Solution:
    cost: Cost
    steps: list[tuple]


def _undominated(options: list[_Solution]) -> list[_Solution]:
    """The options no other beats in structure: fewer or as many MACs, weight layers and elementwise ops,
    and fewer of one (plan rule 2, ``pricing.PLAN_RULE``)."""
    def counts(s: _Solution) -> tuple[int, int, int]:
        return s.cost.macs, s.cost.weight_ops, s.cost.elementwise

    def beats(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        return a != b and all(x <= y for x, y in zip(a, b, strict=True))

    every = [counts(s) for s in options]
    return [s for s, c in zip(options, every, strict=True) if not any(beats(o, c) for o in every)]


class Planner:
    """Builds a :class:`Plan` for a traced graph.

    ``movable`` lists nodes (linearized-site gates) whose segments may have their padding moved:
    groups containing one are planned as if the padding were on their first conv, and the moves are
    reported in ``Plan.padding_moves`` (used by ``linearize``). Everything else must be exact as is.
    """

    def __init__(self, graph: Graph, policy: str = "macs", *, movable: set[fx.Node] | None = None,
                 barriers: set[fx.Node] | None = None, max_weight_numel: int = MAX_MERGED_WEIGHT_NUMEL,
                 table: pricing.Prices | None = None):
        if policy not in POLICIES:
            raise ValueError(f"merge policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.graph = graph
        self.policy = policy
        self.table = (table if table is not None else pricing.current_table()) if policy == "latency" else None
        self.rule = getattr(self.table, "rule", pricing.PLAN_RULE)
        self.movable = movable or set()
        self.max_weight_numel = max_weight_numel
        self.nodes = list(graph.gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.info = graph.info
        barriers = barriers or set()
        self.linear = {n for n in self.nodes
                       if self.info[n].kind in LINEAR_KINDS and self._analysable(n) and n not in barriers}
        self.constants = find_constants(graph, self.linear, _zeros_of, barriers)
        self.dead = dead_nodes(graph, self.constants)
        self.zeros = self._structural_zeros()
        self.dominators = self._dominators()
        self.tied = self._tied_owners()
        self.shared = self._shared_owners() | self.tied
        self._solutions: dict[tuple[fx.Node, fx.Node], _Solution | None] = {}
        self._too_big: dict[tuple[fx.Node, fx.Node], bool] = {}
        self._groups: dict[tuple[fx.Node, fx.Node], tuple[Cost, tuple[fx.Node, ...], dict, Map] | None] = {}

    # ------------------------------------------------------------------ graph facts
    def _analysable(self, node: fx.Node) -> bool:
        shape = self.graph.shape(node)
        return shape is not None and all(self.graph.shape(i) is not None for i in self.info[node].inputs)

    def _structural_zeros(self) -> dict[fx.Node, frozenset[int]]:
        zeros: dict[fx.Node, frozenset[int]] = {}
        for n in self.nodes:
            info = self.info[n]
            z: frozenset[int] = frozenset()
            if n in self.linear:
                inputs = [zeros.get(i, frozenset()) for i in info.inputs]
                if info.kind is Kind.IDENTITY:
                    z = inputs[0]
                elif info.kind is Kind.SCALE:
                    z = inputs[0] | _zeros_of(info, "scale")
                elif info.kind is Kind.ADD:
                    z = inputs[0] & inputs[1]
                elif info.kind is Kind.CONV:
                    p = info.params
                    if p["groups"] == p["weight"].shape[0] == self._channels(info.input) and p["bias"] is None:
                        z = inputs[0]
            zeros[n] = z
        return zeros

    def _dominators(self) -> dict[fx.Node, frozenset[fx.Node]]:
        """For each linear node, the nodes every path from any region entry to it goes through."""
        dom: dict[fx.Node, frozenset[fx.Node]] = {}
        for n in self.nodes:
            if n not in self.linear:
                continue
            common: frozenset[fx.Node] | None = None
            inputs = self.info[n].inputs
            # a constant term is no path from an entry (a residual sum absorbs it); read otherwise, it is one
            for i in [i for i in inputs if i not in self.constants] or inputs:
                d = dom[i] if i in self.linear and i not in self.constants else frozenset({i})
                common = d if common is None else common & d
            dom[n] = (common or frozenset()) | {n}
        return dom

    def entry_of(self, node: fx.Node) -> fx.Node | None:
        """The farthest tensor every path to ``node`` goes through: where to compute it from."""
        candidates = [d for d in self.dominators[node] if d is not node]
        return min(candidates, key=self.order.__getitem__) if candidates else None

    def _tied_owners(self) -> set[str]:
        """Layers holding a weight or bias that another layer holds too (tied weights, Layer Fusion):
        merging one would give it its own copy, so they are kept as they are."""
        holders: dict[int, set[str]] = {}
        for n in self.nodes:
            info = self.info[n]
            if info.owner and info.kind in (Kind.CONV, Kind.LINEAR, Kind.BN):
                for t in (info.params.get("weight"), info.params.get("bias")):
                    if isinstance(t, torch.Tensor):
                        holders.setdefault(id(t), set()).add(info.owner)
        return {owner for owners in holders.values() if len(owners) > 1 for owner in owners}

    def _shared_owners(self) -> set[str]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            info = self.info[n]
            if info.owner and info.kind in (Kind.CONV, Kind.LINEAR, Kind.BN):
                counts[info.owner] = counts.get(info.owner, 0) + 1
            elif info.kind is Kind.OTHER and n.op == "call_module":
                counts[str(n.target)] = counts.get(str(n.target), 0) + 1
        return {owner for owner, c in counts.items() if c > 1}

    def removable(self, node: fx.Node) -> frozenset[int]:
        """Always-zero channels of ``node`` that the deploy form removes physically: those of a dense
        conv/linear output (through batch norms, gates, identities) read only by dense conv/linears, and
        never all of them (a layer cannot have no channels: an all-zero output keeps its layers, unless a
        residual add makes the branch a bias, see :func:`tlc.surgery.affine.add`)."""
        zeros = self.zeros.get(node, frozenset())
        if not zeros or not node.users or node in self.constants:
            return frozenset()
        for user in node.users:
            info = self.info[user]
            if info.kind not in (Kind.CONV, Kind.LINEAR) or info.input is not node or \
                    info.params.get("groups", 1) != 1 or user not in self.linear or info.owner in self.tied:
                return frozenset()
        n = node
        while self.info[n].kind in (Kind.BN, Kind.SCALE, Kind.IDENTITY) and n in self.linear:
            n = self.info[n].input
            if len(n.users) != 1:
                return frozenset()
        info = self.info[n]
        if n in self.linear and info.kind in (Kind.CONV, Kind.LINEAR) and info.params.get("groups", 1) == 1 \
                and len(zeros) < info.params["weight"].shape[0]:
            return zeros
        return frozenset()

    def _channels(self, node: fx.Node) -> int:
        shape = self.graph.shape(node)
        return int(shape[1]) if shape else 0

    def _positions(self, node: fx.Node, channels: int) -> int:
        shape = self.graph.shape(node)
        return math.prod(shape) // max(channels, 1)

    # ------------------------------------------------------------------ plan
    def plan(self) -> Plan:
        plan = Plan()
        required = [n for n in self.nodes if n in self.linear and n not in self.constants and n not in self.dead
                    and any(u not in self.linear for u in n.users)]
        work: deque[tuple[fx.Node, fx.Node | None]] = deque((n, None) for n in required)
        while work:
            node, entry = work.popleft()
            if plan.is_realized(node):
                continue
            if entry is None:
                entry = self.entry_of(node)
            solution = self.solve(entry, node) if entry is not None else None
            if solution is None:
                plan.kept.add(node)
                work.extend((i, None) for i in self.info[node].inputs if i in self.linear and i not in self.constants)
                continue
            self._commit(solution, plan)
            if entry in self.linear and entry not in self.constants:
                work.append((entry, None))
        for exit_ in plan.merged:
            final = self._groups[(plan.merged[exit_].entry, exit_)][3]
            zeros = self.removable(exit_)
            if zeros and final.groups == 1 and final.weight_ops:
                plan.removed[exit_] = zeros
        self._materialize(plan)
        return plan

    def _materialize(self, plan: Plan) -> None:
        """Record the constants, the dead operations, and where the deploy form reads a constant (a kept
        operation's input, a merged group's entry, a non-linear operation's input): those become tensors."""
        plan.constants, plan.dead = self.constants, self.dead
        folded = {m for g in plan.merged.values() for m in g.members}
        read: set[fx.Node] = set()
        for n in self.nodes:
            if n in self.constants or n in self.dead:
                continue
            if n in plan.merged:
                read.add(plan.merged[n].entry)
            elif n in plan.kept or n not in folded:
                read.update(n.all_input_nodes)
        read &= self.constants.keys()

        def available(n: fx.Node) -> bool:
            if n in read or n.op == "placeholder":
                return True
            return n not in self.constants and n not in self.dead and (plan.is_realized(n) or n not in folded)

        plan.materialized = {c: shape_steps(self.graph, c, available) for c in sorted(read, key=self.order.__getitem__)}

    def total_cost(self, plan: Plan) -> Cost:
        """Cost of the deploy form a plan describes (linear operations only)."""
        total = Cost()
        for exit_, group in plan.merged.items():
            total = total + self._groups[(group.entry, exit_)][0]
        for node in plan.kept:
            total = total + self._op_cost(node)
        return total

    def _commit(self, solution: _Solution, plan: Plan) -> None:
        for step in solution.steps:
            tag = step[0]
            if tag == "merged":
                _, start, end = step
                if plan.is_realized(end):
                    continue
                _, members, moves, _ = self._groups[(start, end)]
                plan.merged[end] = MergeGroup(start, end, members)
                plan.padding_moves.update(moves)
            elif tag == "single":
                if not plan.is_realized(step[1]):
                    plan.kept.add(step[1])
            elif tag == "parallel":
                _, start, end, branches = step
                if plan.is_realized(end):
                    continue
                plan.kept.add(end)
                for branch in branches:
                    self._commit(branch, plan)
            elif tag == "keepall":
                for n in step[1]:
                    if not plan.is_realized(n):
                        plan.kept.add(n)

    # ------------------------------------------------------------------ dynamic programme
    def between(self, start: fx.Node, end: fx.Node) -> tuple[fx.Node, ...] | None:
        """Linear nodes on the paths from ``start`` to ``end`` (``end`` included), if ``start`` feeds them all."""
        if end in self.constants:
            return None
        members: set[fx.Node] = set()
        stack = [end]
        while stack:
            n = stack.pop()
            if n is start or n in members or n in self.constants:
                continue  # a constant is no member: a residual sum absorbs it (see below)
            if n not in self.linear:
                return None
            members.add(n)
            stack.extend(self.info[n].inputs)
        for n in members:
            if self.info[n].kind is not Kind.ADD and any(i in self.constants and i is not start
                                                         for i in self.info[n].inputs):
                return None
        return tuple(sorted(members, key=self.order.__getitem__))

    def _spine(self, start: fx.Node, members: tuple[fx.Node, ...]) -> list[fx.Node]:
        dom: dict[fx.Node, frozenset[fx.Node]] = {start: frozenset({start})}
        for n in members:
            inputs = [i for i in self.info[n].inputs if i in dom]  # not the constants a sum absorbs
            common = dom[inputs[0]]
            for i in inputs[1:]:
                common = common & dom[i]
            dom[n] = common | {n}
        return sorted(dom[members[-1]], key=self.order.__getitem__)

    def solve(self, start: fx.Node, end: fx.Node) -> _Solution | None:
        key = (start, end)
        if key not in self._solutions:
            self._solutions[key] = None  # guards against cycles in malformed graphs
            self._solutions[key] = self._solve(start, end)
        return self._solutions[key]

    def _solve(self, start: fx.Node, end: fx.Node) -> _Solution | None:
        members = self.between(start, end)
        if members is None:
            return None
        spine = self._spine(start, members)
        best: list[_Solution | None] = [_Solution(Cost(), [])] + [None] * (len(spine) - 1)
        for j in range(1, len(spine)):
            options: list[_Solution] = []
            previous = best[j - 1]
            if previous is not None:
                piece = self._unmerged_piece(spine[j - 1], spine[j])
                options.append(_Solution(previous.cost + piece.cost, previous.steps + piece.steps))
            for i in range(j - 1, -1, -1):
                group = self.group(spine[i], spine[j])
                if group is None:
                    if self._too_big.get((spine[i], spine[j])):
                        break  # longer groups only grow
                    continue
                if best[i] is not None:
                    options.append(_Solution(best[i].cost + group[0], best[i].steps + [("merged", spine[i], spine[j])]))
            if options:
                if self.policy == "latency" and self.rule >= 2:
                    options = _undominated(options)
                best[j] = min(options, key=lambda s: s.cost.key(self.policy))
        return best[-1]

    def _unmerged_piece(self, start: fx.Node, end: fx.Node) -> _Solution:
        inputs = self.info[end].inputs
        if tuple(inputs) == (start,):
            return _Solution(self._op_cost(end), [("single", end)])
        if self.info[end].kind is Kind.ADD:
            branches, read = [], 0
            for i in inputs:
                if i is start:
                    continue
                if i in self.constants:
                    read += 1  # read from a ChannelConstant
                    continue
                branch = self.solve(start, i)
                if branch is None:
                    break
                branches.append(branch)
            else:
                total = self._op_cost(end) + Cost(elementwise=read)
                for b in branches:
                    total = total + b.cost
                return _Solution(total, [("parallel", start, end, branches)])
        members = self.between(start, end) or (end,)
        total = Cost()
        for n in members:
            total = total + self._op_cost(n)
        return _Solution(total, [("keepall", members)])

    def _op_cost(self, node: fx.Node) -> Cost:
        info = self.info[node]
        if info.kind in (Kind.CONV, Kind.LINEAR):
            w = info.params["weight"]
            groups = info.params.get("groups", 1)
            c_out = w.shape[0]
            c_in = w.shape[1] * groups - len(self.removable(info.input))
            macs = c_out * (c_in // groups if groups > 1 else c_in) * math.prod(w.shape[2:]) * \
                self._positions(node, c_out)
            return Cost(macs=macs, weight_ops=1, seconds=self._op_seconds(node, c_in))
        if info.kind is Kind.IDENTITY:
            return Cost()
        return Cost(elementwise=1, seconds=self._op_seconds(node, 0))

    def _op_seconds(self, node: fx.Node, in_channels: int) -> float:
        """The table's price of ``node`` kept as it is (``in_channels``: its input channels left)."""
        if self.table is None:
            return 0.0
        info, p = self.info[node], self.info[node].params
        source = self.graph.shape(info.input)
        if info.kind is Kind.CONV:
            geometry = {**p, "kernel": tuple(p["weight"].shape[2:]), "bias": p["bias"] is not None}
            return self.table.seconds(pricing.conv_shape(source, in_channels, p["weight"].shape[0], geometry))
        if info.kind is Kind.LINEAR:
            return self.table.seconds(pricing.dense_shape(source, in_channels, p["weight"].shape[0],
                                                          p["bias"] is not None))
        kind = "add" if info.kind is Kind.ADD else "affine"
        return self.table.seconds(pricing.elementwise_shape(kind, self.graph.shape(node)))

    def _group_seconds(self, start: fx.Node, end: fx.Node, final: Map, removed_in: int, removed_out: int) -> float:
        """The table's price of the one layer a merged group becomes."""
        if self.table is None or final.identity:
            return 0.0
        source = self.graph.shape(start)
        if final.weight_ops == 0:
            return self.table.seconds(pricing.elementwise_shape("affine", self.graph.shape(end)))
        out_channels = final.out_channels - removed_out
        if final.kind == "dense":
            return self.table.seconds(pricing.dense_shape(source, final.in_channels - removed_in, out_channels))
        geometry = {"groups": final.groups, "kernel": final.kernel, "stride": final.stride,
                    "padding": final.padding, "dilation": final.dilation, "bias": True}
        return self.table.seconds(pricing.conv_shape(source, final.in_channels - removed_in, out_channels, geometry))

    # ------------------------------------------------------------------ one merged group
    def group(self, start: fx.Node, end: fx.Node) -> tuple[Cost, tuple[fx.Node, ...], dict, Map] | None:
        """Cost, members, padding moves and (shape-mode) map of computing ``end`` from ``start`` as one op,
        or None when that is impossible."""
        key = (start, end)
        if key not in self._groups:
            self._groups[key] = self._group(start, end)
        return self._groups[key]

    def _group(self, start: fx.Node, end: fx.Node) -> tuple[Cost, tuple[fx.Node, ...], dict, Map] | None:
        members = self.between(start, end)
        if members is None:
            return None
        member_set = set(members)
        for n in members:
            if n is not end and any(u not in member_set and u not in self.constants and u not in self.dead
                                    for u in n.users):
                return None
            if self.info[n].owner in self.shared:
                return None
        weight_ops = sum(1 for n in members if self.info[n].kind in (Kind.CONV, Kind.LINEAR))
        if self.policy == "never" and (weight_ops > 1 or any(self.info[n].kind is Kind.ADD for n in members)):
            return None
        relaxed = bool(member_set & self.movable)
        try:
            maps = evaluate(self.graph, start, members, numeric=False, strict=not relaxed, constants=self.constants)
            moves = padding_moves(self.graph, start, members, maps, self.constants) if relaxed else {}
        except Infeasible:
            return None
        final = maps[end]
        if final.weight_ops > 1 and final.weight_numel > self.max_weight_numel:
            self._too_big[(start, end)] = True
            return None
        if final.identity:
            cost = Cost(changes=1)
        elif final.weight_ops == 0:
            cost = Cost(elementwise=1, changes=1, seconds=self._group_seconds(start, end, final, 0, 0))
        else:
            removed_in, removed_out = len(self.removable(start)), len(self.removable(end)) if final.groups == 1 else 0
            cost = Cost(macs=affine.macs(final, self._positions(end, final.out_channels), removed_in, removed_out),
                        weight_ops=1, changes=1,
                        seconds=self._group_seconds(start, end, final, removed_in, removed_out))
        return cost, members, moves, final


# ============================================================================ evaluation


def region_layout(graph: Graph, start: fx.Node, members: tuple[fx.Node, ...],
                  constant_dims: frozenset[int] = frozenset()) -> tuple[str, int]:
    """("conv", spatial dims) or ("dense", 0) for a group, or Infeasible when it mixes layouts
    (``constant_dims``: the channel dims, 1 or -1, of the non-zero constants it adds)."""
    shape = graph.shape(start)
    if shape is None:
        raise Infeasible("unknown shape")
    ndim = len(shape)
    kinds = {graph.info[n].kind for n in members}
    if ndim <= 2:
        if Kind.CONV in kinds:
            raise Infeasible("convolution on a 2-D tensor")
        return "dense", 0
    if Kind.CONV in kinds and Kind.LINEAR in kinds:
        raise Infeasible("convolution and linear layer act on different dimensions")
    if Kind.CONV in kinds:
        layout = ("conv", ndim - 2)
    elif Kind.LINEAR in kinds:
        layout = ("dense", 0)
    else:
        dims = {graph.info[n].params["channel_dim"] for n in members if graph.info[n].kind in (Kind.BN, Kind.SCALE)}
        dims |= constant_dims
        if len(dims) > 1:
            raise Infeasible("per-channel ops on different dimensions")
        layout = ("conv", ndim - 2) if dims == {1} else ("dense", 0)
    want = 1 if layout[0] == "conv" else -1
    for n in members:
        info = graph.info[n]
        if info.kind in (Kind.BN, Kind.SCALE):
            dim = info.params["channel_dim"]
            if dim != want and not (want == -1 and dim == ndim - 1):
                raise Infeasible("per-channel op on another dimension than the layers")
    return layout


def evaluate(graph: Graph, start: fx.Node, members: tuple[fx.Node, ...], *, numeric: bool,
             strict: bool = True, constants: Mapping[fx.Node, Constant] | None = None,
             values: Mapping[fx.Node, torch.Tensor] | None = None) -> dict[fx.Node, Map]:
    """Maps of ``start`` and every member relative to ``start`` (members in topological order). An input
    that is neither is one of the per-channel ``constants`` (its float64 ``values`` in numeric mode)."""
    constants = constants or {}
    ndim = len(graph.shape(start) or ())
    terms = {constants[i] for n in members for i in graph.info[n].inputs if i in constants and i is not start}
    kind, spatial = region_layout(graph, start, members, frozenset(
        -1 if c.axis == ndim - 1 and ndim != 2 else c.axis for c in terms if not c.is_zero))
    shape = graph.shape(start)
    channel_axis = 1 if kind == "conv" else -1
    maps: dict[fx.Node, Map] = {start: affine.identity_map(kind, int(shape[channel_axis]), spatial, numeric)}
    entry_size = tuple(shape[2:]) if kind == "conv" else ()
    for n in members:
        info = graph.info[n]
        p = info.params
        for i in info.inputs:
            if i not in maps:
                maps[i] = _constant_term(graph, i, constants, values, kind, maps[start].in_channels, spatial)
        if info.kind is Kind.CONV:
            m = affine.apply_conv(maps[info.input], p["weight"], p["bias"], p["stride"], p["padding"], p["dilation"],
                                  p["groups"], numeric=numeric, strict=strict)
        elif info.kind is Kind.LINEAR:
            m = affine.apply_conv(maps[info.input], p["weight"], p["bias"], (), (), (), 1, numeric=numeric,
                                  strict=strict)
        elif info.kind is Kind.BN:
            m = affine.apply_affine(maps[info.input], p["scale"], p["shift"], numeric=numeric,
                                    scale_zeros=_zeros_of(info, "scale"), shift_zeros=_zeros_of(info, "shift"))
        elif info.kind is Kind.SCALE:
            m = affine.apply_affine(maps[info.input], p["scale"], None, numeric=numeric,
                                    scale_zeros=_zeros_of(info, "scale"))
        elif info.kind is Kind.IDENTITY:
            m = maps[info.input]
        elif info.kind is Kind.ADD:
            m = affine.add(maps[info.inputs[0]], maps[info.inputs[1]], numeric=numeric)
        else:
            raise Infeasible(f"{n.name} is not linear")
        out_shape = graph.shape(n)
        if kind == "conv" and tuple(out_shape[2:]) != m.output_size(entry_size):
            raise Infeasible(f"{n.name}: merged geometry does not give the traced output size")
        if out_shape[channel_axis] != m.out_channels:
            raise Infeasible(f"{n.name}: channel count mismatch")
        maps[n] = m
    return maps


def _constant_term(graph: Graph, node: fx.Node, constants: Mapping[fx.Node, Constant],
                   values: Mapping[fx.Node, torch.Tensor] | None, kind: str, entry_channels: int,
                   spatial: int) -> Map:
    """The constant map of a per-channel constant read inside a group (numeric when ``values`` are given)."""
    shape = graph.shape(node)
    axis = 1 if kind == "conv" else len(shape) - 1
    constant = constants[node].along(axis, shape[axis]) if node in constants else None
    if constant is None:
        raise Infeasible(f"{node.name} is neither in the group nor a constant along its channels")
    value = None
    if values is not None:
        value = values[node] if constants[node].axis == axis else torch.zeros(constant.channels, dtype=torch.float64)
    return affine.constant_map(kind, entry_channels, constant.channels, spatial, constant.zeros, value)


def _zeros_of(info: Any, key: str) -> frozenset[int]:
    """Zero channels of a per-channel op's parameter, computed once per op."""
    cache = info.params.setdefault("_zeros", {})
    if key not in cache:
        cache[key] = affine.zero_channels(info.params[key])
    return cache[key]


# The per-channel parameters whose exact zeros decide the structure of a merge (removed channels, a
# constant branch that becomes a bias): batch norm scale and shift, gate and layer-scale factors.
_ZERO_KEYS = {Kind.BN: ("scale", "shift"), Kind.SCALE: ("scale",)}


def dead_sites(graph: Graph) -> set[str]:
    """The sites the deploy form does not compute: those whose output only per-channel constants read
    (in front of an all-off site of the same branch, say) and those that are constants themselves (behind
    one: ``act(c)`` is a constant). Collapsing them saves nothing."""
    planner = Planner(graph)
    return {site.name for site in graph.sites
            if graph.site_node(site) in planner.dead or graph.site_node(site) in planner.constants}


def value_zeros(graph: Graph) -> dict[str, dict[str, list[int]]]:
    """The zero channels of every per-channel op's parameters, by node name (non-empty ones only).

    The plan depends on these values, not only on the architecture: recorded with a deploy form, they
    let :func:`tlc.load` rebuild the same structure from a freshly built model (see :func:`assume_zeros`).
    """
    found: dict[str, dict[str, list[int]]] = {}
    for node in graph.nodes:
        info = graph.info[node]
        for key in _ZERO_KEYS.get(info.kind, ()):
            if isinstance(info.params.get(key), torch.Tensor):
                zeros = _zeros_of(info, key)
                if zeros:
                    found.setdefault(node.name, {})[key] = sorted(zeros)
    return found


def assume_zeros(graph: Graph, recorded: dict[str, dict[str, list[int]]]) -> None:
    """Plan ``graph`` as if its per-channel parameters had the zeros ``recorded`` by :func:`value_zeros`
    (and no others), whatever its current values: the structure of a saved deploy form, rebuilt before
    its weights are loaded."""
    names = {node.name for node in graph.nodes}
    unknown = sorted(set(recorded) - names)
    if unknown:
        raise Infeasible(f"recorded zero channels name operations the model does not have: {', '.join(unknown[:3])}")
    for node in graph.nodes:
        info = graph.info[node]
        keys = _ZERO_KEYS.get(info.kind, ())
        if keys:
            info.params["_zeros"] = {k: frozenset(recorded.get(node.name, {}).get(k, ())) for k in keys}


def exit_map(graph: Graph, start: fx.Node, members: tuple[fx.Node, ...],
             constants: Mapping[fx.Node, Constant] | None = None,
             values: Mapping[fx.Node, torch.Tensor] | None = None) -> Map:
    """Numeric map of a group's exit (``constants`` and their ``values``: the constant terms it reads).
    Dense groups that narrow are composed from the exit backwards, which costs (exit width) x (layer
    sizes) instead of (entry width) x (layer sizes)."""
    shape_maps = evaluate(graph, start, members, numeric=False, constants=constants)
    final = shape_maps[members[-1]]
    if final.kind != "dense" or final.weight_ops == 0 or final.out_channels >= final.in_channels:
        return evaluate(graph, start, members, numeric=True, constants=constants, values=values)[members[-1]]
    inside = {start, *members}
    terms = {n: _constant_term(graph, n, constants or {}, values or {}, "dense", final.in_channels, 0).bias
             for n in shape_maps if n not in inside}
    weight, bias = _reverse_dense(graph, start, members, final.out_channels, terms)
    if final.groups != 1:
        raise Infeasible("grouped dense map")
    return replace(final, weight=weight, bias=bias)


def _reverse_dense(graph: Graph, start: fx.Node, members: tuple[fx.Node, ...], out_features: int,
                   terms: Mapping[fx.Node, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a dense group by reverse accumulation of d(exit)/d(tensor) (``terms``: the
    values of the constants it adds)."""
    sens: dict[fx.Node, torch.Tensor] = {members[-1]: torch.eye(out_features, dtype=torch.float64)}
    bias = torch.zeros(out_features, dtype=torch.float64)

    def push(node: fx.Node, g: torch.Tensor) -> None:
        sens[node] = sens[node] + g if node in sens else g

    for n in reversed(members):
        g = sens.pop(n, None)
        if g is None:
            continue
        info = graph.info[n]
        p = info.params
        if info.kind is Kind.LINEAR:
            if p["bias"] is not None:
                bias += g @ p["bias"].detach().double()
            push(info.input, g @ p["weight"].detach().double())
        elif info.kind is Kind.BN:
            bias += g @ p["shift"].double()
            push(info.input, g * p["scale"].double())
        elif info.kind is Kind.SCALE:
            push(info.input, g * p["scale"].detach().double())
        elif info.kind is Kind.IDENTITY:
            push(info.input, g)
        elif info.kind is Kind.ADD:
            for i in info.inputs:
                if i in terms:
                    bias += g @ terms[i]
                else:
                    push(i, g)
        else:
            raise Infeasible(f"{n.name} is not linear")
    return sens[start], bias


def padding_moves(graph: Graph, start: fx.Node, members: tuple[fx.Node, ...], maps: dict[fx.Node, Map],
                  constants: Mapping[fx.Node, Constant] | None = None) -> dict[fx.Node, tuple[int, ...]]:
    """New paddings that make a group exact: each conv's padding moves onto the first conv of its path.

    Works backwards from the exit: a conv whose input is not zero-preserving asks its input for
    ``padding + stride * extension`` extra border positions and pads nothing itself. A constant term
    (one of ``constants``) asked for border positions grows where it stays constant (:func:`_grow`).
    """
    end = members[-1]
    spatial = len(maps[end].kernel)
    need: dict[fx.Node, tuple[int, ...]] = {end: (0,) * spatial}
    moves: dict[fx.Node, tuple[int, ...]] = {}
    grown: dict[fx.Node, tuple[int, ...]] = {}
    member_set = set(members)

    def ask(node: fx.Node, extension: tuple[int, ...]) -> None:
        if node is start:
            if any(extension):
                raise Infeasible("padding would have to move before the segment's entry")
            return
        if node not in member_set and constants and node in constants:
            _grow(graph, node, extension, constants, grown, moves)
            return
        if need.setdefault(node, extension) != extension:
            raise Infeasible("branches of the segment need different padding")

    for n in reversed(members):
        info = graph.info[n]
        extension = need.get(n)
        if extension is None:
            raise Infeasible(f"{n.name} does not lead to the segment's exit")
        if info.kind is Kind.CONV:
            if conv_module_path(graph, n) is None:
                raise Infeasible(f"{n.name}: a functional convolution's padding cannot be moved")
            pad, stride = info.params["padding"], info.params["stride"]
            wanted = tuple(p + s * e for p, s, e in zip(pad, stride, extension))
            if maps[info.input].zero_preserving:
                new_pad, upstream = wanted, (0,) * spatial
            else:
                new_pad, upstream = (0,) * spatial, wanted
            if new_pad != tuple(pad):
                moves[n] = new_pad
            ask(info.input, upstream)
        else:
            for i in info.inputs:
                ask(i, extension)
    return moves


def _grow(graph: Graph, node: fx.Node, extension: tuple[int, ...], constants: Mapping[fx.Node, Constant],
          grown: dict[fx.Node, tuple[int, ...]], moves: dict[fx.Node, tuple[int, ...]]) -> None:
    """Make constant ``node`` larger by ``extension`` on each side: the conv that reads a tensor 0
    everywhere pads more (zero padding of 0 keeps it constant), the operations after it follow."""
    if not any(extension):
        return
    if grown.setdefault(node, extension) != extension or len(node.users) != 1:
        raise Infeasible("a constant read at several places cannot grow")
    info = graph.info[node]
    source = info.inputs[0]
    if info.kind is Kind.ADD:
        for i in info.inputs:
            _grow(graph, i, extension, constants, grown, moves)
    elif info.kind is Kind.CONV and conv_module_path(graph, node) is not None:
        wanted = tuple(p + s * e for p, s, e in zip(info.params["padding"], info.params["stride"], extension))
        if constants[source].is_zero:
            moves[node] = wanted
        else:  # a constant conv that reads a non-zero constant does not pad: its input grows instead
            _grow(graph, source, wanted, constants, grown, moves)
    elif info.kind in (Kind.BN, Kind.SCALE, Kind.IDENTITY, Kind.SITE) and source in constants:
        _grow(graph, source, extension, constants, grown, moves)
    else:
        raise Infeasible(f"{node.name}: a constant that cannot grow (the padding would move before it)")


def conv_module_path(graph: Graph, node: fx.Node) -> str | None:
    """Path of the nn.ConvNd module a conv node calls (None for a functional conv on other weights)."""
    if node.op == "call_module":
        return str(node.target)
    owner = graph.info[node].owner or ""
    if graph.backend == "export" and owner.endswith(".weight"):
        return owner[: -len(".weight")]
    return None
