"""Image classification data: sources (image folders, CIFAR-style ``.npz``, tfds) and
preprocessing. Every source yields normalized ``float32 [B, H, W, 3]`` (NHWC) images and
``int32 [B]`` labels in a fixed order.

    src = open_source("imagenet/", split="val")            # val/<wnid>/*.JPEG, 256 -> crop 224
    src = open_source("cifar10.npz", split="test")         # native 32x32, CIFAR normalization
    src = open_source("tfds:cifar10", split="train")       # locally prepared tfds data only
    for images, labels in src.iter_batches(64): ...
    calib = calibration_batches(open_source(..., split="train"), num_images=32, seed=0)
"""

from __future__ import annotations

from pathlib import Path

from cfws_jax.data.errors import DataError
from cfws_jax.data.preprocess import (
    CIFAR10, IMAGENET, IMAGE_EXTENSIONS, NORMALIZATIONS, PROTOCOLS, Normalization,
    get_normalization, transform_array, transform_pil,
)
from cfws_jax.data.source import SPLITS, ImageSource, calibration_batches, calibration_indices

__all__ = [
    "DataError", "open_source", "calibration_batches", "calibration_indices", "ImageSource", "Normalization",
    "IMAGENET", "CIFAR10", "NORMALIZATIONS", "PROTOCOLS", "SPLITS", "IMAGE_EXTENSIONS",
    "get_normalization", "transform_pil", "transform_array",
]


def open_source(spec: str, *, split: str = "val", image_size=None, protocol: str = "resize_crop",
                normalization=None, num_workers: int = 4, data_dir=None, load_size=None) -> ImageSource:
    """Open a labelled image source.

    Args:
      spec: a folder (class-per-subfolder, optionally with ``train/``, ``val/``, ``test/``
        split folders), a ``.npz`` file (CIFAR-style arrays), or ``tfds:NAME``.
      split: ``"train"``, ``"val"`` or ``"test"`` (CIFAR ``val`` = its test split).
      image_size: output ``H`` (square) or ``(H, W)``. None: 224 for folders and tfds datasets
        of variable image size, the native size (no resampling) for ``.npz`` and fixed-size
        tfds datasets.
      protocol: ``"resize_crop"`` (short side ``floor(size / 0.875)``, centre crop) or
        ``"direct"`` (resize to ``image_size``), or ``"letterbox"`` (detectors: an image folder
        letterboxed to a square ``image_size``, default 640, long side ``load_size``, pixels
        ``x / 255``; :class:`cfws_jax.data.coco.LetterboxFolderSource`).
      normalization: ``"imagenet"``, ``"cifar10"`` or a :class:`Normalization`. None:
        CIFAR-10 statistics for ``.npz`` and ``tfds:cifar10``, ImageNet otherwise.
      num_workers: decoding threads for folder sources.
      data_dir: tfds data directory (default: tfds' own default / ``TFDS_DATA_DIR``).
    """
    spec = str(spec)
    if protocol == "letterbox":  # detector input: letterboxed image folder, [0, 1], no mean/std
        from cfws_jax.data.coco import LetterboxFolderSource

        return LetterboxFolderSource(spec, split=split, image_size=image_size, load_size=load_size,
                                     num_workers=num_workers)
    if spec.startswith("tfds:"):
        from cfws_jax.data.tfds import TfdsSource

        name = spec[len("tfds:"):]
        norm = get_normalization(normalization or ("cifar10" if name.startswith("cifar10") else "imagenet"))
        return TfdsSource(name, split=split, image_size=image_size, protocol=protocol,
                          normalization=norm, data_dir=data_dir)
    if Path(spec).suffix.lower() == ".npz":
        from cfws_jax.data.npz import open_npz

        return open_npz(spec, split=split, image_size=image_size, protocol=protocol,
                        normalization=get_normalization(normalization or "cifar10"))
    from cfws_jax.data.folder import FolderSource

    return FolderSource(spec, split=split, image_size=image_size, protocol=protocol,
                        normalization=get_normalization(normalization or "imagenet"),
                        num_workers=num_workers)
