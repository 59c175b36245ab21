"""On the GPU machine: decode the mosaics of pack_cifar.py back into a plain CIFAR .npz.

    python3 examples/gpu_transfer/unpack_cifar.py .dev/cifar_q75.npz /tmp/cifar.npz
"""

import io
import sys

import numpy as np
from PIL import Image


def main(src, dst):
    d = np.load(src)
    out = {}
    for split in ("train", "test"):
        parts = sorted((k for k in d.files if k.startswith(split + "_")), key=lambda k: int(k.split("_")[1]))
        xs = []
        for k in parts:
            m = np.asarray(Image.open(io.BytesIO(d[k].tobytes())).convert("RGB"))
            rows, cols = m.shape[0] // 32, m.shape[1] // 32
            xs.append(m.reshape(rows, 32, cols, 32, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 32, 32, 3))
        out["x_" + split] = np.concatenate(xs)
        out["y_" + split] = d["y_" + split].astype(np.int64)
    np.savez(dst, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
