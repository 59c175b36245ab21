"""Efficient decoupled head (``detect``, FORMATS.md §4.4) and the pure-jnp decode pieces.

Per level i (input channels ``C_i`` = ch6 / ch8 / ch10): ``stems_i`` (1x1), ``cls_convs_i`` and
``reg_convs_i`` (3x3), all Conv-BN-SiLU (:class:`ConvBNAct` ``act="silu"``); then the pred convs
``cls_preds_i`` (1x1 -> nc), ``reg_preds_i`` (1x1 -> 4, or ``4*(reg_max+1)`` for DFL) and, v1.0
only, ``obj_preds_i`` (1x1 -> 1): QConv with bias, no activation, ``is_output=True``.
``cls_preds`` reads the cls branch, ``reg_preds`` and ``obj_preds`` the reg branch.

Decode (level by level, row-major y then x within a level; stride = input size / map size):

* v1.0: grid ``(x, y)``; ``xy = (reg[:2] + grid)·s``, ``wh = exp(reg[2:4])·s``; row
  ``[xywh, sigmoid(obj), sigmoid(cls)]``.
* v2.0+: anchor points ``(x + 0.5, y + 0.5)``; ltrb distances (DFL: softmax over ``reg_max+1``
  bins, channel ``side*(reg_max+1) + bin``, dotted with ``0..reg_max``); ``x1y1 = p − lt``,
  ``x2y2 = p + rb`` -> xywh, times stride; row ``[xywh, 1, sigmoid(cls)]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfws_jax.models.layers import QConv
from cfws_jax.models.yolov6.blocks import ConvBNAct


def grid_points(h: int, w: int, offset: float = 0.0, dtype=jnp.float32):
    """``[h*w, 2]`` points ``(x + offset, y + offset)``, row-major (y outer, x inner)."""
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=dtype), jnp.arange(w, dtype=dtype), indexing="ij")
    return jnp.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1) + offset


def anchor_points(h: int, w: int, dtype=jnp.float32):
    """v2.0+ anchor points: cell centres ``(x + 0.5, y + 0.5)`` in grid units, ``[h*w, 2]``."""
    return grid_points(h, w, 0.5, dtype)


def dfl_expectation(reg, reg_max: int = 16):
    """DFL: ``[..., 4*(reg_max+1)]`` logits (channel ``side*(reg_max+1) + bin``, sides l, t, r, b)
    -> ``[..., 4]`` expected distances ``Σ softmax(bins)·[0..reg_max]``."""
    n = reg_max + 1
    if reg.shape[-1] != 4 * n:
        raise ValueError(
            f"dfl_expectation: expected {4 * n} channels for reg_max={reg_max}, got shape {tuple(reg.shape)}"
        )
    p = jax.nn.softmax(reg.reshape(*reg.shape[:-1], 4, n), axis=-1)
    return p @ jnp.arange(n, dtype=reg.dtype)


def ltrb_to_xywh(ltrb, points):
    """Distances ``[..., 4]`` (l, t, r, b) from ``points [..., 2]`` -> ``[..., 4]`` (cx, cy, w, h)."""
    x1y1 = points - ltrb[..., :2]
    x2y2 = points + ltrb[..., 2:]
    return jnp.concatenate([(x1y1 + x2y2) / 2, x2y2 - x1y1], axis=-1)


def decode_v1_boxes(reg, grid, stride):
    """v1.0 boxes: ``reg [..., 4]`` (dx, dy, log w, log h), ``grid [..., 2]`` -> xywh in pixels."""
    return jnp.concatenate([(reg[..., :2] + grid) * stride, jnp.exp(reg[..., 2:4]) * stride], axis=-1)


def decode_level(cls, reg, obj, stride: float, reg_max: int = 0):
    """One level's NHWC pred maps -> ``[B, H*W, 5 + nc]`` rows (see the module docstring).

    cls ``[B, H, W, nc]``; reg ``[B, H, W, 4 | 4*(reg_max+1)]``; obj ``[B, H, W, 1]`` (v1.0) or None.
    """
    b, h, w, nc = cls.shape
    cls = cls.reshape(b, h * w, nc)
    reg = reg.reshape(b, h * w, reg.shape[-1])
    if obj is not None:
        box = decode_v1_boxes(reg, grid_points(h, w, 0.0, reg.dtype), stride)
        conf = jax.nn.sigmoid(obj.reshape(b, h * w, 1))
    else:
        ltrb = dfl_expectation(reg, reg_max) if reg_max else reg
        box = ltrb_to_xywh(ltrb, anchor_points(h, w, reg.dtype)) * stride
        conf = jnp.ones((b, h * w, 1), cls.dtype)
    return jnp.concatenate([box, conf, jax.nn.sigmoid(cls)], axis=-1)


def decode_outputs(levels, input_hw: tuple[int, int], reg_max: int = 0):
    """Concatenate :func:`decode_level` over ``levels`` = ``[(cls, reg, obj|None), ...]`` (strides 8,
    16, 32 order); each stride is ``input_h / map_h`` (ValueError if it is not the same integer in
    both axes). Returns ``[B, Σ H_i W_i, 5 + nc]``."""
    outs = []
    for cls, reg, obj in levels:
        h, w = cls.shape[1:3]
        if input_hw[0] % h or input_hw[1] % w or input_hw[0] // h != input_hw[1] // w:
            raise ValueError(f"decode_outputs: map {h}x{w} is not an integer-stride level of input {input_hw}")
        outs.append(decode_level(cls, reg, obj, float(input_hw[0] // h), reg_max))
    return jnp.concatenate(outs, axis=1)


class Detect(nn.Module):
    """The ``detect`` head: NHWC feature maps (strides 8 / 16 / 32) -> per-level ``(cls, reg, obj)``
    raw pred maps (obj None unless ``v1``). See the module docstring for names."""

    num_classes: int
    reg_channels: int = 4
    v1: bool = False
    deploy: bool = False

    @nn.compact
    def __call__(self, feats, train: bool = False):
        outs = []
        for i, x in enumerate(feats):
            c = x.shape[-1]
            x = ConvBNAct(c, 1, act="silu", deploy=self.deploy, name=f"stems_{i}")(x, train)
            cls_feat = ConvBNAct(c, 3, act="silu", deploy=self.deploy, name=f"cls_convs_{i}")(x, train)
            reg_feat = ConvBNAct(c, 3, act="silu", deploy=self.deploy, name=f"reg_convs_{i}")(x, train)
            cls = QConv(self.num_classes, 1, 1, 0, is_output=True, name=f"cls_preds_{i}")(cls_feat)
            reg = QConv(self.reg_channels, 1, 1, 0, is_output=True, name=f"reg_preds_{i}")(reg_feat)
            obj = QConv(1, 1, 1, 0, is_output=True, name=f"obj_preds_{i}")(reg_feat) if self.v1 else None
            outs.append((cls, reg, obj))
        return outs
