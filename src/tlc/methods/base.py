"""The method protocol and the registry of methods.

A method is one class in one file, registered by name, with its own config dataclass and named presets.
It decides only what is its own: how to prepare the model, what to change at each step (a
:class:`Proposal` of edits with the evidence for them), an extra training loss and an after-step
callback for fine-tuning, and what to change once the loop is over. Everything else (budget, stopping,
calibration, fine-tuning, checkpoints and resume, merge, measurement, report) is shared and knows no
method: see :mod:`tlc.run.loop` and docs/methods.md.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tlc.edits import Edit
from tlc.errors import SpecError, TLCError
from tlc.graph import Graph
from tlc.run.config import RunConfig, RunContext
from tlc.train import FitConfig

# The retraining recipe of the published code of TLC, EASIER and NEPENTHE (one research group; CIFAR-10):
# SGD lr 0.1, momentum 0.9, weight decay 1e-4, 160 epochs, lr x0.1 at 50% and 75% of the run.
PAPER_RETRAINING = FitConfig(epochs=160.0, lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="step",
                             milestones=(0.5, 0.75), gamma=0.1)


class NoCandidate(TLCError):
    """The method has nothing left to propose (the message says why); the run stops there."""


@dataclass
class Proposal:
    """What one step changes, and why.

    ``edits`` are applied to the current training form; ``evidence`` is the method's own account (loss
    gaps, entropies, sparsity, ...: JSON values), recorded in the step; ``fallback`` is a smaller proposal
    tried when this one breaks the budget; ``label`` is the log line's description; ``finetune=False``
    skips the step's fine-tuning (a protocol that removes without healing)."""

    edits: list[Edit]
    evidence: dict[str, Any] = field(default_factory=dict)
    fallback: Proposal | None = None
    label: str = ""
    finetune: bool = True  # False: the step is judged as edited, with no fine-tuning (no "healing")

    @property
    def sites(self) -> list[str]:
        """The activation sites the edits change (set aside when the step is rejected)."""
        return [s for e in self.edits for s in e.sites]


class Method:
    """Base class of every method: subclasses set ``name``, ``Config`` and ``presets`` and implement
    :meth:`propose`; the other hooks default to doing nothing."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)
    presets: ClassVar[dict[str, dict[str, Any]]] = {"default": {}}

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    def prepare(self, model: nn.Module, run: RunContext) -> list[Edit]:
        """Edits made once before the first step (e.g. activations made learnable)."""
        return []

    def pretrain(self, run: RunContext) -> FitConfig | None:
        """Training before the first step, with the method's loss and after-step hooks (e.g. a regularizer
        that makes blocks removable); None: none. Checkpointed and resumed like a step."""
        return None

    def propose(self, model: nn.Module, graph: Graph, run: RunContext, exclude: Sequence[str]) -> Proposal:
        """This step's edits for ``model`` (traced as ``graph``), not touching the sites in ``exclude``
        (set aside after a rejected step); raise :class:`NoCandidate` when nothing is left."""
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs: Any, labels: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor | None:
        """An extra training-loss term during fine-tuning (None: none)."""
        return None

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step of fine-tuning (e.g. re-apply weight masks)."""

    def finalize(self, model: nn.Module, run: RunContext) -> list[Edit]:
        """Edits made to the chosen model once the loop is over (e.g. snap learned slopes)."""
        return []

    def param_lr(self, model: nn.Module) -> dict[str, float]:
        """Learning rates of the method's own parameters during fine-tuning, by name (empty: the run's)."""
        return {}

    def has_fit_hooks(self) -> bool:
        """Whether fine-tuning must call :meth:`loss` / :meth:`after_step` / :meth:`param_lr` (overridden)."""
        hooks = ("loss", "after_step", "param_lr")
        return any(getattr(type(self), hook) is not getattr(Method, hook) for hook in hooks)


# ============================================================================ registry

# Methods of the package, imported on first use (so that importing tlc does not import every method).
BUILTIN = {
    "tlc": "tlc.methods.tlc",
    "easier": "tlc.methods.easier",
    "nepenthe": "tlc.methods.nepenthe",
    "lacoot": "tlc.methods.lacoot",
    "layer_collapse": "tlc.methods.layer_collapse",
    "layer_folding": "tlc.methods.layer_folding",
    "layer_fusion": "tlc.methods.layer_fusion",
}
_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method=cls.name`` / ``--method NAME``."""
    if not cls.name or not isinstance(cls.name, str):
        raise TypeError(f"{cls.__name__} needs a class attribute name = '...'")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass (the method's own settings)")
    if "default" not in cls.presets:
        raise TypeError(f"{cls.__name__}.presets needs a 'default' entry")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered methods (the package's and any registered since)."""
    for name in BUILTIN:
        method_class(name)
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The method registered as ``name``, or defined in a user's file as ``py:FILE.py:CLASS``."""
    if name.startswith("py:"):
        return _method_from_file(name[3:])
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        known = sorted(set(BUILTIN) | set(_REGISTRY))
        raise SpecError(f"unknown method {name!r}; available: {', '.join(known)}, or py:FILE.py:CLASS")
    return _REGISTRY[name]


def _method_from_file(target: str) -> type[Method]:
    from tlc.zoo.models import _load_py_function

    file, sep, cls_name = target.rpartition(":")
    if not sep or not file.endswith(".py") or not cls_name.isidentifier():
        raise SpecError(f"a method in a file is py:FILE.py:CLASS, got py:{target}")
    path = Path(file).expanduser()
    if not path.is_file():
        raise SpecError(f"py: no such file {path}")
    cls = _load_py_function(path.resolve(), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise SpecError(f"py:{target} is not a subclass of tlc.methods.base.Method")
    return register_method(cls)


# ============================================================================ settings


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def method_options(cls: type[Method]) -> list[dataclasses.Field]:
    """The method's own settings (fields of its Config), for --help and --set."""
    return list(dataclasses.fields(cls.Config))


def build_configs(cls: type[Method], preset: str = "default", overrides: Mapping[str, Any] | None = None,
                  run: RunConfig | None = None, method_config: Any = None) -> tuple[RunConfig, Any]:
    """(RunConfig, method config) of ``cls`` under ``preset``, then ``overrides`` (each key a field of
    RunConfig or of the method's Config). A given ``run`` (``method_config``) replaces the defaults and
    the preset's shared (own) settings."""
    if preset not in cls.presets:
        raise SpecError(f"method {cls.name!r} has no preset {preset!r}; presets: {', '.join(cls.presets)}")
    run_keys, own_keys = _fields(RunConfig), _fields(cls.Config)
    preset_settings = {k: v for k, v in cls.presets[preset].items()  # a given config replaces its part of it
                       if (k in own_keys and method_config is None) or (k not in own_keys and run is None)}
    settings = {**preset_settings, **(overrides or {})}
    unknown = sorted(set(settings) - run_keys - own_keys)
    if unknown:
        raise SpecError(f"unknown setting(s) {', '.join(unknown)} for method {cls.name!r}; its own: "
                        f"{', '.join(sorted(own_keys)) or 'none'} (shared: see RunConfig)")
    run_settings = {k: v for k, v in settings.items() if k in run_keys and k not in own_keys}
    own_settings = {k: v for k, v in settings.items() if k in own_keys}
    try:
        run_config = dataclasses.replace(run or RunConfig(),
                                         **({"preset": preset, **run_settings} if run is None else run_settings))
        own = dataclasses.replace(method_config if method_config is not None else cls.Config(), **own_settings)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"method {cls.name!r}: {exc}") from exc
    return run_config, own


def parse_setting(cls: type[Method], text: str) -> tuple[str, Any]:
    """``key=value`` of ``--set``: the value parsed after the field's type (bool, int, float, str, None)."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    fields = {f.name: f for f in [*dataclasses.fields(RunConfig), *dataclasses.fields(cls.Config)]}
    if not sep or key not in fields:
        raise SpecError(f"--set {text!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
    return key, _parse_value(raw.strip(), fields[key], key)


def _parse_value(raw: str, spec: dataclasses.Field, key: str) -> Any:
    kind = str(spec.type)
    if raw.lower() in ("none", "null") and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError as exc:
        raise SpecError(f"--set {key}={raw}: expected {kind}") from exc
    if kind.startswith("str"):
        return raw
    raise SpecError(f"--set {key}: a {kind} setting cannot be given on the command line")
