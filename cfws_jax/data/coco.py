"""COCO detection data: an ``instances`` JSON + image folder (:class:`CocoSource`) for
evaluation, and unlabeled letterboxed image folders (:class:`LetterboxFolderSource`) for
detector calibration. Both letterbox with :func:`cfws_jax.detection.letterbox` (FORMATS.md §4.9).

Images are decoded with Pillow (:func:`cfws_jax.data.preprocess.load_image`: the pixel count is
checked before decoding), in file-name order.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from cfws_jax.data.errors import DataError
from cfws_jax.data.preprocess import UNIT, load_image
from cfws_jax.data.source import ImageSource, _check_batch_size, check_split, pick_subset
from cfws_jax.detection.letterbox import DEFAULT_SIZE, LetterboxInfo, letterbox


def _int_size(image_size) -> int:
    if image_size is None:
        return DEFAULT_SIZE
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ValueError(f"letterbox needs a square image_size, got {image_size!r}")
        image_size = image_size[0]
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size!r}")
    return int(image_size)


def _map(fn, items, num_workers: int) -> list:
    if num_workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(min(num_workers, len(items))) as pool:
            return list(pool.map(fn, items))
    return [fn(i) for i in items]


def _is_id(value) -> bool:
    """A COCO id: an int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_instances(path) -> dict:
    """Parse and check a COCO ``instances`` JSON (DataError naming the file and key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotations file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal past Python's 4300-digit limit
        raise DataError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: key '{key}' missing or not a list")
    ids = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise DataError(f"{path}: images[{i}] is not an object")
        for key, types in (("id", int), ("file_name", str), ("width", int), ("height", int)):
            if not isinstance(img.get(key), types) or isinstance(img.get(key), bool):
                raise DataError(f"{path}: images[{i}] has no valid '{key}'")
        if img["width"] < 1 or img["height"] < 1:
            raise DataError(f"{path}: images[{i}] (id {img['id']}) has size {img['width']}x{img['height']}")
        if img["id"] in ids:
            raise DataError(f"{path}: image id {img['id']} appears twice in 'images'")
        ids.add(img["id"])
    cats = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_id(cat.get("id")):
            raise DataError(f"{path}: categories[{i}] has no valid 'id'")
        cats.add(cat["id"])
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{i}] is not an object")
        if not _is_id(ann.get("image_id")) or ann["image_id"] not in ids:  # (a list id: found by fuzz/)
            raise DataError(f"{path}: annotations[{i}] refers to image id {ann.get('image_id')!r}, "
                            "not in 'images'")
        if not _is_id(ann.get("category_id")) or ann["category_id"] not in cats:
            raise DataError(f"{path}: annotations[{i}] has category id {ann.get('category_id')!r}, "
                            "not in 'categories'")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise DataError(f"{path}: annotations[{i}] has no valid 'bbox' [x, y, w, h]")
        if not isinstance(ann.get("area"), (int, float)):
            raise DataError(f"{path}: annotations[{i}] has no valid 'area'")
    return data


class CocoSource:
    """COCO images letterboxed to ``image_size`` with their ground truth.

    Attributes: ``spec`` (image folder), ``annotations`` (JSON path), ``image_size``,
    ``load_size``, ``coco`` (a ``pycocotools.coco.COCO`` of the file), ``image_ids`` (int64
    ``[N]``, file-name order), ``paths``, ``num_images``, ``category_ids`` (sorted).
    ``iter_batches`` yields ``(canvases uint8 [b, S, S, 3], [LetterboxInfo] * b, ids int64 [b])``.
    """

    def __init__(self, images, annotations, *, image_size: int = DEFAULT_SIZE, load_size: int | None = None,
                 num_workers: int = 4):
        from cfws_jax.detection.coco import coco_from_dict

        root, ann_path = Path(images), Path(annotations)
        if not root.exists():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if not root.is_dir():
            raise DataError(f"{root} is not a folder")
        data = read_instances(ann_path)
        images = sorted(data["images"], key=lambda im: (im["file_name"], im["id"]))
        if not images:
            raise DataError(f"{ann_path}: 'images' is empty")
        present = {p.name for p in root.iterdir() if p.is_file()}
        missing = [im for im in images if Path(im["file_name"]).name not in present]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"{ann_path}: image {missing[0]['file_name']} (id {missing[0]['id']}) is not in "
                            f"{root}{more}")
        self.spec, self.annotations = str(root), str(ann_path)
        self.image_size = _int_size(image_size)
        self.load_size = None if load_size is None else int(load_size)
        self.num_workers = int(num_workers)
        self.paths = [root / Path(im["file_name"]).name for im in images]
        self.image_ids = np.asarray([im["id"] for im in images], np.int64)
        self._sizes = [(im["height"], im["width"]) for im in images]
        self.num_images = len(images)
        self.category_ids = tuple(sorted(c["id"] for c in data["categories"]))
        self.coco = coco_from_dict(data)

    excluded = None  # indices never evaluated (:meth:`exclude`)
    exclude = ImageSource.exclude
    count = ImageSource.count

    def _decode(self, i: int) -> tuple[np.ndarray, LetterboxInfo]:
        img = load_image(self.paths[i])
        h, w = self._sizes[i]
        if img.size != (w, h):
            raise DataError(f"{self.paths[i]}: decoded size {img.size[0]}x{img.size[1]} differs from "
                            f"{w}x{h} in {self.annotations}")
        return letterbox(img, self.image_size, self.load_size)

    def load(self, indices) -> tuple[np.ndarray, list[LetterboxInfo], np.ndarray]:
        """(canvases uint8 ``[b, S, S, 3]``, infos, image ids int64 ``[b]``)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"{self.spec}: index out of range [0, {self.num_images})")
        out = _map(self._decode, idx.tolist(), self.num_workers)
        s = self.image_size
        canvases = np.stack([c for c, _ in out]) if out else np.zeros((0, s, s, 3), np.uint8)
        return canvases, [info for _, info in out], self.image_ids[idx]

    def subset(self, limit: int | None = None, subset: str = "balanced") -> np.ndarray:
        """Indices (file-name order) of the ``limit`` images evaluated: evenly strided over the
        folder (``"balanced"``) or the first ones (``"first"``); see :func:`subset_indices`."""
        return pick_subset(self, self.count(limit), None, subset)

    def iter_batches(self, batch_size: int, limit: int | None = None, subset: str = "balanced") -> Iterator[tuple]:
        """Batches of :meth:`subset` in file-name order; the last may be smaller."""
        batch_size = _check_batch_size(batch_size)
        idx = self.subset(limit, subset)
        for start in range(0, len(idx), batch_size):
            yield self.load(idx[start:start + batch_size])

    def describe(self) -> str:
        load = f", long side {self.load_size}" if self.load_size else ""
        return (f"{self.spec} + {Path(self.annotations).name}: {self.num_images} images, "
                f"{len(self.category_ids)} categories, letterbox {self.image_size}{load}")


class LetterboxFolderSource(ImageSource):
    """Images of a folder (flat, or class sub-folders; labels as :func:`scan_folder`, -1 when
    flat) letterboxed to ``image_size`` and scaled to ``[0, 1]``: float32 ``[B, S, S, 3]``."""

    def __init__(self, path, *, split: str = "val", image_size=DEFAULT_SIZE, load_size: int | None = None,
                 num_workers: int = 4):
        from cfws_jax.data.folder import resolve_split_dir, scan_folder

        root = Path(path)
        check_split(split, root)
        if not root.exists():
            raise FileNotFoundError(f"data folder {root} does not exist")
        if not root.is_dir():
            raise ValueError(f"{root} is not a folder (letterbox sources read image folders)")
        self.root = resolve_split_dir(root, split)
        self.class_names, self.paths, self.labels = scan_folder(self.root)
        self.spec, self.split = str(self.root), split
        self.num_images, self.num_classes = len(self.paths), len(self.class_names)
        size = _int_size(image_size)
        self.image_size = (size, size)
        self.load_size = None if load_size is None else int(load_size)
        self.normalization = UNIT
        self.num_workers = int(num_workers)

    def _decode(self, i: int) -> tuple[np.ndarray, LetterboxInfo]:
        return letterbox(load_image(self.paths[i]), self.image_size[0], self.load_size)

    def load_with_info(self, indices) -> tuple[np.ndarray, np.ndarray, list[LetterboxInfo]]:
        """(images float32 ``[b, S, S, 3]`` in [0, 1], labels int32 ``[b]``, infos)."""
        idx = self._check_indices(indices)
        out = _map(self._decode, idx.tolist(), self.num_workers)
        s = self.image_size[0]
        stack = np.stack([c for c, _ in out]) if out else np.zeros((0, s, s, 3), np.uint8)
        return self.normalization(stack), self.labels[idx], [info for _, info in out]

    def load(self, indices):
        images, labels, _ = self.load_with_info(indices)
        return images, labels

    def describe(self) -> str:
        s = self.image_size[0]
        load = f", long side {self.load_size}" if self.load_size else ""
        return f"{self.spec} [{self.split}]: {self.num_images} images, letterbox {s}x{s}{load}, [0, 1] input"
