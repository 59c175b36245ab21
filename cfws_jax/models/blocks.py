"""Train-form building blocks shared by the model zoo. Activations NHWC, kernels HWIO.

* :class:`ConvBN` -- ``bn(conv(x))``: a bias-free :class:`QConv` named ``conv`` and a Flax
  ``BatchNorm`` named ``bn`` (params ``scale``/``bias``, batch_stats ``mean``/``var``).
* :class:`SqueezeExcite` -- channel attention ``x * gate(x)``; its two 1x1 convs are
  ``QConv(rep=False)`` layers named by the caller (``down``/``up`` for RepVGG,
  ``reduce``/``expand`` for MobileOne).

BatchNorm uses PyTorch's defaults: ``eps = 1e-5`` and running-average momentum 0.1 in
PyTorch terms (Flax ``momentum = 0.9``).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfws_jax.models.layers import QConv, QDense

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: new = 0.9 * old + 0.1 * batch (PyTorch momentum 0.1)


class BlockSpec(NamedTuple):
    """Static description of one re-parameterizable block (used by fusion and converters).

    name: Flax module name (``stage0``, ``stage2_3``); cin/cout: channels; kernel: k of the
    k x k branches; stride; groups; se: SE after the branch sum; branches: number of k x k
    conv+BN branches (RepVGG 1, MobileOne ``num_conv_branches``); scale: has a 1x1 conv+BN
    branch; identity: has an identity BN branch (cin == cout and stride 1).
    """

    name: str
    cin: int
    cout: int
    kernel: int
    stride: int
    groups: int
    se: bool
    branches: int
    scale: bool
    identity: bool


def batch_norm(train: bool, name: str, eps: float = BN_EPS) -> nn.BatchNorm:
    """Flax BatchNorm over the channel axis (-1) with PyTorch-equivalent settings (YOLOv6: eps 1e-3)."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=eps, name=name
    )


class ConvBN(nn.Module):
    """``bn(conv(x))`` with a bias-free k x k conv (HWIO kernel ``[k, k, C/groups, features]``)."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int | None = None
    groups: int = 1
    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = QConv(
            self.features,
            self.kernel_size,
            self.strides,
            self.padding,
            self.groups,
            use_bias=False,
            name="conv",
        )(x)
        return batch_norm(train, "bn", self.eps)(y)


class SqueezeExcite(nn.Module):
    """``x * sigmoid(second(relu(first(mean_hw(x)))))``, x NHWC.

    ``first``: 1x1 QConv C -> ``hidden`` with bias and ReLU; ``second``: 1x1 QConv
    ``hidden`` -> C with bias and sigmoid. ``names`` gives their module names.
    """

    hidden: int
    names: tuple[str, str] = ("down", "up")

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = QConv(self.hidden, 1, act="relu", name=self.names[0])(s)
        s = QConv(c, 1, act="sigmoid", name=self.names[1])(s)
        return x * s


def fused_rep_conv(features: int, kernel: int, strides: int, groups: int, has_se: bool, name: str) -> QConv:
    """The deploy-form conv of a re-parameterized block (HWIO kernel, bias); ReLU fused unless SE follows."""
    return QConv(
        features, kernel, strides, kernel // 2, groups, use_bias=True,
        act=None if has_se else "relu", rep=True, name=name,
    )


def block_tail(y, se: SqueezeExcite | None, deploy: bool):
    """SE (if any) then ReLU; a deploy block without SE already applied ReLU in its fused conv."""
    if se is not None:
        y = se(y)
    if se is not None or not deploy:
        y = jax.nn.relu(y)
    return y


def pooled_classifier(x, num_classes: int):
    """Global average pool then the ``linear`` QDense head: ``[B, H, W, C] -> [B, num_classes]``."""
    return QDense(num_classes, name="linear")(jnp.mean(x, axis=(1, 2)))
