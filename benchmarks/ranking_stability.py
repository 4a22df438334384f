"""Is TLC's ranking stable between two samples of calibration data? (default size: 1024)

    python benchmarks/ranking_stability.py --run runs/bench/fashion-mnist-resnet18-w16 --sizes 128 1024

Loads a benchmark's trained base model (image or text: Hugging Face models get their tokenizer),
measures every site's loss gap on calibration sets drawn with two seeds, and reports the Spearman rank
correlation and the overlap of the five best sites.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import write_summary
from safetensors.torch import load_file

import tlc
from tlc.criteria.loss_gap import LossGaps
from tlc.methods.tlc import site_masks
from tlc.run.config import RunConfig
from tlc.run.data import calibration_batches
from tlc.zoo.data import load_data
from tlc.zoo.models import ModelSpec, load_tokenizer


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def first_report(run: Path) -> tuple[dict, str]:
    """A compression report of the benchmark in ``run`` and the benchmark's name: from summary.json once
    the benchmark is done, else from the report.json of a finished preset (the name taken from the folder)."""
    summary_path = run / "summary.json"
    if summary_path.is_file():
        content = json.loads(summary_path.read_text())
        return next(iter(content["runs"].values())), content["name"]
    reports = sorted(run.glob("*/report.json"))
    if not reports:
        raise SystemExit(f"{run} holds neither summary.json nor a finished preset's report.json")
    report = json.loads(reports[0].read_text())
    return report, f"{report['data']}/{run.name.removeprefix(report['data'] + '-')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a benchmark directory with base.safetensors")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64, help="token length of text data (nlp.py's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report, name = first_report(args.run)
    model = ModelSpec.from_json(report["model"]).build()
    model.load_state_dict(load_file(str(args.run / "base.safetensors")))
    model.eval()
    spec = report["model"]["spec"]
    tokenizer = load_tokenizer(spec) if spec.startswith("hf:") else None
    data = load_data(report["data"], seed=0, tokenizer=tokenizer, max_length=args.max_length)
    example = data.example_inputs(2)
    graph = tlc.trace(model, example)
    rows = {}
    for size in args.sizes:
        gaps = []
        for seed in (0, 1):
            config = RunConfig(calibration_size=size, seed=seed)
            batches = calibration_batches(data.val, config, data.collate_fn, torch.device("cpu"))
            gaps.append(LossGaps(graph, batches).single_gaps(site_masks(graph, batches)))
        names = list(gaps[0])
        a, b = [gaps[0][n] for n in names], [gaps[1][n] for n in names]
        top = [set(sorted(names, key=g.__getitem__)[:5]) for g in gaps]
        rows[size] = {"spearman": spearman(a, b), "top5_overlap": len(top[0] & top[1])}
        print(f"calibration {size}: Spearman {rows[size]['spearman']:.3f}, "
              f"top-5 overlap {rows[size]['top5_overlap']}/5")
    content = {"name": name, "sites": len(graph.sites), "stability": rows}
    print(f"wrote {write_summary(args.run, content, suffix='-ranking')}")


if __name__ == "__main__":
    main()
