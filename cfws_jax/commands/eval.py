"""``cfws-jax eval``: top-1 / top-5 accuracy of a float or quantized classifier.

    cfws-jax eval --arch ARCH (--params DIR | --quantized QDIR [--integer [--requant fixed]]) --data SRC
                  [--split S] [--limit N [--first]] [--batch-size B] [--protocol P] [--image-size N] [--json]

``--integer`` runs a quantized model in integer arithmetic (:mod:`cfws_jax.ptq.integer_runtime`;
also with ``--task detect``) and prints the same table.

``--exclude-calib [QDIR]`` leaves out the images that calibrated ``QDIR`` (default the
``--quantized`` model; ``ptq`` records them), e.g. when calibration and evaluation read the same
folder; without it, a quantized model scored on images it was calibrated on gets a one-line
warning (:mod:`cfws_jax.data.holdout`).

``--limit N`` takes N images that represent the source (stratified by class where labels are known,
else evenly spaced; ``--first``: the first N) and the result names them ("1000 of 10000 test images,
100 per class"). With ``--json`` the last stdout line is
``{"top1": ..., "top5": ..., "images": ..., "subset": ..., "devices": [...]}``
and everything else goes to stderr. ``--devices N``: data parallel on the first N local devices
(default all; the device count and list are printed on stderr).

    cfws-jax eval --task detect --arch yolov6s_v2 (--params DIR | --quantized QDIR) --data IMAGES
                  --annotations instances.json [--limit N] [--conf 0.03] [--iou 0.65]
                  [--image-size 640|1280] [--load-size L] [--results-json FILE] [--json]

prints the 12 COCO bbox numbers (``--json``: ``{"mAP", "mAP50", "stats", "images", "detections", "subset"}``);
see :func:`run_detect`.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys


def register(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 accuracy of a float or quantized classifier")
    p.add_argument("--arch", required=True, help="architecture name, e.g. repvgg_a0")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--params", metavar="DIR", help="float variables written by cfws-jax convert, or shipped:NAME")
    src.add_argument("--quantized", metavar="QDIR", help="quantized model written by cfws-jax ptq")
    p.add_argument("--data", required=True, metavar="SRC",
                   help="image folder (class per sub-folder), CIFAR-style .npz, or tfds:NAME")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate N images that represent the source: stratified by class where labels "
                   "are known (npz, class sub-folders), else evenly spaced (COCO folders, tfds); "
                   "the line printed with the result says which")
    p.add_argument("--first", action="store_true",
                   help="with --limit: take the source's first N images instead (biased when the source "
                   "is sorted by class, as CIFAR npz files are)")
    p.add_argument("--exclude-calib", nargs="?", const="", default=None, metavar="QDIR",
                   help="leave out the images that calibrated QDIR (default: the --quantized model), as "
                   "recorded by cfws-jax ptq; use it on the float run too, so both score the same images. "
                   "Without it, eval warns when a quantized model is scored on its calibration images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--protocol", default="resize_crop", choices=("resize_crop", "direct"),
                   help="resize_crop: short side 256 + centre crop 224; direct: resize to 224x224")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default 224 for image folders, native for .npz)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.add_argument("--integer", action="store_true",
                   help="with --quantized: run the network in integer arithmetic (int8 x int8 -> int32 "
                   "convs, cfws_jax.ptq.integer_runtime) instead of the fake-quant simulation")
    p.add_argument("--requant", default="float", choices=("float", "fixed"),
                   help="with --integer: float32 requantization multipliers (default) or fixed-point "
                   "integer multiplier + shift")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from cfws_jax.parallel import add_devices_arg

    add_devices_arg(p)
    # detection (--task detect): COCO mAP of a YOLOv6 model, see run_detect
    p.add_argument("--task", default="classify", choices=("classify", "detect"),
                   help="classify (top-1/top-5, default) or detect (COCO mAP; --data is the image "
                   "folder, --image-size the letterbox canvas, default the model's official size: 640, P6 1280)")
    p.add_argument("--annotations", metavar="JSON", help="detect: COCO instances JSON for the --data images")
    p.add_argument("--conf", type=float, default=0.03, help="detect: confidence threshold (default 0.03)")
    p.add_argument("--iou", type=float, default=0.65, help="detect: NMS IoU threshold (default 0.65)")
    p.add_argument("--load-size", type=int, default=None,
                   help="detect: long side before letterboxing (default: the official per-model size on the "
                   "official canvas, e.g. 636 for yolov6m_v3, 1263 for yolov6n6)")
    p.add_argument("--results-json", metavar="FILE", help="detect: also write the COCO result list here")
    p.add_argument("--overwrite", action="store_true", help="detect: replace an existing --results-json file")
    p.set_defaults(func=run)


def _meta(meta, key):
    """``meta[key]`` for a dict or ``meta.key`` for an object; None if absent."""
    if isinstance(meta, dict):
        return meta.get(key)
    return getattr(meta, key, None)


def _check_arch(arch: str, recorded, where) -> None:
    if recorded is not None and str(recorded) != arch:
        raise ValueError(f"--arch {arch!r} disagrees with {where}, which records arch {recorded!r}")


def float_apply_fn(arch: str, params_dir):
    """Load float variables and build ``fn(images NHWC) -> logits`` for ``arch``."""
    import jax

    assets = importlib.import_module("cfws_jax.assets")
    models = importlib.import_module("cfws_jax.models")
    variables, meta = assets.load_params(params_dir)
    _check_arch(arch, _meta(meta, "arch"), params_dir)
    deploy = _meta(meta, "form") == "deploy"
    from cfws_jax.ptq.model import params_num_classes

    model = models.create_model(arch, deploy=deploy, num_classes=params_num_classes(variables["params"]))
    # variables travel as a pytree argument of the jitted step, not as baked-in constants
    return jax.tree_util.Partial(functools.partial(_apply, model, deploy), variables)


def _apply(model, deploy: bool, variables, x):
    if deploy:
        return model.apply(variables, x)
    return model.apply(variables, x, train=False)


def quantized_apply_fn(arch: str, qdir, integer: bool = False, requant: str = "float"):
    """Load a quantized model and return its ``fn(images NHWC) -> logits`` (fake-quant, or with
    ``integer`` the integer-arithmetic forward of :mod:`cfws_jax.ptq.integer_runtime`)."""
    ptq = importlib.import_module("cfws_jax.ptq")
    qmodel = ptq.load_quantized(qdir)
    recorded = _meta(qmodel, "arch")
    _check_arch(arch, recorded if recorded is not None else _meta(qmodel, "architecture"), qdir)
    if integer:
        from cfws_jax.ptq.integer_runtime import integer_apply_fn

        return integer_apply_fn(qmodel, requant=requant)
    return ptq.quantized_apply_fn(qmodel)


def build_apply_fn(arch: str, *, params=None, quantized=None, integer: bool = False, requant: str = "float"):
    """The model to evaluate (tests may replace this function)."""
    if (params is None) == (quantized is None):
        raise ValueError("give exactly one of --params and --quantized")
    if integer and quantized is None:
        raise ValueError("--integer needs --quantized QDIR (a model written by cfws-jax ptq)")
    if params is not None:
        return float_apply_fn(arch, params)
    return quantized_apply_fn(arch, quantized, integer, requant)


def _integer_kwargs(args) -> dict:
    """``build_apply_fn`` keywords for ``--integer`` (none without it, so replaced functions keep working)."""
    if not getattr(args, "integer", False):
        return {}
    return {"integer": True, "requant": getattr(args, "requant", "float")}


def run(args) -> int:
    if getattr(args, "task", "classify") == "detect":
        return run_detect(args)
    from cfws_jax.data import open_source
    from cfws_jax.evaluate import evaluate_classifier

    for flag, v, lo in (("--limit", args.limit, 0), ("--batch-size", args.batch_size, 1),
                        ("--image-size", args.image_size, 1)):
        if v is not None and v < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {v}")
    from cfws_jax.parallel import device_list, mesh_from_args

    mesh = mesh_from_args(args)  # checks --devices before any work
    log = sys.stderr if args.json else sys.stdout
    try:
        src = open_source(args.data, split=args.split, image_size=args.image_size,
                          protocol=args.protocol)
    except ImportError as e:  # e.g. tensorflow_datasets / Pillow missing: a user-facing error
        raise ValueError(str(e)) from e
    print(f"data: {src.describe()}", file=log)
    _hold_out(args, src)
    apply_fn = build_apply_fn(args.arch, params=args.params, quantized=args.quantized, **_integer_kwargs(args))
    res = evaluate_classifier(apply_fn, src, batch_size=args.batch_size, limit=args.limit,
                              progress=not args.no_progress, mesh=mesh, subset=_subset(args))
    if args.json:
        print(json.dumps({**res, "devices": device_list(mesh)}))
    else:
        top5 = "n/a" if res["top5"] is None else f"{100 * res['top5']:.2f}%"
        print(f"{args.arch}: top-1 {100 * res['top1']:.2f}%  top-5 {top5}  ({res['subset']})")
    return 0


def _hold_out(args, src) -> None:
    """``--exclude-calib``: drop the recorded calibration images from ``src``; without it, warn
    (one stderr line) when the ``--quantized`` model was calibrated on images about to be scored."""
    from cfws_jax.data.holdout import calibration_overlap, read_record

    qdir = args.exclude_calib or args.quantized
    if args.exclude_calib is not None and not qdir:
        raise ValueError("--exclude-calib needs QDIR when evaluating --params (the quantized model whose "
                         "calibration images to leave out)")
    if qdir is None:
        return
    try:
        record = read_record(qdir)
    except (OSError, ValueError):
        if args.exclude_calib is not None:
            raise
        return  # an unreadable --quantized folder: the model loader says why
    if record is None:
        if args.exclude_calib is not None:
            raise ValueError(f"--exclude-calib: {qdir} does not record its calibration images (quantized "
                             "before cfws-jax recorded them, or by the Python API); quantize it again with ptq")
        return
    overlap = calibration_overlap(record, src)
    if args.exclude_calib is not None:
        src.exclude(overlap, f"calibration images of {qdir}")
        print(f"excluded {len(overlap)} images that calibrated {qdir}", file=sys.stderr)
    elif len(overlap) and args.quantized:
        chosen = src.subset(args.limit, _subset(args))
        both = len(set(overlap.tolist()) & set(chosen.tolist()))
        if both:
            print(f"warning: {both} of the {len(chosen)} images to score from {src.spec} calibrated {qdir}; "
                  "their scores are optimistic: calibrate on another split or folder, or add --exclude-calib "
                  f"here and --exclude-calib {qdir} to the float run", file=sys.stderr)


def _subset(args) -> str:
    """The subset rule of ``--limit``: ``"first"`` with ``--first``, else ``"balanced"``."""
    if getattr(args, "first", False) and args.limit is None:
        raise ValueError("--first needs --limit N")
    return "first" if getattr(args, "first", False) else "balanced"


def _recorded_arch(name: str, folder) -> str:
    """``name``, or for a size alias (``yolov6s``) the version ``folder``'s metadata records
    (:func:`cfws_jax.models.registry.canonical_arch`); unreadable folders are left to the loader."""
    from cfws_jax import io
    from cfws_jax.models.registry import canonical_arch

    recorded = None
    if folder is not None and not str(folder).startswith("shipped:"):
        try:
            recorded = io.read_metadata(folder).get("metadata", {}).get("arch")
        except (OSError, ValueError):
            pass
    return canonical_arch(name, recorded if isinstance(recorded, str) else None)


def run_detect(args) -> int:
    """``eval --task detect``: letterbox, forward, NMS, COCO mAP; the 12 COCO numbers as a table,
    or with ``--json`` one last stdout line ``{"mAP", "mAP50", "stats", "images", "detections"}``."""
    from cfws_jax.data.coco import CocoSource
    from cfws_jax.detection import format_stats, image_size_for, load_size_for
    from cfws_jax.detection.evaluate import evaluate_detector
    from cfws_jax.io import check_output_file, write_file_atomic

    if not args.annotations:
        raise ValueError("--task detect needs --annotations INSTANCES.json")
    for flag, v, lo in (("--limit", args.limit, 0), ("--batch-size", args.batch_size, 1),
                        ("--image-size", args.image_size, 1), ("--load-size", args.load_size, 1)):
        if v is not None and v < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {v}")
    for flag, v in (("--conf", args.conf), ("--iou", args.iou)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{flag} must be in [0, 1], got {v}")
    results_path = None
    if args.results_json:
        results_path = check_output_file(args.results_json, overwrite=args.overwrite, flag="--results-json",
                                         suffixes=(".json",))
    from cfws_jax.parallel import device_list, mesh_from_args

    mesh = mesh_from_args(args)  # checks --devices before any work
    log = sys.stderr if args.json else sys.stdout
    arch = args.arch = _recorded_arch(args.arch, args.params or args.quantized)  # yolov6s -> yolov6s_v2
    size = args.image_size or image_size_for(arch)  # 640; P6 models 1280
    load = args.load_size or load_size_for(arch, size)
    try:
        src = CocoSource(args.data, args.annotations, image_size=size, load_size=load)
    except ImportError as e:  # pycocotools / Pillow missing: a user-facing error
        raise ValueError(str(e)) from e
    print(f"data: {src.describe()}", file=log)
    _hold_out(args, src)
    apply_fn = build_apply_fn(args.arch, params=args.params, quantized=args.quantized, **_integer_kwargs(args))
    batch = max(1, min(args.batch_size, src.count(args.limit)))  # pad no further than the images there are
    res = evaluate_detector(apply_fn, src, batch_size=batch, limit=args.limit,
                            progress=not args.no_progress, conf=args.conf, iou=args.iou, mesh=mesh,
                            subset=_subset(args))
    if results_path:
        write_file_atomic(results_path, json.dumps(res["results"]), overwrite=args.overwrite, flag="--results-json")
        print(f"wrote {res['detections']} detections to {results_path}", file=log)
    print(f"{args.arch}: COCO bbox mAP@.5:.95 {100 * res['mAP']:.2f}  mAP@.5 {100 * res['mAP50']:.2f}  "
          f"({res['subset']}, {res['detections']} detections, conf {args.conf}, IoU {args.iou})", file=log)
    print(format_stats(res["stats"]), file=log)
    if args.json:
        print(json.dumps({**{k: res[k] for k in ("mAP", "mAP50", "stats", "images", "detections", "subset")},
                          "devices": device_list(mesh)}))
    return 0
