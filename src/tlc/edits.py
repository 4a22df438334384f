"""Edits: typed, serializable changes to a model that re-apply themselves.

A compression result is a base architecture plus an ordered list of edits; ``recipe.json`` stores the
list and :func:`tlc.load` replays it on a freshly built model before loading the weights, so every
method's result loads without pickle. An edit applied for the first time may record what it decided
(the padding a linearization moved, say) and returns itself with that record, so that the replay
builds the same structure whatever values the fresh model holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from tlc._inputs import ExampleInputs
from tlc.errors import SpecError, TLCError

EDIT_TYPES: dict[str, type[Edit]] = {}


def register_edit(cls: type[Edit]) -> type[Edit]:
    """Class decorator: make an edit type known to :func:`edit_from_json` under its ``kind``."""
    if cls.kind in EDIT_TYPES and EDIT_TYPES[cls.kind] is not cls:
        raise ValueError(f"an edit of kind {cls.kind!r} is already registered")
    EDIT_TYPES[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class Edit:
    """One change to a model. Subclasses set ``kind`` and implement :meth:`apply`."""

    kind: ClassVar[str] = ""

    def apply(self, model: nn.Module, example_inputs: ExampleInputs) -> tuple[nn.Module, Edit]:
        """A new model with the edit applied (``model`` untouched), and the edit as applied (with what it
        recorded, for an exact replay)."""
        raise NotImplementedError

    @property
    def sites(self) -> tuple[str, ...]:
        """Activation sites this edit changes (none by default)."""
        return ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.repr}}


def edit_from_json(data: Mapping[str, Any]) -> Edit:
    """The edit a :meth:`Edit.to_json` dict describes; unknown kinds and fields are refused."""
    kind = data.get("kind")
    cls = EDIT_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise SpecError(f"unknown edit kind {kind!r} (known: {', '.join(sorted(EDIT_TYPES))})")
    names = {f.name for f in fields(cls) if f.repr}
    extra = set(data) - names - {"kind"}
    if extra:
        raise SpecError(f"edit {kind!r} has unknown fields: {', '.join(sorted(extra))}")
    return cls.from_fields(**{k: v for k, v in data.items() if k != "kind"})  # type: ignore[attr-defined]


def apply_edits(model: nn.Module, edits: Sequence[Edit], example_inputs: ExampleInputs) -> tuple[nn.Module, list[Edit]]:
    """``model`` with ``edits`` applied in order, and the edits as applied."""
    applied = []
    for edit in edits:
        model, done = edit.apply(model, example_inputs)
        applied.append(done)
    return model, applied


MAX_PADDING = 256  # a recorded padding move gathers the paddings of a few convolutions: no more than this


def _check(name: str, value: Any, valid: Any) -> None:
    """Refuse a malformed field of an edit, naming it (a recipe.json is data from elsewhere)."""
    if not valid(value):
        raise SpecError(f"edit field {name!r} is malformed: {value!r:.120}")


def _is_seq(value: Any, item: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(item(v) for v in value)


def _is_names(value: Any) -> bool:
    return _is_seq(value, lambda v: isinstance(v, str))


def _is_map(value: Any, item: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and item(v) for k, v in value.items())


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@register_edit
@dataclass(frozen=True)
class Linearize(Edit):
    """Sites become the identity, or a 0/1 channel gate where a mask is given (0 = channel removed).

    ``paddings`` holds the padding moves made when the edit was first applied (None until then): the
    replay sets them instead of planning them again from values that are not the trained ones."""

    kind: ClassVar[str] = "linearize"
    site_names: tuple[str, ...]
    masks: Mapping[str, tuple[int, ...] | None] = field(default_factory=dict)
    policy: str = "macs"
    paddings: Mapping[str, tuple[int, ...]] | None = None

    @classmethod
    def from_fields(cls, site_names: Sequence[str], masks: Mapping[str, Any] | None = None, policy: str = "macs",
                    paddings: Mapping[str, Sequence[int]] | None = None) -> Linearize:
        """The edit from its fields, checked (they may come from a recipe.json written elsewhere)."""
        _check("site_names", site_names, _is_names)
        _check("masks", masks or {}, lambda m: _is_map(m, lambda v: v is None or _is_seq(v, lambda b: b in (0, 1))))
        _check("policy", policy, lambda p: isinstance(p, str))
        _check("paddings", paddings or {}, lambda m: _is_map(m, lambda v: _is_seq(v, lambda p: type(p) is int and
                                                                                   0 <= p <= MAX_PADDING)))
        return cls(tuple(site_names), {k: None if v is None else tuple(int(b) for b in v) for k, v in
                                       (masks or {}).items()},
                   policy, None if paddings is None else {k: tuple(v) for k, v in paddings.items()})

    @classmethod
    def of(cls, masks: Mapping[str, torch.Tensor | None], policy: str = "macs") -> Linearize:
        """The edit linearizing every site of ``masks`` (a tensor of 0/1 per channel, or None)."""
        return cls.from_fields(list(masks), {k: None if m is None else [int(v) for v in torch.as_tensor(m).tolist()]
                                             for k, m in masks.items()}, policy)

    @property
    def sites(self) -> tuple[str, ...]:
        return self.site_names

    def mask_tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in self.masks.items() if v is not None}

    def apply(self, model: nn.Module, example_inputs: ExampleInputs) -> tuple[nn.Module, Linearize]:
        from tlc.surgery.linearize import linearize, set_paddings

        if self.paddings is None:
            before = dict((getattr(model, "_tlc_record", None) or {}).get("paddings", {}))
            form = linearize(model, list(self.site_names), example_inputs, self.mask_tensors(), policy=self.policy)
            after = form._tlc_record.get("paddings", {})
            moved = {k: tuple(v) for k, v in after.items() if before.get(k) != v}
            return form, Linearize(self.site_names, self.masks, self.policy, moved)
        form = linearize(model, list(self.site_names), example_inputs, self.mask_tensors(), exact=False,
                         policy=self.policy)
        set_paddings(form, self.paddings)
        form._tlc_record["paddings"] = {**form._tlc_record.get("paddings", {}),
                                        **{k: list(v) for k, v in self.paddings.items()}}
        return form, self


@register_edit
@dataclass(frozen=True)
class WeightMask(Edit):
    """Unstructured pruning: the listed weights are zero where pruned, and stay zero while training.

    The zeros live in the weights themselves (saved with them), so the replay changes no structure; the
    mask of a parameter is where it is zero (:func:`weight_masks`). ``sparsity`` records each
    parameter's fraction of zeros after the edit, for the report."""

    kind: ClassVar[str] = "weight_mask"
    sparsity: Mapping[str, float] = field(default_factory=dict)
    pruned: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_fields(cls, sparsity: Mapping[str, float]) -> WeightMask:
        _check("sparsity", sparsity, lambda m: _is_map(m, lambda v: type(v) in (int, float) and 0 <= v <= 1))
        return cls(dict(sparsity))

    @classmethod
    def of(cls, masks: Mapping[str, torch.Tensor]) -> WeightMask:
        """The edit zeroing each named parameter where its 0/1 mask is 0."""
        return cls({k: float((m == 0).float().mean()) for k, m in masks.items()}, dict(masks))

    def apply(self, model: nn.Module, example_inputs: ExampleInputs) -> tuple[nn.Module, WeightMask]:
        import copy

        if self.pruned is None:
            return model, self
        params = dict(model.named_parameters())
        unknown = [k for k in self.pruned if k not in params]
        if unknown:
            raise SpecError(f"weight mask names parameters the model does not have: {', '.join(unknown[:3])}")
        form = copy.deepcopy(model)
        params = dict(form.named_parameters())
        with torch.no_grad():
            for name, mask in self.pruned.items():
                params[name].mul_(mask.to(params[name]))
        if hasattr(model, "_tlc_record"):
            form._tlc_record = copy.deepcopy(model._tlc_record)
        return form, WeightMask(dict(self.sparsity))


@register_edit
@dataclass(frozen=True)
class ReplaceByIdentity(Edit):
    """A submodule whose input and output have the same shape becomes ``nn.Identity`` (LaCoOT removes a
    block so; candidates: :func:`tlc.criteria.blocks.candidate_blocks`).

    In an ``fx.GraphModule`` (a training form of :func:`tlc.linearize`) the submodule's code is inlined:
    there the nodes its call traced to are removed and what read their output reads its input
    (:func:`tlc.criteria.blocks.remove_call`). ``sites`` is the module path, so that a rejected step sets
    the block aside."""

    kind: ClassVar[str] = "replace_by_identity"
    module_path: str

    @classmethod
    def from_fields(cls, module_path: str) -> ReplaceByIdentity:
        _check("module_path", module_path, lambda v: isinstance(v, str) and bool(v))
        return cls(module_path)

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.module_path,)

    def apply(self, model: nn.Module, example_inputs: ExampleInputs) -> tuple[nn.Module, ReplaceByIdentity]:
        import copy

        from torch import fx

        from tlc.criteria.blocks import remove_call, unreplaceable

        if isinstance(model, fx.GraphModule):
            return remove_call(model, self.module_path, example_inputs), self
        try:
            model.get_submodule(self.module_path)
        except AttributeError as exc:
            raise SpecError(f"cannot replace '{self.module_path}' by the identity: the model has no such "
                            "submodule") from exc
        reason = unreplaceable(model, [self.module_path], example_inputs).get(self.module_path)
        if reason:
            raise TLCError(f"cannot replace '{self.module_path}' by the identity: {reason}")
        form = copy.deepcopy(model)
        form.set_submodule(self.module_path, nn.Identity())
        return form, self


MAX_TIED = 4096  # layers one tie names: far more than any network has of one shape


@register_edit
@dataclass(frozen=True)
class TieWeights(Edit):
    """Layers become one: each group of module paths (layers whose weights have one shape, biases too)
    shares one weight ``Parameter`` and one bias ``Parameter`` from then on (Layer Fusion's edit).

    Applied, each shared tensor holds the mean of what the layers held, every layer counting once. A
    layer already tied to others (an earlier fusion, or a tie of the architecture) brings them along: a
    tie grows, it never splits. The replay on load builds the same ties from a fresh model; the values
    come from the saved weights. ``sites`` names each group ``a=b``, so that a rejected step sets the
    pair aside."""

    kind: ClassVar[str] = "tie_weights"
    groups: tuple[tuple[str, ...], ...]

    @classmethod
    def from_fields(cls, groups: Sequence[Sequence[str]]) -> TieWeights:
        """The edit from its fields, checked (they may come from a recipe.json written elsewhere)."""
        _check("groups", groups, lambda g: _is_seq(g, lambda v: _is_names(v) and 2 <= len(v) <= MAX_TIED
                                                    and all(v) and len(set(v)) == len(v)))
        return cls(tuple(tuple(g) for g in groups))

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple("=".join(g) for g in self.groups)

    def apply(self, model: nn.Module, example_inputs: ExampleInputs) -> tuple[nn.Module, TieWeights]:
        import copy

        form = copy.deepcopy(model)
        for group in self.groups:
            _tie(form, group)
        if hasattr(model, "_tlc_record"):
            form._tlc_record = copy.deepcopy(model._tlc_record)
        return form, self


def _tie(model: nn.Module, paths: Sequence[str]) -> None:
    """Make the layers at ``paths`` (and every module already sharing their weight or bias) share one
    weight and one bias: the mean of their values."""
    layers = []
    for path in paths:
        try:
            layer = model.get_submodule(path)
        except AttributeError as exc:
            raise SpecError(f"cannot tie the weights of '{path}': the model has no such submodule") from exc
        if not isinstance(getattr(layer, "weight", None), nn.Parameter):
            raise SpecError(f"cannot tie the weights of '{path}': it has no weight parameter")
        layers.append(layer)
    for attr in ("weight", "bias"):
        params = [getattr(layer, attr, None) for layer in layers]
        if all(p is None for p in params):
            continue
        if not all(isinstance(p, nn.Parameter) and p.shape == params[0].shape and p.dtype == params[0].dtype
                   for p in params):
            found = ", ".join(f"{n}: {'none' if p is None else f'{p.dtype} {list(p.shape)}'}"
                              for n, p in zip(paths, params))
            raise SpecError(f"cannot tie layers whose {attr}s differ ({found})")
        holders = [(m, name) for m in model.modules() for name, p in m._parameters.items()
                   if p is not None and any(p is q for q in params)]
        with torch.no_grad():
            mean = sum(m._parameters[name].detach().double() for m, name in holders) / len(holders)
        shared = nn.Parameter(mean.to(params[0].dtype), requires_grad=params[0].requires_grad)
        for m, name in holders:
            setattr(m, name, shared)


def tied_layers(model: nn.Module) -> list[tuple[str, ...]]:
    """Module paths of the layers that share a weight ``Parameter`` with another one, one tuple per
    shared weight (model order): the ties :class:`TieWeights` made, and those of the architecture."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            holders.setdefault(id(weight), []).append(name)
    return [tuple(names) for names in holders.values() if len(names) > 1]


def weight_masks(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The 0/1 mask of each named parameter: 1 where it is non-zero (what unstructured pruning kept)."""
    params = dict(model.named_parameters())
    return {n: (params[n].detach() != 0).to(params[n].dtype) for n in names if n in params}


def edits_from_record(record: Mapping[str, Any]) -> list[Edit]:
    """The edits of a linearization record (``_tlc_record`` / a version-1 recipe): one :class:`Linearize`."""
    if not record.get("sites"):
        return []
    return [Linearize.from_fields(record["sites"], record.get("masks", {}), record.get("policy", "macs"),
                                  record.get("paddings", {}))]


def edits_to_json(edits: Sequence[Edit]) -> list[dict[str, Any]]:
    return [e.to_json() for e in edits]


def edits_from_json(data: Sequence[Mapping[str, Any]]) -> list[Edit]:
    return [edit_from_json(d) for d in data]


__all__ = ["EDIT_TYPES", "Edit", "Linearize", "ReplaceByIdentity", "TieWeights", "WeightMask", "apply_edits",
           "edit_from_json", "edits_from_json", "edits_from_record", "edits_to_json", "register_edit", "tied_layers",
           "weight_masks"]
