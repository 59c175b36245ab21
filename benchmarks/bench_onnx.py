"""onnxruntime (CPU) throughput of the INT8 QDQ export against the float export, in one run.

Quantizes ``--arch`` (the shipped CIFAR RepVGG-A0 by default; other registry names get random
weights) with ``--preset`` on a few calibration images, exports both ONNX models
(:func:`cfws_jax.export.export_onnx` QDQ and :func:`cfws_jax.export.float_onnx`), and times
``--iters`` onnxruntime runs of a ``--batch`` batch each (after ``--warmup`` runs), default graph
optimizations (onnxruntime fuses Q/DQ + Conv into integer kernels). Prints the machine, then one
line per model: images/s and ms per batch.

    python benchmarks/bench_onnx.py [--arch repvgg_a0_cifar] [--size N] [--batch 64] [--iters 20]
        [--threads 2] [--preset cfws_kl]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="repvgg_a0_cifar")
    ap.add_argument("--size", type=int, default=None, help="input size (default 32 for *_cifar, else 224)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--preset", default="cfws_kl")
    args = ap.parse_args()

    import onnxruntime as ort

    from cfws_jax.export import export_onnx, float_onnx
    from cfws_jax.models import create_model
    from cfws_jax.ptq import get_preset, quantize

    size = args.size or (32 if args.arch.endswith("_cifar") else 224)
    print(f"machine: {platform.platform()} | {_cpu_name()} | {os.cpu_count()} CPUs | onnxruntime "
          f"{ort.__version__} ({ort.get_device()}) | {args.threads} intra-op threads", flush=True)
    if args.arch == "repvgg_a0_cifar":
        from cfws_jax.assets import load_shipped_model

        _, variables, _ = load_shipped_model("repvgg_a0_cifar")
    else:
        import jax

        model = create_model(args.arch, deploy=False)
        variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32)))()
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(8, size, size, 3)).astype(np.float32)
    qm = quantize(args.arch, variables, [calib], get_preset(args.preset), progress=False)
    models = {"int8 qdq": export_onnx(qm), "float": float_onnx(args.arch, variables, image_size=size)}
    x = rng.normal(size=(args.batch, 3, size, size)).astype(np.float32)
    print(f"{args.arch} {size}x{size}, batch {args.batch}, {args.iters} timed runs (preset {args.preset})")
    res = {}
    for name, m in models.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(args.warmup):
            s.run(["logits"], {"input": x})
        t = time.perf_counter()
        for _ in range(args.iters):
            s.run(["logits"], {"input": x})
        dt = (time.perf_counter() - t) / args.iters
        res[name] = args.batch / dt
        print(f"  {name:9s}: {res[name]:9.1f} images/s  ({1000 * dt:.2f} ms per batch)", flush=True)
    print(f"  int8 / float throughput: {res['int8 qdq'] / res['float']:.2f}x")


if __name__ == "__main__":
    main()
