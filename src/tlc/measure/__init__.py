"""Cost measurement: parameters, MACs, depth, activations, latency, and side-by-side comparisons.

The package itself is callable: ``tlc.measure(model, example_inputs)`` is :func:`measure`.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from typing import Any

from torch import nn

from tlc._inputs import ExampleInputs
from tlc.measure.compare import Comparison, compare
from tlc.measure.count import count_macs, count_params
from tlc.measure.latency import LatencyStats, measure_latency, rebatch, time_callable
from tlc.measure.structure import activations, depth
from tlc.measure.table import LatencyTable, LayerShape


def measure(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    latency: bool = True,
    backends: Sequence[str] = ("eager",),
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 10,
    repeats: int = 30,
    device: str = "cpu",
    threads: int | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Params, MACs (per example batch), depth, activations and, unless ``latency=False``, latency.

    ``params`` counts every layer's parameters, ``unique_params`` the distinct values stored (tied
    weights once: what Layer Fusion shrinks; see :func:`count_params`).
    ``latency_ms`` is the median eager latency at the first batch size; ``latency`` lists every
    (backend, batch size) measured, with spread, thread count and device. To compare two models use
    :func:`compare`, which interleaves their runs.
    """
    stats: dict[str, Any] = {
        "params": count_params(model, unique=False),
        "unique_params": count_params(model),
        "macs": count_macs(model, example_inputs),
        "depth": depth(model, example_inputs),
        "activations": activations(model, example_inputs),
    }
    if latency:
        runs = [measure_latency(model, example_inputs, batch_size=b, backend=be, warmup=warmup, repeats=repeats,
                                device=device, threads=threads, channels_last=channels_last)
                for be in backends for b in batch_sizes]
        stats["latency_ms"] = runs[0].median_ms
        stats["latency"] = [r.to_dict() for r in runs]
    return stats


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return measure(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "Comparison",
    "LatencyStats",
    "LatencyTable",
    "LayerShape",
    "activations",
    "compare",
    "count_macs",
    "count_params",
    "depth",
    "measure",
    "measure_latency",
    "rebatch",
    "time_callable",
]
