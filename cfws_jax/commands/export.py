"""``cfws-jax export``: write a quantized (QDQ) or float classifier / YOLOv6 detector as an ONNX file.

    cfws-jax export --quantized QDIR --out model.onnx [--target tensorrt|onnxruntime] [--opset 17] [--float]
        [--image-size N] [--overwrite]
    cfws-jax export --params DIR --arch ARCH --out model.onnx [--image-size N] [--opset 17] [--overwrite]

``--quantized``: QuantizeLinear / DequantizeLinear at every activation point and on every weight
(int8 weight initializers, per-channel scales on axis 0), CFWS layers as centre 1x1 + fine k x k
convs added (``--target tensorrt``, the default: explicit QDQ around float convs, for TensorRT);
``--target onnxruntime`` lays the graph out for onnxruntime's CPU integer kernels (every quantized
conv a QLinearConv, CFWS sums QLinearAdd; needs a model quantized with a ``*_ort`` preset, e.g.
``cfws-jax ptq --preset cfws_kl_ort``; :mod:`cfws_jax.export.ort_conv`); ``--float`` writes the dequantized float weights without Q/DQ instead. ``--params``
(a folder cfws-jax convert wrote, or ``shipped:NAME``) always writes a float model. Input
``input`` float32 NCHW ``[batch, 3, H, W]`` (dynamic batch, H = W = ``--image-size``: default the
size the quantized model records, else 32 for ``*_cifar``, 640 for YOLOv6, 224), normalized as
for the Flax model (not in the graph); output ``logits`` (classifiers) or ``outputs`` (YOLOv6:
decoded ``[batch, N, 5 + classes]``, input in [0, 1], no NMS). ``--overwrite`` replaces only an
ONNX file cfws_jax wrote. See :mod:`cfws_jax.export.onnx_qdq`.
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("export", help="write a quantized (ONNX QDQ) or float classifier / detector as an .onnx file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--quantized", metavar="QDIR", help="quantized model written by cfws-jax ptq")
    src.add_argument("--params", metavar="DIR", help="float variables written by cfws-jax convert, or shipped:NAME "
                     "(writes a float model)")
    p.add_argument("--arch", default=None, help="architecture (default: the one the folder records)")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="output .onnx file")
    p.add_argument("--target", choices=("tensorrt", "onnxruntime"), default="tensorrt",
                   help="with --quantized: QDQ layout for TensorRT (default) or for onnxruntime's CPU integer "
                   "kernels (needs a model quantized with a *_ort preset, e.g. --preset cfws_kl_ort)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, at least 13)")
    p.add_argument("--float", dest="float_export", action="store_true",
                   help="with --quantized: export the dequantized weights as a float model without Q/DQ")
    p.add_argument("--image-size", type=int, default=None,
                   help="square input size fixed in the graph (default: the size a quantized model records; "
                   "with --params 32 for *_cifar architectures, 640 for YOLOv6, else 224)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (only an ONNX file "
                   "cfws-jax export wrote)")
    p.set_defaults(func=run)


def _check_ours(path: str) -> None:
    """OutputError unless the existing file ``path`` is an ONNX model cfws_jax wrote."""
    from cfws_jax.export.onnx_qdq import PRODUCER, _onnx
    from cfws_jax.io import OutputError

    try:
        producer = _onnx().load(path, load_external_data=False).producer_name
    except Exception:  # not a readable ONNX protobuf
        producer = None
    if producer != PRODUCER:
        raise OutputError(f"--out {path} exists and was not written by cfws-jax export; refusing to overwrite it")


def run(args) -> int:
    import os

    from cfws_jax.io import check_output_file, write_file_atomic

    out = check_output_file(args.out, overwrite=args.overwrite, flag="--out", suffixes=(".onnx",))
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    if args.target != "tensorrt" and (args.params or args.float_export):
        raise ValueError("--target onnxruntime applies to INT8 exports (--quantized without --float)")
    if os.path.exists(out):  # --overwrite given (else check_output_file refused)
        _check_ours(out)
    from cfws_jax.export import float_onnx, export_onnx

    if args.quantized:
        from cfws_jax.ptq import load_quantized

        qm = load_quantized(args.quantized, arch=args.arch)
        model = export_onnx(qm, float_export=args.float_export, opset=args.opset, image_size=args.image_size,
                            target=args.target)
        what = f"{qm.arch} ({'float, dequantized weights' if args.float_export else 'INT8 QDQ, ' + args.target})"
    else:
        from cfws_jax.assets import load_params

        variables, meta = load_params(args.params)
        recorded = meta.get("arch") if isinstance(meta, dict) else None
        arch = args.arch or recorded
        if not arch:
            raise ValueError(f"{args.params} records no architecture; give --arch")
        if recorded and args.arch and args.arch != recorded:
            raise ValueError(f"--arch {args.arch!r} disagrees with {args.params}, which records arch {recorded!r}")
        model = float_onnx(arch, variables, image_size=args.image_size, opset=args.opset)
        what = f"{arch} (float)"
    write_file_atomic(out, model.SerializeToString(), overwrite=args.overwrite, flag="--out", suffixes=(".onnx",))
    print(f"wrote {what} to {out} (opset {args.opset}, {len(model.graph.node)} nodes)", file=sys.stderr)
    return 0
