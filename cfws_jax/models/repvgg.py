"""RepVGG (Ding et al. 2021) in Flax, in the multi-branch train form and the fused deploy form.

Layout: activations NHWC, conv kernels HWIO ``[3, 3, C/groups, O]``, linear kernel ``[in, out]``.

Module names (= Flax parameter paths = PTQ layer names) mirror the original PyTorch code
(DingXiaoH/RepVGG) with ``.`` in block indices replaced by ``_``:

* blocks: ``stage0`` (stem) and ``stage{k}_{j}`` for stage k = 1..4, block j;
* train form, inside a block: ``rbr_dense/conv`` (3x3 QConv, no bias) + ``rbr_dense/bn``,
  ``rbr_1x1/conv`` (1x1, pad 0, same stride/groups) + ``rbr_1x1/bn``, and ``rbr_identity``
  (a BatchNorm, present only when in == out and stride 1); output
  ``relu(se(dense + 1x1 + identity))``;
* deploy form, inside a block: ``rbr_reparam`` = ``QConv(3x3, pad 1, bias, rep=True,
  act="relu")``; with SE (D2se) ``act=None`` and the ReLU follows the SE;
* SE (D2se only, every block incl. ``stage0``): ``se/down`` (1x1, C -> C/16, bias, ReLU) and
  ``se/up`` (1x1, C/16 -> C, bias, sigmoid), both ``QConv(rep=False)``;
* head: global average pool, then ``linear`` (QDense).

Train-form variables are ``{"params", "batch_stats"}``; call with ``train=True,
mutable=["batch_stats"]`` to train (BatchNorm momentum 0.9 in Flax terms = PyTorch 0.1,
eps 1e-5). :func:`cfws_jax.models.fuse.fuse` maps them to deploy-form ``{"params"}``.
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
class RepVGGConfig:
    """Architecture of one RepVGG variant.

    Attributes:
      num_blocks: blocks in stages 1..4.
      widths: output channels of stage0..stage4 (5 entries).
      group_blocks: global block indices (1 = ``stage1_0``) that use ``groups`` groups.
      groups: group count of the blocks in ``group_blocks``.
      use_se: SE after every block's branch sum (D2se).
      num_classes: classifier outputs.
      stem_stride: stride of ``stage0`` (2 for ImageNet, 1 for CIFAR).
      stage_strides: stride of the first block of stages 1..4.
    """

    num_blocks: tuple[int, int, int, int]
    widths: tuple[int, int, int, int, int]
    group_blocks: tuple[int, ...] = ()
    groups: int = 1
    use_se: bool = False
    num_classes: int = 1000
    stem_stride: int = 2
    stage_strides: tuple[int, int, int, int] = (2, 2, 2, 2)


def _widths(a: float, b: float) -> tuple[int, int, int, int, int]:
    return (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))


_GROUPED = tuple(range(2, 27, 2))  # original g2_map / g4_map block indices

REPVGG_CONFIGS: dict[str, RepVGGConfig] = {
    "repvgg_a0": RepVGGConfig((2, 4, 14, 1), _widths(0.75, 2.5)),
    "repvgg_a1": RepVGGConfig((2, 4, 14, 1), _widths(1, 2.5)),
    "repvgg_a2": RepVGGConfig((2, 4, 14, 1), _widths(1.5, 2.75)),
    "repvgg_b0": RepVGGConfig((4, 6, 16, 1), _widths(1, 2.5)),
    "repvgg_b1": RepVGGConfig((4, 6, 16, 1), _widths(2, 4)),
    "repvgg_b1g2": RepVGGConfig((4, 6, 16, 1), _widths(2, 4), _GROUPED, 2),
    "repvgg_b1g4": RepVGGConfig((4, 6, 16, 1), _widths(2, 4), _GROUPED, 4),
    "repvgg_b2": RepVGGConfig((4, 6, 16, 1), _widths(2.5, 5)),
    "repvgg_b2g2": RepVGGConfig((4, 6, 16, 1), _widths(2.5, 5), _GROUPED, 2),
    "repvgg_b2g4": RepVGGConfig((4, 6, 16, 1), _widths(2.5, 5), _GROUPED, 4),
    "repvgg_b3": RepVGGConfig((4, 6, 16, 1), _widths(3, 5)),
    "repvgg_b3g2": RepVGGConfig((4, 6, 16, 1), _widths(3, 5), _GROUPED, 2),
    "repvgg_b3g4": RepVGGConfig((4, 6, 16, 1), _widths(3, 5), _GROUPED, 4),
    "repvgg_d2se": RepVGGConfig((8, 14, 24, 1), _widths(2.5, 5), use_se=True),
    # CIFAR-10 (32x32): stride-1 stem, spatial 32 -> 32 -> 32 -> 16 -> 8 -> 4.
    "repvgg_a0_cifar": RepVGGConfig(
        (2, 4, 14, 1), _widths(0.75, 2.5), num_classes=10, stem_stride=1, stage_strides=(1, 2, 2, 2)
    ),
    "repvgg_cifar_small": RepVGGConfig(
        (1, 2, 4, 1), (16, 16, 32, 64, 128), num_classes=10, stem_stride=1,
        stage_strides=(1, 2, 2, 2),
    ),
}


def block_specs(cfg: RepVGGConfig) -> list[BlockSpec]:
    """Every block of the network in order, stem first (names ``stage0``, ``stage{k}_{j}``)."""
    specs = []
    cin = 3

    def add(name, cout, stride, groups):
        nonlocal cin
        ident = cin == cout and stride == 1
        specs.append(BlockSpec(name, cin, cout, 3, stride, groups, cfg.use_se, 1, True, ident))
        cin = cout

    add("stage0", cfg.widths[0], cfg.stem_stride, 1)
    idx = 1
    for k in range(4):
        for j in range(cfg.num_blocks[k]):
            stride = cfg.stage_strides[k] if j == 0 else 1
            add(f"stage{k + 1}_{j}", cfg.widths[k + 1], stride, cfg.groups if idx in cfg.group_blocks else 1)
            idx += 1
    return specs


class RepVGGBlock(nn.Module):
    """One RepVGG block (see the module docstring for the sub-module names). x: NHWC."""

    features: int
    strides: int = 1
    groups: int = 1
    use_se: bool = False
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.deploy:
            y = fused_rep_conv(self.features, 3, self.strides, self.groups, self.use_se, "rbr_reparam")(x)
        else:
            y = ConvBN(self.features, 3, self.strides, 1, self.groups, name="rbr_dense")(x, train)
            y = y + ConvBN(self.features, 1, self.strides, 0, self.groups, name="rbr_1x1")(x, train)
            if x.shape[-1] == self.features and self.strides == 1:
                y = y + batch_norm(train, "rbr_identity")(x)
        se = SqueezeExcite(max(1, self.features // 16), ("down", "up"), name="se") if self.use_se else None
        return block_tail(y, se, self.deploy)


class RepVGG(nn.Module):
    """RepVGG classifier: ``[B, H, W, 3] -> [B, num_classes]`` logits."""

    config: RepVGGConfig
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.config
        for b in block_specs(cfg):
            x = RepVGGBlock(b.cout, b.stride, b.groups, b.se, self.deploy, name=b.name)(x, train)
        return pooled_classifier(x, cfg.num_classes)
