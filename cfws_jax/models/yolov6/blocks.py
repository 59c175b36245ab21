"""YOLOv6 building blocks (FORMATS.md §4.2) in Flax. Activations NHWC, kernels HWIO.

Every conv is a :class:`~cfws_jax.models.layers.QConv`; every BatchNorm has eps 1e-3. Each block
has a train form (``deploy=False``: conv + BN branches) and a deploy form (``deploy=True``: BN
folded, see :mod:`cfws_jax.models.yolov6.fuse`). Sub-module names follow the PyTorch module
paths (see :mod:`cfws_jax.models.yolov6`): a numeric path component is joined to the previous one with ``_``.

* :class:`ConvBNAct` (upstream ``SimConv`` = ReLU, ``Conv`` = SiLU, ``Conv_C3``): train ``conv`` (QConv, no
  bias) + ``bn`` then the activation; deploy ``conv`` (QConv with bias, activation inside).
* :class:`RepVGGBlock`: train ``rbr_dense/{conv,bn}`` (3x3) + ``rbr_1x1/{conv,bn}`` +
  ``rbr_identity`` (BN, when in == out and stride 1), then ReLU; deploy ``rbr_reparam``
  (3x3 QConv, bias, ReLU inside, ``rep=True``).
* :class:`QARepVGGBlock` (V1; ``avg=True``: V2, QA §4.23): train ``rbr_dense/{conv,bn}`` (3x3) +
  ``rbr_1x1`` (bare 1x1 QConv, no bias, no BN) + raw identity [+ 3x3 average pool] then ``bn``
  (BN_post) and ReLU; deploy = the RepVGGBlock deploy form (``rbr_reparam``, QA §4.24 step 5).
* :class:`ConvWrapper` (upstream ConvWrapper / SimConvWrapper, ``training_mode`` conv_silu /
  conv_relu): ``block`` = 3x3 ConvBNAct whose train-form conv **has a bias** (0.3.x files; a
  0.4.x file without it converts with bias 0); deploy ``block/conv`` (kernel, bias). Not
  re-parameterized: there is no 1x1 / identity branch to fold into its centre tap.
* :func:`basic_block`: the block a config's ``block`` kind names (upstream ``get_block``).
* :class:`RepBlock`: ``conv1`` then ``block_0 .. block_{n-2}`` (basic blocks), or, ``bottle``,
  ``max(n // 2, 1)`` :class:`BottleRep` (LARGE §4.12.4).
* :class:`BottleRep`: ``conv2(conv1(x)) + alpha * x``; param ``alpha`` shape ``[1]``.
* :class:`BepC3` (CSPStackRep): ``cv3(cat[m(cv1(x)), cv2(x)])``, ``c_ = int(cout * e)``.
* :class:`SimSPPF` (``act="silu"``: SPPF), :class:`SimCSPSPPF` (``act="silu"``: CSPSPPF):
  ConvBNAct layers ``cv1..`` around MaxPool(5, 1, 2).
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
    (head ``stems``, ``cls_convs``, ``reg_convs``). ``conv_bias``: the train-form conv has a bias
    added before the BN (0.3.x ConvWrapper basic blocks, LARGE §4.18 item 8).
    """

    features: int
    kernel_size: int = 1
    strides: int = 1
    act: str = "relu"
    deploy: bool = False
    conv_bias: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = self.kernel_size
        if self.deploy:
            return QConv(self.features, k, self.strides, k // 2, use_bias=True, act=self.act, name="conv")(x)
        y = QConv(self.features, k, self.strides, k // 2, use_bias=self.conv_bias, name="conv")(x)
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


class QARepVGGBlock(nn.Module):
    """QARepVGGBlock (V1) / QARepVGGBlockV2 (``avg=True``), 3x3 pad 1, BN eps 1e-3 (QA §4.23):
    ``relu(bn(bn_d(W3 * x) + W1 * x [+ x] [+ avg3(x)]))``, identity and avg only when in == out
    and stride 1; the average pool counts padded zeros (divisor 9). Train variables
    ``rbr_dense/{conv/kernel [3, 3, I, O], bn}``, ``rbr_1x1/kernel [1, 1, I, O]``, ``bn``;
    deploy ``rbr_reparam`` as :class:`RepVGGBlock` (fully folded, BN_post included)."""

    features: int
    strides: int = 1
    deploy: bool = False
    avg: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.deploy:
            return fused_rep_conv(self.features, 3, self.strides, 1, False, "rbr_reparam")(x)
        y = ConvBN(self.features, 3, self.strides, 1, eps=BN_EPS, name="rbr_dense")(x, train)
        y = y + QConv(self.features, 1, self.strides, 0, use_bias=False, name="rbr_1x1")(x)
        if x.shape[-1] == self.features and self.strides == 1:
            y = y + x
            if self.avg:
                y = y + nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=True)
        return activation(batch_norm(train, "bn", BN_EPS)(y), "relu")


class ConvWrapper(nn.Module):
    """Conv-type basic block (upstream ConvWrapper: SiLU, SimConvWrapper: ReLU): ``block`` =
    :class:`ConvBNAct` 3x3 (pad 1) with a biased train-form conv. Kernel HWIO ``[3, 3, I, O]``."""

    features: int
    strides: int = 1
    act: str = "silu"
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        return ConvBNAct(self.features, 3, self.strides, self.act, self.deploy, conv_bias=True, name="block")(x, train)


def basic_block(kind: str, features: int, strides: int, deploy: bool, name: str) -> nn.Module:
    """The basic block of a config's ``block`` kind (upstream ``get_block(training_mode)``), 3x3."""
    if kind == "repvgg":
        return RepVGGBlock(features, strides, deploy, name=name)
    if kind in ("qarepvgg", "qarepvggv2"):
        return QARepVGGBlock(features, strides, deploy, avg=kind == "qarepvggv2", name=name)
    if kind in ("conv_silu", "conv_relu"):
        return ConvWrapper(features, strides, kind[5:], deploy, name=name)
    raise ValueError(f"unknown YOLOv6 basic block {kind!r} (layer {name})")


class BottleRep(nn.Module):
    """Weighted BottleRep (LARGE §4.12.3): ``conv2(conv1(x)) + alpha * x`` (residual iff in ==
    out); conv1 / conv2 are 3x3 stride-1 basic blocks. Param ``alpha``: shape ``[1]`` (torch
    ``P.alpha``), learned, kept in the deploy form (it cannot fold into a conv)."""

    features: int
    block: str = "repvgg"
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        residual = x.shape[-1] == self.features
        alpha = self.param("alpha", nn.initializers.ones, (1,)) if residual else None
        y = basic_block(self.block, self.features, 1, self.deploy, "conv1")(x, train)
        y = basic_block(self.block, self.features, 1, self.deploy, "conv2")(y, train)
        return y + alpha.astype(y.dtype) * x if residual else y


class RepBlock(nn.Module):
    """Stage of basic blocks to ``features`` channels: ``conv1`` then ``block_0 .. block_{k-2}``;
    ``k = n`` basic blocks, or (``bottle``) ``k = max(n // 2, 1)`` :class:`BottleRep`."""

    features: int
    n: int = 1
    deploy: bool = False
    block: str = "repvgg"
    bottle: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        def unit(name):
            if self.bottle:
                return BottleRep(self.features, self.block, self.deploy, name=name)
            return basic_block(self.block, self.features, 1, self.deploy, name)

        count = max(self.n // 2, 1) if self.bottle else self.n
        x = unit("conv1")(x, train)
        for j in range(count - 1):
            x = unit(f"block_{j}")(x, train)
        return x


class BepC3(nn.Module):
    """BepC3 / CSPStackRep (LARGE §4.12.5), NHWC: ``c_ = int(features * e)`` (from cout);
    ``cv1``, ``cv2`` 1x1 C -> c_, ``m`` = RepBlock of BottleReps (c_ -> c_, n), ``cv3`` 1x1 2c_ ->
    features on ``cat[m(cv1(x)), cv2(x)]`` (bottleneck path first). The 1x1 convs (upstream
    Conv_C3, no conv bias) use ``act`` (SiLU iff the basic block is conv_silu)."""

    features: int
    n: int = 1
    e: float = 0.5
    block: str = "repvgg"
    act: str = "relu"
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        c_ = int(self.features * self.e)

        def c3(c, name):
            return ConvBNAct(c, 1, act=self.act, deploy=self.deploy, name=name)

        y = RepBlock(c_, self.n, self.deploy, self.block, bottle=True, name="m")(c3(c_, "cv1")(x, train), train)
        y2 = c3(c_, "cv2")(x, train)
        return c3(self.features, "cv3")(jnp.concatenate([y, y2], axis=-1), train)


def stage_block(config, features: int, n: int, deploy: bool, name: str) -> nn.Module:
    """A backbone / neck stage of ``config``: :class:`BepC3` (``csp_e`` set) or :class:`RepBlock`."""
    if config.csp_e:
        return BepC3(features, n, config.csp_e, config.block, config.act, deploy, name=name)
    return RepBlock(features, n, deploy, config.block, name=name)


def max_pool5(x):
    """MaxPool2d(5, stride 1, padding 2) on NHWC (padding never wins: -inf)."""
    return nn.max_pool(x, (5, 5), (1, 1), ((2, 2), (2, 2)))


class SimSPPF(nn.Module):
    """``cv2(cat[y, m(y), m²(y), m³(y)])`` with ``y = cv1(x)``; cv1 1x1 C -> C/2, cv2 1x1 2C -> out;
    ReLU (SimSPPF) or, ``act="silu"``, upstream SPPF (same variables)."""

    features: int
    deploy: bool = False
    act: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = ConvBNAct(x.shape[-1] // 2, 1, act=self.act, deploy=self.deploy, name="cv1")(x, train)
        y1 = max_pool5(y)
        y2 = max_pool5(y1)
        cat = jnp.concatenate([y, y1, y2, max_pool5(y2)], axis=-1)
        return ConvBNAct(self.features, 1, act=self.act, deploy=self.deploy, name="cv2")(cat, train)


class SimCSPSPPF(nn.Module):
    """CSP SPPF (v3.0), ``c_ = out // 2``, all ReLU ConvBNAct:
    ``x1 = cv4(cv3(cv1(x)))`` (1x1, 3x3, 1x1), ``y0 = cv2(x)``,
    ``y3 = cv6(cv5(cat[x1, m(x1), m²(x1), m³(x1)]))`` (1x1, 3x3), output ``cv7(cat[y0, y3])``.
    ``act="silu"``: upstream CSPSPPF (same variables)."""

    features: int
    deploy: bool = False
    act: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        c_ = self.features // 2

        def cba(c, k, name):
            return ConvBNAct(c, k, act=self.act, deploy=self.deploy, name=name)

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
