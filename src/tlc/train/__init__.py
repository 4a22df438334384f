"""Fine-tuning after each compression step: the loop, distillation, checkpoints and torchrun support."""

from tlc.train.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    complete_checkpoints,
    latest_complete,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from tlc.train.config import FitConfig
from tlc.train.distill import DistillConfig, distillation_loss
from tlc.train.distributed import DistEnv, init_from_env, is_main_process
from tlc.train.hooks import FitHooks
from tlc.train.loop import FitResult, evaluate, fit, logits_of
from tlc.train.optim import build_optimizer, build_scheduler, lr_factor

__all__ = [
    "DistEnv", "DistillConfig", "FitConfig", "FitHooks", "FitResult", "atomic_write_json", "atomic_write_text",
    "build_optimizer", "build_scheduler", "complete_checkpoints", "distillation_loss", "evaluate", "fit",
    "init_from_env", "is_main_process", "latest_complete", "load_checkpoint", "lr_factor", "logits_of",
    "remove_checkpoint", "save_checkpoint",
]
