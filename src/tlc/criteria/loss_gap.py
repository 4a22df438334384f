"""Loss gap of collapsing sites: L(model with the sites collapsed) - L(model), on fixed calibration data.

Each calibration batch runs through the network once with every activation cached; each candidate
(one site, or a set of sites collapsed jointly) then recomputes only the operations downstream of
its sites. A full ranking costs about one suffix pass per candidate instead of one model copy and
full forward pass per candidate. Under torchrun the batches (or the candidates) are split over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tlc._inputs import logits
from tlc._progress import progress_bar
from tlc.criteria.runner import GraphRunner
from tlc.graph import Graph
from tlc.train import distributed

Collapse = Mapping[str, torch.Tensor | None]  # site name -> 0/1 channel mask (None: plain identity)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _gate(mask: torch.Tensor | None, channel_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if mask is None:
        return lambda x: x

    def apply(x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[channel_dim % x.dim()] = -1
        return x * mask.to(device=x.device, dtype=x.dtype).reshape(shape)

    return apply


class LossGaps:
    """Measures loss gaps of collapsing sites of ``graph`` on ``batches`` of (inputs, labels)."""

    def __init__(self, graph: Graph, batches: Sequence[tuple[Any, torch.Tensor]], loss_fn: LossFn | None = None,
                 progress: bool = False):
        if not batches:
            raise ValueError("loss gaps need at least one calibration batch")
        self.graph = graph
        self.batches = list(batches)
        self.loss_fn = loss_fn or (lambda logits, labels: F.cross_entropy(logits.float(), labels, reduction="sum"))
        self.runner = GraphRunner(graph)
        self._base: float | None = None
        self.progress = progress

    def _replacements(self, collapse: Collapse) -> dict:
        replace = {}
        for name, mask in collapse.items():
            site = self.graph.site(name)
            replace[self.graph.site_node(site)] = _gate(mask, site.channel_dim)
        return replace

    def gaps(self, collapses: Sequence[Collapse]) -> list[float]:
        """Mean per-sample loss increase for each collapse (each one applied alone to the current model).

        In a distributed run the work is split over the ranks and every rank gets all the gaps: each rank
        runs its share of the calibration batches (rank r: batches r, r + N, ...), or, with fewer batches than
        ranks, every batch for its share of the collapses. Either way the per-batch losses are added in batch
        order, so the gaps are the same numbers as one process computes."""
        collapses = list(collapses)
        if len(self.batches) >= distributed.world_size():
            rows = distributed.gather_map(lambda mine: self._losses(mine, collapses), self.batches)
            return self._gaps_of(rows)
        return distributed.gather_map(lambda mine: self._gaps_of(self._losses(self.batches, mine)), collapses)

    def _losses(self, batches: Sequence[tuple[Any, torch.Tensor]],
                collapses: Sequence[Collapse]) -> list[tuple[float, list[float], int]]:
        """(loss of the model, loss with each collapse, samples) summed over each batch."""
        replacements = [self._replacements(c) for c in collapses]
        rows = []
        for inputs, labels in progress_bar(batches, desc=f"ranking {len(collapses)} candidates", leave=False,
                                           enabled=self.progress and bool(collapses)):
            out, env = self.runner.run(inputs)
            losses = [float(self.loss_fn(logits(self.runner.rerun(env, inputs, r)), labels)) for r in replacements]
            rows.append((float(self.loss_fn(logits(out), labels)), losses, int(labels.shape[0])))
        return rows

    def _gaps_of(self, rows: Sequence[tuple[float, list[float], int]]) -> list[float]:
        """The gaps of per-batch losses, added in batch order; records the base loss."""
        base_total, samples = 0.0, 0
        totals = [0.0] * (len(rows[0][1]) if rows else 0)
        for base, losses, count in rows:
            base_total += base
            samples += count
            for i, loss in enumerate(losses):
                totals[i] += loss
        self._base = base_total / samples
        return [(t - base_total) / samples for t in totals]

    def base_loss(self) -> float:
        """Mean per-sample loss of the current model on the calibration batches."""
        if self._base is None:
            self._gaps_of(self._losses(self.batches, []))
        return float(self._base)

    def single_gaps(self, masks: Mapping[str, torch.Tensor | None]) -> dict[str, float]:
        """The gap of collapsing each site alone."""
        names = list(masks)
        return dict(zip(names, self.gaps([{n: masks[n]} for n in names])))
