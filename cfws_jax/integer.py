"""Integer-arithmetic form of quantized convs (ALGORITHM.md §3.4): int8 x int8 -> int32.

A CFWS layer runs as two integer convs whose int32 accumulators carry different per-channel
scales, so they are rescaled before they are added (never summed as raw integers):

* coarse: for centre extraction, a **1x1 conv with the layer's stride and no padding** on the
  unpadded input (the centre tap of a pad-``k//2`` k x k conv reads input ``(s*y, s*x)``), so it
  costs ``1/k^2`` of the k x k conv; for the whole-kernel split, a second k x k conv;
* fine: the k x k conv with padding ``k//2``;
* ``y[o] = s_x * (s_c[o] * acc_c[o] + s_f[o] * acc_f[o]) + b[o]``.

Activations NHWC, kernels HWIO ``[k, k, I/groups, O]``. Codes may be any integer dtype; the
accumulation is exact int32 (``preferred_element_type``). Pure and jittable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfws_jax.cfws import CFWSWeights


def int_conv(x_codes, w_codes, strides: int = 1, padding: int = 0, groups: int = 1):
    """Exact int32 accumulators of ``conv(x_codes, w_codes)``; x NHWC, w HWIO.

    int8 operands stay int8 (the hardware case); any other integer codes (int16 weights,
    uint8 activations) are widened to int32 first.
    """
    x, w = jnp.asarray(x_codes), jnp.asarray(w_codes)
    if not (x.dtype == jnp.int8 and w.dtype == jnp.int8):
        x, w = x.astype(jnp.int32), w.astype(jnp.int32)
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(strides, strides), padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        preferred_element_type=jnp.int32)


def int_dense(x_codes, w_codes):
    """Exact int32 ``x_codes @ w_codes``; x ``[..., in]``, w ``[in, out]`` (int8 x int8 stays int8,
    other integer codes are widened to int32), via ``dot_general`` with int32 accumulation."""
    x, w = jnp.asarray(x_codes), jnp.asarray(w_codes)
    if not (x.dtype == jnp.int8 and w.dtype == jnp.int8):
        x, w = x.astype(jnp.int32), w.astype(jnp.int32)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def cfws_accumulators(x_codes, coarse_codes, fine_codes, strides: int = 1, groups: int = 1):
    """``(acc_coarse, acc_fine)`` int32 NHWC of a CFWS layer: the coarse centre codes ``[I/g, O]``
    as a 1x1 conv (same stride, no padding) -- or, full HWIO coarse codes (whole-kernel split),
    a second k x k conv -- and the fine k x k conv with padding ``k // 2``."""
    k = jnp.shape(fine_codes)[0]
    acc_f = int_conv(x_codes, fine_codes, strides, k // 2, groups)
    coarse = jnp.asarray(coarse_codes)
    if coarse.ndim == 2:  # centre extraction: [I/g, O] -> 1x1 conv on the unpadded input
        acc_c = int_conv(x_codes, coarse[None, None], strides, 0, groups)
    else:  # whole-kernel split: a second k x k conv
        acc_c = int_conv(x_codes, coarse, strides, k // 2, groups)
    return acc_c, acc_f


def plain_conv_integer(x_codes, x_scale, codes, scale, bias=None, *, strides: int = 1, padding: int | None = None,
                       groups: int = 1):
    """``s_x * s_w[o] * acc[o] + b[o]`` for a plain per-channel quantized kernel. Returns float32 NHWC."""
    k = jnp.shape(codes)[0]
    acc = int_conv(x_codes, codes, strides, k // 2 if padding is None else padding, groups)
    y = jnp.float32(x_scale) * jnp.asarray(scale, jnp.float32) * acc.astype(jnp.float32)
    return y if bias is None else y + jnp.asarray(bias, jnp.float32)


def cfws_conv_integer(x_codes, x_scale, w: CFWSWeights, bias=None, *, strides: int = 1, groups: int = 1):
    """CFWS conv in integer arithmetic: ``(y float32 NHWC, acc_coarse int32, acc_fine int32)``.

    The k x k conv uses padding ``k // 2`` (the only padding CFWS layers have).
    """
    acc_c, acc_f = cfws_accumulators(x_codes, w.coarse_codes, w.fine_codes, strides, groups)
    s_c = jnp.asarray(w.coarse_scale, jnp.float32)
    s_f = jnp.asarray(w.fine_scale, jnp.float32)
    y = jnp.float32(x_scale) * (s_c * acc_c.astype(jnp.float32) + s_f * acc_f.astype(jnp.float32))
    if bias is not None:
        y = y + jnp.asarray(bias, jnp.float32)
    return y, acc_c, acc_f
