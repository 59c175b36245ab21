"""YOLOv6 M / L / L-ReLU / base / P6 / QARepVGG Flax detectors (FORMATS_YOLOV6_LARGE.md §4.11-4.20,
FORMATS_YOLOV6_QA.md) against PyTorch peers (tests/yolov6_torch.py: the ``yolov6detect`` classes,
QARepVGG blocks emulated from the spec).

Per variant, one torch build (every weight, BN statistic and ``alpha`` random), mapped to Flax by
module type (``yolov6_torch.to_flax_variables``, independent of ``converters``): the variable tree
equals the Flax model's, the key counts equal LARGE §4.17.1 / QA §4.25, and the decoded
predictions of the Flax train form and of its fused deploy form (``cfws_jax.models.fuse``) match
PyTorch eval mode within 1e-3 relative with identical NMS survivors. Plus the registry (names,
aliases, resolved lists of LARGE §4.13), the fusion of the new nodes against slow NumPy
references, input-shape errors and the ``decode=False`` hook.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax.models import canonical_arch, create_model, fuse, get_config
from cfws_jax.models.layers import QConv
from cfws_jax.models.yolov6 import YOLOV6_CONFIGS, fuse_yolov6

torch = pytest.importorskip("torch")
pytest.importorskip("addict")
if importlib.util.find_spec("yolov6") is None:
    pytest.skip("yolov6detect not installed (pip install --no-deps yolov6detect==0.4.1)", allow_module_level=True)

import yolov6_torch as yt  # noqa: E402

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")
HW = 128  # P6 input side (a multiple of 64); P5 models run at HW_P5
HW_P5 = 64  # strides 8 / 16 / 32 -> 8x8, 4x4, 2x2 maps: every layer and padding case, 4x less compute
# XLA:CPU backend optimisation off: compiles 2x faster; convolutions run in library kernels anyway.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

FAMILY = ["yolov6m_v2", "yolov6l_v2", "yolov6l_relu_v2", "yolov6m_base", "yolov6l_base", "yolov6m_v3",
          "yolov6l_v3", "yolov6n6", "yolov6s6", "yolov6m6", "yolov6l6", "yolov6n_qa", "yolov6s_qa",
          "yolov6m_qa", "yolov6n_qav2", "yolov6s_qav2", "yolov6m_qav2"]

# Every variant runs by default (all 17: about 160 CPU-s, 90 s on two workers, measured on the 2-core
# VM). CFWS_YOLOV6_FAMILY_QUICK=1 keeps one variant per code path (every basic block kind,
# backbone, neck, SPPF-family block, csp_e, DFL / ltrb head, 3 / 4 levels) for quick local runs.
QUICK = {"yolov6m_base", "yolov6m_v3", "yolov6l_v3", "yolov6n6", "yolov6m6", "yolov6n_qa", "yolov6n_qav2"}
SKIP_OTHERS = os.environ.get("CFWS_YOLOV6_FAMILY_QUICK") == "1"
PARITY_CASES = [n if n in QUICK else pytest.param(n, marks=pytest.mark.skipif(
    SKIP_OTHERS, reason="CFWS_YOLOV6_FAMILY_QUICK=1: one variant per code path")) for n in FAMILY]

# LARGE §4.13 "Resolved lists" (num_repeat, channels_list) and QA §4.26 (= the plain n / s / m v3).
RESOLVED = {
    "m": ((1, 4, 7, 11, 4, 7, 7, 7, 7), (48, 96, 192, 384, 768, 192, 96, 96, 192, 192, 384)),
    "l": ((1, 6, 12, 18, 6, 12, 12, 12, 12), (64, 128, 256, 512, 1024, 256, 128, 128, 256, 256, 512)),
    "m_base": ((1, 5, 10, 14, 5, 10, 10, 10, 10), (48, 96, 192, 384, 768, 192, 96, 96, 192, 192, 384)),
    "n6": ((1, 2, 4, 6, 2, 2, 4, 4, 4, 4, 4, 4), (16, 32, 64, 128, 192, 256, 128, 64, 32, 64, 128, 256)),
    "s6": ((1, 2, 4, 6, 2, 2, 4, 4, 4, 4, 4, 4), (32, 64, 128, 256, 384, 512, 256, 128, 64, 128, 256, 512)),
    "m6": ((1, 4, 7, 11, 4, 4, 7, 7, 7, 7, 7, 7), (48, 96, 192, 384, 576, 768, 384, 192, 96, 192, 384, 768)),
    "l6": ((1, 6, 12, 18, 6, 6, 12, 12, 12, 12, 12, 12),
           (64, 128, 256, 512, 768, 1024, 512, 256, 128, 256, 512, 1024)),
    "n": ((1, 2, 4, 6, 2, 4, 4, 4, 4), (16, 32, 64, 128, 256, 64, 32, 32, 64, 64, 128)),
    "s": ((1, 2, 4, 6, 2, 4, 4, 4, 4), (32, 64, 128, 256, 512, 128, 64, 64, 128, 128, 256)),
}
RESOLVED_OF = {"yolov6m_v2": "m", "yolov6l_v2": "l", "yolov6l_relu_v2": "l", "yolov6m_base": "m_base",
               "yolov6l_base": "l", "yolov6m_v3": "m", "yolov6l_v3": "l", "yolov6n6": "n6", "yolov6s6": "s6",
               "yolov6m6": "m6", "yolov6l6": "l6", "yolov6n_qa": "n", "yolov6s_qa": "s", "yolov6m_qa": "m",
               "yolov6n_qav2": "n", "yolov6s_qav2": "s", "yolov6m_qav2": "m"}
# torch state_dict keys, train form incl. BN buffers / upstream deploy (LARGE §4.17.1, QA §4.25);
# the l / l6 train counts are the 0.3.x ones (with the ConvWrapper conv biases).
KEYS = {"yolov6m_v2": (1152, 226), "yolov6l_v2": (962, 331), "yolov6l_relu_v2": (1887, 331),
        "yolov6m_base": (827, 286), "yolov6l_base": (962, 331), "yolov6m_v3": (1200, 242),
        "yolov6l_v3": (1010, 347), "yolov6n6": (998, 190), "yolov6s6": (998, 190), "yolov6m6": (1606, 326),
        "yolov6l6": (1356, 466), "yolov6n_qa": (606, 144), "yolov6s_qa": (606, 144), "yolov6m_qa": (960, 242),
        "yolov6n_qav2": (606, 144), "yolov6s_qav2": (606, 144), "yolov6m_qav2": (960, 242)}
# Deployed parameters without detect.proj* (LARGE §4.11 last column; QA §4.25 folded = plain).
DEPLOY_PARAMS = {"yolov6m_v2": 34_286_452, "yolov6l_v2": 58_541_033, "yolov6l_relu_v2": 58_541_033,
                 "yolov6m_base": 27_732_192, "yolov6l_base": 58_541_033, "yolov6m_v3": 34_855_924,
                 "yolov6l_v3": 59_607_529, "yolov6n6": 10_373_936, "yolov6s6": 41_394_448,
                 "yolov6m6": 79_640_080, "yolov6l6": 140_359_308, "yolov6n_qa": 4_646_940,
                 "yolov6s_qa": 18_537_276, "yolov6m_qa": 34_855_924, "yolov6n_qav2": 4_646_940,
                 "yolov6s_qav2": 18_537_276, "yolov6m_qav2": 34_855_924}


def _flat(tree, prefix=()):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, prefix + (k,)).items()}
    return {prefix: tree}


def image(hw: int = HW) -> np.ndarray:
    return yt.fixed_image(hw)


def _same_survivors(a, b, atol: float, what: str) -> None:
    """NMS survivors ``a`` and ``b`` pair up one-to-one: same class, boxes within ``atol`` (a
    matching, not a sort: near-equal coordinates may sort either way)."""
    ca, ba = np.asarray(a.classes), np.asarray(a.boxes, np.float64)
    cb, bb = np.asarray(b.classes), np.asarray(b.boxes, np.float64)
    assert len(cb) > 10 and len(ca) == len(cb), f"{what}: {len(ca)} vs {len(cb)} NMS survivors"
    free = np.ones(len(cb), bool)
    for c, box in zip(ca, ba):
        d = np.where(free & (cb == c), np.abs(bb - box).max(axis=1), np.inf)
        j = int(np.argmin(d))
        assert d[j] <= atol, f"{what}: survivor class {c} box {box} has no partner (closest {d[j]})"
        free[j] = False


def _conf_threshold(scores, lo: int = 100, hi: int = 200) -> float:
    """Official NMS, but with the confidence threshold (at least 0.25) in the widest score gap
    between the ``lo``-th and ``hi``-th best scores: random heads score most of the 80 x N
    candidates above 0.25, and thousands of near-tied overlapping boxes make NMS survivors
    depend on 1e-7 differences."""
    top = np.sort(scores.ravel())[::-1][:hi + 1]
    if len(top) <= lo or top[lo] < 0.25:
        return 0.25
    gaps = top[lo:hi] - top[lo + 1:hi + 1]
    j = lo + int(np.argmax(gaps))
    return max(0.25, float(top[j] + top[j + 1]) / 2)


def assert_parity(pred: np.ndarray, ref: np.ndarray, what: str) -> float:
    """Max abs diff <= 1e-3 x output max, scores within 1e-3, same NMS survivors; returns the relative error."""
    from cfws_jax.detection.nms import nms

    assert pred.shape == ref.shape, what
    scale = np.abs(ref).max()
    err = np.abs(pred - ref).max() / scale
    assert err <= 1e-3, f"{what}: max abs diff {err * scale} vs output max abs {scale}"
    assert np.abs(pred[..., 4:] - ref[..., 4:]).max() <= 1e-3, f"{what}: scores differ"
    conf = _conf_threshold(ref[0, :, 5:])
    _same_survivors(nms(pred[0], conf=conf), nms(ref[0], conf=conf), 1e-3 * scale, what)
    return float(err)


# ---------------------------------------------------------------- registry and configs


def test_registry_names_aliases_and_resolved_lists():
    assert set(FAMILY) <= set(YOLOV6_CONFIGS)
    for name in FAMILY:
        cfg = get_config(name)
        assert (cfg.num_repeat, cfg.channels_list) == RESOLVED[RESOLVED_OF[name]], name
        assert canonical_arch(name) == name
    for alias, recorded in [("yolov6m", "yolov6m_v2"), ("yolov6m", "yolov6m_v3"), ("yolov6l", "yolov6l_v3"),
                            ("yolov6l_relu", "yolov6l_relu_v2"), ("yolov6n", "yolov6n_v3")]:
        assert canonical_arch(alias, recorded) == recorded
    for single in ("yolov6n6", "yolov6s6", "yolov6m6", "yolov6l6", "yolov6m_base", "yolov6m_qa"):
        assert canonical_arch(single, "yolov6m_v3") == single
    with pytest.raises(ValueError, match="yolov6m_v2, yolov6m_v3"):
        canonical_arch("yolov6m")
    with pytest.raises(ValueError):
        canonical_arch("yolov6l", "yolov6l6")  # a P6 file is not a version of l
    kinds = {n: (get_config(n).backbone_kind, get_config(n).neck_kind) for n in FAMILY}
    assert kinds["yolov6m_v2"] == ("CSPBepBackbone", "CSPRepPANNeck")
    assert kinds["yolov6l_v3"] == ("CSPBepBackbone", "CSPRepBiFPANNeck")
    assert kinds["yolov6n6"] == ("EfficientRep6", "RepBiFPANNeck6")
    assert kinds["yolov6l6"] == ("CSPBepBackbone_P6", "CSPRepBiFPANNeck_P6")
    assert kinds["yolov6s_qa"] == ("EfficientRep", "RepBiFPANNeck")
    acts = {n: get_config(n).act for n in FAMILY}
    assert [n for n, a in acts.items() if a == "silu"] == ["yolov6l_v2", "yolov6l_v3", "yolov6l6"]
    with pytest.raises(ValueError, match="block"):
        dataclasses_replace(get_config("yolov6m_v3"), block="repopt")


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ---------------------------------------------------------------- parity with PyTorch


@functools.lru_cache(maxsize=None)
def _train_fuse_deploy(arch: str):
    """One compile per model: ``(train(v, x), fuse(v), deploy(fuse(v), x))``."""
    train, dep = create_model(arch), create_model(arch, deploy=True)

    def run(variables, x):
        fused = fuse(arch, variables)
        return train.apply(variables, x), fused, dep.apply(fused, x)

    return jax.jit(run, compiler_options=FAST)


PARITY: dict[str, tuple[float, float]] = {}  # name -> (train, deploy) max relative error, for the report


@pytest.mark.parametrize("name", PARITY_CASES)
def test_parity_train_and_fused_deploy(name):
    cfg = get_config(name)
    model = yt.build(name, seed=FAMILY.index(name))
    hw = HW if cfg.p6 else HW_P5
    x = image(hw)
    ref = yt.predict(model, x)
    assert ref.shape == (1, sum((hw // s) ** 2 for s in cfg.strides), 85)
    assert 1 < np.abs(ref[..., :4]).max() < 1e4 and np.ptp(ref[..., 5:]) > 0.5, "degenerate reference"

    variables = yt.to_flax_variables(model)
    alphas = [v for k, v in _flat(variables["params"]).items() if k[-1] == "alpha"]
    assert all(a.shape == (1,) and abs(a[0] - 1) > 0.1 for a in alphas)
    assert bool(alphas) == (cfg.csp_e is not None)
    # key counts of the peer and of the mapped tree = LARGE §4.17.1 / QA §4.25 (the Flax apply
    # below needs every one of its variables, so equal counts mean equal trees)
    n_stats = len(_flat(variables["batch_stats"]))
    assert len(model.state_dict()) == KEYS[name][0]
    assert len(_flat(variables["params"])) + n_stats * 3 // 2 + 2 == KEYS[name][0]  # + num_batches_tracked, proj*

    y_train, fused, y_dep = _train_fuse_deploy(name)(variables, jnp.asarray(x))
    flat = _flat(fused["params"])
    assert len(flat) + 2 == KEYS[name][1]  # QA: fully folded (= the plain model's keys)
    tconv_extra = 3 * sum(v.shape[-1] // 4 for k, v in flat.items() if k[-2:] == ("upsample_transpose", "bias"))
    assert sum(int(np.prod(v.shape)) for v in flat.values()) - tconv_extra == DEPLOY_PARAMS[name]
    PARITY[name] = (assert_parity(np.asarray(y_train), ref, f"{name} train"),
                    assert_parity(np.asarray(y_dep), ref, f"{name} deploy"))


def test_zz_report_parity():
    """Prints the per-variant errors collected above (``-s`` shows them)."""
    for name, (tr, dep) in PARITY.items():
        print(f"PARITY {name}: train {tr:.2e} deploy {dep:.2e}")


# ---------------------------------------------------------------- fusion of the new nodes (NumPy references)


def _np_fold(w, bn, eps=1e-3, bias=None):
    """Slow reference: per output channel o, ``w[..., o] * g/s`` and ``beta + (b - mu) * g/s``."""
    g, beta, mu, var = (np.asarray(a, np.float64) for a in bn)
    w = np.asarray(w, np.float64).copy()
    b = np.zeros(w.shape[-1]) if bias is None else np.asarray(bias, np.float64).copy()
    out_b = np.zeros(w.shape[-1])
    for o in range(w.shape[-1]):
        t = g[o] / np.sqrt(var[o] + eps)
        w[..., o] *= t
        out_b[o] = beta[o] + (b[o] - mu[o]) * t
    return w, out_b


def _np_qa(w3, bn_d, w1, bn_p, identity, avg):
    """QA §4.24 steps 1-5, one tap at a time."""
    k, b = _np_fold(w3, bn_d)
    cin, cout = k.shape[2:]
    for i in range(cin):
        for o in range(cout):
            k[1, 1, i, o] += w1[0, 0, i, o]
    if identity:
        for c in range(cout):
            k[1, 1, c, c] += 1.0
            if avg:
                for y in range(3):
                    for x in range(3):
                        k[y, x, c, c] += 1.0 / 9
    return _np_fold(k, bn_p, bias=b)


def _rand_bn(rng, c):
    return (rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.2, c), rng.uniform(0.5, 1.5, c))


def _bn_vars(bn):
    return {"scale": bn[0], "bias": bn[1]}, {"mean": bn[2], "var": bn[3]}


def _qa_vars(rng, cin, cout):
    w3, w1 = rng.normal(0, 0.3, (3, 3, cin, cout)), rng.normal(0, 0.3, (1, 1, cin, cout))
    bn_d, bn_p = _rand_bn(rng, cout), _rand_bn(rng, cout)
    (pd, sd), (pp, sp) = _bn_vars(bn_d), _bn_vars(bn_p)
    params = {"rbr_dense": {"conv": {"kernel": w3}, "bn": pd}, "rbr_1x1": {"kernel": w1}, "bn": pp}
    return params, {"rbr_dense": {"bn": sd}, "bn": sp}, (w3, bn_d, w1, bn_p)


@pytest.mark.parametrize("v2", [False, True])
def test_fuse_qa_convwrapper_alpha_vs_numpy(v2):
    """fuse_yolov6 on a tree with a stride-2 QA stem (3 -> 4), a stride-1 identity QA block (4 -> 4),
    a BottleRep (alpha + two ConvWrapper blocks with conv bias) and a Conv_C3-like conv+BN."""
    rng = np.random.default_rng(7)
    stem_p, stem_s, stem_raw = _qa_vars(rng, 3, 4)
    blk_p, blk_s, blk_raw = _qa_vars(rng, 4, 4)
    cw_w, cw_b, cw_bn = rng.normal(0, 0.3, (3, 3, 4, 4)), rng.normal(0, 0.3, 4), _rand_bn(rng, 4)
    c3_w, c3_bn = rng.normal(0, 0.3, (1, 1, 4, 2)), _rand_bn(rng, 2)
    (cwp, cws), (c3p, c3s) = _bn_vars(cw_bn), _bn_vars(c3_bn)
    bottle_p = {"alpha": np.array([0.7]), "conv1": {"block": {"conv": {"kernel": cw_w, "bias": cw_b}, "bn": cwp}}}
    bottle_s = {"conv1": {"block": {"bn": cws}}}
    params = {"backbone": {"stem": stem_p, "ERBlock_2_1": {"conv1": blk_p, "m": {"conv1": bottle_p},
                                                            "cv1": {"conv": {"kernel": c3_w}, "bn": c3p}}}}
    stats = {"backbone": {"stem": stem_s, "ERBlock_2_1": {"conv1": blk_s, "m": {"conv1": bottle_s}, "cv1": {"bn": c3s}}}}
    cfg = get_config("yolov6n_qav2" if v2 else "yolov6n_qa")
    out = jax.jit(lambda p, s: fuse_yolov6({"params": p, "batch_stats": s}, config=cfg))(params, stats)["params"]
    bb = out["backbone"]
    for got, raw, ident in ((bb["stem"], stem_raw, False), (bb["ERBlock_2_1"]["conv1"], blk_raw, True)):
        ref_k, ref_b = _np_qa(*raw, identity=ident, avg=v2)
        np.testing.assert_allclose(np.asarray(got["rbr_reparam"]["kernel"]), ref_k, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got["rbr_reparam"]["bias"]), ref_b, rtol=1e-5, atol=1e-5)
    m = bb["ERBlock_2_1"]["m"]["conv1"]
    assert float(m["alpha"][0]) == pytest.approx(0.7)
    ref_k, ref_b = _np_fold(cw_w, cw_bn, bias=cw_b)
    np.testing.assert_allclose(np.asarray(m["conv1"]["block"]["conv"]["kernel"]), ref_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m["conv1"]["block"]["conv"]["bias"]), ref_b, rtol=1e-5, atol=1e-6)
    ref_k, ref_b = _np_fold(c3_w, c3_bn)
    np.testing.assert_allclose(np.asarray(bb["ERBlock_2_1"]["cv1"]["conv"]["bias"]), ref_b, rtol=1e-5, atol=1e-6)
    # the V1 / V2 choice needs the config; a wrong alpha shape is named
    with pytest.raises(ValueError, match="backbone/stem is a QARepVGG block"):
        fuse_yolov6({"params": params, "batch_stats": stats})
    bad = {"backbone": {"m": {"alpha": np.ones((2,)), "conv1": bottle_p["conv1"]}}}
    with pytest.raises(ValueError, match=re.escape("backbone/m/alpha must have shape (1,), got (2,)")):
        fuse_yolov6({"params": bad, "batch_stats": {"backbone": {"m": bottle_s}}}, config=cfg)


@pytest.mark.parametrize("kind,stride", [("qarepvgg", 1), ("qarepvggv2", 1), ("qarepvggv2", 2), ("conv_silu", 2)])
def test_basic_block_train_vs_fused(kind, stride):
    """A lone basic block: train form on random variables == its fused deploy form (7x9 input)."""
    from cfws_jax.models.yolov6.blocks import basic_block
    from conftest import numpy_init
    import flax.linen as nn

    class Inner(nn.Module):  # fuse tells stride-2 QA blocks by name (stem, ERBlock_k_0)
        deploy: bool = False

        @nn.compact
        def __call__(self, x):
            return basic_block(kind, 4, stride, self.deploy, "stem" if stride == 2 else "conv1")(x)

    class One(nn.Module):
        deploy: bool = False

        @nn.compact
        def __call__(self, x):
            return Inner(self.deploy, name="backbone")(x)

    x = jnp.asarray(np.random.default_rng(1).normal(0, 1, (2, 7, 9, 4)), jnp.float32)
    variables = numpy_init(One(), x.shape, seed=3)
    cfg = dataclasses_replace(get_config("yolov6n_qa"), block=kind)
    y = One().apply(variables, x)
    y_dep = One(deploy=True).apply(fuse_yolov6(variables, config=cfg), x)
    np.testing.assert_allclose(np.asarray(y_dep), np.asarray(y), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- shapes, hook, layer attributes


def test_p6_input_must_be_a_multiple_of_64_and_decode_hook():
    model = create_model("yolov6n6", deploy=True)
    with pytest.raises(ValueError, match=re.escape("multiples of 64, got shape (1, 96, 128, 3)")):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 96, 128, 3)))
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 128, 3)))
    levels = jax.eval_shape(lambda v, x: model.apply(v, x, decode=False), v, jnp.zeros((1, 64, 128, 3)))
    assert [(c.shape, r.shape, o) for c, r, o in levels] == [
        ((1, 8 // s, 16 // s, 80), (1, 8 // s, 16 // s, 4), None) for s in (1, 2, 4, 8)]
    assert jax.eval_shape(model.apply, v, jnp.zeros((1, 64, 128, 3))).shape == (1, 128 + 32 + 8 + 2, 85)


def _qconvs(arch):
    model = create_model(arch, deploy=True)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    seen = {}

    def icpt(next_fun, args, kwargs, context):
        if isinstance(context.module, QConv) and context.method_name == "__call__":
            seen["/".join(context.module.path)] = context.module
        return next_fun(*args, **kwargs)

    import flax.linen as nn

    with nn.intercept_methods(icpt):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 64, 64, 3)))
    return seen


@pytest.mark.parametrize("arch,rep_layers", [("yolov6l_v3", 0), ("yolov6m_qa", 53), ("yolov6n6", 46)])
def test_cfws_candidates_and_activations(arch, rep_layers):
    """CFWS splits exactly the re-parameterized 3x3 convs (``rbr_reparam``, rep=True): RepVGG / QA
    basic blocks; conv-type basic blocks (l, l6, base) are plain biased convs. Activations per
    LARGE §4.12.8: basic blocks and BepC3 / SPPF follow the block (SiLU only for conv_silu), in the
    neck too (its ``Rep_*`` stages), the neck's ``reduce_layer*`` / ``downsample*`` / BiFusion convs
    are ReLU, the head SiLU."""
    silu = get_config(arch).block == "conv_silu"
    layers = _qconvs(arch)
    assert sum(m.rep for m in layers.values()) == rep_layers
    for path, m in layers.items():
        assert m.rep == path.endswith("rbr_reparam"), path
        if path.startswith("detect/") and not re.search(r"_preds_\d$", path):
            assert m.act == "silu", path
        elif path.startswith("neck/") and not path.startswith("neck/Rep_") and "upsample_transpose" not in path:
            assert m.act == "relu", path
        elif path.startswith(("backbone/", "neck/Rep_")):
            assert m.act == ("silu" if silu else "relu"), path

