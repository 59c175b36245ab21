"""Benchmark 3 of issue 12: inference throughput of one network in PyTorch eager and in JAX
(float, fake-quant, integer), as images/s and ratios measured in one run.

The network is timm's ``repvgg_a0`` (by default) with timm's random init, fused with timm's
``reparameterize_model``; PyTorch runs that fused model eagerly (NCHW, ``torch.no_grad``, 2
threads on CPU unless ``--torch-threads``; on a CUDA machine the model runs on the GPU). The
same weights are converted to Flax deploy variables (``converters.convert``) for:

* JAX float: ``jax.jit(model.apply)`` on the deploy model (NHWC, HWIO);
* JAX fake-quant: ``cfws_jax.ptq.quantized_apply_fn(quantize(..., cfws_kl))``, calibrated on
  ``--calib-images`` random images;
* JAX integer: ``cfws_jax.ptq.integer_runtime.integer_apply_fn`` of the same quantized model.

Every variant is checked (logits of JAX float within float32 noise of PyTorch), warmed up
(compiles excluded), then timed in interleaved rounds (one call of each variant per round, so
load changes from other work hit all of them alike); the median over rounds is reported.
Goals: fake-quant >= 0.9x JAX float; JAX float >= 1.0x PyTorch eager.

``--per-conv`` adds a profile of every distinct conv geometry alone (where the time goes);
``--one-core`` pins everything to one core and reports process CPU seconds, a per-core
comparison that stays meaningful when other work shares the CPU (2-thread wall times do not:
PyTorch's OpenMP threads degrade badly when the cores are oversubscribed).

    python benchmarks/bench_throughput.py [--quick] [--arch repvgg_a0] [--size 224] [--batch 32]
        [--rounds 5] [--torch-threads 2] [--no-integer] [--channels-last] [--per-conv] [--one-core]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from cfws_jax.models import create_model  # noqa: E402
from cfws_jax.ptq import get_preset, quantize, quantized_apply_fn  # noqa: E402
from cfws_jax.ptq.integer_runtime import integer_apply_fn  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="repvgg_a0", help="timm name of a RepVGG / MobileOne model")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    ap.add_argument("--calib-images", type=int, default=8)
    ap.add_argument("--preset", default="cfws_kl")
    ap.add_argument("--torch-threads", type=int, default=2, help="PyTorch CPU threads (0: leave as is)")
    ap.add_argument("--torch-device", default=None, help="cpu or cuda (default: cuda when JAX runs on a GPU)")
    ap.add_argument("--channels-last", action="store_true", help="also time PyTorch with channels_last memory")
    ap.add_argument("--no-integer", action="store_true", help="skip the integer path")
    ap.add_argument("--per-conv", action="store_true",
                    help="also time every distinct conv geometry of the network alone: JAX conv2d + bias + act "
                    "(cfws_jax.models.layers) vs torch F.conv2d + bias + act, NCHW and channels_last")
    ap.add_argument("--one-core", action="store_true",
                    help="pin the process to one core (PyTorch 1 thread, XLA's pools sized to it) and report "
                    "process CPU seconds instead of wall time: per-core efficiency, robust to other work on a "
                    "shared machine (not the 2-thread figure of the goal)")
    ap.add_argument("--quick", action="store_true", help="batch 8, 3 rounds")
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.rounds = 8, 3
    if a.one_core:  # before JAX creates its CPU client and thread pools
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        a.torch_threads = 1
        _common.timed = _common.cpu_timed
    import torch

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    tdev = a.torch_device or ("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")
    _common.print_machine()
    print(f"model {a.arch} (timm random init, reparameterized) at {a.size}x{a.size}, batch {a.batch}; "
          f"PyTorch eager on {tdev}; JAX on {jax.devices()[0]}"
          + ("; ONE CORE, times are process CPU seconds" if a.one_core else "; times are wall seconds"), flush=True)

    tm, variables, arch = _common.timm_deploy(a.arch)
    tm = tm.to(tdev)
    model = create_model(arch, deploy=True)
    params = jax.device_put(variables)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.batch, a.size, a.size, 3)).astype(np.float32)
    xd = jnp.asarray(x)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(tdev)

    t0 = time.perf_counter()
    calib = [rng.standard_normal((a.calib_images, a.size, a.size, 3)).astype(np.float32)]
    qm = quantize(arch, variables, calib, get_preset(a.preset), progress=False)
    print(f"quantize ({a.preset}, {a.calib_images} calibration images, compiles included): "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    def sync_torch(out):
        if tdev == "cuda":
            torch.cuda.synchronize()
        return out

    def torch_fwd(inp, net=tm):
        with torch.no_grad():
            return sync_torch(net(inp))

    float_fn = jax.jit(model.apply)
    variants = {
        "pytorch eager": lambda: torch_fwd(xt),
        "jax float": lambda: float_fn(params, xd).block_until_ready(),
    }
    fq = quantized_apply_fn(qm)
    variants["jax fake-quant"] = lambda: fq(xd).block_until_ready()
    if not a.no_integer:
        ia = integer_apply_fn(qm)
        variants["jax integer"] = lambda: ia(xd).block_until_ready()
    if a.channels_last:
        import copy

        # Module.to converts in place: a copy, so that "pytorch eager" stays the contiguous model
        tm_cl = copy.deepcopy(tm).to(memory_format=torch.channels_last)
        xt_cl = xt.contiguous(memory_format=torch.channels_last)
        variants["pytorch eager channels_last"] = lambda: torch_fwd(xt_cl, tm_cl)

    # correctness + warm-up (first calls compile)
    ref = torch_fwd(xt).float().cpu().numpy()
    for name, fn in variants.items():
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        print(f"warm-up {name:28s} first call {first:6.2f} s", flush=True)
    y = np.asarray(float_fn(params, xd))
    err = float(np.abs(y - ref).max() / np.abs(ref).max())
    yq = np.asarray(fq(xd))
    agree = float(np.mean(yq.argmax(-1) == y.argmax(-1)))
    print(f"check: JAX float vs PyTorch max |diff| / max |logit| = {err:.1e}; fake-quant top-1 agreement "
          f"with float on this batch {agree:.2f} (random weights, random images)", flush=True)
    if "jax integer" in variants:
        yi = np.asarray(ia(xd))
        print(f"check: integer top-1 agreement with fake-quant {float(np.mean(yi.argmax(-1) == yq.argmax(-1))):.2f}",
              flush=True)

    times = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, fn in variants.items():
            times[name].append(_common.timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'variant':30s} {'median s':>9s} {'images/s':>9s}   (min..max s over {a.rounds} rounds)")
    for k, v in med.items():
        print(f"{k:30s} {v:9.3f} {a.batch / v:9.1f}   ({min(times[k]):.3f}..{max(times[k]):.3f})")
    f, t = med["jax float"], med["pytorch eager"]
    print(f"\nratio JAX float / PyTorch eager:   {t / f:.2f}x  (goal >= 1.0)")
    print(f"ratio fake-quant / JAX float:      {f / med['jax fake-quant']:.2f}x  (goal >= 0.9)")
    if "jax integer" in med:
        print(f"ratio integer / JAX float:         {f / med['jax integer']:.2f}x")
    if "pytorch eager channels_last" in med:
        print(f"ratio JAX float / PyTorch channels_last: {med['pytorch eager channels_last'] / f:.2f}x")
    if a.per_conv:
        per_conv(model, params, a, tdev)
    print(_common.load_line())


def per_conv(model, params, a, tdev):
    """Per conv geometry: JAX (the library's conv2d, NHWC/HWIO) vs torch (NCHW, channels_last),
    interleaved rounds, median; weighted by how many layers of the network have that geometry."""
    import torch
    import torch.nn.functional as F

    from cfws_jax.models.layers import activation, conv2d
    from cfws_jax.ptq.graph import discover_layers

    geoms: dict = {}
    for info in discover_layers(model, params, (1, a.size, a.size, 3)):
        if info.kind != "conv":
            continue
        key = (info.in_shape[1:], info.kernel_shape, info.strides, info.padding, info.groups, info.act)
        geoms[key] = geoms.get(key, 0) + 1
    rng = np.random.default_rng(1)
    print(f"\nper conv geometry (batch {a.batch}; ms per call, median of {a.rounds}; 'share' = layers x time / "
          f"sum over the network)")
    print(f"{'input HxWxC':>14s} {'kernel':>14s} {'s':>2s} {'g':>4s} {'n':>3s} {'JAX':>8s} {'torch':>8s} "
          f"{'torch_cl':>8s} {'JAX/torch':>9s} {'share JAX':>9s}")
    rows = []
    for (hwc, ks, st, pad, g, act), n in geoms.items():
        x = rng.standard_normal((a.batch, *hwc)).astype(np.float32)
        w = (rng.standard_normal(ks) / np.sqrt(np.prod(ks[:-1]))).astype(np.float32)
        b = rng.standard_normal(ks[-1]).astype(np.float32)
        jf = jax.jit(lambda x, w, b, st=st, pad=pad, g=g, act=act: activation(conv2d(x, w, b, st, pad, g), act))
        xd, wd, bd = jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(tdev)
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).to(tdev)
        bt = torch.from_numpy(b).to(tdev)
        xl = xt.contiguous(memory_format=torch.channels_last)
        tact = {"relu": torch.relu, "sigmoid": torch.sigmoid, "silu": F.silu, None: lambda t: t}[act]

        def tconv(inp):
            with torch.no_grad():
                out = tact(F.conv2d(inp, wt, bt, st, pad, 1, g))
                if tdev == "cuda":
                    torch.cuda.synchronize()
                return out

        fns = {"jax": lambda: jf(xd, wd, bd).block_until_ready(), "torch": lambda: tconv(xt),
               "torch_cl": lambda: tconv(xl)}
        for f in fns.values():
            f()
        tms = {k: [] for k in fns}
        for _ in range(a.rounds):
            for k, f in fns.items():
                tms[k].append(_common.timed(f))
        rows.append((hwc, ks, st, g, n, {k: statistics.median(v) for k, v in tms.items()}))
    total = {k: sum(r[4] * r[5][k] for r in rows) for k in ("jax", "torch", "torch_cl")}
    for hwc, ks, st, g, n, m in rows:
        print(f"{'x'.join(map(str, hwc)):>14s} {'x'.join(map(str, ks)):>14s} {st:2d} {g:4d} {n:3d} "
              f"{m['jax'] * 1e3:8.2f} {m['torch'] * 1e3:8.2f} {m['torch_cl'] * 1e3:8.2f} "
              f"{m['torch'] / m['jax']:8.2f}x {100 * n * m['jax'] / total['jax']:8.1f}%")
    print(f"{'sum over the network':>44s} {total['jax'] * 1e3:8.1f} {total['torch'] * 1e3:8.1f} "
          f"{total['torch_cl'] * 1e3:8.1f} {total['torch'] / total['jax']:8.2f}x")


if __name__ == "__main__":
    main()
