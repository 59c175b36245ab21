"""Block (multi-layer) reconstruction: cfws_jax.ptq.block_recon and the driver's YOLOv6 RepBlock units.

NumPy references: the hard unit forward (conv + ReLU + fake-quant links) and the unit loss of the
hardened codes; the driver's unit losses are recomputed from the slow per-layer captures.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax.models import create_model
from cfws_jax.ptq import get_preset, quantize
from cfws_jax.ptq import reconstruct as rec
from cfws_jax.ptq.adaround import TRACE_COUNTS, ReconConfig
from cfws_jax.ptq.block_recon import UnitLayer, reconstruct_unit, unit_output
from cfws_jax.ptq.graph import LayerInfo, discover_layers
from cfws_jax.ptq.model import layer_params, resolve_model
from cfws_jax.ptq.runtime import build_plan
from cfws_jax.ptq.weights import dequantize_layer, quantize_layer
from cfws_jax.quant import int_range
from conftest import numpy_init
from test_fusion import conv_ref

C, HW, N = 4, 6, 24


def _info(name: str, i: int) -> LayerInfo:
    return LayerInfo(name=name, kind="conv", kernel_shape=(3, 3, C, C), strides=1, padding=1, groups=1, act="relu",
                     rep=True, use_bias=True, in_shape=(1, HW, HW, C), out_shape=(1, HW, HW, C),
                     input_from=None, index=i)


def np_conv_relu(x, kernel, bias):
    y = conv_ref(np.transpose(x, (0, 3, 1, 2)).astype(np.float64), np.transpose(kernel, (3, 2, 0, 1)).astype(np.float64),
                 1, 1, 1)
    return np.maximum(np.transpose(y, (0, 2, 3, 1)) + bias, 0)


def np_fq(t, amax, qmax):
    s = np.float32(amax) / np.float32(qmax)
    return (np.clip(np.round(np.asarray(t, np.float32) / s), -qmax, qmax) * s).astype(np.float32)


def np_unit(layers, x, quantized):
    """The unit in NumPy: float kernels and no links, or dequantized codes with the links."""
    for u in layers:
        if quantized:
            d = dequantize_layer({k: np.asarray(v) for k, v in u.q.items()})
            k, b = d["kernel"], d["bias"]
        else:
            k, b = np.asarray(u.kernel), np.asarray(u.bias)
        x = np_conv_relu(x, k, b).astype(np.float32)
        if quantized and u.link is not None:
            x = np_fq(x, u.link[0], u.link[1])
    return x


@functools.lru_cache(maxsize=None)
def toy(w_bits=4, schemes=("cfws", "plain", "cfws")):
    """Three chained 3x3 conv + ReLU layers (random float weights), quantized to ``w_bits``, with
    8-bit links at each inner output's max; inputs ``x_fp`` and a perturbed ``x_q`` ``[N, 6, 6, 4]``."""
    rng = np.random.default_rng(5)
    cfg = get_preset("cfws_kl", w_bits=w_bits)
    x_fp = np.maximum(rng.normal(0.3, 1, (N, HW, HW, C)), 0).astype(np.float32)
    x_q = (x_fp + rng.normal(0, 0.05, x_fp.shape)).astype(np.float32)
    layers, h = [], x_fp
    for i, scheme in enumerate(schemes):
        k = (rng.normal(0, 1, (3, 3, C, C)) / np.sqrt(9 * C)).astype(np.float32)
        k[1, 1] += np.eye(C, dtype=np.float32) * 0.8  # an identity-branch-like centre tap
        b = rng.normal(0, 0.1, C).astype(np.float32)
        h = np_conv_relu(h, k, b).astype(np.float32)
        link = None if i == len(schemes) - 1 else (float(h.max()), 127.0, "half_even", False)
        layers.append(UnitLayer(_info(f"l{i}", i), quantize_layer(k, b, scheme, w_bits, cfg), k, b, w_bits, link))
    return layers, x_q, x_fp, np_unit(layers, x_fp, quantized=False)


def test_unit_forward_matches_numpy():
    layers, x_q, x_fp, y_fp = toy()
    np.testing.assert_allclose(unit_output(layers, x_fp), y_fp, rtol=1e-4, atol=1e-5)
    got = unit_output(layers, x_q, quantized=True)
    want = np_unit(layers, x_q, quantized=True)
    close = np.isclose(got, want, rtol=1e-4, atol=1e-4)
    assert close.mean() > 0.999  # a code at a rounding tie may flip between float64 and float32 sums


def test_unit_reconstruction_lowers_the_unit_error_and_is_deterministic():
    layers, x_q, x_fp, y_fp = toy()
    rcfg = ReconConfig(iters=200, batch_size=8, lr=1e-2, seed=3)
    before = TRACE_COUNTS["unit_train"]
    new_qs, st = reconstruct_unit(layers, x_q=x_q, x_fp=x_fp, y_fp=y_fp, in_quant=None, rcfg=rcfg)
    assert st["accepted"] and st["loss_after"] < st["loss_before"]
    lo, hi = int_range(4)
    changed = 0
    for u, q in zip(layers, new_qs):
        assert sorted(q) == sorted(u.q)
        for k in u.q:
            a, b = np.asarray(u.q[k]), np.asarray(q[k])
            assert a.dtype == b.dtype and a.shape == b.shape
            if k in ("w_codes", "c_codes"):
                assert lo <= b.min() and b.max() <= hi
                changed += int(np.sum(a != b))
            else:
                np.testing.assert_array_equal(a, b)  # scales and biases never change
    assert changed > 0
    # the reported losses are those of the stored codes (NumPy unit, per element MSE)
    for qs, key in ((layers, "loss_before"), ([u._replace(q=q) for u, q in zip(layers, new_qs)], "loss_after")):
        ref = np.mean((np_unit(qs, x_q, quantized=True).astype(np.float64) - y_fp) ** 2)
        np.testing.assert_allclose(st[key], ref, rtol=1e-3)
    # same seed, same codes and loss; one compile for the unit structure
    again, st2 = reconstruct_unit(layers, x_q=x_q, x_fp=x_fp, y_fp=y_fp, in_quant=None, rcfg=rcfg)
    for a, b in zip(new_qs, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert st2["loss_after"] == st["loss_after"]
    assert TRACE_COUNTS["unit_train"] - before <= 1


def test_unit_reconstruction_with_qdrop_and_mae_never_worse():
    layers, x_q, x_fp, y_fp = toy(w_bits=3, schemes=("plain", "plain"))
    for rcfg in (ReconConfig(iters=30, batch_size=8, lr=1e-2, qdrop_prob=0.5), ReconConfig(iters=30, loss="mae")):
        _, st = reconstruct_unit(layers, x_q=x_q, x_fp=x_fp, y_fp=y_fp, in_quant=(float(x_q.max()), 127.0, "half_even"),
                                 rcfg=rcfg)
        assert st["loss_after"] <= st["loss_before"]


def test_unit_zero_iterations_keep_round_to_nearest():
    from cfws_jax.cfws import CFWSConfig, cfws_quantize, plain_quantize

    layers, x_q, x_fp, y_fp = toy()
    qs, st = reconstruct_unit(layers, x_q=x_q, x_fp=x_fp, y_fp=y_fp, in_quant=None, rcfg=ReconConfig(iters=0))
    assert not st["accepted"] and st["loss_after"] == st["loss_before"] and st["seconds"] == 0.0
    ref = np.mean((np_unit(layers, x_q, quantized=True).astype(np.float64) - y_fp) ** 2)
    np.testing.assert_allclose(st["loss_before"], ref, rtol=1e-3)
    for u, q in zip(layers, qs):
        if "c_codes" in q:
            r = cfws_quantize(u.kernel, CFWSConfig(u.w_bits))
            np.testing.assert_array_equal(q["c_codes"], np.asarray(r.coarse_codes))
            np.testing.assert_array_equal(q["w_codes"], np.asarray(r.fine_codes))
        else:
            np.testing.assert_array_equal(q["w_codes"], np.asarray(plain_quantize(u.kernel, u.w_bits)[0]))


def test_unit_needs_links():
    layers = toy()[0]
    with pytest.raises(ValueError, match="a unit is >= 2 layers"):
        reconstruct_unit(layers[:1], x_q=np.zeros((1, HW, HW, C)), x_fp=np.zeros((1, HW, HW, C)),
                         y_fp=np.zeros((1, HW, HW, C)), in_quant=None, rcfg=ReconConfig())


# ----------------------------------------------------------------------------- the driver's units
ARCH, SIZE = "yolov6n_v3", 32


def _plan(**cfg):
    model = create_model(ARCH, deploy=True)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))
    return build_plan(discover_layers(model, shapes, (1, SIZE, SIZE, 3)), get_preset("cfws_kl", **cfg))


def test_units_are_the_repblocks():
    units = rec.recon_units(_plan())
    got = {first: [lp.info.name.split("/")[-2] for lp in u] for first, u in units.items()}
    # n-size v3: ERBlock_2_1 has 2 RepVGG blocks, ERBlock_3_1 4, ERBlock_4_1 6, ERBlock_5_1 2; neck Rep_* 4 each
    assert got["backbone/ERBlock_2_1/conv1/rbr_reparam"] == ["conv1", "block_0"]
    assert got["backbone/ERBlock_3_1/conv1/rbr_reparam"] == ["conv1", "block_0", "block_1", "block_2"]
    assert len(units["backbone/ERBlock_4_1/conv1/rbr_reparam"]) == 6
    assert all(len(u) >= 2 and all("/conv1/" in u[0].info.name for _ in [0]) for u in units.values())
    for u in units.values():  # a chain: each layer's input is the previous one's output
        for a, b in zip(u[:-1], u[1:]):
            assert b.info.input_from == a.info.name and a.out_point is not None and b.in_point is None
    assert rec.recon_units(_plan(), "layer") == {}
    # a float layer splits the unit; a lone remainder is no unit
    split = rec.recon_units(_plan(float_layers=("backbone/ERBlock_3_1/block_1/*",)))
    assert [lp.info.name.split("/")[-2] for lp in split["backbone/ERBlock_3_1/conv1/rbr_reparam"]] == ["conv1", "block_0"]
    assert "backbone/ERBlock_3_1/block_2/rbr_reparam" not in split
    # RepVGG / MobileOne deploy forms: one layer is one block
    model = create_model("repvgg_a0_cifar", deploy=True)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert rec.recon_units(build_plan(discover_layers(model, shapes, (1, 32, 32, 3)), get_preset("cfws_kl"))) == {}


@functools.lru_cache(maxsize=None)
def _detector_run(unit: str, bias_correction: bool = False):
    model = create_model(ARCH)
    variables = numpy_init(model, (1, SIZE, SIZE, 3), seed=0, train=False)
    x = np.random.default_rng(1).uniform(0, 1, (6, SIZE, SIZE, 3)).astype(np.float32)
    cfg = get_preset("cfws_kl_recon", w_bits=4, recon_iters=12, recon_batch_size=4, recon_lr=1e-2, recon_unit=unit,
                     bias_correction=bias_correction, calib_batch_size=3,
                     float_layers=("neck/*", "head/*", "backbone/ERBlock_4*", "backbone/ERBlock_5*"))
    return variables, [x[:3], x[3:]], quantize(ARCH, variables, [x[:3], x[3:]], cfg, progress=False)


def test_driver_reconstructs_repblocks_jointly():
    variables, batches, qm = _detector_run("block")
    stats = qm.meta["reconstruction"]
    first, inner = "backbone/ERBlock_3_1/conv1/rbr_reparam", "backbone/ERBlock_3_1/block_2/rbr_reparam"
    unit = stats[first]["unit"]
    assert unit[0] == first and inner in unit and stats[inner]["unit"] == unit
    assert stats[inner]["loss_after"] == stats[first]["loss_after"] and stats[inner]["seconds"] == 0.0
    assert "unit" not in stats["backbone/ERBlock_3_0/rbr_reparam"]  # a lone layer
    for s in stats.values():
        assert s["loss_after"] <= s["loss_before"]
    # wiring: the unit's losses, recomputed from the slow per-layer captures of the final model
    layers, got = recomputed_unit_loss(ARCH, variables, qm, first, batches)
    assert len(layers) == 4
    np.testing.assert_allclose(got, stats[first]["loss_after"], rtol=1e-3)


def recomputed_unit_loss(model, variables, qm, first, batches):
    """``(unit layers, loss)``: the unit starting at ``first``, its loss recomputed from the slow
    per-layer captures (:func:`rec.capture`) of the final model ``qm`` -- quantized unit on the
    quantized network's input (through the unit's ``:in`` point) against the float unit on the
    float network's input."""
    model, params = resolve_model(model, variables, None)[1:]
    plan = qm.plan
    units = rec.recon_units(plan)[first]
    fw = {lp.info.name: dict(layer_params(params, lp.info.name)) for lp in plan.layers}
    qw = {n: {k: jnp.asarray(v) for k, v in dequantize_layer(q).items()} for n, q in qm.layers.items()}
    P = len(plan.points)
    x_q = rec.capture(model, plan, first, qw, qm.act_amax, np.ones(P, bool), batches)
    x_fp = rec.capture(model, plan, first, {n: {k: jnp.asarray(v) for k, v in w.items()} for n, w in fw.items()},
                       qm.act_amax, np.zeros(P, bool), batches)
    st = {"plan": plan, "amax": np.asarray(qm.act_amax), "float_w": fw, "q_layers": dict(qm.layers)}
    layers = rec._unit_layers(units, st)
    y_fp = unit_output(layers, x_fp)
    lp0 = units[0]
    p = plan.points[lp0.in_point] if lp0.in_point is not None else None
    xin = x_q if p is None else np_fq(x_q, qm.act_amax[lp0.in_point], p.spec.qmax)
    return layers, np.mean((unit_output(layers, xin, quantized=True).astype(np.float64) - y_fp) ** 2)


def test_units_with_bias_correction_correct_every_layer():
    stats = _detector_run("block", True)[2].meta
    assert "backbone/ERBlock_3_1/block_2/rbr_reparam" in stats["bias_correction"]
    assert stats["reconstruction"]["backbone/ERBlock_3_1/block_2/rbr_reparam"]["unit"][0].endswith("conv1/rbr_reparam")


# ----------------------------------------------------------------------------- MobileOne: depthwise + pointwise
def _mobileone_plan(**cfg):
    model = create_model("mobileone_s0", deploy=True)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    return build_plan(discover_layers(model, shapes, (1, 64, 64, 3)), get_preset("cfws_kl_recon", **cfg))


def test_mobileone_units_are_depthwise_pointwise_pairs():
    plan = _mobileone_plan()
    units = rec.recon_units(plan)
    dw = [lp for lp in plan.layers if lp.info.groups > 1]
    assert len(dw) == 21 and sorted(units) == sorted(lp.info.name for lp in dw)
    for a, b in units.values():
        assert a.info.groups == a.info.in_shape[-1] > 1 and a.info.kernel_shape[:2] == (3, 3)
        assert b.info.groups == 1 and b.info.kernel_shape[:2] == (1, 1)
        assert b.info.input_from == a.info.name and a.out_point is not None and b.in_point is None
    assert rec.recon_units(plan, "layer") == {}
    # a float pointwise layer leaves its depthwise layer alone
    split = rec.recon_units(_mobileone_plan(float_layers=("stage2_1/*",)))
    assert "stage2_0/reparam_conv" not in split and len(split) == 20


def test_driver_reconstructs_mobileone_pairs_jointly():
    from cfws_jax.models.fuse import fuse
    from cfws_jax.models.mobileone import MobileOneConfig

    cfg = MobileOneConfig((0.25, 0.25, 0.25, 0.25), num_conv_branches=2, use_se=False, num_blocks=(1, 1, 2, 1),
                          num_classes=5, stem_stride=1, stage_strides=(1, 2, 2, 2))
    variables = fuse(cfg, numpy_init(create_model(cfg), (1, 16, 16, 3), seed=2))
    model = create_model(cfg, deploy=True)
    x = np.random.default_rng(3).normal(size=(6, 16, 16, 3)).astype(np.float32)
    batches = [x[:3], x[3:]]
    qcfg = get_preset("cfws_kl_recon", w_bits=4, recon_iters=12, recon_batch_size=4, calib_batch_size=3)
    qm = quantize(model, variables, batches, qcfg, progress=False)
    stats, plan = qm.meta["reconstruction"], qm.plan
    units = rec.recon_units(plan)
    assert len(units) == sum(lp.info.groups > 1 for lp in plan.layers) >= 4
    for first, (a, b) in units.items():
        assert stats[first]["unit"] == [a.info.name, b.info.name] == stats[b.info.name]["unit"]
        assert stats[b.info.name]["loss_after"] == stats[first]["loss_after"] <= stats[first]["loss_before"]
    # wiring: one pair's loss, recomputed from the slow per-layer captures of the final model
    first = sorted(units, key=lambda n: plan.layer(n).info.index)[1]
    layers, got = recomputed_unit_loss(model, variables, qm, first, batches)
    assert layers[0].info.groups > 1 and layers[0].link is not None and layers[1].link is None
    np.testing.assert_allclose(got, stats[first]["loss_after"], rtol=1e-3)
