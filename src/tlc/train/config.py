"""The hyper-parameters of a fine-tuning run (`FitConfig`), in a module of their own so that the loop and
the optimizer/schedule builders can both import them without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from tlc.errors import SpecError

_CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "step", "constant"),
    "amp": ("auto", "off", "bf16", "fp16"),
}


@dataclass
class FitConfig:
    """Hyper-parameters of one fine-tuning run (see `tlc.train.optim` for the exact schedule).

    `epochs` may be fractional: the run stops after ``epochs * batches_per_epoch`` batches, rounded half up
    (at least one).
    `batch_size` is the global batch, split evenly over the processes of a distributed run. `amp` "auto"
    autocasts to bf16 (fp16 with loss scaling where bf16 is unsupported) on CUDA and is off on the CPU.
    """

    epochs: float = 1.0
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_steps: int = 0
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    amp: str = "auto"
    channels_last: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.milestones = tuple(self.milestones)
        self.validate()

    def validate(self) -> None:
        """Refuse out-of-range values, naming the field and what it accepts."""
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise SpecError(f"FitConfig.{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        checks = (
            ("epochs", self.epochs > 0, "a positive number, e.g. 1 or 0.5"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "a positive integer"),
            ("lr", self.lr > 0, "positive"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "non-negative"),
            ("milestones", all(0 < m < 1 for m in self.milestones), "fractions of the run in (0, 1)"),
            ("gamma", self.gamma > 0, "positive"),
            ("warmup_steps", isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "a count >= 0"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "None or a positive norm"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("num_workers", isinstance(self.num_workers, int) and self.num_workers >= 0, "a count >= 0"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise SpecError(f"FitConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}")
