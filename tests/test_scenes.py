"""Synthetic CIFAR-10 detection scenes (:mod:`cfws_jax.data.scenes`): determinism, split
hygiene, the overlap rule, class balance, the COCO folder, and its scoring through the
project's COCO evaluation path. Fake arrays except the one shared-data test."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from cfws_jax.data import DataError
from cfws_jax.data.scenes import (
    SceneConfig, iter_scene_batches, load_cifar_split, make_scene, resize_bilinear, scene_batch,
    scene_layout, write_coco_scenes,
)

SMALL = SceneConfig(canvas=64, min_size=0.2, max_size=0.6)


def fake_split(n=200, seed=0, offset=0):
    """Random images (uint8 [n, 32, 32, 3]) with balanced labels 0..9 (sorted, like the shared copy)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = (np.arange(n) * 10 // n + offset).astype(np.int64) % 10
    return x, y


def owner_map(boxes, s):
    """Which box each pixel shows when the boxes are painted in order (-1: background)."""
    owner = np.full((s, s), -1, np.int64)
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.int64)):
        owner[y1:y2, x1:x2] = k
    return owner


# ----------------------------------------------------------------------------- config, resampler

def test_config_validation():
    assert SceneConfig().canvas == 256
    for bad in (dict(canvas=100), dict(canvas=0), dict(min_objects=0), dict(min_objects=4, max_objects=3),
                dict(min_size=0.7, max_size=0.6), dict(max_size=1.5), dict(min_visible=0), dict(max_tries=0),
                dict(canvas=32, min_size=0.05)):
        with pytest.raises(ValueError, match="SceneConfig"):
            SceneConfig(**bad)
    with pytest.raises(dataclasses_frozen_error()):
        SceneConfig().canvas = 128


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_resize_bilinear_reference():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    np.testing.assert_array_equal(resize_bilinear(img, 2, 3), img)  # same size: identity
    np.testing.assert_array_equal(resize_bilinear(np.full((5, 7, 3), 77, np.uint8), 13, 4), 77)
    # 1-D half-pixel reference: [0, 100] -> 4 samples at src -0.25, 0.25, 0.75, 1.25 (clamped)
    row = np.array([0, 100], np.uint8).reshape(1, 2, 1)
    np.testing.assert_array_equal(resize_bilinear(row, 1, 4)[0, :, 0], [0, 25, 75, 100])
    out = resize_bilinear(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8), 24, 50)
    assert out.shape == (24, 50, 3) and out.dtype == np.uint8


# ----------------------------------------------------------------------------- determinism

def test_bit_reproducible_in_any_order_and_batching():
    x, y = fake_split()
    idx = list(range(7))
    batch = scene_batch(x, y, idx, split="train", seed=3, cfg=SMALL)
    again = scene_batch(x, y, idx, split="train", seed=3, cfg=SMALL)
    for k in ("images", "boxes", "classes", "mask"):
        assert batch[k].tobytes() == again[k].tobytes()
    for i in reversed(idx):  # one at a time, reverse order
        img, boxes, classes = make_scene(x, y, i, split="train", seed=3, cfg=SMALL)
        n = len(boxes)
        assert img.tobytes() == batch["images"][i].tobytes()
        assert boxes.tobytes() == batch["boxes"][i, :n].tobytes() and classes.tobytes() == batch["classes"][i, :n].tobytes()
    streamed = list(iter_scene_batches(x, y, split="train", seed=3, cfg=SMALL, batch_size=3, count=7))
    assert [len(b["images"]) for b in streamed] == [3, 3, 1]
    assert np.concatenate([b["images"] for b in streamed]).tobytes() == batch["images"].tobytes()
    offset = next(iter_scene_batches(x, y, split="train", seed=3, cfg=SMALL, batch_size=2, start=5))
    assert offset["images"].tobytes() == batch["images"][5:7].tobytes()
    assert offset["indices"].tolist() == [5, 6]
    # seed and split each change the scenes
    assert make_scene(x, y, 0, split="train", seed=4, cfg=SMALL)[0].tobytes() != batch["images"][0].tobytes()
    assert make_scene(x, y, 0, split="test", seed=3, cfg=SMALL)[0].tobytes() != batch["images"][0].tobytes()


def test_golden_checksum():
    """The same bytes on every machine: a fixed scene of fixed inputs hashes to a fixed value."""
    x = (np.arange(20 * 32 * 32 * 3) % 251).astype(np.uint8).reshape(20, 32, 32, 3)
    y = np.arange(20) % 10
    img, boxes, classes = make_scene(x, y, 12, split="test", seed=7, cfg=SceneConfig(canvas=96))
    digest = hashlib.sha256(img.tobytes() + boxes.tobytes() + classes.tobytes()).hexdigest()
    assert digest == GOLDEN


GOLDEN = "50328947d13d4d102e1d3cf28f045aa0833dd57684cabb83c23caa7b8efe1e89"


# ----------------------------------------------------------------------------- content

def test_objects_come_from_the_given_split_and_backgrounds_do_not():
    x, y = fake_split()
    s = SMALL.canvas
    for i in range(20):
        plan = scene_layout(len(x), i, split="test", seed=1, cfg=SMALL)
        img, boxes, classes = make_scene(x, y, i, split="test", seed=1, cfg=SMALL)
        assert [p.source for p in plan] and all(0 <= p.source < len(x) for p in plan)
        np.testing.assert_array_equal(boxes, [[p.x1, p.y1, p.x2, p.y2] for p in plan])
        np.testing.assert_array_equal(classes, y[[p.source for p in plan]])
        owner = owner_map(boxes, s)
        for k, p in enumerate(plan):  # every visible object pixel is the resized source image
            patch = resize_bilinear(x[p.source], p.y2 - p.y1, p.x2 - p.x1)
            vis = owner[p.y1:p.y2, p.x1:p.x2] == k
            np.testing.assert_array_equal(img[p.y1:p.y2, p.x1:p.x2][vis], patch[vis])
        # the background is the same whatever the images: no pixel of any split leaks into it
        other = make_scene(255 - x, (y + 1) % 10, i, split="test", seed=1, cfg=SMALL)
        bg = owner < 0
        np.testing.assert_array_equal(img[bg], other[0][bg])
        assert bg.any()
    # the split's arrays are the only source: a test scene made from a one-image array shows only that image
    one = make_scene(x[:1], y[:1], 0, split="test", seed=1, cfg=SMALL)
    assert set(one[2].tolist()) == {int(y[0])}


def test_boxes_inside_visible_and_sized():
    x, y = fake_split()
    for cfg in (SceneConfig(canvas=128), SceneConfig(canvas=256, max_objects=8)):
        s, counts, sizes = cfg.canvas, [], []
        for i in range(60):
            plan = scene_layout(len(x), i, split="train", seed=0, cfg=cfg)
            boxes = np.asarray([[p.x1, p.y1, p.x2, p.y2] for p in plan])
            assert boxes.min() >= 0 and boxes[:, 2:].max() <= s
            assert np.all(boxes[:, 2:] > boxes[:, :2])
            owner = owner_map(boxes, s)
            for k, p in enumerate(plan):
                area = (p.x2 - p.x1) * (p.y2 - p.y1)
                visible = (owner[p.y1:p.y2, p.x1:p.x2] == k).sum() / area
                assert visible >= cfg.min_visible and visible == pytest.approx(p.visible)
            counts.append(len(plan))
            sizes += np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist()
        assert cfg.min_objects <= min(counts) and max(counts) <= cfg.max_objects and np.mean(counts) > 2
        # sizes scale with the canvas: sqrt(w h) within [min, max] * canvas (rounding: 1 px)
        assert min(sizes) >= cfg.min_size * s - 1 and max(sizes) <= cfg.max_size * s + 1
        assert max(sizes) > 0.4 * s and min(sizes) < 0.15 * s


def test_class_balance():
    x, y = fake_split(n=500)
    counts = np.zeros(10, np.int64)
    for b in iter_scene_batches(x, y, split="train", seed=0, cfg=SceneConfig(canvas=64, min_size=0.25),
                                batch_size=50, count=400):
        counts += np.bincount(b["classes"][b["mask"]], minlength=10)
    mean = counts.sum() / 10
    assert counts.sum() > 800 and np.all(np.abs(counts - mean) < 0.25 * mean), counts


def test_batch_padding_and_errors():
    x, y = fake_split()
    b = scene_batch(x, y, [0, 1, 2], split="train", seed=0, cfg=SMALL, max_boxes=10)
    assert b["images"].shape == (3, 64, 64, 3) and b["images"].dtype == np.uint8
    assert b["boxes"].shape == (3, 10, 4) and b["boxes"].dtype == np.float32
    assert b["classes"].shape == (3, 10) and b["classes"].dtype == np.int32 and b["mask"].dtype == bool
    assert np.all(b["boxes"][~b["mask"]] == 0) and np.all(b["classes"][~b["mask"]] == 0)
    assert np.all(b["mask"].sum(1) >= 1) and np.all(np.diff(b["mask"].astype(int), axis=1) <= 0)
    assert scene_batch(x, y, [0], split="train", seed=0, cfg=SMALL)["boxes"].shape == (1, 6, 4)
    with pytest.raises(ValueError, match="max_boxes"):
        scene_batch(x, y, [0], split="train", seed=0, cfg=SMALL, max_boxes=3)
    with pytest.raises(ValueError, match="split"):
        make_scene(x, y, 0, split="val", seed=0, cfg=SMALL)
    with pytest.raises(ValueError, match="uint8"):
        make_scene(x.astype(np.float32), y, 0, split="train", seed=0, cfg=SMALL)
    with pytest.raises(ValueError, match="labels"):
        make_scene(x, y[:-1], 0, split="train", seed=0, cfg=SMALL)
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_scene_batches(x, y, split="train", seed=0, cfg=SMALL, batch_size=0))


# ----------------------------------------------------------------------------- loading

def test_load_cifar_split_errors(tmp_path):
    x, y = fake_split(n=20)
    good = tmp_path / "c.npz"
    np.savez(good, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    xt, yt = load_cifar_split(good, "test")
    assert xt.shape == (10, 32, 32, 3) and yt.dtype == np.int32
    with pytest.raises(FileNotFoundError):
        load_cifar_split(tmp_path / "missing.npz", "train")
    np.savez(tmp_path / "nokey.npz", x_train=x, y_train=y)
    with pytest.raises(DataError, match="nokey.npz.*x_test"):
        load_cifar_split(tmp_path / "nokey.npz", "test")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_cifar_split(tmp_path / "junk.npz", "train")
    with pytest.raises(ValueError, match="split"):
        load_cifar_split(good, "val")


# ----------------------------------------------------------------------------- COCO folder

CLASS_NAMES = [f"class{c}" for c in range(10)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    pytest.importorskip("pycocotools")
    x, y = fake_split()
    out = tmp_path_factory.mktemp("scenes") / "held_out"
    image_dir, json_path = write_coco_scenes(out, x, y, split="test", seed=2, cfg=SMALL, count=12,
                                             class_names=CLASS_NAMES, start=5)
    return x, y, image_dir, json_path


def test_written_folder_loads_with_pycocotools(written):
    from pycocotools.coco import COCO

    x, y, image_dir, json_path = written
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(json_path)
    assert sorted(coco.getImgIds()) == list(range(6, 18))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASS_NAMES
    assert sorted(os.listdir(image_dir)) == sorted(im["file_name"] for im in coco.dataset["images"])
    assert sorted(os.listdir(os.path.dirname(image_dir))) == ["images", "instances.json"]
    for image_id in (6, 17):
        _, boxes, classes = make_scene(x, y, image_id - 1, split="test", seed=2, cfg=SMALL)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert [a["category_id"] - 1 for a in anns] == classes.tolist()
        np.testing.assert_array_equal([a["bbox"] for a in anns], np.c_[boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])
        assert all(a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3] for a in anns)
    assert json.loads(open(json_path).read())["info"]["config"]["canvas"] == 64


def test_written_folder_refuses_to_overwrite(written, tmp_path):
    from cfws_jax.io import OutputError

    x, y, image_dir, _ = written
    out = os.path.dirname(image_dir)
    with pytest.raises(OutputError):
        write_coco_scenes(out, x, y, split="test", seed=2, cfg=SMALL, count=2, class_names=CLASS_NAMES)
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="non-empty"):
        write_coco_scenes(tmp_path, x, y, split="test", seed=2, cfg=SMALL, count=2, class_names=CLASS_NAMES)
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]
    with pytest.raises(ValueError, match="class names"):
        write_coco_scenes(tmp_path / "new", x, y, split="test", seed=2, cfg=SMALL, count=2, class_names=["a"])
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]  # nothing left behind


def test_coco_source_reads_the_folder(written):
    from cfws_jax.data.coco import CocoSource

    x, y, image_dir, json_path = written
    src = CocoSource(image_dir, json_path, image_size=SMALL.canvas)
    assert src.num_images == 12 and src.image_ids.tolist() == list(range(6, 18))
    assert src.category_ids == tuple(range(1, 11))
    canvases, infos, ids = src.load(np.arange(12))
    for canvas, info, image_id in zip(canvases, infos, ids):
        assert info.ratio == 1.0 and info.pad_x == info.pad_y == 0
        img = make_scene(x, y, int(image_id) - 1, split="test", seed=2, cfg=SMALL)[0]
        assert np.abs(canvas.astype(int) - img).mean() < 4  # JPEG quality 95


def gt_detector(src, nc=10):
    """A fake ``nc``-class detector: recognises each canvas by its bytes and emits the scene's
    ground truth in the decoded layout ``[B, rows, 5 + nc]`` with the class *index* (not id)."""
    import jax
    import jax.numpy as jnp

    rows = 8
    canvases, _, ids = src.load(np.arange(src.num_images))
    table = {}
    for canvas, image_id in zip(canvases, ids):
        out = np.zeros((rows, 5 + nc), np.float32)
        for j, a in enumerate(src.coco.loadAnns(src.coco.getAnnIds(imgIds=[int(image_id)]))):
            bx, by, bw, bh = a["bbox"]
            out[j, :5] = [bx + bw / 2, by + bh / 2, bw, bh, 1.0]
            out[j, 5 + a["category_id"] - 1] = 0.9
        table[canvas.tobytes()] = out

    def host(x):
        imgs = np.rint(np.asarray(x) * 255).astype(np.uint8)
        return np.stack([table.get(img.tobytes(), np.zeros((rows, 5 + nc), np.float32)) for img in imgs])

    return lambda x: jax.pure_callback(host, jax.ShapeDtypeStruct((x.shape[0], rows, 5 + nc), jnp.float32), x)


def test_ground_truth_scores_ap_one(written):
    """GT as detections through the project's COCO scoring gives AP 1.0; a 10-class model's class
    index maps to these category ids (class_to_category), end to end through evaluate_detector."""
    from cfws_jax.data.coco import CocoSource
    from cfws_jax.detection import class_to_category, coco_evaluate, to_coco_results
    from cfws_jax.detection.evaluate import evaluate_detector

    x, y, image_dir, json_path = written
    src = CocoSource(image_dir, json_path, image_size=SMALL.canvas)
    cat_map = class_to_category(src.category_ids, 10)
    assert cat_map.tolist() == list(range(1, 11))
    dets = []
    for image_id in src.image_ids.tolist():
        _, boxes, classes = make_scene(x, y, image_id - 1, split="test", seed=2, cfg=SMALL)
        dets += to_coco_results(image_id, boxes, np.ones(len(boxes)), classes, cat_map)
    res = coco_evaluate(src.coco, dets, img_ids=src.image_ids)
    assert res["mAP"] == 1.0 and res["mAP50"] == 1.0
    wrong = [dict(d, category_id=d["category_id"] % 10 + 1) for d in dets]  # off-by-one class map
    assert coco_evaluate(src.coco, wrong, img_ids=src.image_ids)["mAP"] == 0.0
    res = evaluate_detector(gt_detector(src), src, batch_size=5, progress=False)
    assert res["images"] == 12 and res["mAP"] == 1.0


# ----------------------------------------------------------------------------- shared CIFAR-10

def test_shared_cifar_scenes(shared_data):
    path = shared_data("cifar10_jpeg_yoongikim.npz")
    xtr, ytr = load_cifar_split(path, "train")
    xte, yte = load_cifar_split(path, "test")
    assert xtr.shape == (50000, 32, 32, 3) and xte.shape == (10000, 32, 32, 3) and ytr.dtype == np.int32
    b = scene_batch(xte, yte, range(16), split="test", seed=0, cfg=SceneConfig())
    assert b["images"].shape == (16, 256, 256, 3) and b["mask"].sum() >= 16
    sources = [p.source for i in range(200) for p in scene_layout(len(xte), i, split="test", seed=0)]
    assert len(set(np.asarray(yte)[sources].tolist())) == 10  # drawn over the whole (class-sorted) split


# ----------------------------------------------------------------------------- CLI

def test_cli_scenes_then_eval_detect(tmp_path, monkeypatch, capsys):
    """``cfws-jax scenes`` writes a folder that ``cfws-jax eval --task detect`` scores unchanged
    (a fake 10-class detector emitting the ground truth: mAP 1.0)."""
    pytest.importorskip("pycocotools")
    from cfws_jax import cli
    from cfws_jax.commands import eval as eval_cmd
    from cfws_jax.data.coco import CocoSource

    x, y = fake_split(n=40)
    npz = tmp_path / "c.npz"
    np.savez(npz, x_train=x, y_train=y, x_test=x[::2], y_test=y[::2], classes=np.array(CLASS_NAMES))
    out = tmp_path / "scenes"
    argv = ["scenes", "--data", str(npz), "--split", "test", "--count", "6", "--canvas", "64", "--seed", "1",
            "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert "wrote 6 test scenes" in capsys.readouterr().out
    image_dir, json_path = out / "images", out / "instances.json"
    _, boxes, _ = make_scene(x[::2], y[::2], 3, split="test", seed=1, cfg=SceneConfig(canvas=64))
    src = CocoSource(image_dir, json_path, image_size=64)
    assert len(src.coco.getAnnIds(imgIds=[4])) == len(boxes)
    assert cli.main(argv) == 1 and "refusing" in capsys.readouterr().err  # never overwrites
    monkeypatch.setattr(eval_cmd, "build_apply_fn", lambda arch, **kw: gt_detector(src))
    rc = cli.main(["eval", "--task", "detect", "--arch", "yolov6n_v3", "--params", str(tmp_path), "--data",
                   str(image_dir), "--annotations", str(json_path), "--image-size", "64", "--batch-size", "4",
                   "--json", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    doc = json.loads(cap.out.strip().splitlines()[-1])
    assert doc["images"] == 6 and doc["mAP"] == 1.0
