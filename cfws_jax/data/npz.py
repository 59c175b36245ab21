"""CIFAR-style ``.npz`` arrays: ``x_train``, ``y_train``, ``x_test``, ``y_test`` with images
``uint8 [N, H, W, 3]`` (NHWC, RGB) and integer labels ``[N]``; optional ``classes`` (names).

Only the requested split's arrays are read (``np.load`` is lazy per key). CIFAR has no
validation split: ``split="val"`` reads the ``test`` arrays. The arrays may be sorted by class
(the shared CIFAR-10 copy is), so subsets must be drawn with a seeded shuffle
(:func:`cfws_jax.data.calibration_batches`), never by taking the first images.
"""

from __future__ import annotations

import lzma
import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from cfws_jax.data.errors import DataError

from cfws_jax.data.preprocess import Normalization, check_protocol, image_hw, transform_array
from cfws_jax.data.source import ImageSource, check_split

_MAX_INFLATE_RATIO = 1100  # deflate/bzip2/lzma of real arrays stay far below; zlib tops out near 1032
_SPLIT_KEYS = {"train": "train", "val": "test", "test": "test"}


def check_npz_sizes(path: Path, keys) -> None:
    """DataError unless each ``KEY.npy`` member's declared array size fits the bytes the archive
    holds (checked from the headers, before anything is allocated)."""
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        for key in keys:
            if f"{key}.npy" not in names:
                continue
            info = zf.getinfo(f"{key}.npy")
            if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
                raise DataError(f"{path}: member {key} declares {info.file_size:,} bytes but stores "
                                f"{info.compress_size:,}")
            if info.file_size > _MAX_INFLATE_RATIO * info.compress_size + 65536:
                raise DataError(f"{path}: member {key} would inflate {info.compress_size:,} bytes to "
                                f"{info.file_size:,}, more than any compressor produces; forged archive")
            try:
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(fh)
                    header = fh.tell()
            except (ValueError, TypeError, SyntaxError) as e:
                raise DataError(f"{path}: member {key} has a malformed .npy header ({e})") from None
            nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
            if nbytes > info.file_size - header:
                raise DataError(f"{path}: member {key} declares shape {tuple(shape)} {dtype} ({nbytes:,} bytes) "
                                f"but holds {info.file_size - header:,} bytes")


def read_npz_split(path: Path, split: str):
    """(images uint8 NHWC, labels int32, class names or None, num_classes) for one split."""
    key = _SPLIT_KEYS[split]
    check_npz_sizes(path, (f"x_{key}", f"y_{key}", "classes", "y_train", "y_test"))
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in (f"x_{key}", f"y_{key}") if k not in z.files]
        if missing:
            raise DataError(f"{path}: missing keys {missing} for split {split!r} (has {sorted(z.files)}); "
                             "expected x_train, y_train, x_test, y_test")
        x, y = z[f"x_{key}"], z[f"y_{key}"]
        classes = tuple(str(c) for c in z["classes"]) if "classes" in z.files else None
        all_y = [z[k] for k in ("y_train", "y_test") if k in z.files]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{path}: x_{key} must be uint8 [N, H, W, 3] (NHWC RGB), "
                         f"got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y_{key} must be integer labels [{len(x)}], got {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: y_{key} has negative labels")
    num_classes = len(classes) if classes else int(max(int(a.max()) for a in all_y if len(a)) + 1)
    if len(y) and y.max() >= num_classes:
        raise DataError(f"{path}: y_{key} has label {int(y.max())} but only {num_classes} classes")
    return x, y.astype(np.int32), classes, num_classes


class ArraySource(ImageSource):
    """In-memory uint8 images. ``image_size=None`` keeps the native size (no resampling);
    otherwise each image goes through :func:`transform_array` with ``protocol``."""

    def __init__(self, images, labels, *, spec: str, split: str, num_classes: int,
                 normalization: Normalization, image_size=None, protocol: str = "resize_crop",
                 class_names=None):
        self.images, self.labels = images, np.asarray(labels, np.int32)
        self.spec, self.split = spec, split
        self.num_images, self.num_classes = len(self.labels), int(num_classes)
        self.resize_to = image_hw(image_size)
        self.image_size = self.resize_to or tuple(int(v) for v in images.shape[1:3])
        self.protocol = check_protocol(protocol)
        self.normalization = normalization
        self.class_names = class_names

    def load(self, indices):
        idx = self._check_indices(indices)
        x = self.images[idx]
        if self.resize_to is not None:
            h, w = self.resize_to
            x = np.stack([transform_array(im, self.resize_to, self.protocol) for im in x]) \
                if len(x) else np.zeros((0, h, w, 3), np.uint8)
        return self.normalization(x), self.labels[idx]


def open_npz(path, *, split: str, image_size, protocol: str, normalization: Normalization
             ) -> ArraySource:
    path = Path(path)
    check_split(split, path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        if not zipfile.is_zipfile(path):  # (it can raise BadZipFile itself: found by fuzz/)
            raise DataError(f"{path}: not an .npz (zip) archive")
        x, y, classes, num_classes = read_npz_split(path, split)
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: out of memory while reading the arrays") from None
    except (OSError, zipfile.BadZipFile, EOFError, OverflowError, NotImplementedError, RuntimeError, ValueError,
            KeyError, zlib.error, lzma.LZMAError, struct.error) as e:  # corrupt members (found by fuzz/)
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    src = ArraySource(x, y, spec=str(path), split=split, num_classes=num_classes,
                      normalization=normalization, image_size=image_size, protocol=protocol,
                      class_names=classes)
    src.data_split = _SPLIT_KEYS[split]  # the arrays read (val = test): names images for data.holdout
    return src
