"""Images/s of the YOLOv6 detector train step (:func:`cfws_jax.train.step.make_train_step`) on
this machine, per canvas x batch x conv lowering (unrolled im2col/matmul vs the conv op).

    python benchmarks/bench_det_train.py --data ../shared/data/cifar10_jpeg_yoongikim.npz \
        --configs 128x32:unrolled 160x32:unrolled 160x32:conv [--steps 3] [--arch yolov6n_v3]

Every config is compiled first; then the timed steps run round-robin (one step of each config
per round, ``--steps`` rounds), so a machine shared with other work slows every config alike and
the ratios stay fair. Prints one JSON line per config: compile seconds (first step), median step
seconds, images/s.
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


def prepare(model, x, y, canvas: int, batch: int, unrolled: bool, rounds: int) -> dict:
    """Compile (first step) one config; returns its state, step and batches."""
    tx = make_optimizer()
    state = init_state(model, jax.random.PRNGKey(0), canvas, tx)
    step = make_train_step(model, tx, unrolled=unrolled)
    cfg = SceneConfig(canvas=canvas)
    batches = [scene_batch(x, y, np.arange(k * batch, (k + 1) * batch), split="train", seed=0, cfg=cfg)
               for k in range(rounds + 1)]
    t = time.time()
    b = batches[0]
    state, m = step(state, b["images"], b["boxes"], b["classes"], b["mask"], 0.01)
    jax.block_until_ready(m["loss"])
    return {"canvas": canvas, "batch": batch, "lowering": "unrolled" if unrolled else "conv",
            "first_step_s": time.time() - t, "state": state, "step": step, "batches": batches[1:], "times": []}


def run_round(c: dict, k: int) -> None:
    b = c["batches"][k]
    t = time.time()
    c["state"], m = c["step"](c["state"], b["images"], b["boxes"], b["classes"], b["mask"], 0.01)
    jax.block_until_ready(m["loss"])
    c["times"].append(time.time() - t)


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
    configs = []
    for c in args.configs:
        size, low = c.split(":")
        canvas, batch = (int(v) for v in size.split("x"))
        configs.append(prepare(model, x, y, canvas, batch, low == "unrolled", args.steps))
        print(f"compiled {c} ({configs[-1]['first_step_s']:.0f} s)", file=sys.stderr, flush=True)
    for k in range(args.steps):
        for c in configs:
            run_round(c, k)
    for c in configs:
        med = float(np.median(c["times"]))
        print(json.dumps({"canvas": c["canvas"], "batch": c["batch"], "lowering": c["lowering"],
                          "first_step_s": round(c["first_step_s"], 1), "step_s": round(med, 3),
                          "images_per_s": round(c["batch"] / med, 2), "device": str(jax.devices()[0])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
