"""The YOLOv6 v2.0 / v3.0 training objective: varifocal classification loss, GIoU box loss and,
for a DFL head, distribution focal loss, weighted class 1.0 / IoU 2.5 / DFL 0.5.

Every piece is normalized by ``max(Σ target scores, 1)`` over the batch (the sum of the
assigner's normalized scores), as the papers' implementations do.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from cfws_jax.train.anchors import FlatPreds
from cfws_jax.train.assign import AssignConfig, Assignment, assign_batch
from cfws_jax.train.boxes import giou_elementwise


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights (YOLOv6: class 1.0, IoU 2.5, DFL 0.5), VFL alpha / gamma (VarifocalNet: 0.75, 2)
    and the assigner's settings."""

    cls_weight: float = 1.0
    iou_weight: float = 2.5
    dfl_weight: float = 0.5
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0
    assign: AssignConfig = AssignConfig()


def varifocal_loss(logits, target_scores, alpha: float = 0.75, gamma: float = 2.0):
    """Σ VFL (VarifocalNet, Zhang et al. 2021) over all entries, unnormalized.

    logits, target_scores ``[..., nc]``; ``q = target_scores`` (IoU-aware target, 0 for
    negatives), ``p = sigmoid(logits)``. Each entry is ``w · BCE(logits, q)`` with
    ``w = q`` where ``q > 0`` and ``w = alpha · p^gamma`` where ``q = 0``; ``w`` carries no gradient.
    """
    p = jax.nn.sigmoid(logits)
    w = jnp.where(target_scores > 0, target_scores, alpha * p ** gamma)
    bce = optax.sigmoid_binary_cross_entropy(logits, target_scores)
    return jnp.sum(jax.lax.stop_gradient(w) * bce)


def giou_loss(pred_boxes, target_boxes, weights, fg):
    """Σ over positives of ``(1 - GIoU(pred, target)) · weight``, unnormalized.

    pred_boxes, target_boxes ``[..., 4]`` x1y1x2y2; weights ``[...]`` (target score); fg ``[...]`` bool.
    """
    l = 1.0 - giou_elementwise(pred_boxes, target_boxes)
    return jnp.sum(jnp.where(fg, l * weights, 0.0))


def bbox_to_ltrb(points, boxes, strides, reg_max: int):
    """Target distances in stride units, clipped to ``[0, reg_max - 0.01]``: points ``[..., 2]``,
    boxes ``[..., 4]`` x1y1x2y2 pixels, strides ``[...]`` -> ``[..., 4]`` (l, t, r, b)."""
    d = jnp.concatenate([points - boxes[..., :2], boxes[..., 2:] - points], axis=-1) / strides[..., None]
    return jnp.clip(d, 0.0, reg_max - 0.01)


def dfl_loss(reg, target_ltrb, weights, fg, reg_max: int):
    """Σ over positives of the distribution focal loss (GFL, Li et al. 2020) · weight, unnormalized.

    reg ``[..., 4*(reg_max+1)]`` logits (channel ``side*(reg_max+1) + bin``); target_ltrb ``[..., 4]``
    in bins (``< reg_max``). Per side, with ``y_l = floor(y)``, ``y_r = y_l + 1``:
    ``(y_r - y)·CE(bins, y_l) + (y - y_l)·CE(bins, y_r)``; the 4 sides are averaged.
    """
    n = reg_max + 1
    logits = reg.reshape(*reg.shape[:-1], 4, n)
    left = jnp.floor(target_ltrb)
    wl, wr = left + 1 - target_ltrb, target_ltrb - left
    li = left.astype(jnp.int32)
    ce_l = optax.softmax_cross_entropy_with_integer_labels(logits, li)
    ce_r = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.minimum(li + 1, reg_max))
    l = jnp.mean(wl * ce_l + wr * ce_r, axis=-1)
    return jnp.sum(jnp.where(fg, l * weights, 0.0))


def detection_loss(preds: FlatPreds, gt_boxes, gt_labels, gt_mask, reg_max: int = 0,
                   cfg: LossConfig = LossConfig()):
    """Total loss of a batch and its pieces.

    preds: :class:`FlatPreds` (``[B, N, ...]``); gt_boxes ``[B, M, 4]`` x1y1x2y2 pixels, gt_labels
    ``[B, M]`` int, gt_mask ``[B, M]`` bool. Returns ``(loss, {"cls", "iou", "dfl", "fg"})`` with
    the pieces weighted as they enter ``loss`` and ``fg`` the number of positive anchors.
    """
    a: Assignment = assign_batch(jax.nn.sigmoid(preds.cls), preds.boxes, preds.points,
                                 gt_boxes, gt_labels, gt_mask, cfg.assign)
    a = jax.tree_util.tree_map(jax.lax.stop_gradient, a)
    norm = jnp.maximum(a.scores.sum(), 1.0)
    weights = a.scores.sum(-1)  # [B, N]
    cls = varifocal_loss(preds.cls, a.scores, cfg.vfl_alpha, cfg.vfl_gamma) / norm
    iou = giou_loss(preds.boxes, a.boxes, weights, a.fg) / norm
    if reg_max:
        tgt = bbox_to_ltrb(preds.points, a.boxes, preds.strides, reg_max)
        dfl = dfl_loss(preds.reg, tgt, weights, a.fg, reg_max) / norm
    else:
        dfl = jnp.zeros((), jnp.float32)
    pieces = {"cls": cfg.cls_weight * cls, "iou": cfg.iou_weight * iou, "dfl": cfg.dfl_weight * dfl,
              "fg": a.fg.sum().astype(jnp.float32)}
    return pieces["cls"] + pieces["iou"] + pieces["dfl"], pieces
