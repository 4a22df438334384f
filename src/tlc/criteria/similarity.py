"""Which layers are alike: candidate pairs for Layer Fusion and three measures of their similarity.

Layer Fusion (O'Neill, Ver Steeg, Galstyan; arXiv 2007.14917; docs/methods.md) fuses two layers of the same
type and weight shape into one. The candidates here are convolution and linear layers (attention
projections that are ``nn.Linear`` included) grouped by module class, weight and bias shape and, by
default, their module path with its numbers replaced by ``#``: in a transformer every FFN up-projection
(``encoder.layer.N.intermediate.dense``) is a candidate with every other one, never with a query
projection of the same shape. Layers already sharing one weight (an earlier fusion, a tie of the
architecture) are one *unit*, named after its first layer; a pair joins two units of one group.

Measures of a pair (the unit's first layer stands for it):

- ``cosine``: cosine of the two flattened weights (higher: more alike);
- ``cka``: linear CKA (Kornblith et al. 2019) of the two layers' outputs on calibration data, each
  sample's output flattened; the HSIC terms of each batch (from Gram matrices of the centred features)
  are summed over the batches, as in the minibatch CKA of Nguyen, Raghu and Kornblith (2021), here with
  the plain (biased) HSIC: on one batch it is exactly linear CKA (higher: more alike);
- ``wasserstein``: the 1-D Wasserstein distance between the two weights' value distributions,
  by POT's ``ot.wasserstein_1d`` (``pip install pot``, the ``ot`` extra; lower: more alike).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tlc._inputs import run as run_model
from tlc.errors import SpecError
from tlc.measure.count import eval_mode

MEASURES = ("cosine", "cka", "wasserstein")
HIGHER_IS_CLOSER = {"cosine": True, "cka": True, "wasserstein": False}
LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass(frozen=True)
class Pair:
    """Two units of tied layers (module paths, model order) that may become one; ``name`` is ``a=b`` of
    their first layers (what a rejected step sets aside)."""

    first: tuple[str, ...]
    second: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.first[0]}={self.second[0]}"

    @property
    def layers(self) -> tuple[str, ...]:
        return self.first + self.second


def _pattern(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def layer_key(name: str, layer: nn.Module, by_name: bool = True) -> tuple[Any, ...]:
    """What two layers must share to be fused: class, weight and bias shape, dtype and (``by_name``) the
    module path with its numbers replaced by ``#``."""
    bias = getattr(layer, "bias", None)
    return (type(layer).__name__, tuple(layer.weight.shape), None if bias is None else tuple(bias.shape),
            layer.weight.dtype, _pattern(name) if by_name else "")


def fusable_units(model: nn.Module, by_name: bool = True) -> list[list[tuple[str, ...]]]:
    """The groups of layers that may be fused with each other (two units or more), each as its units:
    the layers sharing one weight, in model order."""
    groups: dict[tuple[Any, ...], dict[int, list[str]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES) and isinstance(module.weight, nn.Parameter):
            key = layer_key(name, module, by_name)
            groups.setdefault(key, {}).setdefault(id(module.weight), []).append(name)
    return [[tuple(names) for names in units.values()] for units in groups.values() if len(units) > 1]


def candidate_pairs(model: nn.Module, by_name: bool = True, exclude: Sequence[str] = ()) -> list[Pair]:
    """Every pair of units of one group, in model order, except the pairs named in ``exclude``."""
    pairs = []
    for units in fusable_units(model, by_name):
        for i, first in enumerate(units):
            pairs += [Pair(first, second) for second in units[i + 1:]]
    skip = set(exclude)
    return [p for p in pairs if p.name not in skip]


# ============================================================================ measures


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between two tensors, flattened (1: same direction; 0 when one is zero)."""
    return float(F.cosine_similarity(a.detach().reshape(1, -1).double(), b.detach().reshape(1, -1).double())[0])


def weight_wasserstein(a: torch.Tensor, b: torch.Tensor) -> float:
    """The 1-D Wasserstein-1 distance between the value distributions of two tensors (POT's
    ``ot.wasserstein_1d``; 0: the same values, in any order)."""
    try:
        import ot
    except ImportError as exc:
        raise SpecError("the Wasserstein measure needs POT: pip install pot (or tlc's 'ot' extra)") from exc
    # POT takes (samples, dims): a column each (a 1-D tensor makes it transpose a vector, which torch deprecates)
    return float(ot.wasserstein_1d(a.detach().reshape(-1, 1).double(), b.detach().reshape(-1, 1).double(), p=1)[0])


def centred_gram(features: torch.Tensor) -> torch.Tensor:
    """The Gram matrix (samples x samples) of the centred features, one sample per row (flattened)."""
    x = features.detach().reshape(features.shape[0], -1).double()
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same samples (one per row; any feature counts): 1 when
    one is an orthogonal transform of the other times a scale, plus a shift; 0 when unrelated."""
    k, m = centred_gram(x), centred_gram(y)
    return _cka((k * m).sum(), (k * k).sum(), (m * m).sum())


def _cka(xy: torch.Tensor | float, xx: torch.Tensor | float, yy: torch.Tensor | float) -> float:
    denominator = float(xx) * float(yy)
    return float(xy) / denominator ** 0.5 if denominator > 0 else 0.0


def output_cka(model: nn.Module, batches: Sequence[tuple[Any, torch.Tensor]],
               pairs: Sequence[Pair]) -> dict[str, float]:
    """Linear CKA of each pair's first layers' outputs over the calibration ``batches`` (eval mode): per
    batch the centred Gram matrices, summed into HSIC terms across batches. A layer called several times
    per forward contributes the sum of its calls' Gram matrices (the calls' features side by side)."""
    names = sorted({n for p in pairs for n in (p.first[0], p.second[0])})
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                gram = centred_gram(output)
                grams[name] = grams[name] + gram if name in grams else gram
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    cross = dict.fromkeys((p.name for p in pairs), 0.0)
    own = dict.fromkeys(names, 0.0)
    try:
        with eval_mode(model):
            for inputs, _labels in batches:
                grams.clear()
                run_model(model, inputs)
                for n in names:
                    own[n] += float((grams[n] * grams[n]).sum()) if n in grams else 0.0
                for p in pairs:
                    a, b = grams.get(p.first[0]), grams.get(p.second[0])
                    if a is not None and b is not None:
                        cross[p.name] += float((a * b).sum())
    finally:
        for handle in handles:
            handle.remove()
    return {p.name: _cka(cross[p.name], own[p.first[0]], own[p.second[0]]) for p in pairs}


def similarities(model: nn.Module, pairs: Sequence[Pair], measure: str,
                 batches: Sequence[tuple[Any, torch.Tensor]] = ()) -> dict[str, float]:
    """The ``measure`` of each pair, by name: a similarity (cosine, CKA) or a distance (Wasserstein, see
    :data:`HIGHER_IS_CLOSER`). CKA runs ``model`` on ``batches``; the weight measures read weights only."""
    if measure not in MEASURES:
        raise SpecError(f"unknown similarity measure {measure!r}; known: {', '.join(MEASURES)}")
    if measure == "cka":
        if not batches:
            raise SpecError("the CKA measure needs calibration batches")
        return output_cka(model, batches, pairs)
    score = cosine if measure == "cosine" else weight_wasserstein
    return {p.name: score(model.get_submodule(p.first[0]).weight, model.get_submodule(p.second[0]).weight)
            for p in pairs}


def most_similar_first(pairs: Sequence[Pair], values: dict[str, float], measure: str) -> list[Pair]:
    """``pairs`` from the most alike to the least (ties: model order)."""
    sign = -1.0 if HIGHER_IS_CLOSER[measure] else 1.0
    order = {p.name: i for i, p in enumerate(pairs)}
    return sorted(pairs, key=lambda p: (sign * values[p.name], order[p.name]))


__all__ = ["HIGHER_IS_CLOSER", "MEASURES", "Pair", "candidate_pairs", "centred_gram", "cosine", "fusable_units",
           "layer_key", "linear_cka", "most_similar_first", "output_cka", "similarities", "weight_wasserstein"]
