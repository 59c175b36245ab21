"""Run a model's QConvs through :func:`cfws_jax.models.layers.conv2d_unrolled` (im2col / matmul,
the same math) instead of a convolution op.

XLA:CPU computes a convolution's *kernel gradient* on a slow path; the matmul form's gradient is
much faster there (see ``conv2d_unrolled``; the learned-rounding code uses it for the same reason,
:func:`cfws_jax.ptq.adaround.train_lowering_unrolled`). This works through
``flax.linen.intercept_methods``: no model code changes, and parameter trees are unchanged.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn

from cfws_jax.models.layers import QConv, activation, conv2d_unrolled


def _unrolled_qconv(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != "__call__" or not isinstance(mod, QConv) or not mod.has_variable("params", "kernel"):
        return next_fun(*args, **kwargs)  # init (no kernel yet) and every other module run unchanged
    kernel = mod.get_variable("params", "kernel")
    bias = mod.get_variable("params", "bias") if mod.use_bias else None
    return activation(conv2d_unrolled(args[0], kernel, bias, mod.strides, mod.pad, mod.groups), mod.act)


def conv_lowering(unrolled: bool):
    """Context manager: inside it (while tracing), every QConv call with existing params uses the
    unrolled lowering when ``unrolled``; a no-op otherwise."""
    return nn.intercept_methods(_unrolled_qconv) if unrolled else contextlib.nullcontext()
