"""Branch fusion (re-parameterization) of multi-branch conv blocks into one conv + bias.

Layouts: every kernel is a Flax HWIO kernel ``[k, k, I/groups, O]`` (output channel axis -1);
BatchNorm statistics and biases are ``(O,)`` vectors. Everything is pure ``jnp`` (jittable; NumPy
inputs are accepted). Math: FORMATS.md §2.4 (RepVGG), §2.6 (QARepVGG), §3.1 (MobileOne), §4.2
(YOLOv6 RepVGGBlock, BN eps 1e-3).

A conv+BN branch ``(K, BN(γ, β, μ, σ²), ε)`` folds to ``K·t[o]`` and ``β − μ·t`` with
``t = γ / sqrt(σ² + ε)``. Smaller odd kernels (1×1) are centre-padded to k×k; an identity branch is
the k×k kernel with a 1 at ``[c, c, o mod (O/g), o]``. The fused block is the sum of the branches.

The optional ``name`` argument only labels error messages (e.g. the block's key).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np


class BN(NamedTuple):
    """BatchNorm over output channels: gamma, beta, running mean, running var; each ``(C,)``."""

    scale: Any
    bias: Any
    mean: Any
    var: Any


Branch = tuple[Any, BN]  # (HWIO kernel, BN over its output channels)


def _where(name: str) -> str:
    return f"{name}: " if name else ""


def _check_kernel(kernel, what: str, name: str = "") -> None:
    if kernel.ndim != 4:
        raise ValueError(f"{_where(name)}{what} must be a 4-D HWIO kernel [k, k, I/g, O], got shape {tuple(kernel.shape)}")
    kh, kw = kernel.shape[:2]
    if kh != kw or kh % 2 == 0:
        raise ValueError(
            f"{_where(name)}{what} must be square with an odd size (centre tap k//2), got {kh}x{kw} "
            f"(HWIO shape {tuple(kernel.shape)})"
        )


def fold_bn(kernel, bn: BN, eps: float, bias=None):
    """Fold a BN (over axis O) into a conv: returns ``(kernel·t, β + (bias − μ)·t)``.

    kernel: HWIO ``[kh, kw, I/g, O]``; bn fields and ``bias`` (optional conv bias, default 0): ``(O,)``.
    """
    kernel = jnp.asarray(kernel)
    scale, beta, mean, var = (jnp.asarray(v) for v in bn)
    out = kernel.shape[-1]
    for field, v in zip(BN._fields, (scale, beta, mean, var)):
        if v.shape != (out,):
            raise ValueError(f"BN.{field} has shape {tuple(v.shape)}, expected ({out},) to match kernel {tuple(kernel.shape)}")
    t = scale / jnp.sqrt(var + eps)
    b = beta - mean * t if bias is None else beta + (jnp.asarray(bias) - mean) * t
    return kernel * t, b


def pad_kernel(kernel, k: int):
    """Centre-pad a smaller odd square HWIO kernel ``[kh, kh, I/g, O]`` with zeros to ``[k, k, I/g, O]``."""
    kernel = jnp.asarray(kernel)
    _check_kernel(kernel, "kernel to pad")
    kh = kernel.shape[0]
    if k % 2 == 0 or k < kh:
        raise ValueError(f"cannot centre-pad a {kh}x{kh} kernel to {k}x{k} (target must be odd and >= {kh})")
    p = (k - kh) // 2
    return jnp.pad(kernel, ((p, p), (p, p), (0, 0), (0, 0)))


def _channel_map(channels: int, groups: int, k: int, value: float, taps: str) -> np.ndarray:
    """HWIO ``[k, k, C/g, C]`` with ``value`` at ``[., ., o mod (C/g), o]`` (centre tap or all taps)."""
    if channels <= 0 or groups <= 0 or channels % groups:
        raise ValueError(f"channels ({channels}) must be a positive multiple of groups ({groups})")
    if k % 2 == 0 or k < 1:
        raise ValueError(f"kernel size must be odd and positive, got {k}")
    cg = channels // groups
    ker = np.zeros((k, k, cg, channels), np.float64)
    o = np.arange(channels)
    if taps == "centre":
        ker[k // 2, k // 2, o % cg, o] = value
    else:
        ker[:, :, o % cg, o] = value
    return ker


def identity_kernel(channels: int, groups: int, k: int, dtype=jnp.float32):
    """Identity as an HWIO kernel ``[k, k, C/g, C]``: 1 at ``[k//2, k//2, o mod (C/g), o]``."""
    return jnp.asarray(_channel_map(channels, groups, k, 1.0, "centre"), dtype)


def avg_pool_kernel(channels: int, groups: int, k: int, dtype=jnp.float32):
    """k×k average pool (``count_include_pad``) as HWIO ``[k, k, C/g, C]``: 1/k² at ``[:, :, o mod (C/g), o]``."""
    return jnp.asarray(_channel_map(channels, groups, k, 1.0 / (k * k), "all"), dtype)


def _check_square_block(kernel, groups: int, what: str, name: str) -> None:
    out = kernel.shape[-1]
    if out % groups or kernel.shape[2] * groups != out:
        raise ValueError(
            f"{_where(name)}{what} needs in_channels == out_channels, but the kernel {tuple(kernel.shape)} "
            f"with groups={groups} maps {kernel.shape[2] * groups} -> {out} channels"
        )


def fuse_mobileone_block(
    kxk: Sequence[Branch],
    scale: Branch | None,
    identity: BN | None,
    *,
    groups: int = 1,
    eps: float = 1e-5,
    name: str = "",
):
    """Fuse a MobileOne block into one HWIO kernel ``[k, k, I/g, O]`` and bias ``(O,)``.

    kxk: the over-parameterized conv+BN branches (all ``[k, k, I/g, O]``); scale: the 1×1 conv+BN
    branch (``[1, 1, I/g, O]``) or None; identity: the skip BN (needs I == O, stride 1) or None.
    Works for depthwise (``groups = C``) and pointwise (``k = 1``, ``scale=None``) blocks.
    """
    if len(kxk) == 0:
        raise ValueError(f"{_where(name)}at least one k x k conv branch is required")
    if groups < 1:
        raise ValueError(f"{_where(name)}groups must be >= 1, got {groups}")
    kernel = bias = None
    for i, (ker, bn) in enumerate(kxk):
        ker = jnp.asarray(ker)
        _check_kernel(ker, f"conv branch {i}", name)
        if kernel is not None and ker.shape != kernel.shape:
            raise ValueError(f"{_where(name)}conv branch {i} has shape {tuple(ker.shape)}, branch 0 has {tuple(kernel.shape)}")
        fk, fb = fold_bn(ker, bn, eps)
        kernel, bias = (fk, fb) if kernel is None else (kernel + fk, bias + fb)
    if kernel.shape[-1] % groups:
        raise ValueError(f"{_where(name)}out channels {kernel.shape[-1]} not divisible by groups={groups}")
    k = kernel.shape[0]
    if scale is not None:
        ker1 = jnp.asarray(scale[0])
        _check_kernel(ker1, "1x1 branch", name)
        if ker1.shape[2:] != kernel.shape[2:] or ker1.shape[0] > k:
            raise ValueError(f"{_where(name)}1x1 branch shape {tuple(ker1.shape)} does not fit the k x k branch {tuple(kernel.shape)}")
        fk, fb = fold_bn(ker1, scale[1], eps)
        kernel, bias = kernel + pad_kernel(fk, k), bias + fb
    if identity is not None:
        _check_square_block(kernel, groups, "an identity branch", name)
        fk, fb = fold_bn(identity_kernel(kernel.shape[-1], groups, k, kernel.dtype), identity, eps)
        kernel, bias = kernel + fk, bias + fb
    return kernel, bias


def fuse_repvgg_block(
    dense: Branch,
    one_by_one: Branch | None,
    identity: BN | None,
    *,
    groups: int = 1,
    eps: float = 1e-5,
    name: str = "",
):
    """Fuse a RepVGG block (k×k conv+BN, optional 1×1 conv+BN, optional identity BN).

    Kernels HWIO; returns ``(kernel [k, k, I/g, O], bias (O,))``. Identity needs I == O and stride 1.
    """
    return fuse_mobileone_block([dense], one_by_one, identity, groups=groups, eps=eps, name=name)


def fuse_yolov6_repvgg_block(
    dense: Branch,
    one_by_one: Branch | None,
    identity: BN | None,
    *,
    groups: int = 1,
    eps: float = 1e-3,
    name: str = "",
):
    """YOLOv6 ``RepVGGBlock``: :func:`fuse_repvgg_block` with YOLOv6's BN eps 1e-3."""
    return fuse_repvgg_block(dense, one_by_one, identity, groups=groups, eps=eps, name=name)


def fuse_qarepvgg_block(
    dense: Branch,
    one_by_one_kernel,
    has_identity: bool,
    post_bn: BN,
    *,
    groups: int = 1,
    eps: float = 1e-5,
    avg_pool: bool = False,
    name: str = "",
):
    """Fuse a QARepVGG block: ``post_bn(fold(dense) + pad(W_1x1) + Id [+ AvgPool])``.

    dense: k×k conv+BN; one_by_one_kernel: bare 1×1 HWIO kernel (no BN, no bias) or None;
    has_identity: add the unscaled identity; avg_pool: add the V2 ``rbr_avg`` branch (k×k average
    pool, pad k//2, count_include_pad, same stride). Identity and avg-pool need I == O.
    Returns ``(kernel [k, k, I/g, O], bias (O,))``.
    """
    ker = jnp.asarray(dense[0])
    _check_kernel(ker, "dense branch", name)
    kernel, bias = fold_bn(ker, dense[1], eps)
    k, out = kernel.shape[0], kernel.shape[-1]
    if out % groups:
        raise ValueError(f"{_where(name)}out channels {out} not divisible by groups={groups}")
    if one_by_one_kernel is not None:
        ker1 = jnp.asarray(one_by_one_kernel)
        _check_kernel(ker1, "1x1 branch", name)
        if ker1.shape[2:] != kernel.shape[2:]:
            raise ValueError(f"{_where(name)}1x1 branch shape {tuple(ker1.shape)} does not fit the dense branch {tuple(kernel.shape)}")
        kernel = kernel + pad_kernel(ker1, k)
    if has_identity:
        _check_square_block(kernel, groups, "an identity branch", name)
        kernel = kernel + identity_kernel(out, groups, k, kernel.dtype)
    if avg_pool:
        _check_square_block(kernel, groups, "an average-pool branch", name)
        kernel = kernel + avg_pool_kernel(out, groups, k, kernel.dtype)
    return fold_bn(kernel, post_bn, eps, bias=bias)
