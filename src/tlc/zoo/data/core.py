"""The pieces every dataset reader shares: `DataBundle`, the `load_data` options and the split helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from tlc.errors import SpecError


@dataclass
class DataBundle:
    """The splits of one dataset with what a model and a training loop need to know about them."""

    name: str  # canonical spec without paths, e.g. "fashion-mnist", "glue:sst2"
    kind: str  # "image" or "text"
    train: Dataset
    val: Dataset
    test: Dataset | None
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...] | None  # (C, H, W) for images, None for text
    collate_fn: Callable | None  # pads text batches; None for images (default collation)

    def split(self, split: str) -> Dataset:
        """The dataset of `split` ("train", "val" or "test")."""
        if split not in ("train", "val", "test"):
            raise SpecError(f"{self.name}: unknown split {split!r}; use 'train', 'val' or 'test'")
        dataset = getattr(self, split)
        if dataset is None:
            raise SpecError(f"{self.name} has no test split; evaluate on 'val' instead")
        return dataset

    def loader(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, num_workers: int = 0
    ) -> DataLoader:
        """A loader of `(inputs, labels)` batches; shuffling and worker seeds come from a generator seeded
        with `seed`, so two loaders built alike give the same batches."""
        if batch_size < 1:
            raise SpecError(f"{self.name}: batch_size={batch_size} must be at least 1")
        return DataLoader(
            self.split(split),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed),
            num_workers=num_workers,
            collate_fn=self.collate_fn,
        )

    def example_inputs(self, batch_size: int = 1) -> torch.Tensor | dict[str, torch.Tensor]:
        """The inputs of the first `batch_size` validation examples, batched (for tracing and checks)."""
        if not 1 <= batch_size <= len(self.val):
            raise SpecError(
                f"{self.name}: example_inputs(batch_size={batch_size}) needs 1 to {len(self.val)} examples, "
                "the size of the val split"
            )
        inputs, _ = (self.collate_fn or default_collate)([self.val[i] for i in range(batch_size)])
        return inputs


@dataclass(frozen=True)
class _Options:
    """The keyword arguments of `load_data`, passed on to the dataset readers."""

    seed: int
    tokenizer: Any
    max_length: int
    image_size: int | None
    channels: int | None
    val_fraction: float
    augment: bool


# ---------------------------------------------------------------------------------------------- splits


def _split(n: int, fractions: Sequence[float], seed: int, what: str) -> list[torch.Tensor]:
    """Shuffle range(n) with `seed` and cut it into parts of the given fractions (the first takes the
    rounding rest); each part is sorted."""
    sizes = [round(n * fraction) for fraction in fractions[1:]]
    sizes.insert(0, n - sum(sizes))
    if min(sizes) < 1:
        shares = "/".join(f"{fraction:g}" for fraction in fractions)
        raise SpecError(f"{what}: {n} examples are too few to split {shares} without an empty split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in order.split(sizes)]


def _train_val(n: int, options: _Options, what: str) -> list[torch.Tensor]:
    """Seeded train/val indices with `options.val_fraction` going to val."""
    return _split(n, (1.0 - options.val_fraction, options.val_fraction), options.seed, what)


def _check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Refuse labels outside 0..num_classes-1."""
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise SpecError(
            f"{where}: labels range {int(labels.min())}..{int(labels.max())}, expected 0..{num_classes - 1}"
        )


def _existing_dir(arg: str, name: str, usage: str) -> Path:
    """The directory named in a spec argument, which must exist."""
    if not arg:
        raise SpecError(f"{name} needs a location: use {usage}")
    path = Path(arg).expanduser()
    if not path.is_dir():
        raise SpecError(f"{name}: directory {path} does not exist")
    return path
