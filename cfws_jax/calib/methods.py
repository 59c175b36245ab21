"""amax search on a histogram of |x| (ALGORITHM.md §4.3-4.5), vectorized over candidates and jitted.

Inputs are ``counts (N,)`` (any numeric dtype; the float dtype of the computation is float64 when
x64 is enabled, else float32) and ``edges (N+1,)`` with ``edges[0] == 0``.

* ``entropy``: pytorch-quantization / TensorRT KL. ``h[0] := h[1]`` (on a copy), candidates
  ``i = start_bin, start_bin + stride, ..., N`` (inclusive), reference P = first ``i`` bins with
  the tail folded into bin ``i-1``, candidate Q = ``nq = 2^(bits-1+unsigned)`` groups
  ``floor(nq*j/i)``, each group's raw mass spread over its non-empty bins (empty bins stay
  empty), ``D_i = KL(P/sum P || Q/sum Q)``, ``+inf`` if a bin has P > 0 and Q = 0; the **last**
  argmin wins and ``amax = edges[i*]``.
* ``kl_cfws``: same construction, divergence ``D_T`` of §4.4 (masked, unnormalised; the
  normalisation term has the opposite sign).

Where this deliberately differs from TensorRT (``nan_policy``, entropy only): a candidate ``i``
whose kept bins ``h[0..i-1]`` are all empty (the first non-empty bin, after ``h[0] := h[1]``,
lies at or above ``i``; typical of tensors that are almost all zeros with rare outliers) has an
all-zero Q, and NVIDIA's ``_compute_amax_entropy`` computes ``entropy(P, Q) = 0/0 = NaN``;
``np.argmin`` treats NaN as the minimum, so TensorRT returns the last such candidate, ``amax =``
the lower edge of the first non-empty bin, which clips nearly every value. The default
``nan_policy="inf"`` scores those candidates ``+inf`` (excluded) and picks a sensible bin;
``nan_policy="tensorrt"`` reproduces NVIDIA's pick bit for bit (for TensorRT-compatible
calibration caches). On every histogram without such candidates the two policies agree.

Two exact-arithmetic formulations of the same sums (``algorithm``):

* ``"prefix"``: per (candidate, group) sums from prefix sums, O(N * nq) work (fast). It subtracts
  large prefix sums, so it needs float64: the default when x64 is on.
* ``"window"``: per-bin terms ``P log1p((P*C - S)/S)`` over each group's window, O(N^2) work,
  no cancellation: the default in float32. In float32, near-ties can pick a neighbouring bin
  (tests bound the divergence gap).

Exact ties (sparse histograms, where several candidates have mathematically equal D) stay exact
in float64: group terms are summed in fixed point (see ``_group_total``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cfws_jax.calib.state import Histogram
from cfws_jax.quant import ZERO_AMAX, int_range, round_values

_ELEMS_PER_CHUNK = 1 << 21  # bound on (candidates x work-per-candidate) elements held at once


def num_target_bins(num_bits: int, unsigned: bool) -> int:
    """nq = 2^(num_bits - 1 + unsigned): 128 for signed int8, 256 for unsigned int8."""
    return 1 << (int(num_bits) - 1 + int(bool(unsigned)))


def _float_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _map(fn, xs, per_item: int):
    """``lax.map`` over candidates in vmapped chunks so memory stays bounded."""
    batch = max(1, min(xs.shape[0], _ELEMS_PER_CHUNK // max(per_item, 1)))
    return jax.lax.map(fn, xs, batch_size=batch)


def _group_total(G, total):
    """Sum of the per-group terms (last axis). In float64 it is exact in effect: each term is
    rounded once to a fixed-point grid (unit ~ total * 2^-56) and summed as int64, so equal
    multisets of terms give bit-equal sums whatever their order (exact ties stay ties)."""
    if G.dtype != jnp.float64:
        return jnp.sum(G, axis=-1)
    unit = jnp.exp2(jnp.ceil(jnp.log2(jnp.maximum(total, 1))) + 4 - 60)
    return jnp.sum(jnp.round(G / unit).astype(jnp.int64), axis=-1).astype(G.dtype) * unit


def _prefix_table(h):
    """(N+1, 6) table: cumsums of h, [h>0], h ln h, 'value changes'; next non-empty bin; its change flag."""
    n = h.shape[0]
    dt = h.dtype
    nz = h > 0
    hl = jnp.where(nz, h * jnp.log(jnp.where(nz, h, 1)), 0)
    ar = jnp.arange(n)
    last = jax.lax.cummax(jnp.where(nz, ar, -1))
    prev = jnp.concatenate([jnp.array([-1]), last[:-1]])
    chg = nz & (prev >= 0) & (h[jnp.maximum(prev, 0)] != h)
    nxt = jax.lax.cummin(jnp.where(nz, ar, n), reverse=True)
    chg_p = jnp.concatenate([chg, jnp.zeros(1, bool)])
    cum = lambda a: jnp.concatenate([jnp.zeros(1, dt), jnp.cumsum(a.astype(dt))])  # noqa: E731
    nxt_p = jnp.concatenate([nxt, jnp.array([n])])
    return jnp.stack([cum(h), cum(nz), cum(hl), cum(chg), nxt_p.astype(dt), chg_p[nxt_p].astype(dt)], 1)


def _kl_parts(h, cands, nq: int, algorithm: str, total):
    """Per candidate i: (A_i, tail_i, h[i-1]) with A_i = sum over kept bins with h>0 of
    P_j ln(P_j C_g / S_g) (P has the tail folded into bin i-1)."""
    n = h.shape[0]
    dt = h.dtype
    tails = jnp.concatenate([jnp.cumsum(h[::-1])[::-1], jnp.zeros(1, dt)])  # tails[k] = sum_{j>=k}

    def last_bin(i, S, C):
        gl = (nq * (i - 1)) // i
        return tails[i], h[i - 1], S[gl], C[gl]

    if algorithm == "prefix":
        table = _prefix_table(h)

        def one(i):
            b = (jnp.arange(nq + 1) * i + nq - 1) // nq
            r = table[b]
            s, e = r[:-1], r[1:]
            S, C, H = e[:, 0] - s[:, 0], e[:, 1] - s[:, 1], e[:, 2] - s[:, 2]
            changes = e[:, 3] - s[:, 3] - jnp.where(s[:, 4] < b[1:], s[:, 5], 0)
            Ss, Cs = jnp.where(S > 0, S, 1), jnp.where(C > 0, C, 1)
            G = jnp.where(changes > 0, H - S * jnp.log(Ss / Cs), 0)
            t, hl, Sl, Cl = last_bin(i, S, C)
            hs = jnp.where(hl > 0, hl, 1)
            corr = t * jnp.log1p((hs * Cl - Sl) / jnp.where(Sl > 0, Sl, 1)) + (hl + t) * jnp.log1p(t / hs)
            return _group_total(G, total) + jnp.where((t > 0) & (hl > 0), corr, 0), t, hl

        per_item = 8 * (nq + 1)
    elif algorithm == "window":
        L = -(-n // nq)
        hp = jnp.concatenate([h, jnp.zeros(L, dt)])

        def one(i):
            g = jnp.arange(nq)
            s, e = (g * i + nq - 1) // nq, ((g + 1) * i + nq - 1) // nq
            idx = s[:, None] + jnp.arange(L)[None, :]
            hw = jnp.where(idx < e[:, None], hp[idx], 0)
            S, C = jnp.sum(hw, 1), jnp.sum(hw > 0, 1).astype(dt)
            t = tails[i]
            pw = hw + jnp.where(idx == i - 1, t, 0)
            ratio = (pw * C[:, None] - S[:, None]) / jnp.where(S > 0, S, 1)[:, None]
            term = jnp.where(hw > 0, pw * jnp.log1p(ratio), 0)
            G = term[:, 0]
            for k in range(1, L):  # left to right, so equal sequences give equal sums
                G = G + term[:, k]
            return _group_total(G, total), t, h[i - 1]

        per_item = 8 * nq * L
    else:
        raise ValueError(f"unknown KL algorithm {algorithm!r}; expected 'prefix' or 'window'")
    return _map(one, cands, per_item)


def _candidates(n: int, start_bin: int, stride: int, stop: int):
    if stride < 1 or start_bin < 1 or start_bin >= stop:
        raise ValueError(f"no candidates: start_bin={start_bin}, stride={stride}, histogram of {n} bins")
    return jnp.arange(start_bin, stop, stride, dtype=jnp.int32)


def _prep(counts):
    h = jnp.asarray(counts).astype(_float_dtype())
    if h.ndim != 1 or h.shape[0] < 2:
        raise ValueError(f"counts must be a 1-D histogram with >= 2 bins, got shape {h.shape}")
    return h


NAN_POLICIES = ("inf", "tensorrt")


def _check_nan_policy(nan_policy: str, metric: str) -> None:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if nan_policy == "tensorrt" and metric != "entropy":
        raise ValueError(f"nan_policy='tensorrt' applies to the TensorRT entropy method only, not {metric!r}")


@partial(jax.jit, static_argnames=("metric", "num_bits", "unsigned", "start_bin", "stride", "algorithm",
                                   "nan_policy"))
def kl_divergences(counts, metric: str = "entropy", num_bits: int = 8, unsigned: bool = False,
                   start_bin: int = 128, stride: int = 1, algorithm: str | None = None,
                   nan_policy: str = "inf"):
    """Divergence of every candidate ``i = start_bin, +stride, ..., N``: ``(n_candidates,)``.

    metric: ``"entropy"`` (TensorRT KL) or ``"kl_cfws"`` (D_T). ``+inf`` marks excluded candidates.
    algorithm: ``None`` (prefix in float64, window in float32), ``"prefix"`` or ``"window"``.
    nan_policy: ``"inf"`` (default) or ``"tensorrt"``: candidates whose kept bins are all empty
      (and every candidate of an all-empty histogram) are NaN, as in NVIDIA's code (module doc).
    """
    _check_nan_policy(nan_policy, metric)
    h = _prep(counts)
    n = h.shape[0]
    h = h.at[0].set(h[1])
    total = jnp.sum(h)
    cands = _candidates(n, start_bin, stride, n + 1)
    algo = algorithm or ("prefix" if h.dtype == jnp.float64 else "window")
    A, t, hl = _kl_parts(h, cands, num_target_bins(num_bits, unsigned), algo, total)
    ts = jnp.where(total > 0, total, 1)
    log_kept = jnp.log1p(-t / ts)  # ln((T - t) / T)
    if metric == "entropy":
        D = A / ts + log_kept
        bad = (total <= 0) | ((t > 0) & (hl <= 0))
    elif metric == "kl_cfws":
        mass_m = jnp.where((t > 0) & (hl <= 0), total - t, total)
        D = A / ts - (mass_m / ts) * log_kept
        bad = (total <= 0) | (t >= total)
    else:
        raise ValueError(f"unknown KL metric {metric!r}")
    D = jnp.where(bad, jnp.inf, D)
    if nan_policy == "tensorrt":
        # entropy(P, Q) with sum(Q) = 0 (no kept bin is non-empty) or sum(P) = 0 is 0/0 in scipy
        first = jnp.argmax(h > 0)  # first non-empty bin (0 if none: then total == 0 below)
        D = jnp.where((total <= 0) | (cands <= first), jnp.nan, D)
    return D


def _last_argmin(d):
    """Last index of the minimum; NaN counts as the minimum (``np.argmin`` semantics)."""
    return d.shape[0] - 1 - jnp.argmin(d[::-1])


def _kl_amax(counts, edges, metric, num_bits, unsigned, start_bin, stride, nan_policy="inf"):
    d = kl_divergences(counts, metric, num_bits, unsigned, start_bin, stride, nan_policy=nan_policy)
    i = start_bin + stride * _last_argmin(d)
    return jnp.asarray(edges)[i], i


@partial(jax.jit, static_argnames=("num_bits", "unsigned", "start_bin", "stride", "nan_policy"))
def entropy_amax(counts, edges, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128,
                 stride: int = 1, nan_policy: str = "inf"):
    """TensorRT KL amax: ``(amax = edges[i*], i*)`` with the last argmin over candidates.

    nan_policy: ``"inf"`` (default) excludes candidates whose kept bins are all empty, where
    TensorRT's divergence is 0/0; ``"tensorrt"`` keeps NVIDIA's NaN, which ``argmin`` picks:
    amax = lower edge of the first non-empty bin (bit-compatible with TensorRT; module doc).
    """
    return _kl_amax(counts, edges, "entropy", num_bits, unsigned, start_bin, stride, nan_policy)


@partial(jax.jit, static_argnames=("num_bits", "unsigned", "start_bin", "stride"))
def kl_cfws_amax(counts, edges, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128,
                 stride: int = 1):
    """CFWS transformed-KL (D_T) amax: ``(edges[i*], i*)``, same candidates and tie-break as entropy."""
    return _kl_amax(counts, edges, "kl_cfws", num_bits, unsigned, start_bin, stride)


def _qerr_scores(counts, edges, kind, num_bits, unsigned, start_bin, stride):
    """Per candidate ``i`` in ``[start_bin, N)``: MSE (``kind='mse'``) or cosine at amax = centre m_i."""
    h = _prep(counts)
    e = jnp.asarray(edges).astype(h.dtype)
    n = h.shape[0]
    m = (e[:-1] + e[1:]) / 2
    qmin, qmax = int_range(num_bits, signed=not unsigned, narrow=True)
    cands = _candidates(n, start_bin, stride, n)

    def one(i):
        amax = m[i]
        s = jnp.where(amax > ZERO_AMAX, amax / qmax, 1)
        q = jnp.clip(round_values(m / s), qmin, qmax) * s
        if kind == "mse":
            return jnp.sum(h * (q - m) ** 2) / n
        num = jnp.sum(h * m * q)
        den = jnp.sqrt(jnp.sum(h * m * m)) * jnp.sqrt(jnp.sum(h * q * q))
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), -jnp.inf)

    return _map(one, cands, 4 * n), cands


def _centre_of(edges, i):
    """``(centre of bin i, i)``: the amax convention of the MSE and cosine searches."""
    e = jnp.asarray(edges)
    return (e[i] + e[i + 1]) / 2, i


@partial(jax.jit, static_argnames=("num_bits", "unsigned", "start_bin", "stride"))
def mse_errors(counts, edges, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128,
               stride: int = 1):
    """``mean_j h_j (Q(m_j; m_i) - m_j)^2`` for candidates ``i in [start_bin, N)``: ``(n_cand,)``."""
    return _qerr_scores(counts, edges, "mse", num_bits, unsigned, start_bin, stride)[0]


@partial(jax.jit, static_argnames=("num_bits", "unsigned", "start_bin", "stride"))
def mse_amax(counts, edges, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128,
             stride: int = 1):
    """pytorch-quantization MSE amax: ``(m_i*, i*)``, first argmin, amax = bin centre."""
    err, cands = _qerr_scores(counts, edges, "mse", num_bits, unsigned, start_bin, stride)
    return _centre_of(edges, cands[jnp.argmin(err)])


@partial(jax.jit, static_argnames=("num_bits", "unsigned", "start_bin", "stride"))
def cosine_scores(counts, edges, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128,
                  stride: int = 1):
    """Histogram-weighted cosine(m, Q(m)) for candidates ``i in [start_bin, N)``: ``(n_cand,)``."""
    return _qerr_scores(counts, edges, "cosine", num_bits, unsigned, start_bin, stride)[0]


@partial(jax.jit, static_argnames=("num_bits", "unsigned", "start_bin", "stride"))
def cosine_amax(counts, edges, num_bits: int = 8, unsigned: bool = False, start_bin: int = 128,
                stride: int = 1):
    """Cosine amax: ``(m_i*, i*)``, first argmax, same candidates as MSE."""
    sc, cands = _qerr_scores(counts, edges, "cosine", num_bits, unsigned, start_bin, stride)
    return _centre_of(edges, cands[jnp.argmax(sc)])


@jax.jit
def percentile_amax(counts, edges, percentile=99.99):
    """pytorch-quantization percentile: first ``idx`` with ``cdf[idx] >= p/100``; ``(edges[idx], idx)``
    (the lower edge of that bin, a library quirk). XLA's CPU division is not always correctly
    rounded (1 ulp), so a cdf within an ulp of ``p/100`` can pick the next bin; the host API
    :func:`compute_amax` therefore evaluates this O(N) rule in NumPy (exact library semantics)."""
    h = _prep(counts)
    cdf = jnp.cumsum(h) / jnp.sum(h)
    idx = jnp.argmax(cdf >= jnp.asarray(percentile, h.dtype) / 100)
    return jnp.asarray(edges)[idx], idx


def max_from_counts(counts, edges):
    """Upper edge of the last non-empty bin (an upper bound of the true max): ``(amax, index)``."""
    h = jnp.asarray(counts)
    n = h.shape[0]
    idx = jnp.where(jnp.any(h > 0), n - jnp.argmax((h > 0)[::-1]), 0)
    return jnp.asarray(edges)[idx], idx


METHODS = ("entropy", "kl_cfws", "mse", "cosine", "percentile", "max")
PRECISIONS = ("float64", "float32")


def compute_amax(hist, method: str = "entropy", *, num_bits: int = 8, unsigned: bool = False,
                 start_bin: int = 128, stride: int = 1, percentile: float = 99.99,
                 name: str | None = None, relu: bool = False, precision: str = "float64",
                 nan_policy: str = "inf") -> float:
    """Host API: amax of one tensor from a :class:`Histogram` or a ``(counts, edges)`` pair of |x|.

    relu: for a ``signed`` Histogram, use the post-ReLU distribution (ReLU fusion).
    nan_policy: ``"inf"`` (default) or ``"tensorrt"`` (``entropy`` only; see :func:`entropy_amax`:
      TensorRT's pick where its divergence is NaN, e.g. tensors almost all zero).
    precision: ``"float64"`` runs the jitted search under a local ``jax.enable_x64`` (exact parity
      with the float64 reference, whatever the global x64 setting); ``"float32"`` does not.
    Raises ``ValueError`` naming the tensor for NaN/Inf, an empty histogram or bad arguments.
    An all-zero tensor (upper edge 0) gives 0.0 for every method.
    """
    if method not in METHODS:
        raise ValueError(f"{name or 'tensor'}: unknown calibration method {method!r}; expected one of {METHODS}")
    if precision not in PRECISIONS:
        raise ValueError(f"{name or 'tensor'}: precision must be one of {PRECISIONS}, got {precision!r}")
    if nan_policy not in NAN_POLICIES or (nan_policy != "inf" and method != "entropy"):
        raise ValueError(f"{name or 'tensor'}: nan_policy must be one of {NAN_POLICIES} "
                         f"('tensorrt' only with method 'entropy'), got {nan_policy!r} for {method!r}")
    if isinstance(hist, Histogram):
        name = name or hist.name
        if hist.n_nan or hist.n_inf:
            raise ValueError(f"{name}: histogram saw {hist.n_nan} NaN and {hist.n_inf} Inf values")
        counts, edges = hist.abs_counts(relu=relu)
    else:
        counts, edges = hist
    name = name or "tensor"
    counts = np.asarray(counts)
    edges = np.asarray(edges, np.float64)
    if counts.ndim != 1 or edges.shape != (counts.shape[0] + 1,):
        raise ValueError(f"{name}: need counts (N,) and edges (N+1,), got {counts.shape} and {edges.shape}")
    if not np.all(np.isfinite(counts)) or not np.all(np.isfinite(edges)):
        raise ValueError(f"{name}: histogram counts/edges contain NaN or Inf")
    if counts.sum() <= 0:
        raise ValueError(f"{name}: empty histogram (no values were collected)")
    if edges[-1] <= 0:
        return 0.0
    if method == "max" and isinstance(hist, Histogram):
        return float(max(hist.vmax, 0.0)) if (relu or hist.mode == "relu") else float(hist.amax)
    n = counts.shape[0]
    if method in ("entropy", "kl_cfws") and not 1 <= start_bin <= n:
        raise ValueError(f"{name}: start_bin={start_bin} outside [1, {n}] for a {n}-bin histogram")
    if method in ("mse", "cosine") and not 0 <= start_bin < n:
        raise ValueError(f"{name}: start_bin={start_bin} outside [0, {n}) for a {n}-bin histogram")
    if method == "percentile" and not 0 < percentile <= 100:
        raise ValueError(f"{name}: percentile must be in (0, 100], got {percentile}")
    dt = np.float64 if precision == "float64" else np.float32
    kw = dict(num_bits=int(num_bits), unsigned=bool(unsigned), start_bin=int(start_bin), stride=int(stride))
    with jax.enable_x64(precision == "float64"):
        c, e = jnp.asarray(counts.astype(dt)), jnp.asarray(edges.astype(dt))
        if method == "entropy":
            amax, _ = entropy_amax(c, e, nan_policy=nan_policy, **kw)
        elif method == "kl_cfws":
            amax, _ = kl_cfws_amax(c, e, **kw)
        elif method == "mse":
            amax, _ = mse_amax(c, e, **kw)
        elif method == "cosine":
            amax, _ = cosine_amax(c, e, **kw)
        elif method == "percentile":
            cdf = np.cumsum(counts.astype(np.float64)) / counts.astype(np.float64).sum()
            amax = edges[int(np.argmax(cdf >= percentile / 100))]
        else:
            amax, _ = max_from_counts(c, e)
        return float(amax)
