"""Slow, obvious NumPy references for the calibration amax searches (ALGORITHM.md §4.3-4.5).

Written from the spec, one candidate at a time, float64. Used by tests/test_calib_*.py and by
benchmarks/bench_entropy.py; not part of the library.

Divergences are summed with ``math.fsum`` (exactly rounded), so candidates whose divergences are
mathematically equal compare equal and the last-argmin tie-break is well defined. (numpy's
pairwise sum would break such ties by last-bit noise that depends on the array length.)
"""

from __future__ import annotations

import math

import numpy as np


def kl_candidate(h, i: int, nq: int):
    """Reference P and candidate Q (length i) for candidate i; h already has h[0] := h[1]."""
    P = h[:i].astype(np.float64).copy()
    P[i - 1] += h[i:].sum()
    grp = np.digitize(np.arange(i), np.linspace(0, i, nq + 1)) - 1  # == floor(nq * j / i)
    nonempty = h[:i] > 0
    S = np.bincount(grp, weights=h[:i], minlength=nq)  # raw mass per group (tail excluded)
    C = np.bincount(grp, weights=nonempty, minlength=nq)  # non-empty source bins per group
    Q = np.where(nonempty, S[grp] / np.maximum(C[grp], 1), 0.0)
    return P, Q


def entropy_div(P, Q, nan_policy="inf") -> float:
    """scipy.stats.entropy(P, Q): both normalised, natural log, +inf if P > 0 where Q == 0.
    An all-zero P or Q is 0/0: +inf with nan_policy="inf" (cfws_jax), NaN with "tensorrt"
    (what scipy, and so NVIDIA's _compute_amax_entropy, gets)."""
    if nan_policy == "tensorrt" and (P.sum() <= 0 or Q.sum() <= 0):
        return math.nan
    p = P / P.sum()
    q = Q / Q.sum() if Q.sum() > 0 else np.zeros_like(Q)
    if np.any((p > 0) & (q == 0)):
        return math.inf
    m = p > 0
    return math.fsum(p[m] * np.log(p[m] / q[m]))


def transformed_kl_div(p, q) -> float:
    """D_T of §4.4 on unnormalised p, q: (1/P) sum_{p,q != 0} p [ln(P p) - ln(Q q)]; +inf if Q = 0."""
    P, Qs = p.sum(), q.sum()
    if Qs <= 0:
        return math.inf
    m = (p != 0) & (q != 0)
    return math.fsum(p[m] * (np.log(P * p[m]) - np.log(Qs * q[m]))) / P


def kl_divergences(counts, metric="entropy", num_bits=8, unsigned=False, start_bin=128, stride=1,
                   nan_policy="inf"):
    """(candidates, divergences) of the TensorRT KL loop (or D_T for metric='kl_cfws')."""
    h = np.array(counts, dtype=np.float64)  # a copy: never edit the caller's histogram
    h[0] = h[1]
    nq = 1 << (num_bits - 1 + int(unsigned))
    cands = list(range(start_bin, len(h) + 1, stride))
    divs = []
    for i in cands:
        P, Q = kl_candidate(h, i, nq)
        if h.sum() <= 0:
            divs.append(math.nan if nan_policy == "tensorrt" else math.inf)
        elif metric == "entropy":
            divs.append(entropy_div(P, Q, nan_policy))
        else:
            divs.append(transformed_kl_div(P, Q))
    return np.array(cands), np.array(divs)


def kl_amax(counts, edges, metric="entropy", **kw):
    """(amax, i*) with the last argmin (np.argmin: a NaN counts as the minimum); amax = edges[i*]."""
    cands, d = kl_divergences(counts, metric, **kw)
    k = len(d) - 1 - int(np.argmin(d[::-1]))
    return float(edges[cands[k]]), int(cands[k])


def _fake_quant(x, amax, qmin, qmax):
    s = amax / qmax if amax > 2.0**-24 else 1.0
    return np.clip(np.round(x / s), qmin, qmax) * s


def qerr_scores(counts, edges, kind="mse", num_bits=8, unsigned=False, start_bin=128, stride=1):
    """(candidates, scores): MSE (kind='mse') or cosine at amax = bin centre m_i, i in [start, N)."""
    h = np.asarray(counts, np.float64)
    e = np.asarray(edges, np.float64)
    m = (e[:-1] + e[1:]) / 2
    qmax = 2 ** (num_bits - 1) - 1 if not unsigned else 2**num_bits - 1
    qmin = -qmax if not unsigned else 0
    cands = list(range(start_bin, len(h), stride))
    out = []
    for i in cands:
        q = _fake_quant(m, m[i], qmin, qmax)
        if kind == "mse":
            out.append(math.fsum(h * (q - m) ** 2) / len(h))
        else:
            den = math.sqrt(math.fsum(h * m * m)) * math.sqrt(math.fsum(h * q * q))
            out.append(math.fsum(h * m * q) / den if den > 0 else -math.inf)
    return np.array(cands), np.array(out)


def percentile_amax(counts, edges, percentile=99.99):
    h = np.asarray(counts, np.float64)
    cdf = np.cumsum(h) / h.sum()
    idx = int(np.nonzero(cdf >= percentile / 100)[0][0])
    return float(edges[idx]), idx
