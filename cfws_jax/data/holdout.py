"""Keep evaluation images apart from the images a quantized model was calibrated on.

``cfws-jax ptq`` records which images calibrated the model (:func:`calibration_record`, saved in
the quantized model's metadata under ``calibration.images_from``); ``cfws-jax eval`` compares
the images it is about to score with that record (:func:`calibration_overlap`) and warns, or
with ``--exclude-calib`` leaves them out (:meth:`ImageSource.exclude`).

An image is named by a key that survives a change of source class: the real path of its file
for folder sources (a COCO folder opened for evaluation and the same folder opened for
letterboxed calibration name the same files alike), else ``"<real path or tfds:NAME>|<split
read>|<index>"`` for array and tfds sources (CIFAR ``val`` reads the ``test`` arrays, so it
shares keys with ``test``).
"""

from __future__ import annotations

import os

import numpy as np

RECORD_KEY = "images_from"


def _real(spec: str) -> str:
    return spec if str(spec).startswith("tfds:") else os.path.realpath(spec)


def image_keys(source, indices) -> list[str]:
    """One string per index naming that image of ``source`` independently of how it was opened."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    paths = getattr(source, "paths", None)
    if paths is not None:
        return [os.path.realpath(paths[i]) for i in idx.tolist()]
    base = f"{_real(source.spec)}|{getattr(source, 'data_split', source.split)}"
    return [f"{base}|{i}" for i in idx.tolist()]


def calibration_record(source, indices) -> dict:
    """JSON-able ``{"source", "split", "num_images", "keys"}`` for the calibration ``indices``."""
    return {"source": _real(source.spec), "split": getattr(source, "split", None),
            "num_images": int(source.num_images), "keys": sorted(image_keys(source, indices))}


def calibration_overlap(record: dict, source) -> np.ndarray:
    """Sorted int64 indices of ``source`` whose images the ``record`` lists (empty: disjoint)."""
    keys = set(record.get("keys", ()))
    if not keys:
        return np.zeros((0,), np.int64)
    mine = image_keys(source, np.arange(source.num_images))
    return np.asarray([i for i, k in enumerate(mine) if k in keys], np.int64)


def read_record(qdir) -> dict | None:
    """The calibration record of the quantized model folder ``qdir``; None when it has none
    (written before the record existed, or by the Python API). ValueError for a folder that is
    not a cfws_jax checkpoint."""
    from cfws_jax import io

    meta = io.read_metadata(qdir).get("metadata", {})
    rec = meta.get("calibration", {}).get(RECORD_KEY) if isinstance(meta, dict) else None
    return rec if isinstance(rec, dict) else None
