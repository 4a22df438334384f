"""Blocks the identity can replace, found in a traced graph: LaCoOT's candidates (docs/methods.md).

A *call* is one call of a submodule during the trace: the nodes whose ``nn_module_stack`` holds it. A call
is a :class:`Block` when it reads one tensor and hands one tensor on, of the same shape and dtype, and
holds at least one convolution or linear layer; then replacing the submodule by ``nn.Identity`` leaves a
well-formed network. Two kinds:

- a *residual block*: the call holds an add one of whose operands is the call's own input (through
  identities): torchvision's BasicBlock, a MobileNetV2 InvertedResidual with ``use_res_connect``, a Swin
  or ViT block, a user's residual module. Only the innermost: a stage (a Sequential of residual blocks)
  reads like one too, but its blocks are the candidates.
- a *plain unit*: any other same-shape call, outside every call with an add of its own (residual blocks,
  downsampling ones included) and neither the branch of a residual add nor in one (the identity there
  would double the signal instead of removing the layer): MobileNetV2's stride-1 depthwise unit in a
  block without a shortcut, a user's conv-BN-ReLU 64->64. The outermost one (the unit, not its conv).

A module called more than once (shared) is never a block: the identity would replace every call.

``placement="paper"`` is where the published code of LaCoOT measures and removes (docs/methods.md):
the depthwise unit of each inverted residual (MobileNetV2), in place of the block around it; a
single-add residual block only where its input is the output of a block of the same type (ResNet-18:
the second BasicBlock of each stage); a block with two or more residual adds (a Swin transformer
block) measured between its input and the output of its last residual branch (the MLP).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from tlc._inputs import ExampleInputs, as_call, run
from tlc.errors import SpecError, TLCError
from tlc.graph import Graph, _clean_path, record_shapes
from tlc.ops import Kind
from tlc.sites import SiteActivation, SiteGate

PLACEMENTS = ("auto", "paper")
WEIGHTED = (Kind.CONV, Kind.LINEAR)


@dataclass(frozen=True)
class Block:
    """A submodule call the identity can replace.

    ``path`` is the submodule (what :class:`tlc.edits.ReplaceByIdentity` swaps); ``input_node`` and
    ``output_node`` name the graph nodes of its input and output; ``measured`` (a submodule, the block
    itself by default) is whose output the distance compares with the input, at ``measured_node``."""

    path: str
    type_name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    residual: bool
    input_node: str
    output_node: str
    measured: str
    measured_node: str

    def __str__(self) -> str:
        return self.path


@dataclass
class _Call:
    """One submodule call of the trace: its path, type and nodes (graph order)."""

    path: str
    type_name: str
    nodes: list[fx.Node]
    inputs: list[fx.Node] | None = None
    outputs: list[fx.Node] | None = None

    def inside(self, other: _Call) -> bool:
        return self.path.startswith(other.path + ".")


def call_stack(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, str, str]]:
    """(call key, module path, type name) of each submodule call ``node`` was traced in, outermost first.

    From the node's ``nn_module_stack``; a site wrapped by :func:`tlc.linearize` (a call of a
    ``SiteActivation`` / ``SiteGate`` the graph gained without that record) is placed by the module its
    site came from, the site name (``#k``: the k-th call of a shared module) serving as its call key (the
    modules around it get no key: they are told apart by their other nodes)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return [(str(key), _clean_path(str(value[0])), getattr(value[1], "__name__", str(value[1])).rsplit(".", 1)[-1])
                for key, value in stack.items()]
    if node.op != "call_module":
        return []
    module = gm.get_submodule(str(node.target))
    if not isinstance(module, SiteActivation | SiteGate):
        return []
    site = str(module.site)
    path = getattr(module, "origin", None) or site.split("#")[0]
    parts = path.split(".")
    outer = [("", p, "") for p in (".".join(parts[:i]) for i in range(1, len(parts)))]
    return [*outer, (site, path, type(module).__name__)]


def module_calls(graph: Graph) -> list[_Call]:
    """Every submodule called exactly once in the trace (not the model itself), in graph order, with the
    tensors it reads from outside and the nodes whose values leave it."""
    return calls_of(graph.gm, graph.nodes)


def calls_of(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[_Call]:
    """:func:`module_calls` of the graph module ``gm`` (``nodes``: its nodes in order)."""
    calls: dict[str, _Call] = {}
    keys: dict[str, set[str]] = {}
    for node in nodes:
        for key, path, type_name in call_stack(gm, node):
            if not path:
                continue
            keys.setdefault(path, set()).update([key] if key else [])
            call = calls.setdefault(path, _Call(path, type_name, []))
            call.type_name = call.type_name or type_name
            call.nodes.append(node)
    found = []
    for path, call in calls.items():
        if len(keys[path]) > 1:
            continue
        members = set(call.nodes)
        call.inputs = list(dict.fromkeys(a for n in call.nodes for a in n.all_input_nodes
                                         if a not in members and a.op != "get_attr"))
        call.outputs = [n for n in call.nodes if any(u not in members for u in n.users)]
        found.append(call)
    return found


def _through_identity(graph: Graph, node: fx.Node) -> fx.Node:
    return graph.producer_through_identity(node)


def _same_shape(graph: Graph, call: _Call) -> bool:
    if len(call.inputs or []) != 1 or len(call.outputs or []) != 1:
        return False
    x, y = call.inputs[0], call.outputs[0]
    shape = graph.shape(x)
    return shape is not None and shape == graph.shape(y) and x.meta.get("tlc_dtype") == y.meta.get("tlc_dtype")


def _weighted(graph: Graph, call: _Call) -> list[fx.Node]:
    return [n for n in call.nodes if graph.kind(n) in WEIGHTED]


def _residual_adds(graph: Graph, call: _Call) -> list[fx.Node]:
    """The adds of the call's own code (not of a submodule) that take part in a residual chain from its
    input: an operand is the input or an earlier such add (through identities)."""
    own = [n for n in call.nodes if graph.kind(n) is Kind.ADD and _innermost(graph, n) == call.path]
    chain: list[fx.Node] = []
    sources = {call.inputs[0]} if call.inputs else set()
    for add in own:
        if any(_through_identity(graph, a) in sources for a in graph.info[add].inputs):
            chain.append(add)
            sources.add(add)
    return chain


def _innermost(graph: Graph, node: fx.Node) -> str | None:
    stack = call_stack(graph.gm, node)
    return stack[-1][1] if stack else None


def _holds_residual_add(graph: Graph, call: _Call) -> bool:
    """Whether any add in the call (a submodule's included) has the call's input as an operand."""
    x = call.inputs[0]
    return any(graph.kind(n) is Kind.ADD and any(_through_identity(graph, a) is x for a in graph.info[n].inputs)
               for n in call.nodes)


def _is_branch(graph: Graph, call: _Call) -> bool:
    """Whether the call's output is added (through identities) to the call's own input: a residual branch."""
    x, frontier = call.inputs[0], [call.outputs[0]]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            kind = graph.kind(user)
            if kind is Kind.IDENTITY:
                frontier.append(user)
            elif kind is Kind.ADD and any(_through_identity(graph, a) is x for a in graph.info[user].inputs
                                          if a is not node):
                return True
    return False


def _block(call: _Call, graph: Graph, residual: bool, measured: _Call | None = None) -> Block:
    target = measured or call
    return Block(call.path, call.type_name, tuple(graph.shape(call.inputs[0])), tuple(graph.shape(call.outputs[0])),
                 residual, call.inputs[0].name, call.outputs[0].name, target.path, target.outputs[0].name)


def _outermost(calls: list[_Call]) -> list[_Call]:
    return [c for c in calls if not any(c.inside(o) for o in calls if o is not c)]


def _innermost_calls(calls: list[_Call]) -> list[_Call]:
    return [c for c in calls if not any(o.inside(c) for o in calls if o is not c)]


def candidate_blocks(graph: Graph, placement: str = "auto") -> list[Block]:
    """The blocks of ``graph`` the identity can replace, in graph order (module docstring): residual blocks
    and plain same-shape units (``"auto"``), or where the published code of LaCoOT puts them (``"paper"``)."""
    if placement not in PLACEMENTS:
        raise SpecError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    every = module_calls(graph)
    calls = [c for c in every if _same_shape(graph, c) and _weighted(graph, c)]
    residual = _innermost_calls([c for c in calls if _holds_residual_add(graph, c)])
    residual = [c for c in residual if _residual_adds(graph, c)]
    with_adds = [c for c in every if any(graph.kind(n) is Kind.ADD and _innermost(graph, n) == c.path for n in c.nodes)]
    branches = [c for c in calls if _is_branch(graph, c)]
    plain = [c for c in calls if c not in residual and c not in branches and not any(r.inside(c) for r in residual)
             and not any(c.inside(o) for o in [*with_adds, *branches])]
    if placement == "auto":
        chosen = [_block(c, graph, True) for c in residual] + [_block(c, graph, False) for c in _outermost(plain)]
    else:
        chosen = _paper_blocks(graph, every, calls, residual)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    return sorted(chosen, key=lambda b: order[b.input_node])


def _paper_blocks(graph: Graph, every: list[_Call], calls: list[_Call], residual: list[_Call]) -> list[Block]:
    """LaCoOT's published placement: depthwise units; residual blocks after a block of their type; transformer
    blocks measured at their last branch."""
    depthwise = _outermost([c for c in calls if c not in residual and not _is_branch(graph, c)
                            and _is_depthwise_unit(graph, c)])
    blocks = [_block(c, graph, False) for c in depthwise]
    made_by: dict[fx.Node, set[str]] = {}
    for call in every:
        if len(call.outputs or []) == 1:
            made_by.setdefault(call.outputs[0], set()).add(call.type_name)
    for call in residual:
        if any(d.inside(call) for d in depthwise):
            continue
        adds = _residual_adds(graph, call)
        if len(adds) >= 2:
            blocks.append(_block(call, graph, True, _last_branch(graph, every, call, adds[-1])))
        elif call.type_name in made_by.get(call.inputs[0], set()):
            blocks.append(_block(call, graph, True))
    return blocks


def _is_depthwise_unit(graph: Graph, call: _Call) -> bool:
    """One convolution in the call, depthwise (a filter per channel, channels kept)."""
    weighted = _weighted(graph, call)
    if len(weighted) != 1 or graph.kind(weighted[0]) is not Kind.CONV:
        return False
    params: dict[str, Any] = graph.info[weighted[0]].params
    weight, groups = params.get("weight"), params.get("groups", 1)
    return weight is not None and groups > 1 and weight.shape[0] == groups and weight.shape[1] == 1


def _last_branch(graph: Graph, every: list[_Call], call: _Call, add: fx.Node) -> _Call | None:
    """The outermost submodule of ``call`` holding a weighted layer whose output is the branch operand of
    ``add`` (through identities: stochastic depth, dropout); None when there is none."""
    chain_operands = {call.inputs[0]} | {n for n in call.nodes if graph.kind(n) is Kind.ADD}
    branch = [a for a in graph.info[add].inputs if _through_identity(graph, a) not in chain_operands]
    if len(branch) != 1:
        return None
    reach, node = [branch[0]], branch[0]
    while graph.kind(node) is Kind.IDENTITY and graph.info[node].input is not None:
        node = graph.info[node].input
        reach.append(node)
    inner = [c for c in every if c.inside(call) and c.outputs and len(c.outputs) == 1
             and c.outputs[0] in reach and _weighted(graph, c)]
    return min(inner, key=lambda c: c.path.count(".")) if inner else None


def unreplaceable(model: nn.Module, paths: Sequence[str], example_inputs: ExampleInputs) -> dict[str, str]:
    """Why the identity cannot stand in for each submodule of ``paths`` that it cannot stand in for (the
    others are left out), from one run of ``model`` on ``example_inputs`` (eval, no grad): each call must
    take one tensor, positionally, and return one tensor of its shape. A traced graph does not show what
    a module returns (a Hugging Face layer returns a tuple the caller indexes), so this is checked on the
    module itself."""
    seen: dict[str, list[str]] = {path: [] for path in paths}

    def check(path: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if len(args) == 1 else None
            if not isinstance(x, torch.Tensor) or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
                seen[path].append("it is not called with one tensor alone")
            elif not isinstance(output, torch.Tensor):
                seen[path].append(f"it returns a {type(output).__name__}, not a tensor")
            elif output.shape != x.shape:
                seen[path].append(f"it maps {tuple(x.shape)} to {tuple(output.shape)}")
            else:
                seen[path].append("")
        return hook

    handles = [model.get_submodule(path).register_forward_hook(check(path), with_kwargs=True) for path in paths]
    try:
        with torch.no_grad(), _eval(model):
            run(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    reasons = {path: next((r for r in calls if r), "" if calls else "it is not called") for path, calls in seen.items()}
    return {path: reason for path, reason in reasons.items() if reason}


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def remove_call(gm: fx.GraphModule, path: str, example_inputs: ExampleInputs) -> fx.GraphModule:
    """A copy of ``gm`` where the call of submodule ``path`` is the identity: the nodes it traced to are
    removed and what read its output reads its input (``gm`` untouched; :class:`tlc.edits.ReplaceByIdentity`
    on a graph module). Refused with a :class:`TLCError` naming the module where no node of ``gm`` comes
    from it, where it is called more than once, or where it does not read one tensor and hand on one of
    the same shape."""
    form = copy.deepcopy(gm)
    args, kwargs = as_call(example_inputs)
    record_shapes(form, args, kwargs)
    nodes = list(form.graph.nodes)
    call = next((c for c in calls_of(form, nodes) if c.path == path), None)
    where = f"cannot replace '{path}' by the identity in this graph module"
    if call is None:
        called = any(p == path for n in nodes for _, p, _ in call_stack(form, n))
        raise TLCError(f"{where}: " + ("it is called more than once" if called else
                                       "no node of the graph comes from it (not called, or its trace record is lost)"))
    x, y = (call.inputs or [None])[0], (call.outputs or [None])[0]
    if len(call.inputs or []) != 1 or len(call.outputs or []) != 1 or x.meta.get("tlc_shape") is None \
            or x.meta.get("tlc_shape") != y.meta.get("tlc_shape"):
        shapes = [n.meta.get("tlc_shape") for n in (*(call.inputs or []), *(call.outputs or []))]
        raise TLCError(f"{where}: it reads {len(call.inputs or [])} tensor(s) and hands on {len(call.outputs or [])} "
                       f"value(s) (shapes {shapes}); the identity needs one tensor in and one of the same shape out")
    members = set(call.nodes)
    y.replace_all_uses_with(x, delete_user_cb=lambda user: user not in members)
    for node in reversed(call.nodes):  # users before what they read
        form.graph.erase_node(node)
    for node in list(form.graph.nodes):
        if node.op == "get_attr" and not node.users:
            form.graph.erase_node(node)
    form.graph.lint()
    form.delete_all_unused_submodules()
    form.recompile()
    if hasattr(gm, "_tlc_record"):
        form._tlc_record = copy.deepcopy(gm._tlc_record)
    return form.train(gm.training)


__all__ = ["PLACEMENTS", "Block", "call_stack", "calls_of", "candidate_blocks", "module_calls", "remove_call",
           "unreplaceable"]
