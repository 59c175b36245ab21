"""Compare a rerun of the README's detector-training command with the shipped model.

    PYTHONPATH=. python examples/compare_scenes_run.py runs/yolov6n_scenes

Reads ``RUN/final.npz`` and ``RUN/log.json`` (what ``examples/train_yolov6_scenes.py`` writes)
and compares them with ``cfws_jax/assets/yolov6n_scenes_train.npz`` and
``examples/yolov6n_scenes_train_log.json``: the arrays byte for byte, the logged figures of every
epoch, the final held-out mAP. Exit status 0 when all are equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "cfws_jax" / "assets" / "yolov6n_scenes_train.npz"
SHIPPED_LOG = ROOT / "examples" / "yolov6n_scenes_train_log.json"
EPOCH_KEYS = ("step", "cls", "iou", "dfl", "loss", "fg", "heldout_mAP", "heldout_mAP50")


def compare(run: Path, shipped: Path = SHIPPED, shipped_log: Path = SHIPPED_LOG) -> bool:
    with np.load(run / "final.npz") as a, np.load(shipped) as b:
        common = sorted(set(a.files) & set(b.files))
        extra = sorted(set(a.files) ^ set(b.files))
        same = [k for k in common if a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                and a[k].tobytes() == b[k].tobytes()]
    print(f"arrays: {len(same)} of {len(common)} byte-identical" + (f"; {len(extra)} keys in one file only" if extra else ""))
    la, lb = json.loads((run / "log.json").read_text()), json.loads(shipped_log.read_text())
    ha, hb = la.get("history", []), lb.get("history", [])
    n_same = 0
    for ea, eb in zip(ha, hb):
        fa, fb = ({k: e.get(k) for k in EPOCH_KEYS} for e in (ea, eb))
        n_same += fa == fb
        if fa != fb:
            print(f"  epoch {eb.get('epoch')}: run {fa} shipped {fb}")
    print(f"epochs: {n_same} of {len(hb)} with every logged figure equal (the run logged {len(ha)})")
    fa, fb = la.get("final_heldout", {}), lb.get("final_heldout", {})
    final_same = all(fa.get(k) == fb.get(k) for k in ("mAP", "mAP50"))
    print(f"final held-out mAP / mAP50: run {fa.get('mAP')} / {fa.get('mAP50')}, shipped {fb.get('mAP')} / "
          f"{fb.get('mAP50')}: {'equal' if final_same else 'DIFFERENT'}")
    return not extra and len(same) == len(common) and n_same == len(hb) == len(ha) and final_same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the --out folder of the training run")
    args = ap.parse_args(argv)
    for f in ("final.npz", "log.json"):
        if not (args.run / f).is_file():
            print(f"compare_scenes_run: error: {args.run / f} not found (has the run finished?)", file=sys.stderr)
            return 1
    same = compare(args.run)
    print("the run reproduces the shipped model" if same else "the run differs from the shipped model")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
