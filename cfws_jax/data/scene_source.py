"""Synthetic scenes (:mod:`cfws_jax.data.scenes`) as detector inputs, without files.

* :class:`SceneSource`: held-out scenes generated into memory with their COCO ground truth, the
  evaluation source :func:`cfws_jax.detection.evaluate.evaluate_detector` reads (the same
  interface as :class:`cfws_jax.data.coco.CocoSource`: ``count``, ``subset``, ``load``, ``coco``,
  ``image_ids``, ``category_ids``, ``annotations``, ``num_images``, ``spec``).
* :func:`scene_calibration_batches`: calibration batches of scenes for PTQ.

A scene is already a square ``S x S`` canvas, so the letterbox is the identity (ratio 1, no
padding) and the network input is ``canvas / 255`` (float32 ``[B, S, S, 3]`` in ``[0, 1]``),
exactly what the COCO path feeds a YOLOv6.

    src = SceneSource.generate(x_test, y_test, split="test", seed=0, cfg=cfg, count=200,
                               class_names=CIFAR10_CLASSES)
    res = evaluate_detector(apply_fn, src)                      # pycocotools mAP
    calib = scene_calibration_batches(x_train, y_train, seed=0, cfg=cfg, count=64)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cfws_jax.data import scenes
from cfws_jax.data.scenes import SceneConfig
from cfws_jax.data.source import limited_count
from cfws_jax.detection.letterbox import LetterboxInfo

SUBSET_RULES = ("balanced", "first")


@dataclasses.dataclass(frozen=True, eq=False)
class SceneSource:
    """Scenes ``start .. start + N - 1`` of ``(split, seed, cfg)`` held in memory.

    ``canvases`` uint8 ``[N, S, S, 3]``; ``image_ids`` int64 ``[N]`` (scene index + 1, as in a
    folder :func:`cfws_jax.data.scenes.write_coco_scenes` writes); ``coco`` a
    ``pycocotools.coco.COCO`` of :func:`cfws_jax.data.scenes.scenes_coco_dict`;
    ``category_ids`` sorted (``1..K``); ``annotations`` names where the ground truth comes from
    (in messages, as a ``CocoSource`` names its JSON); ``num_objects`` the boxes in all scenes.
    """

    spec: str
    annotations: str
    canvases: np.ndarray
    image_ids: np.ndarray
    coco: object
    category_ids: tuple[int, ...]
    num_objects: int
    cfg: SceneConfig

    @classmethod
    def generate(cls, images, labels, *, split: str, seed: int, cfg: SceneConfig, count: int, class_names,
                 start: int = 0, progress=None) -> "SceneSource":
        """Generate the scenes from the split's arrays (uint8 ``[M, h, w, 3]``, labels ``[M]``).
        ``progress``: optional callable ``(done, total)``."""
        from cfws_jax.detection.coco import coco_from_dict

        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        canvases = np.empty((count, cfg.canvas, cfg.canvas, 3), np.uint8)
        truth = []
        for k, i in enumerate(range(start, start + count)):
            canvases[k], boxes, classes = scenes.make_scene(images, labels, i, split=split, seed=seed, cfg=cfg)
            truth.append((i, boxes, classes))
            if progress is not None:
                progress(k + 1, count)
        doc = scenes.scenes_coco_dict(truth, split=split, seed=seed, cfg=cfg, start=start, count=count,
                               class_names=class_names)
        spec = f"{count} synthetic {split} scenes (seed {seed}, {cfg.canvas} px)"
        return cls(spec, f"{spec}, in memory", canvases, np.arange(start, start + count, dtype=np.int64) + 1,
                   coco_from_dict(doc), tuple(c["id"] for c in doc["categories"]), len(doc["annotations"]), cfg)

    @property
    def num_images(self) -> int:
        return len(self.canvases)

    @property
    def image_size(self) -> int:
        return self.cfg.canvas

    def count(self, limit: int | None = None) -> int:
        """Scenes evaluated with ``limit``: ``min(limit, num_images)``."""
        return limited_count(self.num_images, limit, self.spec)

    def subset(self, limit: int | None = None, subset: str = "balanced") -> np.ndarray:
        """int64 indices of the ``limit`` scenes evaluated: the first ones under either rule
        (scenes are independent draws, so the first ``n`` are as representative as any ``n``)."""
        if subset not in SUBSET_RULES:
            raise ValueError(f"unknown subset rule {subset!r}; expected one of {SUBSET_RULES}")
        return np.arange(self.count(limit), dtype=np.int64)

    def load(self, indices) -> tuple[np.ndarray, list[LetterboxInfo], np.ndarray]:
        """(canvases uint8 ``[b, S, S, 3]``, identity letterbox infos, image ids int64 ``[b]``)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"{self.spec}: index out of range [0, {self.num_images})")
        s = self.cfg.canvas
        return self.canvases[idx], [LetterboxInfo(1.0, 0, 0, s, s)] * len(idx), self.image_ids[idx]

    def describe(self) -> str:
        return f"{self.spec}: {self.num_objects} objects, {len(self.category_ids)} categories"


def scene_calibration_batches(images, labels, *, seed: int, cfg: SceneConfig, count: int,
                              batch_size: int = 32) -> list[np.ndarray]:
    """Scenes ``0 .. count - 1`` of the ``"train"`` stream ``seed`` as float32 ``[b, S, S, 3]``
    batches in ``[0, 1]`` (``b <= batch_size``): PTQ calibration input. Pass the *train* split's
    arrays; the seed picks the scenes (each seed its own stream)."""
    if count < 1 or batch_size < 1:
        raise ValueError(f"count and batch_size must be >= 1, got {count}, {batch_size}")
    return [scenes.scene_batch(images, labels, np.arange(i, min(i + batch_size, count)), split="train", seed=seed,
                        cfg=cfg)["images"].astype(np.float32) / np.float32(255.0)
            for i in range(0, count, batch_size)]
