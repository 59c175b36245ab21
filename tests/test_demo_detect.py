"""``cfws-jax demo --task detect`` (issue 21): the in-memory held-out scenes, the model card, and
the demo's wiring with a stand-in YOLOv6n (``yolov6n_v3``, 10 classes, NumPy-initialised weights,
64 px scenes, a fake CIFAR npz): every row, the float row is a direct ``evaluate_detector`` call,
calibration reads only training-split scenes and evaluation only test-split ones, deterministic
for a seed. Last, the shipped detector's figures (skipped until the file ships)."""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest

import cfws_jax.ptq
from cfws_jax.assets import ASSETS_DIR, SHIPPED_MODELS, flatten_variables, read_model_card, write_model_card
from cfws_jax.cli import main
from cfws_jax.data import scenes
from cfws_jax.data.scene_source import SceneSource, scene_calibration_batches
from cfws_jax.data.scenes import CIFAR10_CLASSES, SceneConfig, make_scene, write_coco_scenes
from cfws_jax.demo import DEMO_SETTINGS
from cfws_jax.demo_detect import (
    DETECT_PRESETS, FULL_PRESETS, SceneExperiment, load_scene_detector, run_detect_demo, scene_card,
)
from conftest import numpy_init
from test_scenes import fake_split, gt_detector

ARCH = "yolov6n_v3"
# big objects, so that a random detector's boxes sometimes overlap them and the mAPs are not all 0
CFG = SceneConfig(canvas=64, max_objects=3, min_size=0.3, max_size=0.9)
N_TRAIN, N_TEST = 40, 30  # different sizes: which split's arrays a scene came from shows in len(images)
HELD_OUT_SEED, N_EVAL, N_CALIB, SEED = 3, 6, 4, 1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(fake CIFAR npz, stand-in detector npz with its model card)."""
    from cfws_jax.models import create_model

    d = tmp_path_factory.mktemp("demo_detect")
    (xtr, ytr), (xte, yte) = fake_split(N_TRAIN, seed=0), fake_split(N_TEST, seed=1)
    np.savez(d / "cifar.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    variables = numpy_init(create_model(ARCH, num_classes=10), (1, CFG.canvas, CFG.canvas, 3), seed=0, train=False)
    np.savez(d / "standin_train.npz", **flatten_variables(variables))
    write_model_card(d / "standin_train.npz", scene_card(ARCH, CFG, held_out_seed=HELD_OUT_SEED, note="stand-in"))
    return d / "cifar.npz", d / "standin_train.npz"


def _arrays(npz, split):
    with np.load(npz) as z:
        return z[f"x_{split}"], z[f"y_{split}"]


# ----------------------------------------------------------------------------- held-out scenes, model card

def test_scene_source_is_the_written_folder_in_memory(tmp_path):
    """The in-memory source holds exactly what ``write_coco_scenes`` writes (same COCO dict, the
    scenes' pixels before JPEG), and ground truth fed back scores AP 1.0 through evaluate_detector."""
    from cfws_jax.detection.evaluate import evaluate_detector

    x, y = fake_split(50)
    src = SceneSource.generate(x, y, split="test", seed=2, cfg=CFG, count=7, class_names=CIFAR10_CLASSES, start=5)
    _, json_path = write_coco_scenes(tmp_path / "out", x, y, split="test", seed=2, cfg=CFG, count=7,
                                     class_names=CIFAR10_CLASSES, start=5)
    with open(json_path) as fh:
        assert json.load(fh) == json.loads(json.dumps(src.coco.dataset))
    assert src.num_images == 7 and src.image_ids.tolist() == list(range(6, 13))
    assert src.category_ids == tuple(range(1, 11)) and src.num_objects == len(src.coco.dataset["annotations"])
    canvases, infos, ids = src.load([1, 4])
    np.testing.assert_array_equal(canvases[1], make_scene(x, y, 9, split="test", seed=2, cfg=CFG)[0])
    assert ids.tolist() == [7, 10] and infos[0].ratio == 1.0 and infos[0].pad_x == 0
    assert src.subset(3).tolist() == [0, 1, 2] and src.count(None) == 7
    res = evaluate_detector(gt_detector(src), src, batch_size=4, progress=False)
    assert res["mAP"] == 1.0 and res["images"] == 7


def test_model_card_and_errors(files, tmp_path, capsys):
    _, standin = files
    det = load_scene_detector(str(standin))
    assert (det.arch, det.scenes, det.held_out_seed, det.class_names) == (ARCH, CFG, HELD_OUT_SEED, CIFAR10_CLASSES)
    assert read_model_card(standin)["training"] == {"note": "stand-in"}
    assert SHIPPED_MODELS["yolov6n_scenes"][:2] == (ARCH, "yolov6n_scenes_train.npz")
    bad = tmp_path / "bad_train.npz"
    bad.write_bytes(standin.read_bytes())
    write_model_card(bad, {"arch": ARCH, "scenes": {"canvas": 64, "colour": 1}})
    npz = str(files[0])
    for argv, msg in (([], "pass --data"),
                      (["--data", npz, "--limit", "5"], "--eval-scenes"),
                      (["--data", npz, "--eval-scenes", "0"], "--eval-scenes must be >= 1"),
                      (["--data", npz, "--params", str(tmp_path / "none.npz")], "does not exist"),
                      (["--data", npz, "--params", str(bad)], "not a SceneConfig"),
                      (["--data", npz, "--params", "shipped:nope"], "no shipped model")):
        assert main(["demo", "--task", "detect", "--no-progress"] + argv) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and msg in errors[0], (argv, errors)
    assert main(["demo", "--eval-scenes", "3"]) == 1  # a detect flag without --task detect
    assert "--task detect" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the demo with the stand-in

PRESET = "cfws_minmax"  # no histogram search: the cheapest CFWS preset to calibrate


@pytest.fixture(scope="module")
def instrumented(files):
    """One real demo run (W8A8 cfws_minmax) recording every scene drawn, every calibration set
    and every evaluation's detections."""
    import cfws_jax.detection.evaluate as det_eval

    npz, standin = files
    drawn, calib_sets, evaluations = [], [], []
    real_scene, real_quantize, real_evaluate = scenes.make_scene, cfws_jax.ptq.quantize, det_eval.evaluate_detector

    def spy_scene(images, labels, index, *, split, seed, cfg):
        drawn.append((split, len(images), seed, index))
        return real_scene(images, labels, index, split=split, seed=seed, cfg=cfg)

    def spy_quantize(arch, variables, calib, config, **kw):
        calib_sets.append([np.asarray(b) for b in calib])
        return real_quantize(arch, variables, calib, config, **kw)

    def spy_evaluate(apply_fn, source, **kw):
        evaluations.append(real_evaluate(apply_fn, source, **kw))
        return evaluations[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scenes, "make_scene", spy_scene)
        mp.setattr(cfws_jax.ptq, "quantize", spy_quantize)
        mp.setattr(det_eval, "evaluate_detector", spy_evaluate)
        out = run_detect_demo(str(npz), params=str(standin), eval_scenes=N_EVAL, presets=(PRESET,),
                              settings=((8, 8),), num_calib=N_CALIB, seed=SEED, progress=False, log=io.StringIO())
    return drawn, calib_sets, evaluations, out


def test_calibration_reads_train_scenes_evaluation_test_scenes(files, instrumented):
    drawn, calib_sets, _, _ = instrumented
    test = sorted(d for d in drawn if d[0] == "test")
    train = sorted(d for d in drawn if d[0] == "train")
    assert len(test) + len(train) == len(drawn)
    # held-out: the card's seed, test arrays, scenes 0..N_EVAL-1, drawn once for every model
    assert test == [("test", N_TEST, HELD_OUT_SEED, i) for i in range(N_EVAL)]
    assert train == [("train", N_TRAIN, SEED, i) for i in range(N_CALIB)]
    # what quantize saw: exactly those training scenes as float32 [b, S, S, 3] in [0, 1]
    x, y = _arrays(files[0], "train")
    want = np.stack([make_scene(x, y, i, split="train", seed=SEED, cfg=CFG)[0] for i in range(N_CALIB)]) / 255.0
    (got,) = calib_sets
    got = np.concatenate(got)
    assert got.dtype == np.float32 and got.shape == (N_CALIB, 64, 64, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def test_float_row_is_a_direct_evaluate_detector_call(files, instrumented):
    from cfws_jax.detection.evaluate import evaluate_detector
    from cfws_jax.models import create_model, fuse

    _, _, evaluations, (float_row, rows, info) = instrumented
    det = load_scene_detector(str(files[1]))
    model = create_model(ARCH, deploy=True, num_classes=10)
    fn = jax.tree_util.Partial(jax.jit(lambda p, x: model.apply(p, x)), fuse(ARCH, det.variables))
    x, y = _arrays(files[0], "test")
    src = SceneSource.generate(x, y, split="test", seed=HELD_OUT_SEED, cfg=CFG, count=N_EVAL,
                               class_names=CIFAR10_CLASSES)
    res = evaluate_detector(fn, src, batch_size=N_EVAL, progress=False)
    assert (float_row.mAP, float_row.mAP50) == (res["mAP"], res["mAP50"])
    # a random detector scores ~0, so compare what was scored: the same detections, not just 0 == 0
    assert len(evaluations) == 2 and res["detections"] > 100
    assert evaluations[0]["results"] == res["results"] and evaluations[0]["stats"] == res["stats"]
    assert float_row.bops_ratio is None and float_row.drop == 0.0
    (row,) = rows
    assert (row.setting, row.preset) == ("W8A8", PRESET) and 0.0 <= row.mAP <= 1.0
    assert row.drop == row.mAP - float_row.mAP and row.bops_ratio > 1.0  # CFWS costs a little BOPs
    assert info["eval_scenes"] == N_EVAL and info["eval_objects"] == src.num_objects
    assert (info["canvas"], info["calib_scenes"], info["seed"], info["held_out_seed"]) == (64, N_CALIB, SEED, 3)


def test_deterministic_for_a_seed(files, instrumented):
    npz, standin = files
    exp = SceneExperiment.load(str(npz), params=str(standin), eval_scenes=N_EVAL)
    again = run_detect_demo(experiment=exp, presets=(PRESET,), settings=((8, 8),), num_calib=N_CALIB, seed=SEED,
                            progress=False, log=io.StringIO())
    strip = lambda out: [(r.setting, r.preset, r.mAP, r.mAP50, r.bops_ratio) for r in [out[0], *out[1]]]  # noqa: E731
    assert strip(again) == strip(instrumented[3])
    a, b = exp.calibration(N_CALIB, SEED), exp.calibration(N_CALIB, SEED + 1)
    assert not np.array_equal(np.concatenate(a), np.concatenate(b))  # another seed, other scenes
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(
        scene_calibration_batches(*_arrays(npz, "train"), seed=SEED, cfg=CFG, count=N_CALIB)))


def test_cli_table_has_every_row(files, monkeypatch, capsys):
    """Every (setting, preset) row, ``--full`` adding learned rounding; the header names the model,
    canvas, scenes and objects, calibration and device, and says the scenes are not COCO. The
    scores are faked here (the real path is tested above)."""
    npz, standin = files
    marks = iter(range(1, 100))
    monkeypatch.setattr(SceneExperiment, "evaluate", lambda self, fn: {"mAP": 0.6, "mAP50": 0.9})
    monkeypatch.setattr(SceneExperiment, "quantized",
                        lambda self, config, calib: ({"mAP": next(marks) / 100, "mAP50": 0.5}, 1.0))
    base = ["demo", "--task", "detect", "--data", str(npz), "--params", str(standin), "--eval-scenes", "4",
            "--num-calib", "2", "--seed", "5", "--no-progress"]
    for extra, presets in (([], DETECT_PRESETS), (["--full"], FULL_PRESETS)):
        assert main(base + extra + ["--json"]) == 0
        cap = capsys.readouterr()
        res = json.loads(cap.out.strip().splitlines()[-1])
        assert [(r["setting"], r["preset"]) for r in res["rows"]] == [
            (f"W{w}A{a}", p) for w, a in DEMO_SETTINGS for p in presets]
        assert res["float"]["setting"] == "float32" and res["eval_scenes"] == 4 and res["calib_scenes"] == 2
        assert res["seed"] == 5 and res["canvas"] == 64 and res["scenes"]["max_objects"] == 3
        table = cap.err
        for part in (ARCH, str(standin), "64 px", "4 held-out synthetic CIFAR-10 scenes",
                     f"{res['eval_objects']} objects", "2 train-split scenes, seed 5", res["device"], "not COCO"):
            assert part in table, part
        assert table.count("| W6A6 |") == len(presets)
    assert main(base) == 0  # without --json: the table on stdout
    assert "| W8A8 | cfws_kl_bc |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the shipped detector

# Margins from the measured 3-seed table of benchmarks/bench_detect_demo.py (README "Measured: the
# shipped YOLOv6n on held-out scenes"; 200 held-out scenes, 64 calibration scenes, seeds 0/1/2):
# float 19.32; W8A8 cfws_kl 17.99 +- 0.63 (worst seed 17.28, drop 2.04); W6A6 cfws_kl 17.33 +- 0.49
# against minmax 15.93 +- 0.12 (per-seed differences 1.19 / 0.90 / 2.13). The float mAP is
# deterministic: its floor only leaves room for other CPUs' float rounding. Issue 21's target
# (>= 50 on 1,000 scenes) was not reached by the CPU-trained model (README).
SHIPPED_THRESHOLDS = {"eval_scenes": 200, "float_map_min": 18.5, "w8a8_cfws_kl_max_drop": 3.0,
                      "w6a6_cfws_kl_over_minmax": 0.5}


@pytest.mark.skipif(not (ASSETS_DIR / SHIPPED_MODELS["yolov6n_scenes"][1]).exists(),
                    reason="the shipped yolov6n_scenes detector is not in cfws_jax/assets")
def test_shipped_detector_table(shared_data):
    """The rows the README's reading rests on (float, minmax and cfws_kl at W8A8 and W6A6; seed 0),
    through the demo's own function, against margins taken from the seed spread."""
    from cfws_jax.demo_detect import run_detect_demo

    data = shared_data("cifar10_jpeg_yoongikim.npz")
    t = SHIPPED_THRESHOLDS
    float_row, rows, info = run_detect_demo(str(data), eval_scenes=t["eval_scenes"], presets=("minmax", "cfws_kl"),
                                            progress=False, log=io.StringIO())
    assert (info["eval_scenes"], info["eval_objects"], info["canvas"]) == (200, 747, 160)
    by = {(r.setting, r.preset): 100 * r.mAP for r in rows}
    float_map = 100 * float_row.mAP
    assert float_map >= t["float_map_min"], float_map
    assert by[("W8A8", "cfws_kl")] >= float_map - t["w8a8_cfws_kl_max_drop"], (by, float_map)
    assert by[("W6A6", "cfws_kl")] >= by[("W6A6", "minmax")] + t["w6a6_cfws_kl_over_minmax"], by
