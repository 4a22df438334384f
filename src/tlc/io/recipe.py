"""Save and load compressed models without pickle: a JSON recipe plus safetensors weights.

The recipe says which architecture was built (a model spec), what was done to it (an ordered list of
edits, see tlc.edits), how it was merged (policy, and the zero channels the merge planned with) and
what inputs it was traced with. Loading rebuilds the architecture, replays the edits, merges, and
loads the weights strictly, so a model that does not match is refused.

A folder to load is data from elsewhere, trusted no more than a downloaded file: :func:`load` runs no
code it names unless asked (``trust_code=True``, as Hugging Face's ``trust_remote_code``), reads no file
outside it, bounds every shape and size it declares before allocating anything, and checks the weights
file's header against the rebuilt model before reading a tensor.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from tlc._inputs import ExampleInputs, max_relative_error, run
from tlc.edits import Edit, apply_edits, edits_from_json, edits_from_record, edits_to_json
from tlc.errors import SpecError, TLCError
from tlc.surgery import pricing
from tlc.surgery.merge import merge
from tlc.surgery.plan import POLICIES
from tlc.train.checkpoint import atomic_write_json, read_json

FORMAT = "tlc-recipe"
VERSION = 2  # 2: a list of edits; 1: one linearization record (still loaded)
RECIPE = "recipe.json"
WEIGHTS = "weights.safetensors"
HF_CONFIG = "hf_config"  # the Hugging Face config.json of an hf: model, copied so that the folder rebuilds alone
FORMS = ("deploy", "training", "original")
MAX_RECIPE_BYTES = 64 * 2**20
MAX_INPUT_ELEMENTS = 2**24  # example inputs are a batch of two: 64 MiB of float32 is far more than any needs
MAX_INPUT_DIMS = 8
MAX_INPUT_NESTING = 8
# The architecture a recipe names may hold at most this many times the values of its weights file (a
# merge removes layers, not 98% of a network), and always up to MIN_ARCHITECTURE_VALUES (256 MiB of float32).
ARCHITECTURE_RATIO = 64
MIN_ARCHITECTURE_VALUES = 2**26
MAX_PRICES = 1 << 16  # latency table entries a recipe may record
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in (
    "float16", "bfloat16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64", "bool")}
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                       torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
                       torch.int64: "I64", torch.bool: "BOOL"}


# ============================================================================ example inputs


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


def build_inputs(desc: Any, seed: int = 0) -> ExampleInputs:
    """Example inputs matching a description (random floats, recorded integers), checked first: known
    dtypes, at most :data:`MAX_INPUT_ELEMENTS` values in all, integer values that fit their shape."""
    check_inputs(desc)
    return _build_inputs(desc, seed)


def check_inputs(desc: Any, where: str = "example_inputs") -> int:
    """Validate a description of example inputs without allocating anything; returns its element count."""
    total = _check_node(desc, where, 0)
    if total > MAX_INPUT_ELEMENTS:
        raise SpecError(f"{where} declare {total:,} values, more than the {MAX_INPUT_ELEMENTS:,} example inputs "
                        "may hold")
    return total


def _check_node(desc: Any, where: str, depth: int) -> int:
    if depth > MAX_INPUT_NESTING:
        raise SpecError(f"{where} are nested more than {MAX_INPUT_NESTING} levels deep")
    if not isinstance(desc, dict) or len(desc) != 1 or next(iter(desc)) not in ("tensor", "dict", "tuple"):
        raise SpecError(f"{where} must be one of {{'tensor': ...}}, {{'dict': ...}}, {{'tuple': [...]}}; "
                        f"got {desc!r:.80}")
    kind, body = next(iter(desc.items()))
    if kind == "tensor":
        return _check_tensor(body, where)
    if kind == "dict":
        if not isinstance(body, dict):
            raise SpecError(f"{where}: 'dict' must map input names to descriptions")
        return _sum_bounded(_check_node(v, f"{where}[{k!r}]", depth + 1) for k, v in body.items())
    if not isinstance(body, list):
        raise SpecError(f"{where}: 'tuple' must be a list of descriptions")
    return _sum_bounded(_check_node(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(body))


def _sum_bounded(counts: Any) -> int:
    total = 0
    for count in counts:
        total += count
        if total > MAX_INPUT_ELEMENTS:
            break
    return total


def _check_tensor(t: Any, where: str) -> int:
    if not isinstance(t, dict) or not {"shape", "dtype"} <= set(t) or set(t) - {"shape", "dtype", "values"}:
        raise SpecError(f"{where}: a tensor is described by 'shape', 'dtype' and (integers) 'values'")
    name, shape = t["dtype"], t["shape"]
    if not isinstance(name, str) or name not in DTYPES:
        raise SpecError(f"{where}: unknown dtype {name!r:.40} (known: {', '.join(DTYPES)})")
    if (not isinstance(shape, list) or len(shape) > MAX_INPUT_DIMS
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise SpecError(f"{where}: shape must be a list of at most {MAX_INPUT_DIMS} non-negative integers, "
                        f"got {shape!r:.80}")
    count = math.prod(shape)
    if count > MAX_INPUT_ELEMENTS:
        raise SpecError(f"{where}: shape {shape} holds {count:,} values, more than the {MAX_INPUT_ELEMENTS:,} "
                        "example inputs may hold")
    dtype = DTYPES[name]
    if dtype.is_floating_point:
        if "values" in t:
            raise SpecError(f"{where}: values are recorded for integer inputs only, not {name}")
        return count
    if "values" not in t:
        raise SpecError(f"{where}: integer inputs ({name}) must list their values")
    _check_values(t["values"], count, dtype, where)
    return count


def _check_values(values: Any, count: int, dtype: torch.dtype, where: str) -> None:
    if not isinstance(values, list) or len(values) != count:
        length = len(values) if isinstance(values, list) else type(values).__name__
        raise SpecError(f"{where}: 'values' must list the {count} values of its shape, got {length}")
    low, high = (0, 1) if dtype is torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    for v in values:
        if type(v) not in (int, bool) or not low <= v <= high:
            raise SpecError(f"{where}: value {v!r:.40} is not a {str(dtype).removeprefix('torch.')}")


def _build_inputs(desc: dict[str, Any], seed: int) -> ExampleInputs:
    if "tensor" in desc:
        t = desc["tensor"]
        dtype = DTYPES[t["dtype"]]
        if "values" in t:
            return torch.tensor(t["values"], dtype=dtype).reshape(t["shape"])
        return torch.randn(t["shape"], generator=torch.Generator().manual_seed(seed)).to(dtype)
    if "dict" in desc:
        return {k: _build_inputs(v, seed) for k, v in desc["dict"].items()}
    return tuple(_build_inputs(v, seed) for v in desc["tuple"])


def saved_example_inputs(directory: str | Path) -> ExampleInputs:
    """The example inputs a saved folder was traced with (checked like everything :func:`load` reads)."""
    return build_inputs(read_recipe(directory)["example_inputs"])


# ============================================================================ save


def _form(model: nn.Module) -> str:
    if isinstance(model, fx.GraphModule) and hasattr(model, "tlc_report"):
        return "deploy"
    return "training" if getattr(model, "_tlc_record", None) else "original"


def save(model: nn.Module, directory: str | Path, *, example_inputs: ExampleInputs,
         model_spec: dict[str, Any] | None = None, edits: Sequence[Edit] | None = None) -> Path:
    """Write ``recipe.json`` and ``weights.safetensors`` for a deploy form, training form or plain model.

    ``model_spec`` (``tlc.zoo.models.ModelSpec.to_json()``) tells :func:`load` how to build the
    architecture; without it (and without one recorded by ``compress``) ``load`` needs ``model=``.
    An ``hf:`` model's config.json is copied into ``hf_config/``, so that the folder rebuilds without
    reading the original one. ``edits`` is what was done to the architecture (what ``compress``
    returns); by default the linearization recorded by :func:`tlc.linearize`.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    record = copy.deepcopy(dict(getattr(model, "_tlc_record", {}) or {}))
    spec = model_spec if model_spec is not None else record.get("model")
    edits = list(edits) if edits is not None else edits_from_record(record)
    inputs = describe_inputs(example_inputs)
    check_inputs(inputs)
    weights, aliases = weights_to_save(model)
    tmp = out / f".{WEIGHTS}.tmp"
    save_file(weights, str(tmp), metadata={"format": FORMAT})
    tmp.replace(out / WEIGHTS)
    atomic_write_json(out / RECIPE, {
        "format": FORMAT, "version": VERSION, "form": _form(model), "model": spec, "edits": edits_to_json(edits),
        **_merge_facts(model, record),
        **_copy_hf_config(spec, out, record.get(HF_CONFIG) if spec == record.get("model") else None),
        "example_inputs": inputs, "weights": WEIGHTS, **({"aliases": aliases} if aliases else {}),
    })
    return out


def weights_to_save(model: nn.Module, *, clone: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What ``weights.safetensors`` holds for ``model``: each tensor of its state dict once (CPU copies,
    contiguous), under the first name that holds it; and the other names of a shared tensor (tied
    weights), ``{alias: stored name}``, which the recipe records and :func:`load` fills from it."""
    from tlc.measure.count import storage_key

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[Any, str] = {}
    for name, value in model.state_dict().items():
        key = storage_key(value)
        if key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        value = value.detach().cpu()
        tensors[name] = (value.clone() if clone else value).contiguous()
    return tensors, aliases


def weights_bytes(model: nn.Module) -> int:
    """The size in bytes of the ``weights.safetensors`` that :func:`save` writes for ``model`` (serialized in
    memory: shared tensors once)."""
    from safetensors.torch import save as serialize

    tensors, _ = weights_to_save(model, clone=False)
    return len(serialize(tensors, metadata={"format": FORMAT}))


def _merge_facts(model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
    """The policy, the recorded zero channels and (latency policy) the table entries a deploy form was
    merged with: what its replay needs to rebuild the same structure."""
    report = getattr(model, "tlc_report", None)
    if report is not None:
        return {"policy": report.policy, "zeros": report.zeros,
                **({"prices": report.prices, "plan_rule": report.plan_rule} if report.prices is not None else {})}
    return {"policy": record.get("policy"), "zeros": None}


def _copy_hf_config(spec: dict[str, Any] | None, out: Path, built_from: str | None) -> dict[str, str]:
    """Copy an hf: model's config.json into ``out/hf_config/`` (the recipe entry naming it), or nothing.
    ``built_from`` is the folder a loaded model was built from (its run's copy), used first."""
    if not spec or not isinstance(spec.get("spec"), str) or not spec["spec"].startswith("hf:"):
        return {}
    from tlc.zoo.models import hf_config_file

    source = hf_config_file(built_from or spec["spec"].removeprefix("hf:"))
    target = out / HF_CONFIG
    target.mkdir(exist_ok=True)
    if source.resolve() != (target / "config.json").resolve():
        tmp = target / ".config.json.tmp"
        shutil.copyfile(source, tmp)
        tmp.replace(target / "config.json")
    return {HF_CONFIG: HF_CONFIG}


# ============================================================================ load


def load(directory: str | Path, *, model: nn.Module | None = None, device: str = "cpu",
         trust_code: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save` (or by ``tlc compress``): no pickle involved.

    ``model`` is a freshly built instance of the original architecture, needed when the recipe holds
    no model spec (a model of your own). The recipe's edits are replayed on it, the deploy form is
    merged with the structure recorded at save time, and the weights must then fit exactly.

    A recipe whose model is built by Python code (``py:FILE.py:FUNCTION``), or from a Hugging Face folder
    outside ``directory``, is refused unless ``trust_code=True``: pass it only for folders you trust, since
    it runs that code. Paths in the recipe must lie inside ``directory``; its example inputs and the
    architecture it names are bounded before they are built; the weights file's names, shapes and dtypes
    are checked against the rebuilt model before any tensor is read.
    """
    from safetensors.torch import load_file

    folder = Path(directory)
    recipe = read_recipe(folder)
    weights_path = _inside(folder, recipe["weights"], "weights")
    header = _weights_header(weights_path)
    edits, policy, zeros = _recipe_edits(recipe, folder / RECIPE)
    prices = recipe.get("prices")  # chosen among by the rule recorded with them; 1 before rules were recorded
    table = None if prices is None else pricing.Fixed(prices, rule=recipe.get("plan_rule", 1))
    merged_with = {"policy": policy, "zeros": zeros, "table": table}
    example = build_inputs(recipe["example_inputs"])
    built_from = None
    if model is None:
        saved_values = sum(math.prod(shape) for shape, _ in header.values())
        original, built_from = _build_original(folder, recipe, saved_values, trust_code)
    else:
        original = copy.deepcopy(model)
    rebuilt = _replay(folder / RECIPE, original.eval(), recipe["form"], edits, merged_with, example)
    state = rebuilt.state_dict()
    aliases = _check_aliases(folder / RECIPE, recipe.get("aliases") or {}, state)
    _check_header(weights_path, header, {k: v for k, v in state.items() if k not in aliases})
    tensors = load_file(str(weights_path))
    rebuilt.load_state_dict({**tensors, **{alias: tensors[name] for alias, name in aliases.items()}}, strict=True)
    rebuilt._tlc_record = dict(getattr(rebuilt, "_tlc_record", {}) or {}, model=recipe.get("model"))
    if built_from is not None:  # saving the loaded model again copies the config it was built from
        rebuilt._tlc_record[HF_CONFIG] = built_from
    return rebuilt.to(device).eval()


def read_recipe(directory: str | Path) -> dict[str, Any]:
    """The checked ``recipe.json`` of a saved folder: its size, format, version, fields, paths and example
    inputs are validated; nothing it names is built or imported."""
    folder = Path(directory)
    path = folder / RECIPE
    if not path.is_file():
        raise SpecError(f"no {RECIPE} in {folder}: not a tlc output directory")
    _inside(folder, RECIPE, "recipe")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise SpecError(f"{path} is {path.stat().st_size:,} bytes, more than a recipe holds ({MAX_RECIPE_BYTES:,})")
    recipe = read_json(path)
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise SpecError(f"{path} is not a tlc recipe")
    version = recipe.get("version", 1)
    if type(version) is not int or version < 1:
        raise SpecError(f"{path}: version must be a positive integer, got {version!r:.40}")
    if version > VERSION:
        raise SpecError(f"{path} was written by a newer tlc (recipe version {version})")
    _check_fields(recipe, path)
    weights = _inside(folder, recipe.setdefault("weights", WEIGHTS), "weights")
    if not weights.is_file():
        raise SpecError(f"{folder} holds no {recipe['weights']}")
    check_inputs(recipe.get("example_inputs"), f"{path}: example_inputs")
    return recipe


def _check_fields(recipe: dict[str, Any], path: Path) -> None:
    """The types of a recipe's fields (the example inputs and edits are checked on their own)."""
    problems = []
    if recipe.get("form") not in FORMS:
        problems.append(f"form must be one of {', '.join(FORMS)}")
    if not isinstance(recipe.get("weights", WEIGHTS), str):
        problems.append("weights must be a file name")
    if recipe.get("model") is not None and not isinstance(recipe["model"], dict):
        problems.append("model must be a model spec object or null")
    if recipe.get("policy") is not None and recipe["policy"] not in POLICIES:
        problems.append(f"policy must be one of {', '.join(POLICIES)} or null")
    if recipe.get("zeros") is not None and not _is_zeros(recipe["zeros"]):
        problems.append("zeros must map operation names to {parameter: [channel indices]}")
    if recipe.get("prices") is not None and not _is_prices(recipe["prices"]):
        problems.append(f"prices must map at most {MAX_PRICES} layer keys to times >= 0")
    rule = recipe.get("plan_rule")
    if rule is not None and not (type(rule) is int and 1 <= rule <= pricing.PLAN_RULE):
        problems.append(f"plan_rule must be an integer from 1 to {pricing.PLAN_RULE} (a larger one: saved by a "
                        "newer tlc)")
    if not isinstance(recipe.get("edits", []), list) or not isinstance(recipe.get("record", {}), dict):
        problems.append("edits must be a list (record, of version 1, an object)")
    if recipe.get("aliases") is not None and not (isinstance(recipe["aliases"], dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in recipe["aliases"].items())):
        problems.append("aliases must map weight names to the weight names they share a tensor with")
    if recipe.get(HF_CONFIG) is not None and not isinstance(recipe[HF_CONFIG], str):
        problems.append(f"{HF_CONFIG} must be a folder name")
    if problems:
        raise SpecError(f"{path} is malformed: {'; '.join(problems)}")


def _is_prices(prices: Any) -> bool:
    return isinstance(prices, dict) and len(prices) <= MAX_PRICES and all(
        isinstance(k, str) and type(v) in (int, float) and math.isfinite(v) and v >= 0 for k, v in prices.items())


def _is_zeros(zeros: Any) -> bool:
    return isinstance(zeros, dict) and all(
        isinstance(ops, dict) and all(isinstance(c, list) and all(type(i) is int and i >= 0 for i in c)
                                      for c in ops.values()) for ops in zeros.values())


def _inside(folder: Path, name: Any, what: str) -> Path:
    """``folder / name``, refused unless it stays inside ``folder`` (no absolute path, no ``..``, no link
    leading out): a recipe names files of its own folder only."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise SpecError(f"{folder / RECIPE}: {what} must name a file in {folder}, got {name!r:.80}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise SpecError(f"{folder / RECIPE}: {what} {name!r} lies outside {folder}; a recipe names files of its "
                        "own folder only")
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise SpecError(f"{folder / RECIPE}: {what} {name!r} links outside {folder}; a recipe names files of its "
                        "own folder only")
    return path


def _recipe_edits(recipe: dict[str, Any], path: Path) -> tuple[list[Edit], str | None, Any]:
    """(edits, merge policy, recorded zeros) of a recipe; version 1 stored one linearization record."""
    try:
        if recipe.get("version", 1) < 2:
            record = recipe.get("record") or {}
            return edits_from_record(record), record.get("policy"), record.get("zeros")
        edits = recipe.get("edits") or []
        if not all(isinstance(e, dict) for e in edits):
            raise SpecError("each edit must be an object")
        return edits_from_json(edits), recipe.get("policy"), recipe.get("zeros")
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # SpecError is a ValueError
        raise SpecError(f"{path}: malformed edits: {exc}") from exc


def _build_original(folder: Path, recipe: dict[str, Any], saved_values: int,
                    trust_code: bool) -> tuple[nn.Module, str | None]:
    """The architecture the recipe's model spec names (and the Hugging Face folder it was built from, for
    hf: specs): user code only when trusted, no folder outside ``folder`` unless trusted, and no more
    values than :data:`ARCHITECTURE_RATIO` times the saved ones."""
    from tlc.zoo.models import ModelSpec, architecture_size, build_architecture

    path = folder / RECIPE
    if not recipe.get("model"):
        raise SpecError(f"{path} names no model spec: pass model=<a new instance of the architecture>")
    spec = ModelSpec.from_json(recipe["model"], resolve=False)
    if spec.kind == "py":
        file = spec.target.rpartition(":")[0] or spec.target
        if not trust_code:
            raise SpecError(f"{path} builds its model by running the Python file {file}; pass trust_code=True "
                            "(tlc.load) or --trust-code (tlc export) to run it, only for a folder you trust")
        return build_architecture(ModelSpec.from_json(recipe["model"])), None
    if spec.kind == "hf":
        spec = _hf_spec(folder, recipe, spec, trust_code)
    size, limit = architecture_size(spec), max(MIN_ARCHITECTURE_VALUES, ARCHITECTURE_RATIO * saved_values)
    if size > limit:
        raise SpecError(f"{path}: the model it names ({spec.spec}, {spec.kwargs!r:.120}) holds {size:,} "
                        f"values for {saved_values:,} saved ones; refused before building it")
    return build_architecture(spec), spec.target if spec.kind == "hf" else None


def _hf_spec(folder: Path, recipe: dict[str, Any], spec: Any, trust_code: bool) -> Any:
    """An hf: spec built from the config.json copied into the folder; a Hugging Face folder elsewhere
    (a recipe written before the copy, or by hand) is read only when trusted."""
    from tlc.zoo.models import HF_ALIASES

    if recipe.get(HF_CONFIG) is not None:
        return dataclasses.replace(spec, spec=f"hf:{_inside(folder, recipe[HF_CONFIG], HF_CONFIG).resolve()}")
    if spec.target in HF_ALIASES:  # an installed package's folder, named by tlc's own table
        return spec
    target = Path(spec.target)
    if not target.is_absolute():
        return dataclasses.replace(spec, spec=f"hf:{_inside(folder, spec.target, 'hf folder').resolve()}")
    if target.resolve().is_relative_to(folder.resolve()) or trust_code:
        return spec
    raise SpecError(f"{folder / RECIPE} builds its model from the Hugging Face folder {target}, outside {folder}; "
                    "pass trust_code=True (tlc.load) or --trust-code (tlc export) to read it, only if you trust it")


def _replay(path: Path, original: nn.Module, form: str, edits: list[Edit], merged_with: dict[str, Any],
            example: ExampleInputs) -> nn.Module:
    """The recipe's edits replayed on ``original`` and, for a deploy form, the recorded merge (``merged_with``:
    the policy, zero channels and latency prices :func:`tlc.merge` takes)."""
    try:
        rebuilt, _ = apply_edits(original, edits, example)
        if form == "deploy":  # the saved weights, not the fresh ones, are what the merge must match
            rebuilt = merge(rebuilt, example, verify=False, **merged_with)
    except SpecError:
        raise
    except (TLCError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SpecError(f"{path}: its edits do not replay on the model ({type(exc).__name__}: {reason})") from exc
    return rebuilt


def _check_aliases(path: Path, aliases: dict[str, str], state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The recipe's aliases (a weight filled from another stored one: tied weights), refused unless both
    names are weights of the rebuilt model, of one shape and dtype, and the stored one is no alias itself."""
    for alias, name in aliases.items():
        if alias not in state or name not in state:
            raise SpecError(f"{path}: alias {alias!r:.120} -> {name!r:.120} names a weight the rebuilt model "
                            "does not have")
        if name in aliases or alias == name:
            raise SpecError(f"{path}: alias {alias!r:.120} -> {name!r:.120} must name a stored weight")
        if state[alias].shape != state[name].shape or state[alias].dtype != state[name].dtype:
            raise SpecError(f"{path}: alias {alias} ({state[alias].dtype} {list(state[alias].shape)}) cannot share "
                            f"{name} ({state[name].dtype} {list(state[name].shape)})")
    return aliases


def _weights_header(path: Path) -> dict[str, tuple[list[int], str]]:
    """{name: (shape, safetensors dtype)} from a weights file's header; a truncated or foreign file is refused."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            return {name: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype()) for name in names}
    except (SafetensorError, OSError) as exc:
        raise SpecError(f"{path} is not a complete safetensors file ({exc})") from exc


def _check_header(path: Path, header: dict[str, tuple[list[int], str]], state: dict[str, torch.Tensor]) -> None:
    """Refuse weights whose names, shapes or dtypes differ from the rebuilt model's, before reading them."""
    missing = [k for k in state if k not in header]
    unexpected = [k for k in header if k not in state]
    if missing or unexpected:
        raise SpecError(f"{path.parent} does not match the rebuilt model: {len(missing)} missing and "
                        f"{len(unexpected)} unexpected weights (e.g. {', '.join((missing + unexpected)[:3])})")
    for name, tensor in state.items():
        shape, dtype = header[name]
        if list(tensor.shape) != list(shape) or _SAFETENSORS_DTYPES.get(tensor.dtype) != dtype:
            raise SpecError(f"{path}: weight {name} is {dtype} {list(shape)}, the rebuilt model's is "
                            f"{_SAFETENSORS_DTYPES.get(tensor.dtype, tensor.dtype)} {list(tensor.shape)}")


def check_reload(directory: str | Path, expected: nn.Module, example_inputs: ExampleInputs, *,
                 model: nn.Module | None = None, tolerance: float = 1e-6) -> float:
    """Load ``directory`` back and check that it computes what ``expected`` computes on the example
    inputs (relative error within ``tolerance``); returns the error, raises :class:`TLCError` otherwise.

    ``model`` stands in for the architecture when the recipe names no model spec: its values are
    replaced by ones first, so that the rebuilt structure comes from the recipe, as it does for a
    freshly built model, and never from the weights it happens to hold. The folder was just written by
    this process from the model spec its caller gave, so its code is trusted (``trust_code=True``).
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
        loaded = load(directory, model=stand_in, device=str(device), trust_code=True)
        err = max_relative_error(run(expected, example_inputs), run(loaded, example_inputs))
    except TLCError as exc:
        raise TLCError(f"{directory} was written but does not load back ({exc}); this is a bug in tlc, "
                       "please report it with the model") from exc
    if not err <= tolerance:
        raise TLCError(f"{directory} was written but loads back as another function (relative error {err:.1e} > "
                       f"{tolerance:.0e}); this is a bug in tlc, please report it with the model")
    return err
