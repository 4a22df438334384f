"""Run by test_distributed_compress, under torchrun or as a plain process: compresses a small trained MLP with
``tlc.compress`` and saves, per rank, the decisions it reached (sites, accepted steps, gaps, stop reason) in
the folder given as the first argument; the second argument is the method (default tlc).

The base model is trained before the process group is joined, the same way in every process, so that runs
with 1 and with 2 processes start from the same weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import tlc
from tlc.criteria.loss_gap import LossGaps
from tlc.graph import trace
from tlc.train import FitConfig, fit, init_from_env


def toy_data(n: int, seed: int) -> TensorDataset:
    """``n`` points in 6-D, four classes from the signs of two sums of coordinates."""
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))
    y = (x[:, :3].sum(1) > 0).long() * 2 + (x[:, 3:].sum(1) > 0).long()
    return TensorDataset(x, y)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))


def trained(train: TensorDataset) -> nn.Module:
    model = toy_model()
    fit(model, train, FitConfig(epochs=40, batch_size=32, lr=0.05), seed=0, progress=False)
    return model.eval()


def batch_split_gaps(model: nn.Module, val: TensorDataset) -> dict[str, float]:
    """The loss gap of each site of ``model`` alone on six calibration batches: more batches than processes,
    so that each process runs its share of the batches (the run above has one batch: each process ranks its
    share of the candidates)."""
    graph = trace(model, val[:2][0])
    batches = [(val[i:i + 16][0], val[i:i + 16][1]) for i in range(0, 96, 16)]
    return LossGaps(graph, batches).single_gaps({s.name: None for s in graph.sites})


def main(out: Path, method: str) -> None:
    train, val = toy_data(256, 0), toy_data(128, 1)
    model = trained(train)  # before joining: the same weights in every process, whatever their number
    env = init_from_env("cpu")
    own = {"max_sites_per_step": 1} if method == "tlc" else {}  # one site a step: three ranked decisions
    result = tlc.compress(model, train, val, method=method, out_dir=out / "run", max_steps=3, max_acc_drop=100.0,
                          calibration_size=96, calibration_batch_size=96, seed=5, progress=False, log=None,
                          finetune=FitConfig(epochs=1, batch_size=32, lr=0.02, schedule="cosine"), **own)
    record = {
        "rank": env.rank, "world_size": env.world_size,
        "steps": [{"sites": s.sites, "accepted": s.accepted, "within_budget": s.within_budget,
                   "joint_gap": s.joint_gap, "gaps": s.evidence.get("gaps"), "val_accuracy": s.val_accuracy}
                  for s in result.steps],
        "stop_reason": result.stop_reason, "chosen_step": result.chosen_step,
        "sites_collapsed": result.report["sites_collapsed"],
        "state": {k: v.tolist() for k, v in result.training_model.state_dict().items()},
        "batch_split_gaps": batch_split_gaps(model, val),
    }
    (out / f"rank{env.rank}-of-{env.world_size}.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "tlc")
