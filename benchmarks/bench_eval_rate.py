"""Benchmark 4 of issue 12: ImageNet-size evaluation rate, from a JPEG folder to top-1.

Writes a temporary ImageNet-layout folder (``val/<wnid>/*.JPEG``, ``--images`` JPEGs of about
500x375 like ImageNet's validation images, smooth random content at quality 90: about 80 KB a file,
near ImageNet's ~110 KB), then measures in one run:

* the folder source alone (:class:`cfws_jax.data.folder.FolderSource`: Pillow decode +
  ``resize_crop`` 256 -> 224 + normalization) in images/s, for several decoding thread counts;
* the model alone (jitted RepVGG-A0 deploy forward, random weights, 1000 classes) on an
  already decoded batch;
* end to end, :func:`cfws_jax.evaluate.evaluate_classifier` (what ``cfws-jax eval`` runs: each
  batch decoded while the previous one runs) on 1 device (the default backend: a GPU where
  there is one), and in a subprocess with ``JAX_PLATFORMS=cpu
  XLA_FLAGS=--xla_force_host_platform_device_count=4`` on a mesh of 4 CPU devices.

and says whether decoding is the bottleneck (the source's rate against the model's).

    python benchmarks/bench_eval_rate.py [--quick] [--images 256] [--batch 32] [--arch repvgg_a0]
        [--no-multi] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def make_jpeg_folder(root: Path, n: int, classes: int = 8, seed: int = 0) -> Path:
    """``root/val/n0000000k/ILSVRC2012_val_*.JPEG``: ``n`` JPEGs, 500x375 or 375x500 (one in
    four portrait), smooth random colour fields plus mild noise, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    val = root / "val"
    for k in range(classes):
        (val / f"n{k:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (375, 500) if i % 4 == 3 else (500, 375)
        coarse = rng.uniform(0, 255, (h // 25 + 2, w // 25 + 2, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(val / f"n{i % classes:08d}" / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)
    return root


def source_rate(folder: Path, batch: int, workers: int) -> float:
    from cfws_jax.data import open_source

    src = open_source(str(folder), split="val", num_workers=workers)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in src.iter_batches(batch))
    return n / (time.perf_counter() - t0)


def model_and_eval(folder: str, arch: str, batch: int, devices: int | None, workers: int) -> dict:
    """Model-alone and end-to-end images/s (run in this process or in the 4-device subprocess)."""
    import jax
    import jax.numpy as jnp

    from cfws_jax import parallel
    from cfws_jax.data import open_source
    from cfws_jax.evaluate import evaluate_classifier
    from cfws_jax.models import create_model

    model = create_model(arch, deploy=True)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    mesh = parallel.local_mesh(devices) if devices else None
    fn = jax.tree_util.Partial(lambda p, x: model.apply(p, x), params)
    src = open_source(folder, split="val", num_workers=workers)
    # model alone: the jitted eval step on one decoded, device-resident batch
    from cfws_jax.evaluate import make_eval_step, pad_batch

    xb, yb = src.load(np.arange(min(batch, src.num_images)))
    args = pad_batch(xb, yb, parallel.padded_size(batch, mesh) if mesh is not None else batch)
    step_fn = fn
    if mesh is not None:
        step_fn = parallel.replicate(fn, mesh)
        args = jax.device_put(args, parallel.batch_sharding(mesh))
    else:
        args = jax.device_put(args)
    step = make_eval_step(step_fn)
    jax.block_until_ready(step(*args))
    t_model = _common.median_time(lambda: jax.block_until_ready(step(*args)), 3, 0)
    b = int(args[0].shape[0])
    evaluate_classifier(fn, src, batch_size=batch, limit=b, progress=False, mesh=mesh)  # warm (compile)
    t0 = time.perf_counter()
    res = evaluate_classifier(fn, src, batch_size=batch, progress=False, mesh=mesh)
    t_e2e = time.perf_counter() - t0
    return {"devices": [str(d) for d in (mesh.devices.flat if mesh is not None else jax.devices()[:1])],
            "model_ips": b / t_model, "e2e_ips": res["images"] / t_e2e, "images": res["images"],
            "top1": res["top1"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--arch", default="repvgg_a0")
    ap.add_argument("--workers", default="1,2,4", help="decoding thread counts to time (the last: end to end)")
    ap.add_argument("--no-multi", action="store_true", help="skip the 4-device subprocess")
    ap.add_argument("--keep", metavar="DIR", help="write the JPEG folder here and keep it")
    ap.add_argument("--quick", action="store_true", help="96 images, batch 16")
    ap.add_argument("--_child", nargs=4, metavar=("FOLDER", "BATCH", "DEVICES", "WORKERS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        folder, batch, devices, workers = a._child
        out = model_and_eval(folder, a.arch, int(batch), int(devices), int(workers))
        print(json.dumps(out))
        return
    if a.quick:
        a.images, a.batch = 96, 16
    _common.print_machine(torch_too=False)
    workers = [int(w) for w in a.workers.split(",") if w]
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="cfws_eval_rate_"))
    try:
        t0 = time.perf_counter()
        make_jpeg_folder(tmp, a.images)
        files = list((tmp / "val").rglob("*.JPEG"))
        mb = sum(f.stat().st_size for f in files) / len(files) / 1e3
        print(f"wrote {len(files)} JPEGs (500x375 / 375x500, mean {mb:.0f} KB, 8 classes) to {tmp} in "
              f"{time.perf_counter() - t0:.1f} s; batch {a.batch}; model {a.arch} (random weights)", flush=True)
        rates = {}
        source_rate(tmp, a.batch, workers[0])  # warm the page cache (the files were just written)
        for w in workers:
            rates[w] = source_rate(tmp, a.batch, w)
            print(f"folder source alone (decode + resize_crop + normalize), {w} decoding thread(s): "
                  f"{rates[w]:7.1f} images/s", flush=True)
        w_e2e = workers[-1]
        import jax

        one = model_and_eval(str(tmp), a.arch, a.batch, None, w_e2e)
        rows = [(f"1 device ({jax.default_backend()})", one)]
        if not a.no_multi:
            # always on the CPU (also on a GPU machine): the forced host devices are CPU devices
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                                                   " --xla_force_host_platform_device_count=4").strip())
            r = subprocess.run([sys.executable, __file__, "--arch", a.arch, "--_child", str(tmp), str(a.batch),
                                "4", str(w_e2e)], env=env, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                print(f"multi-device subprocess failed:\n{r.stderr[-3000:]}")
            else:
                rows.append(("4 forced CPU devices", json.loads(r.stdout.strip().splitlines()[-1])))
        src_best = max(rates.values())
        print(f"\n{'run':24s} {'model alone':>12s} {'end to end':>11s} {'source alone':>13s}  images")
        for label, r in rows:
            print(f"{label:24s} {r['model_ips']:10.1f}/s {r['e2e_ips']:9.1f}/s {rates[w_e2e]:11.1f}/s  "
                  f"{r['images']}  devices {', '.join(r['devices'])}")
        for label, r in rows:
            bottleneck = "decoding" if rates[w_e2e] < r["model_ips"] else "the model"
            print(f"{label}: end to end = {r['e2e_ips'] / r['model_ips']:.2f}x the model alone, "
                  f"{r['e2e_ips'] / rates[w_e2e]:.2f}x the source alone -> bottleneck: {bottleneck} "
                  f"(source {rates[w_e2e]:.0f}/s vs model {r['model_ips']:.0f}/s)")
        print(f"decoding scales with threads: {', '.join(f'{w}: {rates[w]:.0f}/s' for w in workers)} "
              f"(best {src_best:.0f}/s on {_common.usable_cores()} cores)")
        print(_common.load_line())
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
