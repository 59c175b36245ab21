"""Branch fusion vs. the multi-branch block computed independently in float64 NumPy (NCHW / OIHW)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax.fusion import (
    BN,
    avg_pool_kernel,
    fold_bn,
    fuse_mobileone_block,
    fuse_qarepvgg_block,
    fuse_repvgg_block,
    fuse_yolov6_repvgg_block,
    identity_kernel,
    pad_kernel,
)
from cfws_jax.models.layers import conv2d

TOL = 1e-5


# ----------------------------------------------------------------------------- NumPy references
def conv_ref(x, w, stride=1, pad=0, groups=1):
    """Slow grouped conv. x: NCHW, w: OIHW [O, I/g, kh, kw]; explicit zero padding; float64."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, cin, h, wd = x.shape
    o, ig, kh, kw = w.shape
    assert cin == ig * groups and o % groups == 0
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (wd + 2 * pad - kw) // stride + 1
    og = o // groups
    y = np.zeros((n, o, oh, ow))
    for g in range(groups):
        xs = xp[:, g * ig:(g + 1) * ig]
        for dy in range(kh):
            for dx in range(kw):
                patch = xs[:, :, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
                y[:, g * og:(g + 1) * og] += np.einsum("nihw,oi->nohw", patch, w[g * og:(g + 1) * og, :, dy, dx])
    return y


def bn_ref(y, bn: BN, eps):
    """Inference BatchNorm on NCHW, float64."""
    s, b, m, v = (np.asarray(t, np.float64)[None, :, None, None] for t in bn)
    return (y - m) / np.sqrt(v + eps) * s + b


def avgpool_ref(x, k, stride):
    """k x k average pool, pad k//2 with zeros counted (count_include_pad), NCHW."""
    c = x.shape[1]
    w = np.zeros((c, 1, k, k)) + 1.0 / (k * k)
    return conv_ref(x, w, stride, k // 2, groups=c)


def to_hwio(w_oihw):
    return np.asarray(w_oihw).transpose(2, 3, 1, 0)


def to_oihw(w_hwio):
    return np.asarray(w_hwio).transpose(3, 2, 0, 1)


# ----------------------------------------------------------------------------- random blocks
def rand_bn(rng, c, small_var=False):
    var = rng.uniform(0.002, 0.02, c) if small_var else rng.uniform(0.3, 2.0, c)
    return BN(rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c), rng.normal(0, 0.3, c), var)


def rand_w(rng, o, ig, k):
    return rng.normal(0, 0.2, (o, ig, k, k))


def fused_output(x, kernel, bias, stride, groups):
    k = kernel.shape[0]
    y = conv_ref(x, to_oihw(kernel), stride, k // 2, groups)
    return y + np.asarray(bias, np.float64)[None, :, None, None]


def assert_close(a, b, tol=TOL):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


CASES = [  # (cin, cout, groups, stride)
    (4, 4, 1, 1), (4, 4, 1, 2), (4, 8, 1, 2), (4, 4, 2, 1), (8, 8, 2, 2),
    (8, 8, 4, 1), (8, 16, 4, 2), (6, 6, 6, 1), (6, 6, 6, 2),
]


@pytest.mark.parametrize("cin,cout,groups,stride", CASES)
@pytest.mark.parametrize("with_1x1", [True, False])
def test_repvgg_block(cin, cout, groups, stride, with_1x1):
    rng = np.random.default_rng(cin * 100 + cout * 10 + groups + stride)
    x = rng.normal(size=(2, cin, 7, 6))
    w3, w1 = rand_w(rng, cout, cin // groups, 3), rand_w(rng, cout, cin // groups, 1)
    bn3, bn1, bnid = rand_bn(rng, cout), rand_bn(rng, cout), rand_bn(rng, cin)
    has_id = cin == cout and stride == 1
    eps = 1e-5
    ref = bn_ref(conv_ref(x, w3, stride, 1, groups), bn3, eps)
    if with_1x1:
        ref += bn_ref(conv_ref(x, w1, stride, 0, groups), bn1, eps)
    if has_id:
        ref += bn_ref(x, bnid, eps)
    kernel, bias = fuse_repvgg_block(
        (to_hwio(w3), bn3), (to_hwio(w1), bn1) if with_1x1 else None, bnid if has_id else None, groups=groups
    )
    assert kernel.shape == (3, 3, cin // groups, cout) and bias.shape == (cout,)
    assert_close(fused_output(x, kernel, bias, stride, groups), ref)
    # the HWIO kernel runs as-is through the model's NHWC conv
    y = conv2d(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), kernel, bias, stride, 1, groups)
    assert_close(np.asarray(y).transpose(0, 3, 1, 2), ref, 1e-4)


@pytest.mark.parametrize("cin,cout,groups,stride", CASES)
def test_yolov6_repvgg_block_uses_eps_1e3(cin, cout, groups, stride):
    rng = np.random.default_rng(7 + cin + cout + groups + stride)
    x = rng.normal(size=(1, cin, 6, 6))
    w3, w1 = rand_w(rng, cout, cin // groups, 3), rand_w(rng, cout, cin // groups, 1)
    bn3, bn1, bnid = rand_bn(rng, cout, True), rand_bn(rng, cout, True), rand_bn(rng, cin, True)
    has_id = cin == cout and stride == 1
    ref = bn_ref(conv_ref(x, w3, stride, 1, groups), bn3, 1e-3) + bn_ref(conv_ref(x, w1, stride, 0, groups), bn1, 1e-3)
    if has_id:
        ref += bn_ref(x, bnid, 1e-3)
    kernel, bias = fuse_yolov6_repvgg_block((to_hwio(w3), bn3), (to_hwio(w1), bn1), bnid if has_id else None, groups=groups)
    assert_close(fused_output(x, kernel, bias, stride, groups), ref)
    k5, b5 = fuse_repvgg_block((to_hwio(w3), bn3), (to_hwio(w1), bn1), bnid if has_id else None, groups=groups)
    assert np.abs(fused_output(x, k5, b5, stride, groups) - ref).max() > 1e-2  # eps matters with small var


@pytest.mark.parametrize("cin,cout,groups,stride", CASES + [(3, 8, 1, 2)])
@pytest.mark.parametrize("k", [3, 5])
def test_mobileone_block(cin, cout, groups, stride, k):
    rng = np.random.default_rng(1000 + cin + cout + groups + stride + k)
    x = rng.normal(size=(2, cin, 8, 7))
    ws = [rand_w(rng, cout, cin // groups, k) for _ in range(3)]
    bns = [rand_bn(rng, cout) for _ in range(3)]
    w1, bn1, bnid = rand_w(rng, cout, cin // groups, 1), rand_bn(rng, cout), rand_bn(rng, cin)
    has_id = cin == cout and stride == 1
    eps = 1e-5
    ref = sum(bn_ref(conv_ref(x, w, stride, k // 2, groups), b, eps) for w, b in zip(ws, bns))
    ref += bn_ref(conv_ref(x, w1, stride, 0, groups), bn1, eps)
    if has_id:
        ref += bn_ref(x, bnid, eps)
    kernel, bias = fuse_mobileone_block(
        [(to_hwio(w), b) for w, b in zip(ws, bns)], (to_hwio(w1), bn1), bnid if has_id else None, groups=groups
    )
    assert kernel.shape == (k, k, cin // groups, cout)
    assert_close(fused_output(x, kernel, bias, stride, groups), ref)


@pytest.mark.parametrize("with_id", [True, False])
def test_mobileone_pointwise_block(with_id):
    rng = np.random.default_rng(3)
    c = 6
    x = rng.normal(size=(2, c, 5, 5))
    ws = [rand_w(rng, c, c, 1) for _ in range(4)]
    bns = [rand_bn(rng, c) for _ in range(4)]
    bnid = rand_bn(rng, c)
    ref = sum(bn_ref(conv_ref(x, w, 1, 0), b, 1e-5) for w, b in zip(ws, bns))
    if with_id:
        ref += bn_ref(x, bnid, 1e-5)
    kernel, bias = fuse_mobileone_block([(to_hwio(w), b) for w, b in zip(ws, bns)], None, bnid if with_id else None)
    assert kernel.shape == (1, 1, c, c)
    assert_close(fused_output(x, kernel, bias, 1, 1), ref)


@pytest.mark.parametrize("cin,cout,groups,stride", CASES)
@pytest.mark.parametrize("avg", [False, True])
def test_qarepvgg_block(cin, cout, groups, stride, avg):
    rng = np.random.default_rng(2000 + cin + cout + groups + stride)
    x = rng.normal(size=(2, cin, 7, 7))
    w3, w1 = rand_w(rng, cout, cin // groups, 3), rand_w(rng, cout, cin // groups, 1)
    bn3, post = rand_bn(rng, cout), rand_bn(rng, cout)
    has_id = cin == cout and stride == 1
    avg = avg and cin == cout
    eps = 1e-5
    s = bn_ref(conv_ref(x, w3, stride, 1, groups), bn3, eps) + conv_ref(x, w1, stride, 0, groups)
    if has_id:
        s += x
    if avg:
        s += avgpool_ref(x, 3, stride)
    ref = bn_ref(s, post, eps)
    kernel, bias = fuse_qarepvgg_block((to_hwio(w3), bn3), to_hwio(w1), has_id, post, groups=groups, avg_pool=avg)
    assert_close(fused_output(x, kernel, bias, stride, groups), ref)


def test_qarepvgg_without_1x1():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 4, 5, 5))
    w3, bn3, post = rand_w(rng, 4, 4, 3), rand_bn(rng, 4), rand_bn(rng, 4)
    ref = bn_ref(bn_ref(conv_ref(x, w3, 1, 1), bn3, 1e-5) + x, post, 1e-5)
    kernel, bias = fuse_qarepvgg_block((to_hwio(w3), bn3), None, True, post)
    assert_close(fused_output(x, kernel, bias, 1, 1), ref)


# ----------------------------------------------------------------------------- building blocks
def test_fold_bn_matches_conv_then_bn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 6, 6))
    w, bn, b0 = rand_w(rng, 5, 4, 3), rand_bn(rng, 5), rng.normal(size=5)
    k, b = fold_bn(to_hwio(w), bn, 1e-5)
    assert_close(fused_output(x, k, b, 1, 1), bn_ref(conv_ref(x, w, 1, 1), bn, 1e-5))
    k, b = fold_bn(to_hwio(w), bn, 1e-3, bias=b0)
    assert_close(fused_output(x, k, b, 1, 1), bn_ref(conv_ref(x, w, 1, 1) + b0[None, :, None, None], bn, 1e-3))


@pytest.mark.parametrize("kh,k,stride", [(1, 3, 1), (1, 3, 2), (1, 5, 2), (3, 5, 1), (3, 3, 2)])
def test_pad_kernel_centres(kh, k, stride):
    rng = np.random.default_rng(kh * 10 + k)
    x = rng.normal(size=(1, 3, 9, 8))
    w = rand_w(rng, 4, 3, kh)
    padded = np.asarray(pad_kernel(to_hwio(w), k))
    assert padded.shape == (k, k, 3, 4)
    assert_close(conv_ref(x, to_oihw(padded), stride, k // 2), conv_ref(x, w, stride, kh // 2))


@pytest.mark.parametrize("c,groups,k", [(4, 1, 3), (4, 2, 3), (6, 3, 5), (5, 5, 3), (3, 1, 1)])
def test_identity_and_avg_kernels(c, groups, k):
    x = np.random.default_rng(1).normal(size=(2, c, 6, 5))
    ident = identity_kernel(c, groups, k)
    assert ident.shape == (k, k, c // groups, c) and ident.dtype == jnp.float32
    assert_close(conv_ref(x, to_oihw(ident), 1, k // 2, groups), x)
    assert identity_kernel(c, groups, k, jnp.bfloat16).dtype == jnp.bfloat16
    for stride in (1, 2):
        avg = avg_pool_kernel(c, groups, k)
        assert_close(conv_ref(x, to_oihw(avg), stride, k // 2, groups), avgpool_ref(x, k, stride))


def test_jit_and_numpy_inputs_agree():
    rng = np.random.default_rng(11)
    dense = (to_hwio(rand_w(rng, 4, 4, 3)), rand_bn(rng, 4))
    one = (to_hwio(rand_w(rng, 4, 4, 1)), rand_bn(rng, 4))
    ident = rand_bn(rng, 4)
    eager = fuse_repvgg_block(dense, one, ident)
    jitted = jax.jit(lambda d, o, i: fuse_repvgg_block(d, o, i))(dense, one, ident)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_errors_name_the_problem():
    rng = np.random.default_rng(0)
    w3 = to_hwio(rand_w(rng, 8, 4, 3))
    with pytest.raises(ValueError, match="stage1.0.*identity"):
        fuse_repvgg_block((w3, rand_bn(rng, 8)), None, rand_bn(rng, 4), name="stage1.0")
    with pytest.raises(ValueError, match="BN.var"):
        fold_bn(w3, BN(np.ones(8), np.zeros(8), np.zeros(8), np.ones(7)), 1e-5)
    with pytest.raises(ValueError, match="odd"):
        pad_kernel(np.zeros((2, 2, 1, 1)), 3)
    with pytest.raises(ValueError, match="odd"):
        identity_kernel(4, 1, 2)
    with pytest.raises(ValueError, match="divisible|multiple"):
        identity_kernel(6, 4, 3)
    with pytest.raises(ValueError, match="1x1 branch"):
        fuse_repvgg_block((w3, rand_bn(rng, 8)), (np.zeros((1, 1, 3, 8)), rand_bn(rng, 8)), None)
    with pytest.raises(ValueError, match="at least one"):
        fuse_mobileone_block([], None, None)
