"""Histogram state: init/update/merge/finalize against plain NumPy binning, exact 64-bit counts,
growing range, modes, NaN/Inf and degenerate inputs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax import calib
from cfws_jax.calib.state import U64, u64_add, u64_to_numpy

UPD = jax.jit(calib.update)


def _np_index(v, width, n):
    """Reference bin index: min(floor(v / width), n - 1) of the exact quotient (float64 division
    of float32 operands is exact enough: the floor is never off)."""
    v = np.asarray(v, np.float32).astype(np.float64)
    return np.minimum(np.floor(v / np.float64(np.float32(width))), n - 1).astype(np.int64)


def _np_bin(v, width, n):
    """Reference binning: counts of :func:`_np_index`."""
    return np.bincount(_np_index(v, width, n), minlength=n)


def _batches(seed=0, k=4, shape=(4, 8, 8, 3), scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * scale * (1 + j)).astype(np.float32) for j in range(k)]


def test_fixed_abs_matches_numpy_and_is_split_independent():
    xs = _batches()
    amax = max(float(np.abs(x).max()) for x in xs)
    st = calib.init(256, "abs", "fixed", amax=amax)
    for x in xs:
        st = UPD(st, x)
    h = calib.finalize(st, "t")
    allv = np.abs(np.concatenate([x.ravel() for x in xs]))
    w = np.float32(amax) / np.float32(256)
    np.testing.assert_array_equal(h.counts, _np_bin(allv, w, 256))
    np.testing.assert_allclose(h.edges, np.linspace(0, np.float32(amax), 257))
    assert h.counts.dtype == np.int64 and h.edges.dtype == np.float64
    assert h.n_seen == allv.size and h.n_clipped == 0 and h.amax == pytest.approx(allv.max())
    # one big batch, or merged halves, give identical counts
    one = calib.finalize(UPD(calib.init(256, "abs", "fixed", amax=amax), np.concatenate(xs)), "t")
    a = b = calib.init(256, "abs", "fixed", amax=amax)
    for x in xs[:2]:
        a = UPD(a, x)
    for x in xs[2:]:
        b = UPD(b, x)
    merged = calib.finalize(jax.jit(calib.merge)(a, b), "t")
    np.testing.assert_array_equal(one.counts, h.counts)
    np.testing.assert_array_equal(merged.counts, h.counts)
    assert merged.n_seen == h.n_seen and merged.amax == h.amax


def test_fixed_range_clips_into_last_bin_and_counts_it():
    x = np.array([0.0, 0.5, 1.0, 3.0, -7.0], np.float32)
    h = calib.finalize(calib.update(calib.init(4, "abs", "fixed", amax=1.0), x), "t")
    np.testing.assert_array_equal(h.counts, [1, 0, 1, 3])  # 1.0 (== upper), 3 and 7 -> last bin
    assert h.n_clipped == 2 and h.amax == 7.0


def test_modes_relu_and_signed_fold():
    x = _batches(1, k=1)[0]
    amax = float(np.abs(x).max())
    ab = calib.finalize(UPD(calib.init(128, "abs", "fixed", amax=amax), x), "a")
    sg = calib.finalize(UPD(calib.init(128, "signed", "fixed", amax=amax), x), "s")
    rl = calib.finalize(UPD(calib.init(128, "relu", "fixed", amax=amax), x), "r")
    assert sg.counts.shape == (256,) and sg.edges.shape == (257,) and sg.edges[0] == -sg.edges[-1]
    c, e = sg.abs_counts()
    np.testing.assert_array_equal(c, ab.counts)
    np.testing.assert_array_equal(e, ab.edges)
    w = np.float32(amax) / np.float32(128)
    np.testing.assert_array_equal(rl.counts, _np_bin(np.maximum(x.ravel(), 0), w, 128))
    np.testing.assert_array_equal(sg.abs_counts(relu=True)[0], rl.counts)
    np.testing.assert_array_equal(sg.counts[128:], _np_bin(x[x >= 0], w, 128))
    np.testing.assert_array_equal(sg.counts[:128][::-1], _np_bin(-x[x < 0], w, 128))
    assert rl.amax == pytest.approx(max(x.max(), 0)) and sg.vmin == pytest.approx(x.min())
    c, e = calib.to_arrays(UPD(calib.init(128, "signed", "fixed", amax=amax), x), relu=True)
    np.testing.assert_array_equal(np.asarray(c), rl.counts)


def _np_grow(batches, n0):
    """TensorRT-style growing histogram, written from ALGORITHM.md §4.2 (float32 binning)."""
    counts, width, upper = None, None, None
    for x in batches:
        v = np.abs(np.asarray(x, np.float32).ravel())
        m = v.max()
        if counts is None:
            width, upper, counts = np.float32(m / np.float32(n0)), np.float32(m), np.zeros(n0, np.int64)
        elif m > upper:
            n = max(len(counts), int(math.ceil(np.float32(m / width))))
            counts = np.concatenate([counts, np.zeros(n - len(counts), np.int64)])
            upper = np.float32(np.float32(n) * width)
        counts = counts + _np_bin(v, width, len(counts))
    return counts, width


def test_grow_mode_matches_numpy_growth():
    xs = _batches(2, k=5)  # each batch wider than the one before
    st = calib.init(256, "abs", "grow", max_bins=2048)
    for x in xs:
        st = UPD(st, x)
    h = calib.finalize(st, "g")
    c_ref, w_ref = _np_grow(xs, 256)
    assert len(h.counts) > 256 and len(h.counts) == len(c_ref)
    np.testing.assert_array_equal(h.counts, c_ref)
    np.testing.assert_allclose(np.diff(h.edges), w_ref, rtol=1e-6)
    assert h.n_coarsened == 0
    # a narrower batch later does not change the range
    st2 = UPD(st, xs[0] * 0.1)
    assert int(st2.n_bins) == int(st.n_bins) and calib.finalize(st2, "g").n_seen == 2 * xs[0].size + h.n_seen - xs[0].size


def test_grow_mode_coarsens_exactly_past_capacity():
    xs = [np.linspace(0, 1, 1000, dtype=np.float32), np.linspace(0, 9, 1000, dtype=np.float32)]
    st = calib.init(64, "abs", "grow", max_bins=128)
    for x in xs:
        st = UPD(st, x)
    h = calib.finalize(st, "c")
    assert h.n_coarsened == 3 and len(h.counts) <= 128 and h.counts.sum() == 2000
    # reference: grow without limit, then merge runs of 2^3 bins (width doubled 3 times)
    c_ref, _ = _np_grow(xs, 64)
    c_ref = np.concatenate([c_ref, np.zeros(-len(c_ref) % 8, np.int64)]).reshape(-1, 8).sum(1)
    np.testing.assert_array_equal(h.counts, c_ref[: len(h.counts)])
    assert c_ref[len(h.counts):].sum() == 0


def test_grow_merge_mismatch_raises_naming_tensor():
    a = UPD(calib.init(64, "abs", "grow"), np.ones(10, np.float32))
    b = UPD(calib.init(64, "abs", "grow"), 2 * np.ones(10, np.float32))
    with pytest.raises(ValueError, match="layer/x.*different bin widths"):
        calib.finalize(calib.merge(a, b), "layer/x")
    ok = calib.finalize(calib.merge(a, calib.init(64, "abs", "grow")), "layer/x")  # one not started
    assert ok.n_seen == 10


def test_u64_counts_exact_beyond_32_bits():
    big = U64(jnp.asarray([2**32 - 5, 7], jnp.uint32), jnp.asarray([5, 0], jnp.uint32))
    s = u64_add(big, U64(jnp.asarray([10, 2**32 - 1], jnp.uint32), jnp.asarray([0, 2], jnp.uint32)))
    np.testing.assert_array_equal(u64_to_numpy(s), [6 * 2**32 + 5, 3 * 2**32 + 6])
    # a state with tens of billions in a bin keeps counting exactly through update and merge
    st = calib.init(8, "abs", "fixed", amax=1.0)
    st = st.replace(counts=U64(st.counts.lo.at[0, 3].set(2**32 - 2), st.counts.hi.at[0, 3].set(9)),
                    n_seen=U64(jnp.uint32(2**32 - 2), jnp.uint32(9)))
    st = UPD(st, np.full(5, 0.4, np.float32))  # bin 3
    st = calib.merge(st, st)
    h = calib.finalize(st, "big")
    assert h.counts[3] == 2 * (9 * 2**32 + 2**32 - 2 + 5) == 2 * (10 * 2**32 + 3)
    assert h.n_seen == h.counts.sum()


def test_nan_inf_counted_in_jit_and_reported_by_name():
    x = np.array([1.0, np.nan, np.inf, -np.inf, 0.5, np.nan], np.float32)
    st = UPD(calib.init(16, "abs", "grow"), x)
    assert int(u64_to_numpy(st.n_nan)) == 2 and int(u64_to_numpy(st.n_inf)) == 2
    assert int(u64_to_numpy(st.n_seen)) == 2 and float(st.upper) == 1.0  # not binned, range unaffected
    with pytest.raises(ValueError, match=r"stage2/conv1: .*2 NaN and 2 Inf"):
        calib.finalize(st, "stage2/conv1")


def test_empty_and_all_zero():
    with pytest.raises(ValueError, match="head/fc: empty histogram"):
        calib.finalize(calib.init(16, "abs", "grow"), "head/fc")
    with pytest.raises(ValueError, match="needs amax"):
        calib.init(16, "abs", "fixed")
    with pytest.raises(ValueError, match="z: empty histogram"):
        calib.finalize(UPD(calib.init(16, "abs", "grow", skip_zeros=True), np.zeros(9, np.float32)), "z")
    for rm, amax in (("grow", None), ("fixed", 0.0)):
        st = UPD(calib.init(2048, "relu", rm, amax=amax), np.zeros((3, 5), np.float32))
        st = UPD(st, -np.ones(4, np.float32))  # relu -> zeros
        h = calib.finalize(st, "zeros")
        assert h.counts[0] == 19 and h.counts.sum() == 19 and np.all(h.edges == 0)
        for m in calib.METHODS:
            a = calib.compute_amax(h, m, name="zeros")
            assert a == 0.0 and not math.isnan(a)
        c, e = calib.to_arrays(st) if rm == "fixed" else (h.counts, h.edges)
        amax, _ = calib.entropy_amax(jnp.asarray(c, jnp.float32), jnp.asarray(e, jnp.float32))
        assert float(amax) == 0.0


def test_max_abs_and_running_amax():
    x = np.array([[-3.0, 2.0], [np.nan, 1.0]], np.float32)
    assert float(calib.max_abs(x)) == 3.0 and float(calib.max_abs(x, "relu")) == 2.0
    st = UPD(calib.init(16, "abs", "grow"), x)
    assert float(calib.running_amax(st)) == 3.0
    st_r = UPD(calib.init(16, "relu", "grow"), x)
    assert float(calib.running_amax(st_r)) == 2.0
    assert float(jax.jit(calib.max_abs)(jnp.zeros(3))) == 0.0


def test_skip_zeros_and_state_is_pytree():
    x = np.array([0.0, 0.0, 1.0, 0.25], np.float32)
    st = UPD(calib.init(4, "abs", "fixed", amax=1.0, skip_zeros=True), x)
    np.testing.assert_array_equal(calib.finalize(st, "s").counts, [0, 1, 0, 1])
    leaves, tree = jax.tree_util.tree_flatten(st)
    st2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert st2.mode == "abs" and st2.skip_zeros and all(isinstance(v, jax.Array) for v in leaves)


@pytest.mark.parametrize("amax,num_bins", [(3.7, 2048), (123456.7, 2048), (1.0, 1000), (0.3, 7), (1e-30, 2048)])
def test_bin_index_is_exact_at_and_one_ulp_around_every_edge(amax, num_bins):
    """Values exactly at, and one float32 ulp below / above, every edge j * width land where a
    float64 floor(v / width) puts them (XLA:CPU's float32 division alone is off at ~10% of the
    edges); with a power-of-two bin count the finalized edges bracket every value."""
    amax = np.float32(amax)
    st = calib.init(num_bins, "abs", "fixed", amax=amax)
    w = np.float32(st.width)
    e = (np.arange(num_bins + 1) * np.float64(w)).astype(np.float32)
    v = np.concatenate([e, np.nextafter(e, np.float32(np.inf)), np.nextafter(e, np.float32(0))])
    v = np.unique(v[v <= amax])
    got = np.asarray(jax.jit(calib.state.bin_index, static_argnums=2)(jnp.asarray(v), st.width, num_bins))
    np.testing.assert_array_equal(got, _np_index(v, w, num_bins))
    h = calib.finalize(UPD(st, v), "edges")
    np.testing.assert_array_equal(h.counts, _np_bin(v, w, num_bins))
    if num_bins & (num_bins - 1) == 0:
        inner = v < amax
        assert np.all(h.edges[got[inner]] <= v[inner]) and np.all(v[inner] < h.edges[got[inner] + 1])
    # grow mode bins with the same rule
    g = UPD(calib.init(num_bins, "abs", "grow"), np.concatenate([[amax], v]).astype(np.float32))
    np.testing.assert_array_equal(calib.finalize(g, "g").counts, _np_bin(np.concatenate([[amax], v]), g.width, num_bins))
