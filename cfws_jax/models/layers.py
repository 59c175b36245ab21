"""Shared Flax layers. Activations are NHWC; conv kernels are HWIO ``[kh, kw, I/groups, O]``.

``QConv`` and ``QDense`` are the *quantizable layers*: the PTQ pipeline finds every layer
to quantize by these classes (through ``flax.linen.intercept_methods``), and names it by its
Flax module path joined with ``/`` (e.g. ``stage1_0/rbr_reparam``), which is also its path in
the parameter tree. Models must therefore build every conv / linear layer from these
classes, and keep the bias add and the activation inside the layer (``act``), so that the
pipeline sees ``act(conv(x) + b)`` as one unit and can place its output quantizer either
before the activation or after it (ReLU fusion).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
}


def activation(y, act: str | None):
    """Apply the named activation (None = identity)."""
    if act is None:
        return y
    try:
        return ACTIVATIONS[act](y)
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}") from None


def conv2d(x, kernel, bias=None, strides: int = 1, padding: int = 0, groups: int = 1):
    """2-D conv. x: NHWC, kernel: HWIO ``[kh, kw, C/groups, O]``, explicit symmetric padding.

    Explicit padding (never 'SAME') so stride-2 convs match PyTorch's ``padding=k//2``.
    """
    y = jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(strides, strides),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


class QConv(nn.Module):
    """``act(conv2d(x, kernel) + bias)``; a quantizable layer.

    Attributes:
      features: output channels O.
      kernel_size: k (square kernels).
      strides: stride.
      padding: symmetric zero padding; ``None`` means ``k // 2``.
      groups: feature groups (``groups == in_channels == features`` is depthwise).
      use_bias: whether the layer has a bias.
      act: ``None``, ``"relu"``, ``"silu"`` or ``"sigmoid"``.
      rep: True for a re-parameterized (fused multi-branch) conv; CFWS candidates are the
        ``rep`` layers with odd ``k > 1``.
      is_output: True for a network output layer (detector prediction convs): the PTQ
        pipeline puts no output quantizer on it.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int | None = None
    groups: int = 1
    use_bias: bool = True
    act: str | None = None
    rep: bool = False
    is_output: bool = False
    kernel_init: Callable = nn.initializers.lecun_normal()

    @property
    def pad(self) -> int:
        return self.kernel_size // 2 if self.padding is None else self.padding

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        if cin % self.groups or self.features % self.groups:
            raise ValueError(
                f"layer {'/'.join(self.path) or self.name}: in_channels={cin} and "
                f"features={self.features} must both be divisible by groups={self.groups}"
            )
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, cin // self.groups, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        return activation(conv2d(x, kernel, bias, self.strides, self.pad, self.groups), self.act)


class QDense(nn.Module):
    """``act(x @ kernel + bias)`` with kernel ``[in, out]``; a quantizable layer."""

    features: int
    use_bias: bool = True
    act: str | None = None
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = x @ kernel.astype(x.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)
        return activation(y, self.act)
