"""The YOLOv6 detector: ``backbone`` (EfficientRep) -> ``neck`` (RepPAN / RepBiFPAN) -> ``detect``.

``YOLOv6(config, deploy)(x, train=False)``: x ``[B, H, W, 3]`` NHWC float32 RGB in [0, 1] (no
mean/std), H and W multiples of 32 (else ValueError naming the shape). Returns the decoded
prediction ``[B, N, 5 + nc]``, ``N = Σ (H/s)(W/s)`` over strides s = 8, 16, 32: columns
``cx, cy, w, h`` (input pixels), confidence (``sigmoid(obj)`` for v1.0, 1 for v2.0 / v3.0),
``sigmoid(cls)`` x nc; rows level by level, row-major (y then x) within a level -- the official
model's element order.

Variables: train form ``{"params", "batch_stats"}`` (BN eps 1e-3), deploy form ``{"params"}``
(:func:`cfws_jax.models.yolov6.fuse.fuse_yolov6`). Parameter paths follow the PyTorch module
paths (see :mod:`cfws_jax.models.yolov6`), e.g. ``backbone/ERBlock_2_1/block_0/rbr_dense/conv``, ``detect/stems_0``.
"""

from __future__ import annotations

import flax.linen as nn

from cfws_jax.models.yolov6.backbone import EfficientRep
from cfws_jax.models.yolov6.config import YOLOv6Config
from cfws_jax.models.yolov6.head import Detect, decode_outputs
from cfws_jax.models.yolov6.neck import RepPANNeck


def check_input_shape(shape) -> None:
    """ValueError unless ``shape`` is ``[B, H, W, 3]`` with H, W positive multiples of 32."""
    if len(shape) != 4 or shape[-1] != 3 or shape[1] % 32 or shape[2] % 32 or not shape[1] or not shape[2]:
        raise ValueError(
            f"YOLOv6 input must be NHWC [B, H, W, 3] with H and W multiples of 32, got shape {tuple(shape)}"
        )


class YOLOv6(nn.Module):
    """YOLOv6 detector (see the module docstring)."""

    config: YOLOv6Config
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, decode: bool = True):
        """``decode=False``: the raw per-level pred maps ``[(cls, reg, obj|None), ...]`` (strides 8,
        16, 32; NHWC, pre-sigmoid), exactly what :class:`Detect` returns (for training losses)."""
        check_input_shape(x.shape)
        cfg = self.config
        feats = EfficientRep(cfg, self.deploy, name="backbone")(x, train)
        feats = RepPANNeck(cfg, self.deploy, name="neck")(feats, train)
        levels = Detect(cfg.num_classes, cfg.reg_channels, cfg.head == "v1", self.deploy, name="detect")(feats, train)
        if not decode:
            return levels
        return decode_outputs(levels, x.shape[1:3], cfg.reg_max)
