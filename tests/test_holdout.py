"""Calibration images kept apart from evaluation (issue #23): ``ptq`` records them, ``eval`` warns
or, with ``--exclude-calib``, leaves them out; the record names images across source classes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfws_jax.cli import main
from cfws_jax.data import open_source
from cfws_jax.data.holdout import calibration_overlap, calibration_record, image_keys
from cfws_jax.data.source import subset_indices


def _npz(path, n_train=30, n_test=40, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, 8, 8, 3), dtype=np.uint8),
             y_train=np.sort(rng.integers(0, 4, n_train)),
             x_test=rng.integers(0, 256, (n_test, 8, 8, 3), dtype=np.uint8), y_test=np.sort(rng.integers(0, 4, n_test)))
    return path


def ref_subset_without(labels, excluded, n):
    """Slow reference: drop ``excluded``, then stratify what is left (largest remainder, evenly spaced)."""
    keep = [i for i in range(len(labels)) if i not in set(excluded)]
    lab = [labels[i] for i in keep]
    classes = sorted(set(lab))
    quota = {c: n * lab.count(c) / len(lab) for c in classes}
    take = {c: int(np.floor(quota[c])) for c in classes}
    rest = sorted(classes, key=lambda c: -(quota[c] - take[c]))  # stable: ties to the lower label
    for c in rest[: n - sum(take.values())]:
        take[c] += 1
    out = []
    for c in classes:
        members = [keep[j] for j, l in enumerate(lab) if l == c]
        out += [members[int((j + 0.5) * len(members) / take[c])] for j in range(take[c])]
    return sorted(out)


@pytest.mark.parametrize("n", [5, 13, 20])
def test_exclusion_then_balanced_subset_matches_reference(tmp_path, n):
    src = open_source(str(_npz(tmp_path / "d.npz")), split="test")
    labels = src.known_labels().tolist()
    excluded = [0, 3, 4, 17, 39, 22]
    src.exclude(excluded, "calibration images of q")
    assert src.count(None) == 34 and src.count(n) == n
    got = src.subset(n).tolist()
    assert got == ref_subset_without(labels, excluded, n) and not set(got) & set(excluded)
    assert src.subset(n, "first").tolist() == [i for i in range(40) if i not in excluded][:n]
    with pytest.raises(IndexError, match="d.npz"):
        src.exclude([40])
    src.exclude([])
    np.testing.assert_array_equal(src.subset(n), subset_indices(40, n, np.asarray(labels)))


def test_keys_name_images_across_splits_and_source_kinds(tmp_path):
    from PIL import Image

    from cfws_jax.data.coco import CocoSource

    data = _npz(tmp_path / "d.npz")
    val, test, train = (open_source(str(data), split=s) for s in ("val", "test", "train"))
    assert image_keys(val, [1, 2]) == image_keys(test, [1, 2])  # CIFAR val reads the test arrays
    assert not set(image_keys(train, range(30))) & set(image_keys(test, range(40)))
    rec = calibration_record(val, [5, 1])
    np.testing.assert_array_equal(calibration_overlap(rec, test), [1, 5])
    assert calibration_overlap(rec, train).size == 0
    # a COCO folder: calibration reads it as a plain letterboxed folder, evaluation through the JSON
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    names = [f"{i:03d}.jpg" for i in range(6)]
    for i, name in enumerate(names):
        Image.new("RGB", (20 + i, 16), (i * 40, 0, 0)).save(img_dir / name)
    ann = {"images": [{"id": 100 + i, "file_name": name, "height": 16, "width": 20 + i}
                      for i, name in reversed(list(enumerate(names))) if i != 2],  # one image not annotated
           "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    calib = open_source(str(img_dir), split="train", image_size=32, protocol="letterbox")
    coco = CocoSource(img_dir, tmp_path / "ann.json", image_size=32)
    rec = calibration_record(calib, [2, 3, 5])  # 002 is not in the JSON: indices shift by one after it
    np.testing.assert_array_equal(calibration_overlap(rec, coco), [2, 4])
    assert [coco.paths[i].name for i in calibration_overlap(rec, coco)] == ["003.jpg", "005.jpg"]
    coco.exclude(calibration_overlap(rec, coco), "calibration images")
    assert coco.count(None) == 3 and coco.subset(None).tolist() == [0, 1, 3]


def test_ptq_records_and_eval_warns_or_excludes(tmp_path, capsys):
    from cfws_jax.io import save_variables
    from cfws_jax.models import create_model
    from conftest import numpy_init

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, 24),
             x_test=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), y_test=np.repeat(np.arange(10), 4))
    params = tmp_path / "params"
    save_variables(params, numpy_init(create_model("repvgg_cifar_small"), (1, 32, 32, 3), seed=1, train=False),
                   {"arch": "repvgg_cifar_small", "form": "train"})
    common = ["--arch", "repvgg_cifar_small", "--data", str(data), "--json", "--no-progress"]

    def ptq(split, out):
        assert main(["ptq", "--arch", "repvgg_cifar_small", "--params", str(params), "--calib-data", str(data),
                     "--calib-split", split, "--preset", "minmax", "--num-calib", "16", "--out", str(out),
                     "--no-progress"]) == 0
        capsys.readouterr()

    def run(*argv):
        assert main(["eval", *common, *argv]) == 0
        cap = capsys.readouterr()
        return json.loads(cap.out.strip().splitlines()[-1]), cap.err

    q = tmp_path / "q"
    ptq("test", q)  # calibrated on the images about to be scored
    res, err = run("--quantized", str(q), "--split", "val")
    assert res["images"] == 40 and "warning: 16 of the 40 images" in err and "--exclude-calib" in err
    res, err = run("--quantized", str(q), "--split", "val", "--limit", "10")
    picked = set(subset_indices(40, 10, np.repeat(np.arange(10), 4)).tolist())
    calib = set(np.random.default_rng(0).permutation(40)[:16].tolist())  # ptq's seeded draw (seed 0)
    assert f"warning: {len(picked & calib)} of the 10 images" in err
    qres, err = run("--quantized", str(q), "--split", "test", "--exclude-calib")
    assert "warning" not in err and "excluded 16 images" in err
    assert qres["images"] == 24 and qres["subset"] == f"24 of 40 test images; 16 calibration images of {q} excluded"
    res, _ = run("--quantized", str(q), "--split", "test", "--exclude-calib", "--limit", "10")
    assert res["images"] == 10 and res["subset"].startswith("10 of 40 test images, ")  # stratified over the rest
    assert res["subset"].endswith(" per class; 16 calibration images of " + str(q) + " excluded")
    fres, err = run("--params", str(params), "--split", "test", "--exclude-calib", str(q))
    assert fres["images"] == 24 and fres["subset"] == qres["subset"]
    # calibrated on train: nothing to warn about, nothing to exclude
    q2 = tmp_path / "q2"
    ptq("train", q2)
    res, err = run("--quantized", str(q2), "--split", "test")
    assert "warning" not in err and res["images"] == 40
    res, err = run("--quantized", str(q2), "--split", "test", "--exclude-calib")
    assert res["images"] == 40 and "excluded 0 images" in err
    # one-line refusals
    assert main(["eval", *common, "--params", str(params), "--exclude-calib"]) == 1
    assert "--exclude-calib needs QDIR" in capsys.readouterr().err
    assert main(["eval", *common, "--params", str(params), "--exclude-calib", str(params)]) == 1
    assert "does not record its calibration images" in capsys.readouterr().err
