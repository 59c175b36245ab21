"""onnxruntime (CPU) throughput and accuracy of the INT8 exports against the float export and
against onnxruntime's own static quantizer, in one run (README "Export to ONNX").

Models (``--models``): ``cifar`` = the shipped CIFAR RepVGG-A0 (batch 64 at 32 x 32), ``a0_224`` =
RepVGG-A0 at 224 (batch 8, random weights, BN at its initial statistics), ``yolov6n`` = yolov6n_v3
at 640 (batch 1, random deploy-form weights). Files per model, all from :mod:`cfws_jax.export`:

* ``float``: :func:`~cfws_jax.export.float_onnx`;
* ``qdq tensorrt``: ``cfws_kl`` model, ``export_onnx(target="tensorrt")`` (explicit QDQ around float convs);
* ``qdq onnxruntime``: ``cfws_kl_ort`` model, ``export_onnx(target="onnxruntime")``;
* ``ort entropy`` / ``ort minmax``: ``onnxruntime.quantization.quantize_static`` of the float file
  (QuantFormat.QDQ, per_channel=True, CalibrationMethod.Entropy / MinMax, its default int8 types)
  on the same calibration images.

Calibration: 32 CIFAR-10 training images (cifar; ``calibration_batches``), else 32 random images
(our quantizer: parallel order for the random-weight models, 8 of the images at 640). Timing: ``--warmup`` then ``--iters`` runs, default
graph optimizations, ``--threads`` intra-op threads. Accuracy (cifar): 2,000 class-balanced CIFAR-10
test images (``subset="balanced"``, 200 per class), and the top-1 agreement of each INT8 file with
the JAX fake-quant simulation of its own model where there is one.

    python benchmarks/bench_onnx.py [--models cifar a0_224 yolov6n] [--iters 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

CIFAR = "/work/shared/data/cifar10_jpeg_yoongikim.npz"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _session(ort, proto_bytes: bytes, threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(proto_bytes, so, providers=["CPUExecutionProvider"])


def _ort_static(float_proto, calib_nchw, method: str) -> bytes:
    """onnxruntime's own QDQ quantizer (per-channel) on the float file."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib_nchw[i:i + 1]} for i in range(len(calib_nchw))])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        onnx.save(float_proto, src)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        calibrate_method=getattr(CalibrationMethod, method))
        with open(dst, "rb") as fh:
            return fh.read()


def _setup(name: str):
    """(arch, variables, size, batch, calibration NHWC float32 [32, S, S, 3])."""
    import jax

    from cfws_jax.models import create_model

    if name == "cifar":
        from cfws_jax.assets import load_shipped_model
        from cfws_jax.data import calibration_batches, open_source

        arch, v, _ = load_shipped_model("repvgg_a0_cifar")
        return arch, v, 32, 64, np.concatenate(calibration_batches(open_source(CIFAR, split="train"), 32))
    arch, size, batch = ("repvgg_a0", 224, 8) if name == "a0_224" else ("yolov6n_v3", 640, 1)
    model = create_model(arch, deploy=name != "a0_224")  # the detector straight in deploy form
    v = jax.jit(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32)))()
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(32, size, size, 3)) if name == "a0_224" else rng.uniform(0, 1, (32, size, size, 3))
    return arch, v, size, batch, calib.astype(np.float32)


def bench_model(name: str, args, ort):
    from cfws_jax.export import export_onnx, float_onnx
    from cfws_jax.ptq import get_preset, quantize, quantized_apply_fn

    arch, v, size, batch, calib = _setup(name)
    n_ours = 8 if size >= 640 else 32
    order = {} if name == "cifar" else {"calib_order": "parallel"}
    t = time.perf_counter()
    qm_trt = quantize(arch, v, [calib[:n_ours]], get_preset("cfws_kl", num_calib_images=n_ours, **order), progress=False)
    qm_ort = quantize(arch, v, [calib[:n_ours]], get_preset("cfws_kl_ort", num_calib_images=n_ours), progress=False)
    float_proto = float_onnx(arch, v, image_size=size)
    calib_nchw = np.ascontiguousarray(calib.transpose(0, 3, 1, 2))
    files = {"float": float_proto.SerializeToString(),
             "qdq tensorrt": export_onnx(qm_trt).SerializeToString(),
             "qdq onnxruntime": export_onnx(qm_ort, target="onnxruntime").SerializeToString(),
             "ort entropy": _ort_static(float_proto, calib_nchw, "Entropy"),
             "ort minmax": _ort_static(float_proto, calib_nchw, "MinMax")}
    print(f"{arch} {size}x{size}, batch {batch}, {args.iters} timed runs (setup {time.perf_counter() - t:.0f} s)",
          flush=True)
    out = "logits" if name != "yolov6n" else "outputs"
    x = np.random.default_rng(1).normal(size=(batch, 3, size, size)).astype(np.float32)
    sessions, rate = {}, {}
    for key, blob in files.items():
        s = sessions[key] = _session(ort, blob, args.threads)
        for _ in range(args.warmup):
            s.run([out], {"input": x})
        t = time.perf_counter()
        for _ in range(args.iters):
            s.run([out], {"input": x})
        dt = (time.perf_counter() - t) / args.iters
        rate[key] = batch / dt
        print(f"  {key:16s}: {rate[key]:8.1f} images/s  ({1000 * dt:8.2f} ms per batch)  "
              f"{rate[key] / rate['float']:.2f}x float", flush=True)
    if name == "cifar":
        _accuracy(sessions, {"qdq tensorrt": quantized_apply_fn(qm_trt), "qdq onnxruntime": quantized_apply_fn(qm_ort)})


def _accuracy(sessions, sims):
    from cfws_jax.data import open_source

    xs, ys = zip(*open_source(CIFAR, split="test").iter_batches(500, limit=2000, subset="balanced"))
    x, y = np.concatenate(xs), np.concatenate(ys)
    print(f"  accuracy on {len(y)} class-balanced CIFAR-10 test images ({np.bincount(y).min()} per class):")
    for key, s in sessions.items():
        pred = np.concatenate([s.run(["logits"], {"input": np.ascontiguousarray(x[i:i + 250].transpose(0, 3, 1, 2))})[0]
                               for i in range(0, len(x), 250)]).argmax(1)
        line = f"  {key:16s}: top-1 {100 * (pred == y).mean():.2f} %"
        if key in sims:
            ref = np.concatenate([np.asarray(sims[key](x[i:i + 250])) for i in range(0, len(x), 250)]).argmax(1)
            line += (f"  (JAX fake-quant {100 * (ref == y).mean():.2f} %, top-1 agreement with it "
                     f"{100 * (ref == pred).mean():.2f} %)")
        print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cifar", "a0_224", "yolov6n"], choices=("cifar", "a0_224", "yolov6n"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = ap.parse_args()

    import jax
    import onnxruntime as ort

    print(f"machine: {platform.platform()} | {_cpu_name()} | {os.cpu_count()} CPUs | onnxruntime "
          f"{ort.__version__} ({ort.get_device()}) | jax {jax.__version__} | {args.threads} intra-op threads", flush=True)
    for name in args.models:
        bench_model(name, args, ort)


if __name__ == "__main__":
    main()
