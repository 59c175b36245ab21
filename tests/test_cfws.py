"""CFWS split quantization vs. a slow NumPy reference of ALGORITHM.md §3.2/§3.3 written in OIHW."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_fusion import conv_ref, rand_bn, to_hwio, to_oihw

from cfws_jax.cfws import (
    CFWSConfig,
    CFWSWeights,
    cfws_quantize,
    coarse_kernel,
    fine_kernel,
    is_splittable,
    plain_quantize,
    split_center,
)
from cfws_jax.fusion import fuse_repvgg_block

F32 = np.float32


# ----------------------------------------------------------------------------- NumPy reference (OIHW)
def ref_round(t, rounding):
    return np.round(t) if rounding == "half_even" else np.floor(t + F32(0.5))


def ref_quant(x, bits, per_channel, rounding):
    """Symmetric absmax quantization of an OIHW-like array, per axis 0 or per tensor, float32 math."""
    qmax = 2 ** (bits - 1) - 1
    x = np.asarray(x, F32)
    amax = np.abs(x).max(axis=tuple(range(1, x.ndim))) if per_channel else np.abs(x).max()
    s = np.where(amax > 2.0**-24, amax / F32(qmax), F32(1)).astype(F32)
    sb = s.reshape((-1,) + (1,) * (x.ndim - 1)) if per_channel else s
    q = np.clip(ref_round(x / sb, rounding), -qmax, qmax)
    return q.astype(np.int64), s, (q.astype(F32) * sb).astype(F32)


def ref_cfws(w, bits=8, extract_center=True, coarse="channel", rounding="half_even"):
    """Returns (coarse codes, coarse scale (O,), fine codes OIHW, fine scale (O,), kernel OIHW)."""
    w = np.asarray(w, F32)
    o, _, k, _ = w.shape
    per_ch = coarse == "channel"
    if not extract_center:
        qc, sc, wc_hat = ref_quant(w, bits, per_ch, rounding)
        qf, sf, wf_hat = ref_quant(w - wc_hat, bits, True, rounding)
        return qc, np.broadcast_to(sc, (o,)), qf, sf, wc_hat + wf_hat
    c = k // 2
    center = w[:, :, c, c]
    qc, sc, center_hat = ref_quant(center, bits, per_ch, rounding)
    fine = w.copy()
    fine[:, :, c, c] = center - center_hat
    qf, sf, fine_hat = ref_quant(fine, bits, True, rounding)
    kernel = fine_hat.copy()
    kernel[:, :, c, c] += center_hat
    return qc, np.broadcast_to(sc, (o,)), qf, sf, kernel


def check_against_ref(w_oihw, cfg: CFWSConfig, out: CFWSWeights | None = None):
    out = cfws_quantize(to_hwio(w_oihw), cfg) if out is None else out
    qc, sc, qf, sf, kernel = ref_cfws(w_oihw, cfg.bits, cfg.extract_center, cfg.coarse, cfg.rounding)
    coarse = np.asarray(out.coarse_codes)
    np.testing.assert_array_equal(coarse.T if coarse.ndim == 2 else to_oihw(coarse), qc)
    np.testing.assert_array_equal(to_oihw(out.fine_codes), qf)
    np.testing.assert_array_equal(np.asarray(out.coarse_scale), sc)
    np.testing.assert_array_equal(np.asarray(out.fine_scale), sf)
    np.testing.assert_array_equal(to_oihw(out.kernel), kernel)
    assert out.coarse_codes.dtype == np.int32 and out.fine_codes.dtype == np.int32
    assert out.kernel.dtype == np.float32
    return out


# ----------------------------------------------------------------------------- test kernels
def repvgg_like(seed, o=8, i=8, groups=1, strong=3.0):
    """Fused RepVGG kernel (OIHW) whose centre tap holds a strong 1x1 + identity contribution."""
    rng = np.random.default_rng(seed)
    ig = i // groups
    dense = (to_hwio(rng.normal(0, 0.05, (o, ig, 3, 3))), rand_bn(rng, o))
    one = (to_hwio(rng.normal(0, 0.05 * strong, (o, ig, 1, 1))), rand_bn(rng, o))
    ident = rand_bn(rng, i) if i == o else None
    if ident is not None:
        ident = ident._replace(scale=ident.scale * strong)
    kernel, _ = fuse_repvgg_block(dense, one, ident, groups=groups)
    return to_oihw(kernel)


def random_kernel(seed, o=6, ig=5, k=3):
    return np.random.default_rng(seed).normal(0, 0.1, (o, ig, k, k)).astype(F32)


CONFIGS = [
    CFWSConfig(),
    CFWSConfig(rounding="half_up"),
    CFWSConfig(coarse="tensor"),
    CFWSConfig(extract_center=False),
    CFWSConfig(extract_center=False, coarse="tensor", rounding="half_up"),
    CFWSConfig(bits=4),
    CFWSConfig(bits=16),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("kind", ["repvgg", "grouped", "depthwise", "random5x5"])
def test_codes_match_reference(cfg, kind):
    w = {
        "repvgg": lambda: repvgg_like(1),
        "grouped": lambda: repvgg_like(2, 8, 8, groups=4),
        "depthwise": lambda: repvgg_like(3, 6, 6, groups=6),
        "random5x5": lambda: random_kernel(4, k=5),
    }[kind]()
    out = check_against_ref(w, cfg)
    qmax = 2 ** (cfg.bits - 1) - 1
    assert np.abs(np.asarray(out.coarse_codes)).max() <= qmax and np.abs(np.asarray(out.fine_codes)).max() <= qmax


@pytest.mark.parametrize("kind", ["repvgg", "depthwise", "random5x5"])
def test_jit_matches_eager(kind):
    w = to_hwio({"repvgg": lambda: repvgg_like(5), "depthwise": lambda: repvgg_like(6, 6, 6, groups=6),
                 "random5x5": lambda: random_kernel(7, k=5)}[kind]())
    jitted = jax.jit(cfws_quantize, static_argnums=1)
    codes, scale, hat = jax.jit(plain_quantize)(w)
    q, s, h = ref_quant(to_oihw(w), 8, True, "half_even")
    np.testing.assert_array_equal(to_oihw(codes), q)
    np.testing.assert_array_equal(to_oihw(hat), h)
    for cfg in CONFIGS:
        eager, jit_out = cfws_quantize(w, cfg), jitted(w, cfg)
        for a, b in zip(eager, jit_out):  # bit-identical, float kernel included (no FMA contraction)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        check_against_ref(to_oihw(w), cfg, jit_out)


@pytest.mark.parametrize("coarse", ["channel", "tensor"])
def test_coarse_requantization_is_lossless(coarse):
    w = repvgg_like(6)
    out = cfws_quantize(to_hwio(w), CFWSConfig(coarse=coarse))
    wc = to_oihw(coarse_kernel(out, 3))
    assert np.count_nonzero(wc[:, :, [0, 0, 2, 2], [0, 2, 0, 2]]) == 0  # zero except the centre
    q2, s2, hat2 = ref_quant(wc, 8, coarse == "channel", "half_even")
    np.testing.assert_array_equal(q2[:, :, 1, 1], np.asarray(out.coarse_codes).T)
    np.testing.assert_allclose(np.broadcast_to(s2, (8,)), np.asarray(out.coarse_scale), rtol=1e-6)
    np.testing.assert_allclose(hat2, wc, rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_residual_and_scale_bounds(seed):
    w = repvgg_like(10 + seed)
    out = cfws_quantize(to_hwio(w))
    center = w[:, :, 1, 1]
    center_hat = to_oihw(coarse_kernel(out, 3))[:, :, 1, 1]
    s_c = np.asarray(out.coarse_scale)[:, None]
    resid = center - center_hat
    assert np.all(np.abs(resid) <= s_c / 2 * (1 + 1e-6))
    assert np.all(np.abs(resid) <= np.abs(center) * (1 + 1e-6))
    _, s_plain, _ = ref_quant(w, 8, True, "half_even")
    assert np.all(np.asarray(out.fine_scale) <= s_plain * (1 + 1e-6))
    # W_coarse + W_fine (unquantized) == W up to float rounding
    _, surround = split_center(to_hwio(w))
    fine = np.array(to_oihw(surround))
    fine[:, :, 1, 1] = resid
    np.testing.assert_allclose(to_oihw(coarse_kernel(out, 3)) + fine, w, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_cfws_beats_plain_int8_on_fused_kernels(groups):
    for seed in range(12):
        w = repvgg_like(100 + seed, 8, 8, groups=groups)
        mse_cfws = np.mean((to_oihw(cfws_quantize(to_hwio(w)).kernel) - w) ** 2)
        mse_plain = np.mean((to_oihw(plain_quantize(to_hwio(w))[2]) - w) ** 2)
        assert mse_cfws < mse_plain, (seed, mse_cfws, mse_plain)


def test_depthwise_centre_is_exact_coarse():
    w = repvgg_like(7, 6, 6, groups=6)
    out = cfws_quantize(to_hwio(w))
    assert np.all(np.abs(np.asarray(out.coarse_codes)) == 127)
    np.testing.assert_allclose(to_oihw(coarse_kernel(out, 3))[:, :, 1, 1], w[:, :, 1, 1], rtol=1e-6)


def test_zero_channel_is_finite_and_zero():
    w = random_kernel(8)
    w[2] = 0
    for cfg in CONFIGS:
        out = check_against_ref(w, cfg)
        for t in out:
            assert np.all(np.isfinite(np.asarray(t)))
        assert out.coarse_scale[2] == 1 or cfg.coarse == "tensor"
        assert out.fine_scale[2] == 1
        assert not np.asarray(out.fine_codes)[..., 2].any() and not np.asarray(out.kernel)[..., 2].any()
    out = cfws_quantize(np.zeros((3, 3, 2, 2), F32))
    assert not np.asarray(out.coarse_codes).any() and np.all(np.asarray(out.coarse_scale) == 1)


def test_rounding_at_exact_ties():
    # one output channel; centre amax 127 -> s_c == 1 exactly, so Wc / s_c hits exact .5 ties
    w = np.zeros((1, 5, 3, 3), F32)
    w[0, :, 1, 1] = [127.0, 2.5, -2.5, 0.5, -3.5]
    w[0, :, 0, 0] = 0.25
    up = cfws_quantize(to_hwio(w), CFWSConfig(rounding="half_up"))
    even = cfws_quantize(to_hwio(w), CFWSConfig(rounding="half_even"))
    np.testing.assert_array_equal(np.asarray(up.coarse_codes)[:, 0], [127, 3, -2, 1, -3])
    np.testing.assert_array_equal(np.asarray(even.coarse_codes)[:, 0], [127, 2, -2, 0, -4])
    t = w[0, :, 1, 1]
    np.testing.assert_array_equal(np.asarray(up.coarse_codes)[:, 0], np.floor(t + 0.5))
    check_against_ref(w, CFWSConfig(rounding="half_up"), up)
    check_against_ref(w, CFWSConfig(rounding="half_even"), even)


def test_whole_kernel_split_ablation():
    w = repvgg_like(9)
    for coarse in ("channel", "tensor"):
        out = check_against_ref(w, CFWSConfig(extract_center=False, coarse=coarse))
        codes, scale, hat = plain_quantize(to_hwio(w), per_channel=coarse == "channel")
        np.testing.assert_array_equal(np.asarray(out.coarse_codes), np.asarray(codes))
        np.testing.assert_array_equal(to_oihw(coarse_kernel(out, 3)), to_oihw(hat))
        err = np.abs(to_oihw(out.kernel) - w).reshape(8, -1).max(axis=1)
        assert np.all(err <= np.asarray(out.fine_scale) / 2 * (1 + 1e-5))
        assert np.all(np.asarray(out.fine_scale) <= np.asarray(out.coarse_scale) / 2 * (1 + 1e-5))


def test_one_by_one_kernel_is_plain_per_channel():
    w = random_kernel(12, o=5, ig=4, k=1)
    out = cfws_quantize(to_hwio(w))
    codes, scale, hat = plain_quantize(to_hwio(w))
    assert out.coarse_codes.shape == (4, 5) and not np.asarray(out.coarse_codes).any()
    np.testing.assert_array_equal(np.asarray(out.coarse_scale), np.ones(5))
    np.testing.assert_array_equal(np.asarray(out.fine_codes), np.asarray(codes))
    np.testing.assert_array_equal(np.asarray(out.kernel), np.asarray(hat))
    q, s, _ = ref_quant(w, 8, True, "half_even")
    np.testing.assert_array_equal(to_oihw(codes), q)
    np.testing.assert_array_equal(np.asarray(scale), s)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [2, 8, 12])
def test_plain_quantize_matches_reference(per_channel, bits):
    w = repvgg_like(13)
    codes, scale, hat = plain_quantize(to_hwio(w), bits=bits, per_channel=per_channel, rounding="half_up")
    q, s, h = ref_quant(w, bits, per_channel, "half_up")
    np.testing.assert_array_equal(to_oihw(codes), q)
    np.testing.assert_array_equal(np.asarray(scale), s)
    np.testing.assert_array_equal(to_oihw(hat), h)


@pytest.mark.parametrize("stride", [1, 2])
def test_split_convs_sum_to_effective_conv(stride):
    """conv(W_coarse) + conv(W_fine_hat) == conv(W_hat); the coarse part is a 1x1 conv without padding."""
    w = repvgg_like(14, 4, 4)
    out = cfws_quantize(to_hwio(w))
    x = np.random.default_rng(0).normal(size=(2, 4, 7, 6))
    wc, wf = to_oihw(coarse_kernel(out, 3)), to_oihw(fine_kernel(out))
    full = conv_ref(x, to_oihw(out.kernel), stride, 1)
    np.testing.assert_allclose(conv_ref(x, wc, stride, 1) + conv_ref(x, wf, stride, 1), full, rtol=1e-5, atol=1e-5)
    one_by_one = (np.asarray(out.coarse_codes).T * np.asarray(out.coarse_scale)[:, None])[:, :, None, None]
    np.testing.assert_allclose(conv_ref(x, one_by_one, stride, 0), conv_ref(x, wc, stride, 1), rtol=1e-6, atol=1e-9)


def test_is_splittable_and_errors():
    assert is_splittable(np.zeros((3, 3, 2, 4))) and is_splittable((5, 5, 1, 1))
    assert not is_splittable((1, 1, 2, 4)) and not is_splittable((2, 2, 2, 4)) and not is_splittable((3, 1, 2, 4))
    assert not is_splittable((3, 3, 4))
    with pytest.raises(ValueError, match="odd"):
        split_center(np.zeros((2, 2, 1, 1)))
    with pytest.raises(ValueError, match="odd"):
        cfws_quantize(np.zeros((4, 4, 1, 2), F32))
    with pytest.raises(ValueError, match="4-D"):
        cfws_quantize(np.zeros((3, 3, 2), F32))
    with pytest.raises(ValueError, match="bits"):
        CFWSConfig(bits=17)
    with pytest.raises(ValueError, match="coarse"):
        CFWSConfig(coarse="layer")
    with pytest.raises(ValueError, match="rounding"):
        CFWSConfig(rounding="stochastic")
    # an even kernel can still be split without centre extraction
    check_against_ref(random_kernel(15, k=2), CFWSConfig(extract_center=False))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_fold_input_channel_scales_is_exact_in_float_and_pure(groups):
    """§3.6: conv(x, W) == conv(x / f, W') with f indexed by the global input channel."""
    from cfws_jax.cfws import fold_input_channel_scales
    from test_fusion import conv_ref, to_oihw

    rng = np.random.default_rng(groups)
    c, o = 8, 8
    kernel = rng.normal(0, 1, (3, 3, c // groups, o)).astype(np.float32)
    kernel_copy = kernel.copy()
    s_x = rng.uniform(0.01, 0.2, c).astype(np.float32)
    w2, s_t, f = fold_input_channel_scales(kernel, s_x, groups)
    np.testing.assert_array_equal(kernel, kernel_copy)  # input untouched
    assert float(s_t) == float(s_x.max()) and np.all(np.asarray(f) <= 1)
    x = rng.normal(0, 1, (2, c, 6, 6))
    ref = conv_ref(x, to_oihw(kernel), 1, 1, groups)
    folded = conv_ref(x / np.asarray(f, np.float64)[None, :, None, None], to_oihw(np.asarray(w2)), 1, 1, groups)
    np.testing.assert_allclose(folded, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_scales must have shape"):
        fold_input_channel_scales(kernel, s_x[:3], groups)
