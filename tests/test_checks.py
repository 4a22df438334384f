"""Warnings about the base model: near chance, or improved by the first step's fine-tuning alone."""

from __future__ import annotations

from tlc.run.checks import base_warnings, fine_tuning_gain, near_chance


def test_a_model_near_chance_is_flagged():
    assert "near chance" in near_chance(0.12, classes=10)  # 1.5 x chance is 15%
    assert near_chance(0.16, classes=10) == ""
    assert near_chance(0.5, classes=1) == ""  # one class: no chance level to speak of


def test_a_first_step_above_the_original_by_more_than_the_budget_is_flagged():
    history = [{"val_accuracy": 0.93}, {"val_accuracy": 0.80}]
    assert "3.00 pt above the original" in fine_tuning_gain(0.90, history, max_acc_drop=1.0)
    assert fine_tuning_gain(0.90, history, max_acc_drop=5.0) == ""
    assert fine_tuning_gain(0.95, history, max_acc_drop=1.0) == ""  # a drop: nothing to say
    assert fine_tuning_gain(0.90, [], max_acc_drop=1.0) == ""


def test_all_warnings_together():
    assert len(base_warnings(0.11, 10, [{"val_accuracy": 0.50}], 1.0)) == 2
    assert base_warnings(0.90, 10, [{"val_accuracy": 0.90}], 1.0) == []
