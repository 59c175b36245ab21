"""Axis-aligned boxes in ``x1, y1, x2, y2`` (pixels): conversions, IoU and GIoU.

All functions are pure ``jnp`` and broadcast over leading axes. ``EPS`` guards divisions.
"""

from __future__ import annotations

import jax.numpy as jnp

EPS = 1e-9


def xywh_to_xyxy(b):
    """``[..., 4]`` centre x, centre y, w, h -> x1, y1, x2, y2."""
    half = b[..., 2:4] / 2
    return jnp.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)


def area(b):
    """``[..., 4]`` -> ``[...]`` (negative extents count as 0)."""
    return jnp.clip(b[..., 2] - b[..., 0], 0) * jnp.clip(b[..., 3] - b[..., 1], 0)


def iou_elementwise(a, b, eps: float = EPS):
    """IoU of ``a [..., 4]`` and ``b [..., 4]`` row by row (broadcasting) -> ``[...]``."""
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    inter = jnp.prod(jnp.clip(rb - lt, 0), axis=-1)
    return inter / (area(a) + area(b) - inter + eps)


def iou_pairwise(a, b, eps: float = EPS):
    """IoU of every pair: ``a [M, 4]``, ``b [N, 4]`` -> ``[M, N]``."""
    return iou_elementwise(a[:, None, :], b[None, :, :], eps)


def giou_elementwise(a, b, eps: float = EPS):
    """Generalized IoU (Rezatofighi et al. 2019) row by row: ``IoU - (C - U) / C`` with C the area
    of the smallest enclosing box and U the union; ``[..., 4]`` x2 -> ``[...]`` in (-1, 1]."""
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    inter = jnp.prod(jnp.clip(rb - lt, 0), axis=-1)
    union = area(a) + area(b) - inter + eps
    iou = inter / union
    c_lt = jnp.minimum(a[..., :2], b[..., :2])
    c_rb = jnp.maximum(a[..., 2:], b[..., 2:])
    c_area = jnp.prod(jnp.clip(c_rb - c_lt, 0), axis=-1) + eps
    return iou - (c_area - union) / c_area
