"""``cfws-jax demo``: float vs INT8 presets on the CIFAR-10 RepVGG-A0 shipped with the package.

    cfws-jax demo [--data SRC] [--limit N | --full] [--seed S] [--devices N] [--json]

``--json`` output includes ``"devices"`` (the device list); the device line goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("demo", help="compare float, plain PTQ and CFWS on the shipped CIFAR-10 RepVGG-A0")
    p.add_argument("--data", metavar="SRC", default=None,
                   help="CIFAR-10 .npz (x_train/y_train/x_test/y_test) or image folder; default: tfds:cifar10")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--limit", type=int, default=1000,
                   help="evaluate N test images, stratified by class (default 1000: 100 per class)")
    g.add_argument("--full", action="store_true", help="evaluate the whole test split")
    p.add_argument("--num-calib", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    p.add_argument("--no-progress", action="store_true")
    from cfws_jax.parallel import add_devices_arg

    add_devices_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from cfws_jax.demo import format_table, run_demo
    from cfws_jax.parallel import device_list, mesh_from_args

    mesh = mesh_from_args(args)
    float_top1, rows, info = run_demo(args.data, limit=None if args.full else args.limit, num_calib=args.num_calib,
                                      seed=args.seed, progress=not args.no_progress, mesh=mesh)
    print(format_table(float_top1, rows, info), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"float_top1": float_top1, "rows": [dataclasses.asdict(r) for r in rows], **info,
                          "devices": device_list(mesh)}))
    return 0
