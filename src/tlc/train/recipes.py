"""Training recipes that fit the model family: what a user gets without naming an optimizer.

Convolutional networks fine-tune well with SGD at a large learning rate; transformers do not (a
pretrained BERT forgets at lr 0.01): they take AdamW at a few 1e-5, a warmup and small batches, as their
own papers' recipes (TLC: BERT/RoBERTa 3 epochs, AdamW 2e-5, batch 32).
"""

from __future__ import annotations

import dataclasses
import sys

from torch import nn

from tlc.train.config import FitConfig

FAMILIES = ("cnn", "transformer")

# Per family: (fine-tuning per step, pre-training with --train-epochs, the paper presets' retraining).
_RECIPES: dict[str, dict[str, FitConfig]] = {
    "cnn": {
        "finetune": FitConfig(epochs=1.0, lr=0.01, schedule="cosine"),
        "pretrain": FitConfig(epochs=1.0, lr=0.05, schedule="cosine", weight_decay=5e-4),
    },
    "transformer": {
        "finetune": FitConfig(epochs=1.0, optimizer="adamw", lr=2e-5, weight_decay=0.01, schedule="cosine",
                              warmup_steps=50, batch_size=32),
        "pretrain": FitConfig(epochs=1.0, optimizer="adamw", lr=5e-5, weight_decay=0.01, schedule="cosine",
                              warmup_steps=100, batch_size=32),
        "paper": FitConfig(epochs=3.0, optimizer="adamw", lr=2e-5, weight_decay=0.01, schedule="constant",
                           batch_size=32),
    },
}


def model_family(model: nn.Module) -> str:
    """``transformer`` for a Hugging Face model or any network built on attention, else ``cnn``."""
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return "transformer"
    if any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ for m in model.modules()):
        return "transformer"
    return "cnn"


def recipe(family: str, purpose: str, epochs: float | None = None) -> FitConfig | None:
    """The family's recipe for ``purpose`` (``finetune``, ``pretrain`` or ``paper``), with ``epochs`` when
    given; None where the family has no recipe of its own for it (the preset's stands)."""
    if family not in _RECIPES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    found = _RECIPES[family].get(purpose)
    if found is None or epochs is None:
        return found
    return dataclasses.replace(found, epochs=epochs)


def describe(config: FitConfig) -> str:
    """One line for the log: optimizer, learning rate, schedule, batch, epochs."""
    warmup = f", warmup {config.warmup_steps} steps" if config.warmup_steps else ""
    return (f"{config.optimizer.upper() if config.optimizer == 'sgd' else 'AdamW'} lr {config.lr:g}, weight decay "
            f"{config.weight_decay:g}, {config.schedule} schedule{warmup}, batch {config.batch_size}, "
            f"{config.epochs:g} epoch(s)")
