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
import jax.numpy as jnp

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


def _taps(x, kh: int, kw: int, strides: int, padding: int):
    """The ``kh * kw`` shifted (and strided) views of the zero-padded NHWC ``x``, each
    ``[N, H', W', C]``, in HW order: tap ``(i, j)`` is the input each output position meets at
    kernel offset ``(i, j)``."""
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0))) if padding else x
    ho, wo = (h + 2 * padding - kh) // strides + 1, (w + 2 * padding - kw) // strides + 1
    return [jax.lax.slice(xp, (0, i, j, 0), (n, i + strides * (ho - 1) + 1, j + strides * (wo - 1) + 1, c),
                          (1, strides, strides, 1)) for i in range(kh) for j in range(kw)]


def conv2d_unrolled(x, kernel, bias=None, strides: int = 1, padding: int = 0, groups: int = 1):
    """:func:`conv2d`'s math lowered without a convolution op (same arguments and layouts).

    Depthwise (``groups == C == O``): a multiply-add over the ``kh * kw`` shifted views of ``x``;
    ungrouped: the views concatenated on channels (im2col, ``[N, H', W', kh*kw*C]``) times the
    kernel reshaped to ``[kh*kw*C, O]`` (a 1x1 conv is one matmul); other groupings fall back to
    :func:`conv2d`. XLA:CPU runs the *kernel gradient* of a convolution op 5-50x slower than
    that of this form (measured on MobileOne-S0 shapes), which is what learned rounding spends
    its time on; results agree with :func:`conv2d` to float32 rounding (summation order).
    """
    kh, kw, ci, o = kernel.shape
    kernel = kernel.astype(x.dtype)
    if groups == 1:
        taps = _taps(x, kh, kw, strides, padding)
        cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
        y = (cols.reshape(-1, kh * kw * ci) @ kernel.reshape(kh * kw * ci, o)).reshape(*cols.shape[:3], o)
    elif ci == 1 and groups == o == x.shape[-1]:
        taps = _taps(x, kh, kw, strides, padding)
        y = taps[0] * kernel[0, 0, 0]
        for t, tap in enumerate(taps[1:], start=1):
            y = y + tap * kernel[t // kw, t % kw, 0]
    else:
        return conv2d(x, kernel, bias, strides, padding, groups)
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
