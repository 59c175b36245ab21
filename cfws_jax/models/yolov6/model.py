"""The YOLOv6 detector: ``backbone`` (EfficientRep family) -> ``neck`` (PAN / BiFPAN, P5 or P6) -> ``detect``.

``YOLOv6(config, deploy)(x, train=False, decode=True)``: x ``[B, H, W, 3]`` NHWC float32 RGB in
[0, 1] (no mean/std), H and W multiples of 32 (P6 models: of 64), else ValueError naming the
shape. Returns the decoded prediction ``[B, N, 5 + nc]``, ``N = Σ (H/s)(W/s)`` over the strides
s = 8, 16, 32 (P6: and 64): columns ``cx, cy, w, h`` (input pixels), confidence (``sigmoid(obj)``
for v1.0, 1 for v2.0 / v3.0), ``sigmoid(cls)`` x nc; rows level by level, row-major (y then x)
within a level -- the official model's element order. ``decode=False`` returns the raw per-level
list ``[(cls, reg, obj | None), ...]`` of NHWC pre-sigmoid pred maps instead (training hook).

Variables: train form ``{"params", "batch_stats"}`` (BN eps 1e-3), deploy form ``{"params"}``
(:func:`cfws_jax.models.yolov6.fuse.fuse_yolov6`). Parameter paths follow the PyTorch module
paths (see :mod:`cfws_jax.models.yolov6`), e.g. ``backbone/ERBlock_2_1/block_0/rbr_dense/conv``,
``backbone/ERBlock_2_1/m/conv1/alpha``, ``detect/stems_0``.
"""

from __future__ import annotations

import flax.linen as nn

from cfws_jax.models.yolov6.backbone import EfficientRep
from cfws_jax.models.yolov6.config import YOLOv6Config
from cfws_jax.models.yolov6.head import Detect, decode_outputs
from cfws_jax.models.yolov6.neck import RepBiFPANNeck6, RepPANNeck


def check_input_shape(shape, multiple: int = 32) -> None:
    """ValueError unless ``shape`` is ``[B, H, W, 3]`` with H, W positive multiples of ``multiple``
    (32 for P5 models, 64 for P6)."""
    if len(shape) != 4 or shape[-1] != 3 or shape[1] % multiple or shape[2] % multiple or not shape[1] or not shape[2]:
        what = " (P6 model)" if multiple == 64 else ""
        raise ValueError(
            f"YOLOv6 input{what} must be NHWC [B, H, W, 3] with H and W multiples of {multiple}, "
            f"got shape {tuple(shape)}"
        )


class YOLOv6(nn.Module):
    """YOLOv6 detector (see the module docstring)."""

    config: YOLOv6Config
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, decode: bool = True):
        """``decode=False``: the raw per-level pred maps ``[(cls, reg, obj|None), ...]`` (strides 8,
        16, 32 (, 64 for P6); NHWC, pre-sigmoid), exactly what :class:`Detect` returns (for training losses)."""
        cfg = self.config
        check_input_shape(x.shape, cfg.strides[-1])
        feats = EfficientRep(cfg, self.deploy, name="backbone")(x, train)
        neck = RepBiFPANNeck6 if cfg.p6 else RepPANNeck
        feats = neck(cfg, self.deploy, name="neck")(feats, train)
        levels = Detect(cfg.num_classes, cfg.reg_channels, cfg.head == "v1", self.deploy, name="detect")(feats, train)
        if not decode:
            return levels
        return decode_outputs(levels, x.shape[1:3], cfg.reg_max)
