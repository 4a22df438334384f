"""Run by test_train under torchrun: fine-tunes a tiny model on CPU processes (gloo), once plainly and once
with `FitHooks`, and saves, per rank, the weights and numbers it ends with in the folder given as the only
argument."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from tlc.train import FitConfig, FitHooks, evaluate, fit, init_from_env, is_main_process


def toy_data() -> TensorDataset:
    """90 points in 4-D, three classes from the signs of the first two coordinates."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def toy_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def hook_target() -> torch.Tensor:
    """Where the hooked run's regularizer pulls the first layer's weight."""
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(1))


def hook_mask() -> torch.Tensor:
    """The pruning mask the hooked run keeps on the last layer's weight (about half zeros)."""
    return (torch.rand(3, 16, generator=torch.Generator().manual_seed(2)) > 0.5).float()


def toy_hooks(rank: int, seen: list[str]) -> FitHooks:
    """An L2 pull of layer 0 towards `hook_target`, with a coefficient that differs between ranks (0.25 and
    0.75: only the all-reduce of its gradients keeps the replicas equal), and the mask re-applied after each
    step; `seen` collects the type of the model each hook gets."""
    target, mask, coefficient = hook_target(), hook_mask(), 0.25 + 0.5 * rank

    def pull(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        seen.append(type(model).__name__)
        return coefficient * (model[0].weight - target).square().sum()

    def prune(model: nn.Module) -> None:
        seen.append(type(model).__name__)
        model[3].weight.mul_(mask)

    return FitHooks(loss=pull, after_step=prune)


def main(out: Path) -> None:
    env = init_from_env()
    torch.manual_seed(env.rank)  # a different init on each rank: DDP must start all from rank 0's weights
    model = toy_model()
    data = toy_data()
    config = FitConfig(epochs=2, batch_size=16, lr=0.1)
    result = fit(model, data, config, checkpoint_dir=out / "checkpoints", progress=False)
    metrics = evaluate(model, data, batch_size=8)
    torch.manual_seed(10 + env.rank)
    hooked, seen = toy_model(), []
    hooked_result = fit(hooked, data, config, hooks=toy_hooks(env.rank, seen), progress=False)
    record = {
        "state": model.state_dict(),
        "metrics": metrics,
        "result": asdict(result),
        "main": is_main_process(),
        "world_size": env.world_size,
        "hooked_state": hooked.state_dict(),
        "hooked_steps": hooked_result.steps,
        "hooked_seen": seen,
    }
    torch.save(record, out / f"rank{env.rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
