"""Crash-safe files: atomic text/JSON writes and checkpoints that are either complete or ignored.

Every file is written to a temporary file in its final directory, flushed to disk and then renamed over
its destination with ``os.replace``, so a reader sees the old content or the new one, never a mix. A
checkpoint ``NAME`` is three files: ``NAME.safetensors`` (tensors), ``NAME.optim.pt`` (optional optimizer
state) and ``NAME.json`` (metadata). The JSON is removed before and written after the others, so a
checkpoint counts as complete exactly when its JSON exists.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tlc.errors import SpecError, TLCError

_TENSORS, _OPTIMIZER, _META = ".safetensors", ".optim.pt", ".json"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` so that a crash leaves either the old file or the new one."""
    _atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | Path) -> Any:
    """The JSON value of a file, or a SpecError naming it when it is not JSON text."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path} is not a text file ({exc.reason})") from exc


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path`, atomically (see `atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(
    directory: str | Path,
    name: str,
    *,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    optimizer: dict[str, Any] | None = None,
) -> None:
    """Write checkpoint `name` in `directory`: `tensors` as safetensors (contiguous CPU copies, so tied
    tensors are stored twice), the JSON-able `state` and, if given, the `optimizer` state via torch.save.

    A checkpoint of the same name is invalidated first; use a new name per checkpoint to always keep
    a complete one on disk.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {key: _cpu_copy(key, value) for key, value in tensors.items()}
    text = json.dumps(state, indent=2) + "\n"  # fails on non-JSON state before anything is touched
    (directory / f"{name}{_META}").unlink(missing_ok=True)
    _atomic_write(directory / f"{name}{_TENSORS}", lambda tmp: save_file(cpu, str(tmp)))
    optimizer_path = directory / f"{name}{_OPTIMIZER}"
    if optimizer is None:
        optimizer_path.unlink(missing_ok=True)
    else:
        _atomic_write(optimizer_path, lambda tmp: torch.save(optimizer, tmp))
    atomic_write_text(directory / f"{name}{_META}", text)


def read_state(directory: str | Path, name: str) -> dict[str, Any]:
    """The JSON state of checkpoint `name` alone (no tensor read)."""
    meta = Path(directory) / f"{name}{_META}"
    if not meta.is_file():
        raise TLCError(f"checkpoint {name!r} in {directory} is missing or incomplete (no {meta.name})")
    return json.loads(meta.read_text(encoding="utf-8"))


def load_checkpoint(
    directory: str | Path, name: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """The tensors (on CPU), state and optimizer state (None if none was saved) of a complete checkpoint.

    The optimizer file is read with ``weights_only=True``: it may hold tensors and plain containers only.
    """
    directory = Path(directory)
    state = read_state(directory, name)
    tensors = load_file(str(directory / f"{name}{_TENSORS}"), device="cpu")
    optimizer_path = directory / f"{name}{_OPTIMIZER}"
    optimizer = (
        torch.load(optimizer_path, map_location="cpu", weights_only=True) if optimizer_path.is_file() else None
    )
    return tensors, state, optimizer


def complete_checkpoints(directory: str | Path, prefix: str) -> list[str]:
    """Names of the complete checkpoints in `directory` starting with `prefix`, in natural order
    (``epoch-2`` before ``epoch-10``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = [
        path.name[: -len(_META)]
        for path in directory.glob(f"{glob.escape(prefix)}*{_META}")
        if (directory / f"{path.name[: -len(_META)]}{_TENSORS}").is_file()
    ]
    return sorted(names, key=_natural_key)


def latest_complete(directory: str | Path, prefix: str) -> str | None:
    """The last complete checkpoint starting with `prefix` in natural name order, or None."""
    names = complete_checkpoints(directory, prefix)
    return names[-1] if names else None


def remove_checkpoint(directory: str | Path, name: str) -> None:
    """Delete checkpoint `name`, its JSON first so that it is never seen half-deleted."""
    directory = Path(directory)
    for suffix in (_META, _TENSORS, _OPTIMIZER):
        (directory / f"{name}{suffix}").unlink(missing_ok=True)


def remove_checkpoints(directory: str | Path) -> None:
    """Delete every checkpoint in `directory` (complete or not), then the folder itself when that leaves it
    empty: what a finished training no longer needs."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for name in {path.name[: -len(_META)] for path in directory.glob(f"*{_META}")}:
        remove_checkpoint(directory, name)
    if not any(directory.iterdir()):
        directory.rmdir()


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """`model`'s state dict as a safetensors file, written atomically (CPU copies; nothing pickled)."""
    state = {key: _cpu_copy(key, value) for key, value in model.state_dict().items()}
    _atomic_write(Path(path), lambda tmp: save_file(state, str(tmp)))


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key comparing digit runs as numbers."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]


def _cpu_copy(key: str, value: Any) -> torch.Tensor:
    """A contiguous CPU copy of a tensor that shares storage with nothing."""
    if not isinstance(value, torch.Tensor):
        raise TLCError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
    return value.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Let `write` fill a temporary file next to `path`, fsync it, rename it over `path`, fsync the folder.

    On any failure the temporary file is removed and `path` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync(path: Path) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry change (the rename) to disk where the platform allows it (not Windows)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
