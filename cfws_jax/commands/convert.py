"""``cfws-jax convert``: PyTorch checkpoint -> orbax checkpoint of Flax variables.

Reads ``--checkpoint`` safely (:mod:`converters.torch_reader`: torch.save zip/legacy,
.safetensors, .npz), maps it to Flax variables (``converters.convert.convert_state_dict``),
optionally fuses train-form variables (``--deploy``, ``cfws_jax.models`` ``fuse``) and writes
them with :func:`cfws_jax.io.save_variables`, with metadata ``arch``, ``form``, ``dialect``,
``source``, ``source_format``, ``container``.
"""

from __future__ import annotations

import math
import os


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a PyTorch RepVGG / MobileOne / YOLOv6 checkpoint to Flax variables (orbax)")
    p.add_argument("--checkpoint", required=True, help="torch.save file (.pth/.pt, zip or legacy), .safetensors or .npz")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--arch", default=None, help="architecture name (inferred from the keys when omitted)")
    p.add_argument("--deploy", action="store_true", help="fuse train-form (multi-branch) weights into deploy form")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size, if not the default")
    p.add_argument("--container-key", default=None,
                   help="take the state dict from this top-level key (default: ema > state_dict > model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cfws_jax checkpoint at --out")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="drop checkpoint keys matching this glob (repeatable; e.g. '_ref_*'); "
                        "every dropped key is listed")
    p.add_argument("--cast-integers", action="store_true",
                   help="allow exact, NaN-free integer-to-float32 weight casts")
    p.set_defaults(func=run)


def _fuse_fn():
    """``fuse(arch, variables) -> variables`` from :mod:`cfws_jax.models`."""
    import importlib

    import cfws_jax.models as models

    fuse = getattr(models, "fuse", None)
    if not callable(fuse):  # the package may not re-export it: take it from its module
        fuse = importlib.import_module("cfws_jax.models.fuse").fuse
    return fuse


def count_elements(tree) -> int:
    """Total number of array elements in a nested dict of arrays."""
    if isinstance(tree, dict):
        return sum(count_elements(v) for v in tree.values())
    return int(math.prod(getattr(tree, "shape", ())))


def _shown(keys, n: int = 8) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def run(args) -> int:
    import jax
    import numpy as np

    from cfws_jax.io import check_output_dir, save_variables
    from converters.convert import convert_state_dict
    from converters.torch_reader import read_state_dict

    check_output_dir(args.out, overwrite=args.overwrite, flag="--out")  # before any reading or work
    from converters.module_classes import YOLOV6_MODULE_CLASSES

    # Pickled YOLOv6 nn.Module trees (release files) load as inert records; other classes are refused.
    src = read_state_dict(args.checkpoint, container_key=args.container_key, module_classes=YOLOV6_MODULE_CLASSES,
                          cast_integers=args.cast_integers)
    state_dict = src.state_dict
    if args.exclude:
        import fnmatch

        dropped = sorted(k for k in state_dict if any(fnmatch.fnmatchcase(k, pat) for pat in args.exclude))
        if not dropped:
            raise ValueError(f"--exclude {args.exclude} matched no key of {args.checkpoint}")
        print(f"excluded    {len(dropped)} keys: {', '.join(dropped)}")
        state_dict = {k: v for k, v in state_dict.items() if k not in set(dropped)}
    res = convert_state_dict(state_dict, args.arch, num_classes=args.num_classes,
                             pickled_classes=src.pickled_classes)
    if res.dropped:  # YOLOv6 detect.proj* and training-only head branches
        print(f"dropped     {len(res.dropped)} keys (not Flax variables): {_shown(res.dropped)}")
    if res.filled:  # YOLOv6 0.4.x l / l6 re-saves: basic-block convs without bias
        print(f"filled      {len(res.filled)} absent conv biases with 0 (0.4.x basic blocks have none): "
              f"{_shown(res.filled)}")
    variables, form = res.variables, res.form
    fused = False
    if args.deploy and form == "train":
        variables = _fuse_fn()(res.arch, variables)
        form, fused = "deploy", True
    variables = jax.tree_util.tree_map(np.asarray, jax.device_get(dict(variables)))
    metadata = {
        "arch": res.arch,
        "form": form,
        "dialect": res.dialect,
        "source": os.path.abspath(args.checkpoint),
        "source_format": src.file_format,
        "container": src.container,
        "fused_by_cfws_jax": fused,
    }
    num_classes = args.num_classes if args.num_classes is not None else res.num_classes
    if num_classes is not None:
        metadata["num_classes"] = num_classes
    out = save_variables(args.out, variables, metadata, overwrite=args.overwrite, flag="--out")
    n_params = count_elements(variables.get("params", {}))
    n_other = count_elements(variables) - n_params
    container = src.container or "none (bare state dict)"
    if src.stripped_prefix:
        container += f", stripped {src.stripped_prefix!r}"
    print(f"arch        {res.arch}")
    print(f"dialect     {res.dialect}")
    print(f"form        {form}" + (" (fused from train form)" if fused else ""))
    print(f"source      {metadata['source']} ({src.file_format}; container: {container}; "
          f"ignored {len(src.ignored)} num_batches_tracked)")
    print(f"parameters  {n_params:,}" + (f" (+{n_other:,} in other collections)" if n_other else ""))
    print(f"wrote       {out}")
    return 0
