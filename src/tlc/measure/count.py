"""Parameter and multiply-accumulate counts: the cost model that latency figures are set against."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, overload

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tlc._inputs import ExampleInputs, batch_size_of, run, to_device


def count_params(model: nn.Module, *, unique: bool = True) -> int:
    """Number of parameter values of `model`; buffers (e.g. BatchNorm statistics) excluded.

    With `unique` (the default) tied weights count once, whether they are the same `Parameter` object or
    two parameters viewing the same memory: the values stored. With `unique=False` every layer's
    parameters count, shared or not: the values computed with (what Layer Fusion does not change).
    """
    if not unique:
        return sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    seen: set[Any] = set()
    total = 0
    for p in model.parameters():
        key = storage_key(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of the convolution and linear weights of `model` that are exactly zero (what unstructured
    pruning leaves: smaller when compressed, not faster on dense kernels)."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


def storage_key(p: torch.Tensor) -> Any:
    """Identity of the memory a tensor occupies (object identity where there is no real memory): two
    tensors with the same key hold the same values, always (tied weights)."""
    if p.device.type == "meta" or p.numel() == 0:
        return id(p)
    return (p.device, p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.stride())


@overload
def count_macs(
    model: nn.Module, example_inputs: ExampleInputs, *, per_sample: Literal[False] = ...
) -> int: ...


@overload
def count_macs(model: nn.Module, example_inputs: ExampleInputs, *, per_sample: Literal[True]) -> float: ...


def count_macs(model: nn.Module, example_inputs: ExampleInputs, *, per_sample: bool = False) -> int | float:
    """Multiply-accumulates of one eval-mode forward of `model` on `example_inputs` (the whole batch).

    Counted with `FlopCounterMode` (MACs = FLOPs / 2): convolutions, linear layers and every matmul,
    including the two attention matmuls (biases, norms and activations are not MACs; causal masks
    are not discounted). Two CPU blind spots of the flop counter are closed here:
    the fused CPU kernel behind `scaled_dot_product_attention` is given the SDPA formula, and the
    `nn.MultiheadAttention` / `nn.TransformerEncoderLayer` fast path (an opaque native kernel) is
    switched off while counting so that its matmuls are seen. With `per_sample=True` the count is
    divided by the batch size of the example inputs.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    with eval_mode(model), _mha_fastpath_disabled(), counter:
        run(model, to_device(example_inputs, model_device(model)))
    macs = counter.get_total_flops() // 2
    return macs / batch_size_of(example_inputs) if per_sample else macs


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter or buffer of `model` (CPU for a model with neither)."""
    first = next(iter([*model.parameters(), *model.buffers()]), None)
    return torch.device("cpu") if first is None else first.device


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(q k^T) v: two batched matmuls (grouped-query heads allowed)."""
    *batch, s_q, d_qk = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    n = 1
    for b in batch:
        n *= b
    return 2 * n * s_q * s_k * (d_qk + d_v)


def _extra_flop_formulas() -> dict[Any, Any]:
    """Formulas for attention kernels that `FlopCounterMode` leaves at zero flops."""
    ops = ("_scaled_dot_product_flash_attention_for_cpu",)
    return {getattr(torch.ops.aten, op): _sdpa_flops for op in ops if hasattr(torch.ops.aten, op)}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode for the duration, then restore each module's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Route attention modules through their ordinary (countable) ops instead of the fused fast path."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
