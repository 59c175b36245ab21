"""YOLOv6 building blocks (FORMATS.md §4.2) in Flax. Activations NHWC, kernels HWIO.

Every conv is a :class:`~cfws_jax.models.layers.QConv`; every BatchNorm has eps 1e-3. Each block
has a train form (``deploy=False``: conv + BN branches) and a deploy form (``deploy=True``: BN
folded, see :mod:`cfws_jax.models.yolov6.fuse`). Sub-module names follow the PyTorch module
paths (see :mod:`cfws_jax.models.yolov6`): a numeric path component is joined to the previous one with ``_``.

* :class:`ConvBNAct` (upstream ``SimConv`` = ReLU, ``Conv`` = SiLU): train ``conv`` (QConv, no
  bias) + ``bn`` then the activation; deploy ``conv`` (QConv with bias, activation inside).
* :class:`RepVGGBlock`: train ``rbr_dense/{conv,bn}`` (3x3) + ``rbr_1x1/{conv,bn}`` +
  ``rbr_identity`` (BN, when in == out and stride 1), then ReLU; deploy ``rbr_reparam``
  (3x3 QConv, bias, ReLU inside, ``rep=True``).
* :class:`RepBlock`: ``conv1`` then ``block_0 .. block_{n-2}`` (RepVGGBlocks).
* :class:`SimSPPF`, :class:`SimCSPSPPF`: ReLU ConvBNAct layers ``cv1..`` around MaxPool(5, 1, 2).
* :class:`Transpose`: ConvTranspose2d(k=2, s=2, bias) as ``upsample_transpose`` = 1x1 QConv to
  ``4*O`` channels + :func:`depth_to_space` (same in both forms).
* :class:`BiFusion` (v3.0): ``cv1``, ``cv2``, ``upsample``, ``downsample``, ``cv3``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cfws_jax.models.blocks import ConvBN, batch_norm, fused_rep_conv
from cfws_jax.models.layers import QConv, activation

BN_EPS = 1e-3  # every YOLOv6 BatchNorm2d (FORMATS.md §1.4)


class ConvBNAct(nn.Module):
    """``act(bn(conv(x)))``; k x k conv, pad k//2, HWIO ``[k, k, C, features]``.

    act ``"relu"`` = upstream ``SimConv`` / ``ConvBNReLU`` (backbone SPPF / CSPSPPF, neck
    ``reduce_layer*``, ``downsample*``, BiFusion); ``"silu"`` = upstream ``Conv`` / ``ConvBNSiLU``
    (head ``stems``, ``cls_convs``, ``reg_convs``).
    """

    features: int
    kernel_size: int = 1
    strides: int = 1
    act: str = "relu"
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = self.kernel_size
        if self.deploy:
            return QConv(self.features, k, self.strides, k // 2, use_bias=True, act=self.act, name="conv")(x)
        y = QConv(self.features, k, self.strides, k // 2, use_bias=False, name="conv")(x)
        y = batch_norm(train, "bn", BN_EPS)(y)
        return activation(y, self.act)


class RepVGGBlock(nn.Module):
    """YOLOv6 RepVGGBlock (3x3, pad 1, no SE): ``relu(dense(x) + 1x1(x) [+ id(x)])``, BN eps 1e-3."""

    features: int
    strides: int = 1
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.deploy:
            return fused_rep_conv(self.features, 3, self.strides, 1, False, "rbr_reparam")(x)
        y = ConvBN(self.features, 3, self.strides, 1, eps=BN_EPS, name="rbr_dense")(x, train)
        y = y + ConvBN(self.features, 1, self.strides, 0, eps=BN_EPS, name="rbr_1x1")(x, train)
        if x.shape[-1] == self.features and self.strides == 1:
            y = y + batch_norm(train, "rbr_identity", BN_EPS)(x)
        return activation(y, "relu")


class RepBlock(nn.Module):
    """``n`` RepVGGBlocks to ``features`` channels: ``conv1`` then ``block_0 .. block_{n-2}``."""

    features: int
    n: int = 1
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = RepVGGBlock(self.features, 1, self.deploy, name="conv1")(x, train)
        for j in range(self.n - 1):
            x = RepVGGBlock(self.features, 1, self.deploy, name=f"block_{j}")(x, train)
        return x


def max_pool5(x):
    """MaxPool2d(5, stride 1, padding 2) on NHWC (padding never wins: -inf)."""
    return nn.max_pool(x, (5, 5), (1, 1), ((2, 2), (2, 2)))


class SimSPPF(nn.Module):
    """``cv2(cat[y, m(y), m²(y), m³(y)])`` with ``y = cv1(x)``; cv1 1x1 C -> C/2, cv2 1x1 2C -> out; ReLU."""

    features: int
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = ConvBNAct(x.shape[-1] // 2, 1, act="relu", deploy=self.deploy, name="cv1")(x, train)
        y1 = max_pool5(y)
        y2 = max_pool5(y1)
        cat = jnp.concatenate([y, y1, y2, max_pool5(y2)], axis=-1)
        return ConvBNAct(self.features, 1, act="relu", deploy=self.deploy, name="cv2")(cat, train)


class SimCSPSPPF(nn.Module):
    """CSP SPPF (v3.0), ``c_ = out // 2``, all ReLU ConvBNAct:
    ``x1 = cv4(cv3(cv1(x)))`` (1x1, 3x3, 1x1), ``y0 = cv2(x)``,
    ``y3 = cv6(cv5(cat[x1, m(x1), m²(x1), m³(x1)]))`` (1x1, 3x3), output ``cv7(cat[y0, y3])``."""

    features: int
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        c_ = self.features // 2

        def cba(c, k, name):
            return ConvBNAct(c, k, act="relu", deploy=self.deploy, name=name)

        x1 = cba(c_, 1, "cv4")(cba(c_, 3, "cv3")(cba(c_, 1, "cv1")(x, train), train), train)
        y0 = cba(c_, 1, "cv2")(x, train)
        m1 = max_pool5(x1)
        m2 = max_pool5(m1)
        cat = jnp.concatenate([x1, m1, m2, max_pool5(m2)], axis=-1)
        y3 = cba(c_, 3, "cv6")(cba(c_, 1, "cv5")(cat, train), train)
        return cba(self.features, 1, "cv7")(jnp.concatenate([y0, y3], axis=-1), train)


def depth_to_space(y, out_channels: int):
    """``[B, H, W, 4*O] -> [B, 2H, 2W, O]``: pixel ``(2h+a, 2w+b)`` takes channels ``[(2a+b)*O, (2a+b+1)*O)``."""
    b, h, w, c = y.shape
    if c != 4 * out_channels:
        raise ValueError(f"depth_to_space: expected {4 * out_channels} channels, got shape {tuple(y.shape)}")
    y = y.reshape(b, h, w, 2, 2, out_channels).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, out_channels)


def transpose_kernel_from_torch(weight):
    """Torch ConvTranspose2d(k=2, s=2) weight ``[I, O, 2, 2]`` -> ``upsample_transpose`` kernel
    ``[1, 1, I, 4*O]`` with output channel ``(a*2 + b)*O + o`` = ``weight[i, o, a, b]``."""
    i, o = weight.shape[:2]
    return weight.transpose(0, 2, 3, 1).reshape(1, 1, i, 4 * o)


class Transpose(nn.Module):
    """2x upsampling ConvTranspose2d(C, O, 2, 2, bias): ``upsample_transpose`` (1x1 QConv with bias,
    ``[1, 1, C, 4*O]``, bias = torch bias tiled 4 times) then :func:`depth_to_space`."""

    features: int

    @nn.compact
    def __call__(self, x):
        y = QConv(4 * self.features, 1, 1, 0, use_bias=True, name="upsample_transpose")(x)
        return depth_to_space(y, self.features)


class BiFusion(nn.Module):
    """v3.0 BiC: inputs ``(x0, x1, x2)`` at strides ``(2s, s, s/2)``; output at stride s:
    ``cv3(cat[upsample(x0), cv1(x1), downsample(cv2(x2))])``; cv1/cv2/cv3 1x1, downsample 3x3 s2; ReLU."""

    features: int
    deploy: bool = False

    @nn.compact
    def __call__(self, xs, train: bool = False):
        x0, x1, x2 = xs
        c = self.features

        def cba(k, s, name):
            return ConvBNAct(c, k, s, act="relu", deploy=self.deploy, name=name)

        up = Transpose(c, name="upsample")(x0)
        y1 = cba(1, 1, "cv1")(x1, train)
        y2 = cba(3, 2, "downsample")(cba(1, 1, "cv2")(x2, train), train)
        return cba(1, 1, "cv3")(jnp.concatenate([up, y1, y2], axis=-1), train)
