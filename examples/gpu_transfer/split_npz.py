"""Split a flat .npz (e.g. a trained model's final.npz) into parts under 14 MB, the size a
device call can return; join them with ``{**np.load(p) for p in parts}``.

    python3 examples/gpu_transfer/split_npz.py /tmp/a0/final.npz $OUT
"""

import sys

import numpy as np


def main(src, out_dir, limit=14e6):
    d = np.load(src)
    parts, cur, size = [], {}, 0
    for k in d.files:
        a = d[k]
        if size + a.nbytes > limit and cur:
            parts.append(cur)
            cur, size = {}, 0
        cur[k] = a
        size += a.nbytes
    parts.append(cur)
    for i, p in enumerate(parts):
        np.savez(f"{out_dir}/part{i}.npz", **p)
    print(len(parts), "parts")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
