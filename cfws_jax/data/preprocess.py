"""Image preprocessing: normalization constants (the only place they are defined), resizing
and cropping protocols, image decoding.

Layouts: a decoded image is ``uint8 [H, W, 3]`` RGB; a normalized batch is
``float32 [B, H, W, 3]`` (NHWC), ``(x / 255 - mean) / std`` per channel.

Protocols (``image_size`` = output ``(H, W)``):

* ``"resize_crop"`` (ImageNet standard): resize so the short side is
  ``floor(max(H, W) / crop_pct)`` (256 for 224 with ``crop_pct=0.875``), bilinear, keeping the
  aspect ratio (long side truncated to an integer), then take the centre ``H x W`` crop
  (offsets ``round((size - crop) / 2)``, Python rounding).
* ``"direct"``: resize straight to ``H x W`` (bilinear), aspect ratio not kept.

Resizing uses Pillow's bilinear filter, which low-pass filters when shrinking.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Literal

import numpy as np

from cfws_jax.data.errors import DataError

Protocol = Literal["resize_crop", "direct"]
PROTOCOLS = ("resize_crop", "direct")
DEFAULT_CROP_PCT = 0.875
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""Image file suffixes accepted by folder sources (matched case-insensitively)."""


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel RGB normalization ``(x / 255 - mean) / std``."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images, xp=np) -> np.ndarray:
        """uint8 ``[..., 3]`` (RGB, 0-255) -> float32 of the same shape.

        ``xp`` is the array namespace: ``numpy`` (default) or ``jax.numpy`` inside jitted code.
        """
        images = xp.asarray(images)
        if images.shape[-1:] != (3,):
            raise ValueError(f"expected RGB images with 3 channels last, got shape {images.shape}")
        mean = xp.asarray(self.mean, xp.float32)
        std = xp.asarray(self.std, xp.float32)
        return (images.astype(xp.float32) / xp.float32(255.0) - mean) / std


IMAGENET = Normalization("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10 = Normalization("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
"""The CIFAR-10 statistics used by the project's CIFAR models (npz and tfds cifar10 sources)."""
NORMALIZATIONS = {n.name: n for n in (IMAGENET, CIFAR10)}
UNIT = Normalization("unit", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
"""``x / 255`` (no mean/std): the YOLOv6 detector input (letterbox sources)."""


def get_normalization(name_or_norm) -> Normalization:
    """``"imagenet"`` / ``"cifar10"`` / a :class:`Normalization` -> :class:`Normalization`."""
    if isinstance(name_or_norm, Normalization):
        return name_or_norm
    try:
        return NORMALIZATIONS[name_or_norm]
    except KeyError:
        raise ValueError(
            f"unknown normalization {name_or_norm!r}; expected one of {sorted(NORMALIZATIONS)}"
        ) from None


def image_hw(image_size) -> tuple[int, int] | None:
    """``None`` / ``224`` / ``(224, 224)`` -> ``None`` / ``(H, W)``."""
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        hw = (int(image_size), int(image_size))
    else:
        hw = tuple(int(v) for v in image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return hw


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown preprocessing protocol {protocol!r}; expected one of {PROTOCOLS}")
    return protocol


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a declared dependency of the data extra
        raise ImportError("image decoding and resizing need Pillow: pip install pillow") from e
    return Image


MAX_IMAGE_PIXELS = 1 << 26
"""Largest image (width x height, 67 M pixels = 8192 x 8192) decoded; checked from the header
before any pixel is decoded. Raise it for larger inputs: ``cfws_jax.data.preprocess.MAX_IMAGE_PIXELS``."""

_DEFLATE_MAX_RATIO = 1100  # zlib cannot expand more than ~1032:1, so a PNG holds at least raw/1032 bytes


class _BoundedReader(io.BufferedReader):
    """A file whose ``read(n)`` asks for at most the bytes left: Pillow reads some declared chunk
    lengths in one call (PNG IDAT), which would allocate the declared size (found by fuzz/)."""

    def __init__(self, raw):
        super().__init__(raw)
        self.size = os.fstat(raw.fileno()).st_size

    def read(self, n=-1):
        if n is not None and n > 0:
            n = min(n, max(self.size - self.tell(), 0))
            if n == 0:
                return b""
        return super().read(n)


def load_image(path) -> "object":
    """Decode an image file to an RGB ``PIL.Image``; :class:`DataError` naming the file if it is
    unreadable, declares more than :data:`MAX_IMAGE_PIXELS` pixels, or (PNG) declares more pixel
    data than its compressed bytes can hold. Sizes are checked before decoding."""
    Image = _pil()
    try:
        with _BoundedReader(io.FileIO(path)) as fh, Image.open(fh) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: image declares {w}x{h} = {w * h:,} pixels, above the limit of "
                                f"{MAX_IMAGE_PIXELS:,} (cfws_jax.data.preprocess.MAX_IMAGE_PIXELS); not decoded")
            if img.format == "PNG":
                bits = 1 if img.mode == "1" else 8 * len(img.getbands())
                raw = h * (1 + (w * bits + 7) // 8)
                size = fh.size
                if raw > _DEFLATE_MAX_RATIO * size + 65536:
                    raise DataError(f"{path}: PNG declares {w}x{h} pixels ({raw:,} bytes of pixel data) but the "
                                    f"file holds only {size:,} bytes; truncated or forged, not decoded")
            return img.convert("RGB")
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image refused by Pillow's size limit ({e})") from None
    except MemoryError:
        raise DataError(f"{path}: out of memory while decoding the image") from None
    except (OSError, SyntaxError, ValueError, OverflowError, EOFError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from None
    except TypeError as e:  # Pillow's TIFF reader, fed a strip offset tag of another type (a float, bytes, a ratio)
        raise DataError(f"cannot decode image {path}: malformed tag ({e})") from None


def resize_short_size(image_size: tuple[int, int], crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Short-side length before the centre crop, e.g. 256 for (224, 224)."""
    return int(math.floor(max(image_size) / crop_pct))


def transform_pil(img, image_size, protocol: Protocol = "resize_crop",
                  crop_pct: float = DEFAULT_CROP_PCT) -> np.ndarray:
    """Resize (and crop) an RGB ``PIL.Image`` -> uint8 ``[H, W, 3]`` with ``(H, W) = image_size``."""
    Image = _pil()
    out_h, out_w = image_hw(image_size)
    check_protocol(protocol)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if protocol == "direct":
        img = img.resize((out_w, out_h), Image.BILINEAR)
        return np.asarray(img, np.uint8)
    w, h = img.size
    short = resize_short_size((out_h, out_w), crop_pct)
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if new_w * new_h > MAX_IMAGE_PIXELS:  # a 4 x 4 M pixel image would become 18 x 19 M (found by fuzz/)
        raise DataError(f"image of {w}x{h} pixels would be resized to {new_w}x{new_h}, above the limit of "
                        f"{MAX_IMAGE_PIXELS:,} pixels (cfws_jax.data.preprocess.MAX_IMAGE_PIXELS)")
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - out_h) / 2.0))
    left = int(round((new_w - out_w) / 2.0))
    img = img.crop((left, top, left + out_w, top + out_h))
    return np.asarray(img, np.uint8)


def transform_array(image, image_size, protocol: Protocol = "resize_crop",
                    crop_pct: float = DEFAULT_CROP_PCT) -> np.ndarray:
    """uint8 ``[h, w, 3]`` -> uint8 ``[H, W, 3]`` via :func:`transform_pil`; unchanged when
    ``image_size`` is None (native size)."""
    image = np.asarray(image)
    hw = image_hw(image_size)
    if hw is None:
        return image
    return transform_pil(_pil().fromarray(image), hw, protocol, crop_pct)
