"""A measured latency table: the time of single layers on this machine, cached on disk.

MACs rank layers badly where it matters for depth compression: at small batch sizes a layer's fixed
per-call cost (dispatch, kernel launch, memory traffic) often outweighs its arithmetic, so one merged
layer can be faster than two smaller ones even when it has more MACs. Like the latency tables of depth
compression work (Kim et al., ICML 2023; LayerMerge, ICML 2024), :class:`LatencyTable` times each
layer shape once on the target (device, backend, batch size, threads) and keeps the result in a JSON
file, so a planner can price candidate layers in seconds.

A :class:`LayerShape` describes one layer without its batch dimension. The table measures it
(:meth:`LatencyTable.seconds`), predicts it from a fit of time against MACs and bytes moved
(:meth:`LatencyTable.estimate`), and prices a whole model by summing its layers
(:meth:`LatencyTable.predict`), which checks the table against a measured end-to-end latency.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import platform
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from tlc._inputs import ExampleInputs, to_device
from tlc._progress import progress_bar
from tlc.errors import SpecError, TLCError
from tlc.measure.count import _extra_flop_formulas, model_device
from tlc.measure.latency import BACKENDS, make_runner, physical_cores, rebatch, time_callable, torch_threads

if TYPE_CHECKING:
    from tlc.graph import Graph
    from tlc.surgery.affine import Map

KINDS = ("conv", "dense", "affine", "add", "act")
ACTIVATIONS = frozenset({
    "relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "leaky_relu", "elu",
    "selu", "celu", "mish", "softplus", "prelu",
})
MAX_ELEMENTS = 1 << 28  # largest weight or activation (elements) a measurement may allocate
MIN_FIT_POINTS = 4  # conv/dense entries the fit needs for its intercept (else: the fastest entry)
BUDGET_S = 0.2  # wall time one measurement aims at (warm-up and timed calls; large layers take longer)
MIN_REPEATS = 5
_FORMAT = 1
PROTOCOL = "rotating-16MB-nospin"  # how layers are timed (eager: rotating copies, LatencyTable._measure; ONNX
# Runtime: no intra-op spinning, latency._onnxruntime_runner): another protocol, another file
_BYTES_PER_ELEMENT = 4  # layers are measured in float32
_SAVE_EVERY_S = 5.0


def _ints(values: Iterable[Any], what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"LayerShape.{what} must be a tuple of integers, got {values!r}") from exc
    return out


def _dims(t: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in t)


def _undims(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x")) if text else ()


@dataclass(frozen=True)
class LayerShape:
    """One layer the planner may build, as the table measures it (batch dimension excluded).

    ``kind`` is ``"conv"`` (``nn.ConvNd``; ``input`` is ``(C, *spatial)``), ``"dense"`` (``nn.Linear``;
    ``input`` is ``(*leading, features)``), ``"affine"`` (``x * scale + shift`` with one value per channel of
    ``input[0]``, channels first; ``bias=False`` drops the shift), ``"add"`` (the sum of two tensors shaped
    ``input``) or ``"act"`` (the ``torch.nn.functional`` activation ``op``). Empty ``stride``/``padding``/
    ``dilation`` of a conv mean 1/0/1 in every spatial dim, and ``bias`` means nothing for add and act: both
    are normalised so that equal layers have equal keys.
    """

    kind: str
    input: tuple[int, ...]
    out_channels: int = 0
    groups: int = 1
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    bias: bool = True
    op: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpecError(f"LayerShape.kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        fields = {name: _ints(getattr(self, name), name) for name in ("input", "kernel", "stride", "padding",
                                                                        "dilation")}
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "out_channels", int(self.out_channels))
        object.__setattr__(self, "groups", int(self.groups))
        object.__setattr__(self, "bias", bool(self.bias) or self.kind in ("add", "act"))
        if not self.input or min(self.input) < 1:
            raise SpecError(f"LayerShape.input must be non-empty positive sizes, got {self.input}")
        if self.kind == "conv":
            self._check_conv()
        else:
            self._check_other()

    def _check_conv(self) -> None:
        spatial = len(self.input) - 1
        if not 1 <= spatial <= 3:
            raise SpecError(f"a conv input is (C, *spatial) with 1 to 3 spatial dims, got {self.input}")
        for name, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
            if not getattr(self, name):
                object.__setattr__(self, name, (default,) * spatial)
        if any(len(getattr(self, n)) != spatial for n in ("kernel", "stride", "padding", "dilation")):
            raise SpecError(f"conv kernel/stride/padding/dilation need {spatial} values each for input {self.input}")
        if min(self.kernel + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise SpecError("conv kernel, stride and dilation must be >= 1 and padding >= 0")
        c = self.input[0]
        if self.out_channels < 1 or self.groups < 1 or c % self.groups or self.out_channels % self.groups:
            raise SpecError(f"conv groups={self.groups} must divide in={c} and out={self.out_channels} channels")
        if min(self.output_shape()[1:]) < 1:
            raise SpecError(f"conv output would be empty for input {self.input} and kernel {self.kernel}")
        if self.op:
            raise SpecError("LayerShape.op applies to kind 'act' only")

    def _check_other(self) -> None:
        if self.kernel or self.stride or self.padding or self.dilation:
            raise SpecError(f"a {self.kind} layer has no kernel, stride, padding or dilation")
        if self.groups != 1:
            raise SpecError(f"a {self.kind} layer has groups=1")
        if self.kind == "dense" and self.out_channels < 1:
            raise SpecError("a dense layer needs out_channels >= 1")
        if self.kind != "dense" and self.out_channels:
            raise SpecError(f"a {self.kind} layer keeps its channels: out_channels must be 0")
        if self.kind == "act" and self.op not in ACTIVATIONS:
            raise SpecError(f"unknown activation {self.op!r}; expected one of {', '.join(sorted(ACTIVATIONS))}")
        if self.kind != "act" and self.op:
            raise SpecError("LayerShape.op applies to kind 'act' only")

    # ------------------------------------------------------------------ keys
    def key(self) -> str:
        """Stable, readable cache key, e.g. ``conv|64x56x56|64|1|3x3|1x1|1x1|1x1|1|``."""
        parts = (self.kind, _dims(self.input), str(self.out_channels), str(self.groups), _dims(self.kernel),
                 _dims(self.stride), _dims(self.padding), _dims(self.dilation), str(int(self.bias)), self.op)
        return "|".join(parts)

    @classmethod
    def from_key(cls, key: str) -> LayerShape:
        """The shape a :meth:`key` describes (SpecError when the text is not such a key)."""
        parts = key.split("|") if isinstance(key, str) else []
        if len(parts) != 10 or parts[8] not in ("0", "1"):
            raise SpecError(f"not a layer key: {key!r}")
        kind, inp, out, groups, kernel, stride, padding, dilation, bias, op = parts
        try:
            return cls(kind, _undims(inp), int(out), int(groups), _undims(kernel), _undims(stride), _undims(padding),
                       _undims(dilation), bias == "1", op)
        except ValueError as exc:
            raise SpecError(f"not a layer key: {key!r}") from exc

    @classmethod
    def from_map(cls, m: Map, input: tuple[int, ...]) -> LayerShape | None:
        """The single layer that realises an affine :class:`~tlc.surgery.affine.Map` applied to a tensor
        shaped ``input`` (no batch dim): a conv or dense layer, an affine for a map of batch norms and gates
        only, None for an identity (it costs nothing)."""
        if m.identity:
            return None
        bias = not m.bias_zero
        if m.weight_ops == 0:
            features = tuple(input) if m.kind == "conv" else (input[-1], *input[:-1])
            return cls("affine", features, bias=bias)
        if m.kind == "dense":
            return cls("dense", tuple(input), m.out_channels, bias=bias)
        return cls("conv", tuple(input), m.out_channels, m.groups, m.kernel, m.stride, m.padding, m.dilation, bias)

    # ------------------------------------------------------------------ sizes
    def output_shape(self) -> tuple[int, ...]:
        """Shape of the layer's output (no batch dim)."""
        if self.kind == "conv":
            spatial = tuple((h + 2 * p - d * (k - 1) - 1) // s + 1 for h, p, d, k, s in
                            zip(self.input[1:], self.padding, self.dilation, self.kernel, self.stride))
            return (self.out_channels, *spatial)
        if self.kind == "dense":
            return (*self.input[:-1], self.out_channels)
        return self.input

    def weight_numel(self) -> int:
        """Elements of the weight (conv, dense) or of the per-channel scale (affine)."""
        if self.kind == "conv":
            return self.out_channels * (self.input[0] // self.groups) * math.prod(self.kernel)
        if self.kind == "dense":
            return self.out_channels * self.input[-1]
        return self.input[0] if self.kind == "affine" else 0

    def macs(self, batch_size: int = 1) -> int:
        """Multiply-accumulates of one call on ``batch_size`` examples (0 for element-wise layers)."""
        if self.kind in ("conv", "dense"):
            positions = math.prod(self.output_shape()) // self.out_channels
            return batch_size * positions * self.weight_numel()
        return 0

    def bytes_moved(self, batch_size: int = 1) -> int:
        """Bytes read and written by one call in float32: inputs, output and parameters."""
        inputs = math.prod(self.input) * (2 if self.kind == "add" else 1)
        params = self.weight_numel() + (self._bias_numel() if self.bias else 0)
        return _BYTES_PER_ELEMENT * (batch_size * (inputs + math.prod(self.output_shape())) + params)

    def _bias_numel(self) -> int:
        if self.kind in ("conv", "dense"):
            return self.out_channels
        return self.input[0] if self.kind == "affine" else 0

    def check_size(self, batch_size: int = 1) -> None:
        """Refuse (TLCError) a layer whose weight or activations exceed :data:`MAX_ELEMENTS` elements."""
        largest = max(self.weight_numel(), batch_size * math.prod(self.input),
                      batch_size * math.prod(self.output_shape()))
        if largest > MAX_ELEMENTS:
            raise TLCError(f"layer {self.key()} at batch size {batch_size} needs a tensor of {largest:,} elements, "
                           f"more than the {MAX_ELEMENTS:,} a latency measurement allocates")


# ============================================================================ one-layer modules


class _Affine(nn.Module):
    def __init__(self, channels: int, ndim: int, shift: bool):
        super().__init__()
        view = (channels,) + (1,) * (ndim - 1)
        self.register_buffer("scale", torch.rand(view) + 0.5)
        self.register_buffer("shift", torch.randn(view) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale if self.shift is None else x * self.scale + self.shift


class _Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _Activation(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.fn = getattr(F, op)
        self.register_buffer("weight", torch.full((1,), 0.25) if op == "prelu" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) if self.weight is None else self.fn(x, self.weight)


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def build_layer(shape: LayerShape, batch_size: int, device: torch.device) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The eval-mode layer ``shape`` describes, with random weights, and random inputs for it, on ``device``."""
    shape.check_size(batch_size)
    if shape.kind == "conv":
        layer: nn.Module = _CONVS[len(shape.kernel)](
            shape.input[0], shape.out_channels, shape.kernel, stride=shape.stride, padding=shape.padding,
            dilation=shape.dilation, groups=shape.groups, bias=shape.bias)
    elif shape.kind == "dense":
        layer = nn.Linear(shape.input[-1], shape.out_channels, bias=shape.bias)
    elif shape.kind == "affine":
        layer = _Affine(shape.input[0], len(shape.input), shape.bias)
    elif shape.kind == "add":
        layer = _Add()
    else:
        layer = _Activation(shape.op)
    count = 2 if shape.kind == "add" else 1
    inputs = tuple(torch.randn(batch_size, *shape.input, device=device) for _ in range(count))
    return layer.to(device).eval(), inputs


# ============================================================================ the table


class LatencyTable:
    """Measured seconds per :class:`LayerShape` for one (device, backend, batch size, threads), cached.

    ``backend`` is ``"eager"`` (the eval-mode module under ``torch.inference_mode``) or ``"onnxruntime"``
    (the one-layer module exported to ONNX, run in a session; about 0.5 s of export per shape).
    ``threads`` defaults to :func:`~tlc.measure.latency.physical_cores`. Each shape is the median of up to
    ``repeats`` timed calls after up to ``warmup`` untimed ones, both cut so that one measurement takes
    about ``budget_s`` (never fewer than 5 timed calls). Results live in one JSON file per device model,
    backend, batch size, thread count and library versions under ``cache_dir`` (default
    ``$TLC_CACHE_DIR`` or ``~/.cache/tlc/latency``), so a later table with the same conditions measures
    nothing twice.
    """

    def __init__(self, backend: str = "eager", device: str | torch.device = "cpu", batch_size: int = 1,
                 threads: int | None = None, cache_dir: str | Path | None = None, repeats: int = 30,
                 warmup: int = 5, *, budget_s: float = BUDGET_S):
        if backend not in BACKENDS:
            raise SpecError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if batch_size < 1 or repeats < 1 or warmup < 0 or budget_s <= 0:
            raise SpecError("batch_size and repeats must be >= 1, warmup >= 0 and budget_s > 0")
        if threads is not None and threads < 1:
            raise SpecError(f"threads must be >= 1, got {threads}")
        self.backend = backend
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.threads = threads if threads is not None else physical_cores()
        self.repeats, self.warmup, self.budget_s = repeats, warmup, budget_s
        self.conditions = _conditions(backend, self.device, batch_size, self.threads)
        root = cache_dir if cache_dir is not None else os.environ.get("TLC_CACHE_DIR") or \
            Path.home() / ".cache" / "tlc" / "latency"
        self._path = Path(root).expanduser() / _file_name(self.conditions)
        self._entries: dict[str, float] = _load(self._path, self.conditions)
        self._fit_cache: tuple[int, tuple[float, float, float]] | None = None
        self._calibrated = False
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------ lookups
    @property
    def path(self) -> Path:
        """The cache file of this table's conditions."""
        return self._path

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, shape: LayerShape) -> bool:
        return shape.key() in self._entries

    def seconds(self, shape: LayerShape) -> float:
        """Latency of one call of ``shape`` at the table's batch size: cached, else measured now and saved."""
        key = shape.key()
        if key not in self._entries:
            self._entries[key] = self._measure(shape)
            self.save()
        return self._entries[key]

    def prefetch(self, shapes: Iterable[LayerShape], progress: bool = True) -> int:
        """Measure every shape not in the table yet (sizes are checked for all before any is measured);
        returns how many were measured. The cache is saved every few seconds and at the end, so an
        interrupted prefetch keeps what it measured."""
        missing = list({s.key(): s for s in shapes if s.key() not in self._entries}.values())
        for shape in missing:
            shape.check_size(self.batch_size)
        try:
            for shape in progress_bar(missing, enabled=progress, desc="latency table", unit="layer"):
                self._entries[shape.key()] = self._measure(shape)
                if time.monotonic() - self._last_save > _SAVE_EVERY_S:
                    self.save()
        finally:
            if missing:
                self.save()
        return len(missing)

    # ------------------------------------------------------------------ the fit
    @property
    def overhead_seconds(self) -> float:
        """Per-call overhead: the intercept of the fit of measured time against MACs and bytes moved over
        the table's conv/dense entries, within [0, fastest such entry]. The fit always includes the
        calibration layers (measured on first use, see :meth:`calibrate`), whose small layers pin the
        intercept down; with fewer than :data:`MIN_FIT_POINTS` conv/dense entries (calibration layers too
        large for the batch size) it is the fastest entry of any kind."""
        return self._fit()[0]

    def estimate(self, shape: LayerShape) -> float:
        """Seconds of ``shape`` without measuring it: its table entry if there is one, else the fit's
        ``overhead + a * MACs + b * bytes`` (which measures the calibration layers on first use)."""
        if shape.key() in self._entries:
            return self._entries[shape.key()]
        return self.fit_seconds(shape.macs(self.batch_size), shape.bytes_moved(self.batch_size))

    def fit_seconds(self, macs: float, bytes_moved: float) -> float:
        """The fit's prediction for a call doing ``macs`` multiply-accumulates and moving ``bytes_moved``
        bytes (the whole batch)."""
        overhead, per_mac, per_byte = self._fit()
        return overhead + per_mac * macs + per_byte * bytes_moved

    def calibrate(self, progress: bool = False) -> int:
        """Measure the calibration layers (:data:`CALIBRATION`: convs and dense layers from tiny to medium,
        about a second on a CPU, once per cache file) that the fit relies on; returns how many were measured."""
        measured = self.prefetch([s for s in CALIBRATION if _fits(s, self.batch_size)], progress=progress)
        self._calibrated = True
        return measured

    def _fit(self) -> tuple[float, float, float]:
        """(overhead s, s per MAC, s per byte), cached until the table changes."""
        if not self._calibrated:
            self.calibrate()
        if self._fit_cache is None or self._fit_cache[0] != len(self._entries):
            rows = []
            for key, seconds in self._entries.items():
                if key.startswith(("conv|", "dense|")):
                    s = LayerShape.from_key(key)
                    rows.append((s.macs(self.batch_size), s.bytes_moved(self.batch_size), seconds))
            if not self._entries:
                raise TLCError(f"the latency table {self._path} has no entries to fit")
            fit = _nonnegative_fit(np.asarray(rows, dtype=float)) if rows else (0.0, 0.0, 0.0)
            if len(rows) < MIN_FIT_POINTS:
                fit = (min(self._entries.values()), fit[1], fit[2])
            self._fit_cache = (len(self._entries), fit)
        return self._fit_cache[1]

    # ------------------------------------------------------------------ whole models
    def predict(self, model: nn.Module, example_inputs: ExampleInputs, progress: bool = False, *,
                reference: tuple[nn.Module, float] | None = None) -> float:
        """Predicted seconds of one forward of ``model`` at the table's batch size: the sum of table entries
        over its conv, linear, batch norm, gate, add and activation operations (measuring missing ones), plus
        the fit's price of every other operation that computes a new tensor (views and shape queries are
        free). The model is traced with :func:`tlc.graph.trace`.

        With ``reference=(other_model, seconds)``, ``seconds`` being the measured latency of ``other_model``
        under the table's conditions (typically the original of which ``model`` is a compressed form), the
        prediction is anchored on that measurement: ``seconds * sum(model) / sum(other_model)``. Layers timed
        alone miss what a whole model pays once or everywhere alike (its Python, the runtime's graph
        overhead, caches shared between layers); that share cancels in the ratio, and the table is used for
        what it measures well, relative cost."""
        total = self._sum(model, example_inputs, progress)
        if reference is None:
            return total
        other, seconds = reference
        if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
            raise TLCError(f"reference seconds must be a positive number, got {seconds!r}")
        return seconds * total / self._sum(other, example_inputs, progress)

    def _sum(self, model: nn.Module, example_inputs: ExampleInputs, progress: bool) -> float:
        """The table's sum over one forward of ``model`` (see :meth:`predict`)."""
        from tlc.graph import trace

        inputs = to_device(rebatch(example_inputs, self.batch_size), model_device(model))
        graph = trace(model, inputs)
        shapes = {n: layer_shape(graph, n) for n in graph.nodes}
        describable = [s for s in shapes.values() if s is not None and _fits(s, self.batch_size)]
        self.prefetch(describable, progress=progress)
        total = sum(self.seconds(s) if _fits(s, self.batch_size) else self.estimate(s)
                    for s in shapes.values() if s is not None)
        return total + _OtherOps(graph, shapes, self.fit_seconds).price(inputs)

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        """Write the cache file atomically, keeping entries another process added to it meanwhile."""
        from tlc.train.checkpoint import atomic_write_json

        on_disk = _load(self._path, self.conditions, quiet=True, skip=self._entries)
        self._entries = {**on_disk, **self._entries}
        self._path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._path, {"format": _FORMAT, "conditions": self.conditions,
                                       "entries": dict(sorted(self._entries.items()))})
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------ measuring
    def _measure(self, shape: LayerShape) -> float:
        """Median seconds of one call of ``shape``, timed under the table's conditions. Eager calls rotate
        over copies of the layer and its inputs (:data:`ROTATION_BYTES` in all): in a network a layer's
        weights and input come from memory, not from the cache its previous call left them in."""
        layer, inputs = build_layer(shape, self.batch_size, self.device)
        if self.backend == "eager":
            copies = [(layer, inputs)] + [build_layer(shape, self.batch_size, self.device)
                                          for _ in range(_rotation(shape, self.batch_size) - 1)]
            turn = itertools.cycle(copies)

            def call() -> Any:
                module, args = next(turn)
                return module(*args)

            with torch_threads(self.threads), torch.inference_mode():
                return self._time(call, str(self.device))
        with tempfile.TemporaryDirectory(prefix="tlc-latency-") as tmp:
            path = _export_layer(layer, inputs, Path(tmp) / "layer.onnx")
            fn, _, clock = make_runner(layer, inputs, backend="onnxruntime", device=self.device,
                                       threads=self.threads, channels_last=False, onnx_path=path)
            return self._time(fn, clock)

    def _time(self, fn: Callable[[], Any], clock: str) -> float:
        """Median seconds of ``fn``: one probe call sizes warm-up and repeats to the time budget."""
        probe = time_callable(fn, warmup=1, repeats=1, device=clock)[0] / 1e3
        per_call = max(probe, 1e-7)
        warmup = min(self.warmup, max(1, int(0.25 * self.budget_s / per_call)))
        repeats = min(self.repeats, max(MIN_REPEATS, int(0.75 * self.budget_s / per_call)))
        samples = time_callable(fn, warmup=warmup, repeats=repeats, device=clock)
        return float(np.median(samples)) / 1e3


CALIBRATION: tuple[LayerShape, ...] = (
    LayerShape("conv", (8, 16, 16), 8, kernel=(3, 3), padding=(1, 1)),
    LayerShape("conv", (16, 32, 32), 16, kernel=(3, 3), padding=(1, 1)),
    LayerShape("conv", (32, 32, 32), 64, kernel=(1, 1)),
    LayerShape("conv", (64, 28, 28), 64, kernel=(3, 3), padding=(1, 1)),
    LayerShape("conv", (128, 14, 14), 128, kernel=(3, 3), padding=(1, 1)),
    LayerShape("conv", (256, 7, 7), 256, kernel=(3, 3), padding=(1, 1)),
    LayerShape("conv", (128, 28, 28), 128, groups=128, kernel=(3, 3), padding=(1, 1)),
    LayerShape("dense", (64,), 64),
    LayerShape("dense", (512,), 512),
    LayerShape("dense", (16, 256), 256),
)


ROTATION_BYTES = 1 << 24  # more than the caches one layer's weights and input could stay in between two calls
MAX_COPIES = 16


def _rotation(shape: LayerShape, batch_size: int) -> int:
    """How many copies of a layer eager timing rotates over (1 for a layer that alone exceeds the budget)."""
    size = 4 * (shape.weight_numel() + batch_size * math.prod(shape.input) * (2 if shape.kind == "add" else 1))
    return max(1, min(MAX_COPIES, ROTATION_BYTES // max(size, 1)))


def _fits(shape: LayerShape, batch_size: int) -> bool:
    try:
        shape.check_size(batch_size)
    except TLCError:
        return False
    return True


def _export_layer(layer: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
    """ONNX file of a one-layer module at a fixed batch size (unverified: only its speed matters)."""
    from tlc.io.export import export_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(layer, inputs, path, dynamic_batch=False, check=False)


def _nonnegative_fit(rows: np.ndarray) -> tuple[float, float, float]:
    """Least squares of time on (1, MACs, bytes) with non-negative coefficients, each row weighted by
    1 / time so that small and large layers count alike; the intercept is capped by the fastest row.

    Three unknowns: the non-negative optimum is the best non-negative unconstrained solution over the
    subsets of columns, so every subset is solved and the best admissible one is kept."""
    t = rows[:, 2]
    features = np.column_stack([np.ones(len(rows)), rows[:, 0], rows[:, 1]])
    scale = np.maximum(np.abs(features).max(axis=0), 1e-30)
    a = features / scale / t[:, None]
    best, best_residual = np.zeros(3), math.inf
    for size in (1, 2, 3):
        for cols in itertools.combinations(range(3), size):
            coef, *_ = np.linalg.lstsq(a[:, cols], np.ones(len(t)), rcond=None)
            if np.any(coef < 0):
                continue
            residual = float(np.sum((a[:, cols] @ coef - 1.0) ** 2))
            if residual < best_residual:
                best, best_residual = np.zeros(3), residual
                best[list(cols)] = coef
    overhead, per_mac, per_byte = best / scale
    return float(min(max(overhead, 0.0), t.min())), float(per_mac), float(per_byte)


# ============================================================================ graphs


def layer_shape(graph: Graph, node: fx.Node) -> LayerShape | None:
    """The :class:`LayerShape` of a traced node, or None when the table does not describe it (identities,
    inputs, and every operation of kind OTHER)."""
    from tlc.ops import Kind

    info = graph.info[node]
    shape = graph.shape(node)
    source = graph.shape(info.input) if info.inputs and isinstance(info.input, fx.Node) else None
    if shape is None or source is None or len(source) < 2:
        return None
    p = info.params
    if info.kind is Kind.CONV:
        weight = p["weight"]
        return LayerShape("conv", source[1:], weight.shape[0], p["groups"], tuple(weight.shape[2:]), p["stride"],
                          p["padding"], p["dilation"], p["bias"] is not None)
    if info.kind is Kind.LINEAR:
        return LayerShape("dense", source[1:], p["weight"].shape[0], bias=p["bias"] is not None)
    if info.kind in (Kind.BN, Kind.SCALE):
        dim = p["channel_dim"] % len(source)
        if dim == 0:
            return None
        rest = [s for i, s in enumerate(source[1:], start=1) if i != dim]
        return LayerShape("affine", (source[dim], *rest), bias=info.kind is Kind.BN)
    if info.kind is Kind.ADD:
        return LayerShape("add", shape[1:]) if len(shape) >= 2 else None
    if info.kind is Kind.SITE and info.activation in ACTIVATIONS:
        return LayerShape("act", source[1:], op=info.activation)
    return None


class _OtherOps(fx.Interpreter):
    """Runs a traced graph and prices each operation the table does not describe by the fit, from the
    MACs it performs (flop counter) and the bytes it reads and writes; views and non-tensor results are free."""

    def __init__(self, graph: Graph, shapes: dict[fx.Node, LayerShape | None],
                 price: Callable[[float, float], float]):
        super().__init__(graph.gm)
        self.traced, self.shapes, self.price_of = graph, shapes, price
        self.total = 0.0

    def price(self, inputs: ExampleInputs) -> float:
        from tlc._inputs import as_call
        from tlc.graph import placeholder_values

        args, kwargs = as_call(inputs)
        with torch.no_grad():
            self.run(*placeholder_values(self.traced.gm, args, kwargs))
        return self.total

    def run_node(self, n: fx.Node) -> Any:
        from tlc.ops import Kind

        if n.op not in ("call_function", "call_method", "call_module") or self.shapes.get(n) is not None or \
                self.traced.info[n].kind is Kind.IDENTITY:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
        with counter:
            out = super().run_node(n)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        macs = counter.get_total_flops() // 2
        storages = {_storage(t) for t in ins}
        if outs and (macs or any(_storage(t) not in storages for t in outs)):
            moved = sum(t.numel() * t.element_size() for t in ins + outs)
            self.total += self.price_of(macs, moved)
        return out


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


# ============================================================================ cache files


def device_name(device: torch.device) -> str:
    """Model name of ``device``: the GPU's name for CUDA, the CPU model from /proc/cpuinfo otherwise."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError("a CUDA device was requested but torch.cuda.is_available() is False")
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        raise SpecError(f"latency tables measure on 'cpu' or 'cuda' devices, not {device.type!r}")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _conditions(backend: str, device: torch.device, batch_size: int, threads: int) -> dict[str, Any]:
    ort = None
    if backend == "onnxruntime":
        from tlc.io.export import require

        ort = require("onnxruntime").__version__
    return {"device": device_name(device), "device_type": device.type, "backend": backend,
            "batch_size": batch_size, "threads": threads, "torch": torch.__version__, "onnxruntime": ort,
            "protocol": PROTOCOL}


def _file_name(conditions: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(conditions, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", conditions["device"].lower()).strip("-")[:40] or "device"
    return f"{slug}-{conditions['backend']}-b{conditions['batch_size']}-t{conditions['threads']}-{digest}.json"


def _load(path: Path, conditions: dict[str, Any], quiet: bool = False,
          skip: Container[str] = ()) -> dict[str, float]:
    """Entries of a cache file (except the keys in ``skip``), or {} (with a warning unless ``quiet``) when it
    is unreadable, not ours or malformed. Only JSON is read, and only finite positive numbers under valid
    layer keys are kept."""
    if not path.exists():
        return {}

    def ignore(reason: str) -> dict[str, float]:
        if not quiet:
            warnings.warn(f"ignoring latency cache {path}: {reason}", stacklevel=4)
        return {}

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return ignore(f"not a readable JSON file ({type(exc).__name__})")
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("entries"), dict):
        return ignore("not a latency table of this version")
    if data.get("conditions") != conditions:
        return ignore("it was measured under other conditions")
    entries, dropped = {}, 0
    for key, value in data["entries"].items():
        if key in skip:
            continue
        if _valid_entry(key, value):
            entries[key] = float(value)
        else:
            dropped += 1
    if dropped and not quiet:
        warnings.warn(f"latency cache {path}: ignored {dropped} malformed entries", stacklevel=3)
    return entries


def _valid_entry(key: Any, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return False
    try:
        return LayerShape.from_key(key).key() == key
    except TLCError:
        return False
