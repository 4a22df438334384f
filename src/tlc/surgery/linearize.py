"""Linearize: the training form, where chosen activation sites become the identity or a channel gate.

This is the only lossy step of tlc. With ``exact=True`` (the default) the padding of every segment
that the merge will collapse is moved onto the segment's first convolution, so that the fine-tuned
training form and the merged deploy form are the same function, borders included.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from tlc._inputs import ExampleInputs
from tlc.errors import MergeError
from tlc.graph import Graph, Site, resolve_sites, trace
from tlc.ops import Kind
from tlc.sites import SiteActivation, SiteGate
from tlc.surgery import pricing
from tlc.surgery.plan import POLICIES, Planner, conv_module_path

Masks = Mapping[str, Any]


def linearize(
    model: nn.Module,
    sites: Iterable[Site | str],
    example_inputs: ExampleInputs,
    masks: Masks | None = None,
    *,
    exact: bool = True,
    policy: str = "macs",
    table: Any = None,
) -> nn.Module:
    """A new module where each chosen site is the identity, or a 0/1 gate per channel when
    ``masks[site_name]`` is given (0 = channel removed). ``model`` is not modified.

    ``policy`` is the merge policy the padding moves are planned for (``merge`` uses it by default;
    ``"latency"`` plans with ``table``, a :class:`tlc.measure.LatencyTable`, by default the current one).
    For models torch.fx traces, and for graph modules, the result is an ``fx.GraphModule``; otherwise the
    model's own class with the activation modules replaced.

    Any addressable site may be named, candidates or not: a gated site (``Site.gated``, a GLU-style MLP's
    gate) is linearized as asked, the product it feeds stays a product and the merge keeps it. A site tlc
    cannot address (``Site.addressable`` False, see :mod:`tlc.graph`) raises :class:`TraceError` with why.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    graph = trace(model, example_inputs)
    chosen = resolve_sites(graph, sites)
    checked = _check_masks(chosen, masks or {})
    if graph.backend == "fx" or isinstance(model, fx.GraphModule):
        # a graph module (a deploy form, even of a torch.export graph) is edited node by node: replacing
        # activation modules would miss its sites, which call functions, not modules
        form: nn.Module = _gate_graph(graph, chosen, checked)
    else:
        form = _gate_modules(model, chosen, checked)
    moves = _move_padding(form, example_inputs, {s.name for s in chosen}, policy, table) if exact and chosen else {}
    record = dict(getattr(model, "_tlc_record", {}) or {})
    record["paddings"] = {**record.get("paddings", {}), **{k: list(v) for k, v in moves.items()}}
    record["sites"] = list(record.get("sites", [])) + [s.name for s in chosen]
    record["masks"] = dict(record.get("masks", {}))
    for s in chosen:
        mask = checked.get(s.name)
        record["masks"][s.name] = None if mask is None else [int(v) for v in mask.tolist()]
    record["policy"] = policy
    record["exact"] = bool(record.get("exact", True) and exact)
    form._tlc_record = record
    return form.train(model.training)


def _check_masks(chosen: list[Site], masks: Masks) -> dict[str, torch.Tensor]:
    names = {s.name for s in chosen}
    unknown = [k for k in masks if k not in names]
    if unknown:
        raise ValueError(f"masks given for sites that are not linearized: {', '.join(unknown)}")
    checked = {}
    for s in chosen:
        if s.name not in masks or masks[s.name] is None:
            continue
        mask = torch.as_tensor(masks[s.name]).detach().flatten()
        if mask.numel() != s.channels:
            raise ValueError(f"mask for site {s.name} has {mask.numel()} entries, the site has {s.channels} channels")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask for site {s.name} must hold only 0 and 1 (or booleans)")
        checked[s.name] = mask.to(torch.float32)
    return checked


def _unique_submodule_name(gm: nn.Module, prefix: str, site: str) -> str:
    base = f"{prefix}.{re.sub(r'[^0-9A-Za-z_]', '_', site)}"
    name, k = base, 1
    while _has_submodule(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


def _has_submodule(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


def _wrap(gm: fx.GraphModule, node: fx.Node, site: Site) -> SiteActivation | None:
    """A SiteActivation computing what ``node`` computes (None if already wrapped or not wrappable)."""
    extra_args = node.args[1:]
    if any(isinstance(a, fx.Node) for a in (*extra_args, *node.kwargs.values())):
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, SiteActivation):
            return None
        return SiteActivation(site.name, site.activation, module=module, origin=site.module)
    kwargs = {k: v for k, v in node.kwargs.items() if k != "input"}
    function = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
    if extra_args:
        return SiteActivation(site.name, site.activation, function=_Bound(function, extra_args), kwargs=kwargs)
    return SiteActivation(site.name, site.activation, function=function, kwargs=kwargs)


class _Bound:
    """``function(x, *args)``: a functional activation called with extra positional constants."""

    def __init__(self, function: Any, args: tuple):
        self.function, self.args = function, tuple(args)

    def __call__(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.function(x, *self.args, **kwargs)


SiteModule = Callable[[fx.GraphModule, fx.Node, Site], tuple[nn.Module | None, str]]


def replace_site_nodes(graph: Graph, module_for: SiteModule) -> fx.GraphModule:
    """A copy of ``graph.gm`` where each site node calls the module ``module_for(gm, node, site)`` gives, added
    under its prefix (None: the node stays as it is); every site is visited, so that names stay stable."""
    gm = copy.deepcopy(graph.gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    for site in graph.all_sites:
        node = by_name[site.node]
        module, prefix = module_for(gm, node, site)
        if module is None:
            continue
        name = _unique_submodule_name(gm, prefix, site.name)
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(node):
            replacement = gm.graph.call_module(name, (node.args[0] if node.args else node.kwargs["input"],))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _gate_graph(graph: Graph, chosen: list[Site], masks: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Replace the chosen site nodes by gates, and wrap every other site so that its name stays stable."""
    chosen_names = {s.name for s in chosen}

    def module_for(gm: fx.GraphModule, node: fx.Node, site: Site) -> tuple[nn.Module | None, str]:
        if site.name in chosen_names:
            return SiteGate(site.name, masks.get(site.name), site.channel_dim, len(site.shape)), "tlc_sites"
        return _wrap(gm, node, site), "tlc_acts"

    return replace_site_nodes(graph, module_for)


def _gate_modules(model: nn.Module, chosen: list[Site], masks: dict[str, torch.Tensor]) -> nn.Module:
    """The model's own class with the chosen activation modules replaced by gates (chosen sites are
    addressable: :meth:`tlc.graph.Graph.site` refused the others with their reason)."""
    form = copy.deepcopy(model)
    for site in chosen:
        form.set_submodule(site.module, SiteGate(site.name, masks.get(site.name), site.channel_dim, len(site.shape)))
    return form


def set_paddings(form: nn.Module, paddings: Mapping[str, tuple[int, ...]]) -> None:
    """Set the padding of each named convolution (the moves a linearization recorded)."""
    for path, padding in paddings.items():
        conv = form.get_submodule(path)
        conv.padding = tuple(padding)
        conv._reversed_padding_repeated_twice = [p for p in reversed(padding) for _ in range(2)]


def gate_nodes(graph: Graph) -> dict[str, fx.Node]:
    """The node of every linearized site's gate, by site name (fx: the gate's call; torch.export: the
    multiplication by its mask; an identity gate leaves no node there)."""
    found = {}
    for node in graph.nodes:
        info = graph.info[node]
        if node.op == "call_module":
            module = graph.gm.get_submodule(node.target)
            if isinstance(module, SiteGate):
                found[module.site] = node
        elif info.kind is Kind.SCALE and info.owner and info.owner.endswith(".mask"):
            try:
                module = graph.source.get_submodule(info.owner[: -len(".mask")])
            except AttributeError:
                continue
            if isinstance(module, SiteGate):
                found[module.site] = node
    return found


def _move_padding(form: nn.Module, example_inputs: ExampleInputs, site_names: set[str],
                  policy: str, table: Any = None) -> dict[str, tuple[int, ...]]:
    """Move padding so that the segments the merge will collapse are exact; returns {conv path: padding}."""
    graph = trace(form, example_inputs)
    gates = {node for name, node in gate_nodes(graph).items() if name in site_names}
    base = pricing.resolve(policy, table)
    pricing.measure_first(lambda prices: Planner(graph, policy, movable=gates, table=prices).plan(), base)
    planner = Planner(graph, policy, movable=gates, table=base)
    _refuse_shared(graph, planner, gates)
    plan = planner.plan()
    moves = {conv_module_path(graph, node): tuple(padding) for node, padding in plan.padding_moves.items()}
    set_paddings(form, moves)
    return moves


def _refuse_shared(graph: Graph, planner: Planner, gates: set[fx.Node]) -> None:
    """Linearizing next to a layer whose weights are shared would force merging it twice: refuse."""
    gate_names = {g.name for g in gates}
    by_name = {n.name: n for n in graph.nodes}
    for segment in graph.segments:
        if not gate_names & set(segment.nodes):
            continue
        for name in segment.nodes:
            info = graph.info[by_name[name]]
            if info.kind in (Kind.CONV, Kind.LINEAR, Kind.BN) and info.owner in planner.shared:
                raise MergeError(
                    f"layer '{info.owner}' is shared (its weights are used at several places) and lies in the "
                    "segment of a site being linearized; merging would have to un-share it. Give each use its "
                    "own layer, or do not linearize the neighbouring sites")
