"""BOPs accounting (ALGORITHM.md §3.7): MAC counts vs. an explicit conv, and the scheme ratios."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from test_fusion import conv_ref

from cfws_jax.bops import SCHEMES, ConvGeometry, conv_macs, layer_bops, network_bops


def counted_macs(k, cin, cout, groups, h, w, stride):
    """MACs counted from an actual conv: (#output elements) x (taps each output reads)."""
    x = np.zeros((1, cin, h, w))
    y = conv_ref(x, np.zeros((cout, cin // groups, k, k)), stride, k // 2, groups)
    return y.size * (cin // groups) * k * k, y.shape[2], y.shape[3]


GEOMS = [  # k, cin, cout, groups, h, w, stride
    (3, 4, 8, 1, 9, 7, 1), (3, 8, 8, 2, 8, 8, 2), (3, 6, 6, 6, 10, 9, 2), (5, 4, 4, 4, 7, 7, 1),
    (1, 6, 12, 3, 5, 6, 1), (3, 3, 16, 1, 12, 12, 2),
]


@pytest.mark.parametrize("k,cin,cout,groups,h,w,stride", GEOMS)
def test_conv_macs_matches_counted(k, cin, cout, groups, h, w, stride):
    macs, oh, ow = counted_macs(k, cin, cout, groups, h, w, stride)
    g = ConvGeometry(k, cin, cout, groups, oh, ow)
    assert conv_macs(g) == macs
    assert ConvGeometry.from_kernel((k, k, cin // groups, cout), oh, ow, groups) == g


@pytest.mark.parametrize("k,cin,cout,groups,h,w,stride", GEOMS)
def test_scheme_ratios_are_exact(k, cin, cout, groups, h, w, stride):
    _, oh, ow = counted_macs(k, cin, cout, groups, h, w, stride)
    g = ConvGeometry(k, cin, cout, groups, oh, ow)
    int8 = layer_bops(g, "int8")
    assert int8 == 64 * conv_macs(g)
    ratio = {s: Fraction(layer_bops(g, s), int8) for s in SCHEMES}
    assert ratio["int16_weights"] == 2 and ratio["w16a16"] == 4 and ratio["split_whole"] == 2
    # coarse 1x1 conv has O*(I/g)*H'*W' MACs -> 1 + 1/k^2; 1x1 layers are not split
    assert ratio["cfws"] == (Fraction(k * k + 1, k * k) if k > 1 else 1)
    if k == 3:
        assert ratio["cfws"] == Fraction(10, 9)


def test_bit_widths_enter_linearly():
    g = ConvGeometry(3, 8, 8, 1, 4, 4)
    m = conv_macs(g)
    assert layer_bops(g, "int8", w_bits=4, a_bits=8) == 32 * m
    assert layer_bops(g, "int16_weights", a_bits=4) == 64 * m
    assert layer_bops(g, "cfws", w_bits=4, a_bits=4) == 16 * (m + m // 9)


def test_even_kernel_is_not_split():
    g = ConvGeometry(2, 4, 4, 1, 3, 3)
    assert not g.splittable and layer_bops(g, "cfws") == layer_bops(g, "int8")


def test_network_totals():
    layers = [
        ("stem", ConvGeometry(3, 3, 8, 1, 16, 16), "cfws"),
        ("pw", ConvGeometry(1, 8, 16, 1, 16, 16), "cfws"),
        ("dw", ConvGeometry(3, 16, 16, 16, 8, 8), "cfws"),
        ("fc", ConvGeometry(1, 16, 10), "int8"),
    ]
    rep = network_bops(layers)
    m = [conv_macs(g) for _, g, _ in layers]
    expected = [64 * (m[0] + m[0] // 9), 64 * m[1], 64 * (m[2] + m[2] // 9), 64 * m[3]]
    assert [r["bops"] for r in rep["layers"]] == expected
    assert [r["name"] for r in rep["layers"]] == ["stem", "pw", "dw", "fc"]
    assert rep["total_macs"] == sum(m) and rep["total_bops"] == sum(expected)
    assert rep["total_int8_bops"] == 64 * sum(m)
    assert rep["ratio_vs_int8"] == pytest.approx(sum(expected) / (64 * sum(m)), rel=1e-12)
    assert rep["layers"][0]["ratio_vs_int8"] == pytest.approx(10 / 9, rel=1e-12)
    unnamed = network_bops([(g, s) for _, g, s in layers])
    assert [r["name"] for r in unnamed["layers"]] == ["0", "1", "2", "3"]
    assert unnamed["total_bops"] == rep["total_bops"]
    all_int16 = network_bops([(g, "int16_weights") for _, g, _ in layers])
    assert all_int16["total_bops"] == 2 * rep["total_int8_bops"]


def test_validation_errors():
    with pytest.raises(ValueError, match="groups"):
        ConvGeometry(3, 6, 8, 4)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvGeometry(0, 4, 4)
    with pytest.raises(ValueError, match="unknown BOPs scheme"):
        layer_bops(ConvGeometry(3, 4, 4), "int4")
    with pytest.raises(ValueError, match="layer 'conv9'"):
        network_bops([("conv9", ConvGeometry(3, 4, 4), "fp8")])
    with pytest.raises(ValueError, match="square"):
        ConvGeometry.from_kernel((3, 1, 4, 4), 2, 2)
