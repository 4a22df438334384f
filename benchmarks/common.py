"""Shared pieces of the benchmarks: base-model training, compression runs, side-by-side latency, JSON.

Every benchmark works under ``runs/bench/<name>/`` (resumable: a finished base model or compression
run is reused) and writes its ``summary.json`` there and to ``benchmarks/results/<name>.json``, the
committed copy that ``benchmarks/results.py`` turns into docs/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

import tlc  # noqa: E402
from tlc.methods.base import build_configs, method_class  # noqa: E402
from tlc.run.config import RunConfig  # noqa: E402
from tlc.run.loop import CompressionResult, compress  # noqa: E402
from tlc.train import FitConfig, evaluate, fit  # noqa: E402
from tlc.train.checkpoint import atomic_write_json  # noqa: E402

RUNS = Path(os.environ.get("TLC_BENCH_DIR", "runs/bench"))
RESULTS = Path(__file__).with_name("results")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "tlc": tlc.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _as_stored(value: Any) -> Any:
    """``value`` as it reads back from a JSON file (tuples become lists): what stored summaries compare against."""
    return json.loads(json.dumps(value, default=str))


def _accuracies(model: nn.Module, data: Any, device: str) -> dict[str, float | None]:
    """Validation and test top-1 of ``model`` (test None when the data has no test split)."""
    splits = {"val_accuracy": data.val, "test_accuracy": data.test}
    return {key: evaluate(model, split, collate_fn=data.collate_fn, device=device)["accuracy"]
            if split is not None else None for key, split in splits.items()}


def add_run_arguments(parser: argparse.ArgumentParser, *, preset: str, epochs: float, results_name: str) -> None:
    """The options every compression benchmark shares: presets, base and fine-tuning epochs, budget,
    distillation, branch removal, seed, torch threads and ``--tag`` (a variant sharing the base model)."""
    parser.add_argument("--preset", choices=["default", "paper", "both"], default=preset)
    parser.add_argument("--epochs", type=float, default=epochs, help="base training epochs")
    parser.add_argument("--finetune-epochs", type=float, default=1.0, help="default preset, per step")
    parser.add_argument("--max-acc-drop", type=float, default=1.0)
    parser.add_argument("--distill", action="store_true", help="default preset: fine-tune with knowledge "
                        "distillation from the original (alpha 0.5, T 4)")
    parser.add_argument("--no-branch-removal", dest="branch_removal", action="store_false",
                        help="default preset: no residual branch removed whole, TLC's channel split only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help=f"names a variant: runs in <preset><tag>/, results in "
                        f"{results_name}<tag>.json, the base model shared")


def train_base(model: nn.Module, data: Any, recipe: FitConfig, directory: Path, *, seed: int = 0,
               device: str = "cpu") -> dict[str, Any]:
    """Train ``model`` with ``recipe`` (or load it when already trained); returns its accuracies and cost."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "base.safetensors"
    info_path = directory / "base.json"
    if weights.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        wanted = _as_stored(dataclasses.asdict(recipe))
        if info.get("recipe") != wanted or info.get("seed") != seed:
            changed = sorted(k for k in wanted if info.get("recipe", {}).get(k) != wanted[k])
            raise SystemExit(f"{directory} holds a base model trained with another recipe or seed "
                             f"(differs in: {', '.join(changed) or 'seed'}); name the new one apart "
                             "(vision.py --base-tag) or remove that folder")
        model.load_state_dict(load_file(str(weights)))
        return info
    start = time.perf_counter()
    result = fit(model, data.train, recipe, collate_fn=data.collate_fn, device=device, seed=seed,
                 checkpoint_dir=directory / "base-checkpoints", resume=True, description="base training")
    info = {
        "recipe": dataclasses.asdict(recipe), "seed": seed, "epochs": result.epochs,
        "train_seconds": time.perf_counter() - start,
        **_accuracies(model, data, device),
    }
    tmp = directory / ".base.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    info_path.write_text(json.dumps(info, indent=2))
    return info


@dataclasses.dataclass
class Setup:
    """The settings of one benchmark run: shared (RunConfig) and the method's own (``method_name``)."""

    run: RunConfig
    method: Any
    method_name: str = "tlc"

    @property
    def finetune(self) -> FitConfig:
        return self.run.finetune

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def distill(self) -> Any:
        return self.run.distill


def tlc_setup(preset: str, method: str = "tlc", **settings: Any) -> Setup:
    """``method``'s ``preset`` with ``settings`` (shared or the method's own) replaced."""
    return Setup(*build_configs(method_class(method), preset, settings), method_name=method)


def run(model: nn.Module, data: Any, config: Setup, directory: Path, *, spec: Any, device: str = "cpu",
        batch_sizes: tuple[int, ...] = (1, 64), backends: tuple[str, ...] = ("eager", "onnxruntime")
        ) -> CompressionResult:
    """One compression run, resumed when ``directory`` already holds a partial one."""
    resume = (directory / "checkpoints").is_dir()
    return compress(model, data.train, data.val, config=config.run, method=config.method_name,
                    method_config=config.method, test_data=data.test,
                    collate_fn=data.collate_fn, example_inputs=data.example_inputs(2), out_dir=directory,
                    resume=resume, device=device, model_spec=spec.to_json(), data_spec=data.name,
                    latency_batch_sizes=batch_sizes, latency_backends=backends)


def finetune_alone(model: nn.Module, data: Any, configs: dict[str, Setup], directory: Path, *, tag: str = "",
                   device: str = "cpu") -> dict[str, Any]:
    """Each preset's per-step fine-tuning applied once to a copy of the base model with nothing collapsed
    (distilled from the base model when the preset distils): the accuracy change that fine-tuning recipe
    causes on its own, apart from any collapse (checkpoints in
    ``directory/finetune-alone-<preset><tag>``)."""
    rows = {}
    for preset, config in configs.items():
        copy = deepcopy(model)
        folder = directory / f"finetune-alone-{preset}{tag}"
        start = time.perf_counter()
        result = fit(copy, data.train, config.finetune, collate_fn=data.collate_fn, device=device, seed=config.seed,
                     teacher=model if config.distill else None, distill=config.distill,
                     checkpoint_dir=folder, resume=True, description=f"{preset} fine-tuning alone")
        rows[preset] = {
            "recipe": dataclasses.asdict(config.finetune), "epochs": result.epochs,
            "distill": dataclasses.asdict(config.distill) if config.distill else None,
            "seconds": _total_seconds(folder, time.perf_counter() - start),
            **_accuracies(copy, data, device),
        }
    return rows


def folded_baseline(original: nn.Module, deployed: nn.Module, example: Any,
                    batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    """Latency of the compressed model against the original with only its batch norms folded: the
    part of the speed-up that depth compression, not BN folding, is responsible for."""
    folded = tlc.merge(original, example, policy="never")
    cmp = tlc.compare(folded, deployed, example, batch_sizes=batch_sizes, labels=("bn-folded", "compressed"))
    return cmp.to_dict()


def summary(name: str, base: dict[str, Any], results: dict[str, CompressionResult], extra: dict[str, Any]
            ) -> dict[str, Any]:
    """The benchmark's summary.json content."""
    return {"name": name, "machine": machine(), "base": base,
            "runs": {preset: r.report for preset, r in results.items()}, **extra}


def _with_other_presets(content: dict[str, Any], path: Path) -> dict[str, Any]:
    """``content`` plus the runs of presets it lacks from the summary at ``path``, when that summary was
    made from the same base model: running one preset then updates only that preset's entry."""
    if not path.is_file() or "runs" not in content:
        return content
    earlier = json.loads(path.read_text())
    base = _as_stored(content["base"])
    same_base = all(earlier.get("base", {}).get(k) == base.get(k)
                    for k in ("recipe", "seed", "val_accuracy", "test_accuracy"))
    if not same_base:
        print(f"{path}: made from another base model; its other presets are not kept")
        return content
    merged = {**content, "runs": {**earlier["runs"], **content["runs"]}}
    if "vs_bn_folded" in content:
        merged["vs_bn_folded"] = {**earlier.get("vs_bn_folded", {}), **content["vs_bn_folded"]}
    earlier_args = earlier.get("args_by_preset") or {preset: earlier.get("args") for preset in earlier["runs"]}
    merged["args_by_preset"] = {**earlier_args, **{preset: content.get("args") for preset in content["runs"]}}
    return merged


def _total_seconds(folder: Path, seconds: float) -> float:
    """Wall time of every call that trained into ``folder``, this one included: a rerun that only reloads a
    finished fine-tuning adds its reload time instead of replacing the training time."""
    path = folder / "seconds.json"
    total = seconds + (json.loads(path.read_text())["seconds"] if path.is_file() else 0.0)
    atomic_write_json(path, {"seconds": total})
    return total


def write_summary(directory: Path, content: dict[str, Any], suffix: str = "") -> Path:
    """Write ``content`` as ``directory/summary.json`` and as the committed ``results/<name><suffix>.json``,
    keeping the entries of the presets not run this time (see :func:`_with_other_presets`)."""
    path = RESULTS / f"{directory.name}{suffix}.json"
    content = _with_other_presets(content, path)
    text = json.dumps(content, indent=2, default=str) + "\n"
    if not suffix:
        (directory / "summary.json").write_text(text)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def headline(report: dict[str, Any]) -> str:
    """One line per run: accuracy drop, activations removed, depth, MACs and latency ratios."""
    o, c = report["original"], report["compressed"]
    acc = "test_accuracy" if "test_accuracy" in o else "val_accuracy"
    ratios = ", ".join(f"{r['backend']} b{r['batch_size']} x{r['ratio']:.2f}" for r in report["latency"]["rows"])
    return (f"{report['preset']:>7}: top-1 {100 * o[acc]:.2f} -> {100 * c[acc]:.2f} "
            f"({100 * (c[acc] - o[acc]):+.2f} pt), activations {o['activations']} -> {c['activations']}, "
            f"depth {o['depth']} -> {c['depth']}, MACs x{o['macs'] / max(c['macs'], 1):.2f}, {ratios}, "
            f"fine-tuning {report['finetune_epochs_total']:.1f} epochs, {report['wall_time_s'] / 60:.0f} min")
