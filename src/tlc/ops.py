"""What each traced operation is, for the merge engine: one registry of per-op handlers.

Every node of a traced graph (torch.fx module-level graphs and torch.export aten graphs alike) is
classified into an :class:`OpInfo`. The merge engine only understands the kinds below; anything else
is ``OTHER`` and ends a linear segment, which keeps unknown operations correct (never merged).

Users extend the registry with :func:`register_module`, :func:`register_function`,
:func:`register_activation`, :func:`register_identity` and :func:`register_linear`.

torch.export traces through every module (it has no leaf modules), so a module the registry knows
only as a whole (Hugging Face's ``Conv1D``, an activation written as a formula) is replaced, in the
copy that is exported, by an equivalent module torch.export keeps as one recognisable op
(:func:`register_equivalent`, :func:`export_equivalent`).
"""

from __future__ import annotations

import enum
import math
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn


class Kind(enum.Enum):
    """Role of an operation in the linear algebra of the merge engine."""

    INPUT = "input"  # graph input (placeholder)
    OUTPUT = "output"
    ATTR = "attr"  # a constant read from the module (get_attr)
    CONV = "conv"  # zero-padded convolution
    LINEAR = "linear"  # x @ W.T + b on the last dimension
    BN = "bn"  # per-channel affine map: batch norm with running statistics (eval mode)
    SCALE = "scale"  # per-channel multiplication by a constant (gates, layer scale)
    IDENTITY = "identity"  # eval-mode dropout, nn.Identity (layout ops like contiguous() are OTHER)
    ADD = "add"  # sum of two tensors of the same shape
    SITE = "site"  # a non-linear activation that tlc may linearize
    OTHER = "other"  # anything else: kept as it is, ends a segment


LINEAR_KINDS = frozenset({Kind.CONV, Kind.LINEAR, Kind.BN, Kind.SCALE, Kind.IDENTITY, Kind.ADD})


@dataclass
class OpInfo:
    """The classification of one graph node.

    ``params`` holds what the algebra needs: for CONV ``weight, bias, stride, padding, dilation, groups``
    (padding as a tuple of ints); LINEAR ``weight, bias``; BN ``scale, shift, channel_dim`` (float64) and,
    for real batch norms, ``mean, var, weight, bias, eps``; SCALE ``scale`` (1-D, one value per channel)
    and ``channel_dim``. ``owner`` names the module (or the
    attribute) that holds the parameters, so shared weights can be detected.
    """

    kind: Kind
    inputs: tuple[fx.Node, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    owner: str | None = None
    activation: str | None = None
    inplace: bool = False
    note: str = ""

    @property
    def input(self) -> fx.Node | None:
        return self.inputs[0] if self.inputs else None


ModuleHandler = Callable[[fx.Node, nn.Module, fx.GraphModule], OpInfo]
FunctionHandler = Callable[[fx.Node, fx.GraphModule], OpInfo]

_MODULE_HANDLERS: dict[type, ModuleHandler] = {}
_FUNCTION_HANDLERS: dict[Any, FunctionHandler] = {}
_METHOD_HANDLERS: dict[str, FunctionHandler] = {}
_LEAF_TYPES: set[type] = set()
_LEAF_NAMES: set[str] = {"StochasticDepth", "DropPath"}
_EQUIVALENTS: dict[type, Callable[[nn.Module], nn.Module]] = {}


def register_module(module_type: type, handler: ModuleHandler, *, leaf: bool = True) -> None:
    """Classify calls of ``module_type`` with ``handler``; by default the tracer keeps it a leaf."""
    _MODULE_HANDLERS[module_type] = handler
    if leaf:
        _LEAF_TYPES.add(module_type)


def register_function(target: Any, handler: FunctionHandler) -> None:
    """Classify calls of a function (``F.relu``, ``torch.ops.aten.relu.default``, ...)."""
    _FUNCTION_HANDLERS[target] = handler


def register_method(name: str, handler: FunctionHandler) -> None:
    """Classify ``Tensor.<name>(...)`` calls."""
    _METHOD_HANDLERS[name] = handler


def register_activation(module_type: type, name: str,
                        equivalent: Callable[[nn.Module], nn.Module] | None = None) -> None:
    """Declare a custom activation module as a site that tlc may linearize.

    ``equivalent`` builds a standard activation module computing the same function (up to rounding):
    torch.export traces through custom modules, so without it an activation written as a formula
    (``0.5 * x * (1 + tanh(...))``) is no site in models that only torch.export traces.
    """
    register_module(module_type, _module_site(name))
    if equivalent is not None:
        register_equivalent(module_type, equivalent)


def register_equivalent(module_type: type, build: Callable[[nn.Module], nn.Module]) -> None:
    """Replace modules of ``module_type`` by ``build(module)`` (same function) before torch.export."""
    _EQUIVALENTS[module_type] = build


def export_equivalent(module: nn.Module) -> nn.Module | None:
    """The module to export in place of ``module`` (see :func:`register_equivalent`), or None."""
    build = _EQUIVALENTS.get(type(module))
    return build(module) if build is not None else None


def register_linear(module_type: type,
                    weight_and_bias: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """Declare a module computing ``x @ W.T + b`` on the last dimension in its own way, ``weight_and_bias``
    giving its ``(W, b)`` in nn.Linear's layout: a linear layer for the merge engine (a leaf for torch.fx,
    an ``nn.Linear`` for torch.export)."""

    def handler(node: fx.Node, m: nn.Module, gm: fx.GraphModule) -> OpInfo:
        weight, bias = weight_and_bias(m)
        return OpInfo(Kind.LINEAR, (node.args[0],), dict(weight=weight, bias=bias), owner=node.target)

    def as_linear(m: nn.Module) -> nn.Linear:
        weight, bias = (t.detach() if t is not None else None for t in weight_and_bias(m))
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                          dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    register_module(module_type, handler)
    register_equivalent(module_type, as_linear)


_registered_libraries: set[str] = set()


def register_libraries() -> None:
    """Register the layers of optional libraries that are already imported (importing them here would
    cost seconds for models that do not use them): Hugging Face's ``Conv1D`` (GPT-2's linear layers,
    weight stored transposed) and its GELU written as a tanh formula (GPT-2's ``gelu_new``)."""
    if "transformers" in sys.modules and "transformers" not in _registered_libraries:
        _registered_libraries.add("transformers")
        try:
            from transformers import activations
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # pragma: no cover - a broken or partial install: its layers stay unknown
            return
        register_linear(Conv1D, lambda m: (m.weight.t(), m.bias))
        for name in ("NewGELUActivation", "FastGELUActivation"):
            cls = getattr(activations, name, None)
            if cls is not None:  # both are 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), up to rounding
                register_activation(cls, "gelu", equivalent=lambda m: nn.GELU(approximate="tanh"))


def register_identity(module_type: type) -> None:
    """Declare a module that computes the identity in eval mode (a dropout variant, say)."""
    register_module(module_type, _module_identity)


def is_leaf_module(module: nn.Module) -> bool:
    """Whether the tlc tracer keeps ``module`` as one call instead of tracing through it."""
    return type(module) in _LEAF_TYPES or type(module).__name__ in _LEAF_NAMES


# ----------------------------------------------------------------------------- helpers


def fetch_attr(gm: nn.Module, target: str) -> Any:
    """Resolve a dotted attribute path on a module."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _const(arg: Any, gm: fx.GraphModule) -> Any:
    """Value of an argument that must be a constant: a literal or a get_attr node."""
    if isinstance(arg, fx.Node):
        if arg.op == "get_attr":
            return fetch_attr(gm, arg.target)
        raise _NotConstant(arg.name)
    return arg


class _NotConstant(Exception):
    pass


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    bound = dict(defaults)
    for name, value in zip(names, node.args):
        bound[name] = value
    bound.update(node.kwargs)
    return bound


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


def _other(node: fx.Node, note: str = "") -> OpInfo:
    return OpInfo(Kind.OTHER, tuple(a for a in node.all_input_nodes), note=note)


def conv_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...] | None:
    """Symmetric integer padding of a conv, or None when it is asymmetric ('same' with even kernels)."""
    n = len(kernel)
    if padding == "valid":
        return (0,) * n
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return _tuple(padding, n)


def _conv_info(node: fx.Node, x: fx.Node, weight: Any, bias: Any, stride: Any, padding: Any,
               dilation: Any, groups: int, owner: str, padding_mode: str = "zeros") -> OpInfo:
    if not isinstance(weight, torch.Tensor) or weight.dim() < 3:
        return _other(node, "convolution weight is not a constant tensor")
    n = weight.dim() - 2
    kernel = tuple(weight.shape[2:])
    dil = _tuple(dilation, n)
    pad = conv_padding(padding, kernel, dil)
    if pad is None:
        return _other(node, "asymmetric 'same' padding")
    if padding_mode != "zeros" and any(pad):
        return _other(node, f"padding_mode={padding_mode!r}")
    return OpInfo(
        Kind.CONV,
        (x,),
        dict(weight=weight, bias=bias, stride=_tuple(stride, n), padding=pad, dilation=dil, groups=int(groups)),
        owner=owner,
    )


def _owner_of_attr(arg: Any) -> str:
    return arg.target if isinstance(arg, fx.Node) else ""


# ----------------------------------------------------------------------------- module handlers


def _module_conv(node: fx.Node, m: nn.Module, gm: fx.GraphModule) -> OpInfo:
    return _conv_info(node, node.args[0], m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups,
                      node.target, m.padding_mode)


def _module_linear(node: fx.Node, m: nn.Module, gm: fx.GraphModule) -> OpInfo:
    return OpInfo(Kind.LINEAR, (node.args[0],), dict(weight=m.weight, bias=m.bias), owner=node.target)


def _module_bn(node: fx.Node, m: nn.Module, gm: fx.GraphModule) -> OpInfo:
    if m.running_mean is None or m.running_var is None:
        return _other(node, "batch norm without running statistics")
    return _bn_info((node.args[0],), dict(mean=m.running_mean, var=m.running_var, weight=m.weight, bias=m.bias,
                                          eps=m.eps), node.target)


def _bn_info(inputs: tuple[fx.Node, ...], params: dict[str, Any], owner: str | None) -> OpInfo:
    """A batch norm in eval mode: the per-channel affine map ``scale * x + shift`` on dim 1."""
    scale, shift = bn_scale_shift(params)
    return OpInfo(Kind.BN, inputs, dict(params, scale=scale, shift=shift, channel_dim=1), owner=owner)


def _module_identity(node: fx.Node, m: nn.Module, gm: fx.GraphModule) -> OpInfo:
    return OpInfo(Kind.IDENTITY, (node.args[0],))


def _module_site(name: str) -> ModuleHandler:
    def handler(node: fx.Node, m: nn.Module, gm: fx.GraphModule) -> OpInfo:
        return OpInfo(Kind.SITE, (node.args[0],), owner=node.target, activation=name,
                      inplace=bool(getattr(m, "inplace", False)))

    return handler


def _module_gelu(node: fx.Node, m: nn.Module, gm: fx.GraphModule) -> OpInfo:
    return OpInfo(Kind.SITE, (node.args[0],), owner=node.target, activation="gelu")


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_module(_t, _module_conv, leaf=False)
register_module(nn.Linear, _module_linear, leaf=False)
for _t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_module(_t, _module_bn, leaf=False)
for _t in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout):
    register_module(_t, _module_identity, leaf=False)
for _t, _name in ((nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.SiLU, "silu"), (nn.Hardswish, "hardswish"),
                  (nn.LeakyReLU, "leaky_relu"), (nn.ELU, "elu"), (nn.CELU, "celu"), (nn.SELU, "selu"),
                  (nn.Mish, "mish"), (nn.PReLU, "prelu"), (nn.Softplus, "softplus")):
    register_module(_t, _module_site(_name), leaf=False)
register_module(nn.GELU, _module_gelu, leaf=False)


def _module_by_name(node: fx.Node, m: nn.Module, gm: fx.GraphModule) -> OpInfo | None:
    """Leaf modules known by class name only (optional dependencies): identities in eval mode."""
    if type(m).__name__ in _LEAF_NAMES:
        return OpInfo(Kind.IDENTITY, (node.args[0],), note=type(m).__name__)
    return None


# ----------------------------------------------------------------------------- function handlers

_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = dict(bias=None, stride=1, padding=0, dilation=1, groups=1)


def _function_conv(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    a = _bind(node, _CONV_NAMES, _CONV_DEFAULTS)
    try:
        weight, bias = _const(a["weight"], gm), _const(a["bias"], gm)
    except _NotConstant:
        return _other(node, "convolution weight is computed, not a parameter")
    return _conv_info(node, a["input"], weight, bias, a["stride"], a["padding"], a["dilation"], a["groups"],
                      _owner_of_attr(a["weight"]))


def _function_convolution(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
    a = _bind(node, names, {})
    if a.get("transposed"):
        return _other(node, "transposed convolution")
    try:
        weight, bias = _const(a["weight"], gm), _const(a["bias"], gm)
    except _NotConstant:
        return _other(node, "convolution weight is computed, not a parameter")
    return _conv_info(node, a["input"], weight, bias, a["stride"], a["padding"], a["dilation"], a["groups"],
                      _owner_of_attr(a["weight"]))


def _function_linear(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    a = _bind(node, ("input", "weight", "bias"), dict(bias=None))
    try:
        weight, bias = _const(a["weight"], gm), _const(a["bias"], gm)
    except _NotConstant:
        return _other(node, "linear weight is computed, not a parameter")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return _other(node, "linear weight is not a matrix")
    return OpInfo(Kind.LINEAR, (a["input"],), dict(weight=weight, bias=bias), owner=_owner_of_attr(a["weight"]))


def _bn_from(node: fx.Node, gm: fx.GraphModule, a: dict[str, Any]) -> OpInfo:
    if a.get("training"):
        return _other(node, "batch norm traced in training mode")
    try:
        mean, var = _const(a["running_mean"], gm), _const(a["running_var"], gm)
        weight, bias = _const(a["weight"], gm), _const(a["bias"], gm)
    except _NotConstant:
        return _other(node, "batch norm statistics are computed")
    if mean is None or var is None:
        return _other(node, "batch norm without running statistics")
    return _bn_info((a["input"],), dict(mean=mean, var=var, weight=weight, bias=bias, eps=float(a["eps"])),
                    _owner_of_attr(a["weight"]) or _owner_of_attr(a["running_mean"]))


def _function_batch_norm(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    return _bn_from(node, gm, _bind(node, names, dict(weight=None, bias=None, training=False, eps=1e-5)))


def _aten_batch_norm(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
    return _bn_from(node, gm, _bind(node, names, {}))


def _aten_bn_no_training(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    # returns a tuple; the getitem(0) user carries the value (see _getitem)
    names = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")
    return _bn_from(node, gm, _bind(node, names, {}))


def _getitem(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    src, index = node.args[0], node.args[1]
    if (isinstance(src, fx.Node) and src.op == "call_function" and index == 0
            and src.target is torch.ops.aten._native_batch_norm_legit_no_training.default):
        info = _aten_bn_no_training(src, gm)
        if info.kind is Kind.BN:
            return info
    return _other(node)


def _is_tensor_node(arg: Any) -> bool:
    if not isinstance(arg, fx.Node):
        return False
    val = arg.meta.get("tlc_shape")
    return val is not None


def _add(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    a = _bind(node, ("input", "other", "alpha"), dict(alpha=1))
    x, y = a["input"], a["other"]
    if a["alpha"] != 1 or not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
        return _other(node, "add with a constant or alpha != 1")
    sx, sy, so = (n.meta.get("tlc_shape") for n in (x, y, node))
    if sx is None or sy is None or not (sx == sy == so):
        return _other(node, "broadcasting add")
    inplace = node.target in (operator.iadd,) or str(node.target).startswith("aten.add_") or node.target == "add_"
    return OpInfo(Kind.ADD, (x, y), inplace=inplace)


def _mul(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    """x * c with c a constant per-channel tensor (layer scale, channel gates) is a SCALE."""
    if len(node.args) != 2:
        return _other(node)
    x, c = node.args
    if isinstance(x, fx.Node) and x.op == "get_attr":
        x, c = c, x
    if not (isinstance(x, fx.Node) and isinstance(c, fx.Node) and c.op == "get_attr"):
        return _other(node)
    scale = fetch_attr(gm, c.target)
    shape = x.meta.get("tlc_shape")
    if not isinstance(scale, torch.Tensor) or shape is None or node.meta.get("tlc_shape") != shape:
        return _other(node)
    dim = per_channel_dim(tuple(scale.shape), shape)
    if dim is None:
        return _other(node, "multiplication by a constant that is not per channel")
    inplace = node.target in (operator.imul,) or str(node.target).startswith("aten.mul_") or node.target == "mul_"
    return OpInfo(Kind.SCALE, (x,), dict(scale=scale.reshape(-1), channel_dim=dim), owner=c.target,
                  inplace=inplace)


def per_channel_dim(const_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> int | None:
    """The dim of ``x`` along which a broadcast constant varies, if it varies along exactly one."""
    nd = len(x_shape)
    padded = (1,) * (nd - len(const_shape)) + tuple(const_shape)
    if len(padded) != nd:
        return None
    varying = [i for i, s in enumerate(padded) if s != 1]
    if len(varying) != 1 or padded[varying[0]] != x_shape[varying[0]]:
        return None
    d = varying[0]
    return -1 if d == nd - 1 and nd != 2 else d


def _dropout_fn(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    a = _bind(node, ("input", "p", "training", "inplace"), dict(p=0.5, training=True, inplace=False))
    if a["training"] and a["p"]:
        return _other(node, "dropout traced in training mode")
    return OpInfo(Kind.IDENTITY, (a["input"],))


def _aten_dropout(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    a = _bind(node, ("input", "p", "train"), {})
    if a["train"] and a["p"]:
        return _other(node, "dropout traced in training mode")
    return OpInfo(Kind.IDENTITY, (a["input"],))


def _stochastic_depth_fn(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    a = _bind(node, ("input", "p", "mode", "training"), dict(training=True))
    if a["training"] and a["p"]:
        return _other(node, "stochastic depth traced in training mode")
    return OpInfo(Kind.IDENTITY, (a["input"],))


def _function_site(name: str, inplace_default: bool = False) -> FunctionHandler:
    def handler(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
        x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
        inplace = bool(node.kwargs.get("inplace", inplace_default))
        if len(node.args) > 1 and name in ("relu", "relu6", "silu", "hardswish", "mish", "selu") and \
                isinstance(node.args[-1], bool):
            inplace = inplace or node.args[-1]
        return OpInfo(Kind.SITE, (x,), activation=name, inplace=inplace)

    return handler


def _aten_hardtanh(inplace: bool) -> FunctionHandler:
    def handler(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
        a = _bind(node, ("input", "min_val", "max_val"), dict(min_val=-1.0, max_val=1.0))
        if a["min_val"] == 0 and a["max_val"] == 6:
            return OpInfo(Kind.SITE, (a["input"],), activation="relu6", inplace=inplace)
        return _other(node)

    return handler


def _function_hardtanh(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    a = _bind(node, ("input", "min_val", "max_val", "inplace"), dict(min_val=-1.0, max_val=1.0, inplace=False))
    if a["min_val"] == 0 and a["max_val"] == 6:
        return OpInfo(Kind.SITE, (a["input"],), activation="relu6", inplace=bool(a["inplace"]))
    return _other(node)


_aten = torch.ops.aten
for _f in (F.conv1d, F.conv2d, F.conv3d, _aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default):
    register_function(_f, _function_conv)
register_function(_aten.convolution.default, _function_convolution)
for _f in (F.linear, _aten.linear.default):
    register_function(_f, _function_linear)
register_function(F.batch_norm, _function_batch_norm)
register_function(_aten.batch_norm.default, _aten_batch_norm)
register_function(operator.getitem, _getitem)
for _f in (operator.add, operator.iadd, torch.add, _aten.add.Tensor, _aten.add_.Tensor):
    register_function(_f, _add)
register_method("add", _add)
register_method("add_", _add)
for _f in (operator.mul, operator.imul, torch.mul, _aten.mul.Tensor, _aten.mul_.Tensor):
    register_function(_f, _mul)
register_method("mul", _mul)
register_method("mul_", _mul)
for _f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
    register_function(_f, _dropout_fn)
register_function(_aten.dropout.default, _aten_dropout)
for _name, _fs in {
    "relu": (F.relu, torch.relu, _aten.relu.default),
    "relu6": (F.relu6,),
    "gelu": (F.gelu, _aten.gelu.default),
    "silu": (F.silu, _aten.silu.default),
    "hardswish": (F.hardswish, _aten.hardswish.default),
    "leaky_relu": (F.leaky_relu, _aten.leaky_relu.default),
    "elu": (F.elu, _aten.elu.default),
    "selu": (F.selu, _aten.selu.default),
    "celu": (F.celu, _aten.celu.default),
    "mish": (F.mish, _aten.mish.default),
    "softplus": (F.softplus, _aten.softplus.default),
    "prelu": (F.prelu, _aten.prelu.default, _aten._prelu_kernel.default),  # nn.PReLU under torch.export
}.items():
    for _f in _fs:
        register_function(_f, _function_site(_name))
for _name, _fs in {
    "relu": (F.relu_, torch.relu_, _aten.relu_.default),
    "gelu": (_aten.gelu_.default,),
    "silu": (_aten.silu_.default,),
    "hardswish": (_aten.hardswish_.default,),
    "leaky_relu": (F.leaky_relu_, _aten.leaky_relu_.default),
    "elu": (F.elu_, _aten.elu_.default),
    "mish": (_aten.mish_.default,),
}.items():
    for _f in _fs:
        register_function(_f, _function_site(_name, inplace_default=True))
register_function(F.hardtanh, _function_hardtanh)
register_function(_aten.hardtanh.default, _aten_hardtanh(False))
register_function(_aten.hardtanh_.default, _aten_hardtanh(True))
register_method("relu", _function_site("relu"))
register_method("relu_", _function_site("relu", inplace_default=True))

try:  # torchvision's stochastic depth is an fx-wrapped function: traced with its training flag baked in
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth

    register_function(_tv_stochastic_depth, _stochastic_depth_fn)
except ImportError:  # pragma: no cover - torchvision is a core dependency
    pass


# ----------------------------------------------------------------------------- classification

_INPLACE_OTHER_TARGETS = {operator.isub, operator.itruediv, operator.imatmul}


def classify(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    """Classify one node of ``gm`` (shapes must already be recorded in ``node.meta['tlc_shape']``)."""
    if node.op == "placeholder":
        return OpInfo(Kind.INPUT)
    if node.op == "output":
        return OpInfo(Kind.OUTPUT, tuple(node.all_input_nodes))
    if node.op == "get_attr":
        return OpInfo(Kind.ATTR)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        handler = _module_handler(type(module))
        if handler is not None:
            return handler(node, module, gm)
        info = _module_by_name(node, module, gm)
        return info if info is not None else _other(node, f"module {type(module).__name__}")
    if node.op == "call_function":
        handler = _FUNCTION_HANDLERS.get(node.target)
        if handler is not None:
            return handler(node, gm)
        info = _other(node)
        info.inplace = node.target in _INPLACE_OTHER_TARGETS or _is_inplace_aten(node.target)
        return info
    if node.op == "call_method":
        handler = _METHOD_HANDLERS.get(node.target)
        if handler is not None:
            return handler(node, gm)
        info = _other(node)
        info.inplace = isinstance(node.target, str) and node.target.endswith("_") and not node.target.startswith("_")
        return info
    return _other(node)


def _module_handler(module_type: type) -> ModuleHandler | None:
    for cls in module_type.__mro__:
        handler = _MODULE_HANDLERS.get(cls)
        if handler is not None:
            # a subclass of a known layer may override forward: trust only exact or registered types
            if cls is module_type or module_type.forward is cls.forward:
                return handler
            return None
    return None


def _is_inplace_aten(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is None:
        return False
    return bool(schema.arguments) and schema.arguments[0].alias_info is not None and \
        schema.arguments[0].alias_info.is_write


def bn_scale_shift(params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) such that BN(x) = scale * x + shift per channel, in float64."""
    var = params["var"].detach().double()
    scale = torch.rsqrt(var + params["eps"])
    if params["weight"] is not None:
        scale = scale * params["weight"].detach().double()
    shift = -params["mean"].detach().double() * scale
    if params["bias"] is not None:
        shift = shift + params["bias"].detach().double()
    return scale, shift


def conv_macs(out_channels: int, in_channels: int, groups: int, kernel: tuple[int, ...],
              out_positions: int) -> int:
    """Multiply-accumulates of a convolution producing ``out_positions`` output positions."""
    return out_channels * (in_channels // groups) * math.prod(kernel) * out_positions
