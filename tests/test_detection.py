"""Letterbox geometry and inverse mapping, NMS vs a slow NumPy reference, COCO / letterbox data
sources and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from cfws_jax.data import DataError, open_source  # noqa: E402
from cfws_jax.data.coco import CocoSource  # noqa: E402
from cfws_jax.detection import (  # noqa: E402
    YOLOV6_LOAD_SIZE, LetterboxInfo, letterbox, load_size_for, nms, scale_boxes, to_canvas,
)
from tests.conftest import shared_file  # noqa: E402

COCO_IMAGES = "coco128/train2017"
COCO_JSON = "coco128/annotations/instances_train2017.json"


# ----------------------------------------------------------------------------- letterbox

def ref_letterbox(img: np.ndarray, out: int, load: int):
    """Obvious reference: long side -> load (Pillow BOX when shrinking, BILINEAR otherwise),
    pasted at ((out - w) // 2, (out - h) // 2) on a 114 canvas."""
    h0, w0 = img.shape[:2]
    r = load / max(h0, w0)
    w = load if w0 >= h0 else max(1, int(round(w0 * r)))
    h = load if h0 >= w0 else max(1, int(round(h0 * r)))
    pil = Image.fromarray(img)
    if (w, h) != (w0, h0):
        pil = pil.resize((w, h), Image.Resampling.BOX if r < 1 else Image.Resampling.BILINEAR)
    canvas = np.full((out, out, 3), 114, np.uint8)
    px, py = (out - w) // 2, (out - h) // 2
    canvas[py:py + h, px:px + w] = np.asarray(pil)
    return canvas, (px, py, w, h, r)


@pytest.mark.parametrize("hw,out,load", [((480, 640), 640, 638), ((640, 427), 640, 634), ((100, 51), 640, 640),
                                         ((333, 333), 320, 320), ((7, 900), 320, 316), ((301, 200), 64, 64)])
def test_letterbox_vs_reference(hw, out, load):
    img = np.random.default_rng(sum(hw)).integers(0, 256, hw + (3,), dtype=np.uint8)
    canvas, info = letterbox(img, out, load)
    ref, (px, py, w, h, r) = ref_letterbox(img, out, load)
    assert canvas.dtype == np.uint8 and canvas.shape == (out, out, 3)
    np.testing.assert_array_equal(canvas, ref)
    assert info == LetterboxInfo(r, px, py, hw[0], hw[1])
    assert isinstance(info.pad_x, int) and isinstance(info.pad_y, int)
    assert max(w, h) == load and abs(px - (out - w - px)) <= 1 and abs(py - (out - h - py)) <= 1


def test_letterbox_grayscale_and_pil_input():
    gray = Image.fromarray(np.full((20, 40), 200, np.uint8), "L")
    canvas, info = letterbox(gray, 64)
    assert canvas.shape == (64, 64, 3) and (canvas[info.pad_y:info.pad_y + 32, :] == 200).all()
    assert (canvas[:info.pad_y] == 114).all() and (canvas[info.pad_y + 32:] == 114).all()


def test_load_size_table():
    assert YOLOV6_LOAD_SIZE["yolov6s_v2"] == 638 and YOLOV6_LOAD_SIZE["yolov6t_v2"] == 634
    assert YOLOV6_LOAD_SIZE["yolov6n_v2"] == 638 and YOLOV6_LOAD_SIZE["yolov6s_v3"] == 634
    assert YOLOV6_LOAD_SIZE["yolov6n_v3"] == 636
    assert load_size_for("yolov6s_v2", 640) == 638 and load_size_for("yolov6s_v2", 320) == 320
    assert load_size_for("repvgg_a0", 640) == 640


@pytest.mark.parametrize("hw,out,load", [((480, 640), 640, 638), ((120, 90), 640, 640), ((900, 1200), 320, 320)])
def test_letterbox_roundtrip_pixels(hw, out, load):
    """A drawn rectangle found on the canvas maps back to itself within 1 px (1 canvas px when
    shrinking)."""
    h0, w0 = hw
    rng = np.random.default_rng(h0)
    for _ in range(5):
        x1, x2 = sorted(rng.integers(0, w0, 2) + [0, 8])
        y1, y2 = sorted(rng.integers(0, h0, 2) + [0, 8])
        x2, y2 = min(x2, w0), min(y2, h0)
        img = np.zeros((h0, w0, 3), np.uint8)
        img[y1:y2, x1:x2] = 255
        canvas, info = letterbox(img, out, load)
        ys, xs = np.nonzero(canvas[..., 0] > 127)
        found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float64)
        back = scale_boxes(found, info)[0]
        tol = max(1.0, 1.0 / info.ratio) + 1e-9
        np.testing.assert_allclose(back, [x1, y1, x2, y2], atol=tol)
        # the analytic maps are exact inverses (inside the image)
        box = np.array([[x1, y1, x2, y2]], np.float64)
        np.testing.assert_allclose(scale_boxes(to_canvas(box, info), info), box, atol=1e-9)


def test_scale_boxes_clips():
    info = LetterboxInfo(0.5, 0, 80, 960, 1280)
    got = scale_boxes([[-10, 70, 700, 500]], info)
    np.testing.assert_allclose(got, [[0, 0, 1280, 840]])


# ----------------------------------------------------------------------------- NMS

def ref_nms(pred, conf=0.03, iou=0.65, max_det=300, max_nms=30000, max_wh=4096):
    """Slow, obvious per-candidate NMS: (boxes float32 list, scores, classes) of the survivors."""
    pred = np.asarray(pred, np.float32)
    cands = []
    for n in range(pred.shape[0]):
        obj = pred[n, 4]
        if not obj > np.float32(conf):
            continue
        cx, cy, w, h = pred[n, :4]
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        for c in range(pred.shape[1] - 5):
            s = pred[n, 5 + c] * obj
            if s > np.float32(conf):
                cands.append((s, box, c))
    order = sorted(range(len(cands)), key=lambda i: (-float(cands[i][0]), i))[:max_nms]

    def off(i):
        return [float(v) + cands[i][2] * max_wh for v in cands[i][1]]

    def area(b):
        return (b[2] - b[0]) * (b[3] - b[1])

    kept = []
    for i in order:
        bi = off(i)
        ok = True
        for k in kept:
            bk = off(k)
            inter = max(0.0, min(bk[2], bi[2]) - max(bk[0], bi[0])) * max(0.0, min(bk[3], bi[3]) - max(bk[1], bi[1]))
            with np.errstate(invalid="ignore", divide="ignore"):
                ovr = np.float64(inter) / (np.float64(area(bk)) + area(bi) - inter)
            if ovr > iou:
                ok = False
                break
        if ok:
            kept.append(i)
            if len(kept) == max_det:
                break
    return ([cands[i][1] for i in kept], [cands[i][0] for i in kept], [cands[i][2] for i in kept])


def assert_same(pred, **kw):
    got = nms(pred, **{k: v for k, v in kw.items() if k != "max_wh"})
    boxes, scores, classes = ref_nms(pred, **kw)
    assert got.classes.tolist() == classes
    np.testing.assert_array_equal(got.scores, np.asarray(scores, np.float32).reshape(-1))
    np.testing.assert_array_equal(got.boxes, np.asarray(boxes, np.float32).reshape(-1, 4).astype(np.float64))
    return got


def random_pred(rng, n, nc, grid=None, score_levels=None, conf_col=None):
    xy = rng.uniform(0, 320, (n, 2)) if grid is None else rng.integers(0, grid, (n, 2)) * 16.0
    wh = rng.uniform(4, 120, (n, 2)) if grid is None else rng.integers(1, 4, (n, 2)) * 16.0
    cls = rng.uniform(0, 1, (n, nc)) if score_levels is None else rng.choice(score_levels, (n, nc))
    obj = np.ones((n, 1)) if conf_col is None else conf_col
    return np.concatenate([xy, wh, obj, cls], 1).astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_nms_random(seed):
    rng = np.random.default_rng(seed)
    pred = random_pred(rng, 150, 3, conf_col=rng.uniform(0, 1, (150, 1)))
    assert_same(pred)
    assert_same(pred, conf=0.3, iou=0.45, max_det=20)


def test_nms_ties_and_identical_boxes():
    rng = np.random.default_rng(7)
    pred = random_pred(rng, 200, 4, grid=4, score_levels=[0.0, 0.5, 0.5, 0.7])  # many exact duplicates
    pred = np.concatenate([pred, pred[:50]])  # identical rows: equal scores and IoU 1
    got = assert_same(pred)
    assert 0 < len(got.scores) < 400


def test_nms_clusters_many_overlaps():
    rng = np.random.default_rng(3)
    centres = rng.uniform(50, 250, (6, 2))
    xy = centres[rng.integers(0, 6, 300)] + rng.normal(0, 3, (300, 2))
    wh = rng.uniform(40, 60, (300, 2))
    cls = rng.uniform(0, 1, (300, 2))
    pred = np.concatenate([xy, wh, np.ones((300, 1)), cls], 1).astype(np.float32)
    got = assert_same(pred)
    assert len(got.scores) < 60
    assert_same(pred, iou=0.9)


def test_nms_more_than_max_nms_and_max_det():
    rng = np.random.default_rng(11)
    pred = random_pred(rng, 120, 5, score_levels=[0.1, 0.2, 0.2, 0.9])
    got = assert_same(pred, max_nms=100, max_det=30)
    assert len(got.scores) == 30
    assert_same(pred, max_nms=7)


def test_nms_no_candidates_and_thresholds_strict():
    rng = np.random.default_rng(0)
    pred = random_pred(rng, 10, 3)
    pred[:, 4] = 0.03  # conf column not > 0.03
    assert len(nms(pred).scores) == 0 and ref_nms(pred)[1] == []
    pred[:, 4] = 1.0
    pred[:, 5:] = np.float32(0.03)
    assert len(nms(pred).scores) == 0
    assert len(nms(np.zeros((0, 85), np.float32)).scores) == 0
    pred[:, 5:] = np.nan
    assert len(nms(pred).scores) == 0
    with pytest.raises(ValueError, match="5 \\+ classes"):
        nms(np.zeros((4, 5)))


def test_nms_degenerate_and_v1_objectness():
    rng = np.random.default_rng(5)
    pred = random_pred(rng, 60, 3, conf_col=rng.choice([0.02, 0.5, 1.0], (60, 1)))
    pred[:10, 2:4] = 0.0  # zero-area boxes: IoU 0/0 never suppresses
    pred[10:15, 2:4] = -5.0  # negative sizes
    assert_same(pred)


def test_nms_class_offset_separates_classes():
    box = [100, 100, 50, 50, 1.0]
    pred = np.array([box + [0.9, 0.8], box + [0.7, 0.0]], np.float32)
    got = nms(pred)
    assert got.classes.tolist() == [0, 1] and got.scores.tolist() == pytest.approx([0.9, 0.8])


def test_nms_full_size_fast():
    import time

    rng = np.random.default_rng(1)
    pred = random_pred(rng, 8400, 80, conf_col=None)
    pred[:, :2] *= 2
    t = time.perf_counter()
    got = nms(pred)
    assert len(got.scores) == 300 and time.perf_counter() - t < 10
    assert np.all(np.diff(got.scores.astype(np.float64)) <= 0)


# ----------------------------------------------------------------------------- data sources

def _write_coco(tmp_path, sizes=((40, 60), (50, 30)), make_images=True):
    folder = tmp_path / "images"
    folder.mkdir()
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        name = f"{i + 1:012d}.jpg"
        if make_images:
            Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(folder / name)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 2, 10, 12], "area": 120,
                     "iscrowd": 0})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return folder, path, doc


def test_coco_source_synthetic(tmp_path):
    folder, path, _ = _write_coco(tmp_path)
    src = CocoSource(folder, path, image_size=64)
    assert src.num_images == 2 and src.image_ids.tolist() == [1, 2] and src.category_ids == (1,)
    batches = list(src.iter_batches(1))
    canvases, infos, ids = batches[1]
    assert canvases.shape == (1, 64, 64, 3) and ids.tolist() == [2]
    assert infos[0] == LetterboxInfo(64 / 50, 13, 0, 50, 30)
    assert src.count(1) == 1 and len(list(src.iter_batches(5, limit=1))) == 1


def test_coco_source_errors(tmp_path):
    folder, path, doc = _write_coco(tmp_path)
    (folder / "000000000002.jpg").unlink()
    with pytest.raises(DataError, match="000000000002.jpg \\(id 2\\) is not in"):
        CocoSource(folder, path)
    path.write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON"):
        CocoSource(folder, path)
    for bad, msg in ((dict(doc, images=None), "'images' missing"),
                     (dict(doc, annotations=[dict(doc["annotations"][0], image_id=99)]), "image id 99"),
                     (dict(doc, annotations=[dict(doc["annotations"][0], category_id=5)]), "category id 5"),
                     (dict(doc, images=[dict(doc["images"][0], file_name=3)]), "'file_name'"),
                     (dict(doc, images=doc["images"] + [doc["images"][0]]), "appears twice")):
        path.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=msg):
            CocoSource(folder, path)
    with pytest.raises(FileNotFoundError):
        CocoSource(folder, tmp_path / "nope.json")
    assert issubclass(DataError, ValueError)


def test_coco_source_decode_errors(tmp_path, monkeypatch):
    import cfws_jax.data.preprocess as pre

    folder, path, doc = _write_coco(tmp_path)
    doc["images"][0]["width"] = 61
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="000000000001.jpg: decoded size 60x40 differs"):
        CocoSource(folder, path).load([0])
    doc["images"][0]["width"] = 60
    path.write_text(json.dumps(doc))
    monkeypatch.setattr(pre, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="000000000001.jpg.*pixels"):
        CocoSource(folder, path).load([0])
    (folder / "000000000002.jpg").write_bytes(b"not a jpeg")
    monkeypatch.setattr(pre, "MAX_IMAGE_PIXELS", 1 << 26)
    with pytest.raises(DataError, match="000000000002.jpg"):
        CocoSource(folder, path).load([1])


def test_letterbox_folder_source(tmp_path):
    folder, _, _ = _write_coco(tmp_path)
    src = open_source(folder, protocol="letterbox", image_size=32)
    assert src.num_images == 2 and src.num_classes == 0 and src.image_size == (32, 32)
    x, y = src.load([0, 1])
    assert x.dtype == np.float32 and x.shape == (2, 32, 32, 3) and y.tolist() == [-1, -1]
    ref = letterbox(np.asarray(Image.open(folder / "000000000002.jpg").convert("RGB")), 32)[0]
    np.testing.assert_array_equal(x[1], ref.astype(np.float32) / np.float32(255))
    assert "letterbox 32x32" in src.describe()


def test_letterbox_source_on_coco128():
    folder = shared_file(COCO_IMAGES)
    src = open_source(folder, protocol="letterbox", image_size=320, load_size=318)
    assert src.num_images == 128
    x, _, infos = src.load_with_info([0, 5])
    assert x.shape == (2, 320, 320, 3) and 0.0 <= x.min() and x.max() <= 1.0
    assert max(round(infos[0].orig_w * infos[0].ratio), round(infos[0].orig_h * infos[0].ratio)) == 318


def test_coco128_source():
    src = CocoSource(shared_file(COCO_IMAGES), shared_file(COCO_JSON), image_size=320)
    assert src.num_images == 128 and src.image_ids[0] == 9 and len(src.category_ids) == 80
    assert list(src.image_ids) == sorted(src.image_ids)
    canvases, infos, ids = src.load([0, 1])
    assert canvases.shape == (2, 320, 320, 3) and ids.tolist() == [9, 25]
    assert infos[0] == LetterboxInfo(0.5, 0, 40, 480, 640)


def test_greedy_nms_chunking_invariant():
    from cfws_jax.detection.nms import greedy_nms

    rng = np.random.default_rng(9)
    xy = rng.uniform(0, 60, (400, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 30, (400, 2))], 1)
    scores = rng.choice([0.2, 0.4, 0.6], 400)
    ref = greedy_nms(boxes, scores, 0.5, 1000, chunk=1)
    for chunk in (3, 64, 512):
        np.testing.assert_array_equal(greedy_nms(boxes, scores, 0.5, 1000, chunk=chunk), ref)
        np.testing.assert_array_equal(greedy_nms(boxes, scores, 0.5, 9, chunk=chunk), ref[:9])
