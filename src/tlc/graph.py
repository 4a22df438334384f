"""Trace a model into an inspectable graph of classified operations, and find its activation sites.

torch.fx is used where it traces the model (torchvision, timm, most user models); torch.export is the
fallback (Hugging Face transformers 5 has no fx tracer). Either way the result is an
``fx.GraphModule`` whose nodes are classified by :mod:`tlc.ops`, with the tensor shape of every node
recorded on the example inputs.

Not every activation is offered as a candidate (``Graph.sites``, :func:`find_sites`): ``Graph.excluded``
lists the others, each with its ``reason``. Two cases:

* unaddressable (``Site.addressable`` False): in a model only torch.export traces, tlc linearizes by
  replacing activation *modules*, so a functional activation or a module created inside ``forward``
  (DistilBERT's classifier ``nn.ReLU()``), or a module called several times, cannot be replaced. It is
  kept as it is (the rest of the model is compressed around it); asking for it by name raises a
  :class:`TraceError` saying why.
* gated (``Site.gated``): the activation's output only feeds products with another computed tensor, as
  the gate of a GLU-style MLP (Llama's ``down(silu(gate(x)) * up(x))``). Linearized, it leaves the
  product of two linear maps, which is not linear: nothing merges, so no saving is possible and it is
  not offered. It can still be linearized by name (the model stays correct and the merge keeps the
  product).
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from tlc._inputs import ExampleInputs, as_call, max_relative_error, output_tensors
from tlc.errors import TraceError, UnknownSiteError
from tlc.ops import LINEAR_KINDS, Kind, OpInfo, classify, export_equivalent, is_leaf_module, register_libraries
from tlc.sites import SiteActivation

TRACE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Site:
    """One call of a non-linear activation: the unit tlc linearizes.

    ``name`` is unique and stable for a given architecture: the activation module's path, with
    ``#k`` appended when that module is called more than once (torchvision ResNet's shared ``relu``);
    for functional activations, the enclosing module's path and the op.
    """

    name: str
    activation: str
    channels: int
    channel_dim: int
    shape: tuple[int, ...]
    node: str
    module: str | None
    call_index: int
    bn: str | None
    addressable: bool = True
    gated: bool = False
    reason: str = ""

    @property
    def offered(self) -> bool:
        """Whether tlc offers this site as a candidate (see the module docstring)."""
        return self.addressable and not self.gated

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Segment:
    """A maximal connected run of linear operations between non-linear ones (before any merge)."""

    index: int
    nodes: tuple[str, ...]
    kinds: tuple[str, ...]
    entries: tuple[str, ...]
    exits: tuple[str, ...]

    def __str__(self) -> str:
        ops = " ".join(self.kinds)
        return f"[{', '.join(self.entries)}] -> {ops} -> [{', '.join(self.exits)}]"


class Graph:
    """A traced model: its GraphModule, each node's :class:`OpInfo` and shape, its sites and segments."""

    def __init__(self, gm: fx.GraphModule, backend: str, source: nn.Module, example_inputs: ExampleInputs):
        self.gm = gm
        self.backend = backend
        self.source = source
        self.example_inputs = example_inputs
        self.info: dict[fx.Node, OpInfo] = {n: classify(n, gm) for n in gm.graph.nodes}
        self._check_inplace()
        self.all_sites: list[Site] = _find_sites(self)
        self.sites: list[Site] = [s for s in self.all_sites if s.offered]
        self.excluded: list[Site] = [s for s in self.all_sites if not s.offered]
        self.segments: list[Segment] = _find_segments(self)

    # ------------------------------------------------------------------ queries
    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.gm.graph.nodes)

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        return node.meta.get("tlc_shape")

    def kind(self, node: fx.Node) -> Kind:
        return self.info[node].kind

    @property
    def unaddressable(self) -> list[Site]:
        """Sites tlc cannot linearize in this model (kept as they are)."""
        return [s for s in self.all_sites if not s.addressable]

    def site(self, name: str) -> Site:
        """The site called ``name``: a candidate, or a gated site asked for explicitly; an unaddressable
        site raises :class:`TraceError` saying why, an unknown name :class:`UnknownSiteError`."""
        for s in self.all_sites:
            if s.name == name:
                if not s.addressable:
                    raise TraceError(f"cannot linearize site {name}: {s.reason}")
                return s
        raise UnknownSiteError(_unknown_site_message(name, [s.name for s in self.all_sites]))

    def site_node(self, site: Site) -> fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == site.node:
                return n
        raise KeyError(site.node)

    def producer_through_identity(self, node: fx.Node) -> fx.Node:
        """Skip identities (eval dropout, nn.Identity) backwards from ``node``."""
        while self.info[node].kind is Kind.IDENTITY and self.info[node].input is not None:
            node = self.info[node].input
        return node

    # ------------------------------------------------------------------ display
    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for info in self.info.values():
            counts[info.kind.value] = counts.get(info.kind.value, 0) + 1
        head = (f"Graph(backend={self.backend}, conv={counts.get('conv', 0)}, linear={counts.get('linear', 0)}, "
                f"bn={counts.get('bn', 0)}, sites={len(self.sites)}, segments={len(self.segments)})")
        lines = [head, "sites:"]
        width = max((len(s.name) for s in self.sites), default=4)
        for s in self.sites:
            bn = f"  after BN {s.bn}" if s.bn else ""
            lines.append(f"  {s.name:<{width}}  {s.activation:<10} {s.channels:>6} ch (dim {s.channel_dim}){bn}")
        if self.excluded:
            lines.append("not offered:")
            lines.extend(f"  {s.name}  {s.activation}: {s.reason}" for s in self.excluded)
        lines.append("segments:")
        for seg in self.segments:
            lines.append(f"  {seg.index:>3}: {seg}")
        return "\n".join(lines)

    __repr__ = __str__

    # ------------------------------------------------------------------ checks
    def _check_inplace(self) -> None:
        for node, info in self.info.items():
            if not info.inplace:
                continue
            mutated = info.input if info.kind is not Kind.ADD else info.inputs[0]
            if mutated is None or not isinstance(mutated, fx.Node):
                continue
            readers = [u for u in mutated.users if u is not node]
            if readers:
                where = module_path(node) or node.name
                raise TraceError(
                    f"in-place operation {node.target} at '{where}' overwrites a tensor that "
                    f"{len(readers)} other operation(s) also read ({', '.join(u.name for u in readers[:3])}); "
                    "tlc cannot analyse this safely - make that operation out-of-place"
                )


# ============================================================================ tracing


class _Tracer(fx.Tracer):
    """fx tracer that keeps tlc's registered modules (gates, stochastic depth, ...) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf_module(m) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, example_inputs: ExampleInputs, *, backend: str = "auto") -> Graph:
    """Trace ``model`` on ``example_inputs`` into a :class:`Graph` (the model itself is not modified).

    ``backend`` is ``"fx"``, ``"export"`` or ``"auto"`` (fx, then torch.export when fx fails or
    its graph does not reproduce the model's outputs).
    """
    if backend not in ("auto", "fx", "export"):
        raise ValueError(f"backend must be 'auto', 'fx' or 'export', not {backend!r}")
    register_libraries()
    source = copy.deepcopy(model).eval()
    _without_cache(source)
    args, kwargs = as_call(example_inputs)
    with torch.no_grad():
        reference = source(*args, **kwargs)
    errors: list[str] = []
    if isinstance(model, fx.GraphModule) and backend == "auto":
        return _graph_of_graph_module(source, args, kwargs, reference, example_inputs)
    if backend in ("auto", "fx"):
        try:
            gm = _fx_trace(source, args, kwargs)
            _check_reproduces(gm, args, kwargs, reference, "torch.fx")
            return Graph(gm, "fx", source, example_inputs)
        except TraceError:
            raise
        except Exception as exc:  # fx raises many exception types for untraceable code
            errors.append(f"torch.fx: {type(exc).__name__}: {_first_line(exc)}")
            if backend == "fx":
                raise TraceError(f"{type(model).__name__} cannot be traced by torch.fx: {errors[-1]}") from exc
    try:
        _use_equivalents(source)
        gm = _export(source, args, kwargs)
        _check_reproduces(gm, args, kwargs, reference, "torch.export")
    except TraceError:
        raise
    except Exception as exc:
        errors.append(f"torch.export: {type(exc).__name__}: {_first_line(exc)}")
        raise TraceError(f"{type(model).__name__} cannot be traced: " + "; ".join(errors)) from exc
    return Graph(gm, "export", source, example_inputs)


def _graph_of_graph_module(gm: fx.GraphModule, args: tuple, kwargs: dict, reference: Any,
                           example_inputs: ExampleInputs) -> Graph:
    """A model that is already a graph (a training or deploy form) is used as it is: tracing it again
    would lose what its nodes know (the module each ATen op of a torch.export graph came from)."""
    record_shapes(gm, args, kwargs)
    _check_reproduces(gm, args, kwargs, reference, "graph")
    aten = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    return Graph(gm, "export" if aten else "fx", gm, example_inputs)


def _without_cache(model: nn.Module) -> None:
    """Trace Hugging Face decoders without their key/value cache.

    With ``config.use_cache`` (the default of GPT-2, Llama, Qwen2, ...) the output holds a
    ``transformers.cache_utils.DynamicCache``, which torch.export cannot return (no pytree is registered
    for it): "Found <class 'transformers.cache_utils.DynamicCache'> in output, which is not a known type"
    (strict=False, the default), "Encountered unrecognized type UserDefinedObjectVariable(DynamicCache)"
    (strict=True), with sdpa and eager attention alike (torch 2.14, transformers 5.25). Without the cache
    both export; torch.fx fails on any transformers 5 model ("co_varnames is too small"). tlc compresses
    the forward pass, not generation: the traced copy, and so the deploy form, runs without a cache.
    """
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False


def _use_equivalents(model: nn.Module) -> None:
    """Replace, in place, the modules the op registry knows only as a whole by equivalent modules that
    torch.export keeps recognisable (it has no leaf modules), see :func:`tlc.ops.register_equivalent`.
    A module used at several paths is replaced by one module, so sharing is kept."""
    built: dict[int, nn.Module | None] = {}
    replaced: list[str] = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or any(name.startswith(prefix + ".") for prefix in replaced):
            continue
        if id(module) not in built:
            built[id(module)] = export_equivalent(module)
        if built[id(module)] is not None:
            model.set_submodule(name, built[id(module)])
            replaced.append(name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _fx_trace(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    record_shapes(gm, args, kwargs)
    fold_rank_queries(gm)
    return gm


def fold_rank_queries(gm: fx.GraphModule) -> None:
    """Replace ``x.ndim`` / ``x.dim()`` of traced tensors by the rank seen while tracing (as torch.export
    does). A rank check such as timm's ``torch._assert(x.ndim == 4)`` would otherwise be a second user of
    a conv's output and keep the batch norm after it from being folded."""
    changed = False
    for node in list(gm.graph.nodes):
        tensor = node.args[0] if node.args else None
        if not isinstance(tensor, fx.Node) or tensor.meta.get("tlc_shape") is None:
            continue
        is_ndim = node.op == "call_function" and node.target is getattr and node.args[1:] == ("ndim",)
        is_dim = node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1
        if is_ndim or is_dim:
            node.replace_all_uses_with(len(tensor.meta["tlc_shape"]))  # type: ignore[arg-type]
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()


def _export(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    from torch.export import Dim, export

    def auto(x: Any) -> Any:
        """Every dimension of token ids and masks is dynamic (batch and length); of floating inputs only
        the batch: dynamic image sizes make torch.export's shape reasoning explode on "same" padding.
        Dimensions of size 1 stay static: torch.export specializes them anyway, with a warning."""
        if not isinstance(x, torch.Tensor):
            return None
        dims = range(x.dim()) if not x.is_floating_point() else range(min(x.dim(), 1))
        return {i: Dim.AUTO for i in dims if x.shape[i] > 1}

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    dynamic = {name: tree_map(auto, value) for name, value in bound.arguments.items()}
    try:
        program = export(model, args, kwargs, dynamic_shapes=dynamic)
    except Exception:
        program = export(model, args, kwargs)
    gm = program.module()
    record_shapes(gm, args, kwargs)
    return gm


def _check_reproduces(gm: fx.GraphModule, args: tuple, kwargs: dict, reference: Any, how: str) -> None:
    with torch.no_grad():
        out = gm(*args, **kwargs)
    if not output_tensors(reference):
        raise TraceError("the model returns no floating-point tensor; nothing to compare against")
    err = max_relative_error(reference, out)
    if err > TRACE_TOLERANCE:
        raise RuntimeError(f"the {how} graph does not reproduce the model (relative error {err:.2e})")


def placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """Flat list of values for ``gm``'s placeholders, in order, from a call's args and kwargs."""
    codegen = gm.graph._codegen
    if hasattr(codegen, "pytree_info") and codegen.pytree_info is not None:
        from torch.fx._pytree import tree_flatten_spec

        in_spec = codegen.pytree_info.in_spec
        if in_spec is not None:
            bound = inspect.signature(gm.forward).bind(*args, **kwargs)
            call_args = tuple(bound.args)
            call_kwargs = dict(bound.kwargs)
            try:
                return list(tree_flatten_spec((call_args, call_kwargs), in_spec))
            except Exception:
                return list(tree_flatten_spec((args, kwargs), in_spec))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values: list[Any] = []
    remaining = dict(kwargs)
    for i, node in enumerate(placeholders):
        if i < len(args):
            values.append(args[i])
        elif node.target in remaining:
            values.append(remaining.pop(node.target))
        elif node.args:
            values.append(node.args[0])
        else:
            raise TraceError(f"no value given for the model input '{node.target}'")
    return values


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["tlc_shape"] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        n.meta["tlc_dtype"] = out.dtype if isinstance(out, torch.Tensor) else None
        return out


def record_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Run ``gm`` once on the inputs and store every node's output shape in ``node.meta['tlc_shape']``."""
    values = placeholder_values(gm, args, kwargs)
    with torch.no_grad():
        _ShapeRecorder(gm).run(*values)


# ============================================================================ sites


def module_path(node: fx.Node) -> str | None:
    """Path of the innermost module a node was traced in (None at the top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    for prefix in ("L__self__.", "L['self']."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path.replace("L__self___", "")


def _innermost_module_type(node: fx.Node) -> type | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    value = list(stack.values())[-1][1]
    return value if isinstance(value, type) else None


def _is_activation_module_type(cls: type | str | None) -> bool:
    if cls is None:
        return False
    name = cls if isinstance(cls, str) else cls.__name__
    lowered = name.lower()
    return any(key in lowered for key in ("relu", "gelu", "silu", "swish", "mish", "hardswish", "activation", "elu"))


def _functional_site_name(node: fx.Node, graph: Graph) -> str:
    """The enclosing activation module's path (torch.export graphs), else that module's path and the op."""
    path = module_path(node)
    if not path:
        return node.name
    cls = _innermost_module_type(node)
    type_name = cls if cls is not None else list(node.meta["nn_module_stack"].values())[-1][1]
    return path if _is_activation_module_type(type_name) else f"{path}.{graph.info[node].activation}"


def channel_dim_of(graph: Graph, node: fx.Node) -> int:
    """Channel dimension of the tensor ``node`` produces: 1 for conv feature maps, -1 for tokens."""
    shape = graph.shape(node) or ()
    seen: set[fx.Node] = set()
    frontier = [node]
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        kind = graph.info[n].kind
        if kind is Kind.CONV:
            return 1
        if kind is Kind.BN:
            return 1
        if kind is Kind.LINEAR:
            return -1 if len(shape) > 2 else 1
        if kind is Kind.SCALE:
            return graph.info[n].params["channel_dim"]
        if kind in (Kind.IDENTITY, Kind.ADD):
            frontier.extend(graph.info[n].inputs)
    if len(shape) == 3:
        return -1
    return 1


def _site_names(graph: Graph, site_nodes: list[fx.Node]) -> list[tuple[str, str | None, int]]:
    """(name, module path, call index) per site node.

    Sites already wrapped by tlc (``SiteActivation``) keep the name they were given; others are named
    by module path (``#k`` when the module is called several times) or by enclosing module and op.
    """
    bases: list[tuple[str | None, str | None]] = []
    for n in site_nodes:
        module = graph.gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(module, SiteActivation):
            bases.append((None, None))
        elif n.op == "call_module":
            bases.append((str(n.target), str(n.target)))
        else:
            name = _functional_site_name(n, graph)
            bases.append((name, name if name == module_path(n) else None))
    totals: dict[str, int] = {}
    for base, _ in bases:
        if base is not None:
            totals[base] = totals.get(base, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for (base, module), node in zip(bases, site_nodes):
        if base is None:
            wrapper = graph.gm.get_submodule(node.target)
            call = int(wrapper.site.rsplit("#", 1)[1]) if "#" in wrapper.site else 0
            names.append((wrapper.site, wrapper.origin, call))
            continue
        k = seen.get(base, 0)
        seen[base] = k + 1
        names.append((base if totals[base] == 1 else f"{base}#{k}", module, k))
    return names


def _find_sites(graph: Graph) -> list[Site]:
    site_nodes = [n for n in graph.gm.graph.nodes if graph.info[n].kind is Kind.SITE]
    sites = []
    for node, (name, module, k) in zip(site_nodes, _site_names(graph, site_nodes)):
        x = graph.info[node].input
        shape = graph.shape(x) or ()
        dim = channel_dim_of(graph, x)
        producer = graph.producer_through_identity(x)
        bn = graph.info[producer].owner if graph.info[producer].kind is Kind.BN else None
        unaddressable = _unaddressable_reason(graph, name, module)
        gated = _is_gated(graph, node)
        reasons = [unaddressable] + ([_GATED_REASON] if gated else [])
        sites.append(Site(
            name=name,
            activation=graph.info[node].activation or "unknown",
            channels=int(shape[dim]) if shape else 0,
            channel_dim=dim,
            shape=tuple(shape),
            node=node.name,
            module=module,
            call_index=k,
            bn=bn,
            addressable=not unaddressable,
            gated=gated,
            reason="; ".join(r for r in reasons if r),
        ))
    return sites


_GATED_REASON = ("its output only feeds products with another computed tensor (a gated, GLU-style MLP): "
                 "linearized, it leaves a product of two linear maps, which is not linear, so nothing would merge")
_PRODUCTS = frozenset({operator.mul, torch.mul, torch.ops.aten.mul.Tensor})


def _unaddressable_reason(graph: Graph, name: str, module: str | None) -> str:
    """Why linearize cannot replace this site ("" when it can). In a model only torch.export traces, the
    training form is the model's own class with activation *modules* replaced (see
    :func:`tlc.surgery.linearize.linearize`); an fx graph or a graph module is edited node by node."""
    if graph.backend != "export" or isinstance(graph.source, fx.GraphModule):
        return ""
    if module is None:
        where = name.rpartition(".")[0] or type(graph.source).__name__
        return (f"it (in the forward of {where}) is a functional activation, or an activation module created "
                "inside forward, in a model only torch.export traces; tlc can only replace activation modules that "
                "are attributes of the model there, so it is kept as it is")
    if "#" in name:
        return (f"module '{module}' is called several times in a model only torch.export traces; replacing it "
                "would change every call, so it is kept as it is (give each call its own activation module)")
    return ""


def _is_gated(graph: Graph, node: fx.Node) -> bool:
    """Whether the site's output (through identities) feeds only products with another computed tensor."""
    users, frontier = [], list(node.users)
    while frontier:
        user = frontier.pop()
        if graph.info[user].kind is Kind.IDENTITY:
            frontier.extend(user.users)
        else:
            users.append(user)
    return bool(users) and all(_is_product(graph, u) for u in users)


def _is_product(graph: Graph, node: fx.Node) -> bool:
    """An elementwise product of two computed tensors (a product with a constant is a SCALE, not this)."""
    if graph.info[node].kind is not Kind.OTHER or len(node.args) != 2 or node.kwargs:
        return False
    is_mul = (node.op == "call_function" and node.target in _PRODUCTS) or (node.op == "call_method"
                                                                          and node.target == "mul")
    return is_mul and all(isinstance(a, fx.Node) and a.op != "get_attr" and a.meta.get("tlc_shape") is not None
                          for a in node.args)


def _unknown_site_message(name: str, names: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; the model has {len(names)} sites"
    return f"no activation site named '{name}'{hint}"


def resolve_sites(graph: Graph, sites: Iterable[Site | str]) -> list[Site]:
    """Turn Site objects or names into the graph's Site objects (raises KeyError naming unknown ones)."""
    resolved = []
    for s in sites:
        name = s.name if isinstance(s, Site) else str(s)
        resolved.append(graph.site(name))
    names = [s.name for s in resolved]
    if len(set(names)) != len(names):
        raise ValueError("a site is listed twice")
    return resolved


def find_sites(model: nn.Module, example_inputs: ExampleInputs) -> list[Site]:
    """The activation sites of ``model`` that tlc offers as candidates, in execution order (the others,
    with why, are in ``trace(model, example_inputs).excluded``)."""
    return trace(model, example_inputs).sites


# ============================================================================ segments


def _find_segments(graph: Graph) -> list[Segment]:
    linear = [n for n in graph.gm.graph.nodes if graph.info[n].kind in LINEAR_KINDS]
    linear_set = set(linear)
    parent: dict[fx.Node, fx.Node] = {n: n for n in linear}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in linear:
        for i in graph.info[n].inputs:
            if i in linear_set:
                parent[find(i)] = find(n)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in linear:
        groups.setdefault(find(n), []).append(n)
    segments = []
    for members in groups.values():
        member_set = set(members)
        if all(graph.info[n].kind is Kind.IDENTITY for n in members):
            continue
        entries = sorted({i.name for n in members for i in graph.info[n].inputs if i not in member_set})
        exits = sorted({n.name for n in members if any(u not in member_set for u in n.users)})
        segments.append(Segment(
            index=len(segments),
            nodes=tuple(n.name for n in members),
            kinds=tuple(_describe(graph, n) for n in members),
            entries=tuple(entries),
            exits=tuple(exits),
        ))
    return segments


def _describe(graph: Graph, node: fx.Node) -> str:
    info = graph.info[node]
    label = info.owner or node.name
    return f"{info.kind.value}({label})"
