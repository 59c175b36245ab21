"""Multi-label, class-offset batched NMS with the official YOLOv6 evaluation settings
(FORMATS.md §4.9), vectorised NumPy on the host.

Per image, from the decoded prediction ``[N, 5 + nc]`` (``cx, cy, w, h`` in input pixels,
confidence column, class scores):

1. candidates: rows with ``conf > conf_thres``; score ``s[n, c] = cls[n, c] * conf[n]``
   (float32); every ``(n, c)`` with ``s > conf_thres`` is one candidate (multi-label), in
   row-major order (box, then class);
2. more than ``max_nms`` candidates: the ``max_nms`` best scores are kept;
3. greedy NMS on boxes offset by ``class * max_wh`` (boxes of different classes never overlap):
   candidates in descending score order, ties by candidate order (stable sort); a candidate is
   dropped when its IoU (float64) with a kept one is ``> iou_thres``; the first ``max_det`` kept
   are returned, best first.

The official code's 10 s time limit is not reproduced.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

CONF_THRES = 0.03
IOU_THRES = 0.65
MAX_DET = 300
MAX_NMS = 30000
MAX_WH = 4096


class Detections(NamedTuple):
    """Kept detections of one image, best first: boxes ``float64 [K, 4]`` x1y1x2y2, scores
    ``float32 [K]``, classes ``int64 [K]`` (0-based model class index)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def empty_detections() -> Detections:
    return Detections(np.zeros((0, 4), np.float64), np.zeros((0,), np.float32), np.zeros((0,), np.int64))


def xywh_to_xyxy(xywh) -> np.ndarray:
    """``[..., 4]`` centre x, centre y, w, h -> x1, y1, x2, y2 (same dtype)."""
    xywh = np.asarray(xywh)
    half = xywh[..., 2:4] / 2
    return np.concatenate([xywh[..., 0:2] - half, xywh[..., 0:2] + half], axis=-1)


def candidates(pred, conf_thres: float = CONF_THRES):
    """(boxes xyxy float32 [M, 4], scores float32 [M], classes int64 [M]) of step 1."""
    pred = np.asarray(pred, np.float32)
    if pred.ndim != 2 or pred.shape[1] < 6:
        raise ValueError(f"expected a decoded prediction [N, 5 + classes], got shape {pred.shape}")
    x = pred[pred[:, 4] > np.float32(conf_thres)]
    scores = x[:, 5:] * x[:, 4:5]
    box_idx, cls_idx = np.nonzero(scores > np.float32(conf_thres))
    return xywh_to_xyxy(x[box_idx, :4]), scores[box_idx, cls_idx], cls_idx.astype(np.int64)


def _pair_iou(a, area_a, b, area_b) -> np.ndarray:
    """IoU ``[len(a), len(b)]`` of x1y1x2y2 boxes: ``inter / (area_a + area_b - inter)``."""
    iw = np.maximum(0.0, np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]))
    ih = np.maximum(0.0, np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]))
    inter = iw * ih
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def greedy_nms(boxes, scores, iou_thres: float = IOU_THRES, max_det: int = MAX_DET,
               chunk: int = 512) -> np.ndarray:
    """Indices into ``boxes`` (float64 [M, 4] x1y1x2y2) kept by greedy NMS, best first.

    Order: descending score, ties by index. A box is dropped when IoU > ``iou_thres`` with an
    earlier kept box; stops after ``max_det`` kept. Works on ``chunk`` candidates at a time:
    IoU against the boxes kept so far, then the greedy pass inside the chunk.
    """
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    b = np.asarray(boxes, np.float64)[order]
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    kept: list[int] = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for s in range(0, len(b), chunk):
            if len(kept) >= max_det:
                break
            cb, ca = b[s:s + chunk], areas[s:s + chunk]
            alive = np.ones(len(cb), bool)
            if kept:
                k = np.asarray(kept)
                alive &= ~(_pair_iou(b[k], areas[k], cb, ca) > iou_thres).any(axis=0)
            if not alive.any():
                continue
            over = _pair_iou(cb, ca, cb, ca) > iou_thres  # over[i, j]: i (earlier) drops j
            for i in range(len(cb)):
                if alive[i]:
                    kept.append(s + i)
                    if len(kept) >= max_det:
                        break
                    alive[i + 1:] &= ~over[i, i + 1:]
    return order[np.asarray(kept, np.int64)]


def top_candidates(scores, k: int) -> np.ndarray:
    """Indices (increasing) of the ``k`` best scores, ties at the cut taken by lower index."""
    neg = -np.asarray(scores, np.float64)
    cut = np.partition(neg, k - 1)[k - 1]
    better = np.flatnonzero(neg < cut)
    tied = np.flatnonzero(neg == cut)[:k - len(better)]
    return np.sort(np.concatenate([better, tied]))


def nms(pred, conf: float = CONF_THRES, iou: float = IOU_THRES, max_det: int = MAX_DET,
        max_nms: int = MAX_NMS, max_wh: int = MAX_WH) -> Detections:
    """Official-settings NMS of one image's decoded prediction ``[N, 5 + nc]`` (module doc:
    ``conf`` = conf_thres, ``iou`` = iou_thres)."""
    boxes, scores, classes = candidates(pred, conf)
    if not len(scores):
        return empty_detections()
    if len(scores) > max_nms:
        top = top_candidates(scores, max_nms)
        boxes, scores, classes = boxes[top], scores[top], classes[top]
    offset = boxes.astype(np.float64) + (classes.astype(np.float64) * max_wh)[:, None]
    keep = greedy_nms(offset, scores, iou, max_det)
    return Detections(boxes[keep].astype(np.float64), scores[keep], classes[keep])


def nms_batch(preds, **kwargs) -> list[Detections]:
    """:func:`nms` of every image of ``[B, N, 5 + nc]``."""
    return [nms(p, **kwargs) for p in np.asarray(preds)]
