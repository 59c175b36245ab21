"""Pieces shared by the classifier converter (:mod:`converters.convert`) and the YOLOv6 converter
(:mod:`converters.yolov6`): the result type, the Flax model's variable shapes, the generic leaf
rules between PyTorch and Flax, and the summary of a long key list in an error line.

Imports only :mod:`cfws_jax.models` (never another converter module), so the converters import
each other one way only: ``convert -> yolov6 -> common``.

Generic leaf rules (torch leaf <- Flax ``(collection, leaf)``):

* ``weight`` <- params ``kernel`` (conv OIHW <- HWIO; linear ``[out, in]`` <- ``[in, out]``) or
  params ``scale`` (BatchNorm);
* ``bias`` <- params ``bias``; ``running_mean`` / ``running_var`` <- batch_stats ``mean`` / ``var``;
* ``alpha`` <- params ``alpha`` (YOLOv6 BottleRep: torch ``[1]``, reshaped to the Flax shape).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cfws_jax.models import registry

LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    ("params", "alpha"): "alpha",
}
"""Flax ``(collection, leaf)`` -> the PyTorch state-dict leaf name."""

SHOW = 5  # items shown per summarised list


class ConvertResult(NamedTuple):
    arch: str
    form: str  # "train" | "deploy"
    dialect: str
    variables: dict
    num_classes: int | None = None  # set when not the architecture's default (YOLOv6: from cls_preds)
    dropped: tuple[str, ...] = ()   # checkpoint keys dropped on purpose (YOLOv6 detect.proj*, training-only)
    filled: tuple[str, ...] = ()    # expected keys absent from the file and set by rule (YOLOv6 0.4.x conv biases = 0)


@functools.lru_cache(maxsize=64)
def flax_shapes(arch: str, deploy: bool, num_classes: int | None) -> dict:
    """``{(collection, *module_path, leaf): shape}`` of the Flax model's variables (``jax.eval_shape``
    of ``init``: no arrays are allocated)."""
    model = registry.create_model(arch, deploy=deploy, num_classes=num_classes)
    size = 64  # a multiple of every YOLOv6 stride (P6: 64)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def torch_shape(flax_shape: tuple[int, ...], leaf: str = "kernel") -> tuple[int, ...]:
    """The PyTorch shape of a Flax variable: HWIO -> OIHW, ``[in, out]`` -> ``[out, in]``; ``alpha`` [1]."""
    if leaf == "alpha":
        return (1,)
    if len(flax_shape) == 4:
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def to_flax(value, flax_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A PyTorch tensor (NumPy, any float dtype) -> float32 in Flax layout (OIHW -> HWIO,
    ``[out, in]`` -> ``[in, out]``; with ``flax_shape`` a vector is reshaped to it, e.g. alpha)."""
    v = np.asarray(value, np.float32)
    if v.ndim == 4:
        return np.ascontiguousarray(v.transpose(2, 3, 1, 0))
    if v.ndim == 2:
        return np.ascontiguousarray(v.T)
    return np.ascontiguousarray(v if flax_shape is None else v.reshape(flax_shape))


def summary(items, n: int = SHOW) -> str:
    """``"3 (a, b, c)"`` / ``"12 (a, b, c, d, e, ...)"``: a count and the first ``n`` items."""
    items = list(items)
    return f"{len(items)} ({', '.join(items[:n])}{', ...' if len(items) > n else ''})"
