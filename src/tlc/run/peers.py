"""Width-pruning baselines through Torch-Pruning (DepGraph, CVPR 2023), the optional extra ``peers``.

A depth result is set against channel pruning of the same base model to the same MACs, fine-tuned for the
same epochs: Torch-Pruning's pruner removes the least important channels of every layer (the classifier's
outputs kept), a small share per step, until the model's MACs at batch 1 are at or below the target.

Pruning is local (every layer loses the same share of its channels at each step, ``global_pruning=False``),
so the shapes after ``n`` steps depend on ``n`` alone, not on the weights or the importance: a saved run is
rebuilt by replaying its number of steps and loading its weights.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from tlc._inputs import ExampleInputs, as_call, output_tensors, to_device
from tlc._inputs import run as run_model
from tlc.errors import TLCError
from tlc.measure import activations, count_macs, count_params, depth
from tlc.measure.count import model_device
from tlc.measure.latency import rebatch
from tlc.train import FitConfig, evaluate, fit, logits_of
from tlc.train.checkpoint import atomic_write_json, read_json, remove_checkpoints, save_weights
from tlc.train.distributed import barrier, is_main_process

BASELINES: dict[str, str] = {"torch-pruning": "magnitude", "torch-pruning-taylor": "taylor"}
STEPS = 100  # the pruning schedule: step n removes n % of every layer's initial channels
WEIGHTS, RECORD, FIT_DIR = "weights.safetensors", "baseline.json", "fit"
_INSTALL = "the torch-pruning baseline needs the optional package torch-pruning: pip install 'tlc[peers]'"


def require_torch_pruning() -> ModuleType:
    """The `torch_pruning` module, or a TLCError saying how to install it."""
    try:
        return importlib.import_module("torch_pruning")
    except ImportError as exc:
        raise TLCError(_INSTALL) from exc


@dataclass
class WidthJob:
    """What one baseline run needs."""

    model: nn.Module  # the trained base (never modified)
    train_data: Dataset
    val_data: Dataset
    test_data: Dataset | None
    collate_fn: Callable | None
    example_inputs: ExampleInputs  # a tensor or dict of tensors, batch >= 1
    calibration: list  # (inputs, labels) batches (tlc.run.data.calibration_batches); Taylor uses them
    finetune: FitConfig  # its epochs = the epochs the depth result used
    target_macs: int  # MACs at batch 1
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    log: Callable[[str], None] = print


def prune_to_macs(
    model: nn.Module,
    example_inputs: ExampleInputs,
    target_macs: int,
    *,
    importance: str = "magnitude",
    calibration: list | None = None,
    rounds: int | None = None,
) -> tuple[nn.Module, dict]:
    """A channel-pruned copy of `model` (which is left untouched) with at most `target_macs` MACs at batch 1.

    Torch-Pruning's `BasePruner` ranks channels by `GroupMagnitudeImportance` ("magnitude") or by
    `GroupTaylorImportance` ("taylor", fed the gradients of the cross-entropy on the `calibration` batches,
    recomputed before every step) and prunes in steps of 1 % of each layer's channels, never the classifier's
    outputs nor a layer's last channel (Torch-Pruning's own guard), until the target is met. With `rounds`,
    exactly that many steps are taken (the replay of a saved run). When even the last step leaves the model
    above the target, the result says ``reached: False`` rather than looping on. The copy stays on the
    device of `model`.

    Returns the pruned copy and ``{"importance", "rounds", "macs", "params", "reached"}``.
    """
    pruned = copy.deepcopy(model)
    return pruned, _prune_in_place(pruned, example_inputs, target_macs, importance, calibration, rounds)


def run_width_baseline(name: str, job: WidthJob, out_dir: Path) -> tuple[nn.Module, dict]:
    """Prune `job.model` to `job.target_macs`, fine-tune, evaluate, and record the run in `out_dir`.

    Fine-tuning checkpoints into ``out_dir/fit`` and resumes from there, so a killed run continues. The
    result is ``out_dir/weights.safetensors`` and ``out_dir/baseline.json`` (the record, returned with the
    model, in eval mode on `job.device`); when both exist the model is rebuilt from them without training.
    """
    if name not in BASELINES:
        raise TLCError(f"unknown width baseline {name!r}; known: {', '.join(BASELINES)}")
    tp = require_torch_pruning()
    out_dir = Path(out_dir)
    if (out_dir / WEIGHTS).is_file() and (out_dir / RECORD).is_file():
        return _rebuild(name, job, out_dir)
    started = time.perf_counter()
    example = to_device(rebatch(job.example_inputs, 1), job.device)
    model = copy.deepcopy(job.model).to(job.device)
    info = _prune_in_place(model, example, job.target_macs, BASELINES[name], job.calibration, None)
    job.log(f"{name}: {info['macs']:,} MACs after {info['rounds']} pruning steps (target {job.target_macs:,})"
            + ("" if info["reached"] else ": the target cannot be reached by channel pruning"))
    fitted = fit(model, job.train_data, job.finetune, collate_fn=job.collate_fn, device=job.device, seed=job.seed,
                 checkpoint_dir=out_dir / FIT_DIR, resume=True, progress=job.progress,
                 description=f"{name} fine-tune")
    if fitted.stopped_reason:
        job.log(f"{name}: fine-tuning stopped early ({fitted.stopped_reason})")
    model.eval()
    record = {
        "name": name, "method": "torch-pruning", "importance": info["importance"],
        "target_macs": int(job.target_macs), "macs": info["macs"], "params": info["params"],
        "depth": depth(model, example), "activations": activations(model, example),
        "rounds": info["rounds"], "reached": info["reached"], "finetune_epochs": job.finetune.epochs,
        "finetune_stopped": fitted.stopped_reason,
        "val_accuracy": _accuracy(model, job.val_data, job),
        "test_accuracy": None if job.test_data is None else _accuracy(model, job.test_data, job),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "torch_pruning": _version(tp),
    }
    if is_main_process():  # under torchrun every rank holds the same model; rank 0 writes it
        save_weights(model, out_dir / WEIGHTS)
        atomic_write_json(out_dir / RECORD, record)
        remove_checkpoints(out_dir / FIT_DIR)
    barrier()
    job.log(f"{name}: val accuracy {record['val_accuracy']:.4f}, {record['params']:,} params, "
            f"depth {record['depth']}; saved in {out_dir}")
    return model, record


def _prune_in_place(model: nn.Module, example_inputs: ExampleInputs, target_macs: int, importance: str,
                    calibration: list | None, rounds: int | None) -> dict[str, Any]:
    """Prune `model` itself (see `prune_to_macs`) and return what was done."""
    tp = require_torch_pruning()
    _check_arguments(target_macs, importance, calibration, rounds)
    what = type(model).__name__
    device = model_device(model)
    example = to_device(rebatch(example_inputs, 1), device)
    was_training = model.training
    reference = _output_shapes(model, example, f"{what} does not run on the example inputs")
    macs = count_macs(model, example)
    done = 0
    try:
        with torch.enable_grad():
            pruner = _pruner(tp, model, example, importance)
            while done < (STEPS if rounds is None else rounds) and (rounds is not None or macs > target_macs):
                if importance == "taylor":
                    _calibration_gradients(model, calibration, device)
                pruner.step()  # Torch-Pruning skips a group that would leave a layer no channel
                _sync_head_sizes(model)
                done += 1
                macs = _macs_after_step(model, example, what)
    except TLCError:
        raise
    except Exception as exc:  # Torch-Pruning's complaint, whatever its type: one line naming the model
        raise TLCError(f"Torch-Pruning cannot prune {what}: {_first_line(exc)}") from exc
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if _output_shapes(model, example, f"{what} does not run after Torch-Pruning") != reference:
        raise TLCError(f"Torch-Pruning changed the output shape of {what} (from {reference}): "
                       "its classifier was not recognised")
    return {"importance": importance, "rounds": done, "macs": int(macs), "params": count_params(model),
            "reached": bool(macs <= target_macs)}


def _macs_after_step(model: nn.Module, example: ExampleInputs, what: str) -> int:
    """MACs at batch 1 of the model just pruned; a model the step left broken is a TLCError."""
    try:
        return count_macs(model, example)
    except Exception as exc:
        raise TLCError(f"Torch-Pruning left {what} unable to run (a dependency it did not follow): "
                       f"{_first_line(exc)}") from exc


def _check_arguments(target_macs: int, importance: str, calibration: list | None, rounds: int | None) -> None:
    """Refuse a bad target, importance, calibration set or round count in one line."""
    if isinstance(target_macs, bool) or not isinstance(target_macs, int) or target_macs < 0:
        raise TLCError(f"target_macs={target_macs!r} must be a non-negative integer (MACs at batch 1)")
    if importance not in BASELINES.values():
        raise TLCError(f"importance={importance!r} is not one of {', '.join(BASELINES.values())}")
    if importance == "taylor" and not calibration:
        raise TLCError("Taylor importance needs calibration batches of (inputs, labels) to take gradients on")
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or not 0 <= rounds <= STEPS):
        raise TLCError(f"rounds={rounds!r} must be an integer from 0 to {STEPS}")


def _pruner(tp: ModuleType, model: nn.Module, example: ExampleInputs, importance: str) -> Any:
    """Torch-Pruning's pruner over `model`: local ranking, STEPS steps up to every channel, classifier kept;
    channel counts kept multiples of the attention heads of any `nn.MultiheadAttention` (its embedding
    width must stay divisible by them); the projections a Hugging Face or timm attention reshapes into heads
    lose the same dimensions in every head (Torch-Pruning's `num_heads`), the heads themselves all kept."""
    args, kwargs = as_call(example)
    scorer = (tp.importance.GroupTaylorImportance() if importance == "taylor"
              else tp.importance.GroupMagnitudeImportance(p=2))
    heads = [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    return tp.pruner.BasePruner(
        model, example, importance=scorer, global_pruning=False, pruning_ratio=1.0, iterative_steps=STEPS,
        ignored_layers=[_classifier(model, example)], round_to=math.lcm(*heads) if heads else None,
        num_heads=_head_projections(model), prune_head_dims=True, prune_num_heads=False,
        customized_pruners=_customized_pruners(tp, model),
        forward_fn=lambda m, _: m(*args, **kwargs), output_transform=output_tensors,
    )


def _patch_merging(module: nn.Module) -> bool:
    """A Swin patch merging (timm or torchvision): the channels of each 2x2 neighbourhood laid side by side,
    then a LayerNorm and a `reduction` linear layer over the four-fold width."""
    norm, reduction = getattr(module, "norm", None), getattr(module, "reduction", None)
    return (type(module).__name__ == "PatchMerging" and isinstance(norm, nn.LayerNorm)
            and isinstance(reduction, nn.Linear) and reduction.in_features % 4 == 0
            and tuple(norm.normalized_shape) == (reduction.in_features,))


def _customized_pruners(tp: ModuleType, model: nn.Module) -> dict[type, Any]:
    """Torch-Pruning pruning functions for the layers its dependency graph cannot follow through a reshape:
    a Swin patch merging, whose input channel c is channel c, C + c, 2C + c and 3C + c of its LayerNorm and
    reduction (the way Torch-Pruning's users prune Swin)."""
    kinds = {type(m) for m in model.modules() if _patch_merging(m)}
    if not kinds:
        return {}

    class PatchMergingPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
            tp.prune_linear_out_channels(layer.reduction, idxs)
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
            width = layer.reduction.in_features // 4
            spread = [i + k * width for k in range(4) for i in idxs]
            tp.prune_layernorm_out_channels(layer.norm, spread)
            tp.prune_linear_in_channels(layer.reduction, spread)
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.reduction.out_features

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.reduction.in_features // 4

    pruner = PatchMergingPruner()
    return {kind: pruner for kind in kinds}


_SEPARATE = ("query", "key", "value")


def _separate_heads(module: nn.Module) -> bool:
    """A Hugging Face self-attention (the BERT family): `query`, `key`, `value` linear layers, reshaped by its
    `num_attention_heads` and `attention_head_size`."""
    return (all(isinstance(getattr(module, name, None), nn.Linear) for name in _SEPARATE)
            and isinstance(getattr(module, "num_attention_heads", None), int)
            and hasattr(module, "attention_head_size"))


def _fused_heads(module: nn.Module) -> bool:
    """A timm attention (ViT, Swin): one `qkv` linear layer reshaped into 3 x `num_heads` heads."""
    return isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "num_heads", None), int)


def _head_projections(model: nn.Module) -> dict[nn.Module, int]:
    """The linear layers whose outputs the model reshapes into heads, with their head counts (Torch-Pruning's
    `num_heads`: their outputs lose the same dimensions in every head)."""
    projections: dict[nn.Module, int] = {}
    for module in model.modules():
        if _separate_heads(module):
            projections.update({getattr(module, name): module.num_attention_heads for name in _SEPARATE})
        elif _fused_heads(module):
            projections[module.qkv] = module.num_heads
    return projections


def _sync_head_sizes(model: nn.Module) -> None:
    """After a pruning step, the per-head width an attention reshapes by follows its pruned projections (the
    heads are kept, and so is the softmax scale the model was trained with)."""
    for module in model.modules():
        if _separate_heads(module):
            module.attention_head_size = module.query.out_features // module.num_attention_heads
            if hasattr(module, "all_head_size"):
                module.all_head_size = module.query.out_features
        elif _fused_heads(module):
            for name, width in (("head_dim", module.qkv.out_features // (3 * module.num_heads)),
                                ("attn_dim", module.qkv.out_features // 3)):
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, width)


def _classifier(model: nn.Module, example: ExampleInputs) -> nn.Module:
    """The layer producing the logits: the last convolution or linear layer the forward pass runs."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in model.modules()
             if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]
    try:
        run_model(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    if not order:
        raise TLCError(f"{type(model).__name__} has no convolution or linear layer for Torch-Pruning to prune")
    return order[-1]


def _calibration_gradients(model: nn.Module, calibration: list, device: torch.device) -> None:
    """Fill `.grad` with the gradient of the mean cross-entropy over the calibration batches (eval mode, so
    BatchNorm statistics stay as they are)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for inputs, labels in calibration:
        loss = F.cross_entropy(logits_of(model, to_device(inputs, device)).float(), labels.to(device))
        (loss / len(calibration)).backward()


def _output_shapes(model: nn.Module, example: ExampleInputs, failure: str) -> list[tuple[int, ...]]:
    """Shapes of the model's floating-point outputs; a model that does not run is a TLCError (`failure`)."""
    try:
        return [tuple(t.shape) for t in output_tensors(run_model(model, example))]
    except Exception as exc:
        raise TLCError(f"{failure}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type where it has none."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _accuracy(model: nn.Module, data: Dataset, job: WidthJob) -> float:
    """Top-1 accuracy of `model` on `data`."""
    return evaluate(model, data, collate_fn=job.collate_fn, batch_size=job.finetune.batch_size,
                    device=job.device)["accuracy"]


def _version(tp: ModuleType) -> str:
    """The installed Torch-Pruning version (the distribution's, which its __version__ can lag)."""
    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        return str(getattr(tp, "__version__", "unknown"))


def _rebuild(name: str, job: WidthJob, out_dir: Path) -> tuple[nn.Module, dict]:
    """The saved result: the pruned architecture replayed from the recorded step count, then its weights.

    The replay ranks by magnitude whatever the recorded importance: with local pruning the shapes after a
    number of steps do not depend on the ranking, and the weights come from the file.
    """
    record = read_json(out_dir / RECORD)
    if not isinstance(record, dict) or record.get("name") != name or record.get("target_macs") != job.target_macs:
        found = (record.get("name"), record.get("target_macs")) if isinstance(record, dict) else None
        raise TLCError(f"{out_dir / RECORD} records {found} (name, target MACs), not ({name!r}, {job.target_macs}): "
                       "remove the folder or choose another")
    example = to_device(rebatch(job.example_inputs, 1), job.device)
    model = copy.deepcopy(job.model).to(job.device)
    info = _prune_in_place(model, example, job.target_macs, "magnitude", None, record.get("rounds"))
    if info["macs"] != record.get("macs"):
        raise TLCError(f"replaying {info['rounds']} pruning steps gives {info['macs']:,} MACs but {out_dir / RECORD} "
                       f"records {record.get('macs')}: the base model is not the one this baseline was pruned from")
    _load_weights(model, out_dir / WEIGHTS)
    job.log(f"{name}: using the baseline saved in {out_dir}")
    return model.eval(), record


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors state dict into `model`, refusing any missing, unexpected or reshaped entry."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:
        raise TLCError(f"{path} is not a readable safetensors file: {_first_line(exc)}") from exc
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} is {tuple(state[k].shape)}, the model has {tuple(v.shape)}"
                 for k, v in own.items() if k in state and state[k].shape != v.shape]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TLCError(f"{path} does not fit the replayed pruned model: {problems[0]}{more}")
    model.load_state_dict(state)
