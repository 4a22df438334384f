"""EASIER, "The Simpler The Better: An Entropy-Based Importance Metric To Reduce Neural Networks' Depth"
(Quétu, Liao, Tartaglione, ECML PKDD 2024, arXiv 2404.18949; docs/methods.md): which site to collapse at one step.

Each step measures the entropy of every remaining site's ON/OFF states (:mod:`tlc.criteria.entropy`) and
linearizes the one with the lowest: a site whose channels are nearly always ON or always OFF is nearly
linear already. The ``paper`` preset is the published protocol: entropy on training data, the site made
the identity, full retraining per step, until the budget is spent. The ``default`` preset adds tlc's
improvements: entropy on the run's fixed, non-augmented calibration data; channels that are never ON
removed (they output zero) while the others are linearized; among sites of near-equal entropy, the one
whose collapse saves the most MACs once merged; and never a site with every channel off where the whole
signal passes it (the output would be a constant).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from tlc._inputs import to_device
from tlc.criteria.entropy import site_entropies
from tlc.edits import Linearize
from tlc.graph import Graph
from tlc.methods.base import PAPER_RETRAINING, Method, NoCandidate, Proposal, register_method
from tlc.methods.tlc import collapse_savings, disconnects
from tlc.run.config import RunContext

ENTROPY_DATA = ("calibration", "train")
SHOWN = 5  # other candidates recorded in a step's evidence


@dataclass
class EASIERConfig:
    """EASIER's own settings (the shared ones: :class:`tlc.run.config.RunConfig`)."""

    entropy_data: str = "calibration"  # "calibration": the run's fixed validation sample; "train": training data
    entropy_samples: int | None = 10_000  # training samples measured on (entropy_data="train"); None: all of them
    remove_off_channels: bool = True  # channels never ON on the data are removed, the others linearized
    latency_aware: bool = True  # among near-equal entropies, the site whose collapse saves the most MACs
    near_equal: float = 0.02  # bits: entropies within this of the lowest count as equal (latency_aware)

    def __post_init__(self) -> None:
        if self.entropy_data not in ENTROPY_DATA:
            raise ValueError(f"entropy_data must be one of {', '.join(ENTROPY_DATA)}, not {self.entropy_data!r}")
        if self.entropy_samples is not None and self.entropy_samples < 1:
            raise ValueError("entropy_samples must be >= 1 (or None: the whole training data)")
        if self.near_equal < 0:
            raise ValueError("near_equal must be >= 0 (bits)")


# The published protocol: the entropy of a whole pass over the training data, the lowest-entropy site made
# the identity, one site per step, full retraining per step (SGD 0.1, milestones at 50%/75% of 160 epochs),
# keep going past the budget; stop at one activation left or validation accuracy < 20%.
PAPER = dict(
    entropy_data="train", entropy_samples=None, remove_off_channels=False, latency_aware=False,
    retry_single=False,
    finetune=PAPER_RETRAINING,
    stop_accuracy=0.20, min_activations=1, continue_past_budget=True,
)


@dataclass(frozen=True, eq=False)
class Candidate:
    """One remaining site: its layer entropy (bits), ON fraction per channel and the mask it collapses with
    (None: the identity; 0 = channel removed)."""

    name: str
    entropy: float
    on_fraction: torch.Tensor
    mask: torch.Tensor | None

    @property
    def removed(self) -> int:
        return 0 if self.mask is None else int((self.mask == 0).sum())

    @property
    def linearized(self) -> int:
        return self.on_fraction.numel() - self.removed


def training_batches(run: RunContext, samples: int | None) -> Iterator[tuple[Any, torch.Tensor]]:
    """A fixed, seeded sample of ``samples`` training examples (None: all), in batches of the calibration
    batch size on the run's device, made one batch at a time so that a large sample never sits in memory."""
    data = run.train_data
    n = len(data) if samples is None else min(samples, len(data))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(run.config.seed))[:n].tolist()
    collate = run.collate_fn or default_collate
    size = run.config.calibration_batch_size
    for start in range(0, n, size):
        inputs, labels = collate([data[i] for i in order[start:start + size]])
        yield to_device(inputs, run.device), labels.to(run.device)


def measure(graph: Graph, run: RunContext, config: EASIERConfig,
            sites: Sequence[str]) -> dict[str, tuple[float, torch.Tensor]]:
    """Layer entropy and ON fractions of ``sites`` on the data ``config`` names. Training data is drawn with
    the CPU random state forked and seeded, so its augmentation is the same at every step and the run's
    random state is left as it was."""
    if config.entropy_data == "calibration":
        return site_entropies(graph, run.calibration, sites)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.config.seed)
        return site_entropies(graph, training_batches(run, config.entropy_samples), sites)


def candidates(graph: Graph, run: RunContext, config: EASIERConfig, exclude: Sequence[str]) -> list[Candidate]:
    """The remaining sites (not in ``exclude``), lowest entropy first (ties: graph order), each with its mask;
    a site with every channel off is left out where it :func:`disconnects` the output."""
    names = [s.name for s in graph.sites if s.name not in exclude]
    if not names:
        return []
    found = []
    for name, (entropy, on) in measure(graph, run, config, names).items():
        mask = (on > 0).float() if config.remove_off_channels else None
        if mask is not None and not mask.any() and disconnects(graph, name):
            continue
        found.append(Candidate(name, entropy, on, mask))
    order = {n: i for i, n in enumerate(names)}
    return sorted(found, key=lambda c: (c.entropy, order[c.name]))


def choose(model: nn.Module, graph: Graph, ranked: list[Candidate], run: RunContext,
           config: EASIERConfig) -> tuple[Candidate, dict[str, float]]:
    """The lowest-entropy candidate, or (latency-aware) among those within ``near_equal`` bits of it the one
    whose collapse saves the largest fraction of the deploy MACs (ties: lower entropy); and the savings."""
    best = ranked[0]
    near = [c for c in ranked if c.entropy <= best.entropy + config.near_equal]
    if not config.latency_aware or len(near) < 2:
        return best, {}
    masks = {c.name: c.mask if c.mask is not None else torch.ones_like(c.on_fraction, dtype=torch.float32)
             for c in near}
    saved = collapse_savings(model, graph, masks, run.example_inputs, run.config.policy, pairs=False)
    savings = {c.name: float(saved[(c.name,)]) for c in near}
    return max(near, key=lambda c: (savings[c.name], -ranked.index(c))), savings


def evidence(chosen: Candidate, ranked: list[Candidate], config: EASIERConfig,
             savings: dict[str, float]) -> dict[str, Any]:
    """What a step records: the chosen site and its entropy, the lowest entropies of the others, channels."""
    others = [c for c in ranked if c is not chosen][:SHOWN]
    record: dict[str, Any] = {
        "site": chosen.name, "entropy": chosen.entropy, "entropy_data": config.entropy_data,
        "candidates": {c.name: c.entropy for c in others},
        "removed_channels": chosen.removed, "linearized_channels": chosen.linearized,
    }
    if savings:
        record["savings"] = savings
    return record


@register_method
class EASIER(Method):
    """EASIER on the method protocol: each step linearizes the remaining site of lowest ON/OFF entropy."""

    name = "easier"
    Config = EASIERConfig
    presets = {"default": {}, "paper": PAPER}

    def propose(self, model: nn.Module, graph: Graph, run: RunContext, exclude: Sequence[str]) -> Proposal:
        ranked = candidates(graph, run, self.config, exclude)
        if not ranked:
            raise NoCandidate("no candidate left: every remaining activation was set aside or has every channel "
                              "off where all of the signal passes")
        chosen, savings = choose(model, graph, ranked, run, self.config)
        label = f"{chosen.name} (entropy {chosen.entropy:.4f} bits" + (
            f"; {chosen.removed} never-ON channel(s) removed)" if chosen.removed else ")")
        return Proposal([Linearize.of({chosen.name: chosen.mask}, run.config.policy)],
                        evidence(chosen, ranked, self.config, savings), label=label)
