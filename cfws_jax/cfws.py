"""Coarse & Fine Weight Splitting (CFWS) of one conv kernel (ALGORITHM.md §3.2, §3.3).

Kernels are Flax HWIO ``[k, k, I/g, O]``; every scale is per output channel ``(O,)`` (axis -1).
Codes are int32 arrays holding values in ``[-qmax, qmax]``, ``qmax = 2^(bits-1) - 1``.

Default (``extract_center=True, coarse="channel"``), for odd k > 1 with centre ``c = k//2``:

1. ``Wc = W[c, c]`` ``[I/g, O]``; ``s_c = max_i |Wc[i, o]| / qmax`` (zero guard: 1);
   ``qc = round(Wc / s_c)``, ``Wc_hat = s_c · qc``.
2. ``W_fine = W`` with the centre tap replaced by ``Wc − Wc_hat``;
   ``s_f = max |W_fine[..., o]| / qmax``, ``qf = round(W_fine / s_f)``.
3. ``kernel = pad(Wc_hat) + s_f · qf``. The coarse codes are stored once, never re-quantized.

Ablations: ``coarse="tensor"`` uses one coarse scale (stored broadcast to ``(O,)``);
``extract_center=False`` quantizes the whole kernel twice (coarse codes have the full HWIO shape,
fine = quantized residual). A 1×1 kernel with ``extract_center=True`` is not split: it gets zero
coarse codes with unit coarse scale, and plain per-channel quantization in the fine part (callers
normally skip it via :func:`is_splittable`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax.numpy as jnp

from cfws_jax.quant import QuantSpec, Rounding, dequantize, quantize, reduce_amax, scale_from_amax

CoarseMode = Literal["channel", "tensor"]
COARSE_MODES = ("channel", "tensor")


@dataclasses.dataclass(frozen=True)
class CFWSConfig:
    """CFWS options. bits: both levels (2..16); coarse: per-"channel" or per-"tensor" coarse scale."""

    bits: int = 8
    extract_center: bool = True
    coarse: CoarseMode = "channel"
    rounding: Rounding = "half_even"

    def __post_init__(self):
        QuantSpec(bits=self.bits, rounding=self.rounding)  # validates bits and rounding
        if self.coarse not in COARSE_MODES:
            raise ValueError(f"CFWSConfig.coarse must be one of {COARSE_MODES}, got {self.coarse!r}")

    def spec(self, axis: int | None) -> QuantSpec:
        """Signed, narrow-range, symmetric quantizer with this config's bits and rounding."""
        return QuantSpec(bits=self.bits, axis=axis, rounding=self.rounding)


class CFWSWeights(NamedTuple):
    """Result of :func:`cfws_quantize`.

    coarse_codes: int32 ``[I/g, O]`` centre codes (full HWIO shape when ``extract_center=False``);
    coarse_scale: ``(O,)``; fine_codes: int32 HWIO; fine_scale: ``(O,)``;
    kernel: float32 HWIO effective kernel ``W_coarse + W_fine_hat``.
    """

    coarse_codes: Any
    coarse_scale: Any
    fine_codes: Any
    fine_scale: Any
    kernel: Any


def _check_rank4(shape) -> None:
    if len(shape) != 4:
        raise ValueError(f"expected a 4-D HWIO kernel [k, k, I/g, O], got shape {tuple(shape)}")


def _check_odd_square(shape) -> None:
    _check_rank4(shape)
    kh, kw = shape[:2]
    if kh != kw or kh % 2 == 0:
        raise ValueError(
            f"centre extraction needs a square kernel with odd size (centre k//2), got {kh}x{kw} "
            f"(HWIO shape {tuple(shape)}); use extract_center=False or plain quantization"
        )


def is_splittable(kernel) -> bool:
    """True for a square HWIO kernel (or shape) with odd k > 1, i.e. one CFWS can split."""
    shape = tuple(getattr(kernel, "shape", kernel))
    return len(shape) == 4 and shape[0] == shape[1] and shape[0] % 2 == 1 and shape[0] > 1


def split_center(kernel):
    """``(center [I/g, O], surround HWIO with the centre tap zeroed)`` of an odd square kernel."""
    kernel = jnp.asarray(kernel)
    _check_odd_square(kernel.shape)
    c = kernel.shape[0] // 2
    return kernel[c, c], kernel.at[c, c].set(0)


def _quant(x, spec: QuantSpec):
    """Symmetric absmax quantization: ``(codes int32, scale, dequantized float32)``.

    The select on ``codes == 0`` changes no value; it keeps XLA:CPU from contracting the
    dequantizing product with a later add/subtract into an FMA under jit, so jitted, eager and
    NumPy results agree bit for bit (checked in tests/test_cfws.py).
    """
    scale = scale_from_amax(reduce_amax(x, spec.axis), spec)
    codes = quantize(x, scale, 0, spec)
    hat = dequantize(codes, scale, 0, spec)
    return codes, scale, jnp.where(codes == 0, jnp.zeros_like(hat), hat)


def plain_quantize(kernel, bits: int = 8, per_channel: bool = True, rounding: Rounding = "half_even"):
    """Standard symmetric weight quantization of an HWIO kernel.

    Returns ``(codes int32 HWIO, scale (O,) or scalar, kernel_hat float32 HWIO)``.
    """
    kernel = jnp.asarray(kernel)
    _check_rank4(kernel.shape)
    return _quant(kernel.astype(jnp.float32), QuantSpec(bits=bits, axis=-1 if per_channel else None, rounding=rounding))


def cfws_quantize(kernel, config: CFWSConfig = CFWSConfig()) -> CFWSWeights:
    """Coarse & fine split quantization of an HWIO kernel ``[k, k, I/g, O]`` (jittable; config static)."""
    w = jnp.asarray(kernel)
    _check_rank4(w.shape)
    w = w.astype(jnp.float32)
    out = w.shape[-1]
    fine_spec = config.spec(-1)
    coarse_spec = config.spec(-1 if config.coarse == "channel" else None)

    if not config.extract_center:
        qc, s_c, coarse_hat = _quant(w, coarse_spec)
        qf, s_f, fine_hat = _quant(w - coarse_hat, fine_spec)
        return CFWSWeights(qc, jnp.broadcast_to(s_c, (out,)), qf, s_f, coarse_hat + fine_hat)

    _check_odd_square(w.shape)
    if not is_splittable(w):  # 1x1: nothing to split, plain per-channel in the fine part
        qf, s_f, fine_hat = _quant(w, fine_spec)
        return CFWSWeights(jnp.zeros(w.shape[2:], jnp.int32), jnp.ones((out,), jnp.float32), qf, s_f, fine_hat)

    c = w.shape[0] // 2
    center, surround = split_center(w)
    qc, s_c, center_hat = _quant(center, coarse_spec)
    fine = surround.at[c, c].set(center - center_hat)
    qf, s_f, fine_hat = _quant(fine, fine_spec)
    return CFWSWeights(qc, jnp.broadcast_to(s_c, (out,)), qf, s_f, fine_hat.at[c, c].add(center_hat))


def coarse_kernel(w: CFWSWeights, k: int):
    """Dequantized coarse kernel, HWIO ``[k, k, I/g, O]``: zero except the centre tap.

    With full-shape coarse codes (``extract_center=False``) this is the whole dequantized coarse kernel.
    """
    codes = jnp.asarray(w.coarse_codes)
    if codes.ndim == 4:
        if codes.shape[0] != k:
            raise ValueError(f"coarse codes have kernel size {codes.shape[0]}, asked for {k}")
        return dequantize(codes, w.coarse_scale, 0, QuantSpec(axis=-1))
    if codes.ndim != 2 or k % 2 == 0:
        raise ValueError(f"expected [I/g, O] centre codes and odd k, got codes {tuple(codes.shape)}, k={k}")
    centre = dequantize(codes, w.coarse_scale, 0, QuantSpec(axis=-1))
    c = k // 2
    return jnp.zeros((k, k) + centre.shape, centre.dtype).at[c, c].set(centre)


def fine_kernel(w: CFWSWeights):
    """Dequantized fine kernel ``s_f · qf``, HWIO."""
    return dequantize(w.fine_codes, w.fine_scale, 0, QuantSpec(axis=-1))


def fold_input_channel_scales(kernel, input_scales, groups: int = 1):
    """Fold per-input-channel activation scales into an HWIO kernel (ALGORITHM.md §3.6).

    ``f[c] = s_x[c] / max(s_x)``; ``W'[..., j, o] = W[..., j, o] * f[g(o) * I/g + j]`` with the
    **global** input channel of group ``g(o)``; the input is then per-tensor with scale
    ``max(s_x)`` (its integer codes are unchanged). ``conv(x, W) == conv(x / f, W')`` in float.
    Returns ``(W', s_x_tensor scalar, f (C,))``; the inputs are not modified. Run CFWS on ``W'``.
    """
    w = jnp.asarray(kernel, jnp.float32)
    s = jnp.asarray(input_scales, jnp.float32)
    kh, kw, ig, o = w.shape
    if s.shape != (ig * groups,):
        raise ValueError(f"input_scales must have shape ({ig * groups},) for a kernel {tuple(w.shape)} "
                         f"with groups={groups}, got {tuple(s.shape)}")
    if o % groups:
        raise ValueError(f"output channels {o} not divisible by groups={groups}")
    s_max = jnp.max(s)
    f = s / s_max
    # factor for (j, o): global input channel g(o) * ig + j, g(o) = o // (O / groups)
    g_of_o = jnp.arange(o) // (o // groups)
    factor = f[g_of_o[None, :] * ig + jnp.arange(ig)[:, None]]  # [I/g, O]
    return w * factor[None, None], s_max, f
