"""Bias correction and layer-wise reconstruction after calibration (issue #14): the driver
(``cfws_jax.ptq.reconstruct``), its wiring through ``quantize`` / QuantConfig / the CLI, and the
statistics in the saved model and the report.

One small network for every test, so the jitted pieces compile once: ``repvgg_cifar_small`` at
8x8, 12 calibration images in two batches, stages 2-4 kept float, so that three layers are
refined: ``stage0`` (CFWS 3x3 with the network input's ``:in`` point), ``stage1_0`` (CFWS 3x3 on
the quantized ``stage0`` output) and ``linear`` (plain dense with an ``:in`` point after the
pooling of a float layer's output).
"""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax.models import create_model
from cfws_jax.models.layers import QConv, QDense
from cfws_jax.ptq import PRESETS, QuantConfig, get_preset, load_quantized, quantize, quantized_apply_fn, save_quantized
from cfws_jax.ptq import reconstruct as rec
from cfws_jax.ptq.adaround import ReconConfig
from cfws_jax.ptq.model import resolve_model
from cfws_jax.ptq.runtime import jitted_forward
from conftest import numpy_init
from test_fusion import conv_ref

ARCH = "repvgg_cifar_small"
HW = 8
FLOAT = ("stage2*", "stage3*", "stage4*")
REFINED = ["stage0/rbr_reparam", "stage1_0/rbr_reparam", "linear"]
BASE = get_preset("cfws_kl", float_layers=FLOAT, calib_batch_size=6, recon_iters=40, recon_batch_size=4,
                  recon_lr=1e-2)


@functools.lru_cache(maxsize=None)
def variables():
    v = numpy_init(create_model(ARCH), (1, HW, HW, 3), seed=3, train=False)
    return jax.tree_util.tree_map(lambda a: np.array(a, np.float32), v)


@functools.lru_cache(maxsize=None)
def deploy():
    """(deploy model, float deploy params)."""
    _, model, params = resolve_model(ARCH, variables(), None)
    return model, jax.tree_util.tree_map(np.asarray, params)


def float_weights():
    _, params = deploy()
    out = {}
    for name, node in _walk(params):
        out[name] = {k: jnp.asarray(v) for k, v in node.items()}
    return out


def _walk(tree, prefix=""):
    if "kernel" in tree:
        yield prefix, tree
        return
    for k, v in tree.items():
        yield from _walk(v, f"{prefix}/{k}" if prefix else k)


CALIB = np.random.default_rng(11).normal(0.2, 1.0, (12, HW, HW, 3)).astype(np.float32)
BATCHES = [CALIB[:6], CALIB[6:]]


@functools.lru_cache(maxsize=None)
def run(**overrides):
    return quantize(ARCH, variables(), BATCHES, BASE.replace(**overrides), progress=False)


# ----------------------------------------------------------------------------- NumPy helpers
def np_kernel(q) -> np.ndarray:
    """Dequantized kernel (float64) from the stored codes, computed here."""
    if "kernel" in q:
        return np.asarray(q["kernel"], np.float64)
    k = np.asarray(q["w_codes"], np.float64) * np.asarray(q["w_scale"], np.float64)
    if "c_codes" in q:
        c = k.shape[0] // 2
        k[c, c] += np.asarray(q["c_codes"], np.float64) * np.asarray(q["c_scale"], np.float64)
    return k


def np_bias(q) -> np.ndarray:
    if "b_codes" in q:
        return np.asarray(q["b_codes"], np.float64) * np.float64(q["b_scale"])
    return np.asarray(q["bias"], np.float64)


def np_linear(info, x, kernel, bias) -> np.ndarray:
    """Pre-activation output (float64): NHWC conv via conv_ref (NCHW / OIHW) or x @ W."""
    x = np.asarray(x, np.float64)
    if info.kind == "dense":
        return x @ kernel + bias
    y = conv_ref(np.transpose(x, (0, 3, 1, 2)), np.transpose(kernel, (3, 2, 0, 1)), info.strides, info.padding,
                 info.groups)
    return np.transpose(y, (0, 2, 3, 1)) + bias


def np_fq(t, amax, qmax=127):
    s = np.float32(amax) / np.float32(qmax)
    return (np.clip(np.round(np.asarray(t, np.float32) / s), -qmax, qmax) * s).astype(np.float32)


def layer_inputs(qm, weights, enabled):
    """{layer: its input as the fake-quant forward computes it} from the forward's per-layer outputs
    (chain network: the previous layer's output; ``linear``: the mean over H, W of ``stage4_0``)."""
    model, _ = deploy()
    fwd = jitted_forward(model, qm.plan, return_outputs=True)
    P = len(qm.plan.points)
    outs = [fwd(weights, jnp.asarray(qm.act_amax), qm.plan.qmax(), jnp.full((P,), enabled), jnp.asarray(b))["outputs"]
            for b in BATCHES]
    names = qm.plan.names
    res = {names[0]: CALIB}
    for prev, name in zip(names[:-1], names[1:]):
        y = np.concatenate([np.asarray(o[prev]) for o in outs])
        res[name] = y.mean((1, 2)) if name == "linear" else y
    return res


# ----------------------------------------------------------------------------- config
def test_config_fields_presets_and_old_dicts():
    d = get_preset("cfws_kl").to_dict()
    for f in ("bias_correction", "bias_correction_z", "reconstruct", "recon_iters", "recon_batch_size", "recon_lr", "recon_reg_weight",
              "recon_loss", "recon_qdrop", "recon_act_step", "recon_unit"):
        d.pop(f)
    assert QuantConfig.from_dict(d) == get_preset("cfws_kl")  # a model saved before #14 loads unchanged
    assert PRESETS["cfws_kl_bc"] == PRESETS["cfws_kl"].replace(bias_correction=True)
    assert PRESETS["cfws_kl_recon"] == PRESETS["cfws_kl"].replace(reconstruct=True, num_calib_images=256)
    assert PRESETS["kl_recon"] == PRESETS["cfws_kl_recon"].replace(cfws=False)
    assert PRESETS["cfws_kl_u"] == PRESETS["cfws_kl"].replace(act_unsigned=True)
    assert PRESETS["cfws_kl_recon_u"] == PRESETS["cfws_kl_recon"].replace(act_unsigned=True)
    assert not any(PRESETS[p].reconstruct or PRESETS[p].bias_correction for p in ("minmax", "kl", "cfws_kl"))
    for bad in (dict(recon_loss="l1"), dict(recon_qdrop=1.0), dict(recon_iters=-1), dict(recon_batch_size=0),
                dict(recon_lr=0.0), dict(recon_reg_weight=-1.0), dict(recon_unit="stage")):
        with pytest.raises(ValueError, match="QuantConfig.recon_"):
            QuantConfig(**bad)
    cfg = QuantConfig(recon_iters=7, recon_batch_size=3, recon_lr=0.02, recon_reg_weight=0.5, recon_loss="mae",
                      recon_qdrop=0.25, recon_act_step=True, seed=5)
    assert rec.recon_config(cfg) == ReconConfig(iters=7, batch_size=3, lr=0.02, reg_weight=0.5, loss="mae",
                                                qdrop_prob=0.25, learn_act_step=True, seed=5)


# ----------------------------------------------------------------------------- capture
def test_capture_returns_the_tensors_the_fake_quant_forward_sees():
    qm = run()
    model, _ = deploy()
    P = len(qm.plan.points)
    rec._capture_jit.cache_clear()
    before = rec.TRACE_COUNTS["capture"]
    for weights, enabled in ((qm.dequantized_weights(as_jax=True), True), (float_weights(), False)):
        expect = layer_inputs(qm, weights, enabled)
        for name in qm.plan.names:
            got = rec.capture(model, qm.plan, name, weights, qm.act_amax, np.full((P,), enabled), BATCHES)
            assert got.shape == expect[name].shape and got.dtype == np.float32
            if name == "linear":  # pooled inside vs outside the jitted program
                np.testing.assert_allclose(got, expect[name], rtol=1e-6, atol=1e-6)
            else:
                np.testing.assert_array_equal(got, expect[name], err_msg=name)
    # one compile per captured layer, shared by the float and the quantized capture
    assert rec.TRACE_COUNTS["capture"] - before == len(qm.plan.names)


# ----------------------------------------------------------------------------- bias correction
@pytest.mark.parametrize("bias,z", [("float", 2.0), ("int16", 2.0), ("float", 0.0)])
def test_bias_correction_matches_numpy_reference(bias, z):
    """Per channel, the mean shift over images is subtracted where ``|mean| > z * std_err``
    (std_err over the per-image means, ddof=1); z = 0 corrects every channel."""
    rtn, bc = run(bias=bias), run(bias_correction=True, bias=bias, bias_correction_z=z)
    np.testing.assert_array_equal(bc.act_amax, rtn.act_amax)
    qi = layer_inputs(bc, bc.dequantized_weights(as_jax=True), True)  # upstream already corrected
    fi = layer_inputs(bc, float_weights(), False)
    _, params = deploy()
    kept = fixed = 0
    for lp in bc.plan.layers:
        name = lp.info.name
        q_bc, q_rtn = bc.layers[name], rtn.layers[name]
        if lp.scheme == "float":
            assert name not in bc.meta["bias_correction"]
            assert all(np.array_equal(q_bc[k], q_rtn[k]) for k in q_rtn)
            continue
        for k in q_rtn:  # bias correction changes biases only
            if k not in ("bias", "b_codes", "b_scale"):
                np.testing.assert_array_equal(q_bc[k], q_rtn[k], err_msg=f"{name} {k}")
        node = params
        for part in name.split("/"):
            node = node[part]
        w, b = np.asarray(node["kernel"], np.float64), np.asarray(node["bias"], np.float64)
        x_q = qi[name] if lp.in_point is None else np_fq(qi[name], bc.act_amax[lp.in_point])
        wq = np_kernel(q_bc)
        err = np_linear(lp.info, x_q, wq, np_bias(q_rtn)) - np_linear(lp.info, fi[name], w, b)
        per_image = err.reshape(err.shape[0], -1, err.shape[-1]).mean(1)  # [N, O]
        shift = per_image.mean(0)
        std_err = per_image.std(0, ddof=1) / np.sqrt(per_image.shape[0])
        assert np.min(np.abs(np.abs(shift) - z * std_err)) > 1e-4 * np.max(np.abs(shift))  # no borderline channel
        mask = np.abs(shift) > z * std_err
        kept, fixed = kept + int(np.sum(~mask)), fixed + int(np.sum(mask))
        st = bc.meta["bias_correction"][name]
        assert st["corrected"] == int(mask.sum())
        assert st["max_shift"] == pytest.approx(np.max(np.abs(shift)), rel=1e-3)
        assert set(st) == {"loss_before", "loss_after", "max_shift", "corrected", "seconds"}
        if bias == "float":  # exactly the significant channels change
            np.testing.assert_array_equal(np_bias(q_bc) != np_bias(q_rtn), mask, err_msg=name)
        # int16: the corrected float bias requantized (one half step of the fresh scale more)
        tol = 2e-5 * (np.max(np.abs(b)) + 1.0) + (0.5 * float(q_bc["b_scale"]) if bias == "int16" else 0.0)
        np.testing.assert_allclose(np_bias(q_bc), np_bias(q_rtn) - np.where(mask, shift, 0.0), rtol=0, atol=tol,
                                   err_msg=name)
        # after the correction the mean error of a corrected channel on the calibration set is ~0
        err2 = np_linear(lp.info, x_q, wq, np_bias(q_bc)) - np_linear(lp.info, fi[name], w, b)
        assert np.max(np.abs(err2.reshape(-1, err2.shape[-1]).mean(0)[mask]), initial=0.0) < tol
    assert fixed > 0 and (kept > 0) == (z > 0)  # z = 2 leaves some channels alone here, z = 0 none
    assert "reconstruction" not in bc.meta


@pytest.mark.parametrize("quant_field,recon_field,bad,want", [
    ("recon_iters", "iters", -1, ">= 0"), ("recon_batch_size", "batch_size", 0, ">= 1"), ("recon_lr", "lr", 0.0, "> 0"),
    ("recon_reg_weight", "reg_weight", -1.0, ">= 0"), ("recon_loss", "loss", "l1", "one of ('mse', 'mae')"),
    ("recon_qdrop", "qdrop_prob", 1.0, "in [0, 1)")])
def test_quant_and_recon_configs_share_one_check(quant_field, recon_field, bad, want):
    for cls, field in ((QuantConfig, quant_field), (ReconConfig, recon_field)):
        with pytest.raises(ValueError) as e:
            cls(**{field: bad})
        assert str(e.value) == f"{cls.__name__}.{field} must be {want}, got {bad!r}"


def test_significant_shift_rule():
    d = np.array([[1.0, 0.1, 5.0, 0.0], [1.2, -0.1, 5.0, 0.0], [0.8, 0.3, 5.0, 0.0]])  # [N=3 images, O=4]
    # means 1.0, 0.1, 5.0, 0; std_err 0.2/sqrt(3), 0.2/sqrt(3), 0, 0
    np.testing.assert_array_equal(rec.significant_shift(d, 2.0), [1.0, 0.0, 5.0, 0.0])
    np.testing.assert_array_equal(rec.significant_shift(d, 0.0), d.mean(0))
    np.testing.assert_array_equal(rec.significant_shift(d, 10.0), [0.0, 0.0, 5.0, 0.0])
    np.testing.assert_array_equal(rec.significant_shift(d[:1], 2.0), np.zeros(4))  # one image: no estimate
    np.testing.assert_array_equal(rec.significant_shift(d[:1], 0.0), d[0])
    with pytest.raises(ValueError, match="QuantConfig.bias_correction_z"):
        QuantConfig(bias_correction_z=-1.0)


def test_bias_correction_int16_requantizes_the_corrected_bias():
    i16 = run(bias_correction=True, bias="int16")
    for name in REFINED:
        q = i16.layers[name]
        assert q["b_codes"].dtype == np.int16 and "bias" not in q
        assert np.max(np.abs(q["b_codes"])) == 32767  # a fresh per-tensor scale: max|b| / 32767
        np.testing.assert_allclose(float(q["b_scale"]), np.max(np.abs(np_bias(q))) / 32767, rtol=1e-4)
    # stage0 has nothing upstream: the same correction as with float biases, up to the int16 step
    first = REFINED[0]
    np.testing.assert_allclose(np_bias(i16.layers[first]), run(bias_correction=True).layers[first]["bias"],
                               atol=float(i16.layers[first]["b_scale"]) + 1e-5)


# ----------------------------------------------------------------------------- reconstruction
def test_reconstruction_through_quantize(tmp_path):
    from cfws_jax.ptq.integer_runtime import integer_apply_fn
    from cfws_jax.ptq.report import format_report, layer_report

    rtn, qm = run(), run(reconstruct=True)
    stats = qm.meta["reconstruction"]
    assert sorted(stats) == sorted(REFINED)  # float layers are skipped
    changed = 0
    for lp in qm.plan.layers:
        name = lp.info.name
        q, q0 = qm.layers[name], rtn.layers[name]
        assert sorted(q) == sorted(q0)
        for k in q0:
            assert q[k].dtype == q0[k].dtype and q[k].shape == q0[k].shape
            if k in ("w_codes", "c_codes"):
                assert np.abs(q[k].astype(np.int64)).max() <= 127
                changed += int(np.sum(q[k] != q0[k]))
            else:  # scales and biases unchanged
                np.testing.assert_array_equal(q[k], q0[k], err_msg=f"{name} {k}")
        if name in stats:
            assert stats[name]["loss_after"] <= stats[name]["loss_before"]
            assert stats[name]["accepted"] == (stats[name]["loss_after"] < stats[name]["loss_before"])
    assert changed > 0 and any(s["accepted"] for s in stats.values())
    np.testing.assert_array_equal(qm.act_amax, rtn.act_amax)
    # deterministic for the seed: a second run gives the same codes and losses
    again = quantize(ARCH, variables(), BATCHES, BASE.replace(reconstruct=True), progress=False)
    for name in REFINED:
        for k in qm.layers[name]:
            np.testing.assert_array_equal(again.layers[name][k], qm.layers[name][k])
        assert again.meta["reconstruction"][name]["loss_after"] == stats[name]["loss_after"]
    # save / load keep the codes and the statistics; the integer path runs it
    save_quantized(qm, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    assert back.meta["reconstruction"] == stats and back.config == qm.config
    x = CALIB[:4]
    np.testing.assert_array_equal(np.asarray(quantized_apply_fn(back)(x)), np.asarray(quantized_apply_fn(qm)(x)))
    y_int = np.asarray(integer_apply_fn(back)(x))
    assert y_int.shape == (4, 10) and np.all(np.isfinite(y_int))
    # the report shows the block output error before / after
    report = layer_report(back, variables(), x)
    rows = {r["layer"]: r for r in report["layers"]}
    assert rows["stage0/rbr_reparam"]["recon_loss_before"] == stats["stage0/rbr_reparam"]["loss_before"]
    assert "recon_loss_after" not in rows["stage2_0/rbr_reparam"]
    text = format_report(report)
    assert "recon_loss_before" in text and "recon_loss_after" in text and "reconstruction" in text.splitlines()[-1]
    assert "recon_loss_before" not in format_report(layer_report(rtn, variables(), x))


def test_zero_iterations_and_flags_off_keep_round_to_nearest():
    rtn, zero = run(), run(reconstruct=True, recon_iters=0)
    assert "reconstruction" not in rtn.meta and "bias_correction" not in rtn.meta
    for name in rtn.layers:
        for k in rtn.layers[name]:
            np.testing.assert_array_equal(zero.layers[name][k], rtn.layers[name][k])
    assert all(not s["accepted"] and s["loss_after"] == s["loss_before"] and s["seconds"] == 0.0
               for s in zero.meta["reconstruction"].values())


def test_both_reconstruct_then_correct_bias():
    recon, both = run(reconstruct=True), run(reconstruct=True, bias_correction=True)
    assert sorted(both.meta["reconstruction"]) == sorted(both.meta["bias_correction"]) == sorted(REFINED)
    first = REFINED[0]  # nothing upstream: the same learned codes, then its bias corrected
    np.testing.assert_array_equal(both.layers[first]["w_codes"], recon.layers[first]["w_codes"])
    np.testing.assert_array_equal(both.layers[first]["c_codes"], recon.layers[first]["c_codes"])
    assert not np.array_equal(both.layers[first]["bias"], recon.layers[first]["bias"])
    st = both.meta["bias_correction"][first]
    assert st["loss_before"] == pytest.approx(both.meta["reconstruction"][first]["loss_after"], rel=1e-4)


def test_every_recon_field_reaches_reconstruct_layer(monkeypatch):
    """A stand-in for reconstruct_layer records what the driver passes and returns codes + 1
    (within range) and a learned ``:in`` amax; the driver must pass the config through and store both."""
    calls = []

    def spy(q, kernel, bias, *, info, act, x_q, x_fp, y_fp, in_quant, w_bits, config, rcfg):
        calls.append(dict(name=info.name, kernel=np.asarray(kernel), act=act, x_q=np.array(x_q), x_fp=np.array(x_fp),
                          y_fp=np.array(y_fp), in_quant=in_quant, w_bits=w_bits, rcfg=rcfg, config=config))
        new = dict(q)
        new["w_codes"] = np.clip(q["w_codes"].astype(np.int32) + 1, -127, 127).astype(q["w_codes"].dtype)
        st = {"loss_before": 2.0, "loss_after": 1.0, "seconds": 0.5, "accepted": True}
        if rcfg.learn_act_step and in_quant is not None:
            st["in_amax"] = 1.25
        return new, st

    monkeypatch.setattr(rec, "reconstruct_layer", spy)
    fields = dict(recon_iters=7, recon_batch_size=3, recon_lr=0.02, recon_reg_weight=0.5, recon_loss="mae",
                  recon_qdrop=0.25, recon_act_step=True, seed=5)
    cfg = BASE.replace(reconstruct=True, **fields)
    qm = quantize(ARCH, variables(), BATCHES, cfg, progress=False)
    rtn = quantize(ARCH, variables(), BATCHES, BASE.replace(seed=5), progress=False)
    assert [c["name"] for c in calls] == REFINED  # execution order, float layers skipped
    want = ReconConfig(iters=7, batch_size=3, lr=0.02, reg_weight=0.5, loss="mae", qdrop_prob=0.25,
                       learn_act_step=True, seed=5)
    qi = layer_inputs(qm, qm.dequantized_weights(as_jax=True), True)
    fi = layer_inputs(qm, float_weights(), False)
    model, P = deploy()[0], len(qm.plan.points)
    for c in calls:
        lp = qm.plan.layer(c["name"])
        assert c["rcfg"] == want and c["config"] == cfg and c["w_bits"] == 8 and c["act"] == lp.info.act
        if lp.in_point is None:
            assert c["in_quant"] is None
        else:  # the calibrated amax (the stand-in's learned value is stored afterwards)
            assert c["in_quant"] == (float(rtn.act_amax[lp.in_point]), 127.0, "half_even")
            assert qm.act_amax[lp.in_point] == np.float32(1.25)
            assert qm.meta["reconstruction"][c["name"]]["in_amax"] == 1.25
        # the inputs seen with the upstream layers already replaced (the one-pass driver's tensors
        # are bit for bit those of the jitted prefix captures), and the float target
        np.testing.assert_allclose(c["x_q"], qi[c["name"]], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(c["x_fp"], fi[c["name"]], rtol=1e-6, atol=1e-6)
        same = np.testing.assert_array_equal if c["name"] != "linear" else functools.partial(
            np.testing.assert_allclose, rtol=1e-6, atol=1e-7)  # linear: pooled eagerly vs inside jit
        same(c["x_q"], rec.capture(model, qm.plan, c["name"], qm.dequantized_weights(True), qm.act_amax,
                                   np.ones(P, bool), BATCHES))
        same(c["x_fp"], rec.capture(model, qm.plan, c["name"], float_weights(), qm.act_amax, np.zeros(P, bool),
                                    BATCHES))
        y = np_linear(lp.info, c["x_fp"], c["kernel"].astype(np.float64), np.asarray(float_weights()[c["name"]]["bias"]))
        y = np.maximum(y, 0) if lp.info.act == "relu" else y
        np.testing.assert_allclose(c["y_fp"], y, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(qm.layers[c["name"]]["w_codes"],
                                      np.clip(rtn.layers[c["name"]]["w_codes"].astype(np.int32) + 1, -127, 127))
    assert qm.meta["reconstruction"]["linear"] == {"loss_before": 2.0, "loss_after": 1.0, "seconds": 0.5,
                                                   "capture_seconds": pytest.approx(
                                                       qm.meta["reconstruction"]["linear"]["capture_seconds"]),
                                                   "accepted": True, "in_amax": 1.25}

    def bad(q, kernel, bias, **kw):  # a stand-in that changes a scale is refused with the layer's name
        return {**q, "w_scale": q["w_scale"] * 2}, {"loss_before": 1.0, "loss_after": 1.0, "seconds": 0.0}

    monkeypatch.setattr(rec, "reconstruct_layer", bad)
    with pytest.raises(ValueError, match="stage0/rbr_reparam: reconstruction changed w_scale"):
        quantize(ARCH, variables(), BATCHES, cfg, progress=False)


class TinySE(nn.Module):
    """A MobileOne-like SE block, then a depthwise conv and the pooled classifier (deploy form)."""

    @nn.compact
    def __call__(self, x):
        y = QConv(8, 3, rep=True, act="relu", name="conv")(x)
        s = QConv(2, 1, act="relu", name="se_reduce")(jnp.mean(y, axis=(1, 2), keepdims=True))
        s = QConv(8, 1, act="sigmoid", name="se_expand")(s)
        y = QConv(8, 3, groups=8, rep=True, act="relu", name="dw")(y * s)
        return QDense(5, name="linear")(jnp.mean(y, axis=(1, 2)))


def test_one_pass_on_an_se_block_matches_the_prefix_captures(monkeypatch):
    """Not a chain: the SE pooling, its sigmoid and the channel product feeding the depthwise
    conv's ``:in`` point. The one-pass driver hands every layer the tensors of :func:`capture`,
    and bias correction runs on the grouped conv."""
    model = TinySE()
    params = jax.tree_util.tree_map(np.asarray, numpy_init(model, (1, HW, HW, 3), seed=4)["params"])
    calls = {}

    def spy(q, kernel, bias, *, info, x_q, x_fp, **kw):
        calls[info.name] = (np.array(x_q), np.array(x_fp))
        return dict(q), {"loss_before": 1.0, "loss_after": 1.0, "seconds": 0.0}

    monkeypatch.setattr(rec, "reconstruct_layer", spy)
    qm = quantize(model, {"params": params}, BATCHES, get_preset("cfws_kl", reconstruct=True, bias_correction=True,
                                                                calib_batch_size=6), progress=False)
    assert list(calls) == qm.plan.names == ["conv", "se_reduce", "se_expand", "dw", "linear"]
    assert qm.plan.layer("dw").in_point is not None and qm.plan.layer("dw").scheme == "cfws"
    assert sorted(qm.meta["bias_correction"]) == sorted(calls)
    fw = {n: {k: jnp.asarray(v) for k, v in node.items()} for n, node in _walk(params)}
    P = len(qm.plan.points)
    for name in ("se_expand", "dw"):
        x_q, x_fp = calls[name]
        np.testing.assert_array_equal(x_q, rec.capture(model, qm.plan, name, qm.dequantized_weights(True),
                                                       qm.act_amax, np.ones(P, bool), BATCHES), err_msg=name)
        np.testing.assert_array_equal(x_fp, rec.capture(model, qm.plan, name, fw, qm.act_amax, np.zeros(P, bool),
                                                        BATCHES), err_msg=name)


def test_unsigned_relu_points_reach_reconstruction(monkeypatch):
    """With ``act_unsigned`` at 4 bits a layer reading a ReLU-fused point learns its rounding on
    inputs on the unsigned grid (codes 0..15, the previous layer's ``:out`` point); a layer with its
    own signed ``:in`` point (``linear``, after the pooling) gets qmax 7."""
    seen = {}

    def spy(q, kernel, bias, *, info, act, x_q, x_fp, y_fp, in_quant, w_bits, config, rcfg):
        seen[info.name] = (in_quant, np.array(x_q))
        return dict(q), {"loss_before": 1.0, "loss_after": 1.0, "seconds": 0.0, "accepted": False}

    monkeypatch.setattr(rec, "reconstruct_layer", spy)
    qm = quantize(ARCH, variables(), BATCHES, BASE.replace(reconstruct=True, act_unsigned=True, a_bits=4, w_bits=4,
                                                           recon_unit="layer"), progress=False)
    out = qm.plan.layer("stage0/rbr_reparam").out_point
    point = qm.plan.points[out]
    assert point.mode == "relu" and point.unsigned and qm.plan.layer("stage1_0/rbr_reparam").in_point is None
    in_quant, x_q = seen["stage1_0/rbr_reparam"]
    codes = x_q / (np.float32(qm.act_amax[out]) / np.float32(15))
    assert in_quant is None
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert codes.min() >= 0 and codes.max() > 7.5  # the upper half of the unsigned grid is used
    lin = qm.plan.points[qm.plan.layer("linear").in_point]
    assert not lin.unsigned and seen["linear"][0][1] == 7.0


# ----------------------------------------------------------------------------- CLI
def test_cli_recon_preset_end_to_end(tmp_path, capsys):
    from cfws_jax.cli import main
    from cfws_jax.io import save_variables

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=rng.integers(0, 256, (24, HW, HW, 3), dtype=np.uint8), y_train=rng.integers(0, 10, 24),
             x_test=rng.integers(0, 256, (8, HW, HW, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 8))
    params = tmp_path / "params"
    save_variables(params, variables(), {"arch": ARCH, "form": "train"})
    common = ["ptq", "--arch", ARCH, "--params", str(params), "--calib-data", str(data), "--num-calib", "12",
              "--calib-batch-size", "6", "--float-layers", *FLOAT, "--no-progress"]
    q, report = tmp_path / "q", tmp_path / "r.json"
    assert main([*common, "--preset", "cfws_kl_recon", "--iters", "40", "--recon-batch-size", "4", "--bias-correction",
                 "--bias-correction-z", "1.5", "--recon-unit", "layer", "--recon-act-step", "--act-unsigned",
                 "--out", str(q),
                 "--report", str(report)]) == 0
    out, err = capsys.readouterr()
    assert "recon_loss_after" in out and "reconstruction: 3 layers" in err and "bias correction: 3 layers" in err
    rep = json.loads(report.read_text())
    assert all("recon_loss_before" in r for r in rep["layers"] if r["layer"] in REFINED)
    qm = load_quantized(q)
    assert qm.config.reconstruct and qm.config.bias_correction and qm.config.recon_iters == 40
    assert qm.config.recon_batch_size == 4 and sorted(qm.meta["reconstruction"]) == sorted(REFINED)
    assert qm.config.recon_unit == "layer" and qm.config.bias_correction_z == 1.5 and qm.config.recon_act_step
    assert qm.config.act_unsigned and not get_preset("cfws_kl_recon").act_unsigned
    assert all(p.unsigned == (p.mode == "relu") for p in qm.plan.points)
    assert main(["eval", "--arch", ARCH, "--quantized", str(q), "--data", str(data), "--split", "test", "--json",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 8
    # errors are one line: tuning flags without reconstruction, a bad QDrop probability
    for extra, msg in ((["--preset", "cfws_kl", "--iters", "5"], "--iters: reconstruction options, but preset cfws_kl does not reconstruct"),
                       (["--preset", "cfws_kl_recon", "--qdrop", "1.5"], "--qdrop must be in [0, 1)"),
                       (["--preset", "cfws_kl_bc", "--recon-unit", "block"], "--recon-unit: reconstruction options"),
                       (["--preset", "cfws_kl", "--recon-act-step"], "--recon-act-step: reconstruction options"),
                       (["--preset", "cfws_kl", "--bias-correction-z", "1"], "--bias-correction-z: preset cfws_kl does not"),
                       (["--preset", "cfws_kl_bc", "--bias-correction-z", "-1"], "bias_correction_z must be")):
        assert main([*common, *extra, "--out", str(tmp_path / "q2")]) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("cfws-jax ptq: error: ") and msg in errors[0]
