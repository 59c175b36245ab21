"""cfws_jax.quant vs. a slow NumPy reference of ALGORITHM.md §2 (exact integer codes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax import quant
from cfws_jax.quant import (
    ZERO_AMAX,
    QuantSpec,
    calibrate_minmax,
    check_finite,
    dequantize,
    fake_quant,
    int_range,
    quantize,
    quantize_minmax,
    reduce_amax,
    scale_from_amax,
    storage_dtype,
)

F32 = np.float32


# ----------------------------------------------------------------------------- NumPy reference
def ref_range(bits, signed=True, narrow=True):
    if not signed:
        return 0, 2**bits - 1
    lo = -(2 ** (bits - 1))
    return (lo + 1 if narrow else lo), 2 ** (bits - 1) - 1


def ref_bcast(v, axis, ndim):
    v = np.asarray(v, F32)
    if axis is None or v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


def ref_round(t, rounding):
    return np.round(t) if rounding == "half_even" else np.floor(t + F32(0.5))


def ref_quantize(x, scale, zp, spec: QuantSpec):
    """clip(round(x / s) + zp) with IEEE float32 division; NaN -> zp, +-inf saturate."""
    lo, hi = ref_range(spec.bits, spec.signed, spec.narrow)
    x = np.asarray(x, F32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        t = x / ref_bcast(scale, spec.axis, x.ndim)
    q = ref_round(t, spec.rounding) + ref_bcast(zp, spec.axis, x.ndim)
    q = np.where(np.isnan(x), ref_bcast(zp, spec.axis, x.ndim), q)
    q = np.where(x == np.inf, hi, np.where(x == -np.inf, lo, q))
    return np.clip(q, lo, hi).astype(np.int64)


def ref_amax(x, axis):
    x = np.abs(np.asarray(x, F32))
    if axis is None:
        return x.max()
    return x.max(axis=tuple(i for i in range(x.ndim) if i != axis % x.ndim))


def ref_scale(amax, qmax):
    amax = np.asarray(amax, F32)
    return np.where(amax > 2.0**-24, amax / F32(qmax), F32(1)).astype(F32)


def ref_asym(x, spec: QuantSpec):
    lo, hi = ref_range(spec.bits, spec.signed, spec.narrow)
    x = np.asarray(x, F32)
    red = None if spec.axis is None else tuple(i for i in range(x.ndim) if i != spec.axis % x.ndim)
    xmin = np.minimum(x.min(axis=red), F32(0))
    xmax = np.maximum(x.max(axis=red), F32(0))
    span = (xmax - xmin).astype(F32)
    s = np.where(span > 2.0**-24, span / F32(hi - lo), F32(1)).astype(F32)
    zp = np.clip(lo - ref_round(xmin / s, spec.rounding), lo, hi)
    return s, zp.astype(np.int64)


def codes(x):
    return np.asarray(x).astype(np.int64)


# ----------------------------------------------------------------------------- ranges and specs
def test_int_range_and_storage():
    assert int_range(8) == (-127, 127) and int_range(8, narrow=False) == (-128, 127)
    assert int_range(8, signed=False) == (0, 255) and int_range(16) == (-32767, 32767)
    assert int_range(2) == (-1, 1)
    for bits in range(2, 17):
        for signed in (True, False):
            for narrow in (True, False):
                assert int_range(bits, signed, narrow) == ref_range(bits, signed, narrow)
                spec = QuantSpec(bits=bits, signed=signed, narrow=narrow)
                assert (spec.qmin, spec.qmax) == ref_range(bits, signed, narrow)
    assert storage_dtype(8) == np.int8 and storage_dtype(8, False) == np.uint8
    assert storage_dtype(12) == np.int16 and storage_dtype(16, False) == np.uint16


def test_spec_validation():
    for bad in (1, 17, 8.0):
        with pytest.raises(ValueError, match="bits"):
            QuantSpec(bits=bad)
    with pytest.raises(ValueError, match="rounding"):
        QuantSpec(rounding="stochastic")
    with pytest.raises(ValueError, match="bits"):
        int_range(1)
    with pytest.raises(ValueError, match="axis"):
        quantize(np.zeros((2, 3)), np.ones(3), spec=QuantSpec(axis=2))


# ----------------------------------------------------------------------------- codes
@pytest.mark.parametrize("rounding", ["half_even", "half_up"])
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_codes_match_reference_all_bits(rounding, axis):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, 7)).astype(F32)
    for bits in range(2, 17):
        for signed, narrow in ((True, True), (True, False), (False, True)):
            spec = QuantSpec(bits=bits, signed=signed, narrow=narrow, axis=axis, rounding=rounding)
            xs = np.abs(x) if not signed else x
            amax = F32(0.8) * ref_amax(xs, axis)  # 20% of the range saturates
            scale = ref_scale(amax, spec.qmax)
            np.testing.assert_array_equal(np.asarray(scale_from_amax(amax, spec)), scale)
            q = quantize(xs, scale, 0, spec)
            assert q.dtype == jnp.int32
            np.testing.assert_array_equal(codes(q), ref_quantize(xs, scale, 0, spec))
            assert codes(q).max() == spec.qmax  # saturation reached the bound
            if signed:
                assert codes(q).min() <= -spec.qmax  # the negative side saturates too


def test_full_range_reaches_minus_128():
    spec = QuantSpec(narrow=False)
    q = codes(quantize(np.array([-1000.0, -128.0, -127.6, 127.0, 1000.0], F32), 1.0, 0, spec))
    np.testing.assert_array_equal(q, [-128, -128, -128, 127, 127])


def test_exact_ties_under_both_roundings():
    s = F32(0.25)  # power of two: x / s is exact
    x = np.array([0.625, -0.625, 0.375, -0.375, 0.125, -0.125, 31.875], F32)  # t = ±2.5, ±1.5, ±0.5, 127.5
    even = codes(quantize(x, s, 0, QuantSpec(rounding="half_even")))
    up = codes(quantize(x, s, 0, QuantSpec(rounding="half_up")))
    np.testing.assert_array_equal(even, [2, -2, 2, -2, 0, 0, 127])
    np.testing.assert_array_equal(up, [3, -2, 2, -1, 1, 0, 127])
    np.testing.assert_array_equal(up, np.clip(np.floor(x / s + F32(0.5)), -127, 127))


@pytest.mark.parametrize("rounding", ["half_even", "half_up"])
def test_near_ties_use_true_division(rounding):
    """Codes equal round(x / s) with IEEE division, also within a few ulps of a tie (x * (1/s) is not enough)."""
    scales = (np.array([0.1, 0.3, 0.7, 1.3, 0.013, 3.7, 0.0071, 0.55], F32) * F32(1.01)).astype(F32)
    k = np.arange(-126, 126, dtype=F32) + F32(0.5)
    for axis in (None, -1):
        for s in scales:
            centre = (k * s).astype(F32)
            x = np.concatenate([centre + np.spacing(centre) * d for d in range(-3, 4)]).astype(F32)
            spec = QuantSpec(rounding=rounding, axis=axis)
            sv = s if axis is None else np.full(1, s, F32)
            x2 = x if axis is None else x[:, None]
            np.testing.assert_array_equal(codes(quantize(x2, sv, 0, spec)), ref_quantize(x2, sv, 0, spec))


def test_scale_uses_true_division():
    amax = np.random.default_rng(1).uniform(1e-3, 10, 4096).astype(F32)
    for bits in (4, 8, 16):
        spec = QuantSpec(bits=bits, axis=0)
        np.testing.assert_array_equal(np.asarray(scale_from_amax(amax, spec)), ref_scale(amax, spec.qmax))
        np.testing.assert_array_equal(np.asarray(jax.jit(scale_from_amax, static_argnums=1)(amax, spec)), ref_scale(amax, spec.qmax))


@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("signed", [True, False])
def test_asymmetric_matches_reference(axis, signed):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(4, 6, 5)) + 0.7).astype(F32)
    spec = QuantSpec(bits=8, signed=signed, symmetric=False, axis=axis)
    scale, zp = calibrate_minmax(x, spec)
    rs, rzp = ref_asym(x, spec)
    np.testing.assert_array_equal(np.asarray(scale), rs)
    np.testing.assert_array_equal(codes(zp), rzp)
    q, s2, zp2 = quantize_minmax(x, spec)
    np.testing.assert_array_equal(codes(q), ref_quantize(x, rs, rzp, spec))
    # zero is exactly representable and the range is covered within half a step
    z = dequantize(quantize(np.zeros_like(x), scale, zp, spec), scale, zp, spec)
    assert not np.asarray(z).any()
    err = np.abs(np.asarray(dequantize(q, scale, zp, spec)) - x)
    assert np.all(err <= ref_bcast(rs, axis, 3) * (0.5 + 1e-4))


def test_unsigned_symmetric():
    x = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0], F32)
    spec = QuantSpec(signed=False)
    scale = scale_from_amax(2.0, spec)
    assert np.asarray(scale) == ref_scale(2.0, 255)
    np.testing.assert_array_equal(codes(quantize(x, scale, 0, spec)), ref_quantize(x, ref_scale(2.0, 255), 0, spec))
    assert codes(quantize(x, scale, 0, spec)).tolist()[0] == 0 and codes(quantize(x, scale, 0, spec)).max() == 255


@pytest.mark.parametrize("axis", [0, -1])
def test_per_axis_reduce_and_symmetric_minmax(axis):
    x = np.random.default_rng(3).normal(size=(3, 4, 5)).astype(F32)
    np.testing.assert_array_equal(np.asarray(reduce_amax(x, axis)), ref_amax(x, axis))
    spec = QuantSpec(axis=axis)
    q, s, zp = quantize_minmax(x, spec)
    rs = ref_scale(ref_amax(x, axis), 127)
    np.testing.assert_array_equal(np.asarray(s), rs)
    np.testing.assert_array_equal(codes(q), ref_quantize(x, rs, 0, spec))
    assert not codes(zp).any()
    deq = np.asarray(dequantize(q, s, 0, spec))
    np.testing.assert_array_equal(deq, (ref_quantize(x, rs, 0, spec).astype(F32) * ref_bcast(rs, axis, 3)).astype(F32))


# ----------------------------------------------------------------------------- zero guard, non-finite
def test_zero_channel_gives_finite_scale_and_zero_codes():
    x = np.random.default_rng(4).normal(size=(3, 3, 2, 4)).astype(F32)
    x[..., 1] = 0
    x[..., 2] = ZERO_AMAX / 2  # below the guard: treated as zero
    for spec in (QuantSpec(axis=-1), QuantSpec(axis=-1, symmetric=False), QuantSpec(axis=-1, signed=False)):
        s, zp = calibrate_minmax(x, spec)
        assert np.all(np.isfinite(np.asarray(s))) and np.all(np.asarray(s) > 0)
        q = codes(quantize(x, s, zp, spec)) - codes(zp)
        assert not q[..., 1].any() and not q[..., 2].any()
        fq = np.asarray(fake_quant(x, s, zp, spec))
        assert np.all(np.isfinite(fq)) and not fq[..., 1].any()
    assert float(scale_from_amax(0.0)) == 1.0 and float(scale_from_amax(ZERO_AMAX)) == 1.0
    assert float(scale_from_amax(np.float32(2.0) * ZERO_AMAX)) == ref_scale(2.0 * ZERO_AMAX, 127)


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(narrow=False), QuantSpec(signed=False, symmetric=False), QuantSpec(symmetric=False)], ids=str)
def test_non_finite_inputs(spec):
    x = np.array([np.inf, -np.inf, np.nan, 0.0, 1e30, -1e30], F32)
    for zp in ([0] if spec.symmetric else [spec.qmin, 0 if spec.signed else 10, spec.qmax]):
        q = codes(quantize(x, 0.01, zp, spec))
        np.testing.assert_array_equal(q, ref_quantize(x, F32(0.01), zp, spec))
        assert q[0] == spec.qmax and q[1] == spec.qmin and q[2] == zp  # saturate; NaN -> zero point
    fq = np.asarray(fake_quant(x, 0.01, 0, spec))
    assert np.isnan(fq[2]) and np.isfinite(fq[[0, 1, 3, 4, 5]]).all()
    with pytest.raises(ValueError, match="my_tensor.*1 NaN, 2 Inf"):
        check_finite(x[:3], "my_tensor")
    check_finite(np.arange(3), "ints")


# ----------------------------------------------------------------------------- fake quant, dtypes, jit
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("spec", [QuantSpec(axis=-1), QuantSpec(bits=4, rounding="half_up"), QuantSpec(signed=False, symmetric=False, axis=0)], ids=str)
def test_fake_quant_preserves_dtype(dtype, spec):
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 6)), dtype)
    s, zp = calibrate_minmax(x, spec)
    y = fake_quant(x, s, zp, spec)
    assert y.dtype == dtype and y.shape == x.shape
    x32 = np.asarray(x.astype(jnp.float32))
    ref = (ref_quantize(x32, s, zp, spec) - ref_bcast(zp, spec.axis, 2)).astype(F32) * ref_bcast(s, spec.axis, 2)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), np.asarray(jnp.asarray(ref.astype(F32)).astype(dtype).astype(jnp.float32)))


def test_jit_matches_eager():
    x = np.random.default_rng(6).normal(size=(3, 3, 4, 8)).astype(F32)
    for spec in (QuantSpec(axis=-1), QuantSpec(axis=0, rounding="half_up", bits=5), QuantSpec(symmetric=False, axis=-1)):
        s, zp = calibrate_minmax(x, spec)
        js, jzp = jax.jit(calibrate_minmax, static_argnums=1)(x, spec)
        np.testing.assert_array_equal(np.asarray(s), np.asarray(js))
        np.testing.assert_array_equal(np.asarray(zp), np.asarray(jzp))
        jq = jax.jit(quantize, static_argnames="spec")(x, s, zp, spec=spec)
        np.testing.assert_array_equal(codes(jq), codes(quantize(x, s, zp, spec)))
        np.testing.assert_array_equal(codes(jq), ref_quantize(x, s, zp, spec))
        jf = jax.jit(fake_quant, static_argnames="spec")(x, s, zp, spec=spec)
        np.testing.assert_array_equal(np.asarray(jf), np.asarray(fake_quant(x, s, zp, spec)))
        jd = jax.jit(dequantize, static_argnames="spec")(jq, s, zp, spec=spec)
        np.testing.assert_array_equal(np.asarray(jd), np.asarray(dequantize(jq, s, zp, spec)))


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("rounding", ["half_even", "half_up"])
def test_fake_quant_symmetric_with_traced_bound_equals_fake_quant(bits, rounding):
    """The runtime's per-tensor fake-quant takes qmax as a traced value; it must equal the
    static-spec quantizer (signed narrow; unsigned on non-negative data)."""
    rng = np.random.default_rng(bits)
    x = rng.normal(0, 2, (257,)).astype(np.float32)
    x[:5] = [0.5, -0.5, 1.5, 2.5, -2.5]  # ties at scale 1
    f = jax.jit(quant.fake_quant_symmetric, static_argnums=3)
    for amax in (np.float32(3.7), np.float32(2 ** (bits - 1) - 1), np.float32(0.0)):
        spec = quant.QuantSpec(bits=bits, rounding=rounding)
        want = quant.fake_quant(x, quant.scale_from_amax(amax, spec), 0, spec)
        np.testing.assert_array_equal(f(x, amax, np.float32(spec.qmax), rounding), want)
        uspec = quant.QuantSpec(bits=bits, signed=False, rounding=rounding)
        pos = np.abs(x)
        want_u = quant.fake_quant(pos, quant.scale_from_amax(amax, uspec), 0, uspec)
        np.testing.assert_array_equal(f(pos, amax, np.float32(uspec.qmax), rounding), want_u)
