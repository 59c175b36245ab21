"""Run by tests/test_parallel.py in a subprocess with XLA_FLAGS forcing 4 CPU devices: quantize
and evaluate on meshes of 1 and 4 devices (and without a mesh) and print one JSON line."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from cfws_jax import parallel  # noqa: E402
from cfws_jax.evaluate import evaluate_classifier  # noqa: E402
from cfws_jax.models import create_model  # noqa: E402
from cfws_jax.ptq import get_preset, quantize, quantized_apply_fn  # noqa: E402
from conftest import MemorySource as Source, numpy_init  # noqa: E402

HW = 16



def calibration(order: str, mesh4=None) -> dict:
    """Quantize and evaluate on one device and on 4. The 4-device run calibrates on one batch
    of 6 images (padded to 8: shards of 2 rows) and evaluates 9 images in batches of 8 (the last
    one padded); the single-device run uses batches of 2, the per-device shape of the 4-device
    run. XLA:CPU's per-row float results depend on the batch size, so only equal per-device
    shapes make every statistic comparable bit for bit. ``mesh4``: the 4-device mesh to use
    (multi-host: the global mesh); then only the 4-device run is made."""
    model = create_model("repvgg_cifar_small", deploy=True)
    params = numpy_init(model, (1, HW, HW, 3), 0)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (9, HW, HW, 3)).astype(np.float32)
    logits = np.asarray(jax.jit(model.apply)(params, x))
    y = np.where(np.arange(9) < 6, logits.argmax(-1), rng.integers(0, 10, 9)).astype(np.int32)
    config = get_preset("cfws_kl", calib_order=order)
    out = {}
    if mesh4 is not None:
        runs = (("four", mesh4, [x[:6]], 8),)
    else:
        runs = (("one", None, [x[0:2], x[2:4], x[4:6]], 2), ("four", parallel.local_mesh(4), [x[:6]], 8))
    for name, mesh, batches, eval_batch in runs:
        qm = quantize(model, params, batches, config, progress=False, mesh=mesh)
        r = {"amax": np.asarray(qm.act_amax, np.float32).view(np.uint32).tolist(),
             "int_weights": {n: {k: np.asarray(v).tolist() for k, v in sorted(q.items())
                                 if np.asarray(v).dtype.kind in "iu"} for n, q in sorted(qm.layers.items())}}
        res = evaluate_classifier(quantized_apply_fn(qm, model), Source(x, y), batch_size=eval_batch,
                                  progress=False, mesh=mesh)
        f = jax.tree_util.Partial(jax.jit(lambda p, x: model.apply(p, x)), params)
        res_f = evaluate_classifier(f, Source(x, y), batch_size=eval_batch, progress=False, mesh=mesh)
        r.update(top1=res["top1"], top5=res["top5"], images=res["images"], float_top1=res_f["top1"],
                 float_images=res_f["images"])
        out[name] = r
    return out


def engine() -> dict:
    """calib.max_abs / calib.update on a padded batch sharded over 4 devices (XLA reduces) and
    on the unpadded batch on one device: the states must be equal, counts exact."""
    from cfws_jax import calib
    from cfws_jax.calib.state import u64_to_numpy

    mesh = parallel.local_mesh(4)
    x = np.random.default_rng(3).normal(size=(5, 3, 3, 7)).astype(np.float32)
    x[1, 0, 0, 0] = 4.0  # the max, in a real row; padding rows are zeros
    xs, ms = parallel.shard_batch(x, mesh)
    upd = jax.jit(calib.update)
    one = {}
    for tag, args in (("single", (x,)), ("sharded", (xs, ms))):
        m = float(jax.jit(calib.max_abs)(*args[:1], mask=args[1] if len(args) > 1 else None))
        st = upd(calib.init(64, "abs", "fixed", m), *args)
        st = upd(st, *args)  # a second batch: counts add up
        one[tag] = {"max": m, "counts": u64_to_numpy(st.counts).tolist(),
                    "n_seen": int(u64_to_numpy(st.n_seen)), "vmin": float(st.vmin),
                    "vmax": float(st.vmax), "sharding": str(xs.sharding.spec), "padded": int(xs.shape[0])}
    return one


def detection() -> dict:
    """evaluate_detector with and without a 4-device mesh (10 images in batches of 3 -> 4)."""
    from cfws_jax.data.coco import CocoSource
    from cfws_jax.detection.evaluate import evaluate_detector
    from tests.conftest import shared_file
    from tests.test_coco_eval import COCO_IMAGES, COCO_JSON, gt_apply_fn

    src = CocoSource(shared_file(COCO_IMAGES), shared_file(COCO_JSON), image_size=320)
    fn = gt_apply_fn(src, 10)
    out = {}
    for name, mesh in (("one", None), ("four", parallel.local_mesh(4))):
        res = evaluate_detector(fn, src, batch_size=3, limit=10, progress=False, mesh=mesh)
        out[name] = {k: res[k] for k in ("mAP", "mAP50", "stats", "images", "detections", "results")}
    return out


def multihost(pid: str, port: str) -> dict:
    """Process ``pid`` of 2 (2 CPU devices each, gloo collectives): the 4-device runs on the
    global mesh spanning both processes."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    parallel.initialize_distributed(f"localhost:{port}", 2, int(pid))
    mesh = parallel.local_mesh()
    assert parallel.num_devices(mesh) == 4 and parallel.is_multi_process(mesh)
    return {order: calibration(order, mesh) for order in ("sequential", "parallel")}


def main():
    if sys.argv[1] == "multihost":
        out = multihost(*sys.argv[2:4])
        print(json.dumps({"devices": [str(d) for d in jax.devices()], "multihost": out}))
        return
    out = {"devices": [str(d) for d in jax.devices()]}
    for what in sys.argv[1:]:
        out[what] = {"engine": engine, "detection": detection}[what]() if what in ("engine", "detection") \
            else calibration(what)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
