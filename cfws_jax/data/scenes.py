"""Synthetic detection scenes made of CIFAR-10 images (issue 21).

**What this is.** A deterministic generator of detection scenes: a square canvas with a
procedural background and 1 to ``max_objects`` CIFAR-10 images pasted on it, each resized to a
random size with some aspect-ratio jitter; an object's box is its pasted rectangle, its class
its CIFAR-10 label. It is a *synthetic set built from CIFAR-10 images*, meant to compare a float
detector with its quantized versions on something a detector can actually learn here. Its mAP is
**never to be quoted as COCO accuracy**: the objects are 32x32 thumbnails upsampled, the
backgrounds are smooth noise, the 10 classes are CIFAR's.

**Canvas and sizes.** Default canvas 256 px (a multiple of 32, the YOLOv6 stride): big enough
for objects from 24 px (small, about two P3 cells) to 160 px (large, most of a P5 receptive
field) and 1-6 objects, small enough to train a YOLOv6n on CPU in hours (a 256 canvas costs
1/6 of a 640 one). Sizes are fractions of the canvas (``min_size=24/256``, ``max_size=160/256``),
so a smaller canvas (128 or 160, for CPU training) scales the objects with it. An object's
size ``sqrt(w * h)`` is log-uniform in ``[min_size, max_size] * canvas`` (as many small as large
objects per octave); its aspect ``w / h`` is log-uniform in ``[1 / (1 + j), 1 + j]``,
``j = aspect_jitter``.

**Overlap rule.** Objects are pasted in order, later ones on top (opaque: they hide what they
cover). A candidate placement is rejected and redrawn (up to ``max_tries`` times, then that
object is skipped) if it would leave any *earlier* object with less than ``min_visible``
(default 0.7) of its box area visible, counting every pixel hidden by all later objects. This
bounds what is actually lost to occlusion, which an IoU threshold does not (a small object
pasted inside a big one has a low IoU but may hide its only distinctive part - and, conversely,
a small earlier object under a big later one is fully hidden at IoU < 0.5). It also implies a
pairwise IoU of at most ``1 - min_visible`` (0.3): the intersection is at most
``(1 - min_visible) * area(earlier)`` and the union at least ``area(earlier)``, so NMS at the
usual 0.65 never suppresses a true neighbour. Boxes are the full pasted rectangles (amodal).
The first object always fits, so a scene has at least one object.

**Data hygiene.** Train scenes draw objects only from the train split passed in, held-out
scenes only from the test split (the caller passes the arrays of that split; ``split`` picks
the random stream). Backgrounds are procedural (a low-frequency colour field, a few soft
ellipses, light noise), never made of CIFAR pixels. Source images are drawn uniformly over the
split (CIFAR-10 is balanced, so the classes are too).

**Determinism.** Scene ``i`` of ``(split, seed)`` depends only on ``(seed, split, i)`` and the
arrays: its layout comes from ``np.random.default_rng([seed, split_id, i, 0])`` and its
background from ``[..., 1]``, using only ``Generator.random`` (uniform doubles, stable across
NumPy versions), and images are resized with a pure-NumPy float64 bilinear resampler
(:func:`resize_bilinear`), so batches can be generated in any order or size, bit-identical on
every machine. (The JPEGs :func:`write_coco_scenes` writes depend on the JPEG encoder.)

Usage::

    x, y = load_cifar_split("cifar10.npz", "train")          # held-out scenes: "test"
    cfg = SceneConfig(canvas=128)                               # CPU training
    for batch in iter_scene_batches(x, y, split="train", seed=0, cfg=cfg, batch_size=32):
        batch["images"], batch["boxes"], batch["classes"], batch["mask"]
    write_coco_scenes("held_out/", xt, yt, split="test", seed=0, cfg=cfg, count=1000,
                      class_names=CIFAR10_CLASSES)              # or: cfws-jax scenes ...

Generation costs about 6-9 ms per 256 px scene and 2-3 ms per 128 px scene (one core of a
busy 2-core CPU): far below a training step.

Layouts: images uint8 ``[S, S, 3]`` (HWC, RGB); boxes float32 ``[n, 4]`` x1y1x2y2 in canvas
pixels (integer-valued, ``0 <= x1 < x2 <= S``); classes int32 ``[n]`` (CIFAR label 0..9).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import zipfile
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from cfws_jax.data.errors import DataError

SPLIT_IDS = {"train": 0, "test": 1}
"""The ``split_id`` mixed into every scene's seed."""

JPEG_QUALITY = 95
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_DIR = "images"
ANNOTATIONS_FILE = "instances.json"


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn (see the module docstring for the rules and why).

    ``canvas``: side in pixels, a multiple of 32. ``min_objects`` / ``max_objects``: the target
    object count is uniform in this range (an object that finds no place in ``max_tries`` draws
    is skipped). ``min_size`` / ``max_size``: object size ``sqrt(w * h)`` as a fraction of
    ``canvas`` (log-uniform). ``aspect_jitter``: ``w / h`` log-uniform in ``[1/(1+j), 1+j]``.
    ``min_visible``: the fraction of every earlier box that must stay visible.
    ``background_noise``: amplitude (grey levels) of the uniform pixel noise on the background.
    """

    canvas: int = 256
    min_objects: int = 1
    max_objects: int = 6
    min_size: float = 24 / 256
    max_size: float = 160 / 256
    aspect_jitter: float = 0.3
    min_visible: float = 0.7
    max_tries: int = 30
    background_noise: float = 8.0

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"SceneConfig: {msg}")

        if not isinstance(self.canvas, int) or self.canvas < 32 or self.canvas % 32:
            bad(f"canvas must be a positive multiple of 32, got {self.canvas!r}")
        if not 1 <= self.min_objects <= self.max_objects:
            bad(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_size <= self.max_size <= 1:
            bad(f"need 0 < min_size <= max_size <= 1 (fractions of the canvas), got {self.min_size}, {self.max_size}")
        if self.min_size * self.canvas < 4:
            bad(f"min_size {self.min_size} gives objects under 4 px on a {self.canvas} px canvas")
        if not 0 <= self.aspect_jitter <= 3:
            bad(f"aspect_jitter must be in [0, 3], got {self.aspect_jitter}")
        if not 0 < self.min_visible <= 1:
            bad(f"min_visible must be in (0, 1], got {self.min_visible}")
        if self.max_tries < 1:
            bad(f"max_tries must be >= 1, got {self.max_tries}")
        if not 0 <= self.background_noise <= 64:
            bad(f"background_noise must be in [0, 64], got {self.background_noise}")


class Placement(NamedTuple):
    """One pasted object: ``source`` index into the split's arrays, its rectangle
    ``[x1, x2) x [y1, y2)`` in canvas pixels, and the fraction of it visible in the final scene."""

    source: int
    x1: int
    y1: int
    x2: int
    y2: int
    visible: float


# --------------------------------------------------------------------------- loading


def load_cifar_split(npz_path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 ``[N, 32, 32, 3]`` NHWC RGB, labels int32 ``[N]``) of ``split``
    (``"train"`` or ``"test"``) of a CIFAR-style ``.npz``; DataError naming the file and key."""
    from cfws_jax.data.npz import read_npz_split

    _split_id(split)
    path = Path(npz_path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR .npz {path} does not exist")
    try:
        x, y, _, _ = read_npz_split(path, split)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable CIFAR .npz ({type(e).__name__}: {e})") from None
    return x, y


def load_class_names(npz_path) -> list[str]:
    """The ``classes`` array of a CIFAR-style ``.npz`` (read alone), or :data:`CIFAR10_CLASSES`
    when the file has none."""
    path = Path(npz_path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return [str(c) for c in z["classes"]] if "classes" in z.files else list(CIFAR10_CLASSES)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read 'classes' ({type(e).__name__}: {e})") from None


def _split_id(split: str) -> int:
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return SPLIT_IDS[split]


def _check_arrays(images, labels) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"scene source images must be uint8 [N, H, W, 3] with N >= 1, got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"scene source labels must be integer [{len(images)}], got {labels.dtype} {labels.shape}")
    return images, labels


# --------------------------------------------------------------------------- pixels


def _bilinear(f: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """float64 ``[h, w, c]`` -> float64 ``[out_h, out_w, c]`` (see :func:`resize_bilinear`)."""
    h, w = f.shape[:2]

    def axis(n_in, n_out):
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0.0, n_in - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(h, out_h)
    x0, x1, wx = axis(w, out_w)
    rows = f[y0] * (1.0 - wy)[:, None, None] + f[y1] * wy[:, None, None]
    return rows[:, x0] * (1.0 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of uint8 ``[h, w, c]`` to uint8 ``[out_h, out_w, c]``, pure NumPy.

    Half-pixel centres (source ``(x + 0.5) * w / out_w - 0.5``, clamped at the borders), no
    antialiasing, float64 arithmetic, round half to even: the same bytes on every machine.
    """
    out = _bilinear(np.asarray(image).astype(np.float64), out_h, out_w)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, s: int, noise: float) -> np.ndarray:
    """Procedural uint8 ``[s, s, 3]``: a low-frequency colour field (a 2..5-cell grid of random
    colours) with 0..3 soft-edged ellipses of random colour, drawn at 1/4 resolution and
    bilinearly upsampled, plus uniform pixel noise of amplitude ``noise``."""
    g = 2 + int(rng.random() * 4)
    low = s // 4
    bg = _bilinear(rng.random((g, g, 3)) * 255.0, low, low)
    yy, xx = np.mgrid[0:low, 0:low].astype(np.float64) + 0.5
    for _ in range(int(rng.random() * 4)):
        cx, cy, rx, ry, alpha = rng.random(5)
        cx, cy = cx * low, cy * low
        rx, ry = (0.05 + 0.3 * rx) * low, (0.05 + 0.3 * ry) * low
        colour = rng.random(3) * 255.0
        d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        a = (0.3 + 0.5 * alpha) * np.clip((1.0 - d) * 4.0, 0.0, 1.0)  # soft edge
        bg += a[..., None] * (colour - bg)
    bg = _bilinear(bg, s, s)
    if noise:
        bg += (rng.random((s, s, 3)) * 2.0 - 1.0) * noise
    return np.clip(np.rint(bg), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- layout


def _rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    key = [int(seed), _split_id(split), int(index)]
    if min(key) < 0:
        raise ValueError(f"seed and scene index must be >= 0, got seed {seed}, index {index}")
    return np.random.default_rng(key + [0]), np.random.default_rng(key + [1])


def scene_layout(num_images: int, index: int, *, split: str, seed: int,
                 cfg: SceneConfig = SceneConfig()) -> list[Placement]:
    """The placement plan of scene ``index``: which source images (indices into the split's
    ``num_images`` images) go where, in paste order (later ones on top), with each one's final
    visible fraction. Depends only on ``(num_images, index, split, seed, cfg)``."""
    if num_images < 1:
        raise ValueError("scene_layout needs at least one source image")
    rng, _ = _rngs(seed, split, index)
    s = cfg.canvas
    n_target = cfg.min_objects + int(rng.random() * (cfg.max_objects - cfg.min_objects + 1))
    owner = np.full((s, s), -1, np.int16)  # which object each pixel shows (-1: background)
    rects, visible = [], []  # visible: pixel counts
    log_lo, log_hi = math.log(cfg.min_size * s), math.log(cfg.max_size * s)
    log_asp = math.log1p(cfg.aspect_jitter)
    sources = []
    for _ in range(n_target):
        src = min(int(rng.random() * num_images), num_images - 1)
        for _ in range(cfg.max_tries):
            u_size, u_asp, u_x, u_y = rng.random(4)
            size = math.exp(log_lo + u_size * (log_hi - log_lo))
            asp = math.exp((2.0 * u_asp - 1.0) * log_asp)
            w = max(2, min(s, int(round(size * math.sqrt(asp)))))
            h = max(2, min(s, int(round(size / math.sqrt(asp)))))
            x1, y1 = int(u_x * (s - w + 1)), int(u_y * (s - h + 1))
            k = len(rects)
            if k:
                hit = np.bincount(owner[y1:y1 + h, x1:x1 + w].ravel() + 1, minlength=k + 1)[1:]
                left = np.asarray(visible) - hit
                areas = np.asarray([(r[2] - r[0]) * (r[3] - r[1]) for r in rects])
                if np.any(left < cfg.min_visible * areas):
                    continue
                visible = left.tolist()
            owner[y1:y1 + h, x1:x1 + w] = k
            rects.append((x1, y1, x1 + w, y1 + h))
            visible.append(w * h)
            sources.append(src)
            break
    return [Placement(src, *r, v / ((r[2] - r[0]) * (r[3] - r[1])))
            for src, r, v in zip(sources, rects, visible)]


# --------------------------------------------------------------------------- scenes


def make_scene(images, labels, index: int, *, split: str, seed: int,
               cfg: SceneConfig = SceneConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scene ``index`` of ``(split, seed)`` from the split's ``images`` uint8 ``[N, h, w, 3]`` and
    ``labels`` ``[N]``: (image uint8 ``[S, S, 3]``, boxes float32 ``[n, 4]`` x1y1x2y2 pixels,
    classes int32 ``[n]``), ``1 <= n <= cfg.max_objects``, in paste order."""
    images, labels = _check_arrays(images, labels)
    plan = scene_layout(len(images), index, split=split, seed=seed, cfg=cfg)
    _, bg_rng = _rngs(seed, split, index)
    canvas = _background(bg_rng, cfg.canvas, cfg.background_noise)
    for p in plan:
        canvas[p.y1:p.y2, p.x1:p.x2] = resize_bilinear(images[p.source], p.y2 - p.y1, p.x2 - p.x1)
    boxes = np.asarray([[p.x1, p.y1, p.x2, p.y2] for p in plan], np.float32).reshape(-1, 4)
    classes = np.asarray([labels[p.source] for p in plan], np.int32)
    return canvas, boxes, classes


def scene_batch(images, labels, indices, *, split: str, seed: int, cfg: SceneConfig = SceneConfig(),
                max_boxes: int | None = None) -> dict[str, np.ndarray]:
    """Scenes ``indices`` stacked and padded: ``{"images": uint8 [B, S, S, 3], "boxes": float32
    [B, M, 4] (x1y1x2y2 pixels), "classes": int32 [B, M], "mask": bool [B, M], "indices": int64
    [B]}`` with ``M = max_boxes`` (default ``cfg.max_objects``, which it must not be below);
    padding rows are zero boxes, class 0, mask False."""
    m = cfg.max_objects if max_boxes is None else int(max_boxes)
    if m < cfg.max_objects:
        raise ValueError(f"max_boxes {m} is below cfg.max_objects {cfg.max_objects}")
    images, labels = _check_arrays(images, labels)
    idx = np.asarray(indices, np.int64).reshape(-1)
    b, s = len(idx), cfg.canvas
    out = {"images": np.empty((b, s, s, 3), np.uint8), "boxes": np.zeros((b, m, 4), np.float32),
           "classes": np.zeros((b, m), np.int32), "mask": np.zeros((b, m), bool), "indices": idx}
    for k, i in enumerate(idx.tolist()):
        img, boxes, classes = make_scene(images, labels, i, split=split, seed=seed, cfg=cfg)
        n = len(boxes)
        out["images"][k] = img
        out["boxes"][k, :n] = boxes
        out["classes"][k, :n] = classes
        out["mask"][k, :n] = True
    return out


def iter_scene_batches(images, labels, *, split: str, seed: int, cfg: SceneConfig = SceneConfig(),
                       batch_size: int, count: int | None = None, start: int = 0,
                       max_boxes: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Stream :func:`scene_batch` dicts of scenes ``start, start + 1, ...``: ``count`` scenes
    (the last batch may be smaller), or endlessly when ``count`` is None. Writes no files."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    images, labels = _check_arrays(images, labels)
    end = None if count is None else start + count
    i = start
    while end is None or i < end:
        j = i + batch_size if end is None else min(i + batch_size, end)
        yield scene_batch(images, labels, np.arange(i, j), split=split, seed=seed, cfg=cfg, max_boxes=max_boxes)
        i = j


# --------------------------------------------------------------------------- COCO folder


def scene_file_name(index: int) -> str:
    """File name of scene ``index`` in a written folder; its COCO image id is ``index + 1``."""
    return f"scene_{index:07d}.jpg"


def scenes_coco_dict(scenes, *, split: str, seed: int, cfg: SceneConfig, start: int, count: int,
                     class_names) -> dict:
    """The COCO instances dict of scenes ``start .. start + count - 1``.

    ``scenes``: ``(index, boxes float32 [n, 4] x1y1x2y2, classes int [n])`` of each scene, in
    index order (as :func:`make_scene` returns them). Images get id ``index + 1``,
    ``file_name`` :func:`scene_file_name`, width and height ``cfg.canvas``; annotations bbox
    ``[x, y, w, h]``, area ``w * h``, iscrowd 0, ids ``1..``; categories ids ``1..K`` in class
    order (``K = len(class_names)``), so a K-class detector's class ``c`` is category ``c + 1``,
    as :func:`cfws_jax.detection.coco.class_to_category` maps any non-80-class model. ``info``
    records the generator settings. Used by :func:`write_coco_scenes` and by the in-memory
    held-out set of :mod:`cfws_jax.data.scene_source`.
    """
    names = [str(c) for c in class_names]
    coco_images, annotations = [], []
    for i, boxes, classes in scenes:
        coco_images.append({"id": int(i) + 1, "file_name": scene_file_name(int(i)),
                            "width": cfg.canvas, "height": cfg.canvas})
        for box, c in zip(np.asarray(boxes).tolist(), np.asarray(classes).tolist()):
            if not 0 <= c < len(names):
                raise ValueError(f"scene {i}: class {c} but {len(names)} class names were given")
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": int(i) + 1, "category_id": int(c) + 1,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
    return {"info": {"description": "synthetic detection scenes built from CIFAR-10 images (cfws_jax.data.scenes); "
                                    "for float vs quantized comparisons, not COCO accuracy",
                     "split": split, "seed": int(seed), "start": int(start), "count": int(count),
                     "config": dataclasses.asdict(cfg)},
            "images": coco_images, "annotations": annotations,
            "categories": [{"id": c + 1, "name": n, "supercategory": "cifar10"} for c, n in enumerate(names)]}


def write_coco_scenes(out_dir, images, labels, *, split: str, seed: int, cfg: SceneConfig = SceneConfig(),
                      count: int, class_names, start: int = 0, progress=None) -> tuple[str, str]:
    """Write scenes ``start .. start + count - 1`` as ``OUT/images/scene_NNNNNNN.jpg`` (JPEG
    quality 95, 4:4:4) and ``OUT/instances.json`` (:func:`scenes_coco_dict`: image id
    ``index + 1``, categories ``1..K`` in class order). Returns (image folder, JSON path).

    ``OUT`` must not exist or be empty (OutputError otherwise: this never replaces a folder);
    the files are written to a hidden sibling folder renamed into place at the end.
    ``progress``: optional callable ``(done, total)``.
    """
    from PIL import Image

    from cfws_jax.io import _commit_dir, _temp_sibling, check_output_dir

    images, labels = _check_arrays(images, labels)
    names = [str(c) for c in class_names]
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if int(labels.max()) >= len(names) or int(labels.min()) < 0:
        raise ValueError(f"labels span 0..{int(labels.max())} but {len(names)} class names were given")
    out_dir = check_output_dir(out_dir, overwrite=False, flag=None)
    tmp = _temp_sibling(out_dir)

    def written():
        for k, i in enumerate(range(start, start + count)):
            img, boxes, classes = make_scene(images, labels, i, split=split, seed=seed, cfg=cfg)
            Image.fromarray(img).save(os.path.join(tmp, IMAGE_DIR, scene_file_name(i)),
                                      quality=JPEG_QUALITY, subsampling=0)
            yield i, boxes, classes
            if progress is not None:
                progress(k + 1, count)

    try:
        os.makedirs(os.path.join(tmp, IMAGE_DIR))
        doc = scenes_coco_dict(written(), split=split, seed=seed, cfg=cfg, start=start, count=count,
                               class_names=names)
        with open(os.path.join(tmp, ANNOTATIONS_FILE), "w") as fh:
            json.dump(doc, fh)
        _commit_dir(tmp, out_dir, False, None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_dir, IMAGE_DIR), os.path.join(out_dir, ANNOTATIONS_FILE)
