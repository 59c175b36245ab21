"""Benchmark 1 of issue 12: the jitted KL amax searches against the NumPy reference loop, per
layer, on every activation point of whole networks.

For each network (default RepVGG-A0 and MobileOne-S0: timm models with timm's random init,
fused with ``reparameterize_model`` and converted to Flax deploy variables), the float network
runs over a few random images with the parallel calibration's ``collect="all"`` forward
(:func:`cfws_jax.ptq.runtime.jitted_forward`; two passes: maxima, then fixed-range 2048-bin
histograms with exact integer counts) and gives one histogram per activation point of the
``cfws_kl`` plan. On every histogram, each method (``entropy`` = TensorRT KL, ``kl_cfws`` =
the paper's D_T) runs as the NumPy reference (``benchmarks/_reference_entropy.py``, float64,
one candidate at a time) and as the jitted search (``cfws_jax.calib.entropy_amax`` /
``kl_cfws_amax`` in float64, what ``calib.compute_amax`` runs; compiled once per histogram
length, median of ``--repeats`` calls). Prints per point: the bin each picks, whether they agree,
both times and the ratio; then totals per network and overall.

    python benchmarks/bench_entropy_network.py [--quick] [--archs repvgg_a0,mobileone_s0]
        [--methods entropy,kl_cfws] [--size 224] [--images 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _reference_entropy as ref  # noqa: E402

from cfws_jax import calib  # noqa: E402
from cfws_jax.models import create_model  # noqa: E402
from cfws_jax.ptq import get_preset  # noqa: E402
from cfws_jax.ptq.graph import discover_layers  # noqa: E402
from cfws_jax.ptq.runtime import build_plan, jitted_forward  # noqa: E402

JITTED = {"entropy": calib.entropy_amax, "kl_cfws": calib.kl_cfws_amax}


def network_histograms(arch: str, size: int, images: int, num_bins: int = 2048):
    """``(points, [(counts int64 (N,), edges float64 (N+1,))])`` of every point of the cfws_kl
    plan of ``arch`` (random timm weights), over ``images`` random images in one batch."""
    _, variables, arch = _common.timm_deploy(arch)
    model = create_model(arch, deploy=True)
    params = variables["params"]
    layers = discover_layers(model, {"params": params}, (1, size, size, 3))
    cfg = get_preset("cfws_kl", num_bins=num_bins)
    plan = build_plan(layers, cfg)
    weights = {lp.info.name: _layer_params(params, lp.info.name) for lp in plan.layers}
    x = jnp.asarray(np.random.default_rng(0).uniform(-2, 2, (images, size, size, 3)).astype(np.float32))
    P = len(plan.points)
    fwd = jitted_forward(model, plan, collect="all", num_bins=num_bins)
    off, dummy = jnp.zeros((P,), bool), jnp.ones((P,), jnp.float32)
    empty = [calib.init(num_bins, "abs", "fixed", 0.0) for _ in range(P)]
    maxes = np.asarray(fwd(weights, dummy, plan.qmax(), off, x, states=empty)["maxes"])  # pass 1: ranges
    states = [calib.init(num_bins, "abs", "fixed", float(m)) for m in maxes]
    states = fwd(weights, dummy, plan.qmax(), off, x, states=states)["states"]  # pass 2: histograms
    hists = []
    for p, s in zip(plan.points, states):
        h = calib.finalize(s, p.name)
        hists.append(h.abs_counts())
    return plan.points, hists


def _layer_params(params, name: str):
    node = params
    for part in name.split("/"):
        node = node[part]
    return {k: jnp.asarray(v, jnp.float32) for k, v in node.items() if k in ("kernel", "bias")}


def time_point(counts, edges, method: str, unsigned: bool, repeats: int):
    """(ref bin, ref seconds, jitted bin, jitted seconds median, compiled now?)."""
    t0 = time.perf_counter()
    _, i_ref = ref.kl_amax(counts, edges, metric=method, unsigned=unsigned)
    t_ref = time.perf_counter() - t0
    with jax.enable_x64(True):
        c, e = jnp.asarray(counts, jnp.float64), jnp.asarray(edges, jnp.float64)
        fn = JITTED[method]
        t0 = time.perf_counter()
        _, i = jax.block_until_ready(fn(c, e, unsigned=unsigned))  # first call (may compile)
        t_first = time.perf_counter() - t0
        t_jit = _common.median_time(lambda: jax.block_until_ready(fn(c, e, unsigned=unsigned)), repeats, 0)
    return i_ref, t_ref, int(i), t_jit, t_first


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="repvgg_a0,mobileone_s0")
    ap.add_argument("--methods", default="entropy,kl_cfws")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="jitted timings per point (median)")
    ap.add_argument("--quick", action="store_true", help="entropy only, 160x160, 2 images")
    a = ap.parse_args(argv)
    if a.quick:
        a.methods, a.size, a.images = "entropy", 160, 2
    _common.print_machine()
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        if m not in JITTED:
            raise SystemExit(f"unknown method {m!r}; expected {sorted(JITTED)}")
    print(f"{a.images} random images at {a.size}x{a.size}, 2048-bin |x| histograms (relu(x) at ReLU-fused "
          f"points), methods {methods}, float64; reference = benchmarks/_reference_entropy.py", flush=True)
    grand = {m: [0.0, 0.0, 0, 0] for m in methods}  # ref s, jit s, agree, points
    compile_s = {}
    for arch in [s for s in a.archs.split(",") if s]:
        t0 = time.perf_counter()
        points, hists = network_histograms(arch, a.size, a.images)
        print(f"\n== {arch}: {len(points)} activation points, histograms collected in "
              f"{time.perf_counter() - t0:.1f} s (conversion + compile + 2 forwards)", flush=True)
        print(f"{'point':34s} {'method':8s} {'ref bin':>7s} {'jit bin':>7s} {'same':>4s} "
              f"{'reference':>10s} {'jitted':>9s} {'ratio':>7s}")
        tot = {m: [0.0, 0.0, 0, 0] for m in methods}
        for p, (counts, edges) in zip(points, hists):
            for m in methods:
                if counts.sum() <= 0 or edges[-1] <= 0:
                    print(f"{p.name:34s} {m:8s} (all-zero tensor: amax 0, no search)")
                    continue
                i_ref, t_ref, i_jit, t_jit, t_first = time_point(counts, edges, m, p.unsigned, a.repeats)
                key = (m, len(counts), p.unsigned)
                if key not in compile_s:
                    compile_s[key] = max(t_first - t_jit, 0.0)
                same = i_ref == i_jit
                for d in (tot[m], grand[m]):
                    d[0] += t_ref
                    d[1] += t_jit
                    d[2] += int(same)
                    d[3] += 1
                print(f"{p.name:34s} {m:8s} {i_ref:7d} {i_jit:7d} {'yes' if same else 'NO':>4s} "
                      f"{t_ref * 1e3:8.1f}ms {t_jit * 1e3:7.2f}ms {t_ref / t_jit:6.1f}x", flush=True)
        for m in methods:
            r, j, ok, n = tot[m]
            if n:
                print(f"{arch} {m}: {n} points, reference {r:.2f} s, jitted {j:.3f} s -> {r / j:.1f}x; "
                      f"same bin on {ok}/{n}", flush=True)
    print()
    for m in methods:
        r, j, ok, n = grand[m]
        if n:
            print(f"TOTAL {m}: {n} points, reference {r:.2f} s ({r / n * 1e3:.1f} ms/point), jitted {j:.3f} s "
                  f"({j / n * 1e3:.2f} ms/point) -> {r / j:.1f}x faster; same bin on {ok}/{n}", flush=True)
    for (m, n, u), c in sorted(compile_s.items()):
        print(f"compile of the jitted {m} search ({n} bins, {'unsigned' if u else 'signed'}): ~{c:.2f} s (once)")
    print(_common.load_line())


if __name__ == "__main__":
    main()
