"""YOLOv6 Flax detectors (cfws_jax.models.yolov6): configs, every kernel shape of FORMATS.md
Appendix A (T1, T2), deploy parameter / key counts (§4.5), names and layer attributes, output
order and decoding against slow NumPy references, the Transpose layer vs a NumPy
ConvTranspose2d(k=2, s=2), train vs deploy after fusion, and input-size errors."""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax.models import canonical_arch, create_model, family, fuse, get_config
from cfws_jax.models.layers import QConv
from cfws_jax.models.yolov6 import (
    YOLOV6_CONFIGS,
    anchor_points,
    decode_outputs,
    decode_v1_boxes,
    dfl_expectation,
    grid_points,
    ltrb_to_xywh,
)
from cfws_jax.models.yolov6.blocks import Transpose, transpose_kernel_from_torch

from conftest import numpy_init

# FORMATS.md Appendix A, rows copied verbatim (torch path | kind | OIHW weight shape per variant).
T1 = """
| `backbone.stem` | RepVGGBlock | [16, 3, 3, 3] | [24, 3, 3, 3] | [32, 3, 3, 3] |
| `backbone.ERBlock_2.0` | RepVGGBlock | [32, 16, 3, 3] | [48, 24, 3, 3] | [64, 32, 3, 3] |
| `backbone.ERBlock_2.1.conv1` | RepVGGBlock +id | [32, 32, 3, 3] | [48, 48, 3, 3] | [64, 64, 3, 3] |
| `backbone.ERBlock_2.1.block.0` | RepVGGBlock +id | [32, 32, 3, 3] | [48, 48, 3, 3] | [64, 64, 3, 3] |
| `backbone.ERBlock_3.0` | RepVGGBlock | [64, 32, 3, 3] | [96, 48, 3, 3] | [128, 64, 3, 3] |
| `backbone.ERBlock_3.1.conv1` | RepVGGBlock +id | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `backbone.ERBlock_3.1.block.0` | RepVGGBlock +id | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `backbone.ERBlock_3.1.block.1` | RepVGGBlock +id | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `backbone.ERBlock_3.1.block.2` | RepVGGBlock +id | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `backbone.ERBlock_4.0` | RepVGGBlock | [128, 64, 3, 3] | [192, 96, 3, 3] | [256, 128, 3, 3] |
| `backbone.ERBlock_4.1.conv1` | RepVGGBlock +id | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_4.1.block.0` | RepVGGBlock +id | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_4.1.block.1` | RepVGGBlock +id | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_4.1.block.2` | RepVGGBlock +id | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_4.1.block.3` | RepVGGBlock +id | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_4.1.block.4` | RepVGGBlock +id | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_5.0` | RepVGGBlock | [256, 128, 3, 3] | [384, 192, 3, 3] | [512, 256, 3, 3] |
| `backbone.ERBlock_5.1.conv1` | RepVGGBlock +id | [256, 256, 3, 3] | [384, 384, 3, 3] | [512, 512, 3, 3] |
| `backbone.ERBlock_5.1.block.0` | RepVGGBlock +id | [256, 256, 3, 3] | [384, 384, 3, 3] | [512, 512, 3, 3] |
| `backbone.ERBlock_5.2.cv1` | Conv+BN | [128, 256, 1, 1] | [192, 384, 1, 1] | [256, 512, 1, 1] |
| `backbone.ERBlock_5.2.cv2` | Conv+BN | [256, 512, 1, 1] | [384, 768, 1, 1] | [512, 1024, 1, 1] |
| `neck.Rep_p4.conv1` | RepVGGBlock | [64, 192, 3, 3] | [96, 288, 3, 3] | [128, 384, 3, 3] |
| `neck.Rep_p4.block.0` | RepVGGBlock +id | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_p4.block.1` | RepVGGBlock +id | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_p4.block.2` | RepVGGBlock +id | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_p3.conv1` | RepVGGBlock | [32, 96, 3, 3] | [48, 144, 3, 3] | [64, 192, 3, 3] |
| `neck.Rep_p3.block.0` | RepVGGBlock +id | [32, 32, 3, 3] | [48, 48, 3, 3] | [64, 64, 3, 3] |
| `neck.Rep_p3.block.1` | RepVGGBlock +id | [32, 32, 3, 3] | [48, 48, 3, 3] | [64, 64, 3, 3] |
| `neck.Rep_p3.block.2` | RepVGGBlock +id | [32, 32, 3, 3] | [48, 48, 3, 3] | [64, 64, 3, 3] |
| `neck.Rep_n3.conv1` | RepVGGBlock +id | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_n3.block.0` | RepVGGBlock +id | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_n3.block.1` | RepVGGBlock +id | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_n3.block.2` | RepVGGBlock +id | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_n4.conv1` | RepVGGBlock +id | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `neck.Rep_n4.block.0` | RepVGGBlock +id | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `neck.Rep_n4.block.1` | RepVGGBlock +id | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `neck.Rep_n4.block.2` | RepVGGBlock +id | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `neck.reduce_layer0` | Conv+BN | [64, 256, 1, 1] | [96, 384, 1, 1] | [128, 512, 1, 1] |
| `neck.upsample0.upsample_transpose` | ConvTranspose2d k2 s2 +bias | [64, 64, 2, 2] | [96, 96, 2, 2] | [128, 128, 2, 2] |
| `neck.reduce_layer1` | Conv+BN | [32, 64, 1, 1] | [48, 96, 1, 1] | [64, 128, 1, 1] |
| `neck.upsample1.upsample_transpose` | ConvTranspose2d k2 s2 +bias | [32, 32, 2, 2] | [48, 48, 2, 2] | [64, 64, 2, 2] |
| `neck.downsample2` | Conv+BN | [32, 32, 3, 3] | [48, 48, 3, 3] | [64, 64, 3, 3] |
| `neck.downsample1` | Conv+BN | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `detect.proj` | Parameter linspace(0,16,17), unused w/o DFL | [17] | [17] | [17] |
| `detect.proj_conv` | Conv2d 1x1 **no bias** (weight = proj), unused w/o DFL | [1, 17, 1, 1] | [1, 17, 1, 1] | [1, 17, 1, 1] |
| `detect.stems.0` | Conv+BN | [32, 32, 1, 1] | [48, 48, 1, 1] | [64, 64, 1, 1] |
| `detect.stems.1` | Conv+BN | [64, 64, 1, 1] | [96, 96, 1, 1] | [128, 128, 1, 1] |
| `detect.stems.2` | Conv+BN | [128, 128, 1, 1] | [192, 192, 1, 1] | [256, 256, 1, 1] |
| `detect.cls_convs.0` | Conv+BN | [32, 32, 3, 3] | [48, 48, 3, 3] | [64, 64, 3, 3] |
| `detect.cls_convs.1` | Conv+BN | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `detect.cls_convs.2` | Conv+BN | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `detect.reg_convs.0` | Conv+BN | [32, 32, 3, 3] | [48, 48, 3, 3] | [64, 64, 3, 3] |
| `detect.reg_convs.1` | Conv+BN | [64, 64, 3, 3] | [96, 96, 3, 3] | [128, 128, 3, 3] |
| `detect.reg_convs.2` | Conv+BN | [128, 128, 3, 3] | [192, 192, 3, 3] | [256, 256, 3, 3] |
| `detect.cls_preds.0` | Conv2d 1x1 +bias | [80, 32, 1, 1] | [80, 48, 1, 1] | [80, 64, 1, 1] |
| `detect.cls_preds.1` | Conv2d 1x1 +bias | [80, 64, 1, 1] | [80, 96, 1, 1] | [80, 128, 1, 1] |
| `detect.cls_preds.2` | Conv2d 1x1 +bias | [80, 128, 1, 1] | [80, 192, 1, 1] | [80, 256, 1, 1] |
| `detect.reg_preds.0` | Conv2d 1x1 +bias | [4, 32, 1, 1] | [4, 48, 1, 1] | [4, 64, 1, 1] |
| `detect.reg_preds.1` | Conv2d 1x1 +bias | [4, 64, 1, 1] | [4, 96, 1, 1] | [4, 128, 1, 1] |
| `detect.reg_preds.2` | Conv2d 1x1 +bias | [4, 128, 1, 1] | [4, 192, 1, 1] | [4, 256, 1, 1] |
"""
T2 = """
| `backbone.stem` | RepVGGBlock | [16, 3, 3, 3] | [32, 3, 3, 3] |
| `backbone.ERBlock_2.0` | RepVGGBlock | [32, 16, 3, 3] | [64, 32, 3, 3] |
| `backbone.ERBlock_2.1.conv1` | RepVGGBlock +id | [32, 32, 3, 3] | [64, 64, 3, 3] |
| `backbone.ERBlock_2.1.block.0` | RepVGGBlock +id | [32, 32, 3, 3] | [64, 64, 3, 3] |
| `backbone.ERBlock_3.0` | RepVGGBlock | [64, 32, 3, 3] | [128, 64, 3, 3] |
| `backbone.ERBlock_3.1.conv1` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `backbone.ERBlock_3.1.block.0` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `backbone.ERBlock_3.1.block.1` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `backbone.ERBlock_3.1.block.2` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `backbone.ERBlock_4.0` | RepVGGBlock | [128, 64, 3, 3] | [256, 128, 3, 3] |
| `backbone.ERBlock_4.1.conv1` | RepVGGBlock +id | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_4.1.block.0` | RepVGGBlock +id | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_4.1.block.1` | RepVGGBlock +id | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_4.1.block.2` | RepVGGBlock +id | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_4.1.block.3` | RepVGGBlock +id | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_4.1.block.4` | RepVGGBlock +id | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_5.0` | RepVGGBlock | [256, 128, 3, 3] | [512, 256, 3, 3] |
| `backbone.ERBlock_5.1.conv1` | RepVGGBlock +id | [256, 256, 3, 3] | [512, 512, 3, 3] |
| `backbone.ERBlock_5.1.block.0` | RepVGGBlock +id | [256, 256, 3, 3] | [512, 512, 3, 3] |
| `backbone.ERBlock_5.2.cv1` | Conv+BN | [128, 256, 1, 1] | [256, 512, 1, 1] |
| `backbone.ERBlock_5.2.cv2` | Conv+BN | [128, 256, 1, 1] | [256, 512, 1, 1] |
| `backbone.ERBlock_5.2.cv3` | Conv+BN | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_5.2.cv4` | Conv+BN | [128, 128, 1, 1] | [256, 256, 1, 1] |
| `backbone.ERBlock_5.2.cv5` | Conv+BN | [128, 512, 1, 1] | [256, 1024, 1, 1] |
| `backbone.ERBlock_5.2.cv6` | Conv+BN | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `backbone.ERBlock_5.2.cv7` | Conv+BN | [256, 256, 1, 1] | [512, 512, 1, 1] |
| `neck.reduce_layer0` | Conv+BN | [64, 256, 1, 1] | [128, 512, 1, 1] |
| `neck.Bifusion0.cv1` | Conv+BN | [64, 128, 1, 1] | [128, 256, 1, 1] |
| `neck.Bifusion0.cv2` | Conv+BN | [64, 64, 1, 1] | [128, 128, 1, 1] |
| `neck.Bifusion0.cv3` | Conv+BN | [64, 192, 1, 1] | [128, 384, 1, 1] |
| `neck.Bifusion0.upsample.upsample_transpose` | ConvTranspose2d k2 s2 +bias | [64, 64, 2, 2] | [128, 128, 2, 2] |
| `neck.Bifusion0.downsample` | Conv+BN | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_p4.conv1` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_p4.block.0` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_p4.block.1` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_p4.block.2` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `neck.reduce_layer1` | Conv+BN | [32, 64, 1, 1] | [64, 128, 1, 1] |
| `neck.Bifusion1.cv1` | Conv+BN | [32, 64, 1, 1] | [64, 128, 1, 1] |
| `neck.Bifusion1.cv2` | Conv+BN | [32, 32, 1, 1] | [64, 64, 1, 1] |
| `neck.Bifusion1.cv3` | Conv+BN | [32, 96, 1, 1] | [64, 192, 1, 1] |
| `neck.Bifusion1.upsample.upsample_transpose` | ConvTranspose2d k2 s2 +bias | [32, 32, 2, 2] | [64, 64, 2, 2] |
| `neck.Bifusion1.downsample` | Conv+BN | [32, 32, 3, 3] | [64, 64, 3, 3] |
| `neck.Rep_p3.conv1` | RepVGGBlock +id | [32, 32, 3, 3] | [64, 64, 3, 3] |
| `neck.Rep_p3.block.0` | RepVGGBlock +id | [32, 32, 3, 3] | [64, 64, 3, 3] |
| `neck.Rep_p3.block.1` | RepVGGBlock +id | [32, 32, 3, 3] | [64, 64, 3, 3] |
| `neck.Rep_p3.block.2` | RepVGGBlock +id | [32, 32, 3, 3] | [64, 64, 3, 3] |
| `neck.downsample2` | Conv+BN | [32, 32, 3, 3] | [64, 64, 3, 3] |
| `neck.Rep_n3.conv1` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_n3.block.0` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_n3.block.1` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_n3.block.2` | RepVGGBlock +id | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `neck.downsample1` | Conv+BN | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `neck.Rep_n4.conv1` | RepVGGBlock +id | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `neck.Rep_n4.block.0` | RepVGGBlock +id | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `neck.Rep_n4.block.1` | RepVGGBlock +id | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `neck.Rep_n4.block.2` | RepVGGBlock +id | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `detect.proj` | Parameter linspace(0,16,17), unused w/o DFL | [17] | [17] |
| `detect.proj_conv` | Conv2d 1x1 **no bias** (weight = proj), unused w/o DFL | [1, 17, 1, 1] | [1, 17, 1, 1] |
| `detect.stems.0` | Conv+BN | [32, 32, 1, 1] | [64, 64, 1, 1] |
| `detect.stems.1` | Conv+BN | [64, 64, 1, 1] | [128, 128, 1, 1] |
| `detect.stems.2` | Conv+BN | [128, 128, 1, 1] | [256, 256, 1, 1] |
| `detect.cls_convs.0` | Conv+BN | [32, 32, 3, 3] | [64, 64, 3, 3] |
| `detect.cls_convs.1` | Conv+BN | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `detect.cls_convs.2` | Conv+BN | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `detect.reg_convs.0` | Conv+BN | [32, 32, 3, 3] | [64, 64, 3, 3] |
| `detect.reg_convs.1` | Conv+BN | [64, 64, 3, 3] | [128, 128, 3, 3] |
| `detect.reg_convs.2` | Conv+BN | [128, 128, 3, 3] | [256, 256, 3, 3] |
| `detect.cls_preds.0` | Conv2d 1x1 +bias | [80, 32, 1, 1] | [80, 64, 1, 1] |
| `detect.cls_preds.1` | Conv2d 1x1 +bias | [80, 64, 1, 1] | [80, 128, 1, 1] |
| `detect.cls_preds.2` | Conv2d 1x1 +bias | [80, 128, 1, 1] | [80, 256, 1, 1] |
| `detect.reg_preds.0` | Conv2d 1x1 +bias | [4, 32, 1, 1] | [4, 64, 1, 1] |
| `detect.reg_preds.1` | Conv2d 1x1 +bias | [4, 64, 1, 1] | [4, 128, 1, 1] |
| `detect.reg_preds.2` | Conv2d 1x1 +bias | [4, 128, 1, 1] | [4, 256, 1, 1] |
"""

ALL = sorted(a for a in YOLOV6_CONFIGS if re.fullmatch(r"yolov6[nts]_v\d", a))  # n / t / s (Appendix A)
HW = 64

# FORMATS.md §4.5 (channels_list, num_repeat) and deploy params in millions (torch count).
CONFIG_TABLE = {
    "n": ((16, 32, 64, 128, 256, 64, 32, 32, 64, 64, 128), (1, 2, 4, 6, 2, 4, 4, 4, 4)),
    "t_v1": ((32, 64, 128, 256, 512, 128, 64, 64, 128, 128, 256), (1, 2, 3, 4, 2, 3, 3, 3, 3)),
    "t_v2": ((24, 48, 96, 192, 384, 96, 48, 48, 96, 96, 192), (1, 2, 4, 6, 2, 4, 4, 4, 4)),
    "s": ((32, 64, 128, 256, 512, 128, 64, 64, 128, 128, 256), (1, 2, 4, 6, 2, 4, 4, 4, 4)),
}
DEPLOY_M = {
    "yolov6n_v1": 4.32, "yolov6t_v1": 14.97, "yolov6s_v1": 17.22, "yolov6n_v2": 4.32,
    "yolov6t_v2": 9.70, "yolov6s_v2": 17.22, "yolov6n_v3": 4.65, "yolov6s_v3": 18.54,
}
# torch state_dict key counts (train / deploy) incl. BN buffers and num_batches_tracked (§4.5).
KEYS = {"yolov6n_v2": (668, 118), "yolov6t_v2": (668, 118), "yolov6s_v2": (668, 118),
        "yolov6n_v3": (756, 144), "yolov6s_v3": (756, 144), "yolov6s_v1": (672, None)}


def flax_path(torch_path: str) -> str:
    """cfws_jax.models.yolov6 naming: split on '.', join a numeric component to the previous one with '_'."""
    out: list[str] = []
    for part in torch_path.split("."):
        if part.isdigit():
            out[-1] += "_" + part
        else:
            out.append(part)
    return "/".join(out)


def parse_table(text: str, columns: list[str]) -> dict[str, list[tuple[str, str, tuple]]]:
    rows: dict[str, list] = {c: [] for c in columns}
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        path, kind, shapes = cells[0].strip("`"), cells[1], cells[2:]
        assert len(shapes) == len(columns), line
        for c, s in zip(columns, shapes):
            rows[c].append((path, kind, tuple(int(v) for v in re.findall(r"\d+", s))))
    return rows


def _v1_rows(rows, tiny: bool):
    """T1 rows of a v1.0 model: no detect.proj*, plus obj_preds; tiny keeps 3/4/2 backbone and 3 neck blocks."""
    keep = {"ERBlock_2": 2, "ERBlock_3": 3, "ERBlock_4": 4, "ERBlock_5": 2, "Rep_p4": 3, "Rep_p3": 3, "Rep_n3": 3, "Rep_n4": 3}
    out = []
    for path, kind, shape in rows:
        if path.startswith("detect.proj"):
            continue
        m = re.search(r"(ERBlock_\d|Rep_\w\d)\..*block\.(\d+)$", path)
        if tiny and m and int(m.group(2)) + 2 > keep[m.group(1)]:
            continue
        out.append((path, kind, shape))
        if path.startswith("detect.reg_preds."):
            out.append((path.replace("reg_preds", "obj_preds"), kind, (1,) + shape[1:]))
    return out


def table_rows() -> dict[str, list]:
    t1 = parse_table(T1, ["n", "t", "s"])
    t2 = parse_table(T2, ["n", "s"])
    return {
        "yolov6n_v2": t1["n"], "yolov6t_v2": t1["t"], "yolov6s_v2": t1["s"],
        "yolov6n_v1": _v1_rows(t1["n"], False), "yolov6s_v1": _v1_rows(t1["s"], False),
        "yolov6t_v1": _v1_rows(t1["s"], True),
        "yolov6n_v3": t2["n"], "yolov6s_v3": t2["s"],
    }


def _hwio(oihw):
    o, i, kh, kw = oihw
    return (kh, kw, i, o)


def expected_variables(rows, deploy: bool) -> tuple[dict, dict]:
    """Flax ``{path: shape}`` for params and batch_stats implied by the table rows."""
    params, stats = {}, {}

    def bn(prefix, c):
        params[f"{prefix}/scale"] = params[f"{prefix}/bias"] = (c,)
        stats[f"{prefix}/mean"] = stats[f"{prefix}/var"] = (c,)

    for path, kind, shape in rows:
        if path.startswith("detect.proj"):  # detect.proj / proj_conv: not Flax variables
            continue
        p = flax_path(path)
        o, i = shape[0], shape[1]
        if kind.startswith("RepVGGBlock"):
            if deploy:
                params[f"{p}/rbr_reparam/kernel"], params[f"{p}/rbr_reparam/bias"] = _hwio(shape), (o,)
                continue
            params[f"{p}/rbr_dense/conv/kernel"] = _hwio(shape)
            bn(f"{p}/rbr_dense/bn", o)
            params[f"{p}/rbr_1x1/conv/kernel"] = (1, 1, i, o)
            bn(f"{p}/rbr_1x1/bn", o)
            if "+id" in kind:
                assert i == o, path
                bn(f"{p}/rbr_identity", i)
        elif kind == "Conv+BN":
            params[f"{p}/conv/kernel"] = _hwio(shape)
            if deploy:
                params[f"{p}/conv/bias"] = (o,)
            else:
                bn(f"{p}/bn", o)
        elif kind.startswith("ConvTranspose2d"):
            ti, to = shape[0], shape[1]  # torch ConvTranspose2d weight [I, O, 2, 2]
            params[f"{p}/kernel"], params[f"{p}/bias"] = (1, 1, ti, 4 * to), (4 * to,)
        elif kind == "Conv2d 1x1 +bias":
            params[f"{p}/kernel"], params[f"{p}/bias"] = _hwio(shape), (o,)
        else:
            raise AssertionError(f"unknown row kind {kind!r} of {path}")
    return params, stats


def _flat(tree) -> dict:
    return {
        "/".join(k.key for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@functools.lru_cache(maxsize=None)
def _shapes(arch, deploy, hw=(HW, HW)):
    model = create_model(arch, deploy=deploy)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *hw, 3)))


@pytest.mark.parametrize("arch", ALL)
def test_config_matches_table(arch):
    cfg = get_config(arch)
    size, ver = arch[6], arch.split("_")[1]
    key = "t_" + ver if size == "t" else size
    assert (cfg.channels_list, cfg.num_repeat) == CONFIG_TABLE[key]
    assert family(arch) == "yolov6"


@pytest.mark.parametrize("arch", ALL)
def test_kernel_shapes_match_appendix_a(arch):
    """Every variable of the train and deploy forms is exactly the set implied by Appendix A."""
    rows = table_rows()[arch]
    for deploy in (False, True):
        v = _shapes(arch, deploy)
        exp_p, exp_s = expected_variables(rows, deploy)
        got_p, got_s = _flat(v["params"]), _flat(v.get("batch_stats", {}))
        assert sorted(set(got_p) ^ set(exp_p)) == [], (arch, deploy)
        assert got_p == exp_p
        assert got_s == exp_s


@pytest.mark.parametrize("arch", ALL)
def test_deploy_param_and_key_counts(arch):
    dep, train = _shapes(arch, True), _shapes(arch, False)
    proj = 0 if arch.endswith("_v1") else 2 * 17  # detect.proj [17] + proj_conv.weight [1, 17, 1, 1]
    n = sum(int(np.prod(s)) for s in _flat(dep["params"]).values()) + proj
    assert round(n / 1e6, 2) == pytest.approx(DEPLOY_M[arch], abs=0.006)
    if arch in KEYS:
        extra = 2 if proj else 0
        n_stats = len(_flat(train["batch_stats"]))  # mean, var per BN; torch adds num_batches_tracked
        train_keys = len(_flat(train["params"])) + n_stats * 3 // 2 + extra
        assert (train_keys, KEYS[arch][1]) == (KEYS[arch][0], KEYS[arch][1] and len(_flat(dep["params"])) + extra)


def _qconvs(arch, deploy, hw=(HW, HW)):
    model = create_model(arch, deploy=deploy)
    variables = _shapes(arch, deploy, hw)
    seen = {}

    def icpt(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, QConv) and context.method_name == "__call__":
            seen["/".join(m.path)] = m
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(icpt):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, *hw, 3)))
    return seen


@pytest.mark.parametrize("arch", ["yolov6n_v1", "yolov6n_v3"])
def test_layer_attributes(arch):
    """rep only on rbr_reparam, is_output only on pred convs, SiLU in the head, ReLU elsewhere."""
    for deploy in (True, False):
        for path, m in _qconvs(arch, deploy).items():
            name = path.split("/")[-2 if path.endswith("/conv") else -1]
            pred = re.fullmatch(r"(cls|reg|obj)_preds_\d", name) is not None
            assert m.is_output == pred, path
            assert m.rep == (name == "rbr_reparam"), path
            if pred or name == "upsample_transpose" or not deploy:
                assert m.act is None, path
            elif re.fullmatch(r"(stems|cls_convs|reg_convs)_\d", name):
                assert m.act == "silu", path
            else:
                assert m.act == "relu", path
            assert m.use_bias == (deploy or pred or name == "upsample_transpose"), path
            if re.search(r"(stem|ERBlock_\d_0|downsample\d?)(/|$)", path):
                assert m.strides == 2 or m.kernel_size == 1 and "Bifusion" in path, path


# ---------------------------------------------------------------- decoding (NumPy references)


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_decode(levels, input_hw, reg_max=0):
    """Slow reference: loop over levels, then y, then x (the official row order)."""
    rows = []
    for cls, reg, obj in levels:
        cls, reg = np.asarray(cls, np.float64), np.asarray(reg, np.float64)
        _, h, w, _ = cls.shape
        s = input_hw[0] / h
        for y in range(h):
            for x in range(w):
                r = reg[0, y, x]
                if obj is not None:
                    box = [(r[0] + x) * s, (r[1] + y) * s, np.exp(r[2]) * s, np.exp(r[3]) * s]
                    conf = _np_sigmoid(np.asarray(obj, np.float64)[0, y, x, 0])
                else:
                    if reg_max:
                        d = []
                        for side in range(4):
                            logits = r[side * (reg_max + 1):(side + 1) * (reg_max + 1)]
                            e = np.exp(logits - logits.max())
                            d.append(float((e / e.sum()) @ np.arange(reg_max + 1)))
                        r = d
                    px, py = x + 0.5, y + 0.5
                    x1, y1, x2, y2 = px - r[0], py - r[1], px + r[2], py + r[3]
                    box = [(x1 + x2) / 2 * s, (y1 + y2) / 2 * s, (x2 - x1) * s, (y2 - y1) * s]
                    conf = 1.0
                rows.append(np.concatenate([box, [conf], _np_sigmoid(cls[0, y, x])]))
    return np.stack(rows)[None]


def test_decode_pieces_vs_numpy():
    rng = np.random.default_rng(0)
    pts = np.asarray(grid_points(2, 3))
    assert pts.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]
    np.testing.assert_array_equal(np.asarray(anchor_points(2, 3)), pts + 0.5)
    logits = rng.normal(0, 2, (5, 68)).astype(np.float32)
    ref = np.zeros((5, 4))
    for n in range(5):
        for side in range(4):
            z = logits[n, side * 17:(side + 1) * 17].astype(np.float64)
            ref[n, side] = (np.exp(z) / np.exp(z).sum()) @ np.linspace(0, 16, 17)
    np.testing.assert_allclose(np.asarray(dfl_expectation(jnp.asarray(logits), 16)), ref, rtol=1e-5, atol=1e-5)
    ltrb = rng.uniform(0, 3, (6, 4)).astype(np.float32)
    got = np.asarray(ltrb_to_xywh(jnp.asarray(ltrb), anchor_points(2, 3)))
    for k, (px, py) in enumerate(pts + 0.5):
        l, t, r, b = ltrb[k]
        np.testing.assert_allclose(got[k], [px + (r - l) / 2, py + (b - t) / 2, l + r, t + b], rtol=1e-6, atol=1e-6)
    reg = rng.normal(0, 1, (6, 4)).astype(np.float32)
    got = np.asarray(decode_v1_boxes(jnp.asarray(reg), grid_points(2, 3), 16.0))
    np.testing.assert_allclose(got[:, :2], (reg[:, :2] + pts) * 16, rtol=1e-6)
    np.testing.assert_allclose(got[:, 2:], np.exp(reg[:, 2:]) * 16, rtol=1e-6)
    with pytest.raises(ValueError, match="68 channels"):
        dfl_expectation(jnp.zeros((2, 4)), 16)


def _capture_preds(model, variables, x):
    out, state = jax.jit(functools.partial(
        model.apply, capture_intermediates=lambda m, method: isinstance(m, QConv) and m.is_output,
        mutable=["intermediates"],
    ))(variables, x)
    det = state["intermediates"]["detect"]
    levels = []
    for i in range(3):
        obj = det[f"obj_preds_{i}"]["__call__"][0] if f"obj_preds_{i}" in det else None
        levels.append((det[f"cls_preds_{i}"]["__call__"][0], det[f"reg_preds_{i}"]["__call__"][0], obj))
    return out, levels


@pytest.mark.parametrize("arch,reg_max", [("yolov6n_v1", 0), ("yolov6n_v2", 0), ("yolov6n_v3", 16)])
def test_output_order_and_decode(arch, reg_max):
    """[B, N, 5+nc], N = Σ HW over strides 8/16/32 of a non-square input, rows as the NumPy loop."""
    cfg = dataclasses.replace(get_config(arch), num_classes=3, reg_max=reg_max)
    model = create_model(cfg, deploy=True)
    hw = (64, 96)
    variables = numpy_init(model, (1, *hw, 3), seed=1)
    x = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (1, *hw, 3)), jnp.float32)
    out, levels = _capture_preds(model, variables, x)
    assert out.shape == (1, 8 * 12 + 4 * 6 + 2 * 3, 8)
    assert [lv[0].shape[1:3] for lv in levels] == [(8, 12), (4, 6), (2, 3)]
    assert levels[0][1].shape[-1] == 4 * (reg_max + 1)
    ref = np_decode(levels, hw, reg_max)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(decode_outputs(levels, hw, reg_max)), ref, rtol=1e-5, atol=1e-4)


def test_num_classes_and_bad_input_size():
    v = _shapes("yolov6n_v2", True)
    model = create_model("yolov6n_v2", deploy=True, num_classes=20)
    v20 = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert v20["params"]["detect"]["cls_preds_0"]["kernel"].shape == (1, 1, 32, 20)
    assert jax.eval_shape(model.apply, v20, jnp.zeros((2, 64, 64, 3))).shape == (2, 84, 25)
    model = create_model("yolov6n_v2", deploy=True)
    for shape in [(1, 64, 80, 3), (1, 48, 64, 3), (1, 64, 64, 4)]:
        with pytest.raises(ValueError, match=re.escape(str(shape))):
            jax.eval_shape(model.apply, v, jnp.zeros(shape))


def test_canonical_arch():
    assert canonical_arch("yolov6s_v2") == "yolov6s_v2"
    assert canonical_arch("yolov6s_v2", "yolov6s_v3") == "yolov6s_v2"
    assert canonical_arch("yolov6s", "yolov6s_v3") == "yolov6s_v3"
    assert canonical_arch("yolov6t", "yolov6t_v1") == "yolov6t_v1"
    assert canonical_arch("repvgg_a0") == "repvgg_a0"
    with pytest.raises(ValueError, match="yolov6s_v1"):
        canonical_arch("yolov6s")
    for bad in [("yolov6s", "yolov6n_v2"), ("yolov6s", "yolov6s_v9"), ("yolov6s", "yolov6s_2"), ("yolov6x", None)]:
        with pytest.raises(ValueError):
            canonical_arch(*bad)


# ---------------------------------------------------------------- Transpose and fusion


def test_transpose_matches_numpy_conv_transpose():
    """ConvTranspose2d(I, O, k=2, s=2, bias) with torch weight [I, O, 2, 2], NCHW semantics in NHWC."""
    rng = np.random.default_rng(3)
    n, h, w, ci, co = 2, 3, 4, 5, 3
    x = rng.normal(0, 1, (n, h, w, ci)).astype(np.float32)
    wt = rng.normal(0, 1, (ci, co, 2, 2)).astype(np.float32)
    bias = rng.normal(0, 1, (co,)).astype(np.float32)
    ref = np.zeros((n, 2 * h, 2 * w, co)) + bias
    for yy in range(h):
        for xx in range(w):
            for a in range(2):
                for b in range(2):
                    ref[:, 2 * yy + a, 2 * xx + b] += x[:, yy, xx].astype(np.float64) @ wt[:, :, a, b]
    kernel = np.asarray(transpose_kernel_from_torch(wt))
    assert kernel.shape == (1, 1, ci, 4 * co)
    for i in range(ci):
        for o in range(co):
            for a in range(2):
                for b in range(2):
                    assert kernel[0, 0, i, (a * 2 + b) * co + o] == wt[i, o, a, b]
    params = {"upsample_transpose": {"kernel": kernel, "bias": np.tile(bias, 4)}}
    got = Transpose(co).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["yolov6n_v1", "yolov6n_v2", "yolov6n_v3"])
def test_train_vs_deploy_after_fuse(arch):
    """Random weights and non-trivial BN statistics (numpy_init): fused deploy == train form."""
    train_model, dep_model = create_model(arch), create_model(arch, deploy=True)
    variables = numpy_init(train_model, (2, HW, HW, 3), seed=4)
    # BN scales x0.7 keep activations O(1) through ~40 three-branch blocks (x1 overflows exp(wh)).
    variables = jax.tree_util.tree_map_with_path(lambda p, a: a * 0.7 if p[-1].key == "scale" else a, variables)
    fused = jax.jit(lambda v: fuse(arch, v))(variables)
    assert _flat(fused) == _flat(_shapes(arch, True))
    x = jnp.asarray(np.random.default_rng(5).uniform(0, 1, (2, HW, HW, 3)), jnp.float32)
    y_train = np.asarray(jax.jit(train_model.apply)(variables, x))
    y_dep = np.asarray(jax.jit(dep_model.apply)(fused, x))
    assert y_train.shape == (2, 84, 85)
    assert 1 < np.abs(y_train[..., :4]).max() < 1e4 and np.ptp(y_train[..., 5:]) > 0.1  # not degenerate
    err = np.abs(y_train - y_dep).max() / np.abs(y_train).max()
    assert err < 2e-5, err
    cls_err = np.abs(y_train[..., 4:] - y_dep[..., 4:]).max()  # confidence and sigmoid class scores
    assert cls_err < 1e-5, cls_err


def test_fuse_errors_name_the_variable():
    variables = _shapes("yolov6n_v2", False)  # traced with eval_shape: no arithmetic is run
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    del params["neck"]["Rep_p4"]["conv1"]["rbr_1x1"]["bn"]
    with pytest.raises(ValueError, match="neck/Rep_p4/conv1/rbr_1x1"):
        jax.eval_shape(lambda v: fuse("yolov6n_v2", v), {"params": params, "batch_stats": variables["batch_stats"]})
    with pytest.raises(ValueError, match="head"):
        fuse("yolov6n_v2", {"params": {**variables["params"], "head": {}}, "batch_stats": {}})
