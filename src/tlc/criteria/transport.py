"""The max-sliced Wasserstein distance between two point clouds, differentiable (LaCoOT's regularizer).

LaCoOT (docs/methods.md) compares the input and the output of a block as two clouds of points, one point
per sample (the sample's features flattened). Its distance is the max-sliced Wasserstein-2 distance

    MSW_p(X, Y) = max_k W_p(<theta_k, X>, <theta_k, Y>),   k = 1..K,

over K random unit directions theta_k: each cloud is projected on theta_k, and W_p between the two
projected (one-dimensional, uniform-weight) clouds is a matter of sorting them. It is computed by POT's
``ot.sliced.max_sliced_wasserstein_distance`` (``pip install pot``, the ``ot`` extra) on its torch backend,
so it is differentiable in both clouds and can be added to a training loss.

Two choices of this wrapper, both so that a run is reproducible and a resumed run identical:

- the directions are drawn here and passed to POT as ``projections``: from a generator seeded with
  ``seed`` when one is given (a fixed measurement), else from torch's global generator of the clouds'
  device (which ``tlc.train.fit`` reseeds each epoch). POT's own draw with ``seed=None`` comes from a
  generator it seeds from the clock.
- the p-th root is taken here from POT's per-direction ``W_p^p`` (``log=True``), with a zero gradient where
  the distance is exactly 0 (identical clouds): d/dv v^(1/p) is infinite at 0 and would make the gradient NaN.
"""

from __future__ import annotations

import torch

from tlc.errors import SpecError


def random_directions(dim: int, count: int, *, seed: int | None = None, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``count`` random unit vectors of R^dim, as the columns of a (dim, count) matrix; from a generator
    seeded with ``seed``, else from torch's global generator of ``device``."""
    device = torch.device(device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(int(seed))
    theta = torch.randn(dim, count, generator=generator, device=device, dtype=dtype)
    return theta / theta.norm(dim=0, keepdim=True)


def max_sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 50, p: float = 2,
                           seed: int | None = None) -> torch.Tensor:
    """MSW_p between the clouds ``x`` and ``y`` (one point per row: each sample's features flattened), over
    ``projections`` random directions; a scalar tensor, differentiable in ``x`` and ``y``.

    Calls ``ot.sliced.max_sliced_wasserstein_distance(x, y, projections=theta, p=p, log=True)`` in float32
    (autocast off: the sort-based 1-D transport is not reliable in half precision) with the directions
    ``theta`` of :func:`random_directions`."""
    try:
        import ot
    except ImportError as exc:
        raise SpecError("the max-sliced Wasserstein distance needs POT: pip install pot (or tlc's 'ot' extra)") from exc
    if projections < 1:
        raise SpecError(f"projections must be >= 1, not {projections}")
    if p < 1:
        raise SpecError(f"p must be >= 1, not {p}")
    xs, ys = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if xs.shape[1] != ys.shape[1]:
        raise SpecError(f"the two clouds live in different spaces: {tuple(x.shape)} and {tuple(y.shape)}")
    with torch.autocast(xs.device.type, enabled=False):
        xs, ys = xs.float(), ys.float()
        theta = random_directions(xs.shape[1], projections, seed=seed, device=xs.device)
        _, log = ot.sliced.max_sliced_wasserstein_distance(xs, ys, projections=theta, p=p, log=True)
        power = log["projected_emds"].max()  # max_k W_p^p along theta_k
        positive = power > 0
        safe = torch.where(positive, power, torch.ones_like(power))
        return torch.where(positive, safe ** (1.0 / p), torch.zeros_like(power))


__all__ = ["max_sliced_wasserstein", "random_directions"]
