"""One-pass sequential calibration (``calibrate_sequential``) against the per-point reference
(``calibrate_sequential_reference``, the whole network once per point): bit-identical amax for
one and several calibration batches, every amax method, ReLU fusion on and off; compiles scale
with the distinct layer structures, not with the number of points."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cfws_jax.models import create_model
from cfws_jax.models.mobileone import MobileOneConfig
from cfws_jax.ptq import calibrate as C
from cfws_jax.ptq import get_preset
from cfws_jax.ptq import model as M
from cfws_jax.ptq.graph import discover_layers
from cfws_jax.ptq.runtime import build_plan
from conftest import numpy_init

# two configs cover the five methods: rep-conv outputs / other outputs / the network input
CONFIGS = {
    "entropy_mse_percentile": get_preset("cfws_kl", act_method="entropy", other_act_method="mse",
                                         input_method="percentile"),
    "klcfws_max_nofusion": get_preset("cfws_kl", other_act_method="max", relu_fusion=False),
}
SMALL_MOBILEONE = MobileOneConfig((0.25, 0.25, 0.25, 0.25), num_conv_branches=2, use_se=True,
                                  num_blocks=(1, 1, 2, 1), num_classes=5, stem_stride=1, stage_strides=(1, 2, 2, 2))
HAS_YOLOV6 = importlib.util.find_spec("cfws_jax.models.yolov6") is not None


def _setup(arch, hw, n_batches, config, seed=0):
    """(model, plan, dequantized weights, batches) as ``quantize`` builds them."""
    from cfws_jax.ptq.weights import dequantize_layer, quantize_layer
    import jax.numpy as jnp

    model = create_model(arch, deploy=True)
    params = numpy_init(model, (1, hw, hw, 3), seed)["params"]
    x = np.random.default_rng(seed + 1).uniform(0, 1, (2 * n_batches, hw, hw, 3)).astype(np.float32)
    batches = [jnp.asarray(b) for b in np.split(x, n_batches)]
    plan = build_plan(discover_layers(model, {"params": params}, (1, hw, hw, 3)), config)
    weights = {}
    for lp in plan.layers:
        p = M.layer_params(params, lp.info.name)
        q = quantize_layer(p["kernel"], p.get("bias"), lp.scheme, lp.w_bits, config)
        weights[lp.info.name] = {k: jnp.asarray(v) for k, v in dequantize_layer(q).items()}
    return model, plan, weights, batches


def _check_equal(arch, hw, n_batches, config):
    model, plan, weights, batches = _setup(arch, hw, n_batches, config)
    ref = C.calibrate_sequential_reference(model, plan, weights, batches, config, progress=False)
    new = C.calibrate_sequential(model, plan, weights, batches, config, progress=False)
    assert ref.dtype == new.dtype == np.float32
    bad = [(p.name, p.method, float(a), float(b)) for p, a, b in zip(plan.points, ref, new) if a != b]
    assert not bad, bad
    assert {p.method for p in plan.points} <= set(C.calib.METHODS)
    return plan


@pytest.mark.parametrize("n_batches", [1, 3])
@pytest.mark.parametrize("cfg", sorted(CONFIGS))
def test_one_pass_equals_reference_repvgg(cfg, n_batches):
    _check_equal("repvgg_cifar_small", 16, n_batches, CONFIGS[cfg])


# The per-point reference costs one whole forward per point, so each larger family runs one
# (batches, config) pair: MobileOne 3 batches with kl_cfws/max, YOLOv6 1 batch with the others.
@pytest.mark.parametrize("n_batches", [3])
def test_one_pass_equals_reference_mobileone_with_se(n_batches):
    cfg = CONFIGS["entropy_mse_percentile" if n_batches == 1 else "klcfws_max_nofusion"]
    plan = _check_equal(SMALL_MOBILEONE, 16, n_batches, cfg)
    assert any("se" in p.name for p in plan.points)


@pytest.mark.skipif(not HAS_YOLOV6, reason="cfws_jax.models.yolov6 not present")
@pytest.mark.parametrize("n_batches", [1])
def test_one_pass_equals_reference_yolov6n(n_batches):
    # one config per batch count keeps the reference (hundreds of forwards) affordable
    cfg = CONFIGS["entropy_mse_percentile" if n_batches == 1 else "klcfws_max_nofusion"]
    _check_equal("yolov6n_v2", 64, n_batches, cfg)


def test_quantize_uses_the_one_pass_driver_and_codes_match(monkeypatch):
    from cfws_jax.ptq import quantize

    arch, cfg = "repvgg_cifar_small", CONFIGS["entropy_mse_percentile"]
    model = create_model(arch, deploy=True)
    params = numpy_init(model, (1, 16, 16, 3), 0)
    x = np.random.default_rng(3).uniform(0, 1, (6, 16, 16, 3)).astype(np.float32)
    new = quantize(arch, params, [x[:3], x[3:]], cfg, progress=False)
    monkeypatch.setattr(M, "calibrate_sequential", C.calibrate_sequential_reference)
    ref = quantize(arch, params, [x[:3], x[3:]], cfg, progress=False)
    np.testing.assert_array_equal(new.act_amax.view(np.uint32), ref.act_amax.view(np.uint32))
    for name in ref.layers:
        for k, v in ref.layers[name].items():
            np.testing.assert_array_equal(new.layers[name][k], v)


def test_compiles_scale_with_layer_structures_not_points():
    cfg = get_preset("cfws_kl")
    model, plan, weights, batches = _setup("repvgg_cifar_small", 16, 2, cfg)
    C.calibrate_sequential(model, plan, weights, batches, cfg, progress=False)  # warm every cache
    geoms = {(C._geometry(lp.info), lp.info.in_shape) for lp in plan.layers}
    shapes = {lp.info.in_shape for lp in plan.layers} | {lp.info.out_shape for lp in plan.layers}
    before = dict(C.TRACE_COUNTS)
    C.calibrate_sequential(model, plan, weights, batches, cfg, progress=False)
    assert C.TRACE_COUNTS == before  # a second calibration compiles nothing
    # from cold: at most one trace per distinct (layer geometry, input shape) and per tensor shape
    for f in (C._layer_fn, C._act_fn, C._max_fn, C._hist_fn, C._fq_fn):
        f.clear_cache()
    C.TRACE_COUNTS.update({k: 0 for k in C.TRACE_COUNTS})
    C.calibrate_sequential(model, plan, weights, batches, cfg, progress=False)
    n_points = len(plan.points)
    assert C.TRACE_COUNTS["layer"] <= len(geoms) < len(plan.layers)
    for k in ("max", "hist", "fq"):
        assert C.TRACE_COUNTS[k] <= 2 * len(shapes), k  # relu / abs statistic per shape
    assert C.TRACE_COUNTS["fq"] < n_points and C.TRACE_COUNTS["max"] < n_points


def test_errors_in_one_batch_reach_the_caller():
    cfg = get_preset("cfws_kl")
    model, plan, weights, batches = _setup("repvgg_cifar_small", 16, 3, cfg)
    batches[1] = batches[1].at[0, 0, 0, 0].set(np.nan)
    with pytest.raises(ValueError, match="NaN"):
        C.calibrate_sequential(model, plan, weights, batches, cfg, progress=False)
