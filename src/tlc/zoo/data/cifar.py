"""The CIFAR-10/100 reader: python batch files, unpickled with an allowlist that admits only numpy arrays."""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tlc.errors import SpecError

from .core import DataBundle, _check_labels, _existing_dir, _Options, _train_val
from .images import _image_bundle


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
