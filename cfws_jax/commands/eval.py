"""``cfws-jax eval``: top-1 / top-5 accuracy of a float or quantized classifier.

    cfws-jax eval --arch ARCH (--params DIR | --quantized QDIR) --data SRC
                  [--split S] [--limit N] [--batch-size B] [--protocol P] [--image-size N] [--json]

With ``--json`` the last stdout line is ``{"top1": ..., "top5": ..., "images": ...}`` and
everything else goes to stderr.
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
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--protocol", default="resize_crop", choices=("resize_crop", "direct"),
                   help="resize_crop: short side 256 + centre crop 224; direct: resize to 224x224")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default 224 for image folders, native for .npz)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    model = models.create_model(arch, deploy=deploy)
    # variables travel as a pytree argument of the jitted step, not as baked-in constants
    return jax.tree_util.Partial(functools.partial(_apply, model, deploy), variables)


def _apply(model, deploy: bool, variables, x):
    if deploy:
        return model.apply(variables, x)
    return model.apply(variables, x, train=False)


def quantized_apply_fn(arch: str, qdir):
    """Load a quantized model and return its ``fn(images NHWC) -> logits``."""
    ptq = importlib.import_module("cfws_jax.ptq")
    qmodel = ptq.load_quantized(qdir)
    recorded = _meta(qmodel, "arch")
    _check_arch(arch, recorded if recorded is not None else _meta(qmodel, "architecture"), qdir)
    return ptq.quantized_apply_fn(qmodel)


def build_apply_fn(arch: str, *, params=None, quantized=None):
    """The model to evaluate (tests may replace this function)."""
    if (params is None) == (quantized is None):
        raise ValueError("give exactly one of --params and --quantized")
    if params is not None:
        return float_apply_fn(arch, params)
    return quantized_apply_fn(arch, quantized)


def run(args) -> int:
    from cfws_jax.data import open_source
    from cfws_jax.evaluate import evaluate_classifier

    log = sys.stderr if args.json else sys.stdout
    try:
        src = open_source(args.data, split=args.split, image_size=args.image_size,
                          protocol=args.protocol)
    except ImportError as e:  # e.g. tensorflow_datasets / Pillow missing: a user-facing error
        raise ValueError(str(e)) from e
    print(f"data: {src.describe()}", file=log)
    apply_fn = build_apply_fn(args.arch, params=args.params, quantized=args.quantized)
    res = evaluate_classifier(apply_fn, src, batch_size=args.batch_size, limit=args.limit,
                              progress=not args.no_progress)
    if args.json:
        print(json.dumps(res))
    else:
        top5 = "n/a" if res["top5"] is None else f"{100 * res['top5']:.2f}%"
        print(f"{args.arch}: top-1 {100 * res['top1']:.2f}%  top-5 {top5}  ({res['images']} images)")
    return 0
