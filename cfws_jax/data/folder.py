"""Class-per-subfolder image folders, e.g. ImageNet ``val/<wnid>/*.JPEG``.

Label ``i`` is the ``i``-th class folder in sorted name order (ImageNet wnids sorted = the
ImageNet-1k indices). Every class folder counts, even an empty one, so indices stay aligned.
Images are the folder's direct ``*.jpg``, ``*.jpeg``, ``*.png`` files (any case), sorted by name.

The path may hold split folders (``train/``, ``val/`` or ``validation/``, ``test/``), chosen by
``split``; a folder without any split folder is used as is, whatever ``split`` says.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cfws_jax.data.errors import DataError
from cfws_jax.data.preprocess import (
    IMAGE_EXTENSIONS, Normalization, check_protocol, image_hw, load_image, transform_pil,
)
from cfws_jax.data.source import ImageSource, check_split

_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_ALL_SPLIT_DIRS = ("train", "val", "validation", "test")


def resolve_split_dir(root: Path, split: str) -> Path:
    """``root/<split>`` when it exists (``val`` also tries ``validation``); else ``root`` itself
    if it has no split folders at all (a bare class-per-subfolder folder)."""
    for name in _SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    present = [d for d in _ALL_SPLIT_DIRS if (root / d).is_dir()]
    if present:
        raise ValueError(f"{root}: no folder for split {split!r} (found split folders {present})")
    return root


def scan_folder(root: Path) -> tuple[tuple[str, ...], list[Path], np.ndarray]:
    """(sorted class names, image paths, int32 labels) of a class-per-subfolder folder.

    A folder with no sub-folders but images directly inside is an *unlabeled* source (no class
    names, labels -1): usable for calibration, refused by evaluation.
    """
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        flat = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if flat:
            return (), flat, np.full((len(flat),), -1, np.int32)
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        exts = ", ".join(f"*{e}" for e in IMAGE_EXTENSIONS)
        where = f"in its {len(classes)} class sub-folders" if classes else "(it has no class sub-folders)"
        raise ValueError(f"{root}: no images ({exts}, any case) found {where}; expected one "
                         "sub-folder per class holding the images")
    return classes, paths, np.asarray(labels, np.int32)


class FolderSource(ImageSource):
    """Images decoded with Pillow and preprocessed by :func:`transform_pil`.

    ``num_workers`` threads decode each batch (order is kept; 0 or 1 = no threads).
    """

    def __init__(self, path, *, split: str = "val", image_size=224, protocol: str = "resize_crop",
                 normalization: Normalization, num_workers: int = 4):
        root = Path(path)
        check_split(split, root)
        self.protocol = check_protocol(protocol)
        self.image_size = image_hw(224 if image_size is None else image_size)
        if not root.exists():
            raise FileNotFoundError(f"data folder {root} does not exist")
        if not root.is_dir():
            raise ValueError(f"{root} is not a folder (nor a .npz file or tfds:NAME)")
        self.root = resolve_split_dir(root, split)
        self.class_names, self.paths, self.labels = scan_folder(self.root)
        self.spec, self.split = str(self.root), split
        self.num_images, self.num_classes = len(self.paths), len(self.class_names)
        self.normalization = normalization
        self.num_workers = int(num_workers)

    def _decode(self, i: int) -> np.ndarray:
        img = load_image(self.paths[i])
        try:
            return transform_pil(img, self.image_size, self.protocol)
        except DataError as e:
            raise DataError(f"{self.paths[i]}: {e}") from None

    def load(self, indices):
        idx = self._check_indices(indices)
        if self.num_workers > 1 and idx.size > 1:
            with ThreadPoolExecutor(min(self.num_workers, idx.size)) as pool:
                images = list(pool.map(self._decode, idx.tolist()))
        else:
            images = [self._decode(i) for i in idx.tolist()]
        h, w = self.image_size
        stack = np.stack(images) if images else np.zeros((0, h, w, 3), np.uint8)
        return self.normalization(stack), self.labels[idx]
