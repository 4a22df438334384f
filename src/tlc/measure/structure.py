"""Structural metrics: depth (weight layers on the longest path) and activations left.

Depth is measured on a real forward pass at the ATen level, so it sees every weight layer whatever
the model's Python structure (attention projections inside fused functions included) and counts what
an ONNX export would show as Conv/Gemm/MatMul nodes with a constant weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from tlc._inputs import ExampleInputs, as_call

_aten = torch.ops.aten
_WEIGHT_OPS = {
    _aten.convolution.default, _aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,
    _aten.linear.default, _aten.addmm.default, _aten.mm.default, _aten.bmm.default, _aten.matmul.default,
    _aten.baddbmm.default, _aten._convolution.default,
}
_MKLDNN = getattr(_aten, "mkldnn_convolution", None)
if _MKLDNN is not None:
    _WEIGHT_OPS.add(_MKLDNN.default)


class _DepthMode(TorchDispatchMode):
    """Tags every tensor with the number of weight layers on the longest path that produced it."""

    def __init__(self, constants: list[torch.Tensor]):
        super().__init__()
        self.depth = WeakTensorKeyDictionary()
        self.const = WeakTensorKeyDictionary()
        for t in constants:
            self.const[t] = True

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        data = [t for t in inputs if t not in self.const]
        level = max((self.depth.get(t, 0) for t in data), default=0)
        packet = getattr(func, "overloadpacket", None)
        is_weight_op = func in _WEIGHT_OPS or packet in {op.overloadpacket for op in _WEIGHT_OPS}
        if is_weight_op and data and len(data) < len(inputs):
            level += 1
        all_const = bool(inputs) and not data

        def tag(t: Any) -> Any:
            if isinstance(t, torch.Tensor):
                if all_const:
                    self.const[t] = True
                else:
                    self.depth[t] = max(level, self.depth.get(t, 0)) if func._schema.is_mutable else level
            return t

        tree_map(tag, out)
        return out


def depth(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """Weight layers (conv/linear/matmul with a parameter) on the longest input-to-output path."""
    args, kwargs = as_call(example_inputs)
    constants = list(model.parameters()) + list(model.buffers())
    mode = _DepthMode(constants)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), mode:
            out = model(*args, **kwargs)
    finally:
        model.train(was_training)
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max((mode.depth.get(t, 0) for t in leaves), default=0)


def activations(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """Non-linear activation sites left in the model, those tlc does not offer (gated, unaddressable) included."""
    from tlc.graph import trace

    return len(trace(model, example_inputs).all_sites)
