"""Object detection (YOLOv6) evaluation: letterbox preprocessing, NMS, COCO scoring.

    canvas, info = letterbox(image_uint8_hwc_rgb, out_size=640, load_size=638)
    det = nms(pred_n_85)                      # Detections(boxes xyxy, scores, classes)
    boxes = scale_boxes(det.boxes, info)      # back to original image pixels
    res = evaluate_detector(apply_fn, CocoSource(images, "instances.json"))  # mAP, mAP50, stats

See FORMATS.md §4.9 for the official protocol these follow.
"""

from cfws_jax.detection.coco import (
    COCO80_TO_COCO91, STAT_NAMES, class_to_category, coco_evaluate, format_stats, to_coco_results,
)
from cfws_jax.detection.letterbox import (
    YOLOV6_IMAGE_SIZE, YOLOV6_LOAD_SIZE, LetterboxInfo, image_size_for, letterbox, letterbox_geometry, load_size_for,
    scale_boxes, to_canvas,
)
from cfws_jax.detection.nms import Detections, nms, nms_batch

__all__ = [
    "COCO80_TO_COCO91", "STAT_NAMES", "class_to_category", "coco_evaluate", "format_stats", "to_coco_results",
    "YOLOV6_IMAGE_SIZE", "YOLOV6_LOAD_SIZE", "LetterboxInfo", "image_size_for", "letterbox", "letterbox_geometry",
    "load_size_for", "scale_boxes",
    "to_canvas", "Detections", "nms", "nms_batch", "evaluate_detector",
]


def __getattr__(name):  # evaluate_detector imports jax: load it on first use
    if name == "evaluate_detector":
        from cfws_jax.detection.evaluate import evaluate_detector

        return evaluate_detector
    raise AttributeError(name)
