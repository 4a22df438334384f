"""Does the base model look trained? Warnings that say when "within the budget" means little."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CHANCE_MARGIN = 1.5  # validation accuracy below this many times chance: the model looks untrained


def near_chance(accuracy: float, classes: int) -> str:
    """A warning when ``accuracy`` is close to guessing among ``classes`` (empty otherwise)."""
    chance = 1.0 / max(classes, 1)
    if classes > 1 and accuracy < CHANCE_MARGIN * chance:
        return (f"the original model is near chance on the validation data ({100 * accuracy:.1f}%, chance "
                f"{100 * chance:.1f}%): it does not look trained, so the accuracy budget protects nothing")
    return ""


def fine_tuning_gain(baseline: float, history: Sequence[dict[str, Any]], max_acc_drop: float) -> str:
    """A warning when the first step ends above the original by more than the budget: its fine-tuning alone
    improves the base model, which is then not converged and "within the budget" means little."""
    if not history:
        return ""
    gain = 100 * (history[0]["val_accuracy"] - baseline)
    if gain > max_acc_drop:
        return (f"step 1 ended {gain:.2f} pt above the original (budget {max_acc_drop:g} pt): its fine-tuning "
                "alone improves the base model, which does not look converged; train it longer first")
    return ""


def base_warnings(baseline: float, classes: int, history: Sequence[dict[str, Any]], max_acc_drop: float) -> list[str]:
    """Every warning about the base model that the run's records support."""
    return [w for w in (near_chance(baseline, classes), fine_tuning_gain(baseline, history, max_acc_drop)) if w]
