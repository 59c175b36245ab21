"""``cfws-jax ptq``: calibrate and quantize a converted model, write a QuantizedModel.

    cfws-jax ptq --arch ARCH --params DIR --calib-data SRC --preset NAME --out QDIR
                 [--report FILE.json|FILE.csv] [--num-calib 32] [--seed 0] [--order sequential]
                 [--w-bits 8] [--a-bits 8] [--act-method M] [--float-layers PAT ...]
                 [--keep-float K] [--bias-correction] [--bias-correction-z 2] [--reconstruct] [--iters 200]
                 [--recon-batch-size 32] [--recon-loss mse|mae] [--qdrop P] [--recon-act-step] [--cle]
                 [--act-unsigned]

``--keep-float K`` runs the single-layer sensitivity analysis and keeps the K most sensitive
layers in float (partial quantization). The final model's calibration reuses what the ranking
model's calibration settled (``quantize(reuse=...)``): every point defined alike with
``--order parallel``; with ``sequential`` the points upstream of the first float layer (those
after it see another network and are calibrated again). The calibration images are a seeded random subset of
``--calib-split`` (default ``train``), disjoint from an evaluation on ``val``/``test``.

Detectors (family ``yolov6``; ``--arch yolov6s`` takes the version the params folder records):
the calibration images are letterboxed (``--image-size``, default 640; long side the official
per-model load size, :func:`cfws_jax.detection.load_size_for`), pixels ``/ 255``; ``--protocol``
is ignored; the sensitivity analysis runs on the first 8 calibration images.

Beyond the paper (issue #14): ``--preset cfws_kl_bc`` (bias correction), ``cfws_kl_recon`` /
``kl_recon`` (learned rounding, layer by layer, on 256 calibration images by default), e.g.
``cfws-jax ptq --preset cfws_kl_recon --num-calib 256 --iters 200``; ``--bias-correction`` /
``--reconstruct`` switch either on for any preset, and the ``--iters`` / ``--recon-*`` /
``--qdrop`` options tune the reconstruction (they need it on). The report then shows each
layer's output error before and after.

Issue #24: ``--preset cfws_kl_cle`` (or ``--cle`` with any preset) equalizes the fused float
weights across layers first (:mod:`cfws_jax.ptq.equalize`); the report then compares against the
equalized float network, channel for channel. ``--preset cfws_kl_u`` / ``cfws_kl_recon_u`` (or
``--act-unsigned`` with any preset) give ReLU-fused activations unsigned codes, the bit that
matters below 8 bits.
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
    p.add_argument("--calib-split", default="train", choices=("train", "val", "test"),
                   help="split of --calib-data to draw from (default train, disjoint from an evaluation on val/test)")
    p.add_argument("--preset", default="cfws_kl", choices=sorted(PRESETS), help="default: cfws_kl (the paper's method)")
    p.add_argument("--out", required=True, metavar="QDIR", help="output directory (orbax)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing quantized model in QDIR (and an existing --report file); only files "
                        "cfws-jax wrote are removed")
    p.add_argument("--report", metavar="FILE", help="write the per-layer report (.json: strict JSON, or .csv)")
    p.add_argument("--num-calib", type=int, default=None, help="calibration images (default 32)")
    p.add_argument("--calib-batch-size", type=int, default=None,
                   help="images per calibration forward pass (default 32; lower it to save memory)")
    p.add_argument("--seed", type=int, default=None, help="seed of the calibration subset (default 0)")
    p.add_argument("--order", choices=("sequential", "parallel"), default=None,
                   help="sequential (default): each quantizer calibrated on the already quantized network "
                        "upstream; parallel: all from the float network in two passes (faster)")
    p.add_argument("--w-bits", type=int, default=None, help="weight bits, 2..16 (default 8)")
    p.add_argument("--a-bits", type=int, default=None, help="activation bits, 2..16 (default 8)")
    p.add_argument("--act-method", choices=METHODS, default=None, help="override the preset's activation method")
    p.add_argument("--act-unsigned", action="store_const", const=True, default=None,
                   help="unsigned codes (0..2^b-1) at ReLU-fused activations, one more bit where values are >= 0 "
                        "(cfws_kl_u; uint8 runtimes such as onnxruntime, not TensorRT's int8)")
    p.add_argument("--float-layers", nargs="*", default=None, metavar="PAT", help="glob patterns kept in float")
    p.add_argument("--keep-float", type=int, default=0, metavar="K",
                   help="keep the K most sensitive layers in float (runs the sensitivity analysis)")
    p.add_argument("--protocol", default="resize_crop", choices=("resize_crop", "direct"),
                   help="image folders: resize_crop (short side 256 + centre crop 224) or direct (resize to 224x224)")
    p.add_argument("--image-size", type=int, default=None,
                   help="network input size (default 224 for image folders, native for .npz; detectors: the "
                        "letterbox canvas, default the model's official size: 640, P6 models 1280)")
    p.add_argument("--bias-correction", action="store_true",
                   help="after calibration, remove each layer's mean output shift per channel (cfws_kl_bc)")
    p.add_argument("--bias-correction-z", type=float, default=None, metavar="Z",
                   help="bias correction: correct a channel only where its mean shift exceeds Z standard errors "
                        "(over the calibration images; default 2, 0 = every channel)")
    p.add_argument("--cle", action="store_true",
                   help="cross-layer equalization of the fused float weights first (Nagel et al. 2019; "
                        "cfws_kl_cle); the saved layers are the equalized ones")
    p.add_argument("--reconstruct", action="store_true",
                   help="after calibration, learn each layer's weight rounding (AdaRound; cfws_kl_recon)")
    p.add_argument("--iters", type=int, default=None, help="reconstruction: Adam steps per layer or block (default 200; 2000 or more on a GPU)")
    p.add_argument("--recon-batch-size", type=int, default=None,
                   help="reconstruction: images per step (default 32)")
    p.add_argument("--recon-loss", choices=("mse", "mae"), default=None,
                   help="reconstruction: loss of the layer output (default mse)")
    p.add_argument("--qdrop", type=float, default=None, metavar="P",
                   help="reconstruction: QDrop probability in [0, 1) (default 0)")
    p.add_argument("--recon-act-step", action="store_const", const=True, default=None,
                   help="reconstruction: also learn each layer's input quantizer step (LSQ-style; "
                        "QuantConfig.recon_act_step)")
    p.add_argument("--recon-unit", choices=("block", "layer"), default=None,
                   help="reconstruction: block (default: a YOLOv6 RepBlock's layers jointly, BRECQ-style, and "
                        "each depthwise conv with the pointwise conv after it, MobileOne) or layer (every layer "
                        "alone); the same for RepVGG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from cfws_jax.parallel import add_devices_arg

    add_devices_arg(p)
    p.set_defaults(func=run)


def _overrides(args) -> dict:
    o = {}
    for arg, field in (("num_calib", "num_calib_images"), ("calib_batch_size", "calib_batch_size"),
                       ("seed", "seed"), ("order", "calib_order"), ("w_bits", "w_bits"), ("a_bits", "a_bits"),
                       ("act_method", "act_method"), ("iters", "recon_iters"),
                       ("recon_batch_size", "recon_batch_size"), ("recon_loss", "recon_loss"),
                       ("qdrop", "recon_qdrop"), ("recon_unit", "recon_unit"), ("recon_act_step", "recon_act_step"),
                       ("bias_correction_z", "bias_correction_z"), ("act_unsigned", "act_unsigned")):
        v = getattr(args, arg)
        if v is not None:
            o[field] = v
    if args.act_method is not None:
        o["other_act_method"] = None
    if args.float_layers:
        o["float_layers"] = tuple(args.float_layers)
    if args.bias_correction:
        o["bias_correction"] = True
    if args.reconstruct:
        o["reconstruct"] = True
    if getattr(args, "cle", False):
        o["cle"] = True
    return o


_RANGES = (("num_calib", "--num-calib", 1, None), ("calib_batch_size", "--calib-batch-size", 1, None),
           ("w_bits", "--w-bits", 2, 16), ("a_bits", "--a-bits", 2, 16), ("keep_float", "--keep-float", 0, None),
           ("image_size", "--image-size", 1, None), ("iters", "--iters", 0, None),
           ("recon_batch_size", "--recon-batch-size", 1, None))
_RECON_FLAGS = (("iters", "--iters"), ("recon_batch_size", "--recon-batch-size"), ("recon_loss", "--recon-loss"),
                ("qdrop", "--qdrop"), ("recon_unit", "--recon-unit"), ("recon_act_step", "--recon-act-step"))


def check_args(args) -> None:
    """ValueError naming the flag for out-of-range numbers; OutputError for --out / --report
    (validated before any work, so a bad path never costs a calibration run)."""
    import os

    from cfws_jax.io import OutputError, check_output_dir, check_output_file

    for attr, flag, lo, hi in _RANGES:
        v = getattr(args, attr, None)
        if v is not None and (v < lo or (hi is not None and v > hi)):
            want = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"{flag} must be {want}, got {v}")
    qdrop = getattr(args, "qdrop", None)
    if qdrop is not None and not 0.0 <= qdrop < 1.0:
        raise ValueError(f"--qdrop must be in [0, 1), got {qdrop}")
    out = check_output_dir(args.out, overwrite=args.overwrite, flag="--out")
    if not str(args.params).startswith("shipped:") and os.path.abspath(args.params) == out:
        raise OutputError(f"--out {out} is the --params folder; write the quantized model elsewhere")
    if args.report:
        report = check_output_file(args.report, overwrite=args.overwrite, flag="--report", suffixes=(".json", ".csv"))
        if report.startswith(out + os.sep):
            raise OutputError(f"--report {report} lies inside --out {out}; put it beside the model folder")


def run(args) -> int:
    from cfws_jax.assets import load_params
    from cfws_jax.data import calibration_batches, open_source
    from cfws_jax.ptq import get_preset, quantize, save_quantized
    from cfws_jax.detection import image_size_for, load_size_for
    from cfws_jax.models.registry import canonical_arch, family
    from cfws_jax.ptq.report import format_report, layer_report, sensitivity, sensitivity_db, write_report

    check_args(args)
    from cfws_jax.parallel import mesh_from_args

    mesh = mesh_from_args(args)  # validates --devices before any work
    config = get_preset(args.preset, **_overrides(args))
    if getattr(args, "bias_correction_z", None) is not None and not config.bias_correction:
        raise ValueError(f"--bias-correction-z: preset {args.preset} does not correct biases; use --preset cfws_kl_bc "
                         "or add --bias-correction")
    given = [flag for attr, flag in _RECON_FLAGS if getattr(args, attr, None) is not None]
    if given and not config.reconstruct:
        raise ValueError(f"{', '.join(given)}: reconstruction options, but preset {args.preset} does not reconstruct; "
                         "use --preset cfws_kl_recon / kl_recon or add --reconstruct")
    variables, meta = load_params(args.params)
    recorded = meta.get("arch") if isinstance(meta, dict) else None
    arch = canonical_arch(args.arch, recorded)  # a size alias (yolov6s) takes the recorded version
    if recorded is not None and recorded != arch:
        raise ValueError(f"--arch {args.arch!r} disagrees with {args.params}, which records arch {recorded!r}")
    detector = family(arch) == "yolov6"
    if detector:  # letterboxed [0, 1] images at the official per-model load size
        size = args.image_size or image_size_for(arch)  # 640; P6 models 1280
        src = open_source(args.calib_data, split=args.calib_split, image_size=size, protocol="letterbox",
                          load_size=load_size_for(arch, size))
    else:
        src = open_source(args.calib_data, split=args.calib_split, image_size=args.image_size,
                          protocol=args.protocol)
    print(f"calibration data: {src.describe()}", file=sys.stderr)
    if not 1 <= config.num_calib_images <= src.num_images:
        raise ValueError(f"--num-calib {config.num_calib_images}: {src.spec} [{src.split}] holds "
                         f"{src.num_images} images")
    batches = calibration_batches(src, config.num_calib_images, config.calib_batch_size, config.seed,
                                  progress=not args.no_progress)
    progress = not args.no_progress
    if args.keep_float:  # rank on the round-to-nearest model; reconstruct only the final one
        qm = quantize(arch, variables, batches, config.replace(reconstruct=False, bias_correction=False),
                      progress=progress, mesh=mesh)
    else:
        qm = quantize(arch, variables, batches, config, progress=progress, mesh=mesh)
    if args.keep_float:
        ranking = sensitivity(qm, variables, batches[0][:8] if detector else batches[0])
        keep = tuple(r["layer"] for r in ranking[: args.keep_float])
        print("most sensitive layers (kept in float): " + ", ".join(
            f"{r['layer']} ({sensitivity_db(r):.1f} dB)" for r in ranking[: args.keep_float]), file=sys.stderr)
        config = config.replace(float_layers=tuple(config.float_layers) + keep)
        qm = quantize(arch, variables, batches, config, progress=progress, mesh=mesh, reuse=qm)
    qm = _with_calibration_record(qm, src, config)
    report = layer_report(qm, variables, batches[0][:8])
    import jax

    if jax.process_index() == 0:  # multi-host: every process holds the same model; one writes it
        save_quantized(qm, args.out, overwrite=args.overwrite, flag="--out")
    print(format_report(report))
    if args.report and jax.process_index() == 0:
        write_report(report, args.report, overwrite=args.overwrite, flag="--report")
        print(f"report written to {args.report}", file=sys.stderr)
    qmeta = qm.meta
    if "reconstruction" in qmeta:
        st = qmeta["reconstruction"].values()
        print(f"reconstruction: {len(st)} layers in {qmeta['refine_seconds']:.1f} s, "
              f"{sum(s['loss_after'] < s['loss_before'] for s in st)} with a lower output error", file=sys.stderr)
    if "cle" in qmeta:
        c = qmeta["cle"]
        print(f"cross-layer equalization: {c['pairs']} layer pairs, {c['iterations']} sweeps "
              f"(last max |s-1| {c['max_scale_change']:.2g}), {len(c['skipped'])} layers skipped", file=sys.stderr)
    if "bias_correction" in qmeta:
        print(f"bias correction: {len(qmeta['bias_correction'])} layers", file=sys.stderr)
    n_cfws = sum(lp.scheme == "cfws" for lp in qm.plan.layers)
    print(f"quantized {arch} with preset {args.preset}: {len(qm.plan.layers)} layers "
          f"({n_cfws} CFWS), {len(qm.plan.points)} activation quantizers -> {args.out}")
    return 0


def _with_calibration_record(qm, src, config):
    """``qm`` whose metadata names the calibration images (:mod:`cfws_jax.data.holdout`), so that
    ``eval`` can tell when it scores the images the model was calibrated on."""
    import json

    from cfws_jax.data import calibration_indices
    from cfws_jax.data.holdout import RECORD_KEY, calibration_record

    meta = qm.meta
    idx = calibration_indices(src.num_images, config.num_calib_images, config.seed)
    meta.setdefault("calibration", {})[RECORD_KEY] = calibration_record(src, idx)
    return qm.replace(meta_json=json.dumps(meta, sort_keys=True))
