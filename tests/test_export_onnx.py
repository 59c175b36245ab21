"""ONNX QDQ / float export (cfws_jax.export): graph structure, full onnx.checker, and numerical
agreement of onnxruntime (CPU) with the JAX fake-quant simulation and the Flax float model.

Two onnxruntime sessions are compared: ``reference`` (graph optimizations off: every
DequantizeLinear and Conv runs in float, i.e. the exact QDQ semantics) and ``optimized``
(default: onnxruntime fuses Q/DQ + Conv into integer kernels with its own requantization).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cfws_jax.cli import main  # noqa: E402
from cfws_jax.export import export_onnx, float_onnx  # noqa: E402
from cfws_jax.models import create_model  # noqa: E402
from cfws_jax.models.mobileone import MobileOneConfig  # noqa: E402
from cfws_jax.models.repvgg import RepVGGConfig  # noqa: E402
from cfws_jax.ptq import get_preset, quantize, quantized_apply_fn  # noqa: E402
from cfws_jax.ptq.model import nest_layers  # noqa: E402
from conftest import numpy_init  # noqa: E402

FAST = get_preset("cfws_minmax", calib_order="parallel")


def session(model_proto, optimized: bool = True):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model_proto, x_nhwc, optimized: bool = True, batch: int = 100):
    s = session(model_proto, optimized)
    x = np.ascontiguousarray(np.asarray(x_nhwc, np.float32).transpose(0, 3, 1, 2))
    return np.concatenate([s.run(["logits"], {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def nested(weights):
    """``{layer: {kernel, bias}}`` -> Flax ``{"params": ...}`` of device arrays."""
    return {"params": jax.tree_util.tree_map(jnp.asarray, nest_layers(weights))}


# ------------------------------------------------------------------ small synthetic networks

SMALL = {
    "repvgg_se": RepVGGConfig((1, 1, 1, 1), (8, 8, 16, 16, 32), use_se=True, num_classes=5, stem_stride=1,
                              stage_strides=(1, 2, 2, 1)),
    "mobileone_se": MobileOneConfig((0.125, 0.125, 0.125, 0.125), num_conv_branches=2, use_se=True,
                                    num_blocks=(1, 1, 2, 1), num_classes=5, stem_stride=1),
}


@pytest.fixture(scope="module", params=sorted(SMALL))
def small(request):
    cfg = SMALL[request.param]
    train = create_model(cfg)
    v = numpy_init(train, (1, 16, 16, 3), seed=1)
    x = np.random.default_rng(0).normal(size=(6, 16, 16, 3)).astype(np.float32)
    deploy = create_model(cfg, deploy=True)
    from cfws_jax.models.fuse import fuse

    qm = quantize(deploy, fuse(cfg, v), [x[:4]], FAST, progress=False)
    return request.param, deploy, qm, x


def test_small_qdq_structure_and_agreement(small):
    name, deploy, qm, x = small
    m = export_onnx(qm, deploy)
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") == len(qm.plan.points)  # one Q/DQ pair per activation point
    n_cfws = sum(lp.scheme == "cfws" for lp in qm.plan.layers)
    assert n_cfws >= 2 and ops.count("Add") == n_cfws  # centre 1x1 + fine kxk, added
    n_quant = sum(lp.scheme != "float" for lp in qm.plan.layers)
    inits = {t.name: t for t in m.graph.initializer}
    w_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None]
    assert len(w_dq) == n_quant + n_cfws  # every quantized weight, the CFWS centre too
    for n in w_dq:
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT8
        assert [a.i for a in n.attribute if a.name == "axis"] == [0]
    for n in m.graph.node:  # every conv / gemm reads a DequantizeLinear (or, kept-float, a float kernel)
        if n.op_type in ("Conv", "Gemm"):
            producer = {o: p.op_type for p in m.graph.node for o in p.output}
            assert producer.get(n.input[0]) in ("DequantizeLinear", "Slice", "Pad")
            assert producer.get(n.input[1]) == "DequantizeLinear" or n.input[1] in inits
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "NOT part of this graph" in m.doc_string
    sim = np.asarray(quantized_apply_fn(qm, deploy)(x))
    ref = run(m, x, optimized=False)
    np.testing.assert_allclose(ref, sim, atol=0.02 * np.abs(sim).max())  # exact QDQ semantics
    np.testing.assert_allclose(run(m, x[:1], optimized=False), ref[:1], rtol=1e-4, atol=1e-5)  # dynamic batch
    opt = run(m, x, optimized=True)
    assert np.abs(opt - sim).max() <= 0.1 * np.abs(sim).max()


def test_small_float_export_matches_flax(small):
    name, deploy, qm, x = small
    m = export_onnx(qm, deploy, float_export=True)
    onnx.checker.check_model(m, full_check=True)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
    y = np.asarray(deploy.apply(nested(qm.dequantized_weights()), x))
    np.testing.assert_allclose(run(m, x), y, atol=1e-4 * max(1.0, np.abs(y).max()))


def test_centre_crop_when_padding_is_not_k_over_2():
    """A CFWS conv with pad 0 (a valid 3x3): the centre 1x1 reads the input cropped by 1."""
    import flax.linen as nn

    from cfws_jax.models.layers import QConv, QDense

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = QConv(8, 3, 1, 1, act="relu", rep=True, name="a")(x)
            x = QConv(8, 3, 2, 0, act="relu", rep=True, name="b")(x)
            x = QConv(8, 3, 1, 2, act="relu", rep=True, name="c")(x)
            return QDense(3, name="linear")(jnp.mean(x, axis=(1, 2)))

    net = Net()
    v = numpy_init(net, (1, 11, 11, 3), seed=2)
    x = np.random.default_rng(1).normal(size=(3, 11, 11, 3)).astype(np.float32)
    qm = quantize(net, v, [x], FAST, progress=False)
    assert [lp.scheme for lp in qm.plan.layers] == ["cfws", "cfws", "cfws", "plain"]
    m = export_onnx(qm, net)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Slice") == 1 and ops.count("Pad") == 1
    sim = np.asarray(quantized_apply_fn(qm, net)(x))
    np.testing.assert_allclose(run(m, x, optimized=False), sim, atol=0.02 * np.abs(sim).max())


# ------------------------------------------------------------------ real networks (shared data)


def test_shipped_cifar_model_onnx_vs_simulation(shared_data, capsys):
    from cfws_jax.assets import load_shipped_model
    from cfws_jax.data.preprocess import CIFAR10

    from cfws_jax.data import calibration_indices
    from cfws_jax.data.source import subset_indices

    with np.load(shared_data("cifar10_jpeg_yoongikim.npz")) as z:  # sorted by class: pick balanced / random
        test = subset_indices(len(z["y_test"]), 300, z["y_test"])  # 30 per class
        x, labels = CIFAR10(z["x_test"][test]), z["y_test"][test]
        calib = CIFAR10(z["x_train"][np.sort(calibration_indices(len(z["y_train"]), 32, 0))])
    arch, v, _ = load_shipped_model("repvgg_a0_cifar")
    qm = quantize(arch, v, [calib], get_preset("cfws_kl"), progress=False)
    m = export_onnx(qm)
    sim = np.asarray(quantized_apply_fn(qm)(x))
    ref, opt = run(m, x, optimized=False), run(m, x, optimized=True)
    top = sim.argmax(1)
    with capsys.disabled():
        for kind, y in (("reference", ref), ("optimized", opt)):
            print(f"\nrepvgg_a0_cifar cfws_kl, 300 class-balanced CIFAR test images, onnxruntime {kind}: max|dlogit| "
                  f"{np.abs(y - sim).max():.4f} (max|logit| {np.abs(sim).max():.2f}), top-1 agreement "
                  f"{(y.argmax(1) == top).mean():.4f}, acc {(y.argmax(1) == labels).mean():.4f} "
                  f"(sim {(top == labels).mean():.4f})")
    # thresholds: measured 0.46 / 0.45 (reference / optimized) max abs difference at max|logit| 43
    assert np.abs(ref - sim).max() <= 0.03 * np.abs(sim).max()
    assert np.abs(opt - sim).max() <= 0.05 * np.abs(sim).max()
    assert (ref.argmax(1) == top).mean() >= 0.99 and (opt.argmax(1) == top).mean() >= 0.98
    # the float export of the same network matches the Flax float model
    f = float_onnx(arch, v)
    y_float = np.asarray(create_model(arch).apply(v, x[:100]))
    np.testing.assert_allclose(run(f, x[:100]), y_float, atol=1e-4 * np.abs(y_float).max())


def test_mobileone_s0_golden_input(shared_data, capsys):
    from converters.convert import convert_state_dict

    with np.load(shared_data("mobileone_s0_deploy_awkrail.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    x = arrays.pop("_ref_input_apple_chw").transpose(1, 2, 0)[None].astype(np.float32)
    golden = arrays.pop("_ref_logits")
    v = convert_state_dict(arrays).variables
    qm = quantize("mobileone_s0", v, [x], FAST, progress=False)
    m = export_onnx(qm)
    assert sum(n.op_type == "Add" for n in m.graph.node) == 22  # stem + 21 depthwise CFWS convs
    sim = np.asarray(quantized_apply_fn(qm)(x))[0]
    ref, opt = run(m, x, optimized=False)[0], run(m, x, optimized=True)[0]

    def cos(a, b):
        return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))

    with capsys.disabled():
        for kind, y in (("reference", ref), ("optimized", opt)):
            print(f"\nmobileone_s0 cfws_minmax, golden input, onnxruntime {kind}: max|dlogit| "
                  f"{np.abs(y - sim).max():.4f} (max|logit| {np.abs(sim).max():.2f}), cosine {cos(y, sim):.5f}, "
                  f"top-1 {int(y.argmax())} (sim {int(sim.argmax())})")
    assert int(ref.argmax()) == int(opt.argmax()) == int(sim.argmax()) == 957
    # a single flipped code in an early layer multiplies through MobileOne's 28 layers; the
    # reference session measured cosine 0.988, the optimized (integer kernels) ~0.95
    assert cos(ref, sim) > 0.98 and cos(opt, sim) > 0.9
    f = float_onnx("mobileone_s0", v)
    np.testing.assert_allclose(run(f, x)[0], golden, atol=1e-4 * np.abs(golden).max())


# ------------------------------------------------------------------ command line


def test_cli_export(small, tmp_path, capsys):
    from cfws_jax.ptq import save_quantized

    name, deploy, qm, x = small
    if name != "repvgg_se":
        pytest.skip("one network is enough for the command line")
    # a registry architecture is needed to save: the shipped CIFAR network's tiny sibling
    arch = "repvgg_cifar_small"
    v = numpy_init(create_model(arch), (1, 32, 32, 3))
    xs = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    q = save_quantized(quantize(arch, v, [xs], FAST, progress=False), tmp_path / "q")
    out = tmp_path / "m.onnx"
    assert main(["export", "--quantized", str(q), "--out", str(out)]) == 0
    assert onnx.load(str(out)).graph.node
    capsys.readouterr()
    assert main(["export", "--quantized", str(q), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err
    assert main(["export", "--quantized", str(q), "--out", str(out), "--float", "--overwrite"]) == 0
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
    assert main(["export", "--params", "shipped:repvgg_a0_cifar", "--out", str(tmp_path / "f.onnx")]) == 0
    assert main(["export", "--quantized", str(q), "--out", str(tmp_path / "x.txt")]) == 1
    assert "onnx" in capsys.readouterr().err
