"""YOLOv6 detectors (meituan YOLOv6 v1.0 / v2.0 / v3.0 n, t, s) in Flax, written from FORMATS.md §4.

See :mod:`cfws_jax.models.yolov6.model` for the input / output contract and
:mod:`cfws_jax.models.yolov6.head` for the pure-jnp decode pieces.

Parameter naming (= Flax module paths = PTQ layer names = the converter's key map): the PyTorch
module path (0.2.x / 0.3.x naming) split on ``.``, a purely numeric component joined to the
previous one with ``_``: ``backbone.ERBlock_2.1.block.0.rbr_dense.conv`` ->
``backbone/ERBlock_2_1/block_0/rbr_dense/conv``, ``detect.cls_preds.2`` -> ``detect/cls_preds_2``.
Leaves: conv ``weight`` OIHW -> ``kernel`` HWIO; BN ``weight``/``bias`` -> params
``scale``/``bias``, ``running_mean``/``running_var`` -> batch_stats ``mean``/``var`` (eps 1e-3).
The transposed conv ``upsample_transpose`` (ConvTranspose2d k2 s2, torch weight ``[I, O, 2, 2]``)
is a 1x1 QConv to ``4*O`` channels, output channel ``(a*2 + b)*O + o`` for ``weight[i, o, a, b]``,
bias tiled 4x, followed by depth-to-space (:class:`~cfws_jax.models.yolov6.blocks.Transpose`).
"""

from cfws_jax.models.yolov6.config import YOLOV6_CONFIGS, YOLOv6Config, scale_channels, scale_repeats
from cfws_jax.models.yolov6.fuse import fuse_yolov6
from cfws_jax.models.yolov6.head import (
    anchor_points,
    decode_level,
    decode_outputs,
    decode_v1_boxes,
    dfl_expectation,
    grid_points,
    ltrb_to_xywh,
)
from cfws_jax.models.yolov6.model import YOLOv6, check_input_shape

__all__ = [
    "YOLOV6_CONFIGS", "YOLOv6", "YOLOv6Config", "anchor_points", "check_input_shape", "decode_level",
    "decode_outputs", "decode_v1_boxes", "dfl_expectation", "fuse_yolov6", "grid_points", "ltrb_to_xywh",
    "scale_channels", "scale_repeats",
]
