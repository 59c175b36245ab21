"""``export_onnx(..., target="onnxruntime")`` (issue #22): onnxruntime's CPU execution provider
runs every quantized conv of the exported file in an integer kernel, and the file computes what
the JAX fake-quant simulation of the ``*_ort`` presets computes.

Models (``cfws_minmax_ort`` with sequential calibration, which compiles faster): the shipped CIFAR RepVGG-A0 (16 calibration images), a small
MobileOne with SE and yolov6n_v3 at 128 x 128 (random weights, 2 calibration images). Each file
is loaded with ``SessionOptions.optimized_model_filepath`` set and the optimized graph's op types
are counted: no quantized conv may stay a float ``Conv`` / ``FusedConv`` except the ones the
layout keeps in float on purpose (SiLU / sigmoid convs, float-output convs; see
:mod:`cfws_jax.export.ort_conv`).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from cfws_jax.cli import main  # noqa: E402
from cfws_jax.export import export_onnx  # noqa: E402
from cfws_jax.models import create_model, get_config  # noqa: E402
from cfws_jax.models.fuse import fuse  # noqa: E402
from cfws_jax.models.mobileone import MobileOneConfig  # noqa: E402
from cfws_jax.ptq import get_preset, quantize, quantized_apply_fn  # noqa: E402
from cfws_jax.ptq.runtime import build_plan  # noqa: E402
from conftest import numpy_init, shared_file  # noqa: E402

ORT = get_preset("cfws_minmax_ort")
ORT_SEQ = ORT.replace(calib_order="sequential")  # small random models: layer-by-layer jits compile faster
CIFAR_IMAGES = 1000  # class-balanced CIFAR-10 test images (100 per class)
AGREEMENT = 0.995


def optimized(model_proto, tmp_path, name: str):
    """(session with default optimizations, op-type counts of the graph onnxruntime optimized)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    path = tmp_path / f"{name}.opt.onnx"
    so.optimized_model_filepath = str(path)
    s = ort.InferenceSession(model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s, collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def expected_convs(qm):
    """(integer convs, convs meant to stay float) of a plan in the onnxruntime layout."""
    integer = kept = 0
    for lp in qm.plan.layers:
        if lp.info.kind != "conv":
            continue
        fused_out = lp.out_point is not None and (lp.info.act is None or lp.info.act == "relu")
        if lp.scheme != "float" and fused_out:
            integer += 2 if lp.coarse_point is not None else 1
        else:
            kept += 1
    return integer, kept


def nchw(x):
    return np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2))


# ------------------------------------------------------------------ shipped CIFAR RepVGG-A0


@pytest.fixture(scope="module")
def cifar():
    from cfws_jax.assets import load_shipped_model
    from cfws_jax.data import open_source

    path = shared_file("cifar10_jpeg_yoongikim.npz")
    if not path.exists():
        pytest.skip(f"{path} not found")
    arch, variables, _ = load_shipped_model("repvgg_a0_cifar")
    calib, _ = open_source(str(path), split="train").load(np.arange(0, 50000, 50000 // 16))
    qm = quantize(arch, variables, [calib], ORT_SEQ, progress=False)
    xs, ys = zip(*open_source(str(path), split="test").iter_batches(500, limit=CIFAR_IMAGES, subset="balanced"))
    return qm, np.concatenate(xs), np.concatenate(ys)


def test_cifar_every_conv_is_an_integer_kernel(cifar, tmp_path):
    qm, _, _ = cifar
    _, ops = optimized(export_onnx(qm, target="onnxruntime"), tmp_path, "cifar")
    integer, kept = expected_convs(qm)
    assert kept == 0 and integer == 2 * len(qm.plan.layers[:-1])  # RepVGG-A0: every conv is CFWS
    assert ops["QLinearConv"] == integer
    assert ops["Conv"] == ops["FusedConv"] == ops["ConvInteger"] == 0
    assert ops["QLinearAdd"] == integer // 2  # every CFWS sum (with its ReLU) in integers


def test_cifar_top1_agrees_with_the_simulation(cifar, tmp_path, capsys):
    qm, x, y = cifar
    s, _ = optimized(export_onnx(qm, target="onnxruntime"), tmp_path, "cifar_agree")
    got = np.concatenate([s.run(["logits"], {"input": nchw(x[i:i + 250])})[0] for i in range(0, len(x), 250)])
    sim = quantized_apply_fn(qm)
    want = np.concatenate([np.asarray(sim(x[i:i + 250])) for i in range(0, len(x), 250)])
    agree = float((got.argmax(1) == want.argmax(1)).mean())
    with capsys.disabled():
        print(f"\nonnxruntime target vs simulation: top-1 agreement {agree:.4f}, accuracy "
              f"{(got.argmax(1) == y).mean():.3f} / {(want.argmax(1) == y).mean():.3f}")
    assert agree >= AGREEMENT


def test_cifar_first_layer_codes_match(cifar, tmp_path):
    """The first layer's output codes (the same input codes on both sides): a one-code flip of a
    CFWS branch moves the sum by about two output codes; anything else is a layout error."""
    import jax.numpy as jnp

    from cfws_jax.ptq.model import model_for
    from cfws_jax.ptq.runtime import make_forward

    qm, x, _ = cifar
    m = export_onnx(qm, target="onnxruntime")
    first = qm.plan.layers[0]
    prefix = first.info.name.replace("/", ".") + ".out"
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.name.startswith(prefix))
    m.graph.output.append(onnx.helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None))
    s, _ = optimized(m, tmp_path, "cifar_codes")
    got = s.run([dq.output[0]], {"input": nchw(x[:200])})[0]
    fwd = make_forward(model_for(qm, None), qm.plan, return_outputs=True)
    want = fwd(qm.dequantized_weights(as_jax=True), jnp.asarray(qm.act_amax), qm.plan.qmax(),
               jnp.ones((len(qm.plan.points),), bool), jnp.asarray(x[:200]))["outputs"][first.info.name]
    scale = float(qm.act_amax[first.out_point]) / 255.0
    diff = np.abs(np.round(got / scale) - np.round(nchw(want) / scale))
    assert diff.max() <= 2 and (diff > 0).mean() < 1e-4


def test_signed_relu_model_is_refused(cifar, tmp_path, capsys):
    from cfws_jax.assets import load_shipped_model
    from cfws_jax.ptq import save_quantized

    qm, x, _ = cifar
    arch, variables, _ = load_shipped_model("repvgg_a0_cifar")
    plain = quantize(arch, variables, [x[:4]], get_preset("cfws_minmax", calib_order="parallel"), progress=False)
    with pytest.raises(ValueError, match="cfws_kl_ort"):
        export_onnx(plain, target="onnxruntime")
    q = tmp_path / "q"
    save_quantized(plain, str(q))
    assert main(["export", "--quantized", str(q), "--out", str(tmp_path / "m.onnx"), "--target", "onnxruntime"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--preset cfws_kl_ort" in err
    save_quantized(qm, str(tmp_path / "q_ort"))
    assert main(["export", "--quantized", str(tmp_path / "q_ort"), "--out", str(tmp_path / "m.onnx"),
                 "--target", "onnxruntime"]) == 0
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)


# ------------------------------------------------------------------ small MobileOne, YOLOv6n


def _small_mobileone():
    cfg = MobileOneConfig((0.125, 0.125, 0.125, 0.125), num_conv_branches=2, use_se=True, num_blocks=(1, 1, 2, 1),
                          num_classes=5, stem_stride=1)
    v = numpy_init(create_model(cfg), (1, 16, 16, 3), seed=1)
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32)
    deploy = create_model(cfg, deploy=True)
    return deploy, quantize(deploy, fuse(cfg, v), [x[:4]], ORT_SEQ, progress=False), x, "logits"


def _yolov6n():
    from test_export_onnx_yolov6 import random_deploy_variables

    cfg = dataclasses.replace(get_config("yolov6n_v3"), num_classes=4)
    model = create_model(cfg, deploy=True)
    x = np.random.default_rng(1).uniform(0, 1, (3, 128, 128, 3)).astype(np.float32)
    return model, quantize(model, random_deploy_variables(model), [x[:2]], ORT_SEQ, progress=False), x, "outputs"


@pytest.mark.parametrize("build", [_small_mobileone, _yolov6n], ids=["mobileone_se", "yolov6n_v3"])
def test_small_models_integer_kernels_and_agreement(build, tmp_path):
    model, qm, x, out = build()
    m = export_onnx(qm, model, target="onnxruntime")
    s, ops = optimized(m, tmp_path, "small")
    integer, kept = expected_convs(qm)
    assert integer > 0
    assert ops["QLinearConv"] == integer
    assert ops["Conv"] + ops["FusedConv"] == kept
    got = s.run([out], {"input": nchw(x)})[0]
    want = np.asarray(quantized_apply_fn(qm, model)(x))
    if out == "logits":
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 0.1 * scale


def test_ort_presets_leave_depthwise_convs_plain():
    """``*_ort`` presets (``cfws_grouped=False``): the dense rep 3x3 convs (the MobileOne stem) are
    CFWS with branch points, the depthwise rep convs plain per-channel (one QLinearConv each);
    ``cfws_grouped=True`` splits them too."""
    model, qm, _, _ = _small_mobileone()
    rep3 = [lp for lp in qm.plan.layers if lp.info.rep and lp.info.kernel_shape[0] == 3 and lp.scheme != "float"]
    dense = [lp for lp in rep3 if lp.info.groups == 1]
    grouped = [lp for lp in rep3 if lp.info.groups > 1]
    assert dense and grouped
    assert all(lp.scheme == "cfws" and lp.coarse_point is not None for lp in dense)
    assert all(lp.scheme == "plain" and lp.coarse_point is None for lp in grouped)
    both = build_plan([lp.info for lp in qm.plan.layers], ORT_SEQ.replace(cfws_grouped=True))
    assert all(lp.scheme == "cfws" for lp in both.layers if lp.info.name in {g.info.name for g in grouped})


def test_kl_ort_is_one_integer_conv_per_layer(tmp_path):
    """``kl_ort`` (the layout without the CFWS split): one QLinearConv per conv, no QLinearAdd,
    and the file tracks its simulation."""
    model = create_model("repvgg_cifar_small", deploy=True)
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32)
    qm = quantize(model, numpy_init(model, (1, 16, 16, 3)), [x[:4]],
                  get_preset("kl_ort", calib_order="sequential"), progress=False)
    assert all(lp.scheme != "cfws" for lp in qm.plan.layers)
    s, ops = optimized(export_onnx(qm, model, target="onnxruntime"), tmp_path, "kl_ort")
    integer, kept = expected_convs(qm)
    assert ops["QLinearConv"] == integer == sum(lp.info.kind == "conv" for lp in qm.plan.layers) and kept == 0
    assert ops["QLinearAdd"] == 0 and ops["Conv"] == 0
    got = s.run(["logits"], {"input": nchw(x)})[0]
    want = np.asarray(quantized_apply_fn(qm, model)(x))
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
