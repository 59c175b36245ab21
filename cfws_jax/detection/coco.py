"""COCO scoring with pycocotools: class map, result JSON, the 12 standard bbox statistics.

Detections in COCO result format are ``{"image_id": int, "category_id": int,
"bbox": [x, y, w, h] (original image pixels, top-left corner), "score": float}``.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

COCO80_TO_COCO91 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)
"""COCO category id (1..90) of each of the 80 contiguous model classes."""

STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
"""Names of ``COCOeval.stats`` (bbox): AP@[.5:.95], AP@.5, AP@.75, AP by area, AR at 1/10/100
detections, AR by area (maxDets 100)."""

STAT_LABELS = (
    "AP @[IoU=0.50:0.95 | area=all | maxDets=100]", "AP @[IoU=0.50 | area=all | maxDets=100]",
    "AP @[IoU=0.75 | area=all | maxDets=100]", "AP @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]", "AP @[IoU=0.50:0.95 | area=large | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=1]", "AR @[IoU=0.50:0.95 | area=all | maxDets=10]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=100]", "AR @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]", "AR @[IoU=0.50:0.95 | area=large | maxDets=100]",
)


def class_to_category(category_ids, num_classes: int, where="annotations") -> np.ndarray:
    """int64 ``[num_classes]``: COCO category id of each model class.

    80 classes and a file with the standard 80 COCO ids: :data:`COCO80_TO_COCO91`; otherwise the
    file's category ids in increasing order, which must number ``num_classes``.
    """
    ids = sorted(int(c) for c in category_ids)
    if num_classes == 80 and set(COCO80_TO_COCO91) <= set(ids):
        return np.asarray(COCO80_TO_COCO91, np.int64)
    if len(ids) != num_classes:
        raise ValueError(f"{where}: the model predicts {num_classes} classes but the file lists "
                         f"{len(ids)} categories")
    return np.asarray(ids, np.int64)


def to_coco_results(image_id: int, boxes_xyxy, scores, classes, cat_map) -> list[dict]:
    """COCO result dicts of one image (bbox rounded to 3 decimals, score to 5, as upstream)."""
    b = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
    cats = np.asarray(cat_map)[np.asarray(classes, np.int64)]
    return [{"image_id": int(image_id), "category_id": int(c),
             "bbox": [round(float(v), 3) for v in box], "score": round(float(s), 5)}
            for box, s, c in zip(xywh, np.asarray(scores, np.float64), cats)]


def coco_from_dict(dataset: dict):
    """A ``pycocotools.coco.COCO`` built from an already parsed instances dict (quietly)."""
    try:
        from pycocotools.coco import COCO
    except ImportError as e:  # pragma: no cover - pycocotools is a declared dependency of the data extra
        raise ImportError("COCO evaluation needs pycocotools: pip install 'cfws-jax[data]'") from e

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(coco_gt, detections: list[dict], img_ids=None, log=None) -> dict:
    """pycocotools bbox evaluation of ``detections`` against ``coco_gt`` on ``img_ids``.

    Returns ``{"mAP": AP@[.5:.95], "mAP50": AP@.5, "stats": {name: value for STAT_NAMES}}``.
    pycocotools' printout goes to ``log`` (a text stream) or is discarded. No detections at
    all scores 0 on every category with ground truth (as pycocotools does for a category
    without detections).
    """
    from pycocotools.cocoeval import COCOeval

    out = log if log is not None else io.StringIO()
    with contextlib.redirect_stdout(out):
        if detections:
            coco_dt = coco_gt.loadRes([dict(d) for d in detections])  # loadRes adds keys in place
        else:
            from pycocotools.coco import COCO

            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                               "categories": list(coco_gt.dataset.get("categories", [])), "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if img_ids is not None:
            ev.params.imgIds = [int(i) for i in img_ids]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
    return {"mAP": stats["AP"], "mAP50": stats["AP50"], "stats": stats}


def format_stats(stats: dict) -> str:
    """The 12 statistics as a two-column text table."""
    return "\n".join(f"  {label:<50s} {stats[name]:.4f}" for name, label in zip(STAT_NAMES, STAT_LABELS))
