"""YOLOv6 necks (FORMATS.md §4.3; LARGE §4.14.3-4.14.5). NHWC in and out.

``ch = channels_list``, ``nr = num_repeat``; "stage" = RepBlock of basic blocks, or BepC3 when the
config sets ``csp_e`` (the CSP necks). All ``reduce_layer*`` / ``downsample*`` / BiFusion convs
are ReLU ConvBNAct; upsampling is :class:`~cfws_jax.models.yolov6.blocks.Transpose`.

P5 (:class:`RepPANNeck`: RepPANNeck, RepBiFPANNeck, CSPRepPANNeck, CSPRepBiFPANNeck). Inputs
``(P3, P4, P5)`` (PAN) or ``(P2, P3, P4, P5)`` (BiFPAN); outputs ``(pan_out2, pan_out1,
pan_out0)`` with channels ``(ch6, ch8, ch10)`` at strides 8 / 16 / 32::

    fpn_out0 = reduce_layer0(P5)                                   1x1 ch4 -> ch5
    f_out0   = Rep_p4(cat[upsample0(fpn_out0), P4])                PAN
             = Rep_p4(Bifusion0([fpn_out0, P4, P3]))               BiFPAN
    fpn_out1 = reduce_layer1(f_out0)                               1x1 ch5 -> ch6
    pan_out2 = Rep_p3(cat[upsample1(fpn_out1), P3])                PAN
             = Rep_p3(Bifusion1([fpn_out1, P3, P2]))               BiFPAN
    pan_out1 = Rep_n3(cat[downsample2(pan_out2), fpn_out1])        3x3 s2 ch6 -> ch7; stage -> ch8
    pan_out0 = Rep_n4(cat[downsample1(pan_out1), fpn_out0])        3x3 s2 ch8 -> ch9; stage -> ch10

P6 (:class:`RepBiFPANNeck6`: RepBiFPANNeck6, CSPRepBiFPANNeck_P6). Inputs ``(P2, .., P6)``;
outputs ``(o3, o2, o1, o0)``, channels ``(ch8, ch9, ch10, ch11)``, strides 8 / 16 / 32 / 64::

    f0 = reduce_layer0(P6)                    t0 = Rep_p5(Bifusion0([f0, P5, P4]))    ch6
    f1 = reduce_layer1(t0)                    t1 = Rep_p4(Bifusion1([f1, P4, P3]))    ch7
    f2 = reduce_layer2(t1)                    o3 = Rep_p3(Bifusion2([f2, P3, P2]))    ch8
    o2 = Rep_n4(cat[downsample2(o3), f2])     downsample keeps ch8; stage -> ch9
    o1 = Rep_n5(cat[downsample1(o2), f1])     keeps ch9; stage -> ch10
    o0 = Rep_n6(cat[downsample0(o1), f0])     keeps ch10; stage -> ch11
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cfws_jax.models.yolov6.blocks import BiFusion, ConvBNAct, Transpose, stage_block
from cfws_jax.models.yolov6.config import YOLOv6Config


def _cat(*xs):
    return jnp.concatenate(xs, axis=-1)


class RepPANNeck(nn.Module):
    """P5 necks (``bifpn`` picks the BiFusion wiring, ``csp_e`` the BepC3 stages), per the module docstring."""

    config: YOLOv6Config
    deploy: bool = False

    @nn.compact
    def __call__(self, feats, train: bool = False):
        cfg, dep = self.config, self.deploy
        ch, nr, bifpn = cfg.channels_list, cfg.num_repeat, cfg.bifpn
        if bifpn:
            p2, p3, p4, p5 = feats
        else:
            p3, p4, p5 = feats

        def conv(c, k, s, name):
            return ConvBNAct(c, k, s, act="relu", deploy=dep, name=name)

        fpn_out0 = conv(ch[5], 1, 1, "reduce_layer0")(p5, train)
        if bifpn:
            f = BiFusion(ch[5], dep, name="Bifusion0")((fpn_out0, p4, p3), train)
        else:
            f = _cat(Transpose(ch[5], name="upsample0")(fpn_out0), p4)
        f_out0 = stage_block(cfg, ch[5], nr[5], dep, "Rep_p4")(f, train)

        fpn_out1 = conv(ch[6], 1, 1, "reduce_layer1")(f_out0, train)
        if bifpn:
            f = BiFusion(ch[6], dep, name="Bifusion1")((fpn_out1, p3, p2), train)
        else:
            f = _cat(Transpose(ch[6], name="upsample1")(fpn_out1), p3)
        pan_out2 = stage_block(cfg, ch[6], nr[6], dep, "Rep_p3")(f, train)

        d = conv(ch[7], 3, 2, "downsample2")(pan_out2, train)
        pan_out1 = stage_block(cfg, ch[8], nr[7], dep, "Rep_n3")(_cat(d, fpn_out1), train)
        d = conv(ch[9], 3, 2, "downsample1")(pan_out1, train)
        pan_out0 = stage_block(cfg, ch[10], nr[8], dep, "Rep_n4")(_cat(d, fpn_out0), train)
        return pan_out2, pan_out1, pan_out0


RepBiFPANNeck = RepPANNeck  # same module; the config's ``bifpn`` flag selects the v3.0 wiring


class RepBiFPANNeck6(nn.Module):
    """P6 necks (RepBiFPANNeck6; CSPRepBiFPANNeck_P6 when ``csp_e`` is set), per the module docstring."""

    config: YOLOv6Config
    deploy: bool = False

    @nn.compact
    def __call__(self, feats, train: bool = False):
        cfg, dep = self.config, self.deploy
        ch, nr = cfg.channels_list, cfg.num_repeat
        p2, p3, p4, p5, p6 = feats

        def conv(c, k, s, name):
            return ConvBNAct(c, k, s, act="relu", deploy=dep, name=name)

        lateral = ((p5, p4), (p4, p3), (p3, p2))
        top, tops = p6, []
        for i, (stage, (lat, finer)) in enumerate(zip(("Rep_p5", "Rep_p4", "Rep_p3"), lateral)):
            c = ch[6 + i]
            f = conv(c, 1, 1, f"reduce_layer{i}")(top, train)
            tops.append(f)
            top = stage_block(cfg, c, nr[6 + i], dep, stage)(BiFusion(c, dep, name=f"Bifusion{i}")((f, lat, finer), train), train)
        outs = [top]
        for j, (down, stage) in enumerate((("downsample2", "Rep_n4"), ("downsample1", "Rep_n5"), ("downsample0", "Rep_n6"))):
            prev = outs[-1]
            d = conv(prev.shape[-1], 3, 2, down)(prev, train)
            outs.append(stage_block(cfg, ch[9 + j], nr[9 + j], dep, stage)(_cat(d, tops[2 - j]), train))
        return tuple(outs)
