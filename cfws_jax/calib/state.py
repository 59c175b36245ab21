"""Histogram calibrator state: pure ``init`` / ``update`` (jittable) / ``merge`` / ``finalize``.

Semantics follow pytorch-quantization's ``HistogramCalibrator`` (ALGORITHM.md §4.2):

* ``mode="abs"``: histogram of ``|x|`` over ``[0, upper]`` (symmetric signed quantization);
* ``mode="relu"``: histogram of ``relu(x)`` (post-ReLU / unsigned outputs; negatives count as 0);
* ``mode="signed"``: two half-histograms sharing one set of edges, ``x >= 0`` and ``|x|`` for
  ``x < 0``. Folding them (``pos + neg``) gives exactly the ``abs`` histogram.

Range handling:

* ``range_mode="fixed"``: two-pass; the caller gives ``amax`` (from :func:`max_abs` or
  :func:`running_amax` of a first pass). Bins are ``linspace(0, amax, num_bins + 1)``; values
  above ``amax`` are folded into the last bin and counted in ``n_clipped``.
* ``range_mode="grow"``: TensorRT style. The first batch with a positive max sets
  ``width = max / num_bins``; a later batch whose max exceeds the last edge appends bins of the
  same width (``n = ceil(max / width)``). Depends on batch order, like the original. Shapes must
  be static under ``jit``, so bins live in a buffer of ``max_bins`` (``capacity``); if more are
  needed, adjacent pairs are merged (width doubles, exact) and ``n_coarsened`` counts it: this
  is a [D] deviation from TensorRT, which grows without bound.

Binning: bin ``min(floor(v / width), n - 1)`` with the floor of the *exact* quotient (a float32
estimate, corrected by an exact integer comparison of ``v`` with ``j * width``; XLA:CPU's float32
division is not correctly rounded), so a value exactly on an edge ``j * width`` lands in bin
``j`` and one ulp below it in bin ``j - 1``, as a float64 ``floor(v / width)`` gives. With a
power-of-two ``num_bins`` the edges of :func:`finalize` are exactly ``j * width``. A value equal
to the upper edge lands in the last bin. Counts are exact 64-bit integers held as two uint32 words (lo, hi)
with carry, so no float rounding and no int32 overflow (x64 mode not needed). NaN/Inf are not
binned; they are counted (``n_nan``, ``n_inf``) and :func:`finalize` raises naming the tensor.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

MODES = ("abs", "signed", "relu")
RANGE_MODES = ("fixed", "grow")
FLAG_MERGE_MISMATCH = 1  # merge of two states with different bin widths / ranges


class U64(NamedTuple):
    """Exact unsigned 64-bit integers as two uint32 words: value = hi * 2^32 + lo."""

    lo: jax.Array
    hi: jax.Array


def u64_zeros(shape) -> U64:
    return U64(jnp.zeros(shape, jnp.uint32), jnp.zeros(shape, jnp.uint32))


def u64_add(a: U64, b: U64) -> U64:
    """Elementwise a + b with carry from the low into the high word (wraps at 2^64)."""
    lo = a.lo + b.lo
    carry = (lo < a.lo).astype(jnp.uint32)
    return U64(lo, a.hi + b.hi + carry)


def u64_from_u32(x) -> U64:
    x = jnp.asarray(x, jnp.uint32)
    return U64(x, jnp.zeros_like(x))


def u64_to_numpy(u: U64) -> np.ndarray:
    """Host side: exact int64 array (values below 2^63)."""
    lo = np.asarray(u.lo).astype(np.uint64)
    hi = np.asarray(u.hi).astype(np.uint64)
    return ((hi << np.uint64(32)) | lo).astype(np.int64)


def u64_to_float(u: U64, dtype=jnp.float32):
    """Jittable conversion to float (rounded to ``dtype``)."""
    return u.hi.astype(dtype) * jnp.asarray(2.0**32, dtype) + u.lo.astype(dtype)


@struct.dataclass
class HistState:
    """Calibrator state (a pytree). ``S`` = 2 half-histograms for ``signed`` mode, else 1.

    counts: U64 of shape ``(S, capacity)``; only the first ``n_bins`` bins are active.
    width: float32 bin width (0 until a positive value is seen in grow mode).
    upper: float32 last edge ``e[n_bins]``.
    n_bins: int32 number of active bins.
    vmin / vmax: float32 running min / max of the finite raw values (±inf before any).
    n_seen / n_nan / n_inf / n_clipped: U64 scalars (binned values; NaN; ±Inf; values above a
      fixed range folded into the last bin).
    n_coarsened: int32, how many times grow mode doubled the width for lack of capacity.
    flags: int32 bit set (``FLAG_MERGE_MISMATCH``).
    """

    counts: U64
    width: jax.Array
    upper: jax.Array
    n_bins: jax.Array
    vmin: jax.Array
    vmax: jax.Array
    n_seen: U64
    n_nan: U64
    n_inf: U64
    n_clipped: U64
    n_coarsened: jax.Array
    flags: jax.Array
    num_bins: int = struct.field(pytree_node=False, default=2048)
    mode: str = struct.field(pytree_node=False, default="abs")
    range_mode: str = struct.field(pytree_node=False, default="fixed")
    skip_zeros: bool = struct.field(pytree_node=False, default=False)


def init(num_bins: int = 2048, mode: str = "abs", range_mode: str = "fixed", amax=None, *,
         max_bins: int | None = None, skip_zeros: bool = False) -> HistState:
    """Empty calibrator state.

    Args:
      num_bins: bins over the initial range (2048 as in TensorRT).
      mode: ``"abs"`` | ``"signed"`` | ``"relu"`` (see module doc).
      range_mode: ``"fixed"`` (``amax`` required, may be a traced scalar) | ``"grow"``.
      amax: upper edge of the fixed range (max |x|, or max relu(x) for ``relu``); ignored by grow.
      max_bins: grow-mode buffer size (default ``4 * num_bins``; even). Fixed mode uses num_bins.
      skip_zeros: drop exact zeros (pytorch-quantization's ``skip_zeros``).
    """
    if mode not in MODES:
        raise ValueError(f"calib.init: mode must be one of {MODES}, got {mode!r}")
    if range_mode not in RANGE_MODES:
        raise ValueError(f"calib.init: range_mode must be one of {RANGE_MODES}, got {range_mode!r}")
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 2:
        raise ValueError(f"calib.init: num_bins must be an integer >= 2, got {num_bins!r}")
    sides = 2 if mode == "signed" else 1
    if range_mode == "fixed":
        if amax is None:
            raise ValueError("calib.init: range_mode='fixed' needs amax (first pass: calib.max_abs "
                             "or calib.running_amax), or use range_mode='grow'")
        if not isinstance(amax, jax.core.Tracer):
            a = np.asarray(amax, np.float64)
            if a.shape != () or not np.isfinite(a) or a < 0:
                raise ValueError(f"calib.init: amax must be a finite scalar >= 0, got {amax!r}")
        capacity = num_bins
        upper = jnp.asarray(amax, jnp.float32)
        width = upper / num_bins
    else:
        capacity = 4 * num_bins if max_bins is None else int(max_bins)
        if capacity < num_bins or capacity % 2:
            raise ValueError(f"calib.init: max_bins must be even and >= num_bins, got {max_bins}")
        upper = jnp.zeros((), jnp.float32)
        width = jnp.zeros((), jnp.float32)
    z = u64_zeros(())
    return HistState(
        counts=u64_zeros((sides, capacity)), width=width, upper=upper,
        n_bins=jnp.asarray(num_bins, jnp.int32),
        vmin=jnp.asarray(jnp.inf, jnp.float32), vmax=jnp.asarray(-jnp.inf, jnp.float32),
        n_seen=z, n_nan=z, n_inf=z, n_clipped=z,
        n_coarsened=jnp.zeros((), jnp.int32), flags=jnp.zeros((), jnp.int32),
        num_bins=int(num_bins), mode=mode, range_mode=range_mode, skip_zeros=bool(skip_zeros))


def _u64_mul_u32(a, b) -> U64:
    """Exact 64-bit product of two uint32 arrays (16-bit limbs)."""
    a, b = jnp.asarray(a, jnp.uint32), jnp.asarray(b, jnp.uint32)
    m16 = jnp.uint32(0xFFFF)
    a0, a1, b0, b1 = a & m16, a >> 16, b & m16, b >> 16
    mid = u64_add(u64_from_u32(a0 * b1), u64_from_u32(a1 * b0))  # < 2^33
    mid_shifted = U64(mid.lo << 16, (mid.lo >> 16) | (mid.hi << 16))
    return u64_add(U64(a0 * b0, a1 * b1), mid_shifted)


def _u64_shl(m, d) -> U64:
    """``m << d`` for uint32 ``m`` and 0 <= d < 64 (int32) as U64."""
    m = jnp.asarray(m, jnp.uint32)
    d = jnp.asarray(d, jnp.int32)
    du = jnp.clip(d, 0, 31).astype(jnp.uint32)
    lo_small = m << du
    hi_small = jnp.where(d > 0, m >> jnp.clip(32 - d, 1, 31).astype(jnp.uint32), 0)
    hi_big = m << jnp.clip(d - 32, 0, 31).astype(jnp.uint32)
    big = d >= 32
    return U64(jnp.where(big, jnp.uint32(0), lo_small), jnp.where(big, hi_big, hi_small).astype(jnp.uint32))


def _mant_exp(x):
    """float32 x >= 0 -> (integer mantissa uint32, exponent int32) with x = m * 2^(e - 150)."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    e = ((bits >> 23) & 0xFF).astype(jnp.int32)
    frac = bits & jnp.uint32(0x7FFFFF)
    normal = e > 0
    return jnp.where(normal, frac | jnp.uint32(0x800000), frac), jnp.where(normal, e, 1)


def _edge_le(j, mw, ew, mv, ev):
    """Exact ``j * width <= v`` for int32 j >= 0 (< 2^31), width = mw * 2^(ew-150) > 0 and
    v = mv * 2^(ev-150) >= 0 (see :func:`_mant_exp`)."""
    d = ev - ew  # compare j * mw  with  mv * 2^d
    lhs = _u64_mul_u32(j.astype(jnp.uint32), mw)
    rhs = _u64_shl(mv, jnp.clip(d, 0, 63))
    le = (lhs.hi < rhs.hi) | ((lhs.hi == rhs.hi) & (lhs.lo <= rhs.lo))
    # d < 0: v < width, so only j = 0 fits; d >= 40: v >= 2^40 width > j * width
    return jnp.where(d < 0, j == 0, jnp.where(d >= 40, True, le))


def bin_index(v, width, n):
    """``min(floor(v / width), n - 1)`` (int32) with the floor of the exact quotient; v >= 0
    float32 (finite), width > 0 float32 scalar, n the number of active bins."""
    mw, ew = _mant_exp(width)
    mv, ev = _mant_exp(v)
    # estimate (mv / mw) * 2^(ev - ew) on normal numbers only (CPU flushes subnormals), the
    # power of two built from its bits: within 1 of the exact floor below 2^22
    d = jnp.clip(ev - ew, -100, 100)
    half = jax.lax.bitcast_convert_type(((d // 2 + 127) << 23).astype(jnp.uint32), jnp.float32)
    rest = jax.lax.bitcast_convert_type(((d - d // 2 + 127) << 23).astype(jnp.uint32), jnp.float32)
    q = mv.astype(jnp.float32) / mw.astype(jnp.float32) * half * rest
    est = jnp.floor(jnp.minimum(q, 2.0**30)).astype(jnp.int32)
    k = est - (~_edge_le(est, mw, ew, mv, ev)).astype(jnp.int32)
    k = k + _edge_le(k + 1, mw, ew, mv, ev).astype(jnp.int32)
    return jnp.clip(k, 0, n - 1)


def _values(x, mode: str):
    """(v >= 0 values to bin, side index 0/1) for a flat float32 x."""
    if mode == "relu":
        return jnp.maximum(x, 0.0), None
    if mode == "signed":
        return jnp.abs(x), (x < 0).astype(jnp.int32)
    return jnp.abs(x), None


def _row_mask(mask, x):
    """Broadcast a leading-axes mask (e.g. bool ``[B]`` of the rows that count) to ``x.shape``."""
    mask = jnp.asarray(mask, bool)
    if mask.ndim > x.ndim or x.shape[: mask.ndim] != mask.shape:
        raise ValueError(f"calib: mask of shape {mask.shape} does not match the leading axes of {x.shape}")
    return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x.shape)


def max_abs(x, mode: str = "abs", mask=None):
    """Jittable first-pass statistic: max |x| (``relu``: max relu(x)) over the finite values; 0 if none.
    ``mask``: optional bool over the leading axes of ``x`` (e.g. ``[B]``); False rows are ignored."""
    x = jnp.asarray(x, jnp.float32)
    v, _ = _values(x, mode)
    keep = jnp.isfinite(x) if mask is None else jnp.isfinite(x) & _row_mask(mask, x)
    return jnp.max(jnp.where(keep, v, 0.0), initial=0.0)


def running_amax(state: HistState):
    """max |x| (``relu`` mode: max relu(x)) of everything seen so far, from the running min/max."""
    hi = jnp.maximum(state.vmax, 0.0)
    if state.mode == "relu":
        return hi
    return jnp.maximum(hi, jnp.maximum(-state.vmin, 0.0))


def _coarsen_pairs(counts: U64) -> U64:
    """Merge bins (2m, 2m+1) -> m exactly (with carry); the second half becomes empty."""
    s, cap = counts.lo.shape
    a = U64(counts.lo[:, 0::2], counts.hi[:, 0::2])
    b = U64(counts.lo[:, 1::2], counts.hi[:, 1::2])
    m = u64_add(a, b)
    pad = jnp.zeros((s, cap // 2), jnp.uint32)
    return U64(jnp.concatenate([m.lo, pad], 1), jnp.concatenate([m.hi, pad], 1))


def _grow(state: HistState, bmax):
    """New (counts, width, upper, n_bins, n_coarsened) after seeing a batch max ``bmax``."""
    cap = state.counts.lo.shape[1]
    start = (state.width <= 0) & (bmax > 0)
    width = jnp.where(start, bmax / state.num_bins, state.width)
    upper = jnp.where(start, bmax, state.upper)
    grows = (~start) & (state.width > 0) & (bmax > state.upper)
    need = jnp.ceil(jnp.minimum(bmax / jnp.where(width > 0, width, 1.0), 2.0**30))
    n = jnp.where(grows, jnp.maximum(state.n_bins, need.astype(jnp.int32)), state.n_bins)

    def cond(c):
        return c[3] > cap

    def body(c):
        counts, w, k, nb = c
        return _coarsen_pairs(counts), w * 2.0, k + 1, (nb + 1) // 2

    counts, width, k, n = jax.lax.while_loop(cond, body, (state.counts, width, state.n_coarsened, n))
    upper = jnp.where(grows, n.astype(jnp.float32) * width, upper)
    return counts, width, upper, n, k


def update(state: HistState, x, mask=None) -> HistState:
    """Add a batch ``x`` (any shape) to the histogram. Pure and jittable (``jax.jit(update)``).

    ``mask``: optional bool over the leading axes of ``x`` (e.g. ``[B]`` rows of an NHWC batch);
    elements of False rows (padding) are not counted anywhere (bins, NaN/Inf, min/max)."""
    x = jnp.asarray(x)
    if x.size >= 2**32:
        raise ValueError(f"calib.update: a batch holds at most 2^32 - 1 values, got {x.size}")
    keep = None if mask is None else _row_mask(mask, x).reshape(-1)
    x = x.reshape(-1).astype(jnp.float32)
    finite = jnp.isfinite(x)
    if keep is None:
        n_nan = jnp.sum(jnp.isnan(x), dtype=jnp.uint32)
        n_inf = jnp.sum(jnp.isinf(x), dtype=jnp.uint32)
    else:
        finite = finite & keep
        n_nan = jnp.sum(jnp.isnan(x) & keep, dtype=jnp.uint32)
        n_inf = jnp.sum(jnp.isinf(x) & keep, dtype=jnp.uint32)
    v, side = _values(x, state.mode)
    valid = finite & (v != 0) if state.skip_zeros else finite
    v = jnp.where(valid, v, 0.0)
    bmax = jnp.max(v, initial=0.0)
    vmin = jnp.minimum(state.vmin, jnp.min(jnp.where(finite, x, jnp.inf), initial=jnp.inf))
    vmax = jnp.maximum(state.vmax, jnp.max(jnp.where(finite, x, -jnp.inf), initial=-jnp.inf))

    if state.range_mode == "grow":
        counts, width, upper, n, n_coarsened = _grow(state, bmax)
    else:
        counts, width, upper, n, n_coarsened = (state.counts, state.width, state.upper,
                                                state.n_bins, state.n_coarsened)
    on = width > 0
    idx = jnp.where(on, bin_index(v, jnp.where(on, width, 1.0), n), jnp.where(v > 0, n - 1, 0))
    ones = valid.astype(jnp.uint32)
    cap = counts.lo.shape[1]
    flat = idx if side is None else side * cap + idx
    batch = jnp.zeros(counts.lo.size, jnp.uint32).at[flat].add(ones).reshape(counts.lo.shape)
    clipped = jnp.sum(valid & (v > upper), dtype=jnp.uint32)
    return state.replace(
        counts=u64_add(counts, u64_from_u32(batch)), width=width, upper=upper, n_bins=n,
        vmin=vmin, vmax=vmax,
        n_seen=u64_add(state.n_seen, u64_from_u32(jnp.sum(valid, dtype=jnp.uint32))),
        n_nan=u64_add(state.n_nan, u64_from_u32(n_nan)),
        n_inf=u64_add(state.n_inf, u64_from_u32(n_inf)),
        n_clipped=u64_add(state.n_clipped, u64_from_u32(clipped)),
        n_coarsened=n_coarsened)


def merge(a: HistState, b: HistState) -> HistState:
    """Sum of two states with the same configuration (e.g. from two devices). Jittable.

    Both must share the bin width (fixed: same ``amax``; grow: same width, or one not started).
    Otherwise ``FLAG_MERGE_MISMATCH`` is set and :func:`finalize` raises.
    """
    cfg = lambda s: (s.num_bins, s.mode, s.range_mode, s.skip_zeros, s.counts.lo.shape)  # noqa: E731
    if cfg(a) != cfg(b):
        raise ValueError(f"calib.merge: states have different configurations {cfg(a)} vs {cfg(b)}")
    a_on, b_on = a.width > 0, b.width > 0
    width = jnp.where(a_on, a.width, b.width)
    mismatch = (a.width != b.width) if a.range_mode == "fixed" else (a_on & b_on & (a.width != b.width))
    if a.range_mode == "fixed":
        mismatch = mismatch | (a.upper != b.upper)
    flags = a.flags | b.flags | jnp.where(mismatch, FLAG_MERGE_MISMATCH, 0).astype(jnp.int32)
    return a.replace(
        counts=u64_add(a.counts, b.counts), width=width, upper=jnp.maximum(a.upper, b.upper),
        n_bins=jnp.maximum(a.n_bins, b.n_bins), vmin=jnp.minimum(a.vmin, b.vmin),
        vmax=jnp.maximum(a.vmax, b.vmax), n_seen=u64_add(a.n_seen, b.n_seen),
        n_nan=u64_add(a.n_nan, b.n_nan), n_inf=u64_add(a.n_inf, b.n_inf),
        n_clipped=u64_add(a.n_clipped, b.n_clipped),
        n_coarsened=jnp.maximum(a.n_coarsened, b.n_coarsened), flags=flags)


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Host-side result of :func:`finalize` (NumPy).

    counts: int64 ``(N,)`` over edges float64 ``(N+1,)`` from 0 (``abs``/``relu``); for ``signed``
      ``(2N,)`` over ``(2N+1,)`` edges from ``-upper`` to ``upper`` (negative half mirrored).
    amax: max |x| (``relu``: max relu(x)) over all finite values seen.
    """

    counts: np.ndarray
    edges: np.ndarray
    mode: str
    name: str
    amax: float
    vmin: float
    vmax: float
    n_seen: int
    n_nan: int
    n_inf: int
    n_clipped: int
    n_coarsened: int

    def abs_counts(self, relu: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) of |x| (or of relu(x) with ``relu=True``) over ``[0, upper]``."""
        if self.mode != "signed":
            return self.counts, self.edges
        n = self.counts.shape[0] // 2
        neg, pos = self.counts[:n][::-1], self.counts[n:].copy()
        if relu:
            pos[0] += neg.sum()
            return pos, self.edges[n:]
        return pos + neg, self.edges[n:]


def finalize(state: HistState, name: str = "tensor") -> Histogram:
    """Host side: exact int64 counts and float64 edges; raises ``ValueError`` naming ``name``
    for NaN/Inf seen, an empty histogram, or a merge of mismatched ranges."""
    n_nan, n_inf = int(u64_to_numpy(state.n_nan)), int(u64_to_numpy(state.n_inf))
    if n_nan or n_inf:
        raise ValueError(f"{name}: activations contain {n_nan} NaN and {n_inf} Inf values; "
                         f"they are not binned (fix the model or the input data)")
    if int(state.flags) & FLAG_MERGE_MISMATCH:
        raise ValueError(f"{name}: merged histogram states with different bin widths/ranges "
                         f"(use range_mode='fixed' with one shared amax for multi-device calibration)")
    n_seen = int(u64_to_numpy(state.n_seen))
    if n_seen == 0:
        raise ValueError(f"{name}: empty histogram (no values were collected)")
    n = int(state.n_bins)
    counts = u64_to_numpy(state.counts)[:, :n]
    edges = np.linspace(0.0, float(state.upper), n + 1)
    if state.mode == "signed":
        counts = np.concatenate([counts[1][::-1], counts[0]])
        edges = np.concatenate([-edges[::-1], edges[1:]])
    else:
        counts = counts[0]
    return Histogram(
        counts=counts, edges=edges, mode=state.mode, name=name,
        amax=float(running_amax(state)), vmin=float(state.vmin), vmax=float(state.vmax),
        n_seen=n_seen, n_nan=n_nan, n_inf=n_inf, n_clipped=int(u64_to_numpy(state.n_clipped)),
        n_coarsened=int(state.n_coarsened))


def to_arrays(state: HistState, relu: bool = False, dtype=None):
    """Jittable ``(counts (num_bins,), edges (num_bins+1,))`` of |x| (or relu(x)) for a fixed-range
    state, in ``dtype`` (default: float64 under x64, else float32; counts are rounded to it).
    Feed them to ``entropy_amax`` etc. inside ``jit``. Grow mode has a data-dependent bin count:
    use :func:`finalize` on the host instead."""
    if state.range_mode != "fixed":
        raise ValueError("calib.to_arrays needs a fixed-range state; use calib.finalize for grow mode")
    dtype = dtype or (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    c = u64_to_float(state.counts, dtype)
    if state.mode == "signed":
        c = c[0].at[0].add(jnp.sum(c[1])) if relu else c[0] + c[1]
    else:
        c = c[0]
    edges = jnp.linspace(0.0, state.upper.astype(dtype), state.num_bins + 1, dtype=dtype)
    return c, edges
