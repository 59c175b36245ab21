"""Weight quantization of one layer, and the exact dequantization used for inference.

Stored arrays per layer (kernels HWIO ``[k, k, I/g, O]``; dense kernels ``[in, out]``):

* ``plain``: ``w_codes`` (int8 / int16), ``w_scale`` ``(O,)`` (or ``()`` per-tensor);
* ``cfws``: ``w_codes`` = fine codes (HWIO), ``w_scale`` = fine scales ``(O,)``, ``c_codes`` =
  coarse centre codes ``[I/g, O]`` (full HWIO for the whole-kernel split), ``c_scale`` ``(O,)``;
* ``float``: ``kernel``;
* bias: ``bias`` (float32) or ``b_codes`` (int16) + ``b_scale`` ``()`` with ``bias="int16"``.

:func:`dequantize_layer` rebuilds the float kernel from the codes in NumPy float32 (one
correctly rounded product per code, then the coarse centre added), so a quantized model saved
and restored gives bit-identical outputs.
"""

from __future__ import annotations

import jax
import numpy as np

from cfws_jax.cfws import CFWSConfig, cfws_quantize, plain_quantize
from cfws_jax.ptq.config import QuantConfig
from cfws_jax.quant import ZERO_AMAX, storage_dtype


# One compilation per kernel shape and config (op-by-op eager dispatch would compile each op).
_cfws_jit = jax.jit(cfws_quantize, static_argnums=1)
_plain_jit = jax.jit(plain_quantize, static_argnames=("bits", "per_channel", "rounding"))


def _as_hwio(kernel: np.ndarray) -> np.ndarray:
    return kernel.reshape(1, 1, *kernel.shape) if kernel.ndim == 2 else kernel


def quantize_layer(kernel, bias, scheme: str, w_bits: int, config: QuantConfig) -> dict[str, np.ndarray]:
    """Quantize one layer's float ``kernel`` (HWIO or [in, out]) and ``bias`` (or None)."""
    kernel = np.asarray(kernel, np.float32)
    out: dict[str, np.ndarray] = {}
    if scheme == "float":
        out["kernel"] = kernel
    elif scheme == "plain":
        codes, scale, _ = _plain_jit(_as_hwio(kernel), bits=w_bits, per_channel=config.per_channel,
                                         rounding=config.rounding)
        out["w_codes"] = np.asarray(codes).reshape(kernel.shape).astype(storage_dtype(w_bits))
        out["w_scale"] = np.asarray(scale, np.float32)
    elif scheme == "cfws":
        cw = _cfws_jit(kernel, CFWSConfig(bits=w_bits, extract_center=config.cfws_extract_center,
                                              coarse=config.cfws_coarse, rounding=config.rounding))
        dt = storage_dtype(w_bits)
        out.update(w_codes=np.asarray(cw.fine_codes).astype(dt), w_scale=np.asarray(cw.fine_scale, np.float32),
                   c_codes=np.asarray(cw.coarse_codes).astype(dt), c_scale=np.asarray(cw.coarse_scale, np.float32))
    else:
        raise ValueError(f"unknown weight scheme {scheme!r}")
    if bias is not None:
        bias = np.asarray(bias, np.float32)
        if config.bias == "int16" and scheme != "float":
            amax = float(np.max(np.abs(bias))) if bias.size else 0.0
            s = np.float32(amax / 32767.0) if amax > ZERO_AMAX else np.float32(1.0)
            t = bias / s
            t = np.round(t) if config.rounding == "half_even" else np.floor(t + np.float32(0.5))
            out["b_codes"] = np.clip(t, -32767, 32767).astype(np.int16)
            out["b_scale"] = np.asarray(s, np.float32)
        else:
            out["bias"] = bias
    return out


def _dq(codes, scale) -> np.ndarray:
    """codes * scale with the scale on the last (output-channel) axis, float32."""
    return codes.astype(np.float32) * np.asarray(scale, np.float32)


def split_kernels(q: dict[str, np.ndarray], kernel=None) -> dict[str, np.ndarray]:
    """``{"coarse_kernel", "fine_kernel"}`` HWIO float32 of a stored CFWS layer, both on the full
    k x k grid (the centre codes at the centre tap, zeros elsewhere), for
    :func:`cfws_jax.ptq.runtime.layer_pre`; ``kernel``: a float kernel to split instead of the fine
    codes (fine = kernel - coarse, for calibration on the float network); ``{}`` if not CFWS."""
    if "c_codes" not in q:
        return {}
    fine = _dq(q["w_codes"], q["w_scale"])
    coarse = _dq(q["c_codes"], q["c_scale"])
    if coarse.ndim != fine.ndim:  # centre extraction
        full = np.zeros_like(fine)
        c = fine.shape[0] // 2
        full[c, c] = coarse
        coarse = full
    if kernel is not None:
        fine = np.asarray(kernel, np.float32) - coarse
    return {"coarse_kernel": coarse, "fine_kernel": fine}


def dequantize_layer(q: dict[str, np.ndarray], split: bool = False) -> dict[str, np.ndarray]:
    """Stored arrays of one layer -> ``{"kernel", "bias"?}`` float32 for the forward pass
    (``split``: plus :func:`split_kernels` of a CFWS layer and the (fine) ``w_scale``, for
    ``int_bias``)."""
    if "kernel" in q:
        kernel = np.asarray(q["kernel"], np.float32)
    else:
        kernel = _dq(q["w_codes"], q["w_scale"])
        if "c_codes" in q:
            coarse = _dq(q["c_codes"], q["c_scale"])
            if coarse.ndim == kernel.ndim:  # whole-kernel split
                kernel = kernel + coarse
            else:
                c = kernel.shape[0] // 2
                kernel = kernel.copy()
                kernel[c, c] = kernel[c, c] + coarse
    out = {"kernel": kernel}
    if split:  # the onnxruntime layout's extras: the CFWS split and the accumulator grid of the bias
        out.update(split_kernels(q))
        if "w_scale" in q:
            out["w_scale"] = np.asarray(q["w_scale"], np.float32)
    if "bias" in q:
        out["bias"] = np.asarray(q["bias"], np.float32)
    elif "b_codes" in q:
        out["bias"] = q["b_codes"].astype(np.float32) * np.float32(q["b_scale"])
    return out
