"""Integer convolutions of the ``--target onnxruntime`` export (onnxruntime CPU execution provider).

Activations are uint8 codes (tensors NCHW, kernels OIHW int8 per-channel): zero point 128 and
scale ``amax / 127`` at signed points (the simulation's -127..127, plus -128), zero point 0 and
scale ``amax / 255`` at the unsigned ReLU-fused points of ``act_unsigned`` models (its 0..255). A quantized conv that reads codes and whose output is quantized right after it (no
activation, or a ReLU before an unsigned point) is laid out as onnxruntime's QDQ selector wants
it, ``DQ(x int8) , DQ(w int8, axis 0) , DQ(bias int32, scale s_x * s_w[o]) -> Conv -> [Relu] ->
Q(uint8 / int8)``, and becomes one ``QLinearConv`` (the Relu is dropped before a uint8 zero
point 0: the clamp at the bottom of the range is the ReLU). A CFWS layer with branch points (``cfws_branch_quant``) is two such convs, centre 1x1 on
the cropped codes and fine k x k with the bias, whose int8 outputs meet in ``DQ , DQ -> Add ->
[Relu] -> Q`` (``QLinearAdd``). The only departure from the fake-quant simulation is the bias
rounded to the product scale (half an accumulator unit, the same for every pixel of a channel).

Convs followed by SiLU / sigmoid and output convs (float outputs) keep the float ``Conv`` on
DequantizeLinear'd operands: onnxruntime has no integer conv with those epilogues, and its
``ConvInteger`` (int32 out, then a float rescale) ran 15x slower than ``QLinearConv`` here.
"""

from __future__ import annotations

import numpy as np

from cfws_jax.export.onnx_qdq import _centre_input, _Graph, _oihw, _weight_dq, conv_attrs
from cfws_jax.ptq.graph import LayerInfo

INT32_MAX = 2**31 - 1


def _fusable(lp, info: LayerInfo) -> bool:
    """A plain conv whose QDQ form onnxruntime fuses into one QLinearConv."""
    if lp.scheme != "plain" or lp.out_point is None or lp.point_out.before_act:
        return False
    return info.act is None or (info.act == "relu" and lp.point_out.unsigned)


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


def integer_conv(g: _Graph, codes, x: str, info: LayerInfo, lp, q, w) -> str | None:
    """The pre-activation output (float32 NCHW) of quantized conv ``info`` reading ``codes``
    (``x``: their DequantizeLinear) in the fusable QDQ form, bias as int32; None where that form
    does not apply (CFWS without branch points, SiLU / sigmoid, float output, weights wider than
    8 bits): the caller emits the float QDQ conv."""
    if not _fusable(lp, info) or np.asarray(q["w_codes"]).dtype.itemsize > 1:
        return None
    base = info.name
    fine = _oihw(q["w_codes"])
    inputs = [x, _weight_dq(g, fine, q["w_scale"], base)]
    bias = w.get("bias")
    if bias is not None:
        inputs.append(int_bias(g, bias, codes.scale_value, q["w_scale"], fine.shape[0], base))
    return g.op("Conv", inputs, base + ".conv", **conv_attrs(info))
