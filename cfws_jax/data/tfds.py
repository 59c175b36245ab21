"""TensorFlow Datasets sources (``tfds:cifar10``, ``tfds:imagenet2012``) read from a locally
prepared copy. Nothing is ever downloaded (``download=False``); ``tensorflow_datasets`` is
imported only when such a source is opened. ``TFDS_DATA_DIR`` (tfds' own variable) or
``data_dir`` chooses where tfds looks.

Split names: ``train`` -> ``train``; ``val`` -> ``validation`` (or ``test`` when the dataset has
no validation split, as CIFAR-10); ``test`` -> ``test``. Files are read unshuffled, so the order
is fixed.
"""

from __future__ import annotations

import importlib

import numpy as np

from cfws_jax.data.preprocess import Normalization, check_protocol, image_hw, transform_array
from cfws_jax.data.source import ImageSource, check_split, _check_batch_size


def import_tfds():
    try:
        return importlib.import_module("tensorflow_datasets")
    except ImportError as e:
        raise ImportError("tfds: sources need tensorflow_datasets, which is not installed "
                          "(pip install tensorflow-datasets)") from e


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique indices -> contiguous ``[start, stop)`` runs."""
    runs, start = [], None
    for i, v in enumerate(idx.tolist()):
        if start is None:
            start = v
        elif v != idx[i - 1] + 1:
            runs.append((start, int(idx[i - 1]) + 1))
            start = v
    if start is not None:
        runs.append((start, int(idx[-1]) + 1))
    return runs


class TfdsSource(ImageSource):
    """``image_size=None`` keeps the native size when the dataset's images have a fixed shape
    (CIFAR-10: 32x32) and means 224 otherwise (ImageNet)."""

    def __init__(self, name: str, *, split: str = "val", image_size=None,
                 protocol: str = "resize_crop", normalization: Normalization, data_dir=None):
        self.spec = f"tfds:{name}"
        check_split(split, self.spec)
        self.tfds, self.name, self.data_dir = import_tfds(), name, data_dir
        try:
            info = self.tfds.builder(name, data_dir=data_dir).info
        except Exception as e:  # unknown name and other tfds errors: re-raise naming the dataset
            raise ValueError(f"{self.spec}: cannot open the tfds builder: {e}") from e
        splits = info.splits
        tsplit = {"train": "train", "test": "test"}.get(split)
        if split == "val":
            tsplit = "test" if "validation" not in splits and "test" in splits else "validation"
        if tsplit not in splits or not splits[tsplit].num_examples:
            raise ValueError(
                f"{self.spec}: split {tsplit!r} is not prepared locally (data_dir "
                f"{data_dir or 'default / TFDS_DATA_DIR'}; prepared splits: {sorted(splits)}). "
                "Prepare it with tfds first; cfws-jax never downloads data.")
        self.split, self.tfds_split = split, tsplit
        self.data_split = tsplit  # names images for cfws_jax.data.holdout
        self.num_images = int(splits[tsplit].num_examples)
        label = info.features["label"]
        self.num_classes = int(label.num_classes)
        self.class_names = tuple(label.names) if getattr(label, "names", None) else None
        shape = tuple(info.features["image"].shape)
        native = shape[:2] if all(isinstance(s, int) for s in shape[:2]) else None
        self.resize_to = image_hw(image_size if image_size is not None or native else 224)
        self.image_size = self.resize_to or tuple(int(s) for s in native)
        self.protocol = check_protocol(protocol)
        self.normalization = normalization

    def _read(self, tfds_split: str):
        """Iterate ``(image uint8 HWC, label)`` of a tfds split expression, unshuffled."""
        try:
            ds = self.tfds.load(self.name, split=tfds_split, data_dir=self.data_dir,
                                download=False, shuffle_files=False)
        except Exception as e:  # tfds raises assorted errors when data is missing
            raise ValueError(f"{self.spec}: cannot read split {tfds_split!r} locally "
                             f"(never downloaded): {e}") from e
        for ex in self.tfds.as_numpy(ds):
            yield np.asarray(ex["image"]), int(ex["label"])

    def _batch(self, examples) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.image_size
        imgs = [transform_array(im, self.resize_to, self.protocol) for im, _ in examples]
        x = np.stack(imgs) if imgs else np.zeros((0, h, w, 3), np.uint8)
        return self.normalization(x), np.asarray([lab for _, lab in examples], np.int32)

    def load(self, indices):
        idx = self._check_indices(indices)
        uniq = np.unique(idx)
        got = {}
        for a, b in _runs(uniq):
            for i, ex in zip(range(a, b), self._read(f"{self.tfds_split}[{a}:{b}]")):
                got[i] = ex
        return self._batch([got[i] for i in idx.tolist()])

    def known_labels(self):
        return None  # tfds labels come with the images: a balanced subset is evenly strided

    def iter_batches(self, batch_size: int, limit: int | None = None, subset: str = "balanced"):
        """Streams the split once; ``subset`` as :meth:`ImageSource.subset` (evenly strided when balanced)."""
        batch_size = _check_batch_size(batch_size)
        idx = self.subset(limit, subset)
        n = len(idx)
        if n == 0:
            return
        first = n == self.num_images or subset == "first"
        expr = self.tfds_split if n == self.num_images else f"{self.tfds_split}[:{int(idx[-1]) + 1}]"
        wanted = None if first else set(idx.tolist())
        buf = []
        for i, ex in enumerate(self._read(expr)):
            if wanted is not None and i not in wanted:
                continue
            buf.append(ex)
            if len(buf) == batch_size:
                yield self._batch(buf)
                buf = []
        if buf:
            yield self._batch(buf)
