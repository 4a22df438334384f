"""Merge every zoo model with all activation sites linearized; print what the merge achieves.

For each model: sites, depth before/after, MACs before/after (per example batch), max relative error
of the deploy form against the training form, and wall time of linearize + merge.

    python benchmarks/merge_zoo.py                     # default list, both policies
    python benchmarks/merge_zoo.py --models torchvision:resnet50 --policy macs --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import tlc  # noqa: E402
from tlc.measure import count_macs, depth  # noqa: E402

DEFAULT_MODELS = [
    "torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2", "torchvision:vgg16_bn",
    "torchvision:swin_t", "tlc:cifar_resnet18", "tlc:cifar_mobilenet_v2", "tlc:cifar_vgg16_bn", "timm:resnet18",
    "timm:swin_tiny_patch4_window7_224", "hf:bert-tiny", "hf:roberta-tiny",
]


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial batch-norm statistics, so that folding is exercised as on a trained model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def build(spec: str) -> tuple[nn.Module, object]:
    """A model with random weights and example inputs for it."""
    if spec.startswith("hf:"):
        import transformers

        kind = spec[3:].split("-")[0]
        config_cls, model_cls = {
            "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
            "roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification),
        }[kind]
        cfg = config_cls(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=512, max_position_embeddings=128, num_labels=2)
        ids = torch.randint(5, 1000, (2, 32))
        return model_cls(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    from tlc.zoo.models import build_model

    model, _ = build_model(spec, num_classes=10)
    size = 224 if spec.startswith("timm:swin") else 64 if "swin" in spec else 32
    return model.eval(), torch.randn(2, 3, size, size)


def run(spec: str, policy: str) -> dict:
    model, x = build(spec)
    randomize_bn(model)
    sites = tlc.find_sites(model, x)
    start = time.perf_counter()
    lin = tlc.linearize(model, sites, x, policy=policy)
    deployed = tlc.merge(lin, x)
    seconds = time.perf_counter() - start
    return {
        "model": spec, "policy": policy, "sites": len(sites),
        "depth_before": depth(model, x), "depth_after": depth(deployed, x),
        "macs_before": count_macs(lin, x), "macs_after": count_macs(deployed, x),
        "max_rel_error": deployed.tlc_report.max_relative_error, "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--policy", choices=["macs", "always", "both"], default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policies = ["macs", "always"] if args.policy == "both" else [args.policy]
    header = f"{'model':36s} {'policy':6s} {'sites':>5s} {'depth':>9s} {'MACs before':>12s} {'MACs after':>12s} " \
             f"{'rel.err':>8s} {'time':>7s}"
    print(header)
    print("-" * len(header))
    rows = []
    for spec in args.models:
        for policy in policies:
            r = run(spec, policy)
            rows.append(r)
            print(f"{r['model']:36s} {r['policy']:6s} {r['sites']:5d} {r['depth_before']:4d}->{r['depth_after']:<4d}"
                  f" {r['macs_before'] / 1e6:11.1f}M {r['macs_after'] / 1e6:11.1f}M {r['max_rel_error']:8.1e}"
                  f" {r['seconds']:6.1f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
