"""Save and load compressed models without pickle: a JSON recipe plus safetensors weights.

The recipe says which architecture was built (a model spec), what was done to it (an ordered list of
edits, see tlc.edits), how it was merged (policy, and the zero channels the merge planned with) and
what inputs it was traced with. Loading rebuilds the architecture, replays the edits, merges, and
loads the weights strictly, so a model that does not match is refused.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from tlc._inputs import ExampleInputs, max_relative_error, run
from tlc.edits import Edit, apply_edits, edits_from_json, edits_from_record, edits_to_json
from tlc.errors import SpecError, TLCError
from tlc.surgery.merge import merge
from tlc.train.checkpoint import atomic_write_json

FORMAT = "tlc-recipe"
VERSION = 2  # 2: a list of edits; 1: one linearization record (still loaded)
RECIPE = "recipe.json"
WEIGHTS = "weights.safetensors"


def describe_inputs(example: ExampleInputs) -> dict[str, Any]:
    """JSON description of example inputs: shapes and dtypes; integer tensors (token ids) by value."""
    if isinstance(example, torch.Tensor):
        desc: dict[str, Any] = {"shape": list(example.shape), "dtype": str(example.dtype).removeprefix("torch.")}
        if not example.is_floating_point():
            desc["values"] = example.detach().cpu().reshape(-1).tolist()
        return {"tensor": desc}
    if isinstance(example, dict):
        return {"dict": {k: describe_inputs(v) for k, v in example.items()}}
    if isinstance(example, list | tuple):
        return {"tuple": [describe_inputs(v) for v in example]}
    raise SpecError(f"cannot describe example inputs of type {type(example).__name__}")


def build_inputs(desc: dict[str, Any], seed: int = 0) -> ExampleInputs:
    """Example inputs matching a description (random floats, recorded integers)."""
    if "tensor" in desc:
        t = desc["tensor"]
        dtype = getattr(torch, t["dtype"])
        if "values" in t:
            return torch.tensor(t["values"], dtype=dtype).reshape(t["shape"])
        return torch.randn(*t["shape"], generator=torch.Generator().manual_seed(seed)).to(dtype)
    if "dict" in desc:
        return {k: build_inputs(v, seed) for k, v in desc["dict"].items()}
    return tuple(build_inputs(v, seed) for v in desc["tuple"])


def _form(model: nn.Module) -> str:
    if isinstance(model, fx.GraphModule) and hasattr(model, "tlc_report"):
        return "deploy"
    return "training" if getattr(model, "_tlc_record", None) else "original"


def save(model: nn.Module, directory: str | Path, *, example_inputs: ExampleInputs,
         model_spec: dict[str, Any] | None = None, edits: Sequence[Edit] | None = None) -> Path:
    """Write ``recipe.json`` and ``weights.safetensors`` for a deploy form, training form or plain model.

    ``model_spec`` (``tlc.zoo.models.ModelSpec.to_json()``) tells :func:`load` how to build the
    architecture; without it (and without one recorded by ``compress``) ``load`` needs ``model=``.
    ``edits`` is what was done to the architecture (what ``compress`` returns); by default the
    linearization recorded by :func:`tlc.linearize`.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    record = copy.deepcopy(dict(getattr(model, "_tlc_record", {}) or {}))
    spec = model_spec if model_spec is not None else record.get("model")
    edits = list(edits) if edits is not None else edits_from_record(record)
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    tmp = out / f".{WEIGHTS}.tmp"
    save_file(weights, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / WEIGHTS)
    atomic_write_json(out / RECIPE, {
        "format": FORMAT, "version": VERSION, "form": _form(model), "model": spec, "edits": edits_to_json(edits),
        **_merge_facts(model, record),
        "example_inputs": describe_inputs(example_inputs), "weights": WEIGHTS,
    })
    return out


def _merge_facts(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
    """The policy and the recorded zero channels a deploy form was merged with (what its replay needs)."""
    report = getattr(model, "tlc_report", None)
    if report is not None:
        return {"policy": report.policy, "zeros": report.zeros}
    return {"policy": record.get("policy"), "zeros": None}


def load(directory: str | Path, *, model: nn.Module | None = None, device: str = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save` (or by ``tlc compress``): no pickle involved.

    ``model`` is a freshly built instance of the original architecture, needed when the recipe holds
    no model spec (a model of your own). The recipe's edits are replayed on it, the deploy form is
    merged with the structure recorded at save time, and the weights must then fit exactly.
    """
    from safetensors.torch import load_file

    folder = Path(directory)
    recipe = _read_recipe(folder)
    if model is None:
        if not recipe.get("model"):
            raise SpecError(f"{folder / RECIPE} names no model spec: pass model=<a new instance of the architecture>")
        from tlc.zoo.models import ModelSpec

        original = ModelSpec.from_json(recipe["model"]).build()
    else:
        original = copy.deepcopy(model)
    original.eval()
    example = build_inputs(recipe["example_inputs"])
    edits, policy, zeros = _recipe_edits(recipe)
    rebuilt, _ = apply_edits(original, edits, example)
    if recipe["form"] == "deploy":  # the saved weights, not the fresh ones, are what the merge must match
        rebuilt = merge(rebuilt, example, policy=policy, verify=False, zeros=zeros)
    weights = load_file(str(folder / recipe.get("weights", WEIGHTS)))
    missing, unexpected = rebuilt.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SpecError(f"{folder} does not match the rebuilt model: {len(missing)} missing and {len(unexpected)} "
                        f"unexpected weights (e.g. {', '.join((missing + unexpected)[:3])})")
    rebuilt._tlc_record = dict(getattr(rebuilt, "_tlc_record", {}) or {}, model=recipe.get("model"))
    return rebuilt.to(device).eval()


def _recipe_edits(recipe: dict[str, Any]) -> tuple[list[Edit], str | None, Any]:
    """(edits, merge policy, recorded zeros) of a recipe; version 1 stored one linearization record."""
    if recipe.get("version", 1) < 2:
        record = recipe.get("record") or {}
        return edits_from_record(record), record.get("policy"), record.get("zeros")
    return edits_from_json(recipe.get("edits") or []), recipe.get("policy"), recipe.get("zeros")


def check_reload(directory: str | Path, expected: nn.Module, example_inputs: ExampleInputs, *,
                 model: nn.Module | None = None, tolerance: float = 1e-6) -> float:
    """Load ``directory`` back and check that it computes what ``expected`` computes on the example
    inputs (relative error within ``tolerance``); returns the error, raises :class:`TLCError` otherwise.

    ``model`` stands in for the architecture when the recipe names no model spec: its values are
    replaced by ones first, so that the rebuilt structure comes from the recipe, as it does for a
    freshly built model, and never from the weights it happens to hold.
    """
    stand_in = None
    if model is not None:
        stand_in = copy.deepcopy(model)
        with torch.no_grad():
            for tensor in [*stand_in.parameters(), *stand_in.buffers()]:
                if tensor.is_floating_point():
                    tensor.fill_(1.0)
    device = next((p.device for p in expected.parameters()), torch.device("cpu"))
    try:
        loaded = load(directory, model=stand_in, device=str(device))
        err = max_relative_error(run(expected, example_inputs), run(loaded, example_inputs))
    except TLCError as exc:
        raise TLCError(f"{directory} was written but does not load back ({exc}); this is a bug in tlc, "
                       "please report it with the model") from exc
    if not err <= tolerance:
        raise TLCError(f"{directory} was written but loads back as another function (relative error {err:.1e} > "
                       f"{tolerance:.0e}); this is a bug in tlc, please report it with the model")
    return err


def _read_recipe(folder: Path) -> dict[str, Any]:
    path = folder / RECIPE
    if not path.is_file():
        raise SpecError(f"no {RECIPE} in {folder}: not a tlc output directory")
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if recipe.get("format") != FORMAT:
        raise SpecError(f"{path} is not a tlc recipe")
    if recipe.get("version", 0) > VERSION:
        raise SpecError(f"{path} was written by a newer tlc (recipe version {recipe['version']})")
    if not (folder / recipe.get("weights", WEIGHTS)).is_file():
        raise SpecError(f"{folder} holds no {recipe.get('weights', WEIGHTS)}")
    return recipe
