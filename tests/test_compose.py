"""Exactness of the pure tensor algebra (compose.py) on random inputs, including property tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tlc.surgery import compose

DT = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d}


def _conv_case(draw, dims):
    k1, k2 = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    s1, s2 = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    d1, d2 = draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 1, 2]))
    depthwise = draw(st.booleans()) and draw(st.booleans())
    if depthwise:
        c0 = c1 = c2 = g1 = g2 = 4
    else:
        g1, g2 = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
        c0, c1, c2 = (4 * draw(st.integers(1, 2)) for _ in range(3))
    p1 = draw(st.integers(0, 3))
    return dict(k1=k1, k2=k2, s1=s1, s2=s2, d1=d1, d2=d2, g1=g1, g2=g2, c0=c0, c1=c1, c2=c2, p1=p1, dims=dims)


@st.composite
def conv_cases(draw):
    return _conv_case(draw, draw(st.sampled_from([1, 2])))


@settings(max_examples=80, deadline=None)
@given(conv_cases(), st.booleans(), st.booleans())
def test_compose_conv_matches_chain(case, bias1, bias2):
    n, conv = case["dims"], CONV[case["dims"]]
    k1, k2 = (case["k1"],) * n, (case["k2"],) * n
    w1 = torch.randn(case["c1"], case["c0"] // case["g1"], *k1, dtype=DT)
    w2 = torch.randn(case["c2"], case["c1"] // case["g2"], *k2, dtype=DT)
    b1 = torch.randn(case["c1"], dtype=DT) if bias1 else None
    b2 = torch.randn(case["c2"], dtype=DT) if bias2 else None
    size = 40
    x = torch.randn(2, case["c0"], *([size] * n), dtype=DT)
    mid = conv(x, w1, b1, case["s1"], case["p1"], case["d1"], case["g1"])
    y = conv(mid, w2, b2, case["s2"], 0, case["d2"], case["g2"])
    w, b, dil, groups = compose.compose_conv_weights(
        w1, b1, w2, b2, stride1=(case["s1"],) * n, dilation1=(case["d1"],) * n, groups1=case["g1"],
        dilation2=(case["d2"],) * n, groups2=case["g2"])
    z = conv(x, w, b, case["s1"] * case["s2"], case["p1"], dil, groups)
    assert z.shape == y.shape
    torch.testing.assert_close(z, y, rtol=1e-9, atol=1e-9)
    if case["g1"] == case["g2"] == case["c1"] == case["c0"] == case["c2"]:
        assert groups == case["c0"]  # depthwise o depthwise stays depthwise


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(1, 2))
def test_second_padding_is_exact_after_pointwise_bias_free_first(k2, p2, s2):
    w1 = torch.randn(6, 4, 1, 1, dtype=DT)
    w2 = torch.randn(5, 6, k2, k2, dtype=DT)
    x = torch.randn(1, 4, 20, 20, dtype=DT)
    y = F.conv2d(F.conv2d(x, w1), w2, None, s2, p2)
    w, b, dil, g = compose.compose_conv_weights(w1, None, w2, None, stride1=(1, 1), dilation1=(1, 1), groups1=1,
                                                dilation2=(1, 1), groups2=1)
    torch.testing.assert_close(F.conv2d(x, w, b, s2, p2, dil, g), y, rtol=1e-9, atol=1e-9)


def test_padding_inside_a_chain_is_not_exact_at_the_borders():
    """Why linearize moves padding: composing with the intermediate zero-padded differs at borders."""
    w1, b1 = torch.randn(4, 3, 3, 3, dtype=DT), torch.randn(4, dtype=DT)
    w2 = torch.randn(5, 4, 3, 3, dtype=DT)
    x = torch.randn(1, 3, 12, 12, dtype=DT)
    y = F.conv2d(F.conv2d(x, w1, b1, 1, 1), w2, None, 1, 1)
    w, b, dil, g = compose.compose_conv_weights(w1, b1, w2, None, stride1=(1, 1), dilation1=(1, 1), groups1=1,
                                                dilation2=(1, 1), groups2=1)
    z = F.conv2d(x, w, b, 1, 2, dil, g)
    interior = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(z[interior], y[interior])
    assert (z[..., 0, :] - y[..., 0, :]).abs().max() > 1e-3


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2), st.integers(0, 2), st.integers(1, 2),
       st.sampled_from([1, 2]), st.sampled_from([1, 2]))
def test_add_conv_kernels(ka, kb, pa_extra, pb_extra, stride, ga, gb):
    # two convs over the same input producing the same grid: "same"-style paddings around a common centre
    pa, pb = (ka - 1) // 2 * 0 + pa_extra, pb_extra
    size = 17
    wa = torch.randn(4, 4 // ga, 2 * pa + 1, 2 * pa + 1, dtype=DT) if ka else None
    wb = torch.randn(4, 4 // gb, 2 * pb + 1, 2 * pb + 1, dtype=DT)
    x = torch.randn(2, 4, size, size, dtype=DT)
    y = F.conv2d(x, wa, None, stride, pa, 1, ga) + F.conv2d(x, wb, None, stride, pb, 1, gb)
    w, pad, dil, g = compose.add_conv_kernels(wa, (pa, pa), (1, 1), ga, wb, (pb, pb), (1, 1), gb)
    torch.testing.assert_close(F.conv2d(x, w, None, stride, pad, dil, g), y, rtol=1e-9, atol=1e-9)


def test_add_identity_to_a_strided_projection_grid():
    w = torch.randn(8, 4, 3, 3, dtype=DT)
    proj = torch.randn(8, 4, 1, 1, dtype=DT)
    x = torch.randn(1, 4, 15, 15, dtype=DT)
    y = F.conv2d(x, w, None, 2, 1) + F.conv2d(x, proj, None, 2, 0)
    k, pad, dil, g = compose.add_conv_kernels(w, (1, 1), (1, 1), 1, proj, (0, 0), (1, 1), 1)
    torch.testing.assert_close(F.conv2d(x, k, None, 2, pad, dil, g), y)


def test_fold_bn_weights_matches_batch_norm():
    w, b = torch.randn(6, 3, 3, 3, dtype=DT), torch.randn(6, dtype=DT)
    mean, var = torch.randn(6, dtype=DT), torch.rand(6, dtype=DT) + 0.1
    gamma, beta = torch.randn(6, dtype=DT), torch.randn(6, dtype=DT)
    x = torch.randn(2, 3, 9, 9, dtype=DT)
    y = F.batch_norm(F.conv2d(x, w, b, 1, 1), mean, var, gamma, beta, False, 0.0, 1e-3)
    wf, bf = compose.fold_bn_weights(w, b, mean, var, gamma, beta, 1e-3)
    torch.testing.assert_close(F.conv2d(x, wf, bf, 1, 1), y)
    wf, bf = compose.fold_bn_weights(w, None, mean, var, None, None, 1e-5)
    y = F.batch_norm(F.conv2d(x, w, None, 1, 1), mean, var, None, None, False, 0.0, 1e-5)
    torch.testing.assert_close(F.conv2d(x, wf, bf, 1, 1), y)


def test_compose_linear_and_shape_errors():
    w1, b1, w2, b2 = (torch.randn(*s, dtype=DT) for s in ((7, 5), (7,), (3, 7), (3,)))
    x = torch.randn(4, 5, dtype=DT)
    w, b = compose.compose_linear_weights(w1, b1, w2, b2)
    torch.testing.assert_close(F.linear(x, w, b), F.linear(F.linear(x, w1, b1), w2, b2))
    try:
        compose.compose_linear_weights(w2, b2, w1, b1)
    except ValueError as e:
        assert "cannot compose" in str(e)
    else:
        raise AssertionError("mismatched shapes must be refused")


def test_regroup_and_dilate_are_function_preserving():
    w = torch.randn(8, 2, 3, 3, dtype=DT)
    x = torch.randn(1, 8, 10, 10, dtype=DT)
    y = F.conv2d(x, w, groups=4)
    for new in (2, 1):
        torch.testing.assert_close(F.conv2d(x, compose.regroup_conv_weight(w, 4, new), groups=new), y)
    d = compose.dilate_kernel(w, (2, 2), (1, 1))
    torch.testing.assert_close(F.conv2d(x, d, groups=4, padding=2), F.conv2d(x, w, groups=4, dilation=2, padding=2))
    assert w.shape == (8, 2, 3, 3)  # inputs untouched
