"""Code a compression method plugs into `fit`: an extra loss term and an action after every optimizer step.

Methods use these for what the plain loop does not know about: a regularizer (an optimal-transport distance,
a penalty on learned activation slopes) or re-applying the weight masks of unstructured pruning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from tlc._inputs import ExampleInputs
from tlc.errors import SpecError

LossHook = Callable[[nn.Module, ExampleInputs, torch.Tensor, torch.Tensor], torch.Tensor | None]
StepHook = Callable[[nn.Module], None]
ParamLrHook = Callable[[nn.Module], Mapping[str, float]]


@dataclass(frozen=True)
class FitHooks:
    """Optional callables `fit` runs in each training step, on every rank, with the unwrapped model.

    `loss(model, inputs, labels, outputs)` returns a scalar added to the step's cross-entropy (or
    distillation) loss, or None for nothing. It runs inside the step's autocast region, after the forward;
    `outputs` are that forward's logits (use them rather than a second forward of `model`). The term is
    added in float32 and is part of the backpropagated, reported and non-finite-checked loss. Under
    torchrun DDP all-reduces gradients of parameters used by the forward only: a regularizer on such
    parameters is fine (their gradients, extra term included, are averaged), but DDP marks a parameter
    the forward does not use as unused, and a gradient the extra term then gives it makes the backward
    raise ("Expected to mark a variable ready only once"): such a parameter must take part in the forward.

    `after_step(model)` runs after every optimizer and scheduler step, under ``torch.no_grad()``, e.g.
    to multiply pruned weights by their masks again. It must act identically on every rank.

    `param_lr(model)` gives some parameters (by name) a learning rate of their own, scheduled like the
    others: a handful of learned slopes that must travel from 0 to 1 cannot at a fine-tuning rate of 2e-5.

    Hooks are code, not settings: they are not part of a checkpoint's identity, so a resumed run must
    be given the same hooks as the interrupted one to end with the same weights. Random draws in them
    come from torch's global RNG, which `fit` reseeds each epoch, so they are reproduced on resume.
    """

    loss: LossHook | None = None
    after_step: StepHook | None = None
    param_lr: ParamLrHook | None = None

    def __post_init__(self) -> None:
        for name in ("loss", "after_step", "param_lr"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise SpecError(f"FitHooks.{name}={getattr(self, name)!r} is not callable (or None)")

    def extra_loss(
        self, model: nn.Module, inputs: ExampleInputs, labels: torch.Tensor, outputs: torch.Tensor
    ) -> torch.Tensor | None:
        """The `loss` hook's term as a float32 scalar, or None; refuses anything but a one-element tensor."""
        if self.loss is None:
            return None
        term = self.loss(model, inputs, labels, outputs)
        if term is None:
            return None
        if not isinstance(term, torch.Tensor) or term.numel() != 1:
            shape = tuple(term.shape) if isinstance(term, torch.Tensor) else type(term).__name__
            raise SpecError(f"FitHooks.loss must return a scalar tensor or None, got {shape}")
        return term.float().reshape(())

    def own_lr(self, model: nn.Module) -> dict[str, float]:
        """{parameter name: its learning rate} from the `param_lr` hook (empty without one), checked."""
        if self.param_lr is None:
            return {}
        rates = dict(self.param_lr(model))
        names = {name for name, _ in model.named_parameters()}
        for name, lr in rates.items():
            if name not in names or not isinstance(lr, int | float) or not lr > 0:
                raise SpecError(f"FitHooks.param_lr: {name!r}: {lr!r} must be a parameter of the model and a lr > 0")
        return rates

    def step_done(self, model: nn.Module) -> None:
        """Run the `after_step` hook (if any) without recording gradients."""
        if self.after_step is not None:
            with torch.no_grad():
                self.after_step(model)
