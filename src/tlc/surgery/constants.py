"""Per-channel constants: tensors that do not depend on the model's input, and the layers they make dead.

A linearized site whose channels are all off outputs 0 whatever its input. What follows it stays a
*per-channel constant* (one value per channel, the same at every position) through batch norms, gates,
sums of constants, elementwise activations (``act(c)`` is a constant) and convolutions that see no
padding (a 1x1 conv, a linear layer) or whose input is 0 everywhere (the padding is then the value
itself). A convolution that zero-pads a non-zero constant is *not* constant: its border positions see 0,
not the constant. The constant stops there.

The merge computes no constant: a residual sum adds it to the other term's bias (see
:func:`tlc.surgery.affine.add`), anything else reads it from a :class:`ChannelConstant` that broadcasts
its values to the tensor's shape. The layers that only feed constants are *dead*: the deploy form drops
them.

Which tensors are constant, and which of their channels are 0, follows from the architecture and the zero
channels of per-channel parameters (batch norm scale and shift, gates), which a deploy form records
(:func:`tlc.surgery.plan.value_zeros`), never from other values: :func:`tlc.load` then rebuilds the same
structure from a freshly built model. So an activation's output is known to be 0 only where its input
is 0 everywhere and ``act(0) == 0``, and a convolution's output only where it has no bias and its input
is 0 (depthwise: channel by channel).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import fx, nn

from tlc.graph import Graph
from tlc.ops import LINEAR_KINDS, Kind, OpInfo, register_module

ZerosOf = Callable[[OpInfo, str], frozenset[int]]
Step = tuple  # ("conv", out_channels, kernel, stride, padding, dilation) or ("linear", out_features)


@dataclass(frozen=True)
class Constant:
    """A tensor equal to one value per index of dimension ``axis`` (its channels), whatever the input."""

    axis: int
    channels: int
    zeros: frozenset[int]  # channels that are exactly 0

    @property
    def is_zero(self) -> bool:
        return len(self.zeros) == self.channels

    def along(self, axis: int, channels: int) -> Constant | None:
        """The same tensor seen as a constant along ``axis`` (possible when it is 0 everywhere)."""
        if axis == self.axis:
            return self
        return Constant(axis, channels, frozenset(range(channels))) if self.is_zero else None


def find_constants(graph: Graph, linear: set[fx.Node], zeros_of: ZerosOf,
                   barriers: set[fx.Node] = frozenset()) -> dict[fx.Node, Constant]:
    """Every per-channel constant tensor of ``graph``, in topological order. ``linear`` are the operations
    the merge may fold, ``zeros_of(info, key)`` the (recorded) zero channels of a per-channel parameter;
    a barrier stands for an activation whose function is not known (its output's zeros are not either)."""
    found: dict[fx.Node, Constant] = {}
    for node in graph.nodes:
        constant = _constant_of(graph, node, found, linear, zeros_of, barriers)
        if constant is not None:
            found[node] = constant
    return found


def _constant_of(graph: Graph, node: fx.Node, found: dict[fx.Node, Constant], linear: set[fx.Node],
                 zeros_of: ZerosOf, barriers: set[fx.Node]) -> Constant | None:
    info = graph.info[node]
    shape = graph.shape(node)
    if shape is None or len(shape) < 2 or not info.inputs:
        return None
    first = found.get(info.inputs[0])
    if node in barriers or info.kind is Kind.SITE:
        if first is None or not (node in barriers or elementwise(graph, node)):
            return None
        known = first.is_zero and node not in barriers and _zero_at_zero(graph, node, len(shape))
        return Constant(first.axis, first.channels, first.zeros if known else frozenset())
    if node not in linear:
        return None
    if info.kind is Kind.IDENTITY:
        return first
    if info.kind is Kind.ADD:
        a, b = (found.get(i) for i in info.inputs)
        if a is None or b is None:
            return None
        if a.axis != b.axis:  # 0 everywhere is a constant along any axis
            return b if a.is_zero else a if b.is_zero else None
        return Constant(a.axis, a.channels, a.zeros & b.zeros)
    if info.kind in (Kind.BN, Kind.SCALE):
        return _through_affine(info, first, shape, zeros_of)
    if info.kind in (Kind.CONV, Kind.LINEAR) and first is not None:
        return _through_layer(info, first, len(shape))
    return None


def _through_affine(info: OpInfo, first: Constant | None, shape: tuple[int, ...],
                    zeros_of: ZerosOf) -> Constant | None:
    """``scale * x (+ shift)`` per channel: constant when x is, or when every scale is 0."""
    axis = info.params["channel_dim"] % len(shape)
    channels = shape[axis]
    scale_zeros = zeros_of(info, "scale")
    if info.params["scale"].numel() != channels:
        return None
    if first is None:
        if len(scale_zeros) < channels:
            return None
        zeros = frozenset(range(channels))
    else:
        first = first.along(axis, channels)
        if first is None:
            return None
        zeros = first.zeros | scale_zeros
    if info.kind is Kind.BN:
        zeros = zeros & zeros_of(info, "shift")
    return Constant(axis, channels, zeros)


def _through_layer(info: OpInfo, first: Constant, ndim: int) -> Constant | None:
    """A conv or linear layer of a constant: constant unless it zero-pads a non-zero constant."""
    p = info.params
    axis = 1 if info.kind is Kind.CONV else ndim - 1
    out, groups = p["weight"].shape[0], p.get("groups", 1)
    first = first.along(axis, p["weight"].shape[1] * groups)
    if first is None or (info.kind is Kind.CONV and any(p["padding"]) and not first.is_zero):
        return None  # zero padding of a non-zero constant: the borders differ
    if p["bias"] is not None:
        zeros = frozenset()
    elif first.is_zero:
        zeros = frozenset(range(out))
    else:  # depthwise: channel by channel
        zeros = first.zeros if groups == out == first.channels else frozenset()
    return Constant(axis, out, zeros)


def elementwise(graph: Graph, node: fx.Node) -> bool:
    """Whether an activation node computes ``act(x)`` element by element from its input alone, with no
    parameter (its value on a constant is then decided by the architecture)."""
    info = graph.info[node]
    if info.activation == "prelu" or any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        return False
    if node.op == "call_module":
        module = graph.gm.get_submodule(node.target)
        return not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())
    return node.op in ("call_function", "call_method")


def apply_activation(graph: Graph, node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """What an (elementwise) activation node computes on ``x``."""
    if node.op == "call_module":
        return graph.gm.get_submodule(node.target)(x)
    if node.op == "call_method":
        return getattr(x, node.target)(*node.args[1:], **node.kwargs)
    if node.args:
        return node.target(x, *node.args[1:], **node.kwargs)
    key = "input" if "input" in node.kwargs else "self"
    return node.target(**{**node.kwargs, key: x})


def _zero_at_zero(graph: Graph, node: fx.Node, ndim: int) -> bool:
    return bool((apply_activation(graph, node, torch.zeros((1,) * ndim)) == 0).all())


def dead_nodes(graph: Graph, constants: Mapping[fx.Node, Constant]) -> set[fx.Node]:
    """The operations whose output only constants read, directly or through other dead operations: the
    deploy form need not compute them. Only linear operations and activations (whose output shape the
    steps of :func:`shape_steps` follow) are dropped; an unknown operation is kept."""
    dead: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        info = graph.info[node]
        if node in constants or not info.inputs or not node.users or \
                info.kind not in LINEAR_KINDS | {Kind.SITE}:
            continue
        if all(u in constants or u in dead for u in node.users):
            dead.add(node)
    return dead


def shape_steps(graph: Graph, node: fx.Node, available: Callable[[fx.Node], bool]) -> tuple[fx.Node, tuple[Step, ...]]:
    """The nearest tensor ``available`` on the way back from ``node`` through first inputs, and the steps
    (convolutions, linear layers) that make ``node``'s shape from its shape."""
    steps: list[Step] = []
    current = node
    while True:
        info = graph.info[current]
        p = info.params
        if info.kind is Kind.CONV:
            steps.append(("conv", p["weight"].shape[0], tuple(p["weight"].shape[2:]), tuple(p["stride"]),
                          tuple(p["padding"]), tuple(p["dilation"])))
        elif info.kind is Kind.LINEAR:
            steps.append(("linear", p["weight"].shape[0]))
        current = info.inputs[0]
        if available(current):
            return current, tuple(reversed(steps))


def constant_shape(shape: tuple[int, ...], steps: tuple[Step, ...], axis: int, channels: int) -> list[int]:
    """The shape ``steps`` make of ``shape``, with ``channels`` along ``axis``."""
    out = list(shape)
    for step in steps:
        if step[0] == "linear":
            out[-1] = step[1]
            continue
        _, out_channels, kernel, stride, padding, dilation = step
        out[1] = out_channels
        out[2:] = [(h + 2 * p - d * (k - 1) - 1) // s + 1
                   for h, k, s, p, d in zip(out[2:], kernel, stride, padding, dilation)]
    out[axis] = channels
    return out


def constant_values(graph: Graph, constants: Mapping[fx.Node, Constant]) -> dict[fx.Node, torch.Tensor]:
    """The float64 value (one per channel) of every constant; the channels the structure says are 0 are
    set to exactly 0."""
    values: dict[fx.Node, torch.Tensor] = {}
    for node, constant in constants.items():
        value = _value(graph, node, constant, constants, values)
        if constant.zeros:
            value[sorted(constant.zeros)] = 0.0
        values[node] = value
    return values


def _value(graph: Graph, node: fx.Node, constant: Constant, constants: Mapping[fx.Node, Constant],
           values: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
    info = graph.info[node]
    p = info.params

    def value_of(source: fx.Node, channels: int) -> torch.Tensor:
        """``source``'s value along this node's axis (0 if it is not a constant: a zero gate ignores it)."""
        known = constants.get(source)
        if known is None or known.axis != constant.axis:
            return torch.zeros(channels, dtype=torch.float64)
        return values[source].clone()

    if info.kind is Kind.SITE:
        x = values[info.inputs[0]]
        shape = [1] * len(graph.shape(node))
        shape[constant.axis] = -1
        return apply_activation(graph, node, x.reshape(shape)).detach().reshape(-1).to(torch.float64)
    if info.kind is Kind.IDENTITY:
        return value_of(info.inputs[0], constant.channels)
    if info.kind is Kind.ADD:
        return value_of(info.inputs[0], constant.channels) + value_of(info.inputs[1], constant.channels)
    if info.kind in (Kind.BN, Kind.SCALE):
        x = value_of(info.inputs[0], constant.channels) * p["scale"].detach().to(torch.float64)
        return x + p["shift"].detach().to(torch.float64) if info.kind is Kind.BN else x
    weight = p["weight"].detach().to(torch.float64)
    groups = p.get("groups", 1)
    out, per_group = weight.shape[0], weight.shape[1]
    x = value_of(info.inputs[0], per_group * groups)
    # no padding reaches a non-zero constant: every output position sees the whole kernel
    summed = weight.sum(dim=tuple(range(2, weight.dim()))) if weight.dim() > 2 else weight
    y = torch.bmm(summed.reshape(groups, out // groups, per_group), x.reshape(groups, per_group, 1)).reshape(out)
    return y + p["bias"].detach().to(torch.float64) if p["bias"] is not None else y


class ChannelConstant(nn.Module):
    """A tensor holding ``value[c]`` at every position of channel ``c`` (along ``axis``), shaped like the
    tensor that ``steps`` (convolutions, linear layers) make of the input: what the layers behind an
    all-off gate compute, without computing them. The input only gives the shape."""

    def __init__(self, value: torch.Tensor, axis: int, steps: tuple[Step, ...]):
        super().__init__()
        self.axis = axis
        self.steps = tuple(steps)
        self.register_buffer("value", value.detach().reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = constant_shape(tuple(x.shape), self.steps, self.axis, self.value.numel())
        view = [1] * len(shape)
        view[self.axis] = -1
        return self.value.reshape(view).expand(shape).contiguous()

    def extra_repr(self) -> str:
        return f"channels={self.value.numel()}, axis={self.axis}"


def _constant_info(node: fx.Node, m: ChannelConstant, gm: fx.GraphModule) -> OpInfo:
    return OpInfo(Kind.OTHER, (node.args[0],), owner=str(node.target), note="per-channel constant")


register_module(ChannelConstant, _constant_info)
