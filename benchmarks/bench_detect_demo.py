"""Issue 21: the ``cfws-jax demo --task detect`` table over several calibration seeds.

The shipped YOLOv6n (synthetic CIFAR-10 scenes, :mod:`cfws_jax.demo_detect`) at W8A8 and W6A6
for every demo preset: mAP@.5:.95 and mAP@.5 on the same held-out test-split scenes, mean ± std
over the seeds (each seed calibrates on its own ``--num-calib`` training-split scenes), the drop
against float, each seed's value, BOPs against INT8 and the mean seconds per model. Prints the
machine lines first, then Markdown to paste into the README. Synthetic scenes, not COCO.

    python benchmarks/bench_detect_demo.py --data ../shared/data/cifar10_jpeg_yoongikim.npz \\
        [--seeds 0 1 2] [--eval-scenes 200] [--num-calib 64] [--full] [--params shipped:yolov6n_scenes]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_line, print_machine  # noqa: E402


def main(argv=None):
    from cfws_jax.demo_detect import (
        DEFAULT_EVAL_SCENES, DEFAULT_NUM_CALIB, DETECT_MODEL, DETECT_PRESETS, FULL_PRESETS, SYNTHETIC_NOTE,
        SceneExperiment, header, run_detect_demo,
    )

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="CIFAR-10 .npz")
    p.add_argument("--params", default=DETECT_MODEL)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-scenes", type=int, default=DEFAULT_EVAL_SCENES)
    p.add_argument("--num-calib", type=int, default=DEFAULT_NUM_CALIB)
    p.add_argument("--full", action="store_true", help="add cfws_kl_recon (learned rounding)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    print_machine(torch_too=False)
    print()

    t_all = time.perf_counter()
    exp = SceneExperiment.load(args.data, params=args.params, eval_scenes=args.eval_scenes,
                               progress=not args.no_progress)
    presets = FULL_PRESETS if args.full else DETECT_PRESETS
    runs = {}
    for s in args.seeds:
        t = time.perf_counter()
        runs[s] = run_detect_demo(experiment=exp, presets=presets, num_calib=args.num_calib, seed=s,
                                  progress=not args.no_progress, log=io.StringIO())
        print(f"seed {s}: {time.perf_counter() - t:.0f} s, {load_line()}", flush=True)
    floats = {(r[0].mAP, r[0].mAP50) for r in runs.values()}
    if len(floats) != 1:
        raise SystemExit(f"the float model scored differently across seeds: {floats}")
    float_row, _, info = runs[args.seeds[0]]
    print()
    print(header({**info, "seed": " / ".join(map(str, args.seeds))}))
    print()
    print("| setting | preset | mAP@.5:.95 mean ± std | mAP@.5 mean ± std | drop vs float (pts) | "
          "mAP@.5:.95 per seed | BOPs vs INT8 | seconds (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| float32 | - | {100 * float_row.mAP:.2f} | {100 * float_row.mAP50:.2f} | - | - | - | "
          f"{float_row.seconds:.0f} |")
    for k, row in enumerate(runs[args.seeds[0]][1]):
        per = [runs[s][1][k] for s in args.seeds]
        m, m50 = 100 * np.array([r.mAP for r in per]), 100 * np.array([r.mAP50 for r in per])
        print(f"| {row.setting} | {row.preset} | {m.mean():.2f} ± {m.std():.2f} | "
              f"{m50.mean():.2f} ± {m50.std():.2f} | "
              f"{m.mean() - 100 * float_row.mAP:+.2f} | {' / '.join(f'{v:.2f}' for v in m)} | "
              f"{row.bops_ratio:.3f}x | {np.mean([r.seconds for r in per]):.0f} |")
    print(f"\nmAP in % (pycocotools); std over {len(args.seeds)} calibration seeds (population std); "
          f"{SYNTHETIC_NOTE}. Whole benchmark {time.perf_counter() - t_all:.0f} s.")


if __name__ == "__main__":
    main()
