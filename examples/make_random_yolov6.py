"""Write a random-weight YOLOv6 checkpoint in the official release format (for the README walk-through).

    python examples/make_random_yolov6.py --arch yolov6n_v2 --out yolov6n_random.pt [--seed 0]

The file is what a YOLOv6 release holds -- ``{'model': fp16 nn.Module, 'ema': None, ...}`` pickled
by ``torch.save`` -- built with the test-only PyTorch peer (``tests/yolov6_torch.py``: the
``yolov6detect`` package, installed with ``pip install --no-deps yolov6detect==0.4.1 pyyaml addict``,
plus torch). Every weight and BatchNorm statistic is random, so its COCO mAP is ~0: the walk-through
shows the commands and their cost, not accuracy. ``cfws-jax convert`` reads the file without torch
or the yolov6 package.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main() -> int:
    import yolov6_torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="yolov6n_v2", choices=sorted({**yolov6_torch.VARIANTS, **yolov6_torch.LARGE}))
    p.add_argument("--out", required=True, help="output .pt file (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if os.path.lexists(args.out):
        print(f"make_random_yolov6: error: {args.out} exists; refusing to overwrite it", file=sys.stderr)
        return 1
    model = yolov6_torch.build(args.arch, seed=args.seed)
    yolov6_torch.save_release(model, args.out)
    print(f"wrote {args.out}: random-weight {args.arch} in the release format (fp16 module under 'model')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
