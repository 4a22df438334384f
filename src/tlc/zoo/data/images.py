"""Images held as uint8 tensors (float conversion, resizing and augmentation per item), with the
Fashion-MNIST (IDX files) and scikit-learn digits readers."""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from tlc.errors import SpecError

from .core import DataBundle, _check_labels, _existing_dir, _Options, _split, _train_val


class _ImageTensors(Dataset):
    """uint8 images ``[N, C, H, W]`` and labels ``[N]`` seen through `indices`, turned into float one
    item at a time so that the whole set never sits in memory as float32."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, transform: _TensorTransform
    ) -> None:
        self.images, self.labels, self.indices, self.transform = images, labels, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        return self.transform(self.images[j]), int(self.labels[j])


class _TensorTransform:
    """uint8 ``[C, H, W]`` -> float ``[channels, size, size]``: scale to [0, 1], zero-pad, resize,
    augment (crop with padding 4 and flip), replicate a grey channel, normalise."""

    def __init__(
        self,
        *,
        max_value: float,
        pad: int,
        size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
    ) -> None:
        self.max_value, self.pad, self.size, self.channels = max_value, pad, size, channels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = (
            v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]) if augment else None
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float() / self.max_value
        if self.pad:
            x = F.pad(x, (self.pad,) * 4)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        if self.augment is not None:
            x = self.augment(x)
        if x.shape[0] != self.channels:
            x = x.expand(self.channels, -1, -1)
        return (x - self.mean) / self.std


def _grey_stats(images: torch.Tensor, max_value: float) -> tuple[float, float]:
    """Mean and standard deviation of uint8 pixel values scaled by `max_value`, from a histogram (exact,
    without a float copy of the images)."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(len(counts), dtype=torch.float64) / max_value
    mean = float((counts * values).sum() / counts.sum())
    var = float((counts * (values - mean) ** 2).sum() / counts.sum())
    return mean, max(var, 1e-12) ** 0.5


def _image_bundle(
    name: str,
    splits: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None],
    class_names: list[str],
    options: _Options,
    **transform: Any,
) -> DataBundle:
    """A bundle over uint8 image tensors: `splits` holds (images, labels, indices) for train, val and
    test (or None); `transform` is passed to `_TensorTransform`, with augmentation on train only."""
    plain = _TensorTransform(augment=False, **transform)
    augmented = _TensorTransform(augment=options.augment, **transform)
    train, val, test = (
        None if part is None else _ImageTensors(*part, augmented if k == 0 else plain)
        for k, part in enumerate(splits)
    )
    size = transform["size"]
    return DataBundle(
        name=name,
        kind="image",
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        class_names=class_names,
        input_shape=(transform["channels"], size, size),
        collate_fn=None,
    )


# ---- Fashion-MNIST

_FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def _load_fashion_mnist(arg: str, options: _Options) -> DataBundle:
    """Fashion-MNIST from IDX files, padded to 32x32 and normalised with the training mean/std."""
    folder = _fashion_dir(arg)
    train_x, train_y, test_x, test_y = (
        _read_idx(_idx_path(folder, base), ndim=3 if "images" in base else 1) for base in _FASHION_FILES
    )
    for images, labels, part in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if len(images) != len(labels):
            raise SpecError(
                f"fashion-mnist: {folder} holds {len(images)} {part} images but {len(labels)} {part} labels"
            )
        _check_labels(labels, 10, f"fashion-mnist: {folder} ({part} labels)")
    mean, std = _grey_stats(train_x, 255.0)
    train_idx, val_idx = _train_val(len(train_y), options, "fashion-mnist")
    train_x, test_x = train_x.unsqueeze(1), test_x.unsqueeze(1)
    splits = [
        (train_x, train_y, train_idx),
        (train_x, train_y, val_idx),
        (test_x, test_y, torch.arange(len(test_y))),
    ]
    return _image_bundle(
        "fashion-mnist",
        splits,
        list(_FASHION_CLASSES),
        options,
        max_value=255.0,
        pad=2,
        size=options.image_size or 32,
        channels=options.channels or 1,
        mean=(mean,),
        std=(std,),
    )


def _fashion_dir(arg: str) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (plain or .gz), in DIR or a default place."""
    if arg:
        roots = [_existing_dir(arg, "fashion-mnist", "fashion-mnist:DIR")]
    else:
        roots = [_FASHION_SYSTEM_DIR]
        if os.environ.get("TLC_DATA"):
            roots.append(Path(os.environ["TLC_DATA"]).expanduser() / "fashion-mnist")
    lacking = []
    for folder in (d for root in roots for d in (root, root / "FashionMNIST" / "raw")):
        if not folder.is_dir():
            continue
        missing = [base for base in _FASHION_FILES if _idx_path(folder, base) is None]
        if not missing:
            return folder
        if len(missing) < len(_FASHION_FILES):
            lacking.append(f"{folder} lacks {', '.join(m + '[.gz]' for m in missing)}")
    if lacking:
        raise SpecError(f"fashion-mnist: incomplete IDX files: {'; '.join(lacking)}")
    raise SpecError(
        f"fashion-mnist: no IDX files ({_FASHION_FILES[0]}[.gz], ...) in {' or '.join(map(str, roots))} "
        "(or their FashionMNIST/raw); run `apt-get install dataset-fashion-mnist`, set TLC_DATA, "
        "or pass fashion-mnist:DIR"
    )


def _idx_path(folder: Path, base: str) -> Path | None:
    """`folder/base`, or `folder/base.gz`, whichever exists."""
    return next((p for p in (folder / base, folder / f"{base}.gz") if p.is_file()), None)


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An IDX file of uint8 values with `ndim` dimensions, read with torchvision's reader (which takes only
    plain files, so a .gz file is decompressed into a temporary file first)."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    reader = read_image_file if ndim == 3 else read_label_file
    header_size = 4 + 4 * ndim
    try:
        if path.suffix != ".gz":
            with path.open("rb") as f:
                _check_idx_header(f.read(header_size), ndim, path)
            return reader(str(path))
        with gzip.open(path, "rb") as f:
            raw = f.read()
        _check_idx_header(raw[:header_size], ndim, path)
        with tempfile.TemporaryDirectory(prefix="tlc-idx-") as tmp:
            plain = Path(tmp) / path.stem
            plain.write_bytes(raw)
            return reader(str(plain))
    except (OSError, EOFError) as e:
        raise SpecError(f"{path}: cannot read the file ({e})") from e
    except (RuntimeError, ValueError) as e:
        raise SpecError(
            f"{path}: the data does not match the IDX header's shape ({e}); is it truncated?"
        ) from e


def _check_idx_header(header: bytes, ndim: int, path: Path) -> None:
    """Refuse anything but an IDX header of uint8 data with `ndim` dimensions (magic 0x0000080N)."""
    expected = bytes((0, 0, 8, ndim))
    if len(header) < 4 + 4 * ndim or header[:4] != expected:
        raise SpecError(
            f"{path}: not an IDX file of uint8 {'images' if ndim == 3 else 'labels'} "
            f"(magic {header[:4].hex() or 'missing'}, expected {expected.hex()})"
        )


# ---- sklearn digits


def _load_digits(arg: str, options: _Options) -> DataBundle:
    """scikit-learn's 8x8 digits (values 0..16), split 70/15/15 with the seed, normalised with train stats."""
    if arg:
        raise SpecError(f"digits takes no argument, got digits:{arg}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SpecError("digits needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    parts = _split(len(labels), (0.7, 0.15, 0.15), options.seed, "digits")
    mean, std = _grey_stats(images[parts[0]], 16.0)
    return _image_bundle(
        "digits",
        [(images, labels, idx) for idx in parts],
        [str(d) for d in range(10)],
        options,
        max_value=16.0,
        pad=0,
        size=options.image_size or 8,
        channels=options.channels or 1,
        mean=(mean,),
        std=(std,),
    )
