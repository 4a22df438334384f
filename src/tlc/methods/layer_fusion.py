"""Layer Fusion (O'Neill, Ver Steeg, Galstyan; arXiv 2007.14917; docs/methods.md): layers that are alike
become one.

Each step finds the pairs of layers of the same type and weight shape (:mod:`tlc.criteria.similarity`:
convolutions and linear layers, attention projections included) whose weights are most alike, by cosine
(default), CKA of their outputs on calibration data, or the Wasserstein distance of their weight values;
fuses ``pairs_per_step`` of them (edit :class:`tlc.edits.TieWeights`: the two weights averaged, biases
too, and held from then on by one shared ``nn.Parameter``, so that fine-tuning gives it the sum of both
layers' gradients); and fine-tunes. A fused layer may be fused again with another one: the tie grows to
three layers, never splits.

The ``paper`` preset ranks the pairs by similarity alone; the ``default`` preset re-ranks the
``shortlist`` most similar pairs by the loss gap of fusing each on calibration data, as TLC ranks its
sites. Fusion shrinks the parameters stored (``unique_params``, the weights file), not the depth, MACs or
latency: every layer still computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tlc._inputs import logits
from tlc._inputs import run as run_model
from tlc.criteria.similarity import (
    HIGHER_IS_CLOSER,
    MEASURES,
    Pair,
    candidate_pairs,
    most_similar_first,
    similarities,
)
from tlc.edits import TieWeights
from tlc.graph import Graph
from tlc.measure.count import count_params, eval_mode
from tlc.methods.base import PAPER_RETRAINING, Method, NoCandidate, Proposal, register_method
from tlc.run.config import RunContext
from tlc.train import distributed

SHOWN = 5  # other candidates recorded in a step's evidence


@dataclass
class LayerFusionConfig:
    """Layer Fusion's own settings (the shared ones: :class:`tlc.run.config.RunConfig`)."""

    measure: str = "cosine"  # "cosine" (weights), "cka" (outputs on calibration data), "wasserstein" (weight values)
    pairs_per_step: int = 1  # pairs fused per step (no layer in two of them)
    shortlist: int = 8  # the most similar pairs, re-ranked by the calibration loss gap of fusing each; 0: none
    group_by_name: bool = True  # only layers whose module paths differ in numbers only (layer.3.fc1 ~ layer.7.fc1)
    target_ratio: float | None = None  # stop once the unique parameters are at most this fraction of the original's

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {', '.join(MEASURES)}, not {self.measure!r}")
        if self.pairs_per_step < 1:
            raise ValueError("pairs_per_step must be >= 1")
        if self.shortlist < 0:
            raise ValueError("shortlist must be >= 0 (0: rank by similarity alone)")
        if self.target_ratio is not None and not 0 < self.target_ratio < 1:
            raise ValueError(f"target_ratio must be in (0, 1) (or None), not {self.target_ratio}")


# The published protocol as far as it is given (docs/methods.md): the most similar pair by the cosine of the
# weights, fused by averaging, then retrained; the retraining recipe of the other paper presets (SGD 0.1,
# 160 epochs, lr x0.1 at 50% and 75%), every step kept, the result the best within the budget.
PAPER: dict[str, Any] = dict(measure="cosine", shortlist=0, pairs_per_step=1, retry_single=False,
                             finetune=PAPER_RETRAINING, continue_past_budget=True)


def calibration_loss(model: nn.Module, batches: Sequence[tuple[Any, torch.Tensor]]) -> float:
    """Mean per-sample cross-entropy of ``model`` (eval mode) on the calibration batches."""
    total, samples = 0.0, 0
    with eval_mode(model):
        for inputs, labels in batches:
            out = logits(run_model(model, inputs))
            total += float(F.cross_entropy(out.float(), labels, reduction="sum"))
            samples += int(labels.shape[0])
    return total / max(samples, 1)


def fuse(pairs: Sequence[Pair]) -> TieWeights:
    """The edit fusing each pair (named by the first layers of its two units; their ties come along)."""
    return TieWeights.from_fields([(p.first[0], p.second[0]) for p in pairs])


def disjoint(ranked: Sequence[Pair], count: int) -> list[Pair]:
    """The first ``count`` pairs of ``ranked`` that share no unit with an earlier one."""
    chosen: list[Pair] = []
    used: set[str] = set()
    for pair in ranked:
        if len(chosen) == count:
            break
        if not used & set(pair.layers):
            chosen.append(pair)
            used |= set(pair.layers)
    return chosen


def loss_gaps(model: nn.Module, pairs: Sequence[Pair], run: RunContext) -> tuple[float, dict[str, float]]:
    """(calibration loss of ``model``, the increase of that loss when each pair alone is fused); in a
    distributed run the pairs are split over the ranks."""
    base = calibration_loss(model, run.calibration)

    def fused_losses(mine: list[Pair]) -> list[float]:
        return [calibration_loss(fuse([pair]).apply(model, run.example_inputs)[0], run.calibration) for pair in mine]

    losses = distributed.gather_map(fused_losses, list(pairs))
    return base, {pair.name: loss - base for pair, loss in zip(pairs, losses)}


def shared_values(model: nn.Module, pair: Pair) -> int:
    """Parameter values that fusing ``pair`` stops storing (one weight, and its bias)."""
    layer = model.get_submodule(pair.second[0])
    bias = getattr(layer, "bias", None)
    return layer.weight.numel() + (bias.numel() if bias is not None else 0)


@register_method
class LayerFusion(Method):
    """Layer Fusion on the method protocol: each step ties the weights of the most similar layer pairs."""

    name = "layer_fusion"
    Config = LayerFusionConfig
    presets = {"default": {}, "paper": PAPER}

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.original_params: int | None = None  # unique parameters of the model as given (target_ratio)

    def prepare(self, model: nn.Module, run: RunContext) -> list:
        """Counts the original's unique parameters (for ``target_ratio``); changes nothing."""
        self.original_params = count_params(model)
        return []

    def propose(self, model: nn.Module, graph: Graph, run: RunContext, exclude: Sequence[str]) -> Proposal:
        config = self.config
        unique = count_params(model)
        if config.target_ratio is not None and self.original_params and \
                unique <= config.target_ratio * self.original_params:
            raise NoCandidate(f"target ratio reached: {unique:,} unique parameters, "
                              f"{unique / self.original_params:.3f} of the original's")
        pairs = candidate_pairs(model, config.group_by_name, exclude)
        if not pairs:
            raise NoCandidate("no two layers of the same type and weight shape left to fuse"
                              + (" (the others were set aside)" if exclude else ""))
        values = similarities(model, pairs, config.measure, run.calibration)
        ranked = most_similar_first(pairs, values, config.measure)
        gaps: dict[str, float] = {}
        if config.shortlist > 0:
            short = ranked[:config.shortlist]
            base, gaps = loss_gaps(model, short, run)
            ranked = sorted(short, key=lambda p: (gaps[p.name], short.index(p)))
        chosen = disjoint(ranked, config.pairs_per_step)
        joint = None
        if gaps:
            joint = gaps[chosen[0].name] if len(chosen) == 1 else \
                calibration_loss(fuse(chosen).apply(model, run.example_inputs)[0], run.calibration) - base
        main = self._proposal(model, chosen, ranked, values, gaps, joint, unique)
        if len(chosen) > 1:
            main.fallback = self._proposal(model, chosen[:1], ranked, values, gaps,
                                           gaps.get(chosen[0].name), unique)
        return main

    def _proposal(self, model: nn.Module, chosen: list[Pair], ranked: list[Pair], values: dict[str, float],
                  gaps: dict[str, float], joint: float | None, unique: int) -> Proposal:
        """The step fusing ``chosen``, with its evidence: each pair's measure (and loss gap), the next
        candidates, and the unique parameters after the fusion."""
        measure = self.config.measure
        saved = sum(shared_values(model, p) for p in chosen)
        evidence: dict[str, Any] = {
            "measure": measure, "higher_is_closer": HIGHER_IS_CLOSER[measure],
            "pairs": [{"layers": list(p.layers), "value": values[p.name],
                       **({"gap": gaps[p.name]} if p.name in gaps else {})} for p in chosen],
            "candidates": {p.name: values[p.name] for p in [q for q in ranked if q not in chosen][:SHOWN]},
            "unique_params": unique - saved, "params_shared": saved,
        }
        if gaps:
            evidence["gaps"] = gaps
        if joint is not None:
            evidence["joint_gap"] = joint
        described = ", ".join(f"{p.name} ({measure} {values[p.name]:.4f}"
                              + (f", gap {gaps[p.name]:+.4f})" if p.name in gaps else ")") for p in chosen)
        return Proposal([fuse(chosen)], evidence, label=f"fuse {described}")


__all__ = ["PAPER", "LayerFusion", "LayerFusionConfig", "calibration_loss", "disjoint", "fuse", "loss_gaps",
           "shared_values"]
