"""Layer Folding (Ben Dror, Zehngut, Raviv, Artyomov, Vitek; BMVC 2022, arXiv 2106.09309; docs/methods.md):
every activation site becomes ``a * x + (1 - a) * act(x)`` with one learnable ``a`` in [0, 1], and training
adds ``lambda_reg * sum |1 - a^2|`` to the loss, which pulls each ``a`` to 0 (the activation) or 1 (the
identity). Sites whose ``a`` reaches ``threshold`` are folded: they become the identity and the merge turns
the layers on both sides into one. Works for ReLU, ReLU6, GELU, SiLU, Hardswish, ... sites, behind a batch
norm or not (for a ReLU the mix is exactly a PReLU of slope ``a``, the official code's form).

The published code folds convolutions ignoring their borders; here the linearization moves the padding so
that the fold is exact (the fine-tuning after the fold sees the exact function). The step protocol is
LayerCollapse's (:func:`tlc.methods.layer_collapse.learnable_step`); the ``paper`` preset trains one round
with the regularizer, folds once and fine-tunes without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tlc.edits import Edit
from tlc.graph import trace
from tlc.methods.base import register_method
from tlc.methods.layer_collapse import (
    LearnableActivationMethod,
    check_learnable_settings,
    merge_savings,
)
from tlc.run.config import RunContext
from tlc.surgery.learnable import MixActivation, learnable_modules, regularizer
from tlc.train import FitConfig


@dataclass
class LayerFoldingConfig:
    """Layer Folding's own settings (the shared ones: :class:`tlc.run.config.RunConfig`)."""

    lambda_reg: float = 0.25  # strength of the regularizer lambda * sum |1 - a^2|
    threshold: float = 0.9  # a site folds once a >= threshold
    init: float = 0.1  # where a starts (at 0, the paper's, the regularizer's gradient is 0: only the task moves a)
    paying_only: bool = True  # only sites whose fold saves MACs once merged
    rounds: int | None = None  # a fixed schedule: rounds of regularized training, then one fold
    patience: int = 3  # without a schedule: stop after this many rounds in a row with nothing to fold
    param_lr: float | None = 0.01  # learning rate of the mix parameters (None: the fine-tuning's, as the paper)

    def __post_init__(self) -> None:
        check_learnable_settings(self.threshold, self.rounds, self.patience, lambda_reg=self.lambda_reg,
                                 param_lr=self.param_lr)
        if not 0 <= self.init <= 1:
            raise ValueError(f"init must be in [0, 1], not {self.init}")


# The published protocol (the official CIFAR scripts): every site, a from 0, lambda = 0.25; one round of
# training with the regularizer (SGD lr 1e-3, momentum 0.9, weight decay 5e-4, batch 128, 100 epochs, lr / 10
# at epoch 50), then the sites with a >= 0.9 folded and the network fine-tuned without the regularizer (the
# same recipe); every step kept whatever its accuracy (the result: the best within the budget).
PAPER_TRAINING = FitConfig(epochs=100.0, batch_size=128, lr=1e-3, momentum=0.9, weight_decay=5e-4, schedule="step",
                           milestones=(0.5,), gamma=0.1)
PAPER: dict[str, Any] = dict(init=0.0, paying_only=False, rounds=1, finetune=PAPER_TRAINING, retry_single=False,
                             continue_past_budget=True, param_lr=None)


@register_method
class LayerFolding(LearnableActivationMethod):
    """Layer Folding on the method protocol: every site mixed with the identity, folded once linear."""

    name = "layer_folding"
    verb = "fold"
    Config = LayerFoldingConfig
    presets = {"default": {}, "paper": PAPER}

    def prepare(self, model: nn.Module, run: RunContext) -> list[Edit]:
        """Every site (``paying_only``: whose fold saves MACs) becomes a mix with ``a = init``."""
        graph = trace(model, run.example_inputs)
        names = every = [s.name for s in graph.sites]
        if self.config.paying_only:
            savings = merge_savings(model, graph, names, run)
            names = [n for n in names if savings[n] > 0]
        return self.made_learnable(run, names, len(every), "activation site",
                                   f"{len(names)} site(s) mixed with the identity (a = {self.config.init:g})", "mix")

    def loss(self, model: nn.Module, inputs: Any, labels: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor | None:
        """``lambda_reg * sum |1 - a^2|`` over the model's mix sites still regularized."""
        return regularizer(model, self.config.lambda_reg, MixActivation)

    def after_step(self, model: nn.Module) -> None:
        """Every ``a`` back into [0, 1] after each optimizer step."""
        for module in learnable_modules(model).values():
            if isinstance(module, MixActivation):
                module.clamp_()


__all__ = ["PAPER", "PAPER_TRAINING", "LayerFolding", "LayerFoldingConfig"]
