"""PTQ of a YOLOv6 model whose deploy form has params outside its conv layers (issue 20: a
BottleRep's ``alpha``): a tiny m-style detector (BepC3 stages of BottleReps, every ``alpha``
away from 1) under cfws_kl W8A8. The non-layer params are collected once
(``QuantizedModel.extra_params``) and read by the fake-quant forward, the integer runtime, save /
load and the CLI ``ptq -> eval --task detect``; planting ``alpha = 1`` changes every output.
Random weights (``numpy_init``), 64 px inputs; the model is registered under a test-only name."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from cfws_jax.models import create_model, get_config, registry
from cfws_jax.ptq import get_preset, load_quantized, quantize, quantized_apply_fn, save_quantized
from cfws_jax.ptq.graph import non_layer_params
from cfws_jax.ptq.integer_runtime import integer_apply_fn
from cfws_jax.ptq.report import detection_agreement
from conftest import numpy_init, shared_data_dir

HW = 64
ARCH = "yolov6m_tiny_bottlerep"  # test-only registry name
TINY_M = dataclasses.replace(get_config("yolov6m_v3"), depth=0.1, width=0.125)  # 8 BottleReps, 76 layers


def _alphas(tree) -> dict:
    """``{path: alpha value}`` of every ``alpha`` leaf of a params tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat if jax.tree_util.keystr(k).endswith("['alpha']")}


def _planted(tree, value: float) -> dict:
    """``tree`` with every leaf (every ``alpha``) set to ``value``."""
    return jax.tree_util.tree_map(lambda v: np.full_like(np.asarray(v), value), tree)


@pytest.fixture(scope="module")
def tiny_m():
    """(deploy model, deploy params, 2 images, QuantizedModel cfws_kl W8A8), ``ARCH`` registered."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry._FAMILIES, ARCH, ("yolov6", TINY_M))
        model = create_model(ARCH, deploy=True)
        params = numpy_init(model, (1, HW, HW, 3), seed=0)["params"]
        paths = iter(range(100))
        params = jax.tree_util.tree_map_with_path(  # alpha alternately 0.5 / 1.6: far from 1
            lambda k, v: np.full_like(v, (0.5, 1.6)[next(paths) % 2]) if k[-1].key == "alpha" else v, params)
        x = np.random.default_rng(1).uniform(0, 1, (2, HW, HW, 3)).astype(np.float32)
        qm = quantize(ARCH, {"params": params}, [x], get_preset("cfws_kl"), progress=False)
        yield model, params, x, qm


def test_extra_params_are_the_alphas(tiny_m):
    _, params, _, qm = tiny_m
    want = _alphas(params)
    assert len(want) == 8 and {float(v[0]) for v in want.values()} == {0.5, np.float32(1.6)}
    got = _alphas(qm.extra_params)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert len(jax.tree_util.tree_leaves(qm.extra_params)) == 8  # nothing but the alphas
    assert non_layer_params(params, qm.plan.names + ["backbone", "neck"]) == {}


def test_fake_quant_close_to_float_and_alpha_matters(tiny_m):
    """W8A8 stays near float (as for n / s in test_ptq_detector); ``alpha = 1`` in the stored
    extra params moves the output far more than quantization does."""
    model, params, x, qm = tiny_m
    yf = np.asarray(model.apply({"params": params}, x))
    yq = np.asarray(quantized_apply_fn(qm)(x))
    assert yq.shape == yf.shape == (2, 8 * 8 + 4 * 4 + 2 * 2, 85)
    agree = detection_agreement(yf, yq, (HW, HW))
    assert agree["box_sqnr_db"] > 8 and agree["score_sqnr_db"] > 8, agree
    assert agree["box_cosine"] > 0.9 and agree["score_cosine"] > 0.9, agree
    yp = np.asarray(quantized_apply_fn(qm.replace(extra_params=_planted(qm.extra_params, 1.0)))(x))
    off = detection_agreement(yf, yp, (HW, HW))
    assert off["box_sqnr_db"] < agree["box_sqnr_db"] - 6 and off["score_sqnr_db"] < agree["score_sqnr_db"] - 6, off
    assert np.abs(yp - yq).max() > 3 * np.abs(yq - yf).max()  # measured: 0.39 vs 0.096 (box pixels)


def test_integer_runtime_agrees_with_the_simulation(tiny_m):
    """As ``test_integer_runtime.test_yolov6_detector_runs_in_integers`` does for n; the integer
    forward reads the stored alphas too."""
    _, _, x, qm = tiny_m
    out = np.asarray(integer_apply_fn(qm)(x))
    ref = np.asarray(quantized_apply_fn(qm)(x))
    assert out.shape == ref.shape and np.all(np.isfinite(out))
    np.testing.assert_allclose(out[..., 4:], ref[..., 4:], atol=0.05)
    assert np.median(np.abs(out[..., :4] - ref[..., :4])) < 0.5
    one = qm.replace(extra_params=_planted(qm.extra_params, 1.0))
    planted, planted_sim = np.asarray(integer_apply_fn(one)(x)), np.asarray(quantized_apply_fn(one)(x))
    # measured: alpha = 1 moves boxes by up to 0.39 px, the integer run stays within 1e-4 of the simulation
    assert np.abs(planted - planted_sim).max() < np.abs(planted - out).max() / 10


def test_parallel_calibration_and_refinement_read_alpha(tiny_m):
    """The other drivers that run the network: parallel calibration, bias correction and
    reconstruction (2 steps per layer) on the same images."""
    model, params, x, _ = tiny_m
    cfg = get_preset("cfws_kl_recon", calib_order="parallel", bias_correction=True, recon_iters=2)
    qm = quantize(model, {"params": params}, [x], cfg, progress=False)
    meta = qm.meta
    done = [lp.info.name for lp in qm.plan.layers if lp.scheme != "float"]
    assert sorted(meta["reconstruction"]) == sorted(done) and "neck/Rep_p4/m/conv1/conv2/rbr_reparam" in done
    agree = detection_agreement(np.asarray(model.apply({"params": params}, x)),
                                np.asarray(quantized_apply_fn(qm, model)(x)), (HW, HW))
    assert agree["box_sqnr_db"] > 8 and agree["score_sqnr_db"] > 8, agree


def test_save_load_round_trips_alpha(tiny_m, tmp_path):
    _, _, x, qm = tiny_m
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry._FAMILIES, ARCH, ("yolov6", TINY_M))
        save_quantized(qm, tmp_path / "q")
        back = load_quantized(tmp_path / "q")
        assert back.plan == qm.plan
        a, b = _alphas(qm.extra_params), _alphas(back.extra_params)
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
        np.testing.assert_array_equal(np.asarray(quantized_apply_fn(qm)(x)), np.asarray(quantized_apply_fn(back)(x)))
        # a file without them (as written before they were stored) is refused in one line
        save_quantized(qm.replace(extra_params={}), tmp_path / "old")
        with pytest.raises(ValueError, match="outside its conv layers") as e:
            load_quantized(tmp_path / "old")
        assert "\n" not in str(e.value)


def test_cli_ptq_then_eval_detect(tiny_m, tmp_path, capsys):
    from cfws_jax.cli import main
    from cfws_jax.io import save_variables

    coco = shared_data_dir() / "coco128"
    if not (coco / "train2017").is_dir():
        pytest.skip(f"{coco} not present")
    _, params, _, _ = tiny_m
    src, q = tmp_path / "params", tmp_path / "q"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry._FAMILIES, ARCH, ("yolov6", TINY_M))
        save_variables(src, {"params": params}, {"arch": ARCH, "form": "deploy"})
        assert main(["ptq", "--arch", ARCH, "--params", str(src), "--calib-data", str(coco / "train2017"),
                     "--preset", "cfws_kl", "--out", str(q), "--num-calib", "2", "--image-size", str(HW),
                     "--no-progress"]) == 0
        assert f"quantized {ARCH} with preset cfws_kl: 76 layers" in capsys.readouterr().out
        assert _alphas(load_quantized(q).extra_params).keys() == _alphas(params).keys()
        assert main(["eval", "--task", "detect", "--arch", ARCH, "--quantized", str(q),
                     "--data", str(coco / "train2017"),
                     "--annotations", str(coco / "annotations/instances_train2017.json"),
                     "--image-size", str(HW), "--limit", "2", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == 2 and "mAP" in res
