"""Benchmark: jitted TensorRT-KL (``entropy``) amax search vs the plain NumPy reference loop.

Builds realistic |x| histograms (2048 bins, collected with cfws_jax.calib from Gaussian,
Laplacian, post-ReLU and heavy-tailed activations), checks that both pick the same bin (float64,
x64 on), and prints compile time, the time per histogram of each, and their ratio, plus the
device name (run the same script on a GPU machine to time it there).

    python benchmarks/bench_entropy.py [--quick] [--repeats N]
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
import _reference_entropy as ref  # noqa: E402

from cfws_jax import calib  # noqa: E402


def histograms(n_values: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gens = {
        "gauss": lambda n: rng.standard_normal(n),
        "laplace": lambda n: rng.laplace(size=n),
        "post_relu": lambda n: np.maximum(rng.standard_normal(n) + 0.3, 0),
        "student_t3": lambda n: rng.standard_t(3, size=n),
    }
    upd = jax.jit(calib.update)
    out = {}
    for name, gen in gens.items():
        mode = "relu" if name == "post_relu" else "abs"
        st = calib.init(2048, mode, "grow")
        for _ in range(4):  # four calibration batches
            st = upd(st, gen(n_values // 4).astype(np.float32))
        h = calib.finalize(st, name)
        out[name] = (h.counts[:2048], h.edges[:2049])  # growth may add bins; keep 2048 for the bench
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer values, two histograms, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    n_values = 200_000 if args.quick else 2_000_000
    repeats = args.repeats or (3 if args.quick else 20)
    hists = histograms(n_values)
    if args.quick:
        hists = dict(list(hists.items())[:2])
    print(f"device: {jax.devices()[0]} ({jax.default_backend()}), jax {jax.__version__}")
    ref_t, jit_t = [], []
    with jax.enable_x64(True):
        c0, e0 = next(iter(hists.values()))
        t0 = time.perf_counter()
        jax.block_until_ready(calib.entropy_amax(jnp.asarray(c0, jnp.float64), jnp.asarray(e0)))
        print(f"compile (first call, 2048 bins, float64): {time.perf_counter() - t0:.2f} s")
        for name, (c, e) in hists.items():
            t0 = time.perf_counter()
            a_ref, i_ref = ref.kl_amax(c, e)
            ref_t.append(time.perf_counter() - t0)
            cj, ej = jnp.asarray(c, jnp.float64), jnp.asarray(e)
            amax, i = jax.block_until_ready(calib.entropy_amax(cj, ej))
            if int(i) != i_ref or float(amax) != a_ref:
                raise SystemExit(f"MISMATCH on {name}: jitted bin {int(i)} vs reference {i_ref}")
            t0 = time.perf_counter()
            for _ in range(repeats):
                jax.block_until_ready(calib.entropy_amax(cj, ej))
            jit_t.append((time.perf_counter() - t0) / repeats)
            print(f"{name:>11}: bin {i_ref:4d} amax {a_ref:.5g}  reference {ref_t[-1] * 1e3:8.1f} ms"
                  f"  jitted {jit_t[-1] * 1e3:7.2f} ms  ratio {ref_t[-1] / jit_t[-1]:6.1f}x  (same bin)")
    tot = sum(ref_t) / sum(jit_t)
    print(f"overall: reference {np.mean(ref_t) * 1e3:.1f} ms, jitted {np.mean(jit_t) * 1e3:.2f} ms "
          f"per histogram -> {tot:.1f}x faster (target >= 50x on the 2-core CPU)")
    c, e = next(iter(hists.values()))
    t0 = time.perf_counter()
    cf, ef = jnp.asarray(c, jnp.float32), jnp.asarray(e, jnp.float32)
    jax.block_until_ready(calib.entropy_amax(cf, ef))
    tc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(calib.entropy_amax(cf, ef))
    print(f"float32 path (x64 off, 'window' algorithm): compile {tc:.2f} s, "
          f"{(time.perf_counter() - t0) / repeats * 1e3:.2f} ms per histogram")


if __name__ == "__main__":
    main()
