"""Cross-layer equalization (issue #24): pairs from the graph, a NumPy reference, float equivalence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import json

import flax.linen as nn
import pytest

from cfws_jax.models import create_model
from cfws_jax.models.layers import QConv, QDense
from cfws_jax.models.mobileone import MobileOneConfig
from cfws_jax.models.repvgg import RepVGGConfig
from cfws_jax.ptq.equalize import EqPair, cross_layer_equalize, equalization_pairs, in_ranges

from conftest import numpy_init
from test_cli_ptq import tiny_cifar  # noqa: F401  (fixture)

MO_TINY = MobileOneConfig((0.25, 0.25, 0.25, 0.25), num_conv_branches=2, num_blocks=(1, 2, 1, 1),
                          num_classes=7, stem_stride=1, stage_strides=(1, 2, 2, 1))
RV_TINY = RepVGGConfig((1, 2, 1, 1), (4, 6, 8, 8, 12), group_blocks=(2,), groups=2, num_classes=5,
                       stem_stride=1, stage_strides=(1, 2, 2, 1))


def trained_like(cfg, seed: int = 0, hw: int = 16):
    """Deploy ``(model, params)`` as if fused from BatchNorm with per-channel ``gamma / sigma``
    spanning ~3 decades (the channel-range spread CLE is for): every conv's output channel
    scaled by a log-normal factor, its bias shifted."""
    model = create_model(cfg, deploy=True)
    params = jax.tree_util.tree_map(lambda a: np.array(a, np.float32), numpy_init(model, (1, hw, hw, 3), seed)["params"])
    rng = np.random.default_rng(seed + 100)
    for name, blk in params.items():
        if name == "linear":
            continue
        conv = next(iter(blk.values()))
        g = np.exp(rng.normal(0, 1.5, conv["kernel"].shape[-1])).astype(np.float32)
        conv["kernel"] = conv["kernel"] * g
        conv["bias"] = (conv["bias"] + rng.normal(0, 0.5, g.shape)).astype(np.float32) * g
    dead = params["stage1_0"][next(iter(params["stage1_0"]))]  # a dead channel: ~0 weights, a bias
    dead["kernel"][..., 1] *= 1e-20
    dead["bias"][1] = 0.5
    return model, params


def numpy_equalize(weights, pairs, tol=1e-3, max_iter=500):
    """The obvious reference: loops over channels in float64."""
    w = {n: {k: np.array(a, np.float64) for k, a in d.items()} for n, d in weights.items()}
    for it in range(max_iter):
        dev = 0.0
        for p in pairs:
            a, b = w[p.first], w[p.second]
            k2 = b["kernel"] if b["kernel"].ndim == 4 else b["kernel"][None, None]
            cin_g, o = k2.shape[2], k2.shape[3]
            og = o // p.groups
            c = a["kernel"].shape[-1]
            r1 = [np.abs(a["kernel"][..., i]).max() for i in range(c)]
            r2 = [np.abs(k2[:, :, i % cin_g, i // cin_g * og:(i // cin_g + 1) * og]).max() for i in range(c)]
            for i in range(c):
                g, j = divmod(i, cin_g)
                live = r1[i] > 1e-4 * max(r1) and r2[i] > 1e-4 * max(r2)
                s = np.sqrt(r1[i] / r2[i]) if live else 1.0
                a["kernel"][..., i] /= s
                if "bias" in a:
                    a["bias"][i] /= s
                k2[:, :, j, g * og:(g + 1) * og] *= s
                dev = max(dev, abs(s - 1))
            b["kernel"] = k2 if b["kernel"].ndim == 4 else k2[0, 0]
        if dev < tol:
            break
    return w, it + 1


def _layer_weights(params, names):
    def at(n):
        node = params
        for part in n.split("/"):
            node = node[part]
        return {k: np.asarray(v) for k, v in node.items()}
    return {n: at(n) for n in names}


@pytest.mark.parametrize("cfg", [MO_TINY, RV_TINY], ids=["mobileone", "repvgg_grouped"])
def test_cle_keeps_the_logits_and_matches_the_numpy_reference(cfg):
    model, params = trained_like(cfg)
    x = np.random.default_rng(1).normal(0, 1, (4, 16, 16, 3)).astype(np.float32)
    pairs, skipped = equalization_pairs(model, params, x.shape)
    assert len(pairs) >= 5 and not skipped, (pairs, skipped)
    assert pairs[-1].second == "linear"  # last conv -> ReLU -> GAP -> dense
    new, stats = cross_layer_equalize(model, params, x.shape)
    ref = model.apply({"params": params}, x)
    out = model.apply({"params": new}, x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    dead = next(iter(new["stage1_0"].values()))
    assert float(dead["bias"][1]) == 0.5  # left alone, not blown up to 0.5 / 1e-10
    layer_names = sorted({n for p in pairs for n in (p.first, p.second)})
    want, iters = numpy_equalize(_layer_weights(params, layer_names), pairs)
    got = _layer_weights(new, layer_names)
    assert stats["iterations"] == iters
    for n in layer_names:
        for k in want[n]:
            np.testing.assert_allclose(got[n][k], want[n][k], rtol=2e-3, atol=1e-6, err_msg=f"{n}/{k}")
    for p in pairs:  # converged: each pair's output and input channel ranges agree
        r1 = np.abs(got[p.first]["kernel"]).reshape(-1, got[p.first]["kernel"].shape[-1]).max(0)
        r2 = np.asarray(in_ranges(jnp.asarray(got[p.second]["kernel"]), p.groups))
        live = (r1 > 1e-4 * r1.max()) & (r2 > 1e-4 * r2.max())
        assert live.sum() >= len(live) - 1
        np.testing.assert_allclose(r1[live], r2[live], rtol=1e-3, err_msg=f"{p}")


class Branchy(nn.Module):
    """a (relu) feeds b and a residual add; b -> c through SiLU; c -> d plain; d -> dense via a max."""

    @nn.compact
    def __call__(self, x):
        a = QConv(4, 3, act="relu", name="a")(x)
        b = QConv(4, 1, act="silu", name="b")(a) + a
        c = QConv(6, 3, name="c")(QConv(4, 1, act="silu", name="b2")(b))
        d = QConv(6, 1, act="relu", name="d")(c)
        return QDense(3, name="linear")(jnp.max(d, axis=(1, 2)))


def test_pairs_skip_branches_and_non_homogeneous_activations():
    model = Branchy()
    params = numpy_init(model, (1, 8, 8, 3))["params"]
    pairs, skipped = equalization_pairs(model, params, (1, 8, 8, 3))
    assert pairs == (EqPair("c", "d", 1),)
    assert skipped["a"] == "read by 2 ops"
    assert "silu" in skipped["b"] and "silu" in skipped["b2"]
    assert skipped["d"].startswith("followed by reduce_max")
    new, stats = cross_layer_equalize(model, params, (1, 8, 8, 3))
    x = np.random.default_rng(0).normal(0, 1, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(model.apply({"params": new}, x), model.apply({"params": params}, x),
                               rtol=1e-4, atol=1e-5)
    assert stats["pairs"] == 1 and set(stats["skipped"]) == {"a", "b", "b2", "d"}


# ----------------------------------------------------------------------------- wiring into quantize
def test_cle_preset_is_cfws_kl_on_the_equalized_weights():
    """``cfws_kl_cle`` == ``cfws_kl`` on the equalized params (bit for bit: the split, the
    calibration and the report all see the equalized layers)."""
    from cfws_jax.ptq import get_preset, quantize
    from cfws_jax.ptq.report import layer_report

    model, params = trained_like(MO_TINY)
    x = np.random.default_rng(2).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    qm = quantize(model, {"params": params}, [x], get_preset("cfws_kl_cle", w_bits=6, a_bits=6), progress=False)
    eq, stats = cross_layer_equalize(model, params, x.shape)
    ref = quantize(model, {"params": eq}, [x], get_preset("cfws_kl", w_bits=6, a_bits=6), progress=False)
    assert qm.config.cle and qm.meta["cle"]["pairs"] == stats["pairs"] == 11
    assert "cle" not in ref.meta
    for n in ref.layers:
        for k in ref.layers[n]:
            np.testing.assert_array_equal(np.asarray(qm.layers[n][k]), np.asarray(ref.layers[n][k]), err_msg=f"{n}/{k}")
    np.testing.assert_array_equal(qm.act_amax, ref.act_amax)
    # the report compares with the equalized float network (the user passes the original params)
    rows = layer_report(qm, {"params": params}, x[:4], model)["layers"]
    want = layer_report(ref, {"params": eq}, x[:4], model)["layers"]
    for a, b in zip(rows, want):
        assert a["output_cosine"] == pytest.approx(b["output_cosine"], abs=1e-6), a["layer"]
        assert a["center_surround_ratio"] == b["center_surround_ratio"]


def test_cle_model_round_trips_and_evaluates_alike_in_integers(tmp_path):
    from cfws_jax.ptq import get_preset, load_quantized, quantize, quantized_apply_fn, save_quantized
    from cfws_jax.ptq.integer_runtime import integer_apply_fn

    model, params = trained_like("repvgg_cifar_small")
    x = np.random.default_rng(3).uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32)
    qm = quantize("repvgg_cifar_small", {"params": params}, [x[:8]], get_preset("cfws_kl_cle"), progress=False)
    save_quantized(qm, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    assert back.config.cle and back.meta["cle"] == qm.meta["cle"]
    sim = np.asarray(quantized_apply_fn(qm)(x[8:]))
    np.testing.assert_array_equal(np.asarray(quantized_apply_fn(back)(x[8:])), sim)
    integer = np.asarray(integer_apply_fn(back)(x[8:]))
    cos = np.sum(sim * integer, 1) / (np.linalg.norm(sim, axis=1) * np.linalg.norm(integer, axis=1))
    assert cos.min() > 0.99, cos
    flt = np.asarray(model.apply({"params": params}, x[8:]))  # and the quantized model tracks the float one
    cos_f = np.sum(sim * flt, 1) / (np.linalg.norm(sim, axis=1) * np.linalg.norm(flt, axis=1))
    assert cos_f.mean() > 0.8, cos_f  # a sanity floor (random weights, 8 calibration images)


def test_cli_cle_flag_with_keep_float_then_integer_eval(tiny_cifar, tmp_path, capsys):
    """``--cle`` on any preset reaches the stored config; the sensitivity ranking and the report
    run against the equalized float network; ``eval --integer`` reads the equalized layers."""
    from cfws_jax.cli import main
    from cfws_jax.ptq import load_quantized

    data, params = tiny_cifar
    q = tmp_path / "q"
    assert main(["ptq", "--arch", "repvgg_cifar_small", "--params", str(params), "--calib-data", str(data),
                 "--preset", "cfws_minmax", "--cle", "--num-calib", "8", "--keep-float", "1", "--order", "parallel",
                 "--out", str(q), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "cross-layer equalization: 9 layer pairs" in err and "kept in float" in err
    qm = load_quantized(q)
    assert qm.config.cle and qm.config.act_method == "max" and qm.meta["cle"]["pairs"] == 9
    res = []
    for extra in ([], ["--integer"]):
        assert main(["eval", "--arch", "repvgg_cifar_small", "--quantized", str(q), "--data", str(data),
                     "--split", "test", "--json", "--no-progress", *extra]) == 0
        res.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert res[0]["images"] == res[1]["images"] == 40
    assert abs(res[0]["top1"] - res[1]["top1"]) <= 0.1, res
