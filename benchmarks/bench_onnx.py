"""onnxruntime (CPU) throughput and accuracy of the INT8 exports against the float export and
against onnxruntime's own static quantizer, in one run (README "Export to ONNX").

Models (``--models``): ``cifar`` = the shipped CIFAR RepVGG-A0 (batch 64 at 32 x 32), ``a0_224`` =
RepVGG-A0 at 224 (batch 8, random weights, BN at its initial statistics), ``yolov6n`` = yolov6n_v3
at 640 (batch 1, random deploy-form weights), ``s0`` = MobileOne-S0 with Apple's ImageNet weights (the
shared deploy npz; batch 8 at 224). Files per model, all from :mod:`cfws_jax.export`:

* ``float``: :func:`~cfws_jax.export.float_onnx`;
* ``qdq tensorrt``: ``cfws_kl`` model, ``export_onnx(target="tensorrt")`` (explicit QDQ around float convs);
* ``qdq onnxruntime``: ``cfws_kl_ort`` model, ``export_onnx(target="onnxruntime")``;
* ``kl_ort (no CFWS)``: ``kl_ort`` model (the same layout, plain per-channel weights), same target;
* ``ort entropy`` / ``ort minmax`` / ``ort percentile``: ``onnxruntime.quantization.quantize_static``
  of the float file (QuantFormat.QDQ, per_channel=True, CalibrationMethod.Entropy / MinMax /
  Percentile, its default types and options) on the same calibration images. Its entropy calibrator
  is built with 128 histogram bins and 128 quantized bins, which leaves one candidate range (the
  whole histogram), so that file equals the minmax one (the script says so when the bytes match);
  Percentile (2048 bins, 99.999 %) is its histogram method that does clip.

Calibration: 32 CIFAR-10 training images (cifar; ``calibration_batches``); for s0 32 views (centre
crop, whole image, both mirrored) of the first 8 COCO128 images (``bench_reconstruction._s0_images``);
else 32 random images (our quantizer: parallel order for the random-weight models, 8 of the images at 640). Timing: ``--warmup`` then ``--iters`` runs, default
graph optimizations, ``--threads`` intra-op threads. Accuracy (cifar): 2,000 class-balanced CIFAR-10
test images (``subset="balanced"``, 200 per class), and the top-1 agreement of each INT8 file with
the JAX fake-quant simulation of its own model where there is one. Accuracy (s0): on Apple's golden
input, the cosine of each file's logits to Apple's float logits and whether its top-1 class is
Apple's; on the other 120 COCO128 images (centre crops, held out from calibration) the mean cosine to
the float file's logits and the top-1 agreement with it.

    python benchmarks/bench_onnx.py [--models cifar a0_224 yolov6n s0] [--iters 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data from the repo root
CIFAR = str(SHARED / "cifar10_jpeg_yoongikim.npz")
S0 = SHARED / "mobileone_s0_deploy_awkrail.npz"
S0_CALIB_IMAGES = 8  # x 4 views = 32 calibration views


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
    if name == "s0":
        from bench_reconstruction import _s0_images
        from converters.convert import convert_state_dict

        npz = np.load(S0)
        v = convert_state_dict({k: npz[k] for k in npz.files if not k.startswith("_ref_")}, "mobileone_s0").variables
        calib, _ = _s0_images(SHARED / "coco128" / "train2017", S0_CALIB_IMAGES)
        return "mobileone_s0", v, 224, 8, calib
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
    order = {} if name in ("cifar", "s0") else {"calib_order": "parallel"}
    t = time.perf_counter()
    qm_trt = quantize(arch, v, [calib[:n_ours]], get_preset("cfws_kl", num_calib_images=n_ours, **order), progress=False)
    qm_ort = quantize(arch, v, [calib[:n_ours]], get_preset("cfws_kl_ort", num_calib_images=n_ours), progress=False)
    qm_kl = quantize(arch, v, [calib[:n_ours]], get_preset("kl_ort", num_calib_images=n_ours), progress=False)
    float_proto = float_onnx(arch, v, image_size=size)
    calib_nchw = np.ascontiguousarray(calib.transpose(0, 3, 1, 2))
    files = {"float": float_proto.SerializeToString(),
             "qdq tensorrt": export_onnx(qm_trt).SerializeToString(),
             "qdq onnxruntime": export_onnx(qm_ort, target="onnxruntime").SerializeToString(),
             "kl_ort (no CFWS)": export_onnx(qm_kl, target="onnxruntime").SerializeToString(),
             }
    for method in ("Entropy", "MinMax", "Percentile"):
        try:
            files[f"ort {method.lower()}"] = _ort_static(float_proto, calib_nchw, method)
        except Exception as e:  # onnxruntime's own calibrators fail on some graphs; say so, keep the rest
            print(f"  ort {method.lower()}: quantize_static failed: {type(e).__name__}: {str(e).splitlines()[0]}",
                  flush=True)
    if files.get("ort entropy") is not None and files.get("ort entropy") == files.get("ort minmax"):
        print("  note: onnxruntime's entropy file is byte-identical to its minmax file (quantize_static builds its "
              "entropy calibrator with 128 histogram bins and 128 quantized bins, so the only candidate range is "
              "the whole histogram)", flush=True)
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
        _accuracy(sessions, {"qdq tensorrt": quantized_apply_fn(qm_trt), "qdq onnxruntime": quantized_apply_fn(qm_ort),
                             "kl_ort (no CFWS)": quantized_apply_fn(qm_kl)})
    if name == "s0":
        _s0_accuracy(sessions)


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


def _s0_accuracy(sessions):
    from bench_reconstruction import _logit_stats, _s0_images

    npz = np.load(S0)
    golden = npz["_ref_input_apple_chw"][None].astype(np.float32)  # NCHW, ImageNet-normalized
    ref_golden = np.asarray(npz["_ref_logits"], np.float64)[None]
    _, held = _s0_images(SHARED / "coco128" / "train2017", S0_CALIB_IMAGES)
    held = np.ascontiguousarray(held.transpose(0, 3, 1, 2))

    def logits(s, x):
        return np.concatenate([s.run(["logits"], {"input": x[i:i + 8]})[0] for i in range(0, len(x), 8)])

    ref_held = logits(sessions["float"], held)
    print(f"  accuracy on Apple's golden input (cosine to Apple's float logits, top-1 = Apple's class "
          f"{int(ref_golden.argmax())}) and {len(held)} held-out COCO128 centre crops (vs the float file):")
    for key, s in sessions.items():
        g, h = _logit_stats(ref_golden, logits(s, golden)), _logit_stats(ref_held, logits(s, held))
        print(f"  {key:16s}: golden cosine {g['cosine']:.4f}, top-1 {'same' if g['agree'] == 1 else 'DIFFERENT'}; "
              f"held-out cosine {h['cosine']:.4f} (min {h['cosine_min']:.4f}), SQNR {h['sqnr']:.1f} dB, "
              f"top-1 agreement {100 * h['agree']:.1f} %", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cifar", "a0_224", "yolov6n", "s0"], choices=("cifar", "a0_224", "yolov6n", "s0"))
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
