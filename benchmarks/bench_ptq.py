"""Benchmark 2 of issue 12: PTQ end to end against one float forward over the same images.

``quantize(arch, random weights, images, cfws_kl)`` with the sequential one-pass driver (the
default) and the per-point reference driver, each timed twice: the first call includes the
compiles, the second has every compile cached. The float baseline is one jitted forward of the
deploy model over the same calibration images (one batch). Prints the machine, the times, the
compile estimates (first call minus cached call) and the ratio of cached PTQ to one forward.

    python benchmarks/bench_ptq.py [--quick] [--arch repvgg_a0] [--size 224] [--images 32]
        [--batch 32] [--preset cfws_kl] [--no-reference]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from cfws_jax.models import create_model
from cfws_jax.ptq import calibrate as C
from cfws_jax.ptq import get_preset, quantize
from cfws_jax.ptq import model as M


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out.act_amax if hasattr(out, "act_amax") else out)
    return time.perf_counter() - t, out


def _compile(first: float, cached: float) -> str:
    """Compile estimate = first call - cached call (load noise can make it meaningless)."""
    d = first - cached
    return f"{d:.2f} s" if d >= 0 else "n/a: the first call was faster, machine load noise"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="repvgg_a0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32, help="calibration batch size")
    ap.add_argument("--preset", default="cfws_kl")
    ap.add_argument("--quick", action="store_true", help="112x112, 8 images (a smoke run)")
    ap.add_argument("--no-reference", action="store_true", help="skip the slow per-point reference driver")
    ap.add_argument("--repeats", type=int, default=3, help="float forward timings (median)")
    a = ap.parse_args(argv)
    if a.quick:
        a.size, a.images, a.batch = 112, 8, 8
    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs | jax {jax.__version__} | devices {jax.devices()}", flush=True)
    print(f"model {a.arch} at {a.size}x{a.size}, {a.images} calibration images in batches of {a.batch}, "
          f"preset {a.preset}, random weights", flush=True)

    model = create_model(a.arch, deploy=True)
    shape = (1, a.size, a.size, 3)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros(shape, jnp.float32))
    params = jax.tree_util.tree_map(np.asarray, {"params": params["params"]})
    x = np.random.default_rng(0).uniform(0, 1, (a.images, a.size, a.size, 3)).astype(np.float32)
    batches = [x[i:i + a.batch] for i in range(0, a.images, a.batch)]
    cfg = get_preset(a.preset)

    fwd = jax.jit(lambda p, x: model.apply(p, x))
    xd = jnp.asarray(x)
    t_first, _ = _timed(lambda: fwd(params, xd))
    times = [_timed(lambda: fwd(params, xd))[0] for _ in range(a.repeats)]
    t_fwd = float(np.median(times))
    print(f"float forward ({a.images} images, one batch): {t_fwd:.3f} s cached (median of {a.repeats}), "
          f"compile ~{t_first - t_fwd:.2f} s", flush=True)

    drivers = [("one-pass", C.calibrate_sequential)]
    if not a.no_reference:
        drivers.append(("reference", C.calibrate_sequential_reference))
    results = {}
    orig = M.calibrate_sequential
    try:
        for name, fn in drivers:
            M.calibrate_sequential = fn
            t1, q1 = _timed(lambda: quantize(a.arch, params, batches, cfg, progress=False))
            t2, q2 = _timed(lambda: quantize(a.arch, params, batches, cfg, progress=False))
            results[name] = q2
            print(f"quantize [{name:9s}] {len(q2.plan.points)} points: {t2:.2f} s cached = {t2 / t_fwd:.2f}x one "
                  f"float forward; first call {t1:.2f} s (compile ~{_compile(t1, t2)})", flush=True)
    finally:
        M.calibrate_sequential = orig
    if "reference" in results:
        same = np.array_equal(results["one-pass"].act_amax.view(np.uint32),
                              results["reference"].act_amax.view(np.uint32))
        print(f"one-pass amax bit-identical to the reference: {same}", flush=True)


if __name__ == "__main__":
    main()
