"""Merge: turn a (linearized) model into its deploy form, verified to compute the same function.

Three layers, as in ``torch.nn.utils.fusion``: tensor algebra in :mod:`tlc.surgery.compose`, module
functions here (:func:`fold_bn`, :func:`merge_convs`, :func:`merge_linears`, :func:`fold_residual`),
and the graph pass :func:`merge`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import skip_init
from torch.utils._pytree import tree_map

from tlc._inputs import ExampleInputs, max_relative_error, output_tensors, run
from tlc.errors import MergeError, TLCError, VerificationError
from tlc.graph import Graph, trace
from tlc.ops import Kind
from tlc.surgery import compose, pricing
from tlc.surgery.affine import Infeasible, Map
from tlc.surgery.constants import ChannelConstant, constant_shape, constant_values
from tlc.surgery.modules import ChannelAffine
from tlc.surgery.plan import MergeGroup, Plan, Planner, assume_zeros, exit_map, value_zeros

DEFAULT_TOLERANCE = 1e-4
_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# ============================================================================ module functions


def _conv_of(layer: nn.Module) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        return ()
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        if layer.padding_mode != "zeros":
            raise MergeError(f"{type(layer).__name__} with padding_mode={layer.padding_mode!r} cannot be merged")
        if isinstance(layer.padding, str):
            raise MergeError(f"{type(layer).__name__} with padding={layer.padding!r}: use integer padding")
        return tuple(layer.padding)
    raise MergeError(f"expected nn.Linear or nn.ConvNd, got {type(layer).__name__}")


def _new_layer(like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, *, stride=None, padding=None,
               dilation=None, groups: int = 1) -> nn.Module:
    layer = make_layer(weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return layer.to(device=like.weight.device, dtype=like.weight.dtype)


def make_layer(weight: torch.Tensor, bias: torch.Tensor | None, *, linear: bool | None = None, stride=None,
               padding=None, dilation=None, groups: int = 1) -> nn.Module:
    """An nn.Linear (2-D weight) or nn.ConvNd holding copies of ``weight`` and ``bias`` (no random init)."""
    linear = weight.dim() == 2 if linear is None else linear
    if linear:
        layer = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    else:
        n = weight.dim() - 2
        layer = skip_init(_CONV_TYPES[n], weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                          stride=stride or 1, padding=padding or 0, dilation=dilation or 1, groups=groups,
                          bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.to(weight.dtype))
    return layer.to(weight.device)


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double()


def fold_bn(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A new conv/linear computing ``bn(layer(x))`` with ``bn`` in eval mode (inputs are not modified)."""
    _conv_of(layer)
    if bn.running_mean is None or bn.running_var is None:
        raise MergeError("cannot fold a batch norm without running statistics")
    w, b = compose.fold_bn_weights(_f64(layer.weight), _f64(layer.bias), _f64(bn.running_mean), _f64(bn.running_var),
                                   _f64(bn.weight), _f64(bn.bias), bn.eps)
    if isinstance(layer, nn.Linear):
        return _new_layer(layer, w, b)
    return _new_layer(layer, w, b, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                      groups=layer.groups)


def merge_linears(first: nn.Linear, second: nn.Linear) -> nn.Linear:
    """One linear computing ``second(first(x))``."""
    if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)):
        raise MergeError("merge_linears expects two nn.Linear")
    w, b = compose.compose_linear_weights(_f64(first.weight), _f64(first.bias), _f64(second.weight), _f64(second.bias))
    return _new_layer(second, w, b)


def merge_convs(first: nn.Module, second: nn.Module) -> nn.Module:
    """One convolution computing ``second(first(x))`` exactly.

    Exact only when ``second`` has no padding (move it onto ``first`` beforehand, as
    ``linearize(exact=True)`` does), or ``first`` is pointwise without bias.
    """
    pad1, pad2 = _conv_of(first), _conv_of(second)
    if isinstance(first, nn.Linear) or isinstance(second, nn.Linear) or type(first) is not type(second):
        raise MergeError("merge_convs expects two convolutions of the same dimensionality")
    pointwise = all(k == 1 for k in first.kernel_size) and all(s == 1 for s in first.stride) and not any(pad1)
    if any(pad2) and not (pointwise and first.bias is None):
        raise MergeError("the second convolution pads its input: the composition is not exact at the borders; "
                         "move its padding onto the first convolution first")
    w, b, dil, groups = compose.compose_conv_weights(
        _f64(first.weight), _f64(first.bias), _f64(second.weight), _f64(second.bias), stride1=tuple(first.stride),
        dilation1=tuple(first.dilation), groups1=first.groups, dilation2=tuple(second.dilation), groups2=second.groups)
    stride = tuple(a * c for a, c in zip(first.stride, second.stride))
    padding = tuple(p1 + s1 * p2 for p1, s1, p2 in zip(pad1, first.stride, pad2))
    return _new_layer(second, w, b, stride=stride, padding=padding, dilation=dil, groups=groups)


def fold_residual(layer: nn.Module) -> nn.Module:
    """A new layer computing ``x + layer(x)`` (same channels in and out, same spatial size)."""
    pad = _conv_of(layer)
    w = _f64(layer.weight)
    if isinstance(layer, nn.Linear):
        if w.shape[0] != w.shape[1]:
            raise MergeError("a residual needs as many outputs as inputs")
        return _new_layer(layer, w + torch.eye(w.shape[0], dtype=w.dtype), _f64(layer.bias))
    if layer.in_channels != layer.out_channels or any(s != 1 for s in layer.stride):
        raise MergeError("a residual conv needs equal in/out channels and stride 1")
    spans = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
    if any(s != 2 * p for s, p in zip(spans, pad)):
        raise MergeError("a residual conv must keep the spatial size ('same' padding)")
    ident = compose.identity_conv_weight(layer.in_channels, w.dim() - 2)
    weight, padding, dilation, groups = compose.add_conv_kernels(
        w, pad, tuple(layer.dilation), layer.groups, ident, (0,) * len(pad), (1,) * len(pad), layer.in_channels)
    return _new_layer(layer, weight, _f64(layer.bias), stride=layer.stride, padding=padding, dilation=dilation,
                      groups=groups)


# ============================================================================ graph pass


@dataclass
class MergeRecord:
    """One layer of the deploy form that replaced several operations."""

    name: str
    replaces: list[str]
    layer: str
    weight_ops: int
    removed_channels: int = 0


@dataclass
class MergeReport:
    """What a merge built (``deployed.tlc_report``): the layers, the policy, the verified error, and the
    zero channels of per-channel parameters the plan relied on (replayed by :func:`tlc.load`)."""

    policy: str
    records: list[MergeRecord] = field(default_factory=list)
    max_relative_error: float = 0.0
    zeros: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    prices: dict[str, float] | None = None  # latency policy: the table entries the plan read (key -> seconds)
    plan_rule: int | None = None  # latency policy: how the plan chose among those prices (pricing.PLAN_RULE)
    # latency policy: the two plans timed side by side on the table's clock (see ``merge``), or None
    clock: dict[str, Any] | None = None

    def __str__(self) -> str:
        lines = [f"merge (policy={self.policy}): {len(self.records)} layers built, "
                 f"max relative error {self.max_relative_error:.2e}"]
        for r in self.records:
            removed = f", {r.removed_channels} channels removed" if r.removed_channels else ""
            lines.append(f"  {r.name}: {r.layer} <- {' + '.join(r.replaces)}{removed}")
        if self.clock:
            lines.append(f"  latency plan against macs plan on the clock: x{self.clock['ratio']:.2f} "
                         f"({self.clock['ratio_q1']:.2f}-{self.clock['ratio_q3']:.2f}), kept {self.clock['kept']}")
        return "\n".join(lines)


def merge(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    policy: str | None = None,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    zeros: Mapping[str, Mapping[str, list[int]]] | None = None,
    table: pricing.Prices | Mapping[str, float] | None = None,
    clock_check: bool = True,
) -> fx.GraphModule:
    """The deploy form of ``model``: batch norms folded, linear chains merged where the policy says it
    pays, gated channels removed, verified to match ``model`` within ``tolerance`` (relative, fp32).

    ``policy`` is ``"macs"`` (default: merge only when it does not add MACs), ``"latency"`` (merge where
    the latency ``table`` says it pays: a :class:`tlc.measure.LatencyTable`, by default the current one of
    :mod:`tlc.surgery.pricing`), ``"always"`` (fewest layers) or ``"never"`` (fold batch norms and gates
    only); by default the policy recorded by ``linearize`` is used. ``model`` is not modified; the result
    is in eval mode. A latency plan records the table entries it read (``deployed.tlc_report.prices``);
    ``table=`` those entries rebuilds the same plan.

    The table prices single layers and misses what a whole model shares (caches, the runtime's per-graph
    work), so with ``clock_check`` a latency plan measured by a :class:`tlc.measure.LatencyTable` that differs
    from the ``"macs"`` plan is timed against it, side by side on the table's backend, batch size and threads,
    and the faster is kept (``deployed.tlc_report.clock``; a kept ``"macs"`` plan is recorded as such).

    The structure of the result depends on which per-channel parameters are exactly zero (removed
    channels, a constant branch that becomes a bias); the deploy form records them
    (``deployed.tlc_report.zeros``), and ``zeros=`` replays them, so that :func:`tlc.load` rebuilds the
    same layers from a freshly built model before loading the saved weights.
    """
    record = dict(getattr(model, "_tlc_record", {}) or {})
    asked, policy = policy, policy or record.get("policy") or "macs"
    graph = trace(model, example_inputs)
    if zeros is not None:
        try:
            assume_zeros(graph, zeros)
        except Infeasible as exc:
            raise MergeError(str(exc)) from exc
    zeros_used = value_zeros(graph)
    base = pricing.resolve(policy, table)
    pricing.measure_first(lambda prices: Planner(graph, policy, table=prices).plan(), base)
    prices = None if base is None else pricing.Recording(base)
    planner = Planner(graph, policy, table=prices)
    plan = planner.plan()
    if asked and zeros is None:
        _warn_if_planned_otherwise(planner, plan, record.get("policy"))
    deployed, report = realize(graph, plan, policy)
    if clock_check and isinstance(base, pricing.LatencyTable):
        deployed, report = _faster_on_the_clock(model, example_inputs, deployed, report, base, zeros_used)
        policy = report.policy
        prices = prices if policy == "latency" else None
    if verify:
        def merged_in_float64(model64: nn.Module, inputs64: ExampleInputs) -> nn.Module:
            return merge(model64, inputs64, policy=policy, verify=False, table=prices)

        report.max_relative_error = verify_merge(graph.source, deployed, example_inputs, tolerance,
                                                 merged_in_float64)
    record["policy"] = policy
    report.zeros = zeros_used
    report.prices = dict(prices.entries) if prices is not None else None
    report.plan_rule = prices.rule if prices is not None else None
    deployed._tlc_record = record
    deployed.tlc_report = report
    return deployed.eval()


def _faster_on_the_clock(model: nn.Module, example_inputs: ExampleInputs, deployed: fx.GraphModule,
                         report: MergeReport, table: pricing.LatencyTable,
                         zeros: Mapping[str, Mapping[str, list[int]]]) -> tuple[fx.GraphModule, MergeReport]:
    """The latency plan's deploy form, or the "macs" plan's where that one is faster on ``table``'s clock
    (median of interleaved rounds); the same layers are not timed."""
    from tlc.measure.compare import compare
    from tlc.measure.latency import rebatch

    by_macs = merge(model, example_inputs, policy="macs", verify=False, zeros=zeros)
    if _layers(by_macs.tlc_report) == _layers(report):
        return deployed, report
    row = compare(by_macs, deployed, rebatch(example_inputs, table.batch_size), batch_sizes=(table.batch_size,),
                  backends=(table.backend,), device=table.device, threads=table.threads, warmup=3, repeats=20,
                  labels=("macs", "latency")).rows[0]
    kept = "latency" if row["ratio"] >= 1.0 else "macs"
    clock = {"backend": table.backend, "batch_size": table.batch_size, "threads": table.threads, "kept": kept,
             **{key: row.get(key, row["ratio"]) for key in ("ratio", "ratio_q1", "ratio_q3")}}
    chosen, chosen_report = (deployed, report) if kept == "latency" else (by_macs, by_macs.tlc_report)
    chosen_report.clock = clock
    return chosen, chosen_report


def _layers(report: MergeReport) -> list[tuple]:
    """What a deploy form is built of, to tell two plans apart."""
    return sorted((tuple(r.replaces), r.layer, r.removed_channels) for r in report.records)


def _warn_if_planned_otherwise(planner: Planner, plan: Plan, planned_for: str | None) -> None:
    """Warn when ``linearize`` moved the padding for another policy than this merge's and this policy would
    merge more segments had the padding been moved for it (the merge stays exact, only less deep)."""
    from tlc.surgery.linearize import gate_nodes

    if not planned_for or planned_for == planner.policy:
        return
    gates = set(gate_nodes(planner.graph).values())
    if not gates:
        return
    relaxed_planner = Planner(planner.graph, planner.policy, movable=gates, table=planner.table)
    relaxed = relaxed_planner.plan()
    if relaxed_planner.total_cost(relaxed).weight_ops >= planner.total_cost(plan).weight_ops:
        return
    grouped = {member for group in plan.merged.values() for member in group.members}
    missed = [_layers_of(planner.graph, group.members) for group in relaxed.merged.values()
              if sum(planner.info[n].kind in (Kind.CONV, Kind.LINEAR) for n in group.members) > 1
              and not set(group.members) <= grouped]
    names = ", ".join(missed[:4]) + (f" and {len(missed) - 4} more" if len(missed) > 4 else "")
    warnings.warn(f"merge(policy={planner.policy!r}) of a model linearized for policy {planned_for!r}: its padding "
                  f"was moved for {planned_for!r}, so {len(missed)} segment(s) merge less than {planner.policy!r} "
                  f"could ({names}); linearize with policy={planner.policy!r} to merge them", stacklevel=3)


def _layers_of(graph: Graph, members: tuple[fx.Node, ...]) -> str:
    """``first..last`` weight layer of a group (by module or parameter owner)."""
    layers = [graph.info[n].owner or n.name for n in members if graph.info[n].kind in (Kind.CONV, Kind.LINEAR)]
    return f"{layers[0]}..{layers[-1]}"


def verify_merge(source: nn.Module, deployed: nn.Module, example_inputs: ExampleInputs, tolerance: float,
                 remerge: Callable[[nn.Module, ExampleInputs], nn.Module]) -> float:
    """Relative error of ``deployed`` against ``source`` on the example inputs; raises VerificationError
    when it exceeds ``tolerance``, or when ``source`` is so ill-conditioned in float32 that no merged
    model can be trusted to stay within ``tolerance`` of it on other inputs.

    The float32 rounding error of ``source`` (against float64) is its noise floor: a merged model computes
    the same function in another order, so on unseen inputs it differs by a few times that floor. When
    the check fails, ``remerge`` builds the deploy form of a float64 copy of ``source`` to tell
    ill-conditioning (the float64 merge is exact) from a bug.
    """
    reference = run(source, example_inputs)
    err = max_relative_error(reference, run(deployed, example_inputs))
    source64, inputs64 = _float64_copy(source), _float64_inputs(example_inputs)
    reference64 = None if source64 is None else _run_float64(source64, inputs64)
    floor = None if reference64 is None else max_relative_error(reference64, reference)
    if err <= tolerance and (floor is None or floor * NOISE_MARGIN <= tolerance):
        return err
    exact = None
    if reference64 is not None:
        try:
            exact = max_relative_error(reference64, _run_float64(remerge(source64, inputs64), inputs64))
        except TLCError:  # the float64 copy does not merge: no float64 figure to tell the causes apart
            exact = None
    if exact is None or exact > max(FLOAT64_EXACT, FLOAT64_NOISE_PER_FLOAT32 * (floor or 0.0)):
        raise VerificationError(
            f"the merged model differs from the input model: relative error {err:.3e} > {tolerance:.0e}"
            + ("" if exact is None else f" ({exact:.1e} when merged in float64)")
            + "; this is a bug in tlc's merge, please report it with the model")
    cause = (f"the input model's own float32 rounding error is {floor:.1e} (against float64)"
             if floor * NOISE_MARGIN > tolerance else "the merged layers lose precision in float32")
    raise VerificationError(
        f"the model is ill-conditioned in float32: merged in float64 it is exact ({exact:.1e}), but {cause} "
        f"and the float32 merge differs by {err:.1e} on the example inputs, more on others (tolerance "
        f"{tolerance:.0e}). Linearize fewer sites (products such as gates and attention amplify rounding), "
        "merge a float64 copy of the model, or pass a larger tolerance")


# On unseen inputs, merged models were measured up to ~3.5x the float32 noise floor of the input model.
NOISE_MARGIN = 10.0
# A float64 merge is exact up to float64 rounding, which the model amplifies as it does float32 rounding:
# float64 is 2**29 (5e8) times finer, so 2e-6 of the float32 floor leaves a factor of 1000.
FLOAT64_EXACT = 1e-9
FLOAT64_NOISE_PER_FLOAT32 = 2e-6


def _float64_copy(model: nn.Module) -> nn.Module | None:
    """A float64 copy of a float32 model, or None (not float32, or it cannot be copied)."""
    if not any(p.dtype == torch.float32 for p in model.parameters()):
        return None
    try:
        return copy.deepcopy(model).double()
    except Exception:  # noqa: BLE001 - no copy means no float64 reference, not an error
        return None


def _float64_inputs(example_inputs: ExampleInputs) -> ExampleInputs:
    return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                    example_inputs)


def _run_float64(model: nn.Module, inputs: ExampleInputs) -> Any:
    """The float64 output of ``model``, or None when it fails or is not float64 (float32 baked into a
    traced graph, say)."""
    try:
        out = run(model, inputs)
    except Exception:  # noqa: BLE001 - any failure means: no float64 reference
        return None
    outputs = output_tensors(out)
    return out if outputs and all(t.dtype == torch.float64 for t in outputs) else None


def realize(graph: Graph, plan: Plan, policy: str) -> tuple[fx.GraphModule, MergeReport]:
    """Build the deploy GraphModule described by ``plan``."""
    gm = graph.gm
    values = constant_values(graph, plan.constants) if plan.constants else {}
    maps = {exit_: exit_map(graph, g.entry, g.members, plan.constants, values) for exit_, g in plan.merged.items()}
    keep = {n: torch.tensor([c for c in range(maps[n].out_channels) if c not in zeros], dtype=torch.long)
            for n, zeros in plan.removed.items()}
    new_graph = fx.Graph()
    new_graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    report = MergeReport(policy)
    used_names: set[str] = set()

    def add_module(base: str, module: nn.Module) -> str:
        name = f"tlc_merged.{base}"
        k = 1
        while name in used_names:
            k += 1
            name = f"tlc_merged.{base}_{k}"
        used_names.add(name)
        gm.add_submodule(name, module)
        return name

    for n in gm.graph.nodes:
        info = graph.info[n]
        if n in plan.constants or n in plan.dead:  # not computed; a constant the deploy form reads is a tensor
            if n in plan.materialized:
                module = _constant_layer(graph, plan, n, values[n])
                name = add_module(n.name, module)
                env[n] = new_graph.call_module(name, (env[plan.materialized[n][0]],))
                report.records.append(MergeRecord(name, _replaced(graph, plan, (n,)), _layer_text(module), 0))
            continue
        if n in plan.merged:
            group = plan.merged[n]
            module = _build(graph, group, maps[n], keep.get(group.entry), keep.get(n))
            if module is None:
                env[n] = env[group.entry]
                continue
            name = add_module(n.name, module)
            env[n] = new_graph.call_module(name, (env[group.entry],))
            removed = maps[n].out_channels - len(keep[n]) if n in keep else 0
            report.records.append(MergeRecord(name, _replaced(graph, plan, group.members),
                                              _layer_text(module), maps[n].weight_ops, removed))
        elif n in plan.kept:
            if info.kind is Kind.IDENTITY:
                env[n] = env[info.input]
            elif info.kind in (Kind.CONV, Kind.LINEAR) and info.input in keep:
                module = _pruned_layer(info, keep[info.input])
                name = add_module(n.name, module)
                env[n] = new_graph.call_module(name, (env[info.input],))
                report.records.append(MergeRecord(name, [_describe(graph, n)], _layer_text(module), 1))
            else:
                env[n] = new_graph.node_copy(n, lambda a: env[a])
        elif n in _planned_linear(graph, plan):
            continue  # folded into a merged layer
        else:
            env[n] = new_graph.node_copy(n, lambda a: env[a])
    deployed = fx.GraphModule(gm, new_graph, class_name=f"Deployed{type(graph.source).__name__}")
    deployed.graph.eliminate_dead_code()
    deployed.delete_all_unused_submodules()
    deployed.recompile()
    return deployed, report


def _planned_linear(graph: Graph, plan: Plan) -> set[fx.Node]:
    cached = getattr(plan, "_members", None)
    if cached is None:
        cached = {m for g in plan.merged.values() for m in g.members}
        plan._members = cached  # type: ignore[attr-defined]
    return cached


def _replaced(graph: Graph, plan: Plan, nodes: tuple[fx.Node, ...]) -> list[str]:
    """What one layer of the deploy form replaces: ``nodes``, and the constants and dead operations behind
    them that it makes unnecessary (a constant read from its own tensor has its own record)."""
    found = set(nodes)
    stack = [i for n in nodes for i in graph.info[n].inputs]
    while stack:
        i = stack.pop()
        if i in found or i in plan.materialized or (i not in plan.constants and i not in plan.dead):
            continue
        found.add(i)
        stack.extend(graph.info[i].inputs)
    order = {n: k for k, n in enumerate(graph.nodes)}
    return [_describe(graph, n) for n in sorted(found, key=order.__getitem__)]


def _constant_layer(graph: Graph, plan: Plan, node: fx.Node, value: torch.Tensor) -> ChannelConstant:
    """The module that gives constant ``node`` its values and shape (from the tensor it is planned to read)."""
    source, steps = plan.materialized[node]
    constant = plan.constants[node]
    shape = graph.shape(source)
    planned = None if shape is None else constant_shape(tuple(shape), steps, constant.axis, constant.channels)
    if planned != list(graph.shape(node)):
        raise MergeError(f"cannot give the constant {node.name} its shape from {source.name}")
    like = next((p for p in graph.gm.parameters() if p.is_floating_point()), None)
    dtype, device = (like.dtype, like.device) if like is not None else (torch.float32, torch.device("cpu"))
    return ChannelConstant(value.to(dtype), constant.axis, steps).to(device)


def _describe(graph: Graph, node: fx.Node) -> str:
    info = graph.info[node]
    return f"{info.kind.value}({info.owner or node.name})"


def _layer_text(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}->{module.out_features})"
    if isinstance(module, ChannelConstant):
        return f"ChannelConstant({module.value.numel()})"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        k = "x".join(str(s) for s in module.kernel_size)
        g = f", groups={module.groups}" if module.groups > 1 else ""
        s = f", stride={module.stride[0]}" if any(x != 1 for x in module.stride) else ""
        return f"{type(module).__name__}({module.in_channels}->{module.out_channels}, {k}{s}{g})"
    return type(module).__name__


def _param_like(graph: Graph, group: MergeGroup) -> torch.Tensor | None:
    for n in group.members:
        info = graph.info[n]
        if info.kind in (Kind.CONV, Kind.LINEAR):
            return info.params["weight"]
    for n in group.members:
        t = graph.info[n].params.get("scale")
        if isinstance(t, torch.Tensor):
            return t
    return None


def _build(graph: Graph, group: MergeGroup, m: Map, keep_in: torch.Tensor | None,
           keep_out: torch.Tensor | None) -> nn.Module | None:
    """The module realizing map ``m`` (None for the identity), with pruned input/output channels."""
    if m.identity:
        return None
    like = _param_like(graph, group)
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    device = like.device if like is not None else torch.device("cpu")
    ndim = len(graph.shape(group.exit))
    channel_dim = 1 if m.kind == "conv" else -1
    weight, bias = m.weight, m.bias
    if m.weight_ops == 0 and m.diagonal:
        return ChannelAffine(weight.reshape(-1).to(dtype), bias.to(dtype), channel_dim, ndim).to(device)
    groups = m.groups
    if m.kind == "dense" and groups != 1:
        weight, groups = compose.regroup_conv_weight(weight, groups, 1), 1
    if keep_out is not None:
        weight, bias = weight[keep_out], bias[keep_out]
    if keep_in is not None and groups == 1:
        weight = weight[:, keep_in]
    bias = None if m.bias_zero else bias
    layer = make_layer(weight, bias, linear=m.kind == "dense", stride=m.stride, padding=m.padding,
                       dilation=m.dilation, groups=groups)
    return layer.to(device=device, dtype=dtype)


def _pruned_layer(info: Any, keep_in: torch.Tensor) -> nn.Module:
    """A kept conv/linear rebuilt without the input channels that are always zero."""
    p = info.params
    weight = p["weight"].detach()[:, keep_in]
    bias = p["bias"].detach() if p["bias"] is not None else None
    if info.kind is Kind.LINEAR:
        return make_layer(weight, bias, linear=True)
    return make_layer(weight, bias, stride=p["stride"], padding=p["padding"], dilation=p["dilation"])
