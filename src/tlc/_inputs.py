"""Example inputs: normalisation to (args, kwargs), running a model on them, comparing outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

ExampleInputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]


def as_call(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split example inputs into positional and keyword arguments.

    A tensor is one positional argument, a tuple/list is the positional arguments, a mapping
    (e.g. a tokenizer's output) is keyword arguments.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs must be a tensor, a tuple/list of positional arguments or a mapping of "
        f"keyword arguments, not {type(example_inputs).__name__}"
    )


def run(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """Call `model` on the example inputs without recording gradients."""
    args, kwargs = as_call(example_inputs)
    with torch.no_grad():
        return model(*args, **kwargs)


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a (possibly nested) model output, in a fixed order."""
    leaves, _ = tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, or an object or dict with ``logits`` (Hugging Face
    ``ModelOutput``). A tuple is refused rather than guessed at."""
    if isinstance(output, torch.Tensor):
        return output
    found = getattr(output, "logits", None)
    if found is None and isinstance(output, Mapping):
        found = output.get("logits")
    if not isinstance(found, torch.Tensor):
        from tlc.errors import SpecError

        raise SpecError(f"the model returned a {type(output).__name__}; expected a logits tensor or an object with "
                        "a .logits tensor (e.g. a Hugging Face ModelOutput)")
    return found


def max_relative_error(reference: Any, candidate: Any) -> float:
    """Largest |candidate - reference| relative to the largest |reference|, over all outputs."""
    ref, cand = output_tensors(reference), output_tensors(candidate)
    if len(ref) != len(cand):
        return float("inf")
    worst = 0.0
    for a, b in zip(ref, cand):
        if a.shape != b.shape:
            return float("inf")
        a64, b64 = a.detach().double(), b.detach().double()
        scale = a64.abs().max().item() if a64.numel() else 0.0
        diff = (a64 - b64).abs().max().item() if a64.numel() else 0.0
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / max(scale, 1e-12))
    return worst


def to_device(example_inputs: ExampleInputs, device: torch.device | str) -> ExampleInputs:
    """Move every tensor of the example inputs to `device`."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, example_inputs)


def batch_size_of(example_inputs: ExampleInputs) -> int:
    """Leading dimension of the first tensor in the example inputs."""
    leaves, _ = tree_flatten(example_inputs)
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    raise TypeError("example_inputs hold no tensor with a batch dimension")
