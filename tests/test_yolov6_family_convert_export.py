"""ONNX export of the YOLOv6 family's new pieces (cfws_jax.export): a four-level P6 head, BepC3
stages whose BottleReps scale their input by a learned ``alpha`` (a constant multiply in the
graph), conv-type basic blocks (SiLU / ReLU) and the v2.0 CSP PAN neck -- on tiny custom configs
(width 1/8) at 64 x 64, random deploy-form weights, 3 classes; the float graph must equal the
Flax deploy model (onnxruntime). Also: the official canvas / load sizes eval, ptq and export use.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import jax  # noqa: E402

from cfws_jax.detection import image_size_for, load_size_for  # noqa: E402
from cfws_jax.export import float_onnx  # noqa: E402
from cfws_jax.export.onnx_qdq import non_layer_params  # noqa: E402
from cfws_jax.models import create_model, get_config  # noqa: E402
from conftest import numpy_init  # noqa: E402

S = 64  # a multiple of the P6 stride 64
TINY = {  # registry configs shrunk to width 1/8, 3 classes
    "m6": dataclasses.replace(get_config("yolov6m6"), width=0.125, num_classes=3),
    "l_v2": dataclasses.replace(get_config("yolov6l_v2"), width=0.125, depth=0.33, num_classes=3),
    "m_v3": dataclasses.replace(get_config("yolov6m_v3"), width=0.125, depth=0.33, num_classes=3),
    "n6": dataclasses.replace(get_config("yolov6n6"), width=0.125, num_classes=3),  # EfficientRep6, no BottleRep
}


def _variables(cfg, seed: int = 0):
    v = numpy_init(create_model(cfg, deploy=True), (1, S, S, 3), seed=seed)

    def tweak(path, a):  # alpha away from 1 (LARGE §4.20 item 3)
        return np.full_like(a, 0.6 + 0.1 * seed) if str(getattr(path[-1], "key", "")) == "alpha" else a

    return jax.tree_util.tree_map_with_path(tweak, v)


@pytest.mark.parametrize("name", list(TINY))
def test_float_export_matches_flax(name):
    cfg = TINY[name]
    model = create_model(cfg, deploy=True)
    variables = _variables(cfg)
    alphas = [k for k in jax.tree_util.tree_flatten_with_path(non_layer_params(variables["params"], []))[0]
              if str(k[0][-1].key) == "alpha"]
    assert bool(alphas) == (name != "n6")  # BottleReps where the family has them
    proto = float_onnx(model, variables, image_size=S)
    onnx.checker.check_model(proto, full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).uniform(0, 1, (2, S, S, 3)).astype(np.float32)
    got = sess.run(["outputs"], {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
    apply = jax.jit(model.apply)
    want = np.asarray(apply(variables, x))
    levels = (8, 16, 32, 64) if cfg.p6 else (8, 16, 32)
    assert got.shape == want.shape == (2, sum((S // s) ** 2 for s in levels), 5 + 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
    if not alphas:
        return
    # alpha really is in the graph: another alpha changes the output
    other = _variables(cfg, seed=0)
    other = jax.tree_util.tree_map_with_path(
        lambda p, a: a * 1.5 if str(getattr(p[-1], "key", "")) == "alpha" else a, other)
    assert not np.allclose(np.asarray(apply(other, x)), want)
    if cfg.p6:
        assert "8, 16, 32, 64" in proto.doc_string


def test_official_sizes():
    """eval / ptq / export default canvas and load size per model (LARGE §4.11, QA §4.26)."""
    assert image_size_for("yolov6n6") == 1280 and image_size_for("yolov6m_v3") == 640
    sizes = {a: load_size_for(a) for a in ("yolov6m_v2", "yolov6l_v2", "yolov6l_relu_v2", "yolov6m_v3",
                                           "yolov6l_v3", "yolov6n6", "yolov6s6", "yolov6m6", "yolov6l6",
                                           "yolov6m_qa", "yolov6l_base")}
    assert sizes == {"yolov6m_v2": 628, "yolov6l_v2": 632, "yolov6l_relu_v2": 638, "yolov6m_v3": 636,
                     "yolov6l_v3": 636, "yolov6n6": 1263, "yolov6s6": 1272, "yolov6m6": 1216, "yolov6l6": 1239,
                     "yolov6m_qa": 638, "yolov6l_base": 638}
    assert load_size_for("yolov6n6", 1280) == 1263 and load_size_for("yolov6n6", 640) == 640
    assert load_size_for("yolov6s_v2", 640) == 638 and load_size_for("yolov6s_v2", 320) == 320
    from cfws_jax.export.onnx_qdq import _detector_size

    assert _detector_size("yolov6l6") == 1280 and _detector_size("yolov6l_v3") == 640


class _Stop(ValueError):
    pass


def test_eval_and_ptq_use_the_official_p6_canvas(monkeypatch, tmp_path, capsys):
    """``eval --task detect`` and ``ptq`` of a P6 model letterbox at 1280 with load 1263 (n6)
    unless told otherwise (the data source is replaced: only the sizes are checked)."""
    import cfws_jax.assets
    import cfws_jax.data
    import cfws_jax.data.coco
    from cfws_jax.cli import main

    seen = []

    def fake_source(*a, image_size=None, load_size=None, **k):
        seen.append((image_size, load_size))
        raise _Stop("stop")

    monkeypatch.setattr(cfws_jax.data.coco, "CocoSource", fake_source)
    monkeypatch.setattr(cfws_jax.data, "open_source", fake_source)
    monkeypatch.setattr(cfws_jax.assets, "load_params", lambda *a, **k: ({}, {"arch": "yolov6n6"}))
    ev = ["eval", "--task", "detect", "--arch", "yolov6n6", "--params", str(tmp_path), "--data", str(tmp_path),
          "--annotations", str(tmp_path / "a.json"), "--no-progress"]
    pq = ["ptq", "--arch", "yolov6n6", "--params", str(tmp_path), "--calib-data", str(tmp_path),
          "--out", str(tmp_path / "q"), "--no-progress"]
    for argv in (ev, ev + ["--image-size", "640"], pq, ev[:4] + ["yolov6m_v3"] + ev[5:]):
        assert main(argv) == 1 and "stop" in capsys.readouterr().err
    assert seen == [(1280, 1263), (640, 640), (1280, 1263), (640, 636)]


ORT_FAMILY = dict(TINY, qa=dataclasses.replace(get_config("yolov6s_qa"), width=0.125, num_classes=3),
                  qav2=dataclasses.replace(get_config("yolov6m_qav2"), width=0.125, depth=0.33, num_classes=3),
                  v1=dataclasses.replace(get_config("yolov6n_v1"), num_classes=3))


@pytest.mark.parametrize("name", list(ORT_FAMILY))
def test_onnxruntime_target_runs_every_fusable_conv_in_integers(name, tmp_path):
    """``export --target onnxruntime`` on every YOLOv6 family shape (P6, CSP / BepC3 with
    BottleRep alpha, QARepVGG V1 / V2, the v1.0 objectness head): onnxruntime's optimized graph
    holds one ``QLinearConv`` per ReLU-fused / linear quantized conv (two per CFWS layer) and a
    float conv only where the plan says so (SiLU epilogues, prediction convs), and its detections
    track the simulation's."""
    from test_export_onnx_ort import ORT_SEQ, expected_convs, nchw, optimized

    from cfws_jax.export import export_onnx
    from cfws_jax.ptq import quantize, quantized_apply_fn

    cfg = ORT_FAMILY[name]
    model = create_model(cfg, deploy=True)
    x = np.random.default_rng(1).uniform(0, 1, (3, S, S, 3)).astype(np.float32)
    qm = quantize(model, _variables(cfg), [x[:2]], ORT_SEQ, progress=False)
    s, ops = optimized(export_onnx(qm, model, target="onnxruntime"), tmp_path, name)
    integer, kept = expected_convs(qm)
    assert integer > 0
    assert ops["QLinearConv"] == integer, (ops, integer)
    assert ops["Conv"] + ops["FusedConv"] == kept, (ops, kept)
    got = s.run(["outputs"], {"input": nchw(x)})[0]
    want = np.asarray(quantized_apply_fn(qm, model)(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got[..., 4:], want[..., 4:], atol=0.05)  # confidences and class scores
    assert np.median(np.abs(got[..., :4] - want[..., :4])) < 0.5  # box pixels
