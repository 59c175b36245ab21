"""EfficientRep family backbones (FORMATS.md §4.3; LARGE §4.14.1-4.14.2). x NHWC; returns NHWC maps.

One module, the config picks the kind (``ch = channels_list``, ``nr = num_repeat``, ``S`` = 4
stages for P5, 5 for P6): ``stem`` = basic(3 -> ch0, 3x3 s2); for k = 2 .. S+1:
``ERBlock_k_0`` = basic(ch[k-2] -> ch[k-1], 3x3 s2) and ``ERBlock_k_1`` = the stage (RepBlock of
basic blocks, or BepC3 when ``csp_e`` is set: CSPBepBackbone / CSPBepBackbone_P6); the last stage
has ``ERBlock_{S+1}_2`` = SPPF-family block (``cspsppf``: (Sim)CSPSPPF, else (Sim)SPPF; SiLU iff
the basic block is conv_silu). P5 (EfficientRep / CSPBepBackbone): outputs ``(P3, P4, P5)``
(strides 8 / 16 / 32), or ``(P2, P3, P4, P5)`` when ``fuse_p2``. P6 (EfficientRep6 /
CSPBepBackbone_P6): ERBlock_5 has no SPPF block; outputs ``(P2, .., P6)``, strides 4 .. 64.
"""

from __future__ import annotations

import flax.linen as nn

from cfws_jax.models.yolov6.blocks import SimCSPSPPF, SimSPPF, basic_block, stage_block
from cfws_jax.models.yolov6.config import YOLOv6Config


class EfficientRep(nn.Module):
    """EfficientRep / CSPBepBackbone / EfficientRep6 / CSPBepBackbone_P6 (``config.backbone_kind``)."""

    config: YOLOv6Config
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, dep = self.config, self.deploy
        ch, nr = cfg.channels_list, cfg.num_repeat
        last = 6 if cfg.p6 else 5
        x = basic_block(cfg.block, ch[0], 2, dep, "stem")(x, train)
        outs = []
        for k in range(2, last + 1):
            x = basic_block(cfg.block, ch[k - 1], 2, dep, f"ERBlock_{k}_0")(x, train)
            x = stage_block(cfg, ch[k - 1], nr[k - 1], dep, f"ERBlock_{k}_1")(x, train)
            if k == last:
                sppf = SimCSPSPPF if cfg.cspsppf else SimSPPF
                x = sppf(ch[k - 1], dep, cfg.act, name=f"ERBlock_{k}_2")(x, train)
            outs.append(x)
        return tuple(outs) if cfg.fuse_p2 else tuple(outs[1:])
