"""torchvision Swin-T with every GELU site collapsed and merged: depth, params, MACs, latency ratio.

    python benchmarks/swin.py --size 112

Pretrained weights cannot be downloaded here, so the model is randomly initialised: this measures
what the merge does to the architecture (each MLP `C -> 4C -> C` becomes one `C -> C` linear), not
accuracy. Latency is measured side by side (interleaved), eager and ONNX Runtime, batch 1 and 64.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from common import RUNS, machine, write_summary

import tlc
from tlc.measure import count_macs, count_params, depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=112, help="input resolution (224 is the native one)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=1000).eval()
    x = torch.randn(1, 3, args.size, args.size)
    sites = tlc.find_sites(model, x)
    lin = tlc.linearize(model, sites, x)
    deployed = tlc.merge(lin, x)
    cmp = tlc.compare(model, deployed, x, batch_sizes=tuple(args.batch_sizes), backends=("eager", "onnxruntime"),
                      labels=("swin_t", "merged"))
    print(cmp)
    result = {
        "name": f"swin_t@{args.size}", "machine": machine(), "sites": len(sites),
        "original": {"depth": depth(model, x), "params": count_params(model), "macs": count_macs(model, x),
                     "activations": len(sites)},
        "compressed": {"depth": depth(deployed, x), "params": count_params(deployed), "macs": count_macs(deployed, x),
                       "activations": len(tlc.find_sites(deployed, x))},
        "max_relative_error": deployed.tlc_report.max_relative_error,
        "latency": cmp.to_dict(),
    }
    directory = RUNS / f"swin_t-{args.size}"
    directory.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_summary(directory, result)}")


if __name__ == "__main__":
    main()
