"""Uniform integer quantizer: scales from amax, integer codes, dequantization, fake-quant.

All functions are pure and jittable. Layout conventions:

* ``axis=None`` means one scale for the whole tensor (per-tensor).
* ``axis=a`` means one scale per index of axis ``a`` (per-axis / per-channel); ``scale``
  then has shape ``(x.shape[a],)``. For Flax HWIO kernels ``[kh, kw, I/g, O]`` the output
  channel axis is ``-1``; for PyTorch OIHW kernels it is ``0``.

Integer ranges (``int_range``):

* signed, narrow (default): ``[-(2^(b-1)-1), 2^(b-1)-1]``, e.g. ``[-127, 127]``;
* signed, full: ``[-2^(b-1), 2^(b-1)-1]``;
* unsigned: ``[0, 2^b-1]``, e.g. ``[0, 255]``.

Non-finite input: ``quantize`` saturates ``+inf``/``-inf`` to ``qmax``/``qmin`` and maps NaN
to code 0 (i.e. the zero point); ``fake_quant`` propagates NaN. Call :func:`check_finite` on
host data to get an error naming the tensor instead.

A scale is never zero: ``amax <= ZERO_AMAX`` (an all-zero channel) gives scale 1 and all-zero
codes (the CFWS reference code divides by zero there and produces NaN).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Rounding = Literal["half_even", "half_up"]
ROUNDINGS = ("half_even", "half_up")

ZERO_AMAX = 2.0**-24
"""amax at or below this is treated as an all-zero tensor / channel."""

_SATURATE = 2.0**20  # |x / s| stand-in for +-inf: beyond any code plus any zero point


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Attributes:
      bits: 2..16.
      signed: signed codes (symmetric around 0) or unsigned (``[0, 2^b-1]``).
      symmetric: zero point 0 (scale from amax) or asymmetric (scale and zero point from min/max).
      narrow: for signed codes, drop the most negative code (``-127..127`` instead of ``-128..127``).
      axis: None for per-tensor, else the axis that keeps one scale per index.
      rounding: ``"half_even"`` (``jnp.round``) or ``"half_up"`` (``floor(t + 0.5)``, as the CFWS
        reference code does). The two differ only at exact ties.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow: bool = True
    axis: int | None = None
    rounding: Rounding = "half_even"

    def __post_init__(self):
        if not isinstance(self.bits, (int, np.integer)) or not 2 <= int(self.bits) <= 16:
            raise ValueError(f"QuantSpec.bits must be an integer in 2..16, got {self.bits!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"QuantSpec.rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.signed, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.signed, self.narrow)[1]

    def replace(self, **changes) -> "QuantSpec":
        return dataclasses.replace(self, **changes)


def int_range(bits: int, signed: bool = True, narrow: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of the integer codes for ``bits`` bits."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    if signed:
        qmax = 2 ** (bits - 1) - 1
        return (-qmax if narrow else -qmax - 1), qmax
    return 0, 2**bits - 1


def storage_dtype(bits: int, signed: bool = True):
    """Smallest NumPy integer dtype that holds the codes (int8/uint8/int16/uint16)."""
    if bits <= 8:
        return np.int8 if signed else np.uint8
    return np.int16 if signed else np.uint16


def _axis(axis: int | None, ndim: int) -> int | None:
    if axis is None:
        return None
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a tensor of rank {ndim}")
    return axis % ndim


def _bcast(v, axis: int | None, ndim: int):
    """Reshape a per-axis vector ``(C,)`` so it broadcasts against a rank-``ndim`` tensor."""
    v = jnp.asarray(v)
    if axis is None or v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _div(a, b):
    """IEEE ``a / b`` (float32). XLA would rewrite a division by a broadcast (a per-channel or
    constant scale) into a multiplication by the reciprocal, which is off by an ulp and changes
    codes next to rounding ties; the barrier keeps the true division."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    b = jax.lax.optimization_barrier(jnp.broadcast_to(b, jnp.broadcast_shapes(a.shape, b.shape)))
    return a / b


def reduce_amax(x, axis: int | None = None):
    """max |x| over everything (axis=None) or over every axis except ``axis`` -> ``(C,)``."""
    x = jnp.abs(jnp.asarray(x, jnp.float32))
    a = _axis(axis, x.ndim)
    if a is None:
        return jnp.max(x)
    return jnp.max(x, axis=tuple(i for i in range(x.ndim) if i != a))


def reduce_minmax(x, axis: int | None = None):
    """(min, max) of x over everything or over every axis except ``axis``."""
    x = jnp.asarray(x, jnp.float32)
    a = _axis(axis, x.ndim)
    red = None if a is None else tuple(i for i in range(x.ndim) if i != a)
    return jnp.min(x, axis=red), jnp.max(x, axis=red)


def scale_from_amax(amax, spec: QuantSpec = QuantSpec()):
    """Symmetric scale ``amax / qmax`` with the zero guard (``amax <= ZERO_AMAX`` -> 1).

    For unsigned specs ``qmax = 2^b - 1`` (the tensor is assumed non-negative).
    """
    amax = jnp.asarray(amax, jnp.float32)
    return jnp.where(amax > ZERO_AMAX, _div(amax, spec.qmax), jnp.ones_like(amax))


def scale_zero_point(xmin, xmax, spec: QuantSpec):
    """Asymmetric (affine) scale and integer zero point covering ``[min(xmin,0), max(xmax,0)]``.

    Zero is always exactly representable. Returns ``(scale float32, zero_point int32)``.
    """
    xmin = jnp.minimum(jnp.asarray(xmin, jnp.float32), 0.0)
    xmax = jnp.maximum(jnp.asarray(xmax, jnp.float32), 0.0)
    span = xmax - xmin
    scale = jnp.where(span > ZERO_AMAX, _div(span, spec.qmax - spec.qmin), jnp.ones_like(span))
    zp = spec.qmin - round_values(_div(xmin, scale), spec.rounding)
    zp = jnp.clip(zp, spec.qmin, spec.qmax).astype(jnp.int32)
    return scale, zp


def round_values(t, rounding: Rounding = "half_even"):
    """Round to integers (as floats): half-to-even or half-up (``floor(t + 0.5)``)."""
    if rounding == "half_even":
        return jnp.round(t)
    if rounding == "half_up":
        return jnp.floor(t + 0.5)
    raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")


def quantize(x, scale, zero_point=0, spec: QuantSpec = QuantSpec()):
    """Integer codes ``clip(round(x / scale) + zero_point, qmin, qmax)`` as int32.

    ``scale``/``zero_point`` are scalars (per-tensor) or ``(C,)`` vectors along ``spec.axis``.
    """
    x = jnp.asarray(x)
    a = _axis(spec.axis, x.ndim)
    t = _div(x, _bcast(scale, a, x.ndim))
    t = jnp.nan_to_num(t, nan=0.0, posinf=_SATURATE, neginf=-_SATURATE)
    q = round_values(t, spec.rounding) + _bcast(jnp.asarray(zero_point, jnp.float32), a, x.ndim)
    return jnp.clip(q, spec.qmin, spec.qmax).astype(jnp.int32)


def dequantize(q, scale, zero_point=0, spec: QuantSpec = QuantSpec(), dtype=jnp.float32):
    """Real values ``(q - zero_point) * scale`` in ``dtype``."""
    q = jnp.asarray(q)
    a = _axis(spec.axis, q.ndim)
    zp = _bcast(jnp.asarray(zero_point, jnp.float32), a, q.ndim)
    return ((q.astype(jnp.float32) - zp) * _bcast(scale, a, q.ndim)).astype(dtype)


def fake_quant(x, scale, zero_point=0, spec: QuantSpec = QuantSpec()):
    """Quantize-dequantize, returning the dtype of ``x`` (float32, bfloat16, float16).

    Computed in float32. NaN propagates (unlike :func:`quantize`).
    """
    x = jnp.asarray(x)
    a = _axis(spec.axis, x.ndim)
    s = _bcast(scale, a, x.ndim)
    zp = _bcast(jnp.asarray(zero_point, jnp.float32), a, x.ndim)
    t = round_values(_div(x, s), spec.rounding) + zp
    y = (jnp.clip(t, spec.qmin, spec.qmax) - zp) * s
    return y.astype(x.dtype)


def fake_quant_symmetric(x, amax, qmax, rounding: Rounding = "half_even", full_range: bool = False):
    """Per-tensor symmetric fake-quant with codes in ``[-qmax, qmax]`` (``full_range``:
    ``[-qmax - 1, qmax]``, the full two's-complement range of ONNX QuantizeLinear), where ``qmax``
    may be a traced value (one compiled program serves several bit-widths). ``amax <= ZERO_AMAX``
    gives scale 1. Same result as :func:`fake_quant` with a signed narrow spec of ``qmax``; for
    non-negative ``x`` also the same as an unsigned spec with that ``qmax``."""
    x = jnp.asarray(x)
    amax = jnp.asarray(amax, jnp.float32)
    qmax = jnp.asarray(qmax, jnp.float32)
    s = jnp.where(amax > ZERO_AMAX, _div(amax, qmax), jnp.ones_like(amax))
    t = round_values(_div(x.astype(jnp.float32), s), rounding)
    return (jnp.clip(t, -qmax - (1 if full_range else 0), qmax) * s).astype(x.dtype)


def calibrate_minmax(x, spec: QuantSpec = QuantSpec()):
    """Scale and zero point from the data's own range (max |x|, or min/max when asymmetric)."""
    if spec.symmetric:
        amax = reduce_amax(x, spec.axis)
        return scale_from_amax(amax, spec), jnp.zeros_like(amax, jnp.int32)
    lo, hi = reduce_minmax(x, spec.axis)
    return scale_zero_point(lo, hi, spec)


def quantize_minmax(x, spec: QuantSpec = QuantSpec()):
    """One call for weights: ``(codes int32, scale, zero_point)`` with scales from the data range."""
    scale, zp = calibrate_minmax(x, spec)
    return quantize(x, scale, zp, spec), scale, zp


def check_finite(x, name: str = "tensor") -> None:
    """Host-side check: raise ``ValueError`` naming ``name`` if ``x`` holds NaN or Inf."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.kind != "V":
        return
    bad = ~np.isfinite(arr.astype(np.float32))
    if bad.any():
        n_nan = int(np.isnan(arr.astype(np.float32)).sum())
        raise ValueError(
            f"{name}: {int(bad.sum())} non-finite values ({n_nan} NaN, {int(bad.sum()) - n_nan} Inf) "
            f"in a tensor of shape {arr.shape}"
        )
