"""PTQ of YOLOv6 detectors: per-layer schemes and quantization points of every variant, the
fake-quant forward (concatenation / upsample / SPPF points against a NumPy reference, grid
checks, closeness to float), save / restore, report and sensitivity, and the CLI
``ptq -> eval --task detect`` flow. Random weights (``numpy_init``), 64 px inputs."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax.models import create_model
from cfws_jax.ptq import get_preset, load_quantized, quantize, quantized_apply_fn, save_quantized
from cfws_jax.ptq.graph import discover_layers
from cfws_jax.ptq.report import (
    detection_agreement, format_report, layer_report, report_text, sensitivity, sensitivity_db,
)
from cfws_jax.ptq.runtime import build_plan, jitted_forward
from conftest import numpy_init, shared_data_dir
from test_fusion import conv_ref

HW = 64
ARCH = "yolov6n_v2"
PRED = re.compile(r"detect/(cls|reg|obj)_preds_\d$")

# rep (CFWS) convs: (backbone, neck); ALGORITHM.md §3.1 gives 35 for v2.0 t / s and 28 for v1.0 t
REP_COUNTS = {"yolov6n_v1": (19, 16), "yolov6t_v1": (16, 12), "yolov6s_v1": (19, 16),
              "yolov6n_v2": (19, 16), "yolov6t_v2": (19, 16), "yolov6s_v2": (19, 16),
              "yolov6n_v3": (19, 16), "yolov6s_v3": (19, 16)}
IN_POINTS_V12 = ["backbone/stem/rbr_reparam", "backbone/ERBlock_5_2/cv2/conv", "neck/Rep_p4/conv1/rbr_reparam",
                 "neck/Rep_p3/conv1/rbr_reparam", "neck/Rep_n3/conv1/rbr_reparam", "neck/Rep_n4/conv1/rbr_reparam"]
IN_POINTS_V3 = ["backbone/stem/rbr_reparam", "backbone/ERBlock_5_2/cv5/conv", "backbone/ERBlock_5_2/cv7/conv",
                "neck/Bifusion0/cv3/conv", "neck/Bifusion1/cv3/conv", "neck/Rep_n3/conv1/rbr_reparam",
                "neck/Rep_n4/conv1/rbr_reparam"]


def _deploy_plan(arch, preset="cfws_kl"):
    """Plan of the deploy-form model from shapes only (no compute)."""
    model = create_model(arch, deploy=True)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, HW, HW, 3))))
    return build_plan(discover_layers(model, shapes, (1, HW, HW, 3)), get_preset(preset))


@pytest.mark.parametrize("arch", sorted(REP_COUNTS))
def test_schemes_and_points_per_variant(arch):
    plan = _deploy_plan(arch)
    cfws = [lp for lp in plan.layers if lp.scheme == "cfws"]
    bb, nk = REP_COUNTS[arch]
    assert sum(lp.info.name.startswith("backbone/") for lp in cfws) == bb
    assert sum(lp.info.name.startswith("neck/") for lp in cfws) == nk
    for lp in plan.layers:
        info = lp.info
        # CFWS exactly on the rep 3x3 convs (backbone and neck); plain per-channel weights elsewhere
        assert (lp.scheme == "cfws") == info.rep, info.name
        assert lp.scheme in ("cfws", "plain"), info.name
        if info.rep:
            assert info.name.endswith("/rbr_reparam") and info.kernel_shape[:2] == (3, 3)
            assert info.act == "relu" and not info.name.startswith("detect/")
        # no output quantizer on the head prediction convs (their outputs are the network's)
        assert info.is_output == bool(PRED.search(info.name)), info.name
        if info.is_output:
            assert lp.out_point is None and info.act is None and info.kernel_shape[:2] == (1, 1)
            assert info.input_from is not None and plan.layer(info.input_from).out_point is not None
            continue
        out = plan.points[lp.out_point]
        assert out.name == f"{info.name}:out"
        # ReLU fusion only where the layer's activation is ReLU; SiLU and linear outputs: |t|, after act
        assert out.mode == ("relu" if info.act == "relu" else "abs"), info.name
        assert not out.before_act
        if info.name.startswith("detect/"):
            assert info.act == "silu"
        if info.name.endswith("upsample_transpose"):
            assert info.act is None and info.kernel_shape[:2] == (1, 1) and info.kernel_shape[-1] % 4 == 0
    ins = [p.layer for p in plan.points if p.name.endswith(":in")]
    assert ins == (IN_POINTS_V3 if arch.endswith("_v3") else IN_POINTS_V12)
    for lp in plan.layers:  # every other layer reads a quantized layer output
        if lp.in_point is None:
            assert plan.layer(lp.info.input_from).out_point is not None, lp.info.name
        else:
            assert lp.info.input_from is None
    # without ReLU fusion (minmax): ReLU layers are quantized before the ReLU, no CFWS
    plain = _deploy_plan(arch, "minmax")
    assert not any(lp.scheme == "cfws" for lp in plain.layers)
    assert all(p.mode == "abs" for p in plain.points)
    assert all(plain.points[lp.out_point].before_act == (lp.info.act == "relu")
               for lp in plain.layers if lp.out_point is not None)


# ----------------------------------------------------------------------------- one calibrated model
@pytest.fixture(scope="module")
def detector():
    """(float train-form model, its variables, 2 images, QuantizedModel cfws_kl W8A8)."""
    model = create_model(ARCH)
    variables = numpy_init(model, (1, HW, HW, 3), seed=0, train=False)
    x = np.random.default_rng(1).uniform(0, 1, (2, HW, HW, 3)).astype(np.float32)
    qm = quantize(ARCH, variables, [x], get_preset("cfws_kl"), progress=False)
    return model, variables, x, qm


def _fq(t, amax, qmax=127):
    s = np.float32(amax) / np.float32(qmax)
    return (np.clip(np.round(t / s), -qmax, qmax) * s).astype(np.float32)


def _conv_np(x, w, relu=True):
    """NumPy NHWC conv (stride 1, pad k//2) + bias (+ ReLU) with HWIO weights."""
    k = w["kernel"].shape[0]
    y = conv_ref(np.transpose(x, (0, 3, 1, 2)), np.transpose(w["kernel"], (3, 2, 0, 1)), 1, k // 2, 1)
    y = np.transpose(y, (0, 2, 3, 1)).astype(np.float32) + w["bias"]
    return np.maximum(y, 0) if relu else y


def _maxpool5_np(t):
    p = np.pad(t, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-np.inf)
    h, w = t.shape[1:3]
    return np.max([p[:, i:i + h, j:j + w] for i in range(5) for j in range(5)], axis=0)


def _d2s_np(y):
    b, h, w, c = y.shape
    o = c // 4
    out = np.zeros((b, 2 * h, 2 * w, o), y.dtype)
    for a in range(2):
        for bb in range(2):
            out[:, a::2, bb::2] = y[..., (2 * a + bb) * o:(2 * a + bb + 1) * o]
    return out


def _close_codes(got, want, amax):
    """Fake-quantized tensors agree to the code, allowing rare one-step flips from float-sum order."""
    d = np.abs(got - want) / (np.float32(amax) / 127)
    assert d.max() <= 1.0 + 1e-3 and np.mean(d > 0.5) < 0.01, (d.max(), np.mean(d > 0.5))


def test_points_against_numpy(detector):
    """Every ``:out`` point's tensor is on its grid; the concatenation (upsample + P4) and SimSPPF
    (max-pool chain) ``:in`` points match a NumPy re-computation from the upstream outputs."""
    _, _, x, qm = detector
    plan = qm.plan
    fwd = jitted_forward(create_model(ARCH, deploy=True), plan, return_outputs=True)
    on = jnp.ones((len(plan.points),), bool)
    outs = {k: np.asarray(v) for k, v in fwd(qm.dequantized_weights(as_jax=True), jnp.asarray(qm.act_amax),
                                             plan.qmax(), on, jnp.asarray(x))["outputs"].items()}
    amax = {p.name: float(a) for p, a in zip(plan.points, qm.act_amax)}
    for lp in plan.layers:
        if lp.out_point is None:
            continue
        t = outs[lp.info.name] / (amax[f"{lp.info.name}:out"] / 127)
        assert np.abs(t - np.round(t)).max() < 2e-3 and np.abs(t).max() <= 127 + 1e-3, lp.info.name
        if plan.points[lp.out_point].mode == "relu":
            assert outs[lp.info.name].min() >= 0
    w = qm.dequantized_weights()
    # neck/Rep_p4/conv1 reads cat[depth_to_space(upsample0), P4], re-quantized at its :in point
    name = "neck/Rep_p4/conv1/rbr_reparam"
    cat = np.concatenate([_d2s_np(outs["neck/upsample0/upsample_transpose"]),
                          outs["backbone/ERBlock_4_1/block_4/rbr_reparam"]], -1)
    want = _fq(_conv_np(_fq(cat, amax[f"{name}:in"]), w[name]), amax[f"{name}:out"])
    _close_codes(outs[name], want, amax[f"{name}:out"])
    # SimSPPF: cv2 reads cat[y, m(y), m2(y), m3(y)] of the quantized cv1 output
    y = outs["backbone/ERBlock_5_2/cv1/conv"]
    m1 = _maxpool5_np(y)
    m2 = _maxpool5_np(m1)
    name = "backbone/ERBlock_5_2/cv2/conv"
    cat = np.concatenate([y, m1, m2, _maxpool5_np(m2)], -1)
    want = _fq(_conv_np(_fq(cat, amax[f"{name}:in"]), w[name]), amax[f"{name}:out"])
    _close_codes(outs[name], want, amax[f"{name}:out"])


def test_fake_quant_close_to_float(detector):
    """W8A8 cfws_kl on random weights stays near the float decoded output (measured: box 12.8 dB,
    score 10.5 dB, cosines 0.990 / 0.956; random un-normalized weights, activations up to ~1e5);
    W16A16 is far closer (box 73 dB, score 50 dB: every point and weight path dequantizes right)."""
    model, variables, x, qm = detector
    yf = np.asarray(model.apply(variables, x, train=False))
    yq = np.asarray(quantized_apply_fn(qm)(x))
    assert yq.shape == yf.shape == (2, (8 * 8 + 4 * 4 + 2 * 2), 85)
    agree = detection_agreement(yf, yq, (HW, HW))
    assert agree["box_sqnr_db"] > 8 and agree["score_sqnr_db"] > 8, agree
    assert agree["box_cosine"] > 0.9 and agree["score_cosine"] > 0.9, agree
    qm16 = quantize(ARCH, variables, [x], get_preset("cfws_minmax", w_bits=16, a_bits=16), progress=False)
    agree16 = detection_agreement(yf, np.asarray(quantized_apply_fn(qm16)(x)), (HW, HW))
    assert agree16["box_sqnr_db"] > 40 and agree16["score_sqnr_db"] > 40, agree16


def test_deploy_form_variables_give_the_same_model(detector):
    from cfws_jax.models import fuse

    _, variables, x, qm = detector
    qd = quantize(ARCH, fuse(ARCH, variables), [x], get_preset("cfws_kl"), progress=False)
    assert qd.plan == qm.plan and qd.num_classes == qm.num_classes == 80
    np.testing.assert_array_equal(qd.act_amax, qm.act_amax)


def test_save_load_round_trip(detector, tmp_path):
    _, _, x, qm = detector
    save_quantized(qm, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    assert back.arch == ARCH and back.num_classes == 80 and back.plan == qm.plan
    a, b = np.asarray(quantized_apply_fn(qm)(x)), np.asarray(quantized_apply_fn(back)(x))
    np.testing.assert_array_equal(a, b)


def test_report_and_sensitivity(detector):
    _, variables, x, qm = detector
    rep = layer_report(qm, variables, x)
    t = rep["totals"]
    assert t["top1_agreement"] is None and t["images"] == 2
    for k in ("box_sqnr_db", "score_sqnr_db", "box_cosine", "score_cosine", "class_agreement"):
        assert k in t
    assert len(rep["layers"]) == len(qm.plan.layers)
    rows = {r["layer"]: r for r in rep["layers"]}
    assert "out_amax" not in rows["detect/cls_preds_0"] and rows["detect/cls_preds_0"]["scheme"] == "plain"
    assert rows["neck/Rep_p4/conv1/rbr_reparam"]["in_amax"] > 0
    assert rows["detect/stems_0/conv"]["out_mode"] == "abs"
    assert "decoded output: box SQNR" in format_report(rep)
    json.loads(report_text(rep, "r.json"))
    ranking = sensitivity(qm, variables, x)
    assert [r["layer"] for r in ranking] and len(ranking) == len(qm.plan.layers)
    db = [sensitivity_db(r) for r in ranking]
    assert db == sorted(db)
    assert all("logits_kl" not in r and r["output_sqnr_db"] == min(r["box_sqnr_db"], r["score_sqnr_db"])
               for r in ranking)


# ----------------------------------------------------------------------------- CLI
def test_cli_ptq_then_eval_detect(detector, tmp_path, capsys):
    """convert-free flow: random train-form variables -> ptq --arch yolov6n (alias) -> eval --task detect."""
    from cfws_jax.cli import main
    from cfws_jax.io import save_variables

    coco = shared_data_dir() / "coco128"
    if not (coco / "train2017").is_dir():
        pytest.skip(f"{coco} not present")
    _, variables, _, _ = detector
    params, q = tmp_path / "params", tmp_path / "q"
    save_variables(params, variables, {"arch": ARCH, "form": "train"})
    assert main(["ptq", "--arch", "yolov6n", "--params", str(params), "--calib-data", str(coco / "train2017"),
                 "--preset", "cfws_kl", "--out", str(q), "--num-calib", "2", "--image-size", str(HW),
                 "--keep-float", "2", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "letterbox 64x64" in cap.err and "most sensitive layers (kept in float)" in cap.err
    assert f"quantized {ARCH} with preset cfws_kl: 58 layers" in cap.out and "decoded output" in cap.out
    qm = load_quantized(q)
    assert sum(lp.scheme == "float" for lp in qm.plan.layers) == 2 and len(qm.config.float_layers) == 2
    assert main(["eval", "--task", "detect", "--arch", "yolov6n", "--quantized", str(q),
                 "--data", str(coco / "train2017"), "--annotations", str(coco / "annotations/instances_train2017.json"),
                 "--image-size", str(HW), "--limit", "3", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == 3 and set(res) >= {"mAP", "mAP50", "stats", "detections"}
