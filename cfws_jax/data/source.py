"""The :class:`ImageSource` interface shared by every data source, and calibration subsets.

A source is an indexable, finite, ordered collection of labelled images. ``load(indices)``
returns normalized ``float32 [B, H, W, 3]`` (NHWC) images and ``int32 [B]`` labels; the order
of ``iter_batches`` is the source's fixed order (sorted files, array order), so evaluation is
deterministic.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from cfws_jax.data.preprocess import Normalization

SPLITS = ("train", "val", "test")
SUBSETS = ("balanced", "first")  # how ``limit`` picks images: see :func:`subset_indices`


def check_split(split: str, where) -> str:
    """ValueError naming ``where`` (a path or dataset name) if ``split`` is not a known split."""
    if split not in SPLITS:
        raise ValueError(f"{where}: unknown split {split!r}; expected one of {SPLITS}")
    return split


class ImageSource:
    """Base class. Subclasses set the attributes below and implement :meth:`load`.

    Attributes:
      spec: what was opened (path or ``tfds:name``), used in messages.
      split: ``"train"``, ``"val"`` or ``"test"``.
      num_images, num_classes: sizes.
      image_size: ``(H, W)`` of every returned image.
      normalization: the :class:`Normalization` applied.
      class_names: tuple of class names (label = index) or None.
    """

    spec: str
    split: str
    num_images: int
    num_classes: int
    image_size: tuple[int, int]
    normalization: Normalization
    class_names: tuple[str, ...] | None = None

    def load(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Images ``float32 [len(indices), H, W, 3]`` and labels ``int32 [len(indices)]``."""
        raise NotImplementedError

    excluded: np.ndarray | None = None  # indices :meth:`subset` never picks (see :meth:`exclude`)

    def exclude(self, indices, why: str = "excluded") -> None:
        """Never visit ``indices`` again (e.g. the images that calibrated the model under test);
        ``why`` ends :func:`excluded_note`, e.g. ``"calibration images of q/"``."""
        self.excluded, self.excluded_why = exclusion(self.num_images, indices, self.spec), why

    def count(self, limit: int | None = None) -> int:
        """Number of images ``iter_batches(.., limit)`` yields: ``min(limit, images not excluded)``."""
        return limited_count(self.num_images - num_excluded(self), limit, self.spec)

    def known_labels(self) -> np.ndarray | None:
        """int32 ``[num_images]`` labels when they are known without decoding images, else None."""
        labels = getattr(self, "labels", None)
        return None if labels is None else np.asarray(labels)

    def subset(self, limit: int | None = None, subset: str = "balanced") -> np.ndarray:
        """The source indices ``iter_batches(.., limit, subset)`` visits (:func:`subset_indices`
        over the images not excluded)."""
        return pick_subset(self, self.count(limit), self.known_labels(), subset)

    def iter_batches(self, batch_size: int, limit: int | None = None, subset: str = "balanced"
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches of the ``limit`` images :meth:`subset` picks, in source order; the last one may be
        smaller than ``batch_size``. ``limit=None``: every image."""
        batch_size = _check_batch_size(batch_size)
        idx = self.subset(limit, subset)
        for start in range(0, len(idx), batch_size):
            yield self.load(idx[start:start + batch_size])

    def describe(self) -> str:
        h, w = self.image_size
        return (f"{self.spec} [{self.split}]: {self.num_images} images, {self.num_classes} classes, "
                f"{h}x{w}, {self.normalization.name} normalization")

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"{self.spec}: index out of range [0, {self.num_images})")
        return idx


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def calibration_indices(num_available: int, num_images: int, seed: int = 0) -> np.ndarray:
    """The first ``num_images`` of a seeded permutation of ``range(num_available)``."""
    if not 1 <= num_images <= num_available:
        raise ValueError(f"cannot draw {num_images} calibration images from {num_available}")
    return np.random.default_rng(seed).permutation(num_available)[:num_images]


def calibration_batches(src: ImageSource, num_images: int = 32, batch_size: int = 32,
                        seed: int = 0, progress: bool = False) -> list[np.ndarray]:
    """A seeded random subset of ``src`` as a list of ``float32 [b, H, W, 3]`` batches.

    Batches hold ``batch_size`` images except possibly the last. Draw from a split that is
    disjoint from the evaluation split (e.g. ``train``); the subset depends only on
    ``(src.num_images, num_images, seed)``. ``progress``: a bar (images/s, ETA) while decoding.
    """
    batch_size = _check_batch_size(batch_size)
    try:
        idx = calibration_indices(src.num_images, int(num_images), seed)
    except ValueError as e:
        raise ValueError(f"{src.spec} [{src.split}]: {e}") from None
    from cfws_jax.progress import Progress

    bar = Progress(total=len(idx), desc="load calibration images", unit="img", disable=not progress)
    out = []
    for i in range(0, len(idx), batch_size):
        out.append(src.load(idx[i:i + batch_size])[0])
        bar.update(len(out[-1]))
    bar.close()
    return out


def limited_count(num_images: int, limit: int | None, spec: str) -> int:
    """``min(limit, num_images)`` (all when ``limit`` is None); ValueError naming ``spec`` if negative."""
    if limit is None:
        return num_images
    if int(limit) < 0:
        raise ValueError(f"{spec}: limit must be >= 0, got {limit}")
    return min(int(limit), num_images)


def subset_indices(num_images: int, n: int, labels=None, subset: str = "balanced") -> np.ndarray:
    """Sorted int64 indices of the ``n`` images an evaluation with a limit visits.

    * ``"first"``: ``0 .. n-1``, the source's first images (biased when the source is sorted by
      class, as the shared CIFAR-10 npz is).
    * ``"balanced"`` with ``labels`` (int ``[num_images]``, all >= 0): stratified by label. Class c
      with ``m_c`` images gets ``n * m_c / num_images`` rounded by largest remainder (ties to the
      lower label), taken evenly spaced within the class: its ``j``-th pick is the class's image
      ``floor((j + 0.5) * m_c / n_c)`` in source order.
    * ``"balanced"`` without labels (or with any negative label): evenly strided over the whole
      source, image ``floor((j + 0.5) * num_images / n)``.

    Deterministic: no seed, the same indices on every machine.
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset rule {subset!r}; expected one of {SUBSETS}")
    n = int(n)
    if not 0 <= n <= num_images:
        raise ValueError(f"cannot take {n} of {num_images} images")
    if subset == "first" or n == num_images:
        return np.arange(n, dtype=np.int64)
    if labels is None or len(labels) != num_images or (len(labels) and np.min(labels) < 0):
        return ((np.arange(n) + 0.5) * num_images / n).astype(np.int64)
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / num_images
    take = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]
    take[extra] += 1
    picked = []
    for c, m, k in zip(classes, counts, take):
        members = np.flatnonzero(labels == c)
        picked.append(members[((np.arange(k) + 0.5) * m / k).astype(np.int64)] if k else members[:0])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def exclusion(num_images: int, indices, spec: str) -> np.ndarray:
    """Sorted unique int64 ``indices``; IndexError naming ``spec`` when one is out of range."""
    idx = np.unique(np.asarray(indices, np.int64).reshape(-1))
    if idx.size and (idx[0] < 0 or idx[-1] >= num_images):
        raise IndexError(f"{spec}: excluded index out of range [0, {num_images})")
    return idx


def num_excluded(source) -> int:
    """How many images :meth:`ImageSource.exclude` left out of ``source`` (0 for any other source)."""
    ex = getattr(source, "excluded", None)
    return 0 if ex is None else len(ex)


def pick_subset(source, n: int, labels=None, subset: str = "balanced") -> np.ndarray:
    """:func:`subset_indices` of ``n`` images over ``source``'s images minus ``source.excluded``
    (labels restricted alike), as indices of ``source``."""
    if not num_excluded(source):
        return subset_indices(source.num_images, n, labels, subset)
    pool = np.setdiff1d(np.arange(source.num_images, dtype=np.int64), source.excluded)
    sub_labels = None if labels is None or len(labels) != source.num_images else np.asarray(labels)[pool]
    return pool[subset_indices(len(pool), n, sub_labels, subset)]


def excluded_note(source) -> str:
    """``""``, or ``"; 32 calibration images of q/ excluded"`` when :meth:`ImageSource.exclude` was used."""
    k = num_excluded(source)
    return f"; {k} {getattr(source, 'excluded_why', 'images')} excluded" if k else ""


def describe_subset(indices, num_images: int, labels=None, what: str = "images", excluded: int = 0) -> str:
    """One line such as ``"1000 of 10000 test images, 100 per class"`` (or ``"… 98-102 per class"``,
    ``"… evenly spaced"``, ``"all 10000 …"``); ``excluded``: images left out beforehand
    (:meth:`ImageSource.exclude`), so that all the rest reads ``"96 of 128 images"``."""
    idx = np.asarray(indices)
    if len(idx) == num_images:
        return f"all {num_images} {what}"
    if excluded and len(idx) == num_images - excluded:  # every image not excluded
        return f"{len(idx)} of {num_images} {what}"
    head = f"{len(idx)} of {num_images} {what}"
    if labels is None or len(labels) != num_images or (len(labels) and np.min(labels) < 0):
        return head + (", the first ones" if len(idx) and idx[-1] == len(idx) - 1 else ", evenly spaced")
    counts = np.bincount(np.asarray(labels)[idx], minlength=int(np.max(labels)) + 1)
    counts = counts[np.isin(np.arange(len(counts)), np.unique(labels))]
    per = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"
    return f"{head}, {per} per class"
