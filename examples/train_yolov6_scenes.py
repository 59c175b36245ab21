"""Train a multi-branch YOLOv6 (v3.0 architecture) on synthetic CIFAR-10 scenes with optax.

The model trains in its training form (RepVGG branches, BatchNorm in training mode); the
objective and optimizer are :mod:`cfws_jax.train` (task-aligned assigner, VFL + GIoU (+ DFL),
SGD Nesterov 0.937, warm-up + cosine, kernel-only weight decay, weight EMA). Scenes stream from
:mod:`cfws_jax.data.scenes` (train split only); scene ``i`` of step ``s`` is
``s * batch + i``, augmented on the host by :mod:`cfws_jax.train.augment` seeded by the step, so a
run is a pure function of its arguments and resumes exactly.

    python examples/train_yolov6_scenes.py --data ../shared/data/cifar10_jpeg_yoongikim.npz \
        --canvas 160 --batch-size 32 --max-minutes 45 --out runs/yolov6n_scenes

``--max-minutes`` times the first steps and then fixes the number of steps (and with it the
cosine schedule) so that training and the evaluations end inside the budget. An epoch is
``--epoch-scenes`` scenes; after each, the EMA weights are scored on the first ``--eval-scenes``
held-out TEST-split scenes (COCO mAP@.5:.95 and mAP@.5 with pycocotools through
:mod:`cfws_jax.detection`), and at the end on ``--final-eval-scenes``. Orbax checkpoints every
``--ckpt-minutes``; rerunning the same command resumes from the latest. ``OUT/final.npz`` holds the
EMA training-form variables (``params/...``, ``batch_stats/...``, the format of
``cfws_jax/assets``); ``OUT/log.json`` the settings, per-epoch history and final scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from cfws_jax.assets import flatten_variables
from cfws_jax.data.scenes import SceneConfig, load_cifar_split, scene_batch
from cfws_jax.models import create_model, get_config
from cfws_jax.progress import Progress
from cfws_jax.train.augment import AugmentConfig, augment_batch
from cfws_jax.train.optim import OptimConfig, ema_tau_for, lr_at, make_optimizer
from cfws_jax.train.step import TrainState, init_state, make_predict, make_train_step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="CIFAR-10 npz with x_train, y_train, x_test, y_test")
    p.add_argument("--arch", default="yolov6n_v3")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--depth", type=float, default=None, help="override the arch's depth multiplier (tiny test models)")
    p.add_argument("--width", type=float, default=None, help="override the arch's width multiplier (tiny test models)")
    p.add_argument("--canvas", type=int, default=160, help="scene size in px (multiple of 32)")
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--epochs", type=int, default=None, help="epochs of --epoch-scenes (with --max-minutes: an upper bound)")
    p.add_argument("--epoch-scenes", type=int, default=4096, help="training scenes per epoch")
    p.add_argument("--steps", type=int, default=None, help="total steps (overrides --epochs)")
    p.add_argument("--max-minutes", type=float, default=None, help="fit the schedule into this wall time")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--ema-tau", type=float, default=None,
                   help="EMA ramp tau (updates); default: cfws_jax.train.optim.ema_tau_for(total steps)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--lowering", choices=("auto", "unrolled", "conv"), default="auto",
                   help="conv lowering of the train step: unrolled (im2col/matmul; fast on CPU) or the conv op")
    p.add_argument("--eval-scenes", type=int, default=250, help="held-out scenes scored after each epoch")
    p.add_argument("--final-eval-scenes", type=int, default=1000)
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out TEST-split scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--ckpt-steps", type=int, default=None, help="also checkpoint every N steps")
    p.add_argument("--stop-after", type=int, default=None, help="(testing) exit after this step, as if killed")
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- evaluation


def heldout_scenes(x_test, y_test, cfg: SceneConfig, count: int, seed: int) -> dict:
    return scene_batch(x_test, y_test, np.arange(count), split="test", seed=seed, cfg=cfg)


def evaluate_scenes(predict, variables, scenes: dict, count: int, num_classes: int, batch_size: int = 32) -> dict:
    """COCO mAP of ``predict(variables, images)`` on the first ``count`` scenes of ``scenes``
    (image id = scene index + 1, category = class + 1, as ``write_coco_scenes`` writes them)."""
    from cfws_jax.detection.coco import coco_evaluate, coco_from_dict
    from cfws_jax.detection.evaluate import _pad, detect_batch
    from cfws_jax.detection.letterbox import LetterboxInfo

    s = scenes["images"].shape[1]
    ids = (scenes["indices"][:count] + 1).tolist()
    anns = []
    for k in range(count):
        for box, c in zip(scenes["boxes"][k][scenes["mask"][k]].tolist(), scenes["classes"][k][scenes["mask"][k]].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": ids[k], "category_id": int(c) + 1,
                         "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
    coco = coco_from_dict({"images": [{"id": i, "width": s, "height": s} for i in ids], "annotations": anns,
                           "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]})
    info = LetterboxInfo(1.0, 0, 0, s, s)
    cat_map = np.arange(1, num_classes + 1, dtype=np.int64)
    results = []
    with ThreadPoolExecutor(2) as pool:
        for a in range(0, count, batch_size):
            b = min(a + batch_size, count)
            preds = np.asarray(predict(variables, _pad(scenes["images"][a:b], batch_size)))
            results += detect_batch(preds[:b - a], [info] * (b - a), ids[a:b], cat_map, pool=pool)
    res = coco_evaluate(coco, results, img_ids=ids)
    return {"mAP": res["mAP"], "mAP50": res["mAP50"], "scenes": count}


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: str, state: TrainState, meta: dict, keep: int = 2) -> None:
    """Orbax checkpoint ``step_N`` of the whole train state; ``latest.json`` points at it (written
    last, so a kill mid-save leaves the previous checkpoint in charge); older ones beyond ``keep``
    are removed."""
    import orbax.checkpoint as ocp

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step_{meta['step']}")
    ocp.PyTreeCheckpointer().save(path, jax.device_get(state._asdict()), force=True)
    tmp = os.path.join(directory, "latest.json.tmp")
    with open(tmp, "w") as f:
        json.dump({**meta, "path": path}, f)
    os.replace(tmp, os.path.join(directory, "latest.json"))
    old = sorted((d for d in os.listdir(directory) if d.startswith("step_")), key=lambda d: int(d[5:]))
    for d in old[:-keep]:
        shutil.rmtree(os.path.join(directory, d), ignore_errors=True)


def restore_checkpoint(directory: str, like: TrainState):
    latest = os.path.join(directory, "latest.json")
    if not os.path.exists(latest):
        return None
    import orbax.checkpoint as ocp

    with open(latest) as f:
        meta = json.load(f)
    tree = ocp.PyTreeCheckpointer().restore(meta["path"], item=jax.device_get(like._asdict()))
    return TrainState(**tree), meta


# --------------------------------------------------------------------------- data


class Batches:
    """Prefetches ``batch(step)`` (scenes ``step * B ...``, then augmentation) on a host thread."""

    def __init__(self, images, labels, cfg: SceneConfig, batch_size: int, seed: int, augment: bool, ahead: int = 2):
        self.images, self.labels, self.cfg, self.b, self.seed, self.augment = images, labels, cfg, batch_size, seed, augment
        self.pool = ThreadPoolExecutor(1)
        self.pending: dict = {}
        self.ahead = ahead

    def make(self, step: int) -> dict:
        batch = scene_batch(self.images, self.labels, np.arange(step * self.b, (step + 1) * self.b),
                            split="train", seed=self.seed, cfg=self.cfg)
        return augment_batch(batch, self.seed, step, AugmentConfig()) if self.augment else batch

    def get(self, step: int, last: int) -> dict:
        for s in range(step, min(step + self.ahead + 1, last)):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(self.make, s)
        fut = self.pending.pop(step, None) or self.pool.submit(self.make, step)
        for s in [s for s in self.pending if s < step]:
            self.pending.pop(s)
        return fut.result()


# --------------------------------------------------------------------------- main


def plan_steps(args, step_s: float, elapsed: float, steps_per_epoch: int) -> int:
    """Steps that fit ``--max-minutes``: train time per step plus a share of the per-epoch
    evaluation (estimated at 0.35x a train step's time per image + 5 ms NMS / scoring) and the
    final evaluation, with 5 % slack."""
    per_img_eval = 0.35 * step_s / args.batch_size + 0.005
    remaining = args.max_minutes * 60 - elapsed - args.final_eval_scenes * per_img_eval
    per_step = step_s + args.eval_scenes * per_img_eval / steps_per_epoch
    return max(1, int(0.95 * remaining / per_step))


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    cfg = SceneConfig(canvas=args.canvas, max_objects=args.max_objects)
    x_train, y_train = load_cifar_split(args.data, "train")
    x_test, y_test = load_cifar_split(args.data, "test")
    arch = get_config(args.arch)
    arch = dataclasses.replace(arch, depth=args.depth or arch.depth, width=args.width or arch.width,
                               num_classes=args.num_classes)
    model = create_model(arch, deploy=False)
    unrolled = {"auto": jax.default_backend() == "cpu", "unrolled": True, "conv": False}[args.lowering]
    steps_per_epoch = max(1, args.epoch_scenes // args.batch_size)
    if args.steps is not None:
        total = args.steps
    elif args.epochs is not None:
        total = args.epochs * steps_per_epoch
    elif args.max_minutes:
        total = 10 ** 9  # fixed by the budget after timing the first steps
    else:
        raise SystemExit("give --steps, --epochs or --max-minutes")
    # the warm-up is fixed before the budget plan (which happens inside it), so the schedule of
    # the steps already taken never changes
    warmup = args.warmup_steps if total == 10 ** 9 else min(args.warmup_steps, max(1, total // 5))
    planned = not args.max_minutes
    ckpt_dir = os.path.abspath(os.path.join(args.out, "ckpt"))

    tx = make_optimizer(OptimConfig(lr=args.lr, weight_decay=args.weight_decay))
    state = init_state(model, jax.random.PRNGKey(args.seed), args.canvas, tx)
    log = {"arch": args.arch, "num_classes": args.num_classes, "canvas": args.canvas, "batch_size": args.batch_size,
           "lr": args.lr, "weight_decay": args.weight_decay, "warmup_steps": warmup, "seed": args.seed,
           "lowering": "unrolled" if unrolled else "conv", "device": str(jax.devices()[0]),
           "augment": not args.no_augment, "scene_config": dataclasses.asdict(cfg),
           "command": " ".join(["python", "examples/train_yolov6_scenes.py"] + (sys.argv[1:] if argv is None else list(argv))),
           "history": [], "steps_log": []}
    start = 0
    resumed = restore_checkpoint(ckpt_dir, state)
    if resumed is not None:
        state, meta = resumed
        start, total, warmup, planned, log = meta["step"], meta["total"], meta["warmup"], meta["planned"], meta["log"]
        print(f"resumed from {meta['path']} at step {start}/{total}", file=sys.stderr)
    ema_tau = lambda: args.ema_tau or ema_tau_for(total)  # noqa: E731
    step_fn = make_train_step(model, tx, unrolled=unrolled)
    predict = make_predict(model)
    heldout = heldout_scenes(x_test, y_test, cfg, max(args.eval_scenes, args.final_eval_scenes), args.eval_seed)
    data = Batches(x_train, y_train, cfg, args.batch_size, args.seed, not args.no_augment)

    t_run = last_ckpt = time.time()
    step_times: list[float] = []
    plan_at = None if planned else start + min(12, max(2, warmup // 2))
    bar = None
    step = start
    while step < total:
        if bar is None:
            epoch = step // steps_per_epoch
            in_epoch = min(steps_per_epoch, total - epoch * steps_per_epoch)
            epochs = "?" if not planned else -(-total // steps_per_epoch)
            bar = Progress(total=in_epoch * args.batch_size, desc=f"epoch {epoch + 1}/{epochs}", unit="img")
            epoch_t0, epoch_steps = time.time(), 0
        batch = data.get(step, total)
        ts = time.time()
        lr = lr_at(step, total, warmup, args.lr)
        state, metrics = step_fn(state, batch["images"], batch["boxes"], batch["classes"], batch["mask"], lr,
                                 ema_tau() if planned else 2000.0)
        metrics = {k: float(v) for k, v in metrics.items()}
        step_times.append(time.time() - ts)
        step += 1
        epoch_steps += 1
        log["steps_log"].append({"step": step, "lr": round(lr, 8), **{k: round(v, 6) for k, v in metrics.items()}})
        if step % args.log_every == 0 or step == total:
            eta = (total - step) * float(np.median(step_times[-20:])) if planned else float("nan")
            bar.set_postfix(f"loss {metrics['loss']:.3f} (cls {metrics['cls']:.3f} iou {metrics['iou']:.3f} "
                            f"dfl {metrics['dfl']:.3f}) lr {lr:.4f} ETA {eta / 60:.1f} min")
        bar.update(args.batch_size)
        if plan_at is not None and step >= plan_at:
            # fix the schedule once, from the median step time after compilation
            step_s = float(np.median(step_times[1:]))
            total = max(step + 1, min(total, plan_steps(args, step_s, time.time() - t_start, steps_per_epoch)))
            plan_at, planned = None, True
            print(f"budget {args.max_minutes} min at {step_s:.2f} s/step ({args.batch_size / step_s:.1f} img/s, "
                  f"{'unrolled' if unrolled else 'conv'} lowering): training {total} steps", file=sys.stderr)
        if step % steps_per_epoch == 0 or step == total:
            bar.close()
            bar = None
            dt = time.time() - epoch_t0
            first = (step - 1) // steps_per_epoch * steps_per_epoch  # steps_log of the whole epoch (resumes too)
            rows = [r for r in log["steps_log"] if first < r["step"] <= step]
            entry = {"epoch": -(-step // steps_per_epoch), "step": step,
                     **{k: round(float(np.mean([r[k] for r in rows])), 5) for k in metrics},
                     "images_per_s": round(epoch_steps * args.batch_size / dt, 2), "seconds": round(dt, 1)}
            if step < total and args.eval_scenes:
                te = time.time()
                ev = evaluate_scenes(predict, state.ema, heldout, args.eval_scenes, args.num_classes)
                entry.update(heldout_mAP=round(ev["mAP"], 4), heldout_mAP50=round(ev["mAP50"], 4),
                             eval_scenes=args.eval_scenes, eval_seconds=round(time.time() - te, 1))
            log["history"].append(entry)
            print(json.dumps(entry), file=sys.stderr)
        due = time.time() - last_ckpt > args.ckpt_minutes * 60 or (args.ckpt_steps and step % args.ckpt_steps == 0)
        if step < total and (due or step == args.stop_after):
            save_checkpoint(ckpt_dir, state, {"step": step, "total": total, "warmup": warmup, "planned": planned,
                                              "log": log})
            last_ckpt = time.time()
        if args.stop_after is not None and step == args.stop_after and step < total:
            print(f"stopping after step {step} (--stop-after)", file=sys.stderr)
            return 3

    te = time.time()
    final = evaluate_scenes(predict, state.ema, heldout, args.final_eval_scenes, args.num_classes) \
        if args.final_eval_scenes else {}
    if final:
        final["seconds"] = round(time.time() - te, 1)
    log.update(steps=total, steps_per_epoch=steps_per_epoch, ema_tau=ema_tau(),
               train_seconds_this_session=round(te - t_run, 1), wall_seconds_this_session=round(time.time() - t_start, 1),
               final_heldout=final)
    np.savez(os.path.join(args.out, "final.npz"), **flatten_variables(jax.device_get(state.ema)))
    with open(os.path.join(args.out, "log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(json.dumps({"steps": total, "final_heldout": final}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
