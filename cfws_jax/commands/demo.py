"""``cfws-jax demo``: float vs INT8 presets on a model shipped with the package.

    cfws-jax demo [--data SRC] [--limit N | --full] [--seed S] [--devices N] [--json]
    cfws-jax demo --task detect --data CIFAR.npz [--eval-scenes N] [--num-calib N] [--seed S] [--full]
                  [--params shipped:yolov6n_scenes | FILE.npz] [--json]

``--task classify`` (default): the CIFAR-10 RepVGG-A0 (:mod:`cfws_jax.demo`). ``--task detect``:
the YOLOv6n trained on synthetic CIFAR-10 scenes, mAP on held-out scenes (:mod:`cfws_jax.demo_detect`);
there ``--full`` adds the learned-rounding preset ``cfws_kl_recon``. ``--json`` output includes
``"devices"`` (the device list); the device line goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("demo", help="compare float, plain PTQ and CFWS on a shipped model "
                                     "(CIFAR-10 RepVGG-A0; --task detect: YOLOv6n on synthetic CIFAR-10 scenes)")
    p.add_argument("--task", choices=("classify", "detect"), default="classify",
                   help="classify: the CIFAR-10 RepVGG-A0 (default); detect: the YOLOv6n on synthetic scenes")
    p.add_argument("--data", metavar="SRC", default=None,
                   help="CIFAR-10 .npz (x_train/y_train/x_test/y_test) or image folder; default: tfds:cifar10 "
                        "(detect: the .npz is required)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--limit", type=int, default=None,
                   help="classify: evaluate N test images, stratified by class (default 1000: 100 per class)")
    g.add_argument("--full", action="store_true",
                   help="classify: evaluate the whole test split; detect: add cfws_kl_recon (learned rounding, slow)")
    p.add_argument("--num-calib", type=int, default=None,
                   help="calibration images (classify, default 32) or training-split scenes (detect, default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--eval-scenes", type=int, default=None,
                   help="detect: held-out test-split scenes to score (default 200)")
    p.add_argument("--params", default=None, metavar="MODEL",
                   help="detect: shipped:yolov6n_scenes (default) or a flat training-form .npz with its model card "
                        "(.json of the same stem) beside it")
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    p.add_argument("--no-progress", action="store_true")
    from cfws_jax.parallel import add_devices_arg

    add_devices_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from cfws_jax.parallel import mesh_from_args

    if args.task == "detect":
        check_detect_args(args)
    else:
        for flag, value in (("--eval-scenes", args.eval_scenes), ("--params", args.params)):
            if value is not None:
                raise ValueError(f"{flag} is for --task detect")
    mesh = mesh_from_args(args)
    return (run_detect if args.task == "detect" else run_classify)(args, mesh)


def run_classify(args, mesh) -> int:
    from cfws_jax.demo import format_table, run_demo
    from cfws_jax.parallel import device_list

    limit = None if args.full else (1000 if args.limit is None else args.limit)
    num_calib = 32 if args.num_calib is None else args.num_calib
    float_top1, rows, info = run_demo(args.data, limit=limit, num_calib=num_calib,
                                      seed=args.seed, progress=not args.no_progress, mesh=mesh)
    print(format_table(float_top1, rows, info), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"float_top1": float_top1, "rows": [dataclasses.asdict(r) for r in rows], **info,
                          "devices": device_list(mesh)}))
    return 0


def check_detect_args(args) -> None:
    """One-line errors for ``--task detect`` flags, before the device line and any loading."""
    from cfws_jax.demo_detect import resolve_scene_data

    if args.limit is not None:
        raise ValueError("--limit is for --task classify; with --task detect use --eval-scenes N")
    for flag, value, low in (("--num-calib", args.num_calib, 1), ("--eval-scenes", args.eval_scenes, 1),
                             ("--seed", args.seed, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    resolve_scene_data(args.data)


def run_detect(args, mesh) -> int:
    from cfws_jax.demo_detect import (
        DEFAULT_EVAL_SCENES, DEFAULT_NUM_CALIB, DETECT_MODEL, DETECT_PRESETS, FULL_PRESETS, format_detect_table,
        run_detect_demo,
    )
    from cfws_jax.parallel import device_list

    num_calib = DEFAULT_NUM_CALIB if args.num_calib is None else args.num_calib
    eval_scenes = DEFAULT_EVAL_SCENES if args.eval_scenes is None else args.eval_scenes
    float_row, rows, info = run_detect_demo(args.data, params=args.params or DETECT_MODEL, eval_scenes=eval_scenes,
                                            presets=FULL_PRESETS if args.full else DETECT_PRESETS,
                                            num_calib=num_calib, seed=args.seed, progress=not args.no_progress,
                                            mesh=mesh)
    print(format_detect_table(float_row, rows, info), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"float": dataclasses.asdict(float_row), "rows": [dataclasses.asdict(r) for r in rows],
                          **info, "devices": device_list(mesh)}))
    return 0
