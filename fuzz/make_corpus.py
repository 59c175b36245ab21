"""Write the seed corpora ``fuzz/corpus/<target>/`` from the test suite's own file builders.

Valid files (``torch.save`` of the reader tests' tensors and containers, a tiny YOLOv6 release
module tree, safetensors, ``.npz`` weights and CIFAR-style splits, small PNG / JPEG / GIF / BMP
images, a COCO instances JSON) plus small hand-made hostile files; no shared data. Names are stable;
bytes can differ between runs (zip timestamps, legacy torch storage keys).
Needs torch and the ``yolov6detect`` test peer::

    python fuzz/make_corpus.py            # rewrites fuzz/corpus/
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"
MAX_SEED_BYTES = 64 * 1024


def _torch_bytes(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _torch_objects() -> dict[str, object]:
    """State dicts and containers from the reader tests (dtypes, views, shared storages, wrappers)."""
    from test_torch_reader import _sd, _tensors

    sd = _sd()
    return {
        "tensors": _tensors(),
        "flat": sd,
        "state_dict_container": {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}},
        "ema_container": {"model": {"x": torch.zeros(1)}, "ema": sd},
        "data_parallel": {"module." + k: v for k, v in sd.items()},
        "nested_plain": {"model": {"state_dict": sd, "step": 1}, "name": "a", "tup": (1, 2.5, None, b"x"),
                         "set": {1, 2}},
    }


def _hostile_zips() -> dict[str, bytes]:
    """Small hostile zip checkpoints from tests/test_hostile_files.py (pickles, sizes)."""
    import test_hostile_files as h

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (data, _) in h.PICKLES.items():
            if len(data) < 4096:
                out[f"hostile_{name}"] = h._zip(Path(tmp) / name, data).read_bytes()
        for name, (args, _) in h.SIZES.items():
            out[f"hostile_{name}"] = h._one_tensor_zip(Path(tmp) / name, *args).read_bytes()
    return out


def torch_zip() -> dict[str, bytes]:
    seeds = {name: _torch_bytes(obj) for name, obj in _torch_objects().items()}
    return {**seeds, **_hostile_zips()}


def torch_legacy() -> dict[str, bytes]:
    seeds = {name: _torch_bytes(obj, legacy=True) for name, obj in _torch_objects().items()}
    data = _torch_bytes({"w": torch.ones(2)}, legacy=True)
    i = data.rindex(struct.pack("<q", 2))  # the storage's element count (test_legacy_count_overflow)
    seeds["hostile_count_overflow"] = data[:i] + struct.pack("<q", 2 ** 62) + data[i + 8:]
    return seeds


def _tiny_yolov6():
    """A few yolov6 / QA / 0.4.x module classes in a Sequential, with a v1.0 head."""
    import yolov6_torch as y

    common = y.import_yolov6().layers.common
    torch.manual_seed(0)
    model = torch.nn.Sequential(common.RepVGGBlock(3, 2), y.QARepVGGBlock(2, 2), common.SimConv(2, 2, 1, 1),
                                common.Conv_C3(2, 2))
    model.add_module("detect", y.V1Detect([2], 1))
    return y, model


def yolov6_release() -> dict[str, bytes]:
    y, model = _tiny_yolov6()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in (("release", {}), ("engine", {"engine": True}), ("v04", {"v04": True})):
            path = Path(tmp) / f"{name}.pt"
            y.save_release(model, path, **kw)
            out[name] = path.read_bytes()
        path = Path(tmp) / "legacy.pt"
        with y.official_names([type(model.detect), y.QARepVGGBlock]):
            torch.save({"model": model.half()}, path, _use_new_zipfile_serialization=False)
        out["release_legacy"] = path.read_bytes()
    return out


def safetensors() -> dict[str, bytes]:
    from safetensors.numpy import save
    from test_hostile_files import ST_CASES

    arrays = {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
              for k, v in _torch_objects()["flat"].items()}
    return {"flat": save(arrays, metadata={"format": "pt"}), **{f"case_{k}": v for k, v in ST_CASES.items()}}


def npz_checkpoint() -> dict[str, bytes]:
    from test_hostile_files import _npz_with_header

    sd = {k: v.numpy() for k, v in _torch_objects()["flat"].items()}
    out = {}
    for name, save in (("flat", np.savez), ("flat_compressed", np.savez_compressed)):
        buf = io.BytesIO()
        save(buf, **sd)
        out[name] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, w=np.asfortranarray(np.arange(6, dtype=">f4").reshape(2, 3)))
    out["fortran_big_endian"] = buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape, data in (("hostile_64gb", (2 ** 34,), b"\0" * 64), ("hostile_negative", (-1,), b"")):
            out[name] = _npz_with_header(Path(tmp) / name, shape, data).read_bytes()
    return out


def npz_split() -> dict[str, bytes]:
    from test_data import make_npz

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in (("classes", {}), ("inferred", {"classes": False}), ("empty_train", {"n_train": 0})):
            path = Path(tmp) / f"{name}.npz"
            make_npz(path, n_train=kw.pop("n_train", 3), n_test=2, hw=(4, 4), **kw)
            out[name] = path.read_bytes()
    buf = io.BytesIO()
    np.savez(buf, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.array([0, 1]))
    out["stored"] = buf.getvalue()
    return out


def image_folder() -> dict[str, bytes]:
    from PIL import Image
    from test_data import random_image

    rng = np.random.default_rng(0)
    out = {}
    for name, mode, fmt, (w, h) in (("rgb_png", "RGB", "PNG", (9, 7)), ("gray_png", "L", "PNG", (5, 8)),
                                    ("rgba_png", "RGBA", "PNG", (6, 6)), ("bits_png", "1", "PNG", (17, 3)),
                                    ("palette_png", "P", "PNG", (7, 5)), ("rgb_jpeg", "RGB", "JPEG", (16, 12)),
                                    ("gray_jpeg", "L", "JPEG", (8, 8)), ("cmyk_jpeg", "CMYK", "JPEG", (8, 9)),
                                    ("gif", "P", "GIF", (6, 4)), ("bmp", "RGB", "BMP", (3, 5)),
                                    ("tiff", "RGB", "TIFF", (4, 4)), ("webp", "RGB", "WEBP", (8, 8))):
        buf = io.BytesIO()
        random_image(rng, w, h, mode).save(buf, format=fmt)
        out[name] = buf.getvalue()
    png = out["rgb_png"]  # IHDR width/height at bytes 16..24 (CRC left stale: Pillow's check decides)
    out["hostile_png_huge_header"] = png[:16] + struct.pack(">II", 1 << 20, 1 << 20) + png[24:]
    out["hostile_png_over_cap"] = png[:16] + struct.pack(">II", 8193, 8192) + png[24:]
    out["truncated_jpeg"] = out["rgb_jpeg"][: len(out["rgb_jpeg"]) // 2]
    img = Image.new("RGB", (1, 1))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out["one_pixel_png"] = buf.getvalue()
    return out


def coco_json() -> dict[str, bytes]:
    from test_detection import _write_coco

    with tempfile.TemporaryDirectory() as tmp:
        _, path, doc = _write_coco(Path(tmp), make_images=False)
        out = {"instances": path.read_bytes()}
    bad = dict(doc, images=doc["images"] + [dict(doc["images"][0])])
    out["duplicate_image_id"] = json.dumps(bad).encode()
    out["bool_id"] = json.dumps(dict(doc, categories=[{"id": True}])).encode()
    out["deep"] = b"[" * 5000 + b"]" * 5000
    out["not_utf8"] = b'{"images": "\xff"}'
    return out


BUILDERS = {f.__name__: f for f in (torch_zip, torch_legacy, yolov6_release, safetensors, npz_checkpoint,
                                    npz_split, image_folder, coco_json)}


def main() -> int:
    from fuzz.targets import TARGETS

    assert set(BUILDERS) == set(TARGETS), sorted(set(BUILDERS) ^ set(TARGETS))
    total = 0
    for target, build in BUILDERS.items():
        folder = CORPUS / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in build().items():
            if len(data) > MAX_SEED_BYTES:
                raise SystemExit(f"seed {target}/{name} is {len(data):,} bytes (> {MAX_SEED_BYTES:,})")
            (folder / name).write_bytes(data)
            total += len(data)
        print(f"{target:16s} {len(list(folder.iterdir())):3d} seeds")
    print(f"corpus: {total:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
