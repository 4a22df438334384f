"""Measured per-channel statistics of site pre-activations (sites without a batch norm in front).

Padding tokens are excluded using the batch's attention mask; values are read before the activation
runs, so in-place activations cannot corrupt them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from tlc.criteria.runner import GraphRunner
from tlc.graph import Graph, Site
from tlc.train import distributed


@dataclass(frozen=True)
class SiteStats:
    """Per-channel mean, standard deviation and ON fraction (pre-activation > 0) over ``count`` values."""

    mean: torch.Tensor
    std: torch.Tensor
    on_fraction: torch.Tensor
    count: int


class _Accumulator:
    def __init__(self, site: Site):
        self.site = site
        self.total = self.squares = self.on = None
        self.count = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        rows = _channel_rows(x, self.site.channel_dim, mask).double()
        self.add_sums((rows.sum(0).cpu(), (rows * rows).sum(0).cpu(), (rows > 0).sum(0).double().cpu(),
                       rows.shape[0]))

    def add_sums(self, sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]) -> None:
        """Add one batch's (sum, sum of squares, ON count, value count)."""
        total, squares, on, count = sums
        if self.total is None:
            self.total = torch.zeros(total.shape[0], dtype=torch.float64)
            self.squares = torch.zeros_like(self.total)
            self.on = torch.zeros_like(self.total)
        self.total += total
        self.squares += squares
        self.on += on
        self.count += count

    def sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        return self.total, self.squares, self.on, self.count

    def result(self) -> SiteStats:
        if not self.count:
            raise ValueError(f"no value was observed at site {self.site.name}")
        mean = self.total / self.count
        var = (self.squares / self.count - mean * mean).clamp_min(0.0)
        return SiteStats(mean, var.sqrt(), self.on / self.count, self.count)


def _channel_rows(x: torch.Tensor, channel_dim: int, mask: torch.Tensor | None) -> torch.Tensor:
    """[values, channels] view of a pre-activation; token positions where ``mask`` is 0 are dropped."""
    dim = channel_dim % x.dim()
    if mask is not None and x.dim() == 3 and dim == 2 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.to(torch.bool)]
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def _attention_mask(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, dict):
        return inputs.get("attention_mask")
    return None


def collect_site_stats(graph: Graph, sites: list[Site], batches: Iterable[Any]) -> dict[str, SiteStats]:
    """Statistics of each site's pre-activation over ``batches`` (model inputs, or (inputs, labels) pairs).

    In a distributed run the batches are split over the ranks and their sums gathered; every rank adds
    them in batch order, so the statistics are the same numbers as one process computes."""
    runner = GraphRunner(graph)

    def batch_sums(mine: list[Any]) -> list[dict[str, tuple]]:
        return [_batch_sums(runner, sites, batch) for batch in mine]

    accumulators = {s.name: _Accumulator(s) for s in sites}
    for sums in distributed.gather_map(batch_sums, list(batches)):
        for name, one in sums.items():
            accumulators[name].add_sums(one)
    return {name: acc.result() for name, acc in accumulators.items()}


def _batch_sums(runner: GraphRunner, sites: list[Site], batch: Any) -> dict[str, tuple]:
    """Each site's sums over one batch."""
    graph = runner.graph
    inputs = batch[0] if isinstance(batch, tuple | list) and len(batch) == 2 else batch
    mask = _attention_mask(inputs)
    accumulators = {s.name: _Accumulator(s) for s in sites}
    observe = {graph.site_node(s): (lambda x, a=accumulators[s.name], m=mask: a.add(x, m)) for s in sites}
    runner.run(inputs, observe=observe)
    return {name: acc.sums() for name, acc in accumulators.items() if acc.count}
