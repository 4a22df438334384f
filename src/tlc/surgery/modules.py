"""Modules that tlc's surgery inserts into models (``ChannelAffine``), registered with the op registry as leaves.

The site-marking modules live in :mod:`tlc.sites`; ``SiteActivation`` and ``SiteGate`` are re-exported here.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from tlc.ops import Kind, OpInfo, register_module
from tlc.sites import SiteActivation, SiteGate, _broadcast_shape

__all__ = ["ChannelAffine", "SiteActivation", "SiteGate"]


class ChannelAffine(nn.Module):
    """y = scale * x + shift per channel: a batch norm folded to its eval-mode affine map."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int = 1, ndim: int = 4):
        super().__init__()
        self.channel_dim = channel_dim
        shape = _broadcast_shape(scale.numel(), channel_dim, ndim)
        self.register_buffer("scale", scale.detach().reshape(shape).clone())
        self.register_buffer("shift", shift.detach().reshape(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _affine_info(node: fx.Node, m: ChannelAffine, gm: fx.GraphModule) -> OpInfo:
    return OpInfo(Kind.BN, (node.args[0],),
                  dict(scale=m.scale.reshape(-1), shift=m.shift.reshape(-1), channel_dim=m.channel_dim),
                  owner=str(node.target))


register_module(ChannelAffine, _affine_info)
