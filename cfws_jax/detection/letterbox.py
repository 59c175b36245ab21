"""YOLOv6 evaluation letterbox (FORMATS.md §4.9) and its inverse box mapping.

An image ``uint8 [H, W, 3]`` (RGB) is resized so its long side is ``load_size`` (Pillow: box
(area) filter when shrinking, bilinear when enlarging), then placed, without further scaling,
at integer offsets ``((out - w) // 2, (out - h) // 2)`` on a square ``out x out`` canvas filled
with colour 114. The network input is ``canvas.astype(float32) / 255`` (NHWC, RGB, no mean/std).

The official canvas and load size per model are :func:`image_size_for` / :func:`load_size_for`
(640 canvas, P6 models 1280; FORMATS.md §4.9, FORMATS_YOLOV6_LARGE.md §4.11).

Boxes predicted on the canvas map back to the original image by ``(x - pad) / ratio``, clipped
to the image (:func:`scale_boxes`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PAD_COLOR = 114
DEFAULT_SIZE = 640

P6_SIZE = 1280

YOLOV6_LOAD_SIZE = {
    # v1.0 (0.1.0) has no reproduce_640_eval: the plain 640 letterbox
    "yolov6n_v1": 640, "yolov6t_v1": 640, "yolov6s_v1": 640,
    # v2.0 code (tags 0.2.x; FORMATS_YOLOV6_LARGE.md §4.11)
    "yolov6n_v2": 638, "yolov6t_v2": 634, "yolov6s_v2": 638, "yolov6m_v2": 628, "yolov6l_v2": 632,
    "yolov6l_relu_v2": 638,
    # 0.2.1 base models and the QARepVGG files: not listed by name, the "default" entry (inferred,
    # FORMATS_YOLOV6_QA.md §4.26)
    "yolov6m_base": 638, "yolov6l_base": 638,
    "yolov6n_qa": 638, "yolov6s_qa": 638, "yolov6m_qa": 638,
    "yolov6n_qav2": 638, "yolov6s_qav2": 638, "yolov6m_qav2": 638,
    # v3.0 code (tags 0.3.x; 0.4.x "shrink_size")
    "yolov6n_v3": 636, "yolov6s_v3": 634, "yolov6m_v3": 636, "yolov6l_v3": 636,
    # P6 (0.3.0), on a 1280 canvas
    "yolov6n6": 1263, "yolov6s6": 1272, "yolov6m6": 1216, "yolov6l6": 1239,
}
"""``test_load_size`` of the official ``--reproduce_640_eval`` protocol, per architecture, for its
official canvas (:func:`image_size_for`: 640, P6 1280)."""

YOLOV6_IMAGE_SIZE = {"yolov6n6": P6_SIZE, "yolov6s6": P6_SIZE, "yolov6m6": P6_SIZE, "yolov6l6": P6_SIZE}
"""Official evaluation canvas of the models not evaluated at 640 (P6: ``--img 1280``, LARGE §4.11)."""


class LetterboxInfo(NamedTuple):
    """How an ``orig_h x orig_w`` image sits on the canvas: canvas = orig * ratio + pad."""

    ratio: float
    pad_x: int
    pad_y: int
    orig_h: int
    orig_w: int


def image_size_for(arch: str | None) -> int:
    """The official evaluation canvas of ``arch``: 1280 for P6 models, else 640."""
    return YOLOV6_IMAGE_SIZE.get(arch, DEFAULT_SIZE)


def load_size_for(arch: str | None, out_size: int | None = None) -> int:
    """The official load size of ``arch`` on its official canvas (``out_size`` None or equal to
    :func:`image_size_for`); ``out_size`` for other canvas sizes or unknown architectures."""
    official = image_size_for(arch)
    if out_size is None or out_size == official:
        return YOLOV6_LOAD_SIZE.get(arch, official)
    return int(out_size)


def letterbox_geometry(orig_h: int, orig_w: int, out_size: int = DEFAULT_SIZE,
                       load_size: int | None = None) -> tuple[int, int, LetterboxInfo]:
    """(resized h, resized w, LetterboxInfo) for an ``orig_h x orig_w`` image.

    The long side becomes ``min(load_size, out_size)``; the short side ``round(short * ratio)``
    (at least 1).
    """
    out_size = int(out_size)
    load = out_size if load_size is None else min(int(load_size), out_size)
    if out_size < 1 or load < 1:
        raise ValueError(f"letterbox sizes must be >= 1, got out_size={out_size}, load_size={load_size}")
    if orig_h < 1 or orig_w < 1:
        raise ValueError(f"cannot letterbox an empty image of size {orig_w}x{orig_h}")
    long0 = max(orig_h, orig_w)
    ratio = load / long0
    h = load if orig_h == long0 else max(1, min(load, int(round(orig_h * ratio))))
    w = load if orig_w == long0 else max(1, min(load, int(round(orig_w * ratio))))
    info = LetterboxInfo(float(ratio), (out_size - w) // 2, (out_size - h) // 2, int(orig_h), int(orig_w))
    return h, w, info


def letterbox(image, out_size: int = DEFAULT_SIZE, load_size: int | None = None,
              color: int = PAD_COLOR) -> tuple[np.ndarray, LetterboxInfo]:
    """uint8 ``[H, W, 3]`` RGB (array or ``PIL.Image``) -> (canvas uint8 ``[out, out, 3]``, info)."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")
    w0, h0 = img.size
    h, w, info = letterbox_geometry(h0, w0, out_size, load_size)
    if (w, h) != (w0, h0):
        resample = Image.Resampling.BOX if info.ratio < 1 else Image.Resampling.BILINEAR
        img = img.resize((w, h), resample)
    canvas = np.full((int(out_size), int(out_size), 3), color, np.uint8)
    canvas[info.pad_y:info.pad_y + h, info.pad_x:info.pad_x + w] = np.asarray(img, np.uint8)
    return canvas, info


def scale_boxes(boxes_xyxy, info: LetterboxInfo) -> np.ndarray:
    """Canvas ``[N, 4]`` x1y1x2y2 -> original-image x1y1x2y2 (float64), clipped to the image."""
    b = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4).copy()
    b[:, [0, 2]] = (b[:, [0, 2]] - info.pad_x) / info.ratio
    b[:, [1, 3]] = (b[:, [1, 3]] - info.pad_y) / info.ratio
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, info.orig_w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, info.orig_h)
    return b


def to_canvas(boxes_xyxy, info: LetterboxInfo) -> np.ndarray:
    """Original-image ``[N, 4]`` x1y1x2y2 -> canvas x1y1x2y2 (the forward map; float64)."""
    b = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4) * info.ratio
    return b + np.array([info.pad_x, info.pad_y, info.pad_x, info.pad_y], np.float64)
