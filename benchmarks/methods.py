"""Every method side by side on one benchmark base model, with the Torch-Pruning width baseline: ``tlc.benchmark``.

    python benchmarks/methods.py --model resnet18 --baseline torch-pruning

Bases (shared with vision.py / nlp.py: a base trained there is reused, and trained here otherwise):
Fashion-MNIST (zero-padded to 32x32) CIFAR-style ResNet-18 (width 16, 9 epochs), MobileNetV2 (width 0.25,
15 epochs) and VGG-16-bn (width 16, 15 epochs), SGD 0.05 cosine; all-MiniLM-L6-v2 fine-tuned on Rotten
Tomatoes (nlp.py's recipe); a small Swin transformer (timm, patch 2, window 4, embed 32, depths 2-2) trained
on Fashion-MNIST with AdamW. Every method runs its default preset with the same fine-tuning recipe, epochs
per step, step limit, budget and seed; the results are timed side by side (eager and ONNX Runtime, batch 1
and --batch) in one session at --threads. Resumable: rerun the same command; a finished benchmark rerun
with --resume is only timed again (e.g. on a quiet machine). Writes benchmarks/results/methods-<model>.json
and docs/img/methods-<model>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, RUNS, machine, train_base
from safetensors.torch import load_file

import tlc
from tlc.run.benchmark import PLOT, Timing, read_benchmark
from tlc.train import FitConfig
from tlc.train.checkpoint import atomic_write_json
from tlc.zoo.data import load_data
from tlc.zoo.models import build_model, load_tokenizer

IMAGES = Path(__file__).resolve().parents[1] / "docs" / "img"
VISION_RECIPE = dict(lr=0.05, schedule="cosine", weight_decay=5e-4, batch_size=128)
FINETUNE_CNN = FitConfig(epochs=0.5, lr=0.01, schedule="cosine", batch_size=128)
FINETUNE_TRANSFORMER = FitConfig(epochs=0.5, optimizer="adamw", lr=2e-5, weight_decay=0.01, schedule="cosine",
                                 batch_size=32)
SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), in_chans=1)


@dataclasses.dataclass
class Base:
    """One benchmark base: how to build and train it, and its runs folder (shared with the other scripts)."""

    spec: str
    kwargs: dict[str, Any]
    folder: str
    data: str
    recipe: FitConfig
    finetune: FitConfig


BASES = {
    "resnet18": Base("tlc:cifar_resnet18", {"width": 16}, "fashion-mnist-resnet18-w16", "fashion-mnist",
                     FitConfig(epochs=9.0, **VISION_RECIPE), FINETUNE_CNN),
    "mobilenet_v2": Base("tlc:cifar_mobilenet_v2", {"width_mult": 0.25}, "fashion-mnist-mobilenet_v2-w0.25-e15",
                         "fashion-mnist", FitConfig(epochs=15.0, **VISION_RECIPE), FINETUNE_CNN),
    "vgg16_bn": Base("tlc:cifar_vgg16_bn", {"width": 16}, "fashion-mnist-vgg16_bn-w16-e15", "fashion-mnist",
                     FitConfig(epochs=15.0, **VISION_RECIPE), FINETUNE_CNN),
    "minilm": Base("hf:all-MiniLM-L6-v2", {}, "rotten-tomatoes-minilm", "rotten-tomatoes",
                   FitConfig(epochs=3.0, optimizer="adamw", lr=5e-5, weight_decay=0.01, schedule="cosine",
                             warmup_steps=100, batch_size=32), FINETUNE_TRANSFORMER),
    "swin": Base("timm:swin_tiny_patch4_window7_224", SWIN, "fashion-mnist-swin-small", "fashion-mnist",
                 FitConfig(epochs=10.0, optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine",
                           warmup_steps=200, batch_size=128), FINETUNE_TRANSFORMER),
}


def _base(name: str, seed: int, device: str) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
    """(trained model, its spec, the data, the base's record): trained once, then reused."""
    base = BASES[name]
    tokenizer = load_tokenizer(base.spec) if base.spec.startswith("hf:") else None
    data = load_data(base.data, seed=seed, augment=tokenizer is None, tokenizer=tokenizer,
                     **({"max_length": 64} if tokenizer is not None else {}))
    model, spec = build_model(base.spec, num_classes=data.num_classes,
                              **({"in_channels": 1} if base.data == "fashion-mnist" and name != "swin" else {}),
                              **base.kwargs)
    directory = RUNS / base.folder
    info = train_base(model, data, base.recipe, directory, seed=seed, device=device)
    model.load_state_dict(load_file(str(directory / "base.safetensors")))
    return model.eval(), spec, data, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(BASES), required=True)
    parser.add_argument("--methods", nargs="+", help="NAME[:PRESET] (default: every method, default preset)")
    parser.add_argument("--baseline", nargs="*", default=["torch-pruning"], help="width baselines (default "
                        "torch-pruning; none with an empty list)")
    parser.add_argument("--finetune-epochs", type=float, help="fine-tuning epochs per step, every method "
                        "(default 0.5)")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--max-acc-drop", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64, help="batch size timed besides 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default="", help="names a variant (its own folder and results file)")
    parser.add_argument("--resume", action="store_true", help="continue (or re-time) the benchmark")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, spec, data, info = _base(args.model, args.seed, args.device)
    print(f"base {args.model}: val {100 * info['val_accuracy']:.2f}%, test {100 * info['test_accuracy']:.2f}%")
    finetune = BASES[args.model].finetune
    if args.finetune_epochs is not None:
        finetune = dataclasses.replace(finetune, epochs=args.finetune_epochs)
    out = RUNS / BASES[args.model].folder / f"methods{args.tag}"
    result = tlc.benchmark(
        model, data.train, data.val, out_dir=out, methods=args.methods, baselines=args.baseline,
        resume=args.resume or (out / "benchmark-state.json").is_file(),
        timing=Timing(batch_size=args.batch, threads=args.threads), test_data=data.test,
        collate_fn=data.collate_fn, example_inputs=data.example_inputs(2), device=args.device,
        model_spec=spec.to_json(), data_spec=data.name, finetune=finetune, max_steps=args.max_steps,
        max_acc_drop=args.max_acc_drop, seed=args.seed, calibration_size=1024)
    print(result)
    name = f"methods-{args.model}{args.tag}"
    summary = read_benchmark(out)
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, {"name": name, "machine": machine(), "base": info, "args": vars(args),
                             "benchmark": summary})
    if result.plot_path is not None:
        IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / PLOT, IMAGES / f"{name}.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
