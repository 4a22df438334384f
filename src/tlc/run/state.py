"""Resume state of a run: what the steps so far decided, checkpointed atomically after each step."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlc.edits import edits_from_record
from tlc.errors import SpecError
from tlc.run.config import STOP_SETTINGS
from tlc.train.checkpoint import latest_complete, load_checkpoint, save_checkpoint

CHECKPOINT_PREFIX = "step_"


@dataclass
class RunState:
    """How far a run got. ``edits`` (JSON) rebuild the current training form from the prepared model,
    ``best_edits`` the best one within the budget."""

    step: int = 0
    edits: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0
    best_edits: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = ""
    fingerprint: str = ""
    set_aside: list[str] = field(default_factory=list)  # sites of rejected steps, not tried again
    elapsed_s: float = 0.0  # wall time of the run up to this checkpoint, across resumes
    pretrained: bool = False  # the method's training before the first step is done (its weights: step 0)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunState:
        """The state of a checkpoint, also one written before edits existed (a linearization record)."""
        raw = dict(raw)
        for old, new in (("record", "edits"), ("best_record", "best_edits")):
            if old in raw:
                raw[new] = [e.to_json() for e in edits_from_record(raw.pop(old) or {})]
        return cls(**raw)


def fingerprint(method: str, settings: dict[str, Any], extra: dict[str, Any]) -> str:
    """What a checkpoint must share with a run to be resumed by it (JSON)."""
    return json.dumps({"method": method, "config": settings, **extra}, sort_keys=True, default=str)


def same_run(stored: str, current: str, defaults: dict[str, Any]) -> bool:
    """Whether a checkpoint's fingerprint names this run. Settings that a newer tlc added count as the
    same when they hold their ``defaults``, so a run started by an older version still resumes; the
    :data:`STOP_SETTINGS` may differ."""
    if stored == current:
        return True
    old, new = json.loads(stored), json.loads(current)
    old.setdefault("method", "tlc")  # runs from before the method registry were TLC runs
    defaults = json.loads(json.dumps(defaults, default=str))
    added = set(new["config"]) - set(old["config"])
    if any(new["config"][k] != defaults.get(k) for k in added):
        return False
    new["config"] = {k: v for k, v in new["config"].items() if k not in added and k not in STOP_SETTINGS}
    old["config"] = {k: v for k, v in old["config"].items() if k not in STOP_SETTINGS and k != "preset"}
    new["config"].pop("preset", None)
    return old == new


def save_state(directory: Path, state: RunState, model: nn.Module | None, start: float) -> None:
    state.elapsed_s = time.perf_counter() - start
    tensors = dict(model.state_dict()) if model is not None else {}
    save_checkpoint(directory, f"{CHECKPOINT_PREFIX}{state.step:03d}", tensors=tensors, state=asdict(state))


def load_state(directory: Path, current: str,
               defaults: dict[str, Any]) -> tuple[RunState, dict[str, torch.Tensor]] | None:
    """The latest complete checkpoint of ``directory`` (None when there is none); refused when it was
    written by another run."""
    name = latest_complete(directory, CHECKPOINT_PREFIX)
    if name is None:
        return None
    tensors, raw, _ = load_checkpoint(directory, name)
    state = RunState.from_json(raw)
    if not same_run(state.fingerprint, current, defaults):
        raise SpecError(f"cannot resume from {directory}: it was started with other settings, model or data; "
                        "use another --out directory or the same options")
    return state, tensors


def step_weights(directory: Path, step: int) -> dict[str, torch.Tensor]:
    tensors, _, _ = load_checkpoint(directory, f"{CHECKPOINT_PREFIX}{step:03d}")
    return tensors
