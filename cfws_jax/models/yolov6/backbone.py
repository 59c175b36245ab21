"""EfficientRep backbone (FORMATS.md §4.3). x NHWC; returns feature maps NHWC.

Modules (``ch = channels_list``, ``nr = num_repeat``): ``stem`` = RepVGGBlock(3 -> ch0, s2);
for k = 2..5: ``ERBlock_k_0`` = RepVGGBlock(ch[k-2] -> ch[k-1], s2), ``ERBlock_k_1`` =
RepBlock(ch[k-1], nr[k-1]); ``ERBlock_5_2`` = SimSPPF(ch4 -> ch4) or SimCSPSPPF when ``cspsppf``.
Outputs ``(P3, P4, P5)`` (strides 8, 16, 32), or ``(P2, P3, P4, P5)`` when ``fuse_p2`` (v3.0).
"""

from __future__ import annotations

import flax.linen as nn

from cfws_jax.models.yolov6.blocks import RepBlock, RepVGGBlock, SimCSPSPPF, SimSPPF
from cfws_jax.models.yolov6.config import YOLOv6Config


class EfficientRep(nn.Module):
    config: YOLOv6Config
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        ch, nr, dep = self.config.channels_list, self.config.num_repeat, self.deploy
        x = RepVGGBlock(ch[0], 2, dep, name="stem")(x, train)
        outs = []
        for k in range(2, 6):
            x = RepVGGBlock(ch[k - 1], 2, dep, name=f"ERBlock_{k}_0")(x, train)
            x = RepBlock(ch[k - 1], nr[k - 1], dep, name=f"ERBlock_{k}_1")(x, train)
            if k == 5:
                sppf = SimCSPSPPF if self.config.cspsppf else SimSPPF
                x = sppf(ch[4], dep, name="ERBlock_5_2")(x, train)
            outs.append(x)
        return tuple(outs) if self.config.fuse_p2 else tuple(outs[1:])
