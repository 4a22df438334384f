"""CIFAR-style ResNet-18 / MobileNetV2 / VGG-16-bn on Fashion-MNIST, compressed by TLC (default and paper).

    python benchmarks/vision.py --model resnet18 --preset both

Fashion-MNIST (60k train, of which 6k validation, 10k test) is zero-padded to 32x32, one channel. The
base recipe: SGD momentum 0.9, lr 0.05 cosine, weight decay 5e-4, batch 128, random crop (pad 4) and
horizontal flip, ``--epochs`` epochs. Compression: default preset with ``--finetune-epochs`` per step;
the paper preset with ``--paper-finetune-epochs`` per step (default five times as many; the official code
retrains each step as long as the base was trained, which ``--paper-finetune-epochs`` equal to ``--epochs``
reproduces), step schedule; both stop as documented in docs/results.md. ``--tag`` names a variant (other
fine-tuning settings) that shares the trained base model; ``--base-tag`` names a base model trained
otherwise (a stored base is only reused with the recipe and seed it was trained with). Resumable: rerun
the same command after an interruption.
Running one preset updates only its entry in the results JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from common import (
    RUNS,
    Setup,
    add_run_arguments,
    finetune_alone,
    folded_baseline,
    headline,
    machine,
    run,
    summary,
    tlc_setup,
    train_base,
    write_summary,
)

from tlc.methods.base import method_class, parse_setting
from tlc.train import DistillConfig, FitConfig
from tlc.zoo.data import load_data
from tlc.zoo.models import build_model

MODELS = {
    "resnet18": ("tlc:cifar_resnet18", {}),
    "mobilenet_v2": ("tlc:cifar_mobilenet_v2", {}),
    "vgg16_bn": ("tlc:cifar_vgg16_bn", {}),
}


def configs(args: argparse.Namespace) -> dict[str, Setup]:
    """The presets to run: TLC's with the benchmark's fine-tuning recipes, or another method's presets
    with the same fine-tuning recipes (the paper preset's retraining shortened to --paper-finetune-epochs)."""
    paper_epochs = args.paper_finetune_epochs or 5 * args.finetune_epochs
    default_finetune = FitConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, schedule="cosine", batch_size=128)
    paper_finetune = FitConfig(epochs=paper_epochs, lr=0.1, momentum=0.9, weight_decay=1e-4,
                               schedule="step", milestones=(0.5, 0.75), gamma=0.1, batch_size=128)
    shared = dict(method=args.method, max_acc_drop=args.max_acc_drop, seed=args.seed)
    if args.method == "tlc":
        default = tlc_setup("default", **shared, calibration_size=1024, branch_removal=args.branch_removal,
                            distill=DistillConfig() if args.distill else None, finetune=default_finetune)
        paper = tlc_setup("paper", **shared, budget_patience=2, max_steps=args.paper_max_steps, finetune=paper_finetune)
    else:
        default = tlc_setup("default", **shared, calibration_size=1024,
                            distill=DistillConfig() if args.distill else None, finetune=default_finetune)
        paper = tlc_setup("paper", **shared, max_steps=args.paper_max_steps, finetune=paper_finetune)
        if getattr(paper.method, "train_first", None):  # the paper's training before the first step, shortened too
            paper.method.train_first = paper_epochs
    chosen = {"default": default, "paper": paper}
    chosen = chosen if args.preset == "both" else {args.preset: chosen[args.preset]}
    for setup in chosen.values():
        for text in args.set:
            key, value = parse_setting(method_class(args.method), text)
            target = setup.method if key in {f.name for f in dataclasses.fields(setup.method)} else setup.run
            setattr(target, key, value)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), required=True)
    add_run_arguments(parser, preset="both", epochs=15.0, results_name="fashion-mnist-<model>[-w<width>]<base-tag>")
    parser.add_argument("--width", type=float, help="width (resnet18/vgg16_bn) or width_mult (mobilenet_v2)")
    parser.add_argument("--method", default="tlc", help="a registered method (tlc, lacoot, ...); other than tlc, "
                        "its runs and results are named with -<method> before --tag")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the method or of the run for every preset run (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latency-table", choices=["eager", "onnxruntime"], default="eager",
                        help="the backend whose batch-1 latency table prices merges under --set policy=latency "
                        "(both backends are timed either way)")
    parser.add_argument("--finetune-lr", type=float, default=0.01, help="default preset's fine-tuning lr (cosine)")
    parser.add_argument("--paper-finetune-epochs", type=float, help="paper preset's fine-tuning epochs per step "
                        "(default: 5 x --finetune-epochs; --epochs retrains each step as long as the base)")
    parser.add_argument("--paper-max-steps", type=int, help="end the paper preset after this many steps (it "
                        "otherwise runs until one activation is left or two steps in a row miss the budget); "
                        "may be set when resuming")
    parser.add_argument("--finetune-alone", action="store_true", help="instead of compressing: each preset's "
                        "per-step fine-tuning applied once to the base model, nothing collapsed (results in "
                        "<name><tag>-finetune-alone.json)")
    parser.add_argument("--base-tag", default="", help="names a base model trained otherwise (e.g. -e15 for "
                        "--epochs 15): its own runs/bench/ folder and results file")
    args = parser.parse_args()
    if args.method != "tlc":
        args.tag = f"-{args.method}{args.tag}"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec_name, kwargs = MODELS[args.model]
    if args.width is not None:
        kwargs = {"width_mult": args.width} if args.model == "mobilenet_v2" else {"width": int(args.width)}
    name = args.model + (f"-w{args.width:g}" if args.width is not None else "") + args.base_tag
    directory = RUNS / f"fashion-mnist-{name}"
    label = f"fashion-mnist/{name}{args.tag}"
    data = load_data("fashion-mnist", seed=args.seed, augment=True)  # augments the training split only
    model, spec = build_model(spec_name, num_classes=10, in_channels=1, **kwargs)
    recipe = FitConfig(epochs=args.epochs, lr=0.05, schedule="cosine", weight_decay=5e-4, batch_size=128)
    base = train_base(model, data, recipe, directory, seed=args.seed, device=args.device)
    print(f"base {name}: val {100 * base['val_accuracy']:.2f}%, test {100 * base['test_accuracy']:.2f}%")
    if args.finetune_alone:
        rows = finetune_alone(model, data, configs(args), directory, tag=args.tag, device=args.device)
        content = {"name": label, "machine": machine(), "base": base,
                   "finetune_alone": rows, "args": vars(args)}
        print(json.dumps(rows, indent=1))
        print(f"wrote {write_summary(directory, content, suffix=args.tag + '-finetune-alone')}")
        return
    results, baselines = {}, {}
    for preset, config in configs(args).items():
        backends = tuple(sorted(("eager", "onnxruntime"), key=lambda b: b != args.latency_table))
        result = run(model, data, config, directory / f"{preset}{args.tag}", spec=spec, device=args.device,
                     backends=backends)
        results[preset] = result
        baselines[preset] = folded_baseline(model.eval(), result.model, data.example_inputs(2), (1, 64))
        print(headline(result.report))
    content = summary(label, base, results, {"vs_bn_folded": baselines, "args": vars(args)})
    path = write_summary(directory, content, suffix=args.tag)
    print(json.dumps({p: r.report["compressed"] for p, r in results.items()}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
