"""PTQ pipeline: plan, calibration (sequential / parallel), fake-quant forward vs a NumPy
reference, presets, CFWS layers, save / restore, report, sensitivity, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax import calib
from cfws_jax.models import create_model
from cfws_jax.models.repvgg import RepVGGConfig
from cfws_jax.ptq import PRESETS, QuantConfig, get_preset, load_quantized, quantize, quantized_apply_fn, save_quantized
from cfws_jax.ptq.report import format_report, layer_report, sensitivity, write_report
from conftest import numpy_init
from test_fusion import conv_ref

TINY = RepVGGConfig((1, 1, 1, 1), (4, 6, 8, 8, 12), num_classes=5, stem_stride=1, stage_strides=(1, 2, 2, 1))


def _tiny_params(seed=0):
    """Deploy-form params with fused-RepVGG-like kernels (outlier centre taps)."""
    model = create_model(TINY, deploy=True)
    params = numpy_init(model, (1, 8, 8, 3), seed)["params"]
    rng = np.random.default_rng(seed)
    out = jax.tree_util.tree_map(lambda a: np.array(a, np.float32), params)
    for name, blk in out.items():
        if name == "linear":
            continue
        k = blk["rbr_reparam"]["kernel"]
        k[1, 1] += rng.normal(0, 1.0, k.shape[2:]).astype(np.float32)  # strong centre (1x1 + identity)
        blk["rbr_reparam"]["bias"] = rng.normal(0, 0.1, k.shape[-1]).astype(np.float32)
    return model, {"params": out}


def _images(n, seed=1, hw=8):
    return np.random.default_rng(seed).normal(0, 1, (n, hw, hw, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- NumPy reference
def _fq(t, amax, qmax=127):
    s = np.float32(amax) / np.float32(qmax) if amax > 2.0**-24 else np.float32(1)
    return (np.clip(np.round(t / s), -qmax, qmax) * s).astype(np.float32)


def ref_forward(model_cfg, weights, x, amax=None, quantize=True):
    """Fake-quant forward of a deploy RepVGG (ReLU fusion, signed int8, input and linear-input
    quantizers) in NumPy. ``amax=None``: calibrate sequentially with the max method and return
    the amax list too; ``quantize=False``: the float network, the list holding its maxima.
    weights: {layer: {"kernel": HWIO, "bias"}}."""
    from cfws_jax.models.repvgg import block_specs

    collected = []

    def point(t):
        a = float(np.max(np.abs(t))) if amax is None else amax[len(collected)]
        collected.append(a)
        return _fq(t, a) if quantize else t

    h = point(np.asarray(x, np.float32))  # input point
    for b in block_specs(model_cfg):
        name, stride, groups = b.name, b.stride, b.groups
        w = weights[f"{name}/rbr_reparam"]
        k_oihw = np.transpose(w["kernel"], (3, 2, 0, 1))
        y = conv_ref(np.transpose(h, (0, 3, 1, 2)), k_oihw, stride, 1, groups)
        y = np.transpose(y, (0, 2, 3, 1)).astype(np.float32) + np.asarray(w["bias"])
        h = point(np.maximum(y, 0))
    g = point(h.mean(axis=(1, 2)))  # linear:in
    w = weights["linear"]
    return g @ np.asarray(w["kernel"]) + np.asarray(w["bias"]), collected


def _max_float(model_cfg, weights, x):
    """max |t| at every point of the float network (NumPy)."""
    return ref_forward(model_cfg, weights, x, quantize=False)[1]


def _dq_weights(qm):
    return qm.dequantized_weights()


def test_plan_places_quantizers_where_tensors_are_not_quantized():
    model, variables = _tiny_params()
    qm = quantize(model, variables, [_images(4)], get_preset("cfws_minmax"), progress=False)
    names = [p.name for p in qm.plan.points]
    assert names[0] == "stage0/rbr_reparam:in"  # network input
    assert "linear:in" in names  # after global average pooling
    assert "linear:out" not in names  # logits stay float
    assert sum(n.endswith(":in") for n in names) == 2
    assert all(p.mode == "relu" for p in qm.plan.points if p.name.endswith("rbr_reparam:out"))
    assert [lp.scheme for lp in qm.plan.layers] == ["cfws"] * 5 + ["plain"]


def test_sequential_max_calibration_and_forward_match_numpy_reference():
    model, variables = _tiny_params()
    x = _images(6)
    qm = quantize(model, variables, [x], get_preset("cfws_minmax"), progress=False)
    w = _dq_weights(qm)
    logits_ref, amax_ref = ref_forward(TINY, w, x)
    np.testing.assert_allclose(qm.act_amax, amax_ref, rtol=2e-5)
    logits = np.asarray(quantized_apply_fn(qm, model)(x))
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-4, atol=1e-4)
    # and with the amax given, the reference reproduces the forward on new images
    x2 = _images(3, seed=7)
    ref2, _ = ref_forward(TINY, w, x2, list(qm.act_amax))
    np.testing.assert_allclose(np.asarray(quantized_apply_fn(qm, model)(x2)), ref2, rtol=1e-4, atol=1e-4)


def test_kl_amax_comes_from_the_histogram_of_the_quantized_upstream_tensor():
    model, variables = _tiny_params()
    x = _images(6)
    qm = quantize(model, variables, [x], get_preset("cfws_kl"), progress=False)
    w = _dq_weights(qm)
    # tensor at point 1 (stem output) given the calibrated input quantizer
    h = _fq(x, qm.act_amax[0])
    k = np.transpose(w["stage0/rbr_reparam"]["kernel"], (3, 2, 0, 1))
    y = np.transpose(conv_ref(np.transpose(h, (0, 3, 1, 2)), k, 1, 1, 1), (0, 2, 3, 1)) + w["stage0/rbr_reparam"]["bias"]
    v = np.maximum(y, 0).astype(np.float32)
    state = calib.update(calib.init(2048, "abs", "fixed", float(v.max())), jnp.asarray(v))
    expect = calib.compute_amax(calib.finalize(state, "stem"), "kl_cfws")
    assert qm.plan.points[1].method == "kl_cfws"
    np.testing.assert_allclose(qm.act_amax[1], expect, rtol=1e-5)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs(preset):
    model, variables = _tiny_params()
    x = _images(4)
    qm = quantize(model, variables, [x], get_preset(preset), progress=False)
    out = np.asarray(quantized_apply_fn(qm, model)(x))
    assert out.shape == (4, 5) and np.all(np.isfinite(out))
    assert np.all(np.asarray(qm.act_amax) > 0)


def test_cfws_layers_store_two_scales_and_plain_layers_one():
    model, variables = _tiny_params()
    qm = quantize(model, variables, [_images(4)], get_preset("cfws_kl"), progress=False)
    stem = qm.layers["stage0/rbr_reparam"]
    assert stem["c_codes"].shape == (3, 4) and stem["c_codes"].dtype == np.int8
    assert stem["w_codes"].shape == (3, 3, 3, 4) and stem["w_codes"].dtype == np.int8
    assert np.all(stem["c_scale"] > stem["w_scale"])  # coarse centre step is wider than the fine step
    plain = quantize(model, variables, [_images(4)], get_preset("kl"), progress=False).layers["stage0/rbr_reparam"]
    assert "c_codes" not in plain and plain["w_codes"].dtype == np.int8
    # CFWS reduces the weight error of the fused kernels
    k = np.asarray(variables["params"]["stage0"]["rbr_reparam"]["kernel"])
    err = {n: np.sum((k - _dq_weights(q)["stage0/rbr_reparam"]["kernel"]) ** 2)
           for n, q in (("cfws", qm), ("plain", quantize(model, variables, [_images(4)], get_preset("kl"), progress=False)))}
    assert err["cfws"] < err["plain"]


def test_int16_baseline_uses_16_bit_codes_on_rep_convs():
    model, variables = _tiny_params()
    qm = quantize(model, variables, [_images(4)], get_preset("int16_weights"), progress=False)
    assert qm.layers["stage1_0/rbr_reparam"]["w_codes"].dtype == np.int16
    assert np.abs(qm.layers["stage1_0/rbr_reparam"]["w_codes"]).max() == 32767
    assert qm.layers["linear"]["w_codes"].dtype == np.int8


def test_sequential_and_parallel_calibration_differ_and_both_work():
    model, variables = _tiny_params()
    x = _images(8)
    seq = quantize(model, variables, [x], get_preset("cfws_minmax"), progress=False)
    par = quantize(model, variables, [x], get_preset("cfws_minmax", calib_order="parallel"), progress=False)
    assert seq.act_amax[0] == par.act_amax[0]  # the input sees no upstream quantization
    assert not np.allclose(seq.act_amax[1:], par.act_amax[1:], rtol=1e-6, atol=0)
    # parallel = max statistics of the float network (no quantizer upstream)
    fw = {f"{b}/rbr_reparam": variables["params"][b]["rbr_reparam"] for b in variables["params"] if b != "linear"}
    fw["linear"] = variables["params"]["linear"]
    np.testing.assert_allclose(par.act_amax[1:], [float(a) for a in _max_float(TINY, fw, x)][1:], rtol=2e-5)
    for p, a in zip(par.plan.points, par.act_amax):
        assert a > 0, p.name
    x2 = _images(3, seed=5)
    for qm in (seq, par):
        assert np.all(np.isfinite(np.asarray(quantized_apply_fn(qm, model)(x2))))


def test_multi_batch_sequential_equals_union_statistics_for_max():
    model, variables = _tiny_params()
    x = _images(8)
    one = quantize(model, variables, [x], get_preset("cfws_minmax"), progress=False)
    two = quantize(model, variables, [x[:4], x[4:]], get_preset("cfws_minmax"), progress=False)
    np.testing.assert_allclose(one.act_amax, two.act_amax, rtol=1e-6)


def test_save_restore_is_bit_identical(tmp_path):
    # registry architecture so it can be restored by name
    arch = "repvgg_cifar_small"
    model = create_model(arch, deploy=True)
    params = numpy_init(model, (1, 32, 32, 3))
    imgs = _images(4, hw=32)
    qm = quantize(arch, params, [imgs], get_preset("cfws_kl"), progress=False)
    save_quantized(qm, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    assert back.arch == arch and back.config == qm.config
    for name in qm.layers:
        for k, v in qm.layers[name].items():
            assert back.layers[name][k].dtype == v.dtype
            np.testing.assert_array_equal(back.layers[name][k], v)
    a = np.asarray(quantized_apply_fn(qm)(imgs))
    b = np.asarray(quantized_apply_fn(back)(imgs))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="repvgg_cifar_small, not repvgg_a0"):
        load_quantized(tmp_path / "q", arch="repvgg_a0")


def test_train_form_variables_are_fused_first():
    arch = "repvgg_cifar_small"
    model = create_model(arch)
    v = numpy_init(model, (1, 32, 32, 3), 3)
    qm = quantize(arch, v, [_images(2, hw=32)], get_preset("minmax"), progress=False)
    assert qm.plan.layers[0].info.name == "stage0/rbr_reparam"


def test_float_layers_and_first_last_policy():
    model, variables = _tiny_params()
    x = _images(4)
    cfg = get_preset("cfws_kl", float_layers=("stage2_*",), quantize_last_layer=False)
    qm = quantize(model, variables, [x], cfg, progress=False)
    schemes = {lp.info.name: lp.scheme for lp in qm.plan.layers}
    assert schemes["stage2_0/rbr_reparam"] == "float" and schemes["linear"] == "float"
    assert "kernel" in qm.layers["stage2_0/rbr_reparam"]
    names = [p.name for p in qm.plan.points]
    assert "stage2_0/rbr_reparam:out" not in names
    assert "stage3_0/rbr_reparam:in" in names  # downstream of a float layer: quantize the input


def test_report_and_sensitivity(tmp_path):
    model, variables = _tiny_params()
    x = _images(4)
    qm = quantize(model, variables, [x], get_preset("minmax"), progress=False)
    rep = layer_report(qm, variables, x, model=model)
    assert [r["layer"] for r in rep["layers"]] == qm.plan.names
    stem = rep["layers"][0]
    k = np.asarray(variables["params"]["stage0"]["rbr_reparam"]["kernel"])
    q = _dq_weights(qm)["stage0/rbr_reparam"]["kernel"]
    np.testing.assert_allclose(stem["weight_sqnr_db"], 10 * np.log10(np.sum(k.astype(np.float64) ** 2) /
                                                                      np.sum((k.astype(np.float64) - q) ** 2)), rtol=1e-9)
    assert stem["center_surround_ratio"] > 1
    assert "logits" in format_report(rep)
    write_report(rep, str(tmp_path / "r.json"))
    write_report(rep, str(tmp_path / "r.csv"))
    assert json.loads((tmp_path / "r.json").read_text())["layers"][0]["layer"] == "stage0/rbr_reparam"
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("layer,")
    ranking = sensitivity(qm, variables, x, model=model)
    assert sorted(r["layer"] for r in ranking) == sorted(qm.plan.names)
    sq = [r["logits_sqnr_db"] for r in ranking]
    assert sq == sorted(sq)


def test_errors_name_the_problem():
    model, variables = _tiny_params()
    with pytest.raises(ValueError, match="empty calibration set"):
        quantize(model, variables, [], get_preset("cfws_kl"), progress=False)
    with pytest.raises(ValueError, match="cannot run on inputs of shape"):
        quantize(model, variables, [np.zeros((2, 8, 8, 1), np.float32)], get_preset("cfws_kl"), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        quantize(model, variables, [np.full((2, 8, 8, 3), np.nan, np.float32)], get_preset("cfws_kl"), progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="a_bits"):
        QuantConfig(a_bits=1)


def test_input_of_the_wrong_rank_or_channels_is_rejected():
    arch = "repvgg_cifar_small"
    model = create_model(arch, deploy=True)
    params = numpy_init(model, (1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"cannot run on inputs of shape \(1, 32, 32, 4\)"):
        quantize(arch, params, [np.zeros((1, 32, 32, 4), np.float32)], get_preset("minmax"), progress=False)
    with pytest.raises(ValueError, match="cannot run on inputs of shape"):
        quantize(arch, params, [np.zeros((2, 32, 32), np.float32)], get_preset("minmax"), progress=False)
    with pytest.raises(ValueError, match=r"stage0/rbr_reparam: input of shape \(1, 0, 0, 3\) is too small"):
        quantize(arch, params, [np.zeros((1, 0, 0, 3), np.float32)], get_preset("minmax"), progress=False)


@pytest.mark.parametrize("rounding", ["half_even", "half_up"])
def test_int16_bias_codes_match_numpy_reference(rounding):
    model, variables = _tiny_params()
    qm = quantize(model, variables, [_images(4)], get_preset("cfws_kl", bias="int16", rounding=rounding),
                  progress=False)
    for name in ("stage0", "stage2_0"):
        b = np.asarray(variables["params"][name]["rbr_reparam"]["bias"], np.float32)
        q = qm.layers[f"{name}/rbr_reparam"]
        s = np.float32(np.abs(b).max() / np.float32(32767))
        t = b / s
        want = np.round(t) if rounding == "half_even" else np.floor(t + np.float32(0.5))
        assert q["b_codes"].dtype == np.int16 and np.abs(q["b_codes"]).max() == 32767
        np.testing.assert_array_equal(q["b_codes"], want.astype(np.int16))
        np.testing.assert_allclose(_dq_weights(qm)[f"{name}/rbr_reparam"]["bias"], b, atol=float(s) / 2 * 1.001)
