"""``cfws-jax scenes``: write synthetic CIFAR-10 detection scenes as JPEGs + a COCO instances JSON.

    cfws-jax scenes --data cifar10.npz [--split test] [--count 1000] [--seed 0] [--start 0]
                    [--canvas 256] [--max-objects 6] --out DIR

Writes ``DIR/images/scene_NNNNNNN.jpg`` and ``DIR/instances.json`` (see
:func:`cfws_jax.data.scenes.write_coco_scenes`); score a detector on them with
``cfws-jax eval --task detect --data DIR/images --annotations DIR/instances.json --image-size 256``.
A synthetic set for float vs quantized comparisons, never COCO accuracy. ``DIR`` must be new or empty.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("scenes", help="write synthetic CIFAR-10 detection scenes (JPEGs + COCO JSON)")
    p.add_argument("--data", required=True, metavar="NPZ", help="CIFAR-10 .npz (x_train/y_train/x_test/y_test)")
    p.add_argument("--split", default="test", choices=("train", "test"),
                   help="source split of the objects (default test: held-out scenes)")
    p.add_argument("--count", type=int, default=1000, help="number of scenes (default 1000)")
    p.add_argument("--start", type=int, default=0, help="index of the first scene (default 0)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")
    p.add_argument("--canvas", type=int, default=256, help="canvas side, a multiple of 32 (default 256)")
    p.add_argument("--max-objects", type=int, default=6, help="at most this many objects per scene (default 6)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from cfws_jax.data.scenes import SceneConfig, load_cifar_split, load_class_names, write_coco_scenes
    from cfws_jax.io import check_output_dir
    from cfws_jax.progress import Progress

    for flag, value, low in (("--count", args.count, 1), ("--start", args.start, 0), ("--seed", args.seed, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    cfg = SceneConfig(canvas=args.canvas, max_objects=args.max_objects)
    check_output_dir(args.out, flag="--out")  # before loading 170 MB
    images, labels = load_cifar_split(args.data, args.split)
    names = load_class_names(args.data)
    bar = Progress(total=args.count, desc="scenes", unit="img", disable=args.no_progress)
    done = [0]

    def progress(k, total):
        bar.update(k - done[0])
        done[0] = k

    try:
        image_dir, json_path = write_coco_scenes(args.out, images, labels, split=args.split, seed=args.seed, cfg=cfg,
                                                 count=args.count, class_names=names, start=args.start,
                                                 progress=progress)
    finally:
        bar.close()
    print(f"wrote {args.count} {args.split} scenes ({cfg.canvas} px, seed {args.seed}) to {image_dir} "
          f"and {json_path}")
    return 0
