"""YOLOv6 detectors in Flax, written from FORMATS.md §4, FORMATS_YOLOV6_LARGE.md §4.11-4.20 and
FORMATS_YOLOV6_QA.md: v1.0 / v2.0 / v3.0 n, t, s; v2.0 m, l, l_relu and the 0.2.1 base models;
v3.0 m, l; P6 n6, s6, m6, l6 (four levels, strides 8 / 16 / 32 / 64, sides multiples of 64);
QARepVGG n / s / m (``*_qa`` V1, ``*_qav2`` V2). Registry names: :data:`YOLOV6_CONFIGS`.

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
BottleRep ``P.alpha`` ``[1]`` -> param ``P/alpha`` ``[1]`` (train and deploy forms). Layouts: Flax
activations NHWC, kernels HWIO; torch NCHW / OIHW.

Which layers CFWS splits (deploy form; CFWS candidates are the ``rep=True`` QConvs, i.e. the
``rbr_reparam`` 3x3 convs of RepVGG / QARepVGG basic blocks, whose centre tap absorbed a 1x1 and an
identity branch). Conv-type basic blocks (``conv_silu`` / ``conv_relu``: l, l6, the base models)
are plain biased 3x3 convs: nothing was folded into their centre tap, so there is no coarse /
fine structure to split, and they are quantized like every other plain conv (BepC3 / SPPF 1x1s,
neck SimConvs, head convs).

============================  ==================  ==========================================
model                         re-parameterized    conv-type basic blocks (not split)
============================  ==================  ==========================================
n / t / s (all versions)      35 (t v1: 28)       --
n_qa, s_qa (V1 / V2)          35 (QA blocks)      --
m_v2, m_v3, m_qa (V1 / V2)    53                  --
l_relu_v2                     95                  --
l_v2, l_v3, l_base            0                   95 (stem, 4 downsamplers, 90 BottleRep convs)
m_base                        0                   77
n6, s6                        46                  --
m6                            70                  --
l6                            0                   126
============================  ==================  ==========================================
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
