"""Every QuantConfig field checked against an independent computation (issue #15).

The network is ``repvgg_cifar_small`` at 16x16 in train form. The reference fuses its kernels
itself with ``cfws_jax.fusion`` (not through ``quantize``), quantizes them with
``cfws_quantize`` / ``plain_quantize`` under the options the config asks for, decides the scheme
of every layer and the place, method, bits and signedness of every activation quantizer from the
config's documented rules, and runs a NumPy fake-quant forward on its own weights (ReLU fusion
on or off) that calibrates as it goes (sequential) or from the float network (parallel), binning
with a float64 ``floor(v / width)`` (only the float32 conv primitive is the library's). ``quantize``'s stored codes, scales, ``act_amax`` and logits
must match. Each case also checks that the reference itself changes when the field is reset to
the preset's value, so a pipeline that ignores the field fails the case.
"""

from __future__ import annotations

import fnmatch
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax import calib, fusion
from cfws_jax.cfws import CFWSConfig, cfws_quantize, plain_quantize
from cfws_jax.models import create_model
from cfws_jax.models.layers import conv2d
from cfws_jax.models.repvgg import REPVGG_CONFIGS, block_specs
from cfws_jax.ptq import PRESETS, get_preset, quantize, quantized_apply_fn
from conftest import numpy_init
from test_fusion import conv_ref

ARCH = "repvgg_cifar_small"
HW = 16
BN_EPS = 1e-5
BLOCKS = block_specs(REPVGG_CONFIGS[ARCH])
LAYERS = [f"{b.name}/rbr_reparam" for b in BLOCKS] + ["linear"]


@functools.lru_cache(maxsize=None)
def train_vars():
    v = numpy_init(create_model(ARCH), (1, HW, HW, 3), seed=3, train=False)
    return jax.tree_util.tree_map(lambda a: np.array(a, np.float32), v)


@functools.lru_cache(maxsize=None)
def fused():
    """{layer: (kernel HWIO / [in, out], bias)} fused here with cfws_jax.fusion."""
    p, s = train_vars()["params"], train_vars()["batch_stats"]
    out = {}
    for b in BLOCKS:
        bp, bs = p[b.name], s[b.name]

        def branch(n):
            return (bp[n]["conv"]["kernel"], fusion.BN(bp[n]["bn"]["scale"], bp[n]["bn"]["bias"],
                                                       bs[n]["bn"]["mean"], bs[n]["bn"]["var"]))

        ident = None
        if "rbr_identity" in bp:
            ident = fusion.BN(bp["rbr_identity"]["scale"], bp["rbr_identity"]["bias"],
                              bs["rbr_identity"]["mean"], bs["rbr_identity"]["var"])
        k, bias = fusion.fuse_repvgg_block(branch("rbr_dense"), branch("rbr_1x1"), ident, groups=b.groups, eps=BN_EPS)
        out[f"{b.name}/rbr_reparam"] = (np.asarray(k, np.float32), np.asarray(bias, np.float32))
    out["linear"] = (p["linear"]["kernel"], p["linear"]["bias"])
    return out


def images(n, seed):
    return np.random.default_rng(seed).normal(0.2, 1.0, (n, HW, HW, 3)).astype(np.float32)


CALIB = images(4, 11)
EVAL = images(3, 12)
# values j/2 with max 7: with 4-bit activations the input scale is exactly 1 and half the
# values are rounding ties, so half_up and half_even differ from the first quantizer on
TIES = (np.random.default_rng(13).integers(-14, 15, (4, HW, HW, 3)) / 2).astype(np.float32)
TIES[0, 0, 0, 0] = 7.0


# ----------------------------------------------------------------------------- reference weights
def ref_scheme(cfg, i: int, name: str):
    """(scheme, bits) from the QuantConfig docstring rules."""
    last = i == len(LAYERS) - 1
    if any(fnmatch.fnmatchcase(name, pat) for pat in cfg.float_layers):
        return "float", None
    if (i == 0 and not cfg.quantize_first_layer) or (last and not cfg.quantize_last_layer):
        return "float", None
    rep = name != "linear"
    if rep and cfg.cfws:
        return "cfws", cfg.w_bits
    return "plain", (cfg.rep_w_bits if rep and not cfg.cfws and cfg.rep_w_bits else cfg.w_bits)


def ref_quant_layer(cfg, i: int, name: str):
    """(expected stored arrays, dequantized {"kernel", "bias"}) computed independently of ``quantize``."""
    kernel, bias = fused()[name]
    scheme, bits = ref_scheme(cfg, i, name)
    st = np.int8 if (bits or 8) <= 8 else np.int16
    if scheme == "float":
        exp = {"kernel": kernel}
        k_hat = kernel
    elif scheme == "plain":
        codes, scale, _ = plain_quantize(kernel.reshape((1, 1) * (kernel.ndim == 2) + kernel.shape), bits=bits,
                                         per_channel=cfg.per_channel, rounding=cfg.rounding)
        codes = np.asarray(codes).reshape(kernel.shape).astype(st)
        exp = {"w_codes": codes, "w_scale": np.asarray(scale, np.float32)}
        k_hat = codes.astype(np.float32) * exp["w_scale"]
    else:
        cw = cfws_quantize(kernel, CFWSConfig(bits=bits, extract_center=cfg.cfws_extract_center,
                                              coarse=cfg.cfws_coarse, rounding=cfg.rounding))
        exp = {"w_codes": np.asarray(cw.fine_codes).astype(st), "w_scale": np.asarray(cw.fine_scale, np.float32),
               "c_codes": np.asarray(cw.coarse_codes).astype(st), "c_scale": np.asarray(cw.coarse_scale, np.float32)}
        k_hat = exp["w_codes"].astype(np.float32) * exp["w_scale"]
        coarse = exp["c_codes"].astype(np.float32) * exp["c_scale"]
        if coarse.ndim == 4:
            k_hat = k_hat + coarse
        else:
            k_hat[1, 1] = k_hat[1, 1] + coarse
    if cfg.bias == "int16" and scheme != "float":
        s = np.float32(np.abs(bias).max() / np.float32(32767))
        t = bias / s
        t = np.round(t) if cfg.rounding == "half_even" else np.floor(t + np.float32(0.5))
        exp.update(b_codes=np.clip(t, -32767, 32767).astype(np.int16), b_scale=np.asarray(s, np.float32))
        b_hat = exp["b_codes"].astype(np.float32) * s
    else:
        exp["bias"] = bias
        b_hat = bias
    return exp, {"kernel": k_hat, "bias": b_hat}


def ref_weights(cfg):
    return {n: ref_quant_layer(cfg, i, n) for i, n in enumerate(LAYERS)}


# ----------------------------------------------------------------------------- reference forward
def ref_points(cfg):
    """[(name, layer, stat "relu"|"abs", method, unsigned, before_act)] in execution order."""
    pts = []
    floats = {n for n in LAYERS if any(fnmatch.fnmatchcase(n, p) for p in cfg.float_layers)}
    other = cfg.other_act_method or cfg.act_method
    for i, n in enumerate(LAYERS):
        if n in floats:
            continue
        if i == 0 and cfg.quantize_input:
            pts.append((f"{n}:in", "abs", cfg.input_method, False, False))
        elif i > 0 and (LAYERS[i - 1] in floats or n == "linear"):  # after a float layer / the pooling
            pts.append((f"{n}:in", "abs", other, False, False))
        if n != "linear":
            fused_relu = cfg.relu_fusion
            pts.append((f"{n}:out", "relu" if fused_relu else "abs", cfg.act_method,
                        bool(cfg.act_unsigned and fused_relu), not fused_relu))
    return pts


def np_amax(v, method, bits, unsigned, cfg):
    """amax of the statistic v (>= 0): max, or a fixed [0, max] histogram binned in float64."""
    v = np.asarray(v, np.float32).ravel()
    m = np.float32(v.max())
    if method == "max":
        return float(m)
    n = cfg.num_bins
    w = np.float64(np.float32(m) / np.float32(n))
    idx = np.minimum(np.floor(v.astype(np.float64) / w), n - 1).astype(np.int64) if m > 0 else np.zeros(v.size, int)
    counts = np.bincount(idx, minlength=n)
    edges = np.linspace(0.0, float(m), n + 1)
    return calib.compute_amax((counts, edges), method, num_bits=bits, unsigned=unsigned, percentile=cfg.percentile)


def np_fq(t, amax, qmax, rounding):
    s = np.float32(np.float32(amax) / np.float32(qmax)) if amax > 2.0**-24 else np.float32(1)
    r = t / s
    r = np.round(r) if rounding == "half_even" else np.floor(r + np.float32(0.5))
    return (np.clip(r, -qmax, qmax) * s).astype(np.float32)


def np_conv(h, kernel, bias, stride):
    """3x3 conv, pad 1 + bias (NHWC, HWIO) with the library's float32 conv primitive, so tensors
    match the pipeline's to the bit and sparse-histogram searches (KL on a few thousand values)
    cannot flip bins on last-bit noise; the primitive itself is checked against the float64
    ``conv_ref`` here and in test_fusion / test_models."""
    return np.asarray(conv2d(jnp.asarray(h), jnp.asarray(kernel), jnp.asarray(bias), stride, 1, 1))


def test_reference_conv_is_the_float64_conv():
    k, b = fused()["stage1_0/rbr_reparam"]
    x = images(2, 5)[..., :1].repeat(16, -1)
    want = np.transpose(conv_ref(np.transpose(x, (0, 3, 1, 2)), np.transpose(k, (3, 2, 0, 1)), 2, 1, 1), (0, 2, 3, 1))
    np.testing.assert_allclose(np_conv(x, k, b, 2), want + b, rtol=1e-5, atol=1e-5)


def ref_forward(cfg, x, mode, amax=None):
    """mode "sequential": calibrate each point on quantized weights and quantized upstream
    tensors as it goes; "parallel": statistics of the float network; "eval": given ``amax``
    (dict name -> value). Returns (logits, {point: amax})."""
    pts = {p[0]: p[1:] for p in ref_points(cfg)}
    wq = ref_weights(cfg)
    weights = {n: (wq[n][1] if mode != "parallel" else dict(zip(("kernel", "bias"), fused()[n]))) for n in LAYERS}
    found = {}

    def point(name, t):
        if name not in pts:
            return t
        stat, method, unsigned, _ = pts[name]
        qmax = 2 ** (cfg.a_bits - (0 if unsigned else 1)) - 1
        a = amax[name] if mode == "eval" else np_amax(np.maximum(t, 0) if stat == "relu" else np.abs(t), method,
                                                     cfg.a_bits, unsigned, cfg)
        found[name] = a
        return t if mode == "parallel" else np_fq(t, a, qmax, cfg.rounding)

    h = np.asarray(x, np.float32)
    for b in BLOCKS:
        n = f"{b.name}/rbr_reparam"
        h = point(f"{n}:in", h)
        y = np_conv(h, weights[n]["kernel"], weights[n]["bias"], b.stride)
        if f"{n}:out" in pts and pts[f"{n}:out"][3]:  # quantizer before the ReLU
            h = np.maximum(point(f"{n}:out", y), 0)
        else:
            h = point(f"{n}:out", np.maximum(y, 0))
    g = point("linear:in", h.mean(axis=(1, 2)))
    logits = g @ weights["linear"]["kernel"].astype(np.float64) + weights["linear"]["bias"]
    return logits.astype(np.float32), found


@functools.lru_cache(maxsize=None)
def run_case(preset, overrides, data="calib"):
    cfg = get_preset(preset, **dict(overrides))
    x = TIES if data == "ties" else CALIB
    qm = quantize(ARCH, train_vars(), [x], cfg, progress=False)
    _, ref_amax = ref_forward(cfg, x, cfg.calib_order)
    return cfg, qm, ref_amax


def check_weights(cfg, qm):
    assert list(qm.layers) == LAYERS
    for i, n in enumerate(LAYERS):
        exp, _ = ref_quant_layer(cfg, i, n)
        got = qm.layers[n]
        assert sorted(got) == sorted(exp), f"{n}: stored {sorted(got)}, expected {sorted(exp)}"
        for k, v in exp.items():
            assert np.asarray(got[k]).dtype == v.dtype, f"{n}/{k}: dtype {np.asarray(got[k]).dtype} vs {v.dtype}"
            np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=f"{n}/{k}")


def check_activations(cfg, qm, ref_amax):
    names = [p.name for p in qm.plan.points]
    assert names == list(ref_amax), f"points {names} vs reference {list(ref_amax)}"
    got = dict(zip(names, np.asarray(qm.act_amax, np.float64)))
    for n in names:
        np.testing.assert_allclose(got[n], ref_amax[n], rtol=1e-5, err_msg=n)
    logits = np.asarray(quantized_apply_fn(qm)(EVAL))
    ref_logits, _ = ref_forward(cfg, EVAL, "eval", got)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=2e-4)


# (preset, overrides): the override is the field under test; resetting it must change the reference
FIELD_CASES = {
    "relu_fusion_off": ("cfws_kl", (("relu_fusion", False),)),
    "relu_fusion_on_vanilla": ("kl", (("relu_fusion", True),)),
    "act_unsigned": ("cfws_minmax", (("act_unsigned", True),)),
    "other_act_method": ("cfws_kl", (("other_act_method", "percentile"),)),
    "input_method": ("cfws_minmax", (("input_method", "percentile"),)),
    "percentile": ("cfws_minmax", (("act_method", "percentile"), ("percentile", 99.0))),
    "num_bins": ("kl", (("num_bins", 256),)),
    "cfws_extract_center": ("cfws_minmax", (("cfws_extract_center", False),)),
    "cfws_coarse": ("cfws_minmax", (("cfws_coarse", "tensor"),)),
    "rep_w_bits": ("minmax", (("rep_w_bits", 5),)),
    "rounding": ("cfws_minmax", (("rounding", "half_up"), ("w_bits", 4), ("a_bits", 4))),
    "quantize_first_layer": ("cfws_minmax", (("quantize_first_layer", False),)),
    "quantize_last_layer": ("cfws_minmax", (("quantize_last_layer", False),)),
    "float_layers": ("cfws_minmax", (("float_layers", ("stage2_*",)),)),
    "bias": ("cfws_minmax", (("bias", "int16"),)),
    "calib_order": ("cfws_kl", (("calib_order", "parallel"),)),
    "bits_per_tensor_input": ("minmax", (("w_bits", 6), ("a_bits", 6), ("per_channel", False),
                                         ("quantize_input", False))),
}


# cfws_kl_reponly: an alias of only_rep_kl; the *_ort presets (CFWS branch points, int32-grid
# bias) are not modelled by this reference: tests/test_export_onnx_ort.py checks them against
# onnxruntime's integer kernels
@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if p != "cfws_kl_reponly" and not p.endswith("_ort")))
def test_preset_matches_independent_reference(preset):
    # presets that refine the weights after calibration (bias correction, learned rounding:
    # tests/test_reconstruct.py) are checked here up to that step: the rest of their wiring;
    # cross-layer equalization (cle) acts before it all: tests/test_equalize.py
    refine = tuple((f, False) for f in ("reconstruct", "bias_correction", "cle") if getattr(PRESETS[preset], f))
    cfg, qm, ref_amax = run_case(preset, refine)
    assert qm.config == PRESETS[preset].replace(**dict(refine))
    check_weights(cfg, qm)
    check_activations(cfg, qm, ref_amax)


def _reference_signature(cfg, x):
    _, amax = ref_forward(cfg, x, cfg.calib_order)
    w = ref_weights(cfg)
    return amax, {n: {k: np.asarray(v) for k, v in w[n][0].items()} for n in LAYERS}


def _same(a, b):
    (amax_a, w_a), (amax_b, w_b) = a, b
    if list(amax_a) != list(amax_b) or not np.allclose(list(amax_a.values()), list(amax_b.values()), rtol=1e-6):
        return False
    return all(sorted(w_a[n]) == sorted(w_b[n]) and all(np.array_equal(w_a[n][k], w_b[n][k]) for k in w_a[n])
               for n in LAYERS)


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_config_field_is_wired(case):
    preset, overrides = FIELD_CASES[case]
    data = "ties" if case == "rounding" else "calib"
    cfg, qm, ref_amax = run_case(preset, overrides, data)
    check_weights(cfg, qm)
    check_activations(cfg, qm, ref_amax)
    # the field is observable: with it reset to the preset's value the reference differs
    base = get_preset(preset, **{k: getattr(PRESETS[preset], k) for k, _ in overrides[:1]},
                      **dict(overrides[1:]))
    x = TIES if data == "ties" else CALIB
    assert not _same(_reference_signature(cfg, x), _reference_signature(base, x)), f"{case}: field has no effect here"



def test_cli_fake_quant_matches_python_api_and_tracks_float(tmp_path, capsys):
    """End to end with assertions on results: ``cfws-jax ptq`` then ``eval`` on generated CIFAR-style
    data; the CLI's top-1 equals the Python API's on the same images (quantized and float), the
    quantized logits track the float ones, and the CLI's flags reach the stored config."""
    import json

    from cfws_jax.cli import main
    from cfws_jax.data.preprocess import CIFAR10
    from cfws_jax.io import save_variables
    from cfws_jax.ptq import load_quantized

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    x_test = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    y_test = rng.integers(0, 10, 24)
    np.savez(data, x_train=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, 16),
             x_test=x_test, y_test=y_test)
    variables = numpy_init(create_model(ARCH), (1, 32, 32, 3), seed=1, train=False)
    params, q = tmp_path / "params", tmp_path / "q"
    save_variables(params, variables, {"arch": ARCH, "form": "train"})
    assert main(["ptq", "--arch", ARCH, "--params", str(params), "--calib-data", str(data), "--preset", "cfws_kl",
                 "--num-calib", "8", "--a-bits", "7", "--order", "parallel", "--out", str(q), "--no-progress"]) == 0
    res = {}
    for kind, arg in (("int", ["--quantized", str(q)]), ("float", ["--params", str(params)])):
        capsys.readouterr()
        assert main(["eval", "--arch", ARCH, *arg, "--data", str(data), "--split", "test", "--json",
                     "--no-progress"]) == 0
        res[kind] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    qm = load_quantized(q)
    assert qm.config.a_bits == 7 and qm.config.calib_order == "parallel" and qm.config.act_method == "kl_cfws"
    assert all(p.bits == 7 for p in qm.plan.points)
    x = CIFAR10(x_test)
    lq = np.asarray(quantized_apply_fn(qm)(x))
    lf = np.asarray(create_model(ARCH).apply(variables, x))
    assert res["int"]["images"] == res["float"]["images"] == 24
    assert res["int"]["top1"] == pytest.approx(float(np.mean(lq.argmax(1) == y_test)))
    assert res["float"]["top1"] == pytest.approx(float(np.mean(lf.argmax(1) == y_test)))
    cos = np.sum(lq * lf, 1) / np.linalg.norm(lq, axis=1) / np.linalg.norm(lf, axis=1)
    assert cos.min() > 0.9, cos.min()
    assert np.mean(lq.argmax(1) == lf.argmax(1)) >= 0.75
