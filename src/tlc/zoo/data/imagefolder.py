"""The ImageFolder reader: class-per-folder image files with PIL transforms and ImageNet normalisation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from tlc.errors import SpecError

from .core import DataBundle, _existing_dir, _Options, _split, _train_val

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IMAGENET_GREY_MEAN, _IMAGENET_GREY_STD = (0.449,), (0.226,)  # the channel averages


class _TransformedSubset(Dataset):
    """Items `indices` of a dataset of (image, label) with `transform` applied to the image."""

    def __init__(self, base: Dataset, indices: torch.Tensor, transform: Callable) -> None:
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[int(self.indices[i])]
        return self.transform(image), label


def _load_imagefolder(arg: str, options: _Options) -> DataBundle:
    """Class-per-folder images, resized and centre-cropped to `image_size`, ImageNet-normalised."""
    root = _existing_dir(arg, "imagefolder", "imagefolder:DIR")
    size, channels = options.image_size or 224, options.channels or 3
    plain, augmented = _pil_transforms(size, channels, options.augment)
    if (root / "train").is_dir():
        splits = _imagefolder_splits(root, options)
    else:
        folder = _image_folder(root)
        parts = _split(len(folder), (0.8, 0.1, 0.1), options.seed, f"imagefolder: {root}")
        splits = [(folder, idx) for idx in parts]
    train, val, test = (
        None if s is None else _TransformedSubset(*s, augmented if k == 0 else plain)
        for k, s in enumerate(splits)
    )
    classes = list(splits[0][0].classes)
    return DataBundle(
        name=f"imagefolder:{root.resolve().name}",
        kind="image",
        train=train,
        val=val,
        test=test,
        num_classes=len(classes),
        class_names=classes,
        input_shape=(channels, size, size),
        collate_fn=None,
    )


def _imagefolder_splits(root: Path, options: _Options) -> list[tuple[Any, torch.Tensor] | None]:
    """(folder, indices) for train, val and test from DIR/train, DIR/val and DIR/test; without DIR/val,
    val is a seeded `val_fraction` of DIR/train."""
    train = _image_folder(root / "train")
    val, test = (_matching_folder(root / part, train) for part in ("val", "test"))
    if val is None:
        train_idx, val_idx = _train_val(len(train), options, f"imagefolder: {root / 'train'}")
        return [(train, train_idx), (train, val_idx), _whole(test)]
    return [_whole(train), _whole(val), _whole(test)]


def _matching_folder(folder: Path, train: Any) -> Any:
    """The ImageFolder of an optional split folder, which must hold the same classes as train."""
    if not folder.is_dir():
        return None
    split = _image_folder(folder)
    if split.classes != train.classes:
        raise SpecError(
            f"imagefolder: {folder} has classes {split.classes} but {train.root} has {train.classes}; "
            "every split folder needs the same class folders"
        )
    return split


def _whole(dataset: Any) -> tuple[Any, torch.Tensor] | None:
    """(dataset, all its indices), or None for no dataset."""
    return None if dataset is None else (dataset, torch.arange(len(dataset)))


def _image_folder(folder: Path) -> Any:
    """torchvision's ImageFolder over `folder` (PIL images, no transform)."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(folder))
    except FileNotFoundError as e:
        raise SpecError(f"imagefolder: {folder} needs one sub-folder of images per class: {e}") from e


def _pil_transforms(size: int, channels: int, augment: bool) -> tuple[Callable, Callable]:
    """(evaluation, training) transforms from a PIL image to a normalised float tensor."""
    mean, std = (
        (_IMAGENET_MEAN, _IMAGENET_STD) if channels == 3 else (_IMAGENET_GREY_MEAN, _IMAGENET_GREY_STD)
    )
    grey = [v2.Grayscale(1)] if channels == 1 else []
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    plain = v2.Compose([v2.Resize(size), v2.CenterCrop(size), *grey, *to_tensor])
    if not augment:
        return plain, plain
    return plain, v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *grey, *to_tensor])
