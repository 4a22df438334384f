"""The modules that mark activation sites in a model, registered with the op registry as leaves.

``SiteActivation`` wraps a site that is still non-linear, ``SiteGate`` replaces a linearized one. They
live below ``tlc.graph`` (which recognises them while naming sites) and ``tlc.surgery`` (which inserts them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from tlc.ops import Kind, OpInfo, register_module


def _broadcast_shape(channels: int, channel_dim: int, ndim: int) -> tuple[int, ...]:
    if channel_dim == -1 or channel_dim == ndim - 1:
        return (channels,)
    return (channels,) + (1,) * (ndim - channel_dim - 1)


class SiteGate(nn.Module):
    """A linearized activation site: the identity, or a per-channel 0/1 gate (removed channels).

    ``mask`` is None for a plain identity. Channels whose mask is 0 output exactly 0; the merge
    removes them physically.
    """

    def __init__(self, site: str, mask: torch.Tensor | None = None, channel_dim: int = 1, ndim: int = 4):
        super().__init__()
        self.site = site
        self.channel_dim = channel_dim
        if mask is None:
            self.mask = None
        else:
            mask = torch.as_tensor(mask).detach().to(torch.float32).reshape(-1)
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"the mask of site {site} must hold only 0 and 1")
            self.register_buffer("mask", mask.reshape(_broadcast_shape(mask.numel(), channel_dim, ndim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return x
        return x * self.mask

    def extra_repr(self) -> str:
        if self.mask is None:
            return f"site={self.site!r}, identity"
        kept = int(self.mask.sum().item())
        return f"site={self.site!r}, kept={kept}/{self.mask.numel()}, channel_dim={self.channel_dim}"


class SiteActivation(nn.Module):
    """An activation site that is still non-linear, carrying its name so it stays stable.

    The training form wraps every remaining site in one of these: a module called twice, or a
    functional activation, keeps the name it had in the original model however often the graph is
    traced again. It computes exactly what the wrapped activation computed.
    """

    def __init__(self, site: str, activation: str, module: nn.Module | None = None,
                 function: Callable[..., torch.Tensor] | None = None, kwargs: dict[str, Any] | None = None,
                 origin: str | None = None):
        super().__init__()
        if (module is None) == (function is None):
            raise ValueError("give exactly one of module and function")
        self.site = site
        self.origin = origin
        self.activation = activation
        self.act = module
        self.function = function
        self.kwargs = dict(kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            return self.act(x)
        return self.function(x, **self.kwargs)

    def extra_repr(self) -> str:
        return f"site={self.site!r}, activation={self.activation}"


def _gate_info(node: fx.Node, m: SiteGate, gm: fx.GraphModule) -> OpInfo:
    if m.mask is None:
        return OpInfo(Kind.IDENTITY, (node.args[0],), note=f"linearized site {m.site}")
    return OpInfo(Kind.SCALE, (node.args[0],), dict(scale=m.mask.reshape(-1), channel_dim=m.channel_dim),
                  owner=str(node.target), note=f"linearized site {m.site}")


def _activation_info(node: fx.Node, m: SiteActivation, gm: fx.GraphModule) -> OpInfo:
    inplace = bool(getattr(m.act, "inplace", False) or m.kwargs.get("inplace", False))
    return OpInfo(Kind.SITE, (node.args[0],), owner=str(node.target), activation=m.activation, inplace=inplace)


register_module(SiteGate, _gate_info)
register_module(SiteActivation, _activation_info)
