"""Loss gap of collapsing sites: L(model with the sites collapsed) - L(model), on fixed calibration data.

Each calibration batch runs through the network once with every activation cached; each candidate
(one site, or a set of sites collapsed jointly) then recomputes only the operations downstream of
its sites. A full ranking costs about one suffix pass per candidate instead of one model copy and
full forward pass per candidate.
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
        """Mean per-sample loss increase for each collapse (each one applied alone to the current model)."""
        replacements = [self._replacements(c) for c in collapses]
        totals = [0.0] * len(collapses)
        base_total, samples = 0.0, 0
        batches = progress_bar(self.batches, desc=f"ranking {len(collapses)} candidates", leave=False,
                               enabled=self.progress and bool(collapses))
        for inputs, labels in batches:
            out, env = self.runner.run(inputs)
            base_total += float(self.loss_fn(logits(out), labels))
            samples += int(labels.shape[0])
            for i, replace in enumerate(replacements):
                totals[i] += float(self.loss_fn(logits(self.runner.rerun(env, inputs, replace)), labels))
        self._base = base_total / samples
        return [(t - base_total) / samples for t in totals]

    def base_loss(self) -> float:
        """Mean per-sample loss of the current model on the calibration batches."""
        if self._base is None:
            self.gaps([])
        return float(self._base)

    def single_gaps(self, masks: Mapping[str, torch.Tensor | None]) -> dict[str, float]:
        """The gap of collapsing each site alone."""
        names = list(masks)
        return dict(zip(names, self.gaps([{n: masks[n]} for n in names])))
