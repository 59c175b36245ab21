"""Per-level raw pred maps of a v2.0 / v3.0 head -> flat anchor rows for the losses.

Row order is the decode order of :func:`cfws_jax.models.yolov6.head.decode_outputs` (level by level,
row-major y then x), so row ``n`` of the training targets is row ``n`` of the decoded prediction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from cfws_jax.models.yolov6.head import anchor_points, dfl_expectation, ltrb_to_xywh
from cfws_jax.train.boxes import xywh_to_xyxy


class FlatPreds(NamedTuple):
    """Flattened predictions of a batch, N = Σ H_i W_i anchors.

    cls: ``[B, N, nc]`` logits. reg: ``[B, N, 4 | 4*(reg_max+1)]`` raw regression channels.
    points: ``[N, 2]`` anchor points (cell centres) in pixels. strides: ``[N]`` pixels per cell.
    boxes: ``[B, N, 4]`` decoded x1y1x2y2 boxes in pixels.
    """

    cls: jnp.ndarray
    reg: jnp.ndarray
    points: jnp.ndarray
    strides: jnp.ndarray
    boxes: jnp.ndarray


def flatten_levels(levels, input_hw: tuple[int, int], reg_max: int = 0) -> FlatPreds:
    """``levels = [(cls [B,H,W,nc], reg [B,H,W,C], None), ...]`` (``YOLOv6(x, decode=False)``)
    -> :class:`FlatPreds`. Only the anchor-free v2.0+ head (no objectness map) trains here."""
    cls_rows, reg_rows, pts, strides = [], [], [], []
    for cls, reg, obj in levels:
        if obj is not None:
            raise ValueError("flatten_levels: the v1.0 head (objectness, exp-wh boxes) is not trained here")
        b, h, w, nc = cls.shape
        if input_hw[0] % h or input_hw[0] // h != input_hw[1] // w:
            raise ValueError(f"flatten_levels: map {h}x{w} is not an integer-stride level of input {input_hw}")
        s = input_hw[0] // h
        cls_rows.append(cls.reshape(b, h * w, nc))
        reg_rows.append(reg.reshape(b, h * w, reg.shape[-1]))
        pts.append(anchor_points(h, w, jnp.float32) * s)
        strides.append(jnp.full((h * w,), s, jnp.float32))
    cls, reg = jnp.concatenate(cls_rows, 1), jnp.concatenate(reg_rows, 1)
    points, stride = jnp.concatenate(pts, 0), jnp.concatenate(strides, 0)
    ltrb = dfl_expectation(reg, reg_max) if reg_max else reg
    boxes = xywh_to_xyxy(ltrb_to_xywh(ltrb * stride[:, None], points))
    return FlatPreds(cls, reg, points, stride, boxes)
