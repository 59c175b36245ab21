"""Entropy (TensorRT KL) and transformed-KL amax: jitted search vs the plain NumPy loop.

The reference (benchmarks/_reference_entropy.py) is written from ALGORITHM.md §4.3/4.4, one
candidate at a time in float64. In float64 (x64) the jitted search must pick exactly the same
bin; in float32 a different pick is allowed only when the reference divergences of the two picks
are within F32_RTOL relative.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax import calib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _reference_entropy as ref  # noqa: E402

F32_RTOL = 1e-6


def _hist(samples, bins=2048):
    h, e = np.histogram(samples, bins=bins, range=(0.0, float(np.max(samples))))
    return h.astype(np.int64), e


def _synthetic(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    n = 200_000
    if name == "gauss":
        return _hist(np.abs(rng.standard_normal(n)))
    if name == "laplace":
        return _hist(np.abs(rng.laplace(size=n)))
    if name == "relu_zero_spike":
        return _hist(np.maximum(rng.standard_normal(n), 0.0))
    if name == "heavy_tail":
        return _hist(np.abs(rng.standard_t(2, size=n)))
    if name == "one_hot":
        h = np.zeros(2048, np.int64)
        h[700] = 12345
        return h, np.linspace(0, 3.0, 2049)
    if name == "one_hot_zero_bin":  # after h[0] := h[1] nothing is left: every candidate excluded
        h = np.zeros(2048, np.int64)
        h[0] = 99
        return h, np.linspace(0, 1.0, 2049)
    if name == "sparse":
        h = np.zeros(2048, np.int64)
        idx = rng.choice(1500, size=60, replace=False)
        h[idx] = rng.integers(1, 50, size=60)
        return h, np.linspace(0, 2.0, 2049)
    if name == "plateau_512":  # uniform groups: exact zero divergences, exact ties
        h = np.zeros(512, np.int64)
        h[:300] = 7
        h[400] = 7
        return h, np.linspace(0, 1.0, 513)
    if name == "huge_counts":  # tens of billions: exact in int64 / float64, not in float32
        h, e = _hist(np.abs(rng.standard_normal(n)))
        return h * 200_003 + (h > 0) * rng.integers(0, 1000, size=h.shape), e
    raise KeyError(name)


SYNTHETIC = ["gauss", "laplace", "relu_zero_spike", "heavy_tail", "one_hot", "one_hot_zero_bin",
             "sparse", "plateau_512", "huge_counts"]


def _real_activation_hist():
    """Post-ReLU activations of a small random conv net (NHWC, HWIO) on CIFAR test images if the
    shared data is present, else on structured synthetic images; collected with calib.update."""
    from conftest import shared_data_dir

    path = shared_data_dir() / "cifar10_jpeg_yoongikim.npz"
    if path.exists():
        with np.load(path) as d:
            imgs = d["x_test"][:64].astype(np.float32) / 255.0
    else:
        yy, xx = np.mgrid[0:32, 0:32] / 32.0
        imgs = np.stack([np.stack([np.sin(6 * xx * (k + 1)) * yy, np.cos(5 * yy + k) * xx,
                                   (xx > 0.5 + 0.01 * k).astype(float)], -1) for k in range(64)])
        imgs = imgs.astype(np.float32)
    from cfws_jax.models.layers import conv2d

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    w1 = jax.random.normal(k1, (3, 3, 3, 16)) * 0.3
    w2 = jax.random.normal(k2, (3, 3, 16, 16)) * 0.15
    x = jnp.asarray((imgs - 0.45) / 0.25)
    y1 = jax.nn.relu(conv2d(x, w1, padding=1))
    y2 = conv2d(y1, w2, strides=2, padding=1)  # pre-ReLU; "relu" mode gives relu(y2)
    st = calib.init(2048, "relu", "grow")
    upd = jax.jit(calib.update)
    for b in range(0, 64, 16):
        st = upd(st, y2[b:b + 16])
    hist = calib.finalize(st, name="net/conv2")
    return hist.counts, hist.edges


@functools.lru_cache(maxsize=None)
def case(name):
    return _real_activation_hist() if name == "real_net_relu" else _synthetic(name)


@functools.lru_cache(maxsize=None)
def reference(name, metric, num_bits=8, unsigned=False, start_bin=128, stride=1):
    h, e = case(name)
    return ref.kl_divergences(h, metric, num_bits=num_bits, unsigned=unsigned, start_bin=start_bin,
                              stride=stride)


def _last_argmin(d):
    return len(d) - 1 - int(np.argmin(d[::-1]))


ALL = SYNTHETIC + ["real_net_relu"]


@pytest.mark.parametrize("metric", ["entropy", "kl_cfws"])
@pytest.mark.parametrize("name", ALL)
def test_x64_exact_bin_parity(name, metric):
    h, e = case(name)
    cands, d_ref = reference(name, metric)
    i_ref = int(cands[_last_argmin(d_ref)])
    amax_fn = calib.entropy_amax if metric == "entropy" else calib.kl_cfws_amax
    with jax.enable_x64(True):
        amax, i = amax_fn(jnp.asarray(h, jnp.float64), jnp.asarray(e))
        assert int(i) == i_ref, f"{name}/{metric}: jitted bin {int(i)} vs reference {i_ref}"
        assert float(amax) == e[i_ref]
        for algo in ("prefix", "window"):
            d = np.asarray(calib.kl_divergences(jnp.asarray(h, jnp.float64), metric, algorithm=algo))
            assert np.array_equal(np.isinf(d), np.isinf(d_ref)), (name, metric, algo)
            fin = np.isfinite(d_ref)
            np.testing.assert_allclose(d[fin], d_ref[fin], rtol=1e-9, atol=1e-12, err_msg=f"{name}/{algo}")
            assert int(cands[_last_argmin(d)]) == i_ref, f"{name}/{metric}/{algo}"
    assert not np.isnan(d_ref).any()


@pytest.mark.parametrize("name", ALL)
def test_float32_pick_within_tolerance(name):
    """Default (x64 off) float32 path: same bin, or a bin whose reference divergence is within
    F32_RTOL of the optimum."""
    assert not jax.config.jax_enable_x64
    h, e = case(name)
    cands, d_ref = reference(name, "entropy")
    k_ref = _last_argmin(d_ref)
    amax, i = calib.entropy_amax(jnp.asarray(h, jnp.float32), jnp.asarray(e, jnp.float32))
    assert amax.dtype == jnp.float32
    k = int(i) - 128
    if k != k_ref:
        gap = abs(d_ref[k] - d_ref[k_ref])
        assert gap <= F32_RTOL * abs(d_ref[k_ref]), f"{name}: f32 picked {int(i)}, ref {cands[k_ref]}, gap {gap}"


@pytest.mark.parametrize("num_bits,unsigned,start_bin,stride",
                         [(8, True, 128, 1), (4, False, 8, 1), (8, False, 64, 3), (6, True, 200, 7)])
@pytest.mark.parametrize("name", ["relu_zero_spike", "heavy_tail", "sparse"])
def test_bits_signedness_stride(name, num_bits, unsigned, start_bin, stride):
    h, e = case(name)
    kw = dict(num_bits=num_bits, unsigned=unsigned, start_bin=start_bin, stride=stride)
    for metric, fn in (("entropy", calib.entropy_amax), ("kl_cfws", calib.kl_cfws_amax)):
        cands, d_ref = reference(name, metric, num_bits, unsigned, start_bin, stride)
        with jax.enable_x64(True):
            _, i = fn(jnp.asarray(h, jnp.float64), jnp.asarray(e), **kw)
        assert int(i) == int(cands[_last_argmin(d_ref)]), (name, metric, kw)


def test_reference_matches_scipy_entropy():
    """Sanity check of the port itself: its divergence is scipy.stats.entropy(P, Q)."""
    stats = pytest.importorskip("scipy.stats")
    h, _ = case("laplace")
    hh = h.astype(np.float64).copy()
    hh[0] = hh[1]
    for i in (128, 400, 1000, 2048):
        P, Q = ref.kl_candidate(hh, i, 128)
        assert math.isclose(ref.entropy_div(P, Q), float(stats.entropy(P, Q)), rel_tol=1e-12)
        assert math.isclose(P.sum(), hh.sum()) and math.isclose(Q.sum() + hh[i:].sum(), hh.sum())


def test_transformed_kl_formula():
    """D_T's two forms in §4.4 agree, and D_T = KL when nothing is clipped (P = Q totals)."""
    rng = np.random.default_rng(3)
    p = rng.integers(0, 20, 50).astype(float)
    q = np.where(p > 0, rng.integers(1, 20, 50), 0).astype(float)
    P, Q = p.sum(), q.sum()
    m = (p != 0) & (q != 0)
    form2 = np.sum(p[m] / P * np.log(p[m] / q[m])) + p[m].sum() / P * np.log(P / Q)
    assert math.isclose(ref.transformed_kl_div(p, q), form2, rel_tol=1e-12)
    q2 = q * P / Q
    assert math.isclose(ref.transformed_kl_div(p, q2), ref.entropy_div(p, q2), rel_tol=1e-9)


def test_entropy_does_not_modify_input_and_is_deterministic():
    h, e = case("relu_zero_spike")
    h0 = h.copy()
    c = jnp.asarray(h, jnp.float32)
    a1 = calib.entropy_amax(c, jnp.asarray(e, jnp.float32))
    a2 = calib.entropy_amax(c, jnp.asarray(e, jnp.float32))
    assert np.array_equal(h, h0) and np.array_equal(np.asarray(c), h0.astype(np.float32))
    assert int(a1[1]) == int(a2[1]) and float(a1[0]) == float(a2[0])


def test_entropy_inside_jit_with_state():
    """The pipeline path: a fixed-range state, to_arrays and entropy_amax all inside one jit."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.laplace(size=(8, 16, 16, 4)).astype(np.float32))

    @jax.jit
    def calibrate(x):
        st = calib.init(2048, "abs", "fixed", amax=calib.max_abs(x))
        st = calib.update(st, x)
        c, e = calib.to_arrays(st)
        return calib.entropy_amax(c, e)

    amax, i = calibrate(x)
    xa = np.abs(np.asarray(x))
    h, e = np.histogram(xa, bins=2048, range=(0, xa.max()))
    cands, d_ref = ref.kl_divergences(h)
    k_ref = _last_argmin(d_ref)
    k = int(i) - 128
    assert k == k_ref or abs(d_ref[k] - d_ref[k_ref]) <= F32_RTOL * d_ref[k_ref]
    assert math.isclose(float(amax), float(e[int(i)]), rel_tol=1e-6)


@pytest.mark.parametrize("first", [128, 300])
def test_nan_policy_default_vs_tensorrt_when_first_bin_is_past_start_bin(first):
    """Almost all exact zeros (h[0], then h[0] := h[1] = 0) and rare values from bin ``first``
    >= start_bin on: NVIDIA's divergences of candidates i <= first are 0/0 = NaN and argmin
    picks the last of them (amax = lower edge of bin ``first``, clipping nearly everything);
    the default scores them +inf and picks a sensible bin. Both against the NumPy port."""
    rng = np.random.default_rng(first)
    h = np.zeros(2048, np.int64)
    h[0] = 10**6
    h[first:first + 40] = rng.integers(0, 30, 40)
    h[first] = 7
    h[1700] = 2
    e = np.linspace(0.0, 5.0, 2049)
    cands, d_inf = ref.kl_divergences(h)
    _, d_trt = ref.kl_divergences(h, nan_policy="tensorrt")
    assert np.array_equal(np.isnan(d_trt), cands <= first) and not np.isnan(d_inf).any()
    a_inf, i_inf = ref.kl_amax(h, e)
    a_trt, i_trt = ref.kl_amax(h, e, nan_policy="tensorrt")
    assert i_trt == first and a_trt == e[first] and i_inf > first
    with jax.enable_x64(True):
        for policy, (a_r, i_r), d_r in (("inf", (a_inf, i_inf), d_inf), ("tensorrt", (a_trt, i_trt), d_trt)):
            c, ee = jnp.asarray(h, jnp.float64), jnp.asarray(e)
            amax, i = calib.entropy_amax(c, ee, nan_policy=policy)
            assert (int(i), float(amax)) == (i_r, a_r), policy
            d = np.asarray(calib.kl_divergences(c, nan_policy=policy))
            assert np.array_equal(np.isnan(d), np.isnan(d_r)) and np.array_equal(np.isinf(d), np.isinf(d_r))
    for policy, a_r in (("inf", a_inf), ("tensorrt", a_trt)):
        assert calib.compute_amax((h, e), "entropy", nan_policy=policy) == a_r
        amax32, _ = calib.entropy_amax(jnp.asarray(h, jnp.float32), jnp.asarray(e, jnp.float32), nan_policy=policy)
        assert float(amax32) == pytest.approx(a_r, rel=1e-6) if policy == "tensorrt" else float(amax32) > e[first]
    # no NaN candidate (first non-empty bin below start_bin): both policies agree
    h2, e2 = case("relu_zero_spike")
    assert calib.compute_amax((h2, e2), "entropy", nan_policy="tensorrt") == calib.compute_amax((h2, e2), "entropy")
    with pytest.raises(ValueError, match="nan_policy"):
        calib.compute_amax((h, e), "kl_cfws", nan_policy="tensorrt")
    with pytest.raises(ValueError, match="nan_policy"):
        calib.compute_amax((h, e), "entropy", nan_policy="omit")
