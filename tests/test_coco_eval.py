"""COCO scoring (vs direct pycocotools calls on independently built detection lists), the
whole detection evaluation pipeline on a fake model, and ``cfws-jax eval --task detect``."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("PIL")

from cfws_jax import cli  # noqa: E402
from cfws_jax.data.coco import CocoSource, read_instances  # noqa: E402
from cfws_jax.detection import COCO80_TO_COCO91, STAT_NAMES, class_to_category, coco_evaluate, to_canvas  # noqa: E402
from cfws_jax.detection.coco import coco_from_dict  # noqa: E402
from tests.conftest import shared_file  # noqa: E402

COCO_IMAGES = "coco128/train2017"
COCO_JSON = "coco128/annotations/instances_train2017.json"


def _error_lines(err: str) -> list[str]:
    """stderr without the informational ``devices:`` / ``data:`` lines: what is left is the error."""
    return [line for line in err.strip().splitlines() if not line.startswith(("devices:", "data:"))]


@pytest.fixture(scope="module")
def gt():
    return coco_from_dict(read_instances(shared_file(COCO_JSON)))


def direct_stats(coco_gt, dets, img_ids=None):
    """pycocotools called directly, the documented way."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def check(coco_gt, dets, img_ids=None):
    res = coco_evaluate(coco_gt, dets, img_ids)
    stats = [res["stats"][k] for k in STAT_NAMES]
    assert stats == direct_stats(coco_gt, dets, img_ids)
    assert res["mAP"] == stats[0] and res["mAP50"] == stats[1]
    return res


def gt_detections(coco_gt, score=1.0, img_ids=None):
    keep = None if img_ids is None else set(img_ids)
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score}
            for a in coco_gt.dataset["annotations"] if keep is None or a["image_id"] in keep]


@pytest.fixture(scope="module")
def sub(gt):
    """The first 40 image ids: perturbation tests score on these (fast COCOeval)."""
    return sorted(gt.getImgIds())[:40]


def test_class_map(gt):
    ids = sorted(c["id"] for c in gt.dataset["categories"])
    assert tuple(ids) == COCO80_TO_COCO91 and len(set(COCO80_TO_COCO91)) == 80
    np.testing.assert_array_equal(class_to_category(ids, 80), COCO80_TO_COCO91)
    np.testing.assert_array_equal(class_to_category([7, 3, 5], 3), [3, 5, 7])
    with pytest.raises(ValueError, match="predicts 4 classes"):
        class_to_category([7, 3, 5], 4)


def test_ground_truth_scores_one(gt):
    dets = gt_detections(gt)
    res = check(gt, dets)
    assert res["mAP"] == 1.0 and res["mAP50"] == 1.0
    assert "iscrowd" not in dets[0]  # inputs are not modified


def test_no_detections_scores_zero(gt):
    res = coco_evaluate(gt, [])
    assert res["mAP"] == 0.0 and res["stats"]["AR100"] == 0.0


def test_shifted_boxes_lower_map_monotonically(gt, sub):
    maps = [1.0]
    for k in (2, 6, 15):
        dets = gt_detections(gt, img_ids=sub)
        for d in dets:
            d["bbox"][0] += k
            d["bbox"][1] += k
        maps.append(check(gt, dets, sub)["mAP"])
    assert maps[0] == 1.0 and all(a > b for a, b in zip(maps, maps[1:]))


def test_dropped_class_lowers_map_by_its_share(gt, sub):
    with_gt = {a["category_id"] for a in gt.dataset["annotations"] if not a["iscrowd"] and a["image_id"] in sub}
    dets = [d for d in gt_detections(gt, img_ids=sub) if d["category_id"] != 1]
    res = check(gt, dets, sub)
    assert res["mAP"] == pytest.approx((len(with_gt) - 1) / len(with_gt), abs=1e-12)


def test_duplicates(gt, sub):
    dets = gt_detections(gt, img_ids=sub)
    lower = dets + [dict(d, bbox=list(d["bbox"]), score=0.5) for d in dets]
    assert check(gt, lower, sub)["mAP"] == 1.0  # extra false positives ranked after every true positive
    rng = np.random.default_rng(0)
    same = []
    for d in dets:
        s = float(rng.uniform(0.1, 1.0))
        pair = [dict(d, bbox=list(d["bbox"]), score=s) for _ in range(2)]
        same.extend(pair)
    rng.shuffle(same)
    res = check(gt, same, sub)
    assert res["mAP"] < 1.0 and res["stats"]["AR100"] == 1.0


def test_shuffled_scores_with_false_positives(gt, sub):
    dets = gt_detections(gt, 0.9, img_ids=sub)
    fps = [dict(d, bbox=[d["bbox"][0] + d["bbox"][2] + 5, d["bbox"][1], d["bbox"][2], d["bbox"][3]], score=0.1)
           for d in dets]
    ranked = check(gt, dets + fps, sub)
    assert ranked["mAP"] == 1.0
    rng = np.random.default_rng(1)
    mixed = dets + fps
    scores = rng.permutation([d["score"] for d in mixed])
    shuffled = [dict(d, score=float(s)) for d, s in zip(mixed, scores)]
    assert check(gt, shuffled, sub)["mAP"] < ranked["mAP"]


def test_img_ids_restrict(gt, sub):
    ids = sub[:5]
    dets = gt_detections(gt, img_ids=ids)
    assert check(gt, dets, ids)["mAP"] == 1.0
    assert check(gt, dets, sub)["mAP"] < 1.0


# ----------------------------------------------------------------------------- pipeline

def gt_apply_fn(src: CocoSource, limit: int, rows: int = 64, score: float = 0.9):
    """A fake detector: recognises each letterboxed image by its pixels (host callback) and emits
    its ground truth boxes in canvas coordinates, ``[B, rows, 85]`` decoded layout."""
    import jax
    import jax.numpy as jnp

    cls_of = {c: i for i, c in enumerate(COCO80_TO_COCO91)}
    canvases, infos, ids = src.load(src.subset(limit))
    table = {}
    for canvas, info, image_id in zip(canvases, infos, ids):
        out = np.zeros((rows, 85), np.float32)
        anns = src.coco.loadAnns(src.coco.getAnnIds(imgIds=[int(image_id)]))
        for j, a in enumerate(anns[:rows]):
            x, y, w, h = a["bbox"]
            b = to_canvas([[x, y, x + w, y + h]], info)[0]
            out[j, :5] = [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1], 1.0]
            out[j, 5 + cls_of[a["category_id"]]] = score
        table[hashlib.sha1(canvas.tobytes()).hexdigest()] = out

    def host(x):
        x = np.asarray(x)
        out = np.zeros((len(x), rows, 85), np.float32)
        for i, img in enumerate(x):
            key = hashlib.sha1(np.rint(img * 255).astype(np.uint8).tobytes()).hexdigest()
            if key in table:
                out[i] = table[key]
        return out

    def apply_fn(x):
        return jax.pure_callback(host, jax.ShapeDtypeStruct((x.shape[0], rows, 85), jnp.float32), x)

    return apply_fn


@pytest.fixture(scope="module")
def coco_src():
    return CocoSource(shared_file(COCO_IMAGES), shared_file(COCO_JSON), image_size=320)


def test_pipeline_on_fake_detector(coco_src):
    from cfws_jax.detection.evaluate import evaluate_detector

    limit = 10
    res = evaluate_detector(gt_apply_fn(coco_src, limit), coco_src, batch_size=4, limit=limit, progress=False)
    sel = np.floor((np.arange(limit) + 0.5) * coco_src.num_images / limit).astype(int)  # evenly spaced
    ids = coco_src.image_ids[sel].tolist()
    assert res["subset"] == f"{limit} of {coco_src.num_images} images, evenly spaced"
    assert res["images"] == limit and res["detections"] == len(res["results"]) > 0
    assert res["mAP"] > 0.95 and res["mAP50"] > 0.95
    stats = direct_stats(coco_src.coco, res["results"], ids)
    assert [res["stats"][k] for k in STAT_NAMES] == stats
    for d in res["results"]:
        assert set(d) == {"image_id", "category_id", "bbox", "score"}
        assert d["image_id"] in ids and d["category_id"] in COCO80_TO_COCO91 and d["score"] == 0.9
        assert len(d["bbox"]) == 4 and min(d["bbox"][2:]) >= 0
    json.dumps(res["results"])
    # boxes come back to original pixels: each matches a GT box of its image within 1 px
    for d in res["results"][:50]:
        anns = coco_src.coco.loadAnns(coco_src.coco.getAnnIds(imgIds=[d["image_id"]]))
        err = min(np.abs(np.subtract(a["bbox"], d["bbox"])).max() for a in anns)
        assert err < 1.0


def test_pipeline_limit_restricts_and_errors(coco_src):
    from cfws_jax.detection.evaluate import evaluate_detector

    res = evaluate_detector(gt_apply_fn(coco_src, 3), coco_src, batch_size=8, limit=3, progress=False)
    assert res["images"] == 3 and res["mAP"] > 0.95
    with pytest.raises(ValueError, match="decoded predictions"):
        evaluate_detector(lambda x: x.reshape(x.shape[0], -1), coco_src, batch_size=2, limit=2, progress=False)


def run_cli(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_detect_fake_model(coco_src, monkeypatch, capsys, tmp_path):
    from cfws_jax.commands import eval as eval_cmd

    fake = gt_apply_fn(coco_src, 4)
    monkeypatch.setattr(eval_cmd, "build_apply_fn", lambda arch, params=None, quantized=None: fake)
    out_json = tmp_path / "res.json"
    base = ["eval", "--task", "detect", "--arch", "yolov6n_v2", "--params", str(tmp_path), "--data",
            coco_src.spec, "--annotations", coco_src.annotations, "--image-size", "320", "--limit", "4",
            "--batch-size", "3", "--no-progress"]
    rc, out, err = run_cli(base + ["--json", "--results-json", str(out_json)], capsys)
    assert rc == 0, err
    doc = json.loads(out.strip().splitlines()[-1])
    assert set(doc) == {"mAP", "mAP50", "stats", "images", "detections", "subset", "devices"} and doc["images"] == 4
    import jax

    assert doc["devices"] == [str(d) for d in jax.local_devices()] and "devices: " in err
    assert doc["mAP"] > 0.95 and set(doc["stats"]) == set(STAT_NAMES)
    written = json.loads(out_json.read_text())
    assert len(written) == doc["detections"] and set(written[0]) == {"image_id", "category_id", "bbox", "score"}
    rc, out, err = run_cli(base, capsys)
    assert rc == 0 and "AP @[IoU=0.50:0.95 | area=all | maxDets=100]" in out and "mAP@.5:.95" in out
    rc, out, err = run_cli(base + ["--results-json", str(out_json)], capsys)  # exists, no --overwrite
    assert rc == 1 and "already exists" in err and len(_error_lines(err)) == 1


def test_cli_detect_errors(tmp_path, capsys):
    base = ["eval", "--task", "detect", "--arch", "yolov6n_v2", "--params", str(tmp_path), "--data", str(tmp_path)]
    rc, _, err = run_cli(base, capsys)
    assert rc == 1 and "--annotations" in err
    (tmp_path / "bad.json").write_text("{")
    rc, _, err = run_cli(base + ["--annotations", str(tmp_path / "bad.json")], capsys)
    assert rc == 1 and "not valid JSON" in err and len(_error_lines(err)) == 1
    rc, _, err = run_cli(base + ["--annotations", str(tmp_path / "bad.json"), "--iou", "2"], capsys)
    assert rc == 1 and "--iou" in err


def test_cli_detect_random_yolov6(tmp_path, capsys):
    """``eval --task detect --params`` on a random-weight yolov6n_v2 folder (no conversion)."""
    pytest.importorskip("cfws_jax.models.yolov6")
    from cfws_jax.io import save_variables
    from cfws_jax.models import create_model
    from cfws_jax.models.registry import list_models
    from tests.conftest import numpy_init

    if "yolov6n_v2" not in list_models():
        pytest.skip("yolov6n_v2 not registered yet")
    images, ann = shared_file(COCO_IMAGES), shared_file(COCO_JSON)
    model = create_model("yolov6n_v2")
    variables = numpy_init(model, (1, 320, 320, 3), train=False)
    params = save_variables(tmp_path / "v", variables, {"arch": "yolov6n_v2", "form": "train"})
    rc, out, err = run_cli(["eval", "--task", "detect", "--arch", "yolov6n_v2", "--params", str(params),
                            "--data", str(images), "--annotations", str(ann), "--image-size", "320",
                            "--limit", "4", "--batch-size", "2", "--json", "--no-progress"], capsys)
    assert rc == 0, err
    doc = json.loads(out.strip().splitlines()[-1])
    assert doc["images"] == 4 and 0.0 <= doc["mAP"] <= 1.0 and len(doc["stats"]) == 12
