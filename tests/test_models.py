"""Model zoo: registry, parameter counts (FORMATS.md), shapes, BatchNorm training, and
train-form -> deploy-form fusion checked against a slow NumPy reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax.models import create_model, fuse, get_config, list_models
from cfws_jax.models.mobileone import MobileOneConfig
from cfws_jax.models.repvgg import RepVGGBlock, RepVGGConfig

# Deploy parameter counts from FORMATS.md §2.2 (millions, 2 decimals) and §3.2 / README (exact).
REPVGG_DEPLOY_M = {
    "repvgg_a0": 8.31, "repvgg_a1": 12.79, "repvgg_a2": 25.50, "repvgg_b0": 14.34,
    "repvgg_b1": 51.83, "repvgg_b1g2": 41.36, "repvgg_b1g4": 36.13, "repvgg_b2": 80.32,
    "repvgg_b2g2": 63.96, "repvgg_b2g4": 55.78, "repvgg_b3": 110.96, "repvgg_b3g2": 87.40,
    "repvgg_b3g4": 75.63, "repvgg_d2se": 120.39,
}
MOBILEONE_DEPLOY_M = {"mobileone_s1": 4.8, "mobileone_s2": 7.8, "mobileone_s3": 10.1, "mobileone_s4": 14.8}


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def _param_shapes(arch, deploy, hw=64):
    model = create_model(arch, deploy=deploy)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, hw, hw, 3)))


def test_registry_lists_all_names():
    required = {
        "repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g2", "repvgg_b1g4",
        "repvgg_b2", "repvgg_b2g4", "repvgg_b3", "repvgg_d2se", "mobileone_s0", "mobileone_s1",
        "mobileone_s2", "mobileone_s3", "mobileone_s4", "repvgg_a0_cifar", "repvgg_cifar_small",
    }
    assert required <= set(list_models())
    with pytest.raises(ValueError, match="repvgg_a0"):
        get_config("repvgg_a9")


@pytest.mark.parametrize("arch", sorted(REPVGG_DEPLOY_M))
def test_repvgg_deploy_param_count(arch):
    n = _count(_param_shapes(arch, True)["params"])
    assert round(n / 1e6, 2) == pytest.approx(REPVGG_DEPLOY_M[arch], abs=0.006)


def test_mobileone_deploy_param_count():
    assert _count(_param_shapes("mobileone_s0", True)["params"]) == 2_078_504
    for arch, m in MOBILEONE_DEPLOY_M.items():
        assert round(_count(_param_shapes(arch, True)["params"]) / 1e6, 1) == m, arch


def test_names_and_structure_a0():
    train = _param_shapes("repvgg_a0", False)
    p, s = train["params"], train["batch_stats"]
    assert p["stage0"]["rbr_dense"]["conv"]["kernel"].shape == (3, 3, 3, 48)
    assert "rbr_identity" not in p["stage1_0"] and "rbr_identity" in p["stage1_1"]
    assert p["stage1_1"]["rbr_1x1"]["conv"]["kernel"].shape == (1, 1, 48, 48)
    assert set(s["stage1_1"]["rbr_identity"]) == {"mean", "var"}
    assert p["linear"]["kernel"].shape == (1280, 1000)
    assert sorted(k for k in p if k.startswith("stage3_")) == sorted(f"stage3_{j}" for j in range(14))
    dep = _param_shapes("repvgg_a0", True)
    assert set(dep) == {"params"}
    assert dep["params"]["stage1_1"]["rbr_reparam"]["kernel"].shape == (3, 3, 48, 48)
    g4 = _param_shapes("repvgg_b1g4", True)["params"]
    assert g4["stage1_1"]["rbr_reparam"]["kernel"].shape == (3, 3, 32, 128)  # FORMATS: [128,32,3,3]
    assert g4["stage1_0"]["rbr_reparam"]["kernel"].shape == (3, 3, 64, 128)
    se = _param_shapes("repvgg_d2se", True)["params"]["stage0"]["se"]
    assert se["down"]["kernel"].shape == (1, 1, 64, 4) and se["up"]["kernel"].shape == (1, 1, 4, 64)
    mo = _param_shapes("mobileone_s0", False)["params"]
    assert sorted(mo["stage1_0"]) == ["rbr_conv_0", "rbr_conv_1", "rbr_conv_2", "rbr_conv_3", "rbr_scale"]
    assert mo["stage1_0"]["rbr_conv_0"]["conv"]["kernel"].shape == (3, 3, 1, 48)
    assert sorted(mo["stage1_1"]) == [f"rbr_conv_{i}" for i in range(4)] + ["rbr_skip"]
    assert sorted(mo["stage0"]) == ["rbr_conv_0", "rbr_scale"]
    assert sorted(_param_shapes("mobileone_s0", True)["params"]["stage2_3"]) == ["reparam_conv"]


@pytest.mark.parametrize("arch", ["repvgg_a0_cifar", "mobileone_s0_cifar"])
def test_cifar_spatial_sizes(arch):
    model = create_model(arch, deploy=True)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]), variables, x
    )
    inter = state["intermediates"]
    assert out.shape == (1, 10)
    last = {}
    for name in inter:
        if name.startswith("stage"):
            stage = name.split("_")[0]
            last[stage] = inter[name]["__call__"][0].shape[1]
    assert last == {"stage0": 32, "stage1": 32, "stage2": 16, "stage3": 8, "stage4": 4}


def test_batchnorm_train_mode_updates_running_stats():
    """Flax momentum 0.9 (= PyTorch 0.1), eps 1e-5: new = 0.9 old + 0.1 batch (biased var in Flax)."""
    block = RepVGGBlock(4)
    x = jax.random.normal(jax.random.key(1), (3, 5, 5, 4)) * 2.0 + 1.0
    v = jax.jit(block.init)(jax.random.key(0), x)
    _, upd = block.apply(v, x, train=True, mutable=["batch_stats"])
    xn = np.asarray(x, np.float64)
    ident = upd["batch_stats"]["rbr_identity"]
    np.testing.assert_allclose(ident["mean"], 0.1 * xn.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(ident["var"], 0.9 + 0.1 * xn.var(axis=(0, 1, 2)), rtol=1e-5)
    assert set(upd["batch_stats"]) == {"rbr_dense", "rbr_1x1", "rbr_identity"}
    # eval mode uses the stored statistics: changing them changes the output, train mode ignores them
    v2 = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    assert not np.allclose(block.apply(v, x), block.apply(v2, x))
    np.testing.assert_allclose(block.apply(v, x, train=True, mutable=["batch_stats"])[0],
                               block.apply(v2, x, train=True, mutable=["batch_stats"])[0], rtol=1e-6)


# ---------------------------------------------------------------- NumPy references


def np_conv(x, w_hwio, stride, pad, groups):
    """Slow direct conv: x NHWC, w HWIO [k,k,C/g,O], float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k, _, cg, o = w_hwio.shape
    og = o // groups
    n, h, w_, _ = x.shape
    ho, wo = (h - k) // stride + 1, (w_ - k) // stride + 1
    y = np.zeros((n, ho, wo, o))
    for oc in range(o):
        g = oc // og
        xs = x[..., g * cg:(g + 1) * cg]
        for i in range(k):
            for j in range(k):
                patch = xs[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :]
                y[..., oc] += patch @ np.asarray(w_hwio[i, j, :, oc], np.float64)
    return y


def np_bn(y, p, s, eps=1e-5):
    return (y - s["mean"]) / np.sqrt(np.asarray(s["var"], np.float64) + eps) * p["scale"] + p["bias"]


def np_fold(kernel, p, s, eps=1e-5):
    t = np.asarray(p["scale"], np.float64) / np.sqrt(np.asarray(s["var"], np.float64) + eps)
    return np.asarray(kernel, np.float64) * t, np.asarray(p["bias"], np.float64) - np.asarray(s["mean"]) * t


def np_identity_kernel(c, groups, k):
    ker = np.zeros((k, k, c // groups, c))
    for o in range(c):
        ker[k // 2, k // 2, o % (c // groups), o] = 1.0
    return ker


def np_fuse_block(p, s, branches, scale, identity, groups, k):
    """Reference fusion of one block (names given as lists of train-form module names)."""
    kernel, bias = 0.0, 0.0
    for name in branches:
        fk, fb = np_fold(p[name]["conv"]["kernel"], p[name]["bn"], s[name]["bn"])
        kernel, bias = kernel + fk, bias + fb
    if scale:
        fk, fb = np_fold(p[scale]["conv"]["kernel"], p[scale]["bn"], s[scale]["bn"])
        kernel = kernel + np.pad(fk, ((k // 2, k // 2), (k // 2, k // 2), (0, 0), (0, 0)))
        bias = bias + fb
    if identity:
        c = kernel.shape[-1]
        fk, fb = np_fold(np_identity_kernel(c, groups, k), p[identity], s[identity])
        kernel, bias = kernel + fk, bias + fb
    return kernel, bias


def random_variables(arch, seed, hw=16):
    """Variables of ``create_model(arch)`` (shapes from eval_shape, no slow eager init) with random
    BN statistics/affine (positive var, scale in [0.5, 1.5]) and fan-in scaled conv/SE/linear weights."""
    model = create_model(arch)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, hw, hw, 3)))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    rng = np.random.RandomState(seed)
    out = {}
    for path, leaf in flat:
        names = [p.key for p in path]
        shape = leaf.shape
        if names[-1] == "var":
            val = rng.uniform(0.5, 2.0, shape)
        elif names[-1] == "mean":
            val = rng.normal(0, 0.2, shape)
        elif names[-1] == "scale":
            val = rng.uniform(0.5, 1.5, shape)
        elif names[-1] == "bias":
            val = rng.normal(0, 0.1, shape)
        else:  # kernels: fan-in scaled
            val = rng.normal(0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        d = out
        for n in names[:-1]:
            d = d.setdefault(n, {})
        d[names[-1]] = jnp.asarray(val, jnp.float32)
    return out


SMALL_REPVGG = RepVGGConfig(
    (2, 2, 3, 1), (16, 16, 32, 32, 48), group_blocks=(2, 4, 6), groups=4, use_se=True, num_classes=5,
)
SMALL_MOBILEONE = MobileOneConfig((0.25, 0.25, 0.25, 0.25), num_conv_branches=3, use_se=True,
                                  num_blocks=(1, 2, 2, 1), num_classes=5)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("cfg", [SMALL_REPVGG, SMALL_MOBILEONE], ids=["repvgg", "mobileone"])
def test_fuse_matches_numpy_reference(cfg):
    from cfws_jax.models.registry import block_specs, family

    v = random_variables(cfg, 3)
    fused = fuse(cfg, v)["params"]
    p, s = v["params"], v["batch_stats"]
    for b in block_specs(cfg):
        if family(cfg) == "repvgg":
            ref = np_fuse_block(p[b.name], s[b.name], ["rbr_dense"], "rbr_1x1",
                                "rbr_identity" if b.identity else None, b.groups, 3)
            got = fused[b.name]["rbr_reparam"]
        else:
            ref = np_fuse_block(p[b.name], s[b.name], [f"rbr_conv_{i}" for i in range(b.branches)],
                                "rbr_scale" if b.scale else None, "rbr_skip" if b.identity else None,
                                b.groups, b.kernel)
            got = fused[b.name]["reparam_conv"]
        np.testing.assert_allclose(got["kernel"], ref[0], rtol=1e-5, atol=1e-6, err_msg=b.name)
        np.testing.assert_allclose(got["bias"], ref[1], rtol=1e-5, atol=1e-6, err_msg=b.name)
        if b.se:
            assert _flat(fused[b.name]["se"]).keys() == _flat(p[b.name]["se"]).keys()
    np.testing.assert_array_equal(fused["linear"]["kernel"], p["linear"]["kernel"])
    deploy_shapes = jax.eval_shape(create_model(cfg, deploy=True).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    assert jax.tree_util.tree_map(lambda a: a.shape, {"params": fused}) == jax.tree_util.tree_map(
        lambda a: a.shape, deploy_shapes
    )


def np_repvgg_block(x, p, s, stride, groups, has_id, se):
    y = 0.0
    for name, pad in (("rbr_dense", 1), ("rbr_1x1", 0)):
        y = y + np_bn(np_conv(x, p[name]["conv"]["kernel"], stride, pad, groups), p[name]["bn"], s[name]["bn"])
    if has_id:
        y = y + np_bn(x, p["rbr_identity"], s["rbr_identity"])
    if se:
        m = y.mean(axis=(1, 2))
        h = np.maximum(m @ np.asarray(p["se"]["down"]["kernel"][0, 0], np.float64) + p["se"]["down"]["bias"], 0)
        g = 1 / (1 + np.exp(-(h @ np.asarray(p["se"]["up"]["kernel"][0, 0], np.float64) + p["se"]["up"]["bias"])))
        y = y * g[:, None, None, :]
    return np.maximum(y, 0)


def test_repvgg_train_forward_matches_numpy_reference():
    """Train-form network (eval mode, grouped + SE + stride 2) vs a slow NumPy forward."""
    from cfws_jax.models.registry import block_specs

    cfg = SMALL_REPVGG
    model = create_model(cfg)
    x = jax.random.normal(jax.random.key(5), (2, 12, 12, 3))
    v = random_variables(cfg, 4)
    y = model.apply(v, x)
    h = np.asarray(x, np.float64)
    for b in block_specs(cfg):
        h = np_repvgg_block(h, v["params"][b.name], v["batch_stats"][b.name], b.stride, b.groups, b.identity, b.se)
    ref = h.mean(axis=(1, 2)) @ np.asarray(v["params"]["linear"]["kernel"], np.float64) + v["params"]["linear"]["bias"]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("arch", ["repvgg_cifar_small", "mobileone_s0_cifar", SMALL_REPVGG, SMALL_MOBILEONE])
def test_fused_logits_match_train_form(arch):
    model, deploy = create_model(arch), create_model(arch, deploy=True)
    x = jax.random.normal(jax.random.key(7), (2, 32, 32, 3))
    v = random_variables(arch, 11)
    y_train = model.apply(v, x)
    y_deploy = deploy.apply(fuse(arch, v), x)
    scale = float(jnp.abs(y_train).max())
    assert scale > 1e-3
    assert float(jnp.abs(y_train - y_deploy).max()) <= 1e-5 * max(scale, 1.0)


def test_fuse_is_jittable():
    tiny = RepVGGConfig((1, 1, 1, 1), (8, 8, 8, 8, 8), num_classes=3)
    v = random_variables(tiny, 2)
    eager = fuse(tiny, v)
    jitted = jax.jit(fuse, static_argnums=0)(tiny, v)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), eager, jitted)


def test_fuse_errors_name_the_variable():
    v = random_variables(SMALL_REPVGG, 0)
    del v["batch_stats"]["stage1_1"]["rbr_identity"]
    with pytest.raises(ValueError, match="stage1_1/rbr_identity"):
        fuse(SMALL_REPVGG, v)
    v2 = random_variables(SMALL_REPVGG, 0)
    v2["params"]["extra"] = {}
    with pytest.raises(ValueError, match="extra"):
        fuse(SMALL_REPVGG, v2)


def test_num_classes_override():
    model = create_model("repvgg_cifar_small", num_classes=3)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, 3)
    assert dataclasses.is_dataclass(get_config("repvgg_a0"))
