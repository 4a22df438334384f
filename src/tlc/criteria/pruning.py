"""Unstructured pruning criteria of NEPENTHE (docs/methods.md): which weights belong to a site's layer, how a
pruning budget is shared between layers, and which weights go within a layer.

Pure functions of a traced graph, of scores and of tensors: nothing here knows a model family. The
method that uses them is :mod:`tlc.methods.nepenthe`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import fx

from tlc.graph import Graph
from tlc.ops import Kind

# Operations a site's layer reaches it through: per-channel affine maps, identities and residual sums.
_THROUGH = (Kind.BN, Kind.IDENTITY, Kind.ADD)


def prunable_layers(graph: Graph) -> dict[str, str]:
    """``{site name: parameter name}``: the weight of the convolution or linear layer right before each site.

    The layer is found in the graph, backwards from the site through batch norms, identities and residual
    sums. Where a sum joins a residual branch and a projection shortcut, both reach the site; the layer
    is the one on the longest path from the inputs (the branch), so that shortcut projections, like the
    classifier, belong to no site and are not prunable: no site's entropy speaks for them. A weight
    reached from two sites is given to the first."""
    depth = _longest_paths(graph)
    names = {id(p): n for n, p in graph.gm.named_parameters()}
    layers: dict[str, str] = {}
    for site in graph.sites:
        producers = _producers(graph, graph.info[graph.site_node(site)].input)
        if not producers:
            continue
        layer = max(producers, key=lambda n: depth[n])
        name = names.get(id(graph.info[layer].params.get("weight")))
        if name is not None and name not in layers.values():
            layers[site.name] = name
    return layers


def _producers(graph: Graph, start: fx.Node | None) -> list[fx.Node]:
    """The convolutions and linear layers that reach ``start`` through :data:`_THROUGH` operations only."""
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    todo = [start] if start is not None else []
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        info = graph.info[node]
        if info.kind in (Kind.CONV, Kind.LINEAR):
            found.append(node)
        elif info.kind in _THROUGH:
            todo.extend(i for i in info.inputs if isinstance(i, fx.Node))
    return sorted(found, key=list(graph.gm.graph.nodes).index)


def _longest_paths(graph: Graph) -> dict[fx.Node, int]:
    """Number of operations on the longest path from an input to each node (nodes are in execution order)."""
    depth: dict[fx.Node, int] = {}
    for node in graph.gm.graph.nodes:
        depth[node] = 1 + max((depth[i] for i in node.all_input_nodes), default=-1)
    return depth


def allocate(scores: Mapping[str, float], remaining: Mapping[str, int], amount: int) -> dict[str, int]:
    """How many weights each layer loses this round: ``amount`` in all, shared after NEPENTHE's budget.

    Layer l's share is proportional to ``softmax_l(S / s_l)`` with ``S = sum_k s_k``: the lower its score
    (entropy times mean weight magnitude), the more it is pruned. A share larger than the layer's
    ``remaining`` (unpruned) weights is capped there and the excess goes to the other layers in proportion
    to their own shares, until every share fits. Counts are integers that sum to ``amount`` exactly (the
    largest fractional parts get the units left by rounding down).

    Layers with a score <= 0 or no weight left take no part and get 0: a zero score means a zero-entropy
    layer, which NEPENTHE linearizes instead of pruning (and ``S / 0`` has no value). ``amount`` larger
    than the remaining weights of the taking layers is refused (ValueError)."""
    if amount < 0:
        raise ValueError(f"amount must be >= 0, got {amount}")
    taking = [n for n, s in scores.items() if math.isfinite(s) and s > 0 and remaining.get(n, 0) > 0]
    available = sum(remaining[n] for n in taking)
    if amount > available:
        raise ValueError(f"cannot prune {amount} weights: the layers with a positive score have {available} left")
    counts = {n: 0 for n in scores}
    if amount == 0:
        return counts
    total = sum(scores[n] for n in taking)
    logits = {n: total / scores[n] for n in taking}
    top = max(logits.values())
    weights = {n: math.exp(v - top) for n, v in logits.items()}  # the softmax up to its normalisation
    active, left = list(taking), amount
    while active:  # cap the shares that do not fit; the excess goes to the others
        norm = sum(weights[n] for n in active)
        capped = [n for n in active if left * weights[n] / norm >= remaining[n]]
        if not capped:
            break
        for n in capped:
            counts[n] = remaining[n]
            left -= remaining[n]
        active = [n for n in active if n not in capped]
    norm = sum(weights[n] for n in active) or 1.0
    shares = {n: left * weights[n] / norm for n in active}
    for n in active:
        counts[n] = min(math.floor(shares[n]), remaining[n])
    units = amount - sum(counts.values())
    order = sorted(active, key=lambda n: -(shares[n] - math.floor(shares[n])))
    while units > 0:  # the units rounding down left, largest fractional part first
        before = units
        for n in order:
            if units and counts[n] < remaining[n]:
                counts[n] += 1
                units -= 1
        if units == before:
            raise AssertionError("allocate: no layer can take the units left by rounding")
    return counts


def magnitude_masks(weights: Mapping[str, torch.Tensor], counts: Mapping[str, int],
                    current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The cumulative 0/1 masks after pruning, in each layer, the ``counts[name]`` weights of smallest
    magnitude among those its ``current`` mask still keeps (all of them when it has none): unstructured L1
    magnitude pruning, where a weight once pruned stays pruned. Ties go to the lower flat index."""
    masks = {}
    for name, w in weights.items():
        mask = current[name].detach().clone() if name in current else torch.ones_like(w)
        count = int(counts.get(name, 0))
        kept = int(mask.count_nonzero())
        if count > kept:
            raise ValueError(f"{name}: cannot prune {count} weights, {kept} are left")
        if count > 0:
            flat = mask.reshape(-1).clone()
            magnitude = w.detach().abs().reshape(-1).double().masked_fill(flat == 0, math.inf)
            flat[torch.argsort(magnitude, stable=True)[:count]] = 0
            mask = flat.view_as(w)
        masks[name] = mask
    return masks


__all__ = ["allocate", "magnitude_masks", "prunable_layers"]
