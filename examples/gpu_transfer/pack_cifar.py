"""Pack the CIFAR-10 .npz into JPEG mosaics (quality 75, the source's own) for a GPU machine
that cannot read ../shared: 60,000 images in about 18 MB instead of 170 MB. Never commit the
output: it is derived from the shared data.

    python examples/gpu_transfer/pack_cifar.py ../shared/data/cifar10_jpeg_yoongikim.npz .dev/cifar_q75.npz
"""

import io
import sys

import numpy as np
from PIL import Image


def main(src, dst, cols=100, chunk=5000):
    d = np.load(src)
    out = {}
    for split in ("train", "test"):
        x = d["x_" + split]
        for i in range(0, len(x), chunk):
            sub = x[i:i + chunk]
            rows = len(sub) // cols
            m = sub.reshape(rows, cols, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(rows * 32, cols * 32, 3)
            b = io.BytesIO()
            Image.fromarray(m).save(b, "JPEG", quality=75, subsampling=2)
            out[f"{split}_{i // chunk}"] = np.frombuffer(b.getvalue(), np.uint8)
        out["y_" + split] = d["y_" + split].astype(np.int16)
    np.savez(dst, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
