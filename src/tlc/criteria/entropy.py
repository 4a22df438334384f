"""Entropy of activation states: how often each channel of a site is ON (pre-activation > 0).

A channel that is always ON or always OFF on the data carries no state (0 bits): the activation acts
there as the identity or as zero, so the site is close to linear. EASIER ranks sites by the mean of this
binary entropy over their channels; NEPENTHE/EGP average only the channels that switch (0 < p < 1).
See docs/methods.md (EASIER, NEPENTHE). The ON fractions come from :func:`tlc.criteria.stats.collect_site_stats`
(eval mode, values read before the activation runs, padding tokens excluded).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from tlc.criteria.stats import collect_site_stats
from tlc.graph import Graph, Site


def channel_entropy(p: torch.Tensor) -> torch.Tensor:
    """Binary entropy in bits of each ON fraction ``p``: -[p log2 p + (1-p) log2(1-p)], 0 at p in {0, 1}
    (docs/methods.md, EASIER)."""
    p = torch.as_tensor(p, dtype=torch.float64).clamp(0.0, 1.0)
    q = 1.0 - p
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(q, q)) / math.log(2.0)


def layer_entropy(p: torch.Tensor, nondegenerate_only: bool = False) -> float:
    """Mean channel entropy (bits) of a site with ON fractions ``p``: over every channel (EASIER), or with
    ``nondegenerate_only`` over the channels with 0 < p < 1 only (NEPENTHE/EGP; 0 when none switches).
    See docs/methods.md."""
    p = torch.as_tensor(p, dtype=torch.float64).flatten()
    if nondegenerate_only:
        p = p[(p > 0) & (p < 1)]
    if p.numel() == 0:
        return 0.0
    return float(channel_entropy(p).mean())


def site_entropies(graph: Graph, batches: Iterable[Any], sites: Sequence[Site | str] | None = None,
                   nondegenerate_only: bool = False) -> dict[str, tuple[float, torch.Tensor]]:
    """(layer entropy in bits, per-channel ON fraction) of each site of ``graph`` (or of ``sites``), measured
    on ``batches`` (model inputs, or (inputs, labels) pairs) in eval mode (docs/methods.md, EASIER)."""
    chosen = list(graph.sites) if sites is None else [graph.site(s) if isinstance(s, str) else s for s in sites]
    if not chosen:
        return {}
    stats = collect_site_stats(graph, chosen, batches)
    return {s.name: (layer_entropy(stats[s.name].on_fraction, nondegenerate_only), stats[s.name].on_fraction)
            for s in chosen}
