"""``cfws-jax ptq``: calibrate and quantize a converted model, write a QuantizedModel.

    cfws-jax ptq --arch ARCH --params DIR --calib-data SRC --preset NAME --out QDIR
                 [--report FILE.json|FILE.csv] [--num-calib 32] [--seed 0] [--order sequential]
                 [--w-bits 8] [--a-bits 8] [--act-method M] [--float-layers PAT ...]
                 [--keep-float K]

``--keep-float K`` runs the single-layer sensitivity analysis and keeps the K most sensitive
layers in float (partial quantization). The calibration images are a seeded random subset of
``--calib-split`` (default ``train``), disjoint from an evaluation on ``val``/``test``.
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    from cfws_jax.calib import METHODS
    from cfws_jax.ptq.config import PRESETS

    p = sub.add_parser("ptq", help="calibrate and quantize a model (CFWS + histogram calibration)")
    p.add_argument("--arch", required=True, help="architecture name, e.g. repvgg_a0")
    p.add_argument("--params", required=True, metavar="DIR", help="variables written by cfws-jax convert, or shipped:NAME (e.g. shipped:repvgg_a0_cifar)")
    p.add_argument("--calib-data", required=True, metavar="SRC",
                   help="image folder, CIFAR-style .npz or tfds:NAME to draw calibration images from")
    p.add_argument("--calib-split", default="train", choices=("train", "val", "test"))
    p.add_argument("--preset", default="cfws_kl", choices=sorted(PRESETS), help="default: cfws_kl (the paper's method)")
    p.add_argument("--out", required=True, metavar="QDIR", help="output directory (orbax)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing quantized model in QDIR")
    p.add_argument("--report", metavar="FILE", help="write the per-layer report (.json or .csv)")
    p.add_argument("--num-calib", type=int, default=None, help="calibration images (default 32)")
    p.add_argument("--calib-batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the calibration subset (default 0)")
    p.add_argument("--order", choices=("sequential", "parallel"), default=None)
    p.add_argument("--w-bits", type=int, default=None)
    p.add_argument("--a-bits", type=int, default=None)
    p.add_argument("--act-method", choices=METHODS, default=None, help="override the preset's activation method")
    p.add_argument("--float-layers", nargs="*", default=None, metavar="PAT", help="glob patterns kept in float")
    p.add_argument("--keep-float", type=int, default=0, metavar="K",
                   help="keep the K most sensitive layers in float (runs the sensitivity analysis)")
    p.add_argument("--protocol", default="resize_crop", choices=("resize_crop", "direct"))
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _overrides(args) -> dict:
    o = {}
    for arg, field in (("num_calib", "num_calib_images"), ("calib_batch_size", "calib_batch_size"),
                       ("seed", "seed"), ("order", "calib_order"), ("w_bits", "w_bits"), ("a_bits", "a_bits"),
                       ("act_method", "act_method")):
        v = getattr(args, arg)
        if v is not None:
            o[field] = v
    if args.act_method is not None:
        o["other_act_method"] = None
    if args.float_layers:
        o["float_layers"] = tuple(args.float_layers)
    return o


def run(args) -> int:
    from cfws_jax.assets import load_params
    from cfws_jax.data import calibration_batches, open_source
    from cfws_jax.ptq import get_preset, quantize, save_quantized
    from cfws_jax.ptq.report import format_report, layer_report, sensitivity, write_report

    config = get_preset(args.preset, **_overrides(args))
    variables, meta = load_params(args.params)
    recorded = meta.get("arch") if isinstance(meta, dict) else None
    if recorded is not None and recorded != args.arch:
        raise ValueError(f"--arch {args.arch!r} disagrees with {args.params}, which records arch {recorded!r}")
    src = open_source(args.calib_data, split=args.calib_split, image_size=args.image_size, protocol=args.protocol)
    print(f"calibration data: {src.describe()}", file=sys.stderr)
    batches = calibration_batches(src, config.num_calib_images, config.calib_batch_size, config.seed)
    progress = not args.no_progress
    qm = quantize(args.arch, variables, batches, config, progress=progress)
    if args.keep_float:
        ranking = sensitivity(qm, variables, batches[0])
        keep = tuple(r["layer"] for r in ranking[: args.keep_float])
        print("most sensitive layers (kept in float): " + ", ".join(
            f"{r['layer']} ({r['logits_sqnr_db']:.1f} dB)" for r in ranking[: args.keep_float]), file=sys.stderr)
        config = config.replace(float_layers=tuple(config.float_layers) + keep)
        qm = quantize(args.arch, variables, batches, config, progress=progress)
    save_quantized(qm, args.out, overwrite=args.overwrite)
    report = layer_report(qm, variables, batches[0][:8])
    print(format_report(report))
    if args.report:
        write_report(report, args.report)
        print(f"report written to {args.report}", file=sys.stderr)
    n_cfws = sum(lp.scheme == "cfws" for lp in qm.plan.layers)
    print(f"quantized {args.arch} with preset {args.preset}: {len(qm.plan.layers)} layers "
          f"({n_cfws} CFWS), {len(qm.plan.points)} activation quantizers -> {args.out}")
    return 0
