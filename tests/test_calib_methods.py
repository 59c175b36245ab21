"""percentile / mse / cosine / max amax and the compute_amax host API, against NumPy loops."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax import calib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _reference_entropy as ref  # noqa: E402


def _cases():
    rng = np.random.default_rng(11)
    out = {}
    for name, v in (("gauss", np.abs(rng.standard_normal(50_000))),
                    ("relu_laplace", np.maximum(rng.laplace(size=50_000), 0)),
                    ("heavy", np.abs(rng.standard_t(2, size=50_000)))):
        h, e = np.histogram(v, bins=512, range=(0, v.max()))
        out[name] = (h, e)
    return out


CASES = _cases()


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_mse_and_cosine_match_reference(name, unsigned):
    h, e = CASES[name]
    kw = dict(num_bits=8, unsigned=unsigned, start_bin=64, stride=2)
    with jax.enable_x64(True):
        c, ej = jnp.asarray(h, jnp.float64), jnp.asarray(e)
        for kind, scores, pick in (("mse", calib.mse_errors, calib.mse_amax),
                                   ("cosine", calib.cosine_scores, calib.cosine_amax)):
            cands, r = ref.qerr_scores(h, e, kind, **kw)
            s = np.asarray(scores(c, ej, **kw))
            np.testing.assert_allclose(s, r, rtol=1e-10, err_msg=f"{name}/{kind}")
            k = int(np.argmin(r)) if kind == "mse" else int(np.argmax(r))  # first arg-best
            amax, i = pick(c, ej, **kw)
            assert int(i) == cands[k], (name, kind)
            assert float(amax) == (e[cands[k]] + e[cands[k] + 1]) / 2
    # float32 default path: a neighbour at most
    amax32, i32 = calib.mse_amax(jnp.asarray(h, jnp.float32), jnp.asarray(e, jnp.float32), **kw)
    cands, r = ref.qerr_scores(h, e, "mse", **kw)
    assert r[list(cands).index(int(i32))] <= r.min() * (1 + 1e-5)


@pytest.mark.parametrize("p", [99.9, 99.99, 99.999, 50.0, 100.0])
def test_percentile_matches_reference(p):
    for name, (h, e) in CASES.items():
        a_ref, i_ref = ref.percentile_amax(h, e, p)
        assert calib.compute_amax((h, e), "percentile", percentile=p) == a_ref  # exact (NumPy)
        with jax.enable_x64(True):  # jitted: XLA division may be 1 ulp off at the threshold
            a, i = calib.percentile_amax(jnp.asarray(h, jnp.float64), jnp.asarray(e), p)
        cdf = np.cumsum(h) / h.sum()
        if int(i) != i_ref:
            near = [k for k in (int(i), i_ref) if abs(cdf[k] - p / 100) <= 4e-16]
            assert abs(int(i) - i_ref) == 1 and near, (name, p, int(i), i_ref)
        assert float(a) == e[int(i)]


def test_compute_amax_dispatch_and_histogram_input():
    rng = np.random.default_rng(4)
    x = rng.laplace(size=(16, 8, 8, 4)).astype(np.float32)
    st = jax.jit(calib.update)(calib.init(512, "signed", "grow"), x)
    hist = calib.finalize(st, "blk/out")
    c, e = hist.abs_counts()
    assert calib.compute_amax(hist, "max") == pytest.approx(float(np.abs(x).max()))
    assert calib.compute_amax(hist, "max", relu=True) == pytest.approx(float(x.max()))
    assert calib.compute_amax((c, e), "max") == e[np.nonzero(c)[0][-1] + 1]
    for m in ("entropy", "kl_cfws"):
        assert calib.compute_amax(hist, m) == ref.kl_amax(c, e, m)[0]
    cr, er = hist.abs_counts(relu=True)
    assert calib.compute_amax(hist, "entropy", relu=True, unsigned=True) == \
        ref.kl_amax(cr, er, "entropy", unsigned=True)[0]
    cands, r = ref.qerr_scores(c, e, "cosine")
    k = int(np.argmax(r))
    assert calib.compute_amax(hist, "cosine") == (e[cands[k]] + e[cands[k] + 1]) / 2
    # float32 precision: close to the float64 answer
    a64 = calib.compute_amax(hist, "entropy")
    assert calib.compute_amax(hist, "entropy", precision="float32") == pytest.approx(a64, rel=0.02)
    assert not jax.config.jax_enable_x64  # the local x64 context did not leak


def test_compute_amax_errors_name_the_tensor():
    h = np.zeros(256, np.int64)
    e = np.linspace(0, 1, 257)
    with pytest.raises(ValueError, match="enc/conv3: empty histogram"):
        calib.compute_amax((h, e), "entropy", name="enc/conv3")
    h[5] = 3
    with pytest.raises(ValueError, match="enc/conv3: start_bin=300"):
        calib.compute_amax((h, e), "entropy", start_bin=300, name="enc/conv3")
    with pytest.raises(ValueError, match="unknown calibration method"):
        calib.compute_amax((h, e), "kl", name="enc/conv3")
    with pytest.raises(ValueError, match="x: need counts"):
        calib.compute_amax((h, e[:-1]), name="x")
    bad = calib.Histogram(counts=h, edges=e, mode="abs", name="b/n", amax=1.0, vmin=0.0, vmax=1.0,
                          n_seen=3, n_nan=1, n_inf=0, n_clipped=0, n_coarsened=0)
    with pytest.raises(ValueError, match="b/n: histogram saw 1 NaN"):
        calib.compute_amax(bad, "percentile")


def test_one_hot_extremes():
    """One spike: KL keeps everything (last of the tied zero divergences); percentile gives the
    spike's lower edge; max gives the spike's upper edge."""
    h = np.zeros(512, np.int64)
    h[300] = 1000
    e = np.linspace(0, 2, 513)
    assert calib.compute_amax((h, e), "entropy") == e[512] == ref.kl_amax(h, e)[0]
    assert calib.compute_amax((h, e), "percentile") == e[300]
    assert calib.compute_amax((h, e), "max") == e[301]
    assert math.isfinite(calib.compute_amax((h, e), "mse"))
