"""Optimizer and learning-rate schedule of a fine-tuning run.

The schedule is a pure function of the optimizer step, so a resumed run follows the same learning rates
as an uninterrupted one. With ``T`` steps in the run and ``W`` warmup steps, step ``s`` (0-based) uses
``lr * min(1, (s + 1) / W) * main(s / T)``, where ``main`` is 1 ("constant"), ``(1 + cos(pi p)) / 2``
("cosine") or ``gamma ** (number of milestones <= p)`` ("step").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from tlc.errors import SpecError
from tlc.train.config import FitConfig


def build_optimizer(model: nn.Module, config: FitConfig, own_lr: Mapping[str, float] | None = None) -> Optimizer:
    """SGD (with momentum) or AdamW over the parameters that require grad; frozen ones are left out.
    ``own_lr`` gives the named parameters a learning rate of their own (one group per rate, after the rest)."""
    own_lr = own_lr or {}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise SpecError("the model has no parameter that requires grad: there is nothing to fine-tune")
    groups: list[dict] = [{"params": [p for n, p in named if n not in own_lr], "lr": config.lr}]
    for lr in sorted(set(own_lr.values())):
        groups.append({"params": [p for n, p in named if own_lr.get(n) == lr], "lr": lr})
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, total_steps: int, config: FitConfig) -> float:
    """The multiplier of the base learning rate at optimizer step `step` (0-based) of `total_steps`."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    progress = step / total_steps
    if config.schedule == "cosine":
        main = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif config.schedule == "step":
        main = config.gamma ** sum(progress >= m for m in config.milestones)
    else:
        main = 1.0
    return warmup * main


def build_scheduler(optimizer: Optimizer, config: FitConfig, total_steps: int) -> LambdaLR:
    """A per-step scheduler applying `lr_factor` (call ``step()`` after every optimizer step)."""
    return LambdaLR(optimizer, partial(lr_factor, total_steps=total_steps, config=config))
