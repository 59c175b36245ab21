"""MobileOne (Vasu et al. 2023) in Flax, in the over-parameterized train form and the fused deploy form.

Layout: activations NHWC, conv kernels HWIO ``[k, k, C/groups, O]``, linear kernel ``[in, out]``.

Module names (= Flax parameter paths = PTQ layer names) mirror Apple's ``ml-mobileone`` code
with ``.`` replaced by ``_``:

* blocks: ``stage0`` (stem: 3x3, stride 2, one conv branch) and ``stage{k}_{m}`` for k = 1..4;
  each MobileOne "block" of a stage is two entries: ``m = 2i`` a depthwise 3x3 block (pad 1,
  stride 2 for the first of the stage) and ``m = 2i + 1`` a pointwise 1x1 block;
* train form, inside a block: ``rbr_conv_{i}/conv`` + ``rbr_conv_{i}/bn`` (i <
  ``num_conv_branches``, k x k, no bias), ``rbr_scale/conv`` + ``rbr_scale/bn`` (1x1, only when
  k > 1), ``rbr_skip`` (BatchNorm, only when in == out and stride 1); output
  ``relu(se(sum of branches))``;
* deploy form: ``reparam_conv`` = ``QConv(k x k, pad k//2, bias, rep=True, act="relu")``, or
  ``act=None`` followed by SE and ReLU for SE blocks;
* SE (S4: the last ``blocks//2`` blocks of stage3 and all of stage4, both dw and pw entries):
  ``se/reduce`` (1x1, C -> C/16, bias, ReLU), ``se/expand`` (1x1, C/16 -> C, bias, sigmoid);
* head: global average pool, then ``linear`` (QDense).

Train-form variables are ``{"params", "batch_stats"}`` (BatchNorm eps 1e-5, Flax momentum 0.9).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from cfws_jax.models.blocks import (
    BlockSpec,
    ConvBN,
    SqueezeExcite,
    batch_norm,
    block_tail,
    fused_rep_conv,
    pooled_classifier,
)


@dataclasses.dataclass(frozen=True)
class MobileOneConfig:
    """Architecture of one MobileOne variant.

    Attributes:
      width_multipliers: of the base widths 64, 128, 256, 512 (stage1..4); stem = min(64, 64 w0).
      num_conv_branches: k x k conv+BN branches per block (stem always 1).
      use_se: SE in the last half of stage3 and all of stage4.
      num_blocks: blocks per stage (each is a dw + pw pair).
      num_classes: classifier outputs.
      stem_stride, stage_strides: strides of ``stage0`` and of each stage's first dw block.
    """

    width_multipliers: tuple[float, float, float, float]
    num_conv_branches: int = 1
    use_se: bool = False
    num_blocks: tuple[int, int, int, int] = (2, 8, 10, 1)
    num_classes: int = 1000
    stem_stride: int = 2
    stage_strides: tuple[int, int, int, int] = (2, 2, 2, 2)


MOBILEONE_CONFIGS: dict[str, MobileOneConfig] = {
    "mobileone_s0": MobileOneConfig((0.75, 1.0, 1.0, 2.0), num_conv_branches=4),
    "mobileone_s1": MobileOneConfig((1.5, 1.5, 2.0, 2.5)),
    "mobileone_s2": MobileOneConfig((1.5, 2.0, 2.5, 4.0)),
    "mobileone_s3": MobileOneConfig((2.0, 2.5, 3.0, 4.0)),
    "mobileone_s4": MobileOneConfig((3.0, 3.5, 3.5, 4.0), use_se=True),
    # CIFAR-10 (32x32): stride-1 stem, spatial 32 -> 32 -> 32 -> 16 -> 8 -> 4.
    "mobileone_s0_cifar": MobileOneConfig(
        (0.75, 1.0, 1.0, 2.0), num_conv_branches=4, num_classes=10, stem_stride=1,
        stage_strides=(1, 2, 2, 2),
    ),
}


def block_specs(cfg: MobileOneConfig) -> list[BlockSpec]:
    """Every block entry in order, stem first (names ``stage0``, ``stage{k}_{m}``)."""
    cin = min(64, int(64 * cfg.width_multipliers[0]))
    specs = [BlockSpec("stage0", 3, cin, 3, cfg.stem_stride, 1, False, 1, True, False)]
    nb = cfg.num_conv_branches
    for k in range(4):
        planes = int((64, 128, 256, 512)[k] * cfg.width_multipliers[k])
        n = cfg.num_blocks[k]
        n_se = (n // 2 if k == 2 else n if k == 3 else 0) if cfg.use_se else 0
        for i in range(n):
            stride = cfg.stage_strides[k] if i == 0 else 1
            se = i >= n - n_se
            specs.append(BlockSpec(f"stage{k + 1}_{2 * i}", cin, cin, 3, stride, cin, se, nb, True, stride == 1))
            specs.append(BlockSpec(f"stage{k + 1}_{2 * i + 1}", cin, planes, 1, 1, 1, se, nb, False, cin == planes))
            cin = planes
    return specs


class MobileOneBlock(nn.Module):
    """One MobileOne block entry described by a :class:`BlockSpec`. x: NHWC."""

    spec: BlockSpec
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        b = self.spec
        pad = b.kernel // 2
        if self.deploy:
            y = fused_rep_conv(b.cout, b.kernel, b.stride, b.groups, b.se, "reparam_conv")(x)
        else:
            y = 0.0
            if b.identity:
                y = batch_norm(train, "rbr_skip")(x)
            if b.scale:
                y = y + ConvBN(b.cout, 1, b.stride, 0, b.groups, name="rbr_scale")(x, train)
            for i in range(b.branches):
                y = y + ConvBN(b.cout, b.kernel, b.stride, pad, b.groups, name=f"rbr_conv_{i}")(x, train)
        se = SqueezeExcite(max(1, int(b.cout * 0.0625)), ("reduce", "expand"), name="se") if b.se else None
        return block_tail(y, se, self.deploy)


class MobileOne(nn.Module):
    """MobileOne classifier: ``[B, H, W, 3] -> [B, num_classes]`` logits."""

    config: MobileOneConfig
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        for b in block_specs(self.config):
            x = MobileOneBlock(b, self.deploy, name=b.name)(x, train)
        return pooled_classifier(x, self.config.num_classes)
