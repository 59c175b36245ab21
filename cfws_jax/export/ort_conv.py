"""Pieces of the ``--target onnxruntime`` export (onnxruntime CPU execution provider).

Activations are uint8 codes (tensors NCHW, kernels OIHW int8 per-channel): zero point 128 and
scale ``amax / 127`` at signed points (the ``act_full_range`` codes -128..127), zero point 0 and
scale ``amax / 255`` at the unsigned ReLU-fused points of ``act_unsigned`` models (0..255). A
quantized conv that reads codes and whose output is quantized right after it (no activation, or
a ReLU before an unsigned point) is emitted by :mod:`cfws_jax.export.onnx_qdq` as
``DQ(x uint8) , DQ(w int8, axis 0) , DQ(bias int32, scale s_x * s_w[o]) -> Conv -> [Relu] -> Q``,
which onnxruntime's QDQ selector turns into one ``QLinearConv`` (the Relu dropped: the clamp at
the bottom of uint8 with zero point 0 is the ReLU). A CFWS layer with branch points
(``cfws_branch_quant``) is two such convs, the centre 1x1 on the cropped codes and the fine
k x k with the bias, whose 8-bit outputs meet in ``DQ , DQ -> Add -> [Relu] -> Q``
(``QLinearAdd``). The int32 bias is the simulation's too (``int_bias``), so the file departs
from it only by float summation order.

Convs followed by SiLU / sigmoid and output convs (float outputs) have the same operands but
stay float ``Conv`` in onnxruntime: it has no integer conv with those epilogues, and its
``ConvInteger`` (int32 out, then a float rescale) ran 15x slower than ``QLinearConv`` here.
"""

from __future__ import annotations

import numpy as np

from cfws_jax.export.onnx_qdq import _centre_input, _Graph
from cfws_jax.ptq.graph import LayerInfo

INT32_MAX = 2**31 - 1


def int_bias(g: _Graph, bias, sx: float, sw, n: int, base: str) -> str:
    """``DequantizeLinear(round(b / (s_x * s_w[o])) int32, s_x * s_w[o], axis 0)``: the bias on the
    accumulator grid of a conv with input scale ``sx`` and weight scales ``sw`` (``(n,)`` or scalar)."""
    s = np.broadcast_to(np.float32(sx) * np.asarray(sw, np.float32), (n,)).astype(np.float32)
    bq = np.clip(np.round(np.asarray(bias, np.float64) / s.astype(np.float64)), -INT32_MAX, INT32_MAX).astype(np.int32)
    return g.op("DequantizeLinear", [g.const(bq, base + ".b_codes"), g.const(s, base + ".b_scale"),
                                     g.const(np.zeros(n, np.int32), base + ".b_zero_point")], base + ".b_dq", axis=0)


def centre_codes_input(g: _Graph, x: str, info: LayerInfo, base: str) -> str:
    """The centre 1x1 conv's input for DequantizeLinear output ``x`` of int8 codes: the codes
    cropped / padded (with the zero point) by ``k//2 - pad``, then dequantized, so the conv still
    reads a DequantizeLinear (fusable)."""
    c = g.codes[x]
    if info.kernel_shape[0] // 2 == info.padding:
        return x
    xq = _centre_input(g, c.q, info, base, pad_value=c.zp)
    return g.op("DequantizeLinear", [xq, c.scale, c.zp], base + ".centre_dq")
