"""RepPANNeck (v1.0 / v2.0) and RepBiFPANNeck (v3.0), FORMATS.md §4.3. NHWC in and out.

``ch = channels_list`` (neck entries ch5..ch10), ``nr = num_repeat``. Inputs ``(P3, P4, P5)``
(RepPAN) or ``(P2, P3, P4, P5)`` (RepBiFPAN); outputs ``(pan_out2, pan_out1, pan_out0)`` with
channels ``(ch6, ch8, ch10)`` at strides 8 / 16 / 32::

    fpn_out0 = reduce_layer0(P5)                                   1x1 ch4 -> ch5, ReLU
    f_out0   = Rep_p4(cat[upsample0(fpn_out0), P4])                RepPAN
             = Rep_p4(Bifusion0([fpn_out0, P4, P3]))               RepBiFPAN
    fpn_out1 = reduce_layer1(f_out0)                               1x1 ch5 -> ch6, ReLU
    pan_out2 = Rep_p3(cat[upsample1(fpn_out1), P3])                RepPAN
             = Rep_p3(Bifusion1([fpn_out1, P3, P2]))               RepBiFPAN
    pan_out1 = Rep_n3(cat[downsample2(pan_out2), fpn_out1])        3x3 s2 ch6 -> ch7, ReLU
    pan_out0 = Rep_n4(cat[downsample1(pan_out1), fpn_out0])        3x3 s2 ch8 -> ch9, ReLU
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cfws_jax.models.yolov6.blocks import BiFusion, ConvBNAct, RepBlock, Transpose
from cfws_jax.models.yolov6.config import YOLOv6Config


class RepPANNeck(nn.Module):
    """v1.0 / v2.0 neck (``bifpn=False``) and v3.0 RepBiFPANNeck (``bifpn=True``), per the module docstring."""

    config: YOLOv6Config
    deploy: bool = False

    @nn.compact
    def __call__(self, feats, train: bool = False):
        ch, nr, dep = self.config.channels_list, self.config.num_repeat, self.deploy
        bifpn = self.config.bifpn
        if bifpn:
            p2, p3, p4, p5 = feats
        else:
            p3, p4, p5 = feats
        cat = lambda *xs: jnp.concatenate(xs, axis=-1)  # noqa: E731

        fpn_out0 = ConvBNAct(ch[5], 1, act="relu", deploy=dep, name="reduce_layer0")(p5, train)
        if bifpn:
            f = BiFusion(ch[5], dep, name="Bifusion0")((fpn_out0, p4, p3), train)
        else:
            f = cat(Transpose(ch[5], name="upsample0")(fpn_out0), p4)
        f_out0 = RepBlock(ch[5], nr[5], dep, name="Rep_p4")(f, train)

        fpn_out1 = ConvBNAct(ch[6], 1, act="relu", deploy=dep, name="reduce_layer1")(f_out0, train)
        if bifpn:
            f = BiFusion(ch[6], dep, name="Bifusion1")((fpn_out1, p3, p2), train)
        else:
            f = cat(Transpose(ch[6], name="upsample1")(fpn_out1), p3)
        pan_out2 = RepBlock(ch[6], nr[6], dep, name="Rep_p3")(f, train)

        d = ConvBNAct(ch[7], 3, 2, act="relu", deploy=dep, name="downsample2")(pan_out2, train)
        pan_out1 = RepBlock(ch[8], nr[7], dep, name="Rep_n3")(cat(d, fpn_out1), train)
        d = ConvBNAct(ch[9], 3, 2, act="relu", deploy=dep, name="downsample1")(pan_out1, train)
        pan_out0 = RepBlock(ch[10], nr[8], dep, name="Rep_n4")(cat(d, fpn_out0), train)
        return pan_out2, pan_out1, pan_out0


RepBiFPANNeck = RepPANNeck  # same module; the config's ``bifpn`` flag selects the v3.0 wiring
