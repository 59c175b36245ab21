"""Learned rounding (cfws_jax/ptq/adaround.py) against slow NumPy references, a brute-forced toy
layer, and the guarantees of ``reconstruct_layer`` (never worse, codes in range, deterministic,
one compile per layer structure)."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax.models.layers import activation
from cfws_jax.ptq import adaround as A
from cfws_jax.ptq.adaround import ReconConfig, reconstruct_layer
from cfws_jax.ptq.config import QuantConfig
from cfws_jax.ptq.graph import LayerInfo
from cfws_jax.ptq.runtime import layer_linear
from cfws_jax.ptq.weights import dequantize_layer, quantize_layer
from cfws_jax.quant import fake_quant_symmetric

F32 = np.float32
FAST = ReconConfig(iters=150, lr=1e-2, batch_size=16)


# ----------------------------------------------------------------------------- NumPy references
def ref_h(v, zeta=1.1, gamma=-0.1):
    v = np.asarray(v, F32)
    sig = (F32(1) / (F32(1) + np.exp(-v))).astype(F32)
    return np.clip(sig * F32(zeta - gamma) + F32(gamma), 0, 1).astype(F32)


def ref_init(rest, zeta=1.1, gamma=-0.1):
    r = np.clip(np.asarray(rest, np.float64), 0, 1)
    return (-np.log((zeta - gamma) / (r - gamma) - 1)).astype(F32)


def ref_reg(v, beta, mask=None):
    t = 1 - np.abs(2 * ref_h(v).astype(np.float64) - 1) ** beta
    return float(np.sum(t if mask is None else t * mask))


def ref_schedule(step, iters, warmup, b0, b1):
    w = np.floor(warmup * iters)
    frac = min(max((step - w) / max(iters - 1 - w, 1), 0.0), 1.0)
    return b0 + (b1 - b0) * frac, float(step >= w)


def test_rectified_sigmoid_matches_numpy():
    v = np.concatenate([np.random.default_rng(0).normal(0, 4, 2000), [-50, -3, -2.4, 2.4, 3, 50]]).astype(F32)
    np.testing.assert_allclose(np.asarray(A.rectified_sigmoid(v)), ref_h(v), rtol=1e-6, atol=1e-7)
    h = np.asarray(A.rectified_sigmoid(v))
    assert h.min() == 0.0 and h.max() == 1.0


def test_init_inverts_rectified_sigmoid():
    rest = np.concatenate([np.random.default_rng(1).uniform(0, 1, 2000), [0.0, 1e-8, 0.5, 1 - 1e-7, 1.0, 1.5, -0.2]])
    rest = rest.astype(F32)
    v = np.asarray(A.init_rounding_vars(rest))
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(v, ref_init(rest), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(A.rectified_sigmoid(v)), np.clip(rest, 0, 1), atol=1e-6)


@pytest.mark.parametrize("beta", [2.0, 7.5, 20.0])
def test_regularizer_matches_numpy(beta):
    rng = np.random.default_rng(2)
    v = rng.normal(0, 3, (3, 3, 4, 5)).astype(F32)
    mask = (rng.uniform(size=v.shape) < 0.7).astype(F32)
    np.testing.assert_allclose(float(A.rounding_regularizer(v, beta)), ref_reg(v, beta), rtol=1e-5)
    np.testing.assert_allclose(float(A.rounding_regularizer(v, beta, mask)), ref_reg(v, beta, mask), rtol=1e-5)


def test_hard_rounding_matches_numpy():
    v = np.random.default_rng(3).normal(0, 3, 5000).astype(F32)
    got = np.asarray(A.hard_rounding(v))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, (ref_h(v) >= 0.5).astype(np.int32))


@pytest.mark.parametrize("iters,warmup", [(50, 0.2), (10, 0.0), (7, 1.0), (1, 0.2)])
def test_beta_schedule_matches_numpy(iters, warmup):
    f = jax.jit(A.beta_schedule)
    for t in range(iters):
        beta, on = f(t, iters, warmup, 20.0, 2.0)
        rb, ron = ref_schedule(t, iters, warmup, 20.0, 2.0)
        np.testing.assert_allclose(float(beta), rb, rtol=1e-6)
        assert float(on) == ron
    if warmup < 1 and iters > 1:  # regularizer on from floor(warmup * iters), beta reaches beta_end
        assert float(f(iters - 1, iters, warmup, 20.0, 2.0)[0]) == pytest.approx(2.0)
        assert float(f(int(np.floor(warmup * iters)), iters, warmup, 20.0, 2.0)[0]) == pytest.approx(20.0)


def test_lsq_fake_quant_gradients_match_numpy():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 2, 300).astype(F32)
    g = rng.normal(0, 1, 300).astype(F32)
    amax, qmax = F32(3.0), F32(7.0)
    def f(x, a, g):
        y, vjp = jax.vjp(lambda x, a: A.fake_quant_lsq(x, a, qmax, "half_even"), x, a)
        return (y, fake_quant_symmetric(x, a, qmax)) + vjp(g)

    y, y_ref, dx, da = jax.jit(f)(x, amax, g)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    s = amax / qmax
    t = x / s
    inside = np.abs(t) <= qmax
    np.testing.assert_array_equal(np.asarray(dx), np.where(inside, g, 0))
    dyds = np.where(inside, np.round(t) - t, np.clip(np.round(t), -qmax, qmax))
    np.testing.assert_allclose(float(da), float(np.sum(g * dyds) / qmax), rtol=1e-4)


# ----------------------------------------------------------------------------- layers
def conv_layer(seed, scheme="plain", k=3, cin=8, cout=8, groups=1, act="relu", bits=4, n=32, hw=6,
               cfg=QuantConfig(), noise=0.05, name="blk/conv"):
    """A random conv layer (outlier centre taps, as re-parameterized convs have), its stored
    arrays and calibration tensors: x_q = x_fp + noise (the quantized upstream)."""
    rng = np.random.default_rng(seed)
    w = (rng.normal(0, 1, (k, k, cin // groups, cout)) / np.sqrt(k * k * cin / groups)).astype(F32)
    if k > 1:
        w[k // 2, k // 2] *= 3
    b = rng.normal(0, 0.1, cout).astype(F32)
    info = LayerInfo(name, "conv", w.shape, 1, k // 2, groups, act, True, True, (n, hw, hw, cin), (n, hw, hw, cout),
                     None, seed)
    q = quantize_layer(w, b, scheme, bits, cfg)
    x_fp = rng.normal(0, 1, (n, hw, hw, cin)).astype(F32)
    x_q = (x_fp + noise * rng.normal(0, 1, x_fp.shape)).astype(F32)
    y_fp = np.asarray(activation(layer_linear(info, jnp.asarray(x_fp), jnp.asarray(w), jnp.asarray(b)), act))
    return dict(q=q, kernel=w, bias=b, info=info, act=act, x_q=x_q, x_fp=x_fp, y_fp=y_fp, in_quant=None, w_bits=bits,
                config=cfg)


def run(layer, rcfg=FAST, **over):
    kw = dict(layer, **over)
    return reconstruct_layer(kw.pop("q"), kw.pop("kernel"), kw.pop("bias"), rcfg=rcfg, **kw)


def check_stored(q, new_q, w_bits):
    """Same keys, dtypes, shapes; scales and biases bit-identical; codes within range."""
    qmax = 2 ** (w_bits - 1) - 1
    assert set(new_q) == set(q)
    for key in q:
        assert new_q[key].dtype == q[key].dtype and new_q[key].shape == q[key].shape, key
        if key.endswith("codes") and key != "b_codes":
            assert np.abs(new_q[key].astype(np.int64)).max() <= qmax, key
        else:
            np.testing.assert_array_equal(new_q[key], q[key])
    dequantize_layer(new_q)  # round-trips


def toy_dense(seed, n=32):
    """Dense [3, 2] layer, 4 bits, scale 0.01, inputs [u, v, 0.9 v + noise]: nearly collinear
    inputs make the best rounding of the last two weights of each column differ from nearest."""
    rng = np.random.default_rng(seed)
    u, v, e = rng.normal(0, 1, (3, n))
    x = np.stack([u, v, 0.9 * v + 0.05 * e], 1).astype(F32)
    w = (0.01 * np.array([[7.0, -7.0], [2.4, 3.6], [-2.55, -1.45]])).astype(F32)
    b = np.array([0.1, -0.2], F32)
    info = LayerInfo("toy", "dense", w.shape, 1, 0, 1, None, False, True, (n, 3), (n, 2), None, 0)
    q = quantize_layer(w, b, "plain", 4, QuantConfig())
    return dict(q=q, kernel=w, bias=b, info=info, act=None, x_q=x, x_fp=x, y_fp=x @ w + b, in_quant=None, w_bits=4,
                config=QuantConfig())


def brute_force(layer):
    """Best codes over all 2^n floor/ceil roundings and its per-element MSE (float64)."""
    q, w, x, y = layer["q"], layer["kernel"], layer["x_q"].astype(np.float64), layer["y_fp"]
    s = q["w_scale"]
    base = np.floor(w / s)
    best = None
    for bits in itertools.product((0, 1), repeat=w.size):
        codes = np.clip(base + np.reshape(bits, w.shape), -7, 7)
        loss = np.mean((x @ (codes * s) + layer["bias"] - y) ** 2)
        if best is None or loss < best[0]:
            best = (loss, codes)
    return best


def test_toy_layer_finds_brute_force_optimum():
    layer = toy_dense(0)
    opt_loss, opt = brute_force(layer)
    assert not np.array_equal(opt, layer["q"]["w_codes"])  # the best rounding is not nearest
    new_q, st = run(layer, ReconConfig(iters=200, lr=1e-2, batch_size=16))
    np.testing.assert_array_equal(new_q["w_codes"], opt)
    assert st["accepted"] and st["loss_after"] == pytest.approx(opt_loss, rel=1e-4)
    assert st["loss_after"] < st["loss_before"] / 10
    check_stored(layer["q"], new_q, 4)


# ----------------------------------------------------------------------------- soft kernels / hardening
def ref_cfws_codes(w, q, cbit, fbits, qmax):
    """NumPy reference of a hardened centre-CFWS rounding: coarse = floor(Wc/sc) + cbit; fine =
    floor(W with centre Wc - sc*coarse, / sf) + fbits, both clipped."""
    c = w.shape[0] // 2
    sc, sf = q["c_scale"], q["w_scale"]
    coarse = np.clip(np.floor(w[c, c] / sc) + cbit, -qmax, qmax).astype(F32)
    fine_w = w.copy()
    fine_w[c, c] = w[c, c] - (coarse * sc).astype(F32)
    fine = np.clip(np.floor(fine_w / sf) + fbits, -qmax, qmax)
    return coarse, fine


def test_cfws_hardening_and_soft_kernel_at_corners_match_reference():
    """All 2^10 hard roundings (9 fine + 1 coarse) of channel 0 of a depthwise CFWS kernel."""
    layer = conv_layer(5, "cfws", groups=8, bits=4)
    q, w = layer["q"], layer["kernel"]
    r = A.prepare_rounding(q, w, 4)
    assert r.lf.all() and r.lc[1, 1, 0, 0] == 1 and r.lc.sum() == r.lc[1, 1].sum()
    corners = np.array(list(itertools.product((0, 1), repeat=10)), F32)
    vf = np.broadcast_to(r.vf0, (len(corners),) + w.shape).copy()
    vc = np.broadcast_to(r.vc0, (len(corners),) + w.shape).copy()
    vf[..., 0, 0] = np.where(corners[:, :9] > 0, 8.0, -8.0).reshape(-1, 3, 3)
    vc[:, 1, 1, 0, 0] = np.where(corners[:, 9] > 0, 8.0, -8.0)
    soft = np.asarray(jax.jit(jax.vmap(lambda a, b: A.soft_kernel(r.arrays(), a, b, 7.0)))(vf, vc))
    for i, bits in enumerate(corners):
        coarse, fine = ref_cfws_codes(w[..., :1], {"c_scale": q["c_scale"][:1], "w_scale": q["w_scale"][:1]},
                                      bits[9], bits[:9].reshape(3, 3, 1, 1), 7)
        hq = A.harden(r, q, vf[i], vc[i])
        np.testing.assert_array_equal(hq["c_codes"][..., :1], coarse.astype(np.int8))
        np.testing.assert_array_equal(hq["w_codes"][..., :1], fine.astype(np.int8))
        np.testing.assert_allclose(soft[i][..., 0], dequantize_layer(hq)["kernel"][..., 0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("extract_center", [True, False])
def test_cfws_soft_kernel_at_init_is_float_kernel(extract_center):
    cfg = QuantConfig(cfws_extract_center=extract_center)
    layer = conv_layer(6, "cfws", cfg=cfg, bits=4)
    r = A.prepare_rounding(layer["q"], layer["kernel"], 4)
    init = np.asarray(A.soft_kernel(r.arrays(), r.vf0, r.vc0, 7.0))
    np.testing.assert_allclose(init, layer["kernel"], atol=1e-6)
    if extract_center:  # coarse codes learned at centre taps only, where the fine level absorbs both choices
        assert r.lc.sum() == r.lc[1, 1].sum() > 0
        print("learned coarse codes at 4 bits:", r.lc[1, 1].mean())
    else:  # the whole-kernel fine scale (~s_c / (2 qmax)) can hardly absorb a coarse flip
        assert r.lc.sum() <= 8


def test_plain_hardening_of_init_is_nearest_and_zero_channels_frozen():
    layer = conv_layer(7, "plain", bits=4)
    w = layer["kernel"].copy()
    w[..., 3] = 0  # an all-zero channel: scale 1 (zero guard), codes 0, never learned
    q = quantize_layer(w, layer["bias"], "plain", 4, QuantConfig())
    r = A.prepare_rounding(q, w, 4)
    assert not r.lf[..., 3].any() and r.lf[..., :3].all()
    np.testing.assert_array_equal(A.harden(r, q, r.vf0, r.vc0)["w_codes"], q["w_codes"])
    vf = np.full_like(r.vf0, 8.0)  # everything rounded up, except the frozen channel
    assert np.all(A.harden(r, q, vf, r.vc0)["w_codes"][..., 3] == 0)


# ----------------------------------------------------------------------------- reconstruct_layer
# one compile serves every case with the same geometry and activation (plain and cfws alike)
CASES = {
    "plain_relu": dict(scheme="plain", act="relu"),
    "cfws_relu": dict(scheme="cfws", act="relu"),
    "cfws_silu": dict(scheme="cfws", act="silu"),
    "cfws_depthwise": dict(scheme="cfws", act="relu", groups=8),
    "plain_depthwise": dict(scheme="plain", act="relu", groups=8),
    "cfws_no_center": dict(scheme="cfws", act="relu", cfg=QuantConfig(cfws_extract_center=False)),
    "plain_per_tensor_int16_bias": dict(scheme="plain", act="relu", cfg=QuantConfig(per_channel=False, bias="int16")),
}
IN_QUANT = (4.0, 127, "half_even")


@pytest.mark.parametrize("case", sorted(CASES))
def test_reconstruct_never_worse_and_codes_valid(case):
    layer = conv_layer(10, **CASES[case])
    layer["in_quant"] = IN_QUANT
    new_q, st = run(layer)
    assert set(st) >= {"loss_before", "loss_after", "seconds"}
    assert st["loss_after"] <= st["loss_before"]
    check_stored(layer["q"], new_q, layer["w_bits"])
    if st["accepted"]:
        assert st["loss_after"] < st["loss_before"]
        assert any(not np.array_equal(new_q[k], layer["q"][k]) for k in ("w_codes", "c_codes") if k in new_q)
    if "c_codes" in new_q:
        centre = (8 // CASES[case].get("groups", 1), 8)
        assert new_q["c_codes"].shape == ((3, 3, 8, 8) if "no_center" in case else centre)


@pytest.mark.parametrize("scheme", ["plain", "cfws"])
def test_reconstruct_improves_on_nearest(scheme):
    layer = conv_layer(11, scheme, noise=0.0, bits=4)
    layer["in_quant"] = IN_QUANT
    new_q, st = run(layer, ReconConfig(iters=300, lr=1e-2, batch_size=16))
    assert st["accepted"] and st["loss_after"] < 0.99 * st["loss_before"]
    # reported loss_after is the loss of the returned codes on all N rows
    k = dequantize_layer(new_q)
    x = fake_quant_symmetric(jnp.asarray(layer["x_q"]), 4.0, 127.0)
    y = activation(layer_linear(layer["info"], x, jnp.asarray(k["kernel"]),
                                jnp.asarray(k["bias"])), "relu")
    assert float(np.mean((np.asarray(y, np.float64) - layer["y_fp"]) ** 2)) == pytest.approx(st["loss_after"],
                                                                                              rel=1e-4)


def test_bit_identical_for_seed_and_different_for_another():
    """MAE loss, QDrop, half-up input rounding; the same seed twice, then another seed."""
    layer = conv_layer(13, "cfws", act="relu")
    layer["in_quant"] = (4.0, 7, "half_up")
    rc = ReconConfig(iters=150, lr=1e-2, batch_size=16, loss="mae", qdrop_prob=0.3, seed=1)
    a, sa = run(layer, rc)
    b, sb = run(layer, rc)
    assert sa["loss_after"] <= sa["loss_before"]
    check_stored(layer["q"], a, 4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert sa["loss_after"] == sb["loss_after"] and sa["loss_before"] == sb["loss_before"]
    c, _ = run(layer, dataclasses.replace(rc, seed=2))
    assert any(not np.array_equal(a[k], c[k]) for k in ("w_codes", "c_codes"))


def test_qdrop_mask_rate():
    m = np.asarray(jax.jit(lambda b: A.qdrop_mask(b, 0.3, (64, 8, 8, 4)))(jnp.array([1, 2], jnp.uint32)))
    m2 = np.asarray(jax.jit(lambda b: A.qdrop_mask(b, 0.3, (64, 8, 8, 4)))(jnp.array([1, 3], jnp.uint32)))
    assert abs(m.mean() - 0.3) < 0.01 and (m != m2).mean() > 0.3


def test_no_iterations_returns_q():
    layer = conv_layer(14, "plain")
    layer["in_quant"] = IN_QUANT
    new_q, st = run(layer, ReconConfig(iters=0, batch_size=16))
    assert not st["accepted"] and st["loss_after"] == st["loss_before"]
    for key in new_q:
        np.testing.assert_array_equal(new_q[key], layer["q"][key])


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_iterations_are_round_to_nearest(case):
    """``iters=0``: exactly the integer codes of the round-to-nearest quantizers of
    :mod:`cfws_jax.cfws` (plain, and CFWS coarse + fine), for every layer kind."""
    from cfws_jax.cfws import CFWSConfig, cfws_quantize, plain_quantize

    layer = conv_layer(16, **CASES[case])
    layer["in_quant"] = IN_QUANT
    cfg, w = layer["config"], layer["kernel"]
    new_q, st = run(layer, ReconConfig(iters=0, batch_size=16))
    assert not st["accepted"] and st["loss_after"] == st["loss_before"] and st["seconds"] == 0.0
    if CASES[case]["scheme"] == "plain":
        codes, _, _ = plain_quantize(w, layer["w_bits"], cfg.per_channel)
        np.testing.assert_array_equal(new_q["w_codes"], np.asarray(codes))
        return
    ref = cfws_quantize(w, CFWSConfig(layer["w_bits"], cfg.cfws_extract_center, cfg.cfws_coarse))
    np.testing.assert_array_equal(new_q["c_codes"], np.asarray(ref.coarse_codes))
    np.testing.assert_array_equal(new_q["w_codes"], np.asarray(ref.fine_codes))
    if case == "cfws_relu":  # the hardened initial rounding is not round-to-nearest here (why iters=0 skips it)
        r = A.prepare_rounding(layer["q"], w, layer["w_bits"])
        h = A.harden(r, layer["q"], r.vf0, r.vc0)
        assert any(not np.array_equal(h[k], new_q[k]) for k in ("w_codes", "c_codes"))


def test_learn_act_step():
    layer = conv_layer(15, "plain", act="relu", noise=0.0)
    layer["in_quant"] = (8.0, 7, "half_even")  # 4-bit input with a too large amax
    _, fixed = run(layer, ReconConfig(iters=200, lr=1e-2, batch_size=16))
    new_q, st = run(layer, ReconConfig(iters=200, lr=1e-2, batch_size=16, learn_act_step=True))
    assert st["in_amax"] > 0 and st["in_amax"] != 8.0
    assert st["loss_after"] <= st["loss_before"]
    assert st["loss_after"] < fixed["loss_after"]  # learning the step helps with a bad amax
    check_stored(layer["q"], new_q, 4)
    # the reported loss uses the returned amax
    k = dequantize_layer(new_q)
    x = fake_quant_symmetric(jnp.asarray(layer["x_q"]), st["in_amax"], 7.0)
    y = activation(layer_linear(layer["info"], x, jnp.asarray(k["kernel"]), jnp.asarray(k["bias"])), "relu")
    assert float(np.mean((np.asarray(y, np.float64) - layer["y_fp"]) ** 2)) == pytest.approx(st["loss_after"],
                                                                                              rel=1e-4)


def test_one_compile_per_layer_structure():
    # a structure no other test uses (cin=cout=5), two layers with other weights, data, names, seeds, iters
    l1 = conv_layer(20, "plain", cin=5, cout=5, name="stage1/a")
    l2 = conv_layer(21, "plain", cin=5, cout=5, name="stage2/b")
    before = dict(A.TRACE_COUNTS)
    run(l1, ReconConfig(iters=20, lr=1e-2, batch_size=16, seed=0))
    run(l2, ReconConfig(iters=30, lr=3e-3, batch_size=16, seed=5, reg_weight=0.1))
    assert A.TRACE_COUNTS["train"] - before.get("train", 0) == 1
    assert A.TRACE_COUNTS["eval"] - before.get("eval", 0) == 1


def test_errors_name_the_layer():
    layer = conv_layer(22, "plain")
    with pytest.raises(ValueError, match="blk/conv"):
        run(layer, q={"kernel": layer["kernel"]})
    with pytest.raises(ValueError, match="blk/conv"):
        run(layer, x_fp=layer["x_fp"][:5])
    with pytest.raises(ValueError, match="loss"):
        ReconConfig(loss="l1")
    with pytest.raises(ValueError, match="qdrop"):
        ReconConfig(qdrop_prob=1.0)
