"""Run by test_train under torchrun: fine-tunes a tiny model on CPU processes (gloo) and saves, per rank,
the weights and numbers it ends with in the folder given as the only argument."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from tlc.train import FitConfig, evaluate, fit, init_from_env, is_main_process


def toy_data() -> TensorDataset:
    """90 points in 4-D, three classes from the signs of the first two coordinates."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def toy_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def main(out: Path) -> None:
    env = init_from_env()
    torch.manual_seed(env.rank)  # a different init on each rank: DDP must start all from rank 0's weights
    model = toy_model()
    data = toy_data()
    config = FitConfig(epochs=2, batch_size=16, lr=0.1)
    result = fit(model, data, config, checkpoint_dir=out / "checkpoints", progress=False)
    metrics = evaluate(model, data, batch_size=8)
    record = {
        "state": model.state_dict(),
        "metrics": metrics,
        "result": asdict(result),
        "main": is_main_process(),
        "world_size": env.world_size,
    }
    torch.save(record, out / f"rank{env.rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
