"""Affine maps from a segment's entry tensor: the algebra behind every merge.

A :class:`Map` says "this tensor equals one convolution of the entry tensor": weight, bias, stride,
padding (applied to the entry), dilation and groups. A linear layer is the same thing with no spatial
dimension acting on the last dim (``kind == "dense"``). Walking a segment op by op composes the maps;
the map of the segment's exit is the single layer that replaces it.

Maps work in two modes: *shape mode* (``numeric=False``) only tracks sizes and structure and is used
to plan (cheap, many candidates); *numeric mode* computes float64 tensors for the chosen merges.

Exactness: composing ``conv2 o M`` is exact only if conv2 pads with zeros where M is itself zero, that
is when conv2 has no padding or M is *zero-preserving* (pointwise, no bias, or zero everywhere).
Otherwise :class:`Infeasible` is raised in strict mode; ``linearize(exact=True)`` moves the padding first
so that it holds.

A *constant* map does not depend on the entry at all: its tensor is ``bias`` at every position (a branch
behind a gate whose channels are all off, see :mod:`tlc.surgery.constants`; :func:`constant_map`). Added
to another map it only shifts that map's bias, so the layers computing it vanish from the merged layer: a
residual block whose branch is constant becomes a per-channel bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from tlc.surgery import compose


class Infeasible(Exception):
    """The operations cannot be merged into one layer exactly (the message says why)."""


@dataclass
class Map:
    kind: str  # "conv" (channels on dim 1, spatial dims after) or "dense" (features on the last dim)
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    weight: torch.Tensor | None = None  # [out, in / groups, *kernel], float64, numeric mode only
    bias: torch.Tensor | None = None  # [out], float64, numeric mode only
    bias_zero: bool = True
    identity: bool = False
    weight_ops: int = 0  # conv/linear layers composed into this map
    zero_out: frozenset[int] = field(default_factory=frozenset)  # output channels that are exactly 0
    constant: bool = False  # the tensor is ``bias`` at every position, whatever the entry

    @property
    def is_zero(self) -> bool:
        """Every output channel is exactly 0, everywhere."""
        return len(self.zero_out) == self.out_channels

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel)

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride) and not any(self.padding)

    @property
    def zero_preserving(self) -> bool:
        """Whether the map is 0 wherever the entry is 0 (so padding after it may move before it, or, when
        it is 0 everywhere, need not move at all)."""
        return (self.pointwise and self.bias_zero) or self.is_zero

    @property
    def diagonal(self) -> bool:
        """A per-channel affine map (no channel mixing, no spatial extent)."""
        return self.groups == self.in_channels == self.out_channels and self.pointwise

    @property
    def weight_numel(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel)

    def output_size(self, entry_size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple((h + 2 * p - d * (k - 1) - 1) // s + 1
                     for h, p, d, k, s in zip(entry_size, self.padding, self.dilation, self.kernel, self.stride))


def identity_map(kind: str, channels: int, spatial_dims: int, numeric: bool) -> Map:
    one = (1,) * spatial_dims
    return Map(
        kind=kind, in_channels=channels, out_channels=channels, groups=channels, kernel=one, stride=one,
        padding=(0,) * spatial_dims, dilation=one,
        weight=compose.identity_conv_weight(channels, spatial_dims) if numeric else None,
        bias=torch.zeros(channels, dtype=torch.float64) if numeric else None,
        identity=True,
    )


def constant_map(kind: str, in_channels: int, out_channels: int, spatial_dims: int, zero_out: frozenset[int],
                 bias: torch.Tensor | None = None) -> Map:
    """The map of a per-channel constant (``bias``, numeric mode only) that does not read the entry: it
    only ever joins another map's bias (:func:`add`), so it has no weight."""
    one = (1,) * spatial_dims
    return Map(kind=kind, in_channels=in_channels, out_channels=out_channels, groups=1, kernel=one, stride=one,
               padding=(0,) * spatial_dims, dilation=one, bias=bias, bias_zero=len(zero_out) == out_channels,
               zero_out=frozenset(zero_out), constant=True)


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def apply_conv(m: Map, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...],
               padding: tuple[int, ...], dilation: tuple[int, ...], groups: int, *,
               numeric: bool, strict: bool = True) -> Map:
    """The map of ``conv(x)`` where x has map ``m`` (a linear layer is a conv with no spatial dims)."""
    c_out, c_in = weight.shape[0], weight.shape[1] * groups
    if c_in != m.out_channels:
        raise Infeasible(f"layer expects {c_in} channels, its input has {m.out_channels}")
    if len(stride) != m.spatial_dims:
        raise Infeasible("layer and input have different spatial dimensions")
    if strict and any(padding) and not m.zero_preserving:
        raise Infeasible("zero padding inside the segment (linearize with exact=True moves it)")
    new_stride = tuple(a * b for a, b in zip(m.stride, stride))
    new_padding = tuple(p1 + s1 * p2 for p1, s1, p2 in zip(m.padding, m.stride, padding))
    if m.identity:
        return Map(
            kind=m.kind, in_channels=m.in_channels, out_channels=c_out, groups=groups, kernel=tuple(weight.shape[2:]),
            stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
            weight=_f64(weight) if numeric else None,
            bias=(_f64(bias) if bias is not None else torch.zeros(c_out, dtype=torch.float64)) if numeric else None,
            bias_zero=bias is None, weight_ops=1,
        )
    k2 = tuple(weight.shape[2:])
    dil = tuple(compose.composed_dilation(a, d1, s1, b, d2)
                for a, d1, s1, b, d2 in zip(m.kernel, m.dilation, m.stride, k2, dilation))
    kernel = tuple((d1 * (a - 1) + s1 * d2 * (b - 1)) // dd + 1
                   for a, d1, s1, b, d2, dd in zip(m.kernel, m.dilation, m.stride, k2, dilation, dil))
    g = math.gcd(m.groups, groups)
    w = b = None
    if numeric:
        w, b, dil, g = compose.compose_conv_weights(
            m.weight, m.bias, _f64(weight), _f64(bias), stride1=m.stride, dilation1=m.dilation, groups1=m.groups,
            dilation2=tuple(dilation), groups2=groups)
    depthwise = groups == c_in == c_out
    if m.is_zero and bias is None:
        zero_out = frozenset(range(c_out))
    else:
        zero_out = m.zero_out if depthwise and bias is None else frozenset()
    return Map(
        kind=m.kind, in_channels=m.in_channels, out_channels=c_out, groups=g, kernel=kernel, stride=new_stride,
        padding=new_padding, dilation=dil, weight=w, bias=b, bias_zero=m.bias_zero and bias is None,
        weight_ops=m.weight_ops + 1, zero_out=zero_out,
        # a uniform input stays uniform unless zero padding meets a non-zero border
        constant=m.constant and (m.is_zero or not any(padding)),
    )


def zero_channels(t: torch.Tensor) -> frozenset[int]:
    """Indices where a per-channel tensor is exactly zero."""
    return frozenset(torch.nonzero(t.detach().reshape(-1) == 0).flatten().tolist())


def apply_affine(m: Map, scale: torch.Tensor, shift: torch.Tensor | None, *, numeric: bool,
                 scale_zeros: frozenset[int] | None = None, shift_zeros: frozenset[int] | None = None) -> Map:
    """The map of ``scale * x + shift`` per channel (batch norm, channel gate, layer scale).

    ``scale_zeros``/``shift_zeros`` are the zero channels of scale and shift, if already known."""
    if scale.numel() != m.out_channels:
        raise Infeasible(f"per-channel op has {scale.numel()} channels, its input {m.out_channels}")
    zeros = scale_zeros if scale_zeros is not None else zero_channels(scale)
    zero_out = m.zero_out | zeros
    if shift is not None:
        zero_out = zero_out & (shift_zeros if shift_zeros is not None else zero_channels(shift))
    w = b = None
    if numeric:
        w, b = compose.scale_output_channels(m.weight, m.bias, _f64(scale), _f64(shift))
    return replace(m, weight=w, bias=b, bias_zero=m.bias_zero and shift is None, identity=False, zero_out=zero_out,
                   constant=m.constant or len(zeros) == m.out_channels)


def add(a: Map, b: Map, *, numeric: bool) -> Map:
    """The map of ``x_a + x_b`` (both maps from the same entry, same output grid)."""
    if a.kind != b.kind or a.spatial_dims != b.spatial_dims:
        raise Infeasible("sum of tensors of different layouts")
    if a.out_channels != b.out_channels:
        raise Infeasible("sum of branches with different channel counts")
    if b.constant and not a.constant:
        return _shifted(a, b, numeric)
    if a.constant and not b.constant:
        return _shifted(b, a, numeric)
    if a.stride != b.stride:
        raise Infeasible("sum of branches with different strides")
    pad = tuple(max(p, q) for p, q in zip(a.padding, b.padding))
    dil = []
    for i in range(len(pad)):
        spacing = 0
        for m in (a, b):
            spacing = math.gcd(spacing, m.dilation[i] if m.kernel[i] > 1 else 0)
            spacing = math.gcd(spacing, pad[i] - m.padding[i])
        dil.append(spacing or 1)
    kernel = tuple(
        max((pad[i] - m.padding[i]) // dil[i] + (m.kernel[i] - 1) * (m.dilation[i] // dil[i] if m.kernel[i] > 1 else 0)
            + 1 for m in (a, b))
        for i in range(len(pad)))
    groups = math.gcd(a.groups, b.groups)
    w = bias = None
    if numeric:
        w, pad, dil_t, groups = compose.add_conv_kernels(a.weight, a.padding, a.dilation, a.groups,
                                                         b.weight, b.padding, b.dilation, b.groups)
        dil = list(dil_t)
        kernel = tuple(w.shape[2:])
        bias = a.bias + b.bias
    return Map(
        kind=a.kind, in_channels=a.in_channels, out_channels=a.out_channels, groups=groups, kernel=kernel,
        stride=a.stride, padding=pad, dilation=tuple(dil), weight=w, bias=bias,
        bias_zero=a.bias_zero and b.bias_zero, weight_ops=a.weight_ops + b.weight_ops,
        zero_out=a.zero_out & b.zero_out, constant=a.constant and b.constant,
    )


def _shifted(m: Map, constant: Map, numeric: bool) -> Map:
    """``m`` plus a constant map: ``m`` with the constant added to its bias, the constant's layers gone."""
    if constant.is_zero:
        return m
    return replace(m, bias=m.bias + constant.bias if numeric else None, bias_zero=False, identity=False,
                   zero_out=m.zero_out & constant.zero_out)


def macs(m: Map, out_positions: int, removed_in: int = 0, removed_out: int = 0) -> int:
    """Multiply-accumulates of realizing ``m`` as one layer over ``out_positions`` output positions,
    after ``removed_in`` input and ``removed_out`` output channels are removed."""
    if m.identity:
        return 0
    if m.diagonal and m.weight_ops == 0:
        return 0
    eff_out = m.out_channels - removed_out
    eff_in = max(m.in_channels - removed_in, 0)
    return eff_out * (eff_in // m.groups if m.groups > 1 else eff_in) * math.prod(m.kernel) * out_positions
