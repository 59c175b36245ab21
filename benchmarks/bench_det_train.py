"""Images/s of the YOLOv6 detector train step (:func:`cfws_jax.train.step.make_train_step`) on
this machine, per canvas x batch x conv lowering (unrolled im2col/matmul vs the conv op).

    python benchmarks/bench_det_train.py --data ../shared/data/cifar10_jpeg_yoongikim.npz \
        --configs 128x32:unrolled 160x32:unrolled 160x32:conv [--steps 3] [--arch yolov6n_v3]

Prints one JSON line per config: compile seconds (first step), median step seconds over
``--steps`` further steps, images/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from cfws_jax.data.scenes import SceneConfig, load_cifar_split, scene_batch
from cfws_jax.models import create_model
from cfws_jax.train.optim import make_optimizer
from cfws_jax.train.step import init_state, make_train_step


def bench(model, x, y, canvas: int, batch: int, unrolled: bool, steps: int) -> dict:
    tx = make_optimizer()
    state = init_state(model, jax.random.PRNGKey(0), canvas, tx)
    step = make_train_step(model, tx, unrolled=unrolled)
    cfg = SceneConfig(canvas=canvas)
    batches = [scene_batch(x, y, np.arange(k * batch, (k + 1) * batch), split="train", seed=0, cfg=cfg)
               for k in range(steps + 1)]
    times = []
    for b in batches:
        t = time.time()
        state, m = step(state, b["images"], b["boxes"], b["classes"], b["mask"], 0.01)
        jax.block_until_ready(m["loss"])
        times.append(time.time() - t)
    med = float(np.median(times[1:]))
    return {"canvas": canvas, "batch": batch, "lowering": "unrolled" if unrolled else "conv",
            "compile_s": round(times[0] - med, 1), "step_s": round(med, 3), "images_per_s": round(batch / med, 2),
            "device": str(jax.devices()[0])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--arch", default="yolov6n_v3")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--configs", nargs="+", default=["160x32:unrolled", "160x32:conv"])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    x, y = load_cifar_split(args.data, "train")
    model = create_model(args.arch, deploy=False, num_classes=args.num_classes)
    for c in args.configs:
        size, low = c.split(":")
        canvas, batch = (int(v) for v in size.split("x"))
        print(json.dumps(bench(model, x, y, canvas, batch, low == "unrolled", args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
