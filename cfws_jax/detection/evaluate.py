"""COCO mAP of a detector: jitted forward on the device, NMS and box rescaling on the host,
pycocotools scoring.

``apply_fn(images float32 [B, S, S, 3] in [0, 1]) -> decoded [B, N, 5 + nc]`` (xywh in input
pixels, confidence column, class scores; see :mod:`cfws_jax.models.yolov6.model`). Batches are padded to ``batch_size``
so the step compiles once; the next batch is decoded on a host thread and dispatched before the
previous one is post-processed, so loading, the device and NMS overlap.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from cfws_jax.detection.coco import class_to_category, coco_evaluate, to_coco_results
from cfws_jax.detection.letterbox import scale_boxes
from cfws_jax.detection.nms import CONF_THRES, IOU_THRES, MAX_DET, MAX_NMS, nms
from cfws_jax.data.source import describe_subset, excluded_note, num_excluded
from cfws_jax.progress import Progress


def _forward(fn, canvases):
    return fn(canvases.astype(jnp.float32) / jnp.float32(255.0))


def make_detect_step(apply_fn):
    """Jitted ``step(canvases uint8 [B, S, S, 3]) -> apply_fn(canvases / 255)``.

    A ``jax.tree_util.Partial`` travels as an argument (its arrays are not baked in as
    constants); any other callable is closed over.
    """
    if isinstance(apply_fn, jax.tree_util.Partial):
        step = jax.jit(_forward)
        return lambda x: step(apply_fn, x)
    return jax.jit(lambda x: _forward(apply_fn, x))


def _pad(canvases: np.ndarray, batch_size: int) -> np.ndarray:
    b = len(canvases)
    if b < batch_size:
        canvases = np.concatenate([canvases, np.zeros((batch_size - b,) + canvases.shape[1:], np.uint8)])
    return canvases


def detect_batch(preds, infos, image_ids, cat_map, *, conf: float = CONF_THRES, iou: float = IOU_THRES,
                 max_det: int = MAX_DET, max_nms: int = MAX_NMS, pool=None) -> list[dict]:
    """COCO result dicts of a batch of decoded predictions ``[b, N, 5 + nc]`` (canvas pixels);
    ``pool``: an executor to run the per-image NMS on (order is kept)."""
    def one(k):
        det = nms(preds[k], conf, iou, max_det, max_nms)
        return to_coco_results(image_ids[k], scale_boxes(det.boxes, infos[k]), det.scores, det.classes, cat_map)

    ks = range(len(image_ids))
    per_image = pool.map(one, ks) if pool is not None else map(one, ks)
    return [d for dets in per_image for d in dets]


def evaluate_detector(apply_fn, source, *, batch_size: int = 32, limit: int | None = None,
                      progress: bool = True, conf: float = CONF_THRES, iou: float = IOU_THRES,
                      max_det: int = MAX_DET, max_nms: int = MAX_NMS, log=None, mesh=None,
                      subset: str = "balanced") -> dict:
    """COCO bbox mAP of ``apply_fn`` on ``limit`` images of a :class:`cfws_jax.data.coco.CocoSource`
    (COCOeval restricted to those image ids): evenly strided over the folder (``subset="balanced"``)
    or the first ones in file-name order (``"first"``); all images when ``limit`` is None.

    Returns ``{"mAP", "mAP50", "stats": {12 COCO numbers}, "images", "detections",
    "results": [COCO result dicts], "subset": one line saying which images}``. pycocotools' printout goes to ``log`` (or is dropped).
    ``mesh``: a :func:`cfws_jax.parallel.local_mesh` (or a device count): the forward runs data
    parallel (``batch_size`` rounded up to a multiple of the device count, batches sharded, a
    ``Partial``'s arrays replicated); NMS and scoring stay on the host, padding rows dropped.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = int(batch_size)
    chosen = source.subset(limit, subset)
    total = len(chosen)
    if total == 0:
        raise ValueError(f"{source.spec}: no images to evaluate")
    put = lambda a: a  # noqa: E731
    if mesh is not None:
        from cfws_jax import parallel

        mesh = parallel.local_mesh(mesh)
        if isinstance(apply_fn, jax.tree_util.Partial):
            apply_fn = parallel.replicate(apply_fn, mesh)
        put = lambda a: jax.device_put(a, parallel.batch_sharding(mesh))  # noqa: E731
        batch_size = parallel.padded_size(batch_size, mesh)
    step = make_detect_step(apply_fn)
    starts = list(range(0, total, batch_size))
    bar = Progress(total=total, desc="eval", unit="img", disable=not progress)
    results: list[dict] = []
    state = {"cat_map": None}

    def collect(out, infos, ids):
        preds = np.asarray(jax.device_get(out)) if mesh is None else parallel.to_host(out, mesh)
        if preds.ndim != 3 or preds.shape[0] != batch_size or preds.shape[-1] < 6:
            raise ValueError(f"apply_fn must return decoded predictions [B={batch_size}, N, 5 + classes], "
                             f"got shape {preds.shape}")
        if state["cat_map"] is None:
            state["cat_map"] = class_to_category(source.category_ids, preds.shape[-1] - 5, source.annotations)
        results.extend(detect_batch(preds[:len(ids)], infos, ids, state["cat_map"], conf=conf, iou=iou,
                                    max_det=max_det, max_nms=max_nms, pool=nms_pool))
        bar.update(len(ids))

    load = lambda s: source.load(chosen[s:s + batch_size])  # noqa: E731
    pending = None
    try:
        with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(max(1, min(8, (os.cpu_count() or 1) - 1))) as nms_pool:
            nxt = pool.submit(load, starts[0])
            for k in range(len(starts)):
                canvases, infos, ids = nxt.result()
                if k + 1 < len(starts):
                    nxt = pool.submit(load, starts[k + 1])
                out = step(put(_pad(canvases, batch_size)))  # dispatched asynchronously
                if pending is not None:
                    collect(*pending)  # the previous batch, while this one runs
                pending = (out, infos, ids)
            collect(*pending)
    finally:
        bar.close()
    res = coco_evaluate(source.coco, results, img_ids=source.image_ids[chosen], log=log)
    return {**res, "images": total, "detections": len(results), "results": results,
            "subset": describe_subset(chosen, source.num_images, excluded=num_excluded(source)) + excluded_note(source)}
