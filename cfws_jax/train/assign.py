"""Task-aligned assignment (TOOD, Feng et al. 2021; as used by YOLOv6 v2.0 / v3.0).

For every ground truth g and anchor n:

* candidate: the anchor point lies strictly inside g's box (and g is a real, unpadded box);
* alignment ``t = s^alpha * u^beta``, ``s`` = the predicted score of g's class at n, ``u`` =
  IoU(predicted box at n, g) (both treated as constants: no gradient);
* the ``topk`` candidates with the largest ``t`` (ties: lower anchor index first) are g's positives;
* an anchor positive for several gts keeps the one with the highest IoU (ties: lower gt index);
* the normalized target score of a positive ``n`` of g is ``t(n) / max_t(g) * max_u(g)``, the
  maxima over g's positives after the conflicts are resolved. Its class target is the one-hot of
  g's class scaled by that score (0 everywhere for negatives).

Static shapes: gts are padded to M with ``gt_mask``; :func:`assign_batch` vmaps over images.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cfws_jax.train.boxes import EPS, iou_pairwise


@dataclasses.dataclass(frozen=True)
class AssignConfig:
    """TOOD / YOLOv6 defaults: 13 candidates per gt, ``t = s^1 * u^6``."""

    topk: int = 13
    alpha: float = 1.0
    beta: float = 6.0


class Assignment(NamedTuple):
    """Targets of one image (leading ``[B]`` axis after :func:`assign_batch`).

    fg: ``[N]`` bool, positive anchors. gt_index: ``[N]`` int32, assigned gt (0 for negatives).
    labels: ``[N]`` int32 class (0 for negatives). boxes: ``[N, 4]`` x1y1x2y2 target boxes (the
    assigned gt's; zeros for negatives). scores: ``[N, nc]`` normalized target scores.
    """

    fg: jnp.ndarray
    gt_index: jnp.ndarray
    labels: jnp.ndarray
    boxes: jnp.ndarray
    scores: jnp.ndarray


def points_in_boxes(points, boxes, eps: float = EPS):
    """``points [N, 2]``, ``boxes [M, 4]`` -> ``[M, N]`` bool: point strictly inside the box."""
    d = jnp.concatenate([points[None] - boxes[:, None, :2], boxes[:, None, 2:] - points[None]], axis=-1)
    return jnp.min(d, axis=-1) > eps


def assign(pred_scores, pred_boxes, points, gt_boxes, gt_labels, gt_mask,
           cfg: AssignConfig = AssignConfig()) -> Assignment:
    """Task-aligned assignment of one image (see the module docstring).

    pred_scores ``[N, nc]`` probabilities (sigmoid); pred_boxes ``[N, 4]`` x1y1x2y2 pixels; points
    ``[N, 2]`` anchor points in pixels; gt_boxes ``[M, 4]``; gt_labels ``[M]`` int; gt_mask ``[M]``
    bool (False: padding).
    """
    pred_scores = jax.lax.stop_gradient(pred_scores)
    pred_boxes = jax.lax.stop_gradient(pred_boxes)
    n, nc = pred_scores.shape
    m = gt_boxes.shape[0]
    labels = jnp.clip(gt_labels.astype(jnp.int32), 0, nc - 1)
    cand = points_in_boxes(points, gt_boxes) & gt_mask[:, None]  # [M, N]
    ious = jnp.clip(iou_pairwise(gt_boxes, pred_boxes), 0.0)  # [M, N]
    s = pred_scores[:, labels].T  # [M, N]
    metric = s ** cfg.alpha * ious ** cfg.beta
    k = min(cfg.topk, n)
    # non-candidates rank below every candidate (metric >= 0); lax.top_k breaks ties by lower index
    _, top = jax.lax.top_k(jnp.where(cand, metric, -1.0), k)  # [M, k]
    in_top = jnp.zeros((m, n), bool).at[jnp.arange(m)[:, None], top].set(True)
    pos = in_top & cand  # [M, N]
    # an anchor claimed by several gts keeps the one with the highest IoU (argmax: lower index on ties)
    best = jnp.argmax(jnp.where(pos, ious, -1.0), axis=0)  # [N]
    fg = pos.any(axis=0)
    pos = pos & (jnp.arange(m)[:, None] == best[None, :])
    # normalized alignment per gt, over its final positives
    pm = jnp.where(pos, metric, 0.0)
    max_t = pm.max(axis=1, keepdims=True)
    max_u = jnp.where(pos, ious, 0.0).max(axis=1, keepdims=True)
    norm = (pm * max_u / (max_t + EPS)).max(axis=0)  # [N] (one gt per anchor)
    lab = jnp.where(fg, labels[best], 0)
    scores = jax.nn.one_hot(lab, nc, dtype=pred_scores.dtype) * jnp.where(fg, norm, 0.0)[:, None]
    boxes = jnp.where(fg[:, None], gt_boxes[best], 0.0)
    return Assignment(fg, jnp.where(fg, best, 0).astype(jnp.int32), lab.astype(jnp.int32), boxes, scores)


def assign_batch(pred_scores, pred_boxes, points, gt_boxes, gt_labels, gt_mask,
                 cfg: AssignConfig = AssignConfig()) -> Assignment:
    """:func:`assign` over a batch: ``[B, N, nc]``, ``[B, N, 4]``, shared ``points [N, 2]``,
    ``[B, M, 4]``, ``[B, M]``, ``[B, M]`` -> :class:`Assignment` with a leading ``[B]`` axis."""
    return jax.vmap(lambda ps, pb, gb, gl, gm: assign(ps, pb, points, gb, gl, gm, cfg))(
        pred_scores, pred_boxes, gt_boxes, gt_labels, gt_mask)
