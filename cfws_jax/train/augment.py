"""Host-side detection augmentation (NumPy, seeded, deterministic): horizontal flip, light scale /
translate jitter about the canvas centre, saturation / value jitter; boxes follow the pixels.

Per image (each draw from the given ``numpy.random.Generator``, in a fixed order):

* flip with probability ``flip``: ``x -> S - x``;
* zoom by ``s ~ U(1 - scale, 1 + scale)`` about the centre plus a shift ``~ U(-translate, translate)·S``
  per axis (nearest-neighbour resampling; uncovered pixels ``fill``). Boxes map the same way and
  are clipped to the canvas; a box narrower or shorter than ``min_size`` px afterwards, or keeping
  less than ``min_visible`` of its area, is dropped (mask False);
* HSV jitter: saturation and value multiplied by ``1 + U(-hsv_s, hsv_s)`` and ``1 + U(-hsv_v, hsv_v)``,
  computed in closed form on RGB (``c -> V - g(V - c)`` scales S keeping H, V; ``c -> g·c`` scales V;
  clipped so S <= 1 and V <= 255). Hue is left as it is.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    flip: float = 0.5
    scale: float = 0.25
    translate: float = 0.1
    hsv_s: float = 0.5
    hsv_v: float = 0.3
    fill: int = 114
    min_size: float = 2.0
    min_visible: float = 0.3


def _hsv(img: np.ndarray, gs: float, gv: float) -> np.ndarray:
    x = img.astype(np.float32)
    v = x.max(-1, keepdims=True)
    mn = x.min(-1, keepdims=True)
    # saturation: S' = gs·S clipped to 1, i.e. the spread (V - c) scaled by g <= V / (V - min)
    g = np.minimum(gs, v / np.maximum(v - mn, 1e-6))
    x = v - g * (v - x)
    x = x * np.minimum(gv, 255.0 / np.maximum(v, 1e-6))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment_image(img, boxes, mask, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()):
    """One image ``uint8 [S, S, 3]``, boxes ``[M, 4]`` x1y1x2y2 px, mask ``[M]`` bool -> the
    augmented ``(img, boxes float32, mask)`` (see the module docstring)."""
    size = img.shape[0]
    boxes = np.asarray(boxes, np.float32).copy()
    mask = np.asarray(mask, bool).copy()
    if rng.random() < cfg.flip:
        img = img[:, ::-1]
        boxes[:, [0, 2]] = size - boxes[:, [2, 0]]
    s = 1.0 + rng.uniform(-cfg.scale, cfg.scale)
    t = rng.uniform(-cfg.translate, cfg.translate, 2) * size
    c = size / 2.0
    # output pixel centre o samples input (o - c - t) / s + c
    o = np.arange(size, dtype=np.float32) + 0.5
    src_x = np.floor((o - c - t[0]) / s + c).astype(np.int64)
    src_y = np.floor((o - c - t[1]) / s + c).astype(np.int64)
    vx, vy = (src_x >= 0) & (src_x < size), (src_y >= 0) & (src_y < size)
    out = img[np.clip(src_y, 0, size - 1)][:, np.clip(src_x, 0, size - 1)]
    out = np.where((vy[:, None] & vx[None, :])[..., None], out, np.uint8(cfg.fill))
    nb = (boxes - c) * s + c + np.array([t[0], t[1], t[0], t[1]], np.float32)
    full = np.clip(nb[:, 2] - nb[:, 0], 0, None) * np.clip(nb[:, 3] - nb[:, 1], 0, None)
    nb = np.clip(nb, 0, size)
    w, h = nb[:, 2] - nb[:, 0], nb[:, 3] - nb[:, 1]
    keep = mask & (w >= cfg.min_size) & (h >= cfg.min_size) & (w * h >= cfg.min_visible * np.maximum(full, 1e-6))
    nb[~keep] = 0.0
    gs = 1.0 + rng.uniform(-cfg.hsv_s, cfg.hsv_s)
    gv = 1.0 + rng.uniform(-cfg.hsv_v, cfg.hsv_v)
    return _hsv(out, gs, gv), nb.astype(np.float32), keep


def augment_batch(batch: dict, seed: int, step: int, cfg: AugmentConfig = AugmentConfig()) -> dict:
    """A scene batch ``{"images" [B,S,S,3] uint8, "boxes" [B,M,4], "classes" [B,M], "mask" [B,M]}``
    augmented with ``numpy.random.default_rng([seed, step])`` (a pure function of its arguments)."""
    rng = np.random.default_rng([int(seed), int(step)])
    imgs, boxes, masks = [], [], []
    for i in range(len(batch["images"])):
        a, b, m = augment_image(batch["images"][i], batch["boxes"][i], batch["mask"][i], rng, cfg)
        imgs.append(a)
        boxes.append(b)
        masks.append(m)
    return {**batch, "images": np.stack(imgs), "boxes": np.stack(boxes), "mask": np.stack(masks)}
