"""What the merge planner's layers cost on the clock: the latency policy's prices.

Under ``policy="latency"`` the planner prices every layer it may keep or build by a measured latency
table (:class:`tlc.measure.table.LatencyTable`) instead of its MACs. The plan then depends on measured
numbers, which differ from machine to machine and run to run: a deploy form records the table entries its
plan read (:class:`Recording`), and :func:`tlc.load` rebuilds the same structure from them
(:class:`Fixed`), never from a new measurement.

The table a latency plan uses is the one given to :func:`tlc.merge` / :func:`tlc.linearize`, else the
one set by :func:`using_table` (the compression loop sets the table of its latency backend, batch size and
threads), else eager CPU at batch 1 on the physical cores (:func:`default_table`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from tlc.errors import TLCError
from tlc.measure.table import LatencyTable, LayerShape

# How a latency plan (:class:`tlc.surgery.plan.Planner`) chooses among its options. 1: the lowest price
# alone. 2: never an option that another beats in structure (no more MACs, weight layers and elementwise
# ops, and fewer of one), whatever the table says: a batch norm is not left beside its conv because the
# two prices differ by less than the noise.
PLAN_RULE = 2


class Prices(Protocol):
    """Anything that prices a layer in seconds (a :class:`LatencyTable`, a :class:`Fixed` record)."""

    def seconds(self, shape: LayerShape) -> float: ...


class Recording:
    """A table that remembers every entry read through it (key -> seconds): what a deploy form records,
    with the plan rule (:data:`PLAN_RULE`) that chose among them."""

    def __init__(self, table: Prices):
        self.table = table
        self.rule: int = getattr(table, "rule", PLAN_RULE)
        self.entries: dict[str, float] = {}

    def seconds(self, shape: LayerShape) -> float:
        key = shape.key()
        if key not in self.entries:
            self.entries[key] = float(self.table.seconds(shape))
        return self.entries[key]


class Fixed:
    """The entries a deploy form recorded, and nothing else: a plan rebuilt from them (by the plan rule it
    was made with, ``rule``: 1 for a folder saved before rules were recorded) is the recorded one."""

    def __init__(self, entries: Mapping[str, Any], rule: int | None = None):
        self.rule = PLAN_RULE if rule is None else rule
        self.entries: dict[str, float] = {}
        for key, value in entries.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < 0:
                raise TLCError(f"recorded latency entry {str(key)[:60]!r}: expected a finite time >= 0")
            self.entries[key] = float(value)

    def seconds(self, shape: LayerShape) -> float:
        try:
            return self.entries[shape.key()]
        except KeyError:
            raise TLCError(f"the recorded latency plan has no entry for {shape.key()}: the model differs from the "
                           "one that was merged") from None


class Collecting:
    """A table's measured entries, and its estimates for the shapes it lacks (collected in ``missing``)."""

    def __init__(self, table: LatencyTable):
        self.table = table
        self.missing: dict[str, LayerShape] = {}

    def seconds(self, shape: LayerShape) -> float:
        if shape in self.table:
            return self.table.seconds(shape)
        self.missing.setdefault(shape.key(), shape)
        return self.table.estimate(shape)


def measure_first(compute: Callable[[Prices], Any], table: Prices | None, progress: bool = True) -> None:
    """Measure, under one progress bar, every shape ``compute(prices)`` would read that ``table`` lacks:
    ``compute`` runs once on the table's estimates to learn them (nothing to do unless ``table`` is a
    :class:`LatencyTable`). The planner then reads measured prices only."""
    if not isinstance(table, LatencyTable):
        return
    collecting = Collecting(table)
    compute(collecting)
    if collecting.missing:
        table.prefetch(collecting.missing.values(), progress=progress)


def resolve(policy: str, table: Prices | Mapping[str, float] | None) -> Prices | None:
    """The prices a plan under ``policy`` reads: None unless "latency"; recorded entries (a mapping) as
    :class:`Fixed`; else ``table`` or the current table."""
    if policy != "latency":
        return None
    if isinstance(table, Mapping):
        return Fixed(table)
    return table if table is not None else current_table()  # an empty LatencyTable is falsy (len 0)


_current: list[Prices] = []
_defaults: dict[tuple, LatencyTable] = {}


def default_table() -> LatencyTable:
    """Eager CPU at batch 1 on the physical cores (one table per process, cached on disk)."""
    from tlc.measure.latency import physical_cores

    key = ("eager", "cpu", 1, physical_cores())
    if key not in _defaults:
        _defaults[key] = LatencyTable(backend="eager", device="cpu", batch_size=1, threads=physical_cores())
    return _defaults[key]


def current_table() -> Prices:
    """The table latency plans use now (see the module docstring)."""
    return _current[-1] if _current else default_table()


@contextlib.contextmanager
def using_table(table: Prices | None) -> Iterator[None]:
    """Latency plans made inside use ``table`` (None: leave the current one)."""
    if table is None:
        yield
        return
    _current.append(table)
    try:
        yield
    finally:
        _current.pop()


# ============================================================================ layer shapes


def conv_shape(input_shape: tuple[int, ...], in_channels: int, out_channels: int, params: Mapping[str, Any]
               ) -> LayerShape:
    """A convolution reading ``input_shape`` (with batch) with ``in_channels`` of its channels kept."""
    return LayerShape("conv", (in_channels, *input_shape[2:]), out_channels, groups=int(params["groups"]),
                      kernel=tuple(params["kernel"]), stride=tuple(params["stride"]),
                      padding=tuple(params["padding"]), dilation=tuple(params["dilation"]),
                      bias=bool(params.get("bias", True)))


def dense_shape(input_shape: tuple[int, ...], in_features: int, out_features: int, bias: bool = True) -> LayerShape:
    """A linear layer on the last dimension of ``input_shape`` (with batch), ``in_features`` of it kept."""
    return LayerShape("dense", (*input_shape[1:-1], in_features), out_features, bias=bias)


def elementwise_shape(kind: str, shape: tuple[int, ...]) -> LayerShape:
    """A per-channel affine map (``"affine"``) or a sum of two tensors (``"add"``) of ``shape`` (with batch)."""
    return LayerShape(kind, tuple(shape[1:]))


def activation_shape(op: str, shape: tuple[int, ...]) -> LayerShape:
    """An activation ``op`` (relu, gelu, ...) on a tensor of ``shape`` (with batch)."""
    return LayerShape("act", tuple(shape[1:]), op=op)


__all__ = ["PLAN_RULE", "Collecting", "Fixed", "Prices", "Recording", "activation_shape", "conv_shape", "current_table",
           "default_table", "dense_shape", "elementwise_shape", "measure_first", "resolve", "using_table"]
