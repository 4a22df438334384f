"""Pure tensor algebra of exact merges (docs/methods.md, "The merge"). No modules, no graphs.

Conventions: conv weights are ``[C_out, C_in / groups, *kernel]``; linear weights ``[out, in]``; a
missing bias is ``None``. Every function returns new tensors and never mutates its inputs. Callers
that want exactness to the last bit pass float64 tensors.
"""

from __future__ import annotations

import itertools
import math

import torch


def _bias(bias: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(n, dtype=like.dtype, device=like.device) if bias is None else bias.to(like.dtype)


def fold_bn_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv/linear into its weight and bias.

    W' = W * g / sqrt(var + eps) (per output channel), b' = (b - mean) * g / sqrt(var + eps) + beta.
    """
    if running_mean.shape[0] != weight.shape[0]:
        raise ValueError(f"BatchNorm has {running_mean.shape[0]} channels, the layer {weight.shape[0]} outputs")
    scale = torch.rsqrt(running_var.to(weight.dtype) + eps)
    if gamma is not None:
        scale = scale * gamma.to(weight.dtype)
    b = _bias(bias, weight.shape[0], weight)
    shift = (b - running_mean.to(weight.dtype)) * scale
    if beta is not None:
        shift = shift + beta.to(weight.dtype)
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), shift


def scale_output_channels(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply y -> scale * y + shift per output channel to a conv/linear (gates, BN, layer scale)."""
    b = _bias(bias, weight.shape[0], weight) * scale.to(weight.dtype)
    if shift is not None:
        b = b + shift.to(weight.dtype)
    return weight * scale.to(weight.dtype).reshape(-1, *([1] * (weight.dim() - 1))), b


def compose_linear_weights(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """linear2(linear1(x)) as one linear: W = W2 W1, b = W2 b1 + b2."""
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"cannot compose: first linear has {w1.shape[0]} outputs, second {w2.shape[1]} inputs")
    w = w2 @ w1.to(w2.dtype)
    b = w2 @ _bias(b1, w1.shape[0], w2) + _bias(b2, w2.shape[0], w2)
    return w, b


def identity_conv_weight(channels: int, spatial_dims: int, dtype: torch.dtype = torch.float64,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Depthwise 1x..x1 kernel of ones (use with groups=channels): the identity as a conv."""
    return torch.ones(channels, 1, *([1] * spatial_dims), dtype=dtype, device=device)


def regroup_conv_weight(weight: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """Rewrite a grouped conv weight for fewer groups (``new_groups`` divides ``groups``), zero-filled."""
    if groups == new_groups:
        return weight
    if groups % new_groups:
        raise ValueError(f"cannot regroup a conv with {groups} groups into {new_groups}")
    r = groups // new_groups
    c_out, c_in_g = weight.shape[:2]
    kernel = weight.shape[2:]
    per_group_out = c_out // groups
    w = weight.reshape(new_groups, r, per_group_out, 1, c_in_g, *kernel)
    eye = torch.eye(r, dtype=weight.dtype, device=weight.device).reshape(1, r, 1, r, 1, *([1] * len(kernel)))
    return (w * eye).reshape(c_out, r * c_in_g, *kernel)


def dilate_kernel(weight: torch.Tensor, dilation: tuple[int, ...], new_dilation: tuple[int, ...]) -> torch.Tensor:
    """Express a dilated kernel on a finer dilation grid (``new_dilation`` divides ``dilation``)."""
    factors = []
    for d, nd, k in zip(dilation, new_dilation, weight.shape[2:]):
        if k > 1 and d % nd:
            raise ValueError(f"dilation {nd} does not divide {d}")
        factors.append(d // nd if k > 1 else 1)
    if all(f == 1 for f in factors):
        return weight
    sizes = [(k - 1) * f + 1 for k, f in zip(weight.shape[2:], factors)]
    out = weight.new_zeros(*weight.shape[:2], *sizes)
    out[(slice(None), slice(None), *(slice(None, None, f) for f in factors))] = weight
    return out


def composed_dilation(k1: int, d1: int, s1: int, k2: int, d2: int) -> int:
    """Dilation of conv2 o conv1 along one dim: the gcd of the tap spacings that are used."""
    spacing = math.gcd(d1 if k1 > 1 else 0, s1 * d2 if k2 > 1 else 0)
    return spacing or 1


def compose_conv_weights(
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    stride1: tuple[int, ...],
    dilation1: tuple[int, ...],
    groups1: int,
    dilation2: tuple[int, ...],
    groups2: int,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], int]:
    """conv2(conv1(x)) as one conv, when the intermediate map is not zero-padded.

    Returns ``(weight, bias, dilation, groups)``. The composite has stride ``stride1 * stride2`` and
    padding ``padding1 + stride1 * padding2``; callers must only use it when conv2's padding is 0 or
    conv1's output is zero wherever conv2 would pad (see merge.py). The kernel is the full
    convolution of the two kernels with channel contraction; groups become gcd(groups1, groups2),
    so depthwise o depthwise stays depthwise.
    """
    n = w1.dim() - 2
    if w2.dim() - 2 != n:
        raise ValueError("cannot compose convolutions of different dimensionality")
    c1 = w1.shape[0]
    if w2.shape[1] * groups2 != c1:
        raise ValueError(f"cannot compose: first conv has {c1} outputs, second {w2.shape[1] * groups2} inputs")
    g = math.gcd(groups1, groups2)
    w1 = regroup_conv_weight(w1, groups1, g).to(w2.dtype)
    w2 = regroup_conv_weight(w2, groups2, g)
    k1, k2 = tuple(w1.shape[2:]), tuple(w2.shape[2:])
    dil = tuple(composed_dilation(a, d1, s1, b, d2) for a, d1, s1, b, d2 in zip(k1, dilation1, stride1, k2, dilation2))
    size = tuple((d1 * (a - 1) + s1 * d2 * (b - 1)) // dd + 1
                 for a, d1, s1, b, d2, dd in zip(k1, dilation1, stride1, k2, dilation2, dil))
    c0_g, c1_g, c2 = w1.shape[1], c1 // g, w2.shape[0]
    w1g = w1.reshape(g, c1_g, c0_g, *k1)
    w2g = w2.reshape(g, c2 // g, c1_g, *k2)
    out = w2.new_zeros(g, c2 // g, c0_g, *size)
    step1 = tuple(d1 // dd if a > 1 else 1 for d1, dd, a in zip(dilation1, dil, k1))
    for tap in itertools.product(*(range(b) for b in k2)):
        start = [s1 * d2 * t // dd for s1, d2, t, dd in zip(stride1, dilation2, tap, dil)]
        region = tuple(slice(st, st + st1 * (a - 1) + 1, st1) for st, st1, a in zip(start, step1, k1))
        contribution = torch.bmm(w2g[(..., *tap)], w1g.reshape(g, c1_g, -1)).reshape(g, c2 // g, c0_g, *k1)
        out[(slice(None), slice(None), slice(None), *region)] += contribution
    weight = out.reshape(c2, c0_g, *size)
    spatial = tuple(range(3, 3 + n))
    w2_sum = w2g.sum(dim=spatial) if n else w2g
    bias = torch.einsum("gom,gm->go", w2_sum, _bias(b1, c1, w2).reshape(g, c1_g)).reshape(c2)
    return weight, bias + _bias(b2, c2, w2), dil, g


def add_conv_kernels(
    w_a: torch.Tensor,
    pad_a: tuple[int, ...],
    dil_a: tuple[int, ...],
    groups_a: int,
    w_b: torch.Tensor,
    pad_b: tuple[int, ...],
    dil_b: tuple[int, ...],
    groups_b: int,
) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], int]:
    """Kernel of conv_a(x) + conv_b(x) (same stride, same output grid) as one conv.

    Taps are aligned through the paddings: tap t of a kernel with padding p reads input s*i + t - p.
    Returns ``(weight, padding, dilation, groups)``; biases simply add.
    """
    pad = tuple(max(a, b) for a, b in zip(pad_a, pad_b))
    dil = []
    for i in range(len(pad)):
        spacing = 0
        for w, p, d in ((w_a, pad_a, dil_a), (w_b, pad_b, dil_b)):
            spacing = math.gcd(spacing, d[i] if w.shape[2 + i] > 1 else 0)
            spacing = math.gcd(spacing, pad[i] - p[i])
        dil.append(spacing or 1)
    dil_t = tuple(dil)
    g = math.gcd(groups_a, groups_b)
    parts = []
    for w, p, d, groups in ((w_a, pad_a, dil_a, groups_a), (w_b, pad_b, dil_b, groups_b)):
        w = dilate_kernel(regroup_conv_weight(w, groups, g), d, dil_t)
        offset = tuple((pp - q) // dd for pp, q, dd in zip(pad, p, dil_t))
        parts.append((w, offset))
    size = tuple(max(off[i] + w.shape[2 + i] for w, off in parts) for i in range(len(pad)))
    out = parts[0][0].new_zeros(*parts[0][0].shape[:2], *size)
    for w, off in parts:
        region = tuple(slice(o, o + k) for o, k in zip(off, w.shape[2:]))
        out[(slice(None), slice(None), *region)] += w.to(out.dtype)
    return out, pad, dil_t, g
