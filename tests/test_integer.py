"""Integer-arithmetic CFWS conv: exact int32 accumulators (NumPy reference) and the same
output as the simulated (fake-quant) conv with the effective kernel."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cfws_jax.cfws import CFWSConfig, cfws_quantize, plain_quantize
from cfws_jax.integer import cfws_conv_integer, int_conv, plain_conv_integer
from cfws_jax.models.layers import conv2d
from test_cfws import repvgg_like
from test_fusion import conv_ref, to_hwio


def _nchw(x):
    return np.transpose(x, (0, 3, 1, 2))


def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def _case(seed, o, i, groups, k=3):
    rng = np.random.default_rng(seed)
    w_oihw = repvgg_like(seed, o=o, i=i, groups=groups) if k == 3 else rng.normal(0, 1, (o, i // groups, k, k))
    kernel = to_hwio(np.asarray(w_oihw, np.float32))
    x_codes = rng.integers(-127, 128, (2, 9, 9, i)).astype(np.int8)
    return kernel, x_codes, np.float32(0.037), rng.normal(0, 0.1, o).astype(np.float32)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("o,i,groups", [(8, 8, 1), (8, 8, 2), (8, 8, 8)])
@pytest.mark.parametrize("extract_center", [True, False])
def test_cfws_integer_conv_matches_reference_and_simulation(stride, o, i, groups, extract_center):
    kernel, xq, sx, bias = _case(stride + groups, o, i, groups)
    w = cfws_quantize(kernel, CFWSConfig(extract_center=extract_center))
    y, acc_c, acc_f = jax.jit(cfws_conv_integer, static_argnames=("strides", "groups"))(
        xq, sx, w, bias, strides=stride, groups=groups)
    assert acc_c.dtype == acc_f.dtype == np.int32
    # exact accumulators: float64 NumPy conv of integers is exact at these sizes
    fine_ref = conv_ref(_nchw(xq), np.transpose(np.asarray(w.fine_codes), (3, 2, 0, 1)), stride, 1, groups)
    np.testing.assert_array_equal(acc_f, _nhwc(fine_ref).astype(np.int64))
    if extract_center:
        coarse_oihw = np.transpose(np.asarray(w.coarse_codes), (1, 0))[:, :, None, None]
        coarse_ref = conv_ref(_nchw(xq), coarse_oihw, stride, 0, groups)
    else:
        coarse_ref = conv_ref(_nchw(xq), np.transpose(np.asarray(w.coarse_codes), (3, 2, 0, 1)), stride, 1, groups)
    np.testing.assert_array_equal(acc_c, _nhwc(coarse_ref).astype(np.int64))
    # same output as the simulated conv with the effective kernel on the dequantized input
    sim = conv2d(xq.astype(np.float32) * sx, w.kernel, bias, stride, 1, groups)
    np.testing.assert_allclose(y, sim, rtol=1e-5, atol=1e-5 * float(np.abs(sim).max()))


def test_plain_integer_conv_and_int16_codes():
    kernel, xq, sx, bias = _case(0, 8, 8, 1)
    codes, scale, khat = plain_quantize(kernel, bits=8)
    y = plain_conv_integer(xq, sx, codes.astype(np.int8), scale, bias, strides=2)
    sim = conv2d(xq.astype(np.float32) * sx, khat, bias, 2, 1, 1)
    np.testing.assert_allclose(y, sim, rtol=1e-5, atol=1e-5 * float(np.abs(sim).max()))
    codes16, _, _ = plain_quantize(kernel, bits=16)
    acc = int_conv(xq, codes16.astype(np.int16), 1, 1, 1)
    ref = conv_ref(_nchw(xq), np.transpose(np.asarray(codes16), (3, 2, 0, 1)), 1, 1, 1)
    np.testing.assert_array_equal(acc, _nhwc(ref).astype(np.int64))


def test_coarse_part_costs_one_ninth():
    """The coarse accumulator is a 1x1 conv: its output grid equals the 3x3 conv's at stride 2."""
    kernel, xq, sx, _ = _case(1, 8, 8, 1)
    _, acc_c, acc_f = cfws_conv_integer(xq, sx, cfws_quantize(kernel), strides=2)
    assert acc_c.shape == acc_f.shape == (2, 5, 5, 8)
