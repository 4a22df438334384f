"""Data helpers of the loop: example inputs to trace with, and the fixed calibration set."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torch.utils.data import default_collate as _default_collate

from tlc._inputs import ExampleInputs, to_device
from tlc.errors import SpecError
from tlc.run.config import RunConfig


def _batch(data: Dataset, indices: Sequence[int], collate_fn: Callable | None) -> Any:
    return (collate_fn or _default_collate)([data[i] for i in indices])


def example_batch(data: Dataset, collate_fn: Callable | None = None, size: int = 2) -> ExampleInputs:
    """The inputs of the first ``size`` samples of ``data`` (used to trace and verify merges)."""
    if len(data) == 0:
        raise SpecError("the validation data is empty")
    inputs, _ = _batch(data, range(min(size, len(data))), collate_fn)
    return inputs


def calibration_batches(data: Dataset, config: RunConfig, collate_fn: Callable | None,
                        device: torch.device) -> list[tuple[Any, torch.Tensor]]:
    """A fixed, non-augmented calibration set: a seeded sample of the validation data, in batches."""
    n = min(config.calibration_size, len(data))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))[:n].tolist()
    size = config.calibration_batch_size
    batches = []
    for start in range(0, n, size):
        inputs, labels = _batch(data, order[start:start + size], collate_fn)
        batches.append((to_device(inputs, device), labels.to(device)))
    return batches


def derive_seed(seed: int, step: int) -> int:
    """The seed of one step of a run (its fine-tuning, its random draws)."""
    return (seed * 1_000_003 + step * 7_919) % (2**31 - 1)
