"""Detector training end to end on tiny shapes: a small YOLOv6 (v3.0 layout) learns a few fixed
stand-in scenes (the loss falls, the top box moves onto an object), the unrolled conv lowering
matches the conv op, augmentation moves boxes with the pixels, and the example script resumes
exactly from its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax.models import create_model, get_config
from cfws_jax.train.augment import AugmentConfig, augment_batch, augment_image
from cfws_jax.train.boxes import iou_pairwise, xywh_to_xyxy
from cfws_jax.train.lowering import conv_lowering
from cfws_jax.train.optim import OptimConfig, ema_decay, ema_tau_for, kernel_mask, lr_at, make_optimizer
from cfws_jax.train.step import init_state, make_predict, make_train_step

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_yolov6_scenes.py"
CANVAS = 64
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230]], np.uint8)


def tiny_config(nc: int = 3):
    """The v3.0 layout (P2 fusion, SimCSPSPPF, BiFPAN) with every repeat 1 and 8..128 channels."""
    return dataclasses.replace(get_config("yolov6n_v3"), depth=0.01, width=0.125, num_classes=nc)


def standin_scenes(n: int = 4, seed: int = 0, max_boxes: int = 3) -> dict:
    """``n`` CANVAS-px scenes: grey noise with 1-2 solid rectangles (class = colour), as
    ``scenes.scene_batch`` returns them."""
    rng = np.random.default_rng(seed)
    out = {"images": rng.integers(90, 140, (n, CANVAS, CANVAS, 3)).astype(np.uint8),
           "boxes": np.zeros((n, max_boxes, 4), np.float32), "classes": np.zeros((n, max_boxes), np.int32),
           "mask": np.zeros((n, max_boxes), bool)}
    for i in range(n):
        k = 1 + i % 2
        for j in range(k):
            w, h = rng.integers(16, 30, 2)
            x0 = rng.integers(0, CANVAS // 2 - 4) + j * CANVAS // 2 if k == 2 else rng.integers(0, CANVAS - w)
            x0 = min(x0, CANVAS - w)
            y0 = rng.integers(0, CANVAS - h)
            c = int(rng.integers(0, 3))
            out["images"][i, y0:y0 + h, x0:x0 + w] = COLOURS[c]
            out["boxes"][i, j] = [x0, y0, x0 + w, y0 + h]
            out["classes"][i, j], out["mask"][i, j] = c, True
    return out


def top_box_iou(pred, scenes) -> np.ndarray:
    """Per image: IoU of the highest-scoring decoded box with its best-matching gt."""
    pred = np.asarray(pred)
    out = []
    for i in range(len(pred)):
        n = int(np.argmax(pred[i, :, 5:].max(-1)))
        box = xywh_to_xyxy(jnp.asarray(pred[i, n:n + 1, :4]))
        gts = jnp.asarray(scenes["boxes"][i][scenes["mask"][i]])
        out.append(float(iou_pairwise(box, gts).max()))
    return np.asarray(out)


def test_tiny_detector_learns_standin_scenes():
    model = create_model(tiny_config(), deploy=False)
    tx = make_optimizer(OptimConfig(lr=0.05))
    state = init_state(model, jax.random.PRNGKey(0), CANVAS, tx)
    total = 60
    step = make_train_step(model, tx, unrolled=False, optim_cfg=OptimConfig(ema_tau=ema_tau_for(total)))
    predict = make_predict(model)
    scenes = standin_scenes()
    iou0 = top_box_iou(predict({"params": state.params, "batch_stats": state.batch_stats}, scenes["images"]), scenes)
    losses = []
    for s in range(total):
        state, m = step(state, scenes["images"], scenes["boxes"], scenes["classes"], scenes["mask"],
                        lr_at(s, total, 5, 0.05))
        losses.append(float(m["loss"]))
    assert int(state.step) == total and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * max(losses[:10]), losses
    iou1 = top_box_iou(predict(state.ema, scenes["images"]), scenes)
    assert iou1.mean() > max(0.5, iou0.mean() + 0.2), (iou0, iou1)


def test_unrolled_lowering_matches_conv_forward():
    model = create_model(tiny_config(), deploy=False)
    v = jax.jit(lambda r: model.init(r, jnp.zeros((1, CANVAS, CANVAS, 3)), train=False))(jax.random.PRNGKey(1))
    x = jnp.asarray(standin_scenes(2)["images"], jnp.float32) / 255

    def run(unrolled):
        with conv_lowering(unrolled):
            return model.apply(v, x, train=False)

    np.testing.assert_allclose(np.asarray(jax.jit(lambda: run(True))()), np.asarray(jax.jit(lambda: run(False))()),
                               rtol=1e-4, atol=1e-4)


def test_augment_moves_boxes_with_pixels_and_is_deterministic():
    scenes = standin_scenes(6, seed=2)
    cfg = AugmentConfig(hsv_s=0.0, hsv_v=0.0, fill=0)
    a = augment_batch(scenes, seed=7, step=3, cfg=cfg)
    b = augment_batch(scenes, seed=7, step=3, cfg=cfg)
    for k in ("images", "boxes", "mask"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["images"], augment_batch(scenes, seed=7, step=4, cfg=cfg)["images"])
    for i in range(6):
        for box, c, ok in zip(a["boxes"][i], a["classes"][i], a["mask"][i]):
            if not ok:
                continue
            # an object's colour (a later rectangle may cover part of an earlier one), not the grey noise
            hit = np.any([np.all(a["images"][i] == col, axis=-1) for col in COLOURS], axis=0)
            x1, y1, x2, y2 = box
            # the box's interior (1 px in from each side: zoom resamples the edges bilinearly, so
            # they blend with the background) shows the object's colour after flip / zoom / shift
            inside = hit[int(np.ceil(y1)) + 1:int(np.floor(y2)) - 1, int(np.ceil(x1)) + 1:int(np.floor(x2)) - 1]
            assert inside.size and inside.mean() > 0.8, (i, box, inside.mean())
    # HSV jitter keeps hue and a flip alone mirrors the boxes exactly
    img, box, m = augment_image(scenes["images"][0], scenes["boxes"][0], scenes["mask"][0], np.random.default_rng(0),
                                AugmentConfig(flip=1.0, scale=0.0, translate=0.0, hsv_s=0.0, hsv_v=0.0))
    np.testing.assert_array_equal(img, scenes["images"][0][:, ::-1])
    np.testing.assert_allclose(box[m][:, [0, 2]], CANVAS - scenes["boxes"][0][m][:, [2, 0]])


def test_optimizer_pieces():
    params = {"a": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.ones(2)}, "bn": {"scale": jnp.ones(2)}}
    mask = kernel_mask(params)
    assert (mask["a"]["kernel"], mask["a"]["bias"], mask["bn"]["scale"]) == (True, False, False)
    assert lr_at(0, 100, 10, 0.1) == pytest.approx(0.01) and lr_at(9, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(100, 100, 10, 0.1) == pytest.approx(0.001)
    assert ema_tau_for(10 ** 6) == 2000.0 and ema_tau_for(10) == 10.0
    assert np.exp(1000 / ema_tau_for(1000)) == pytest.approx(50)  # end horizon 5 % of the run
    assert float(ema_decay(1, 0.9999, 2000)) == pytest.approx(0.9999 * (1 - np.exp(-1 / 2000)), rel=1e-3)  # float32
    tx = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, momentum=0.0))
    st = tx.init(params)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, st, params)
    assert float(upd["a"]["kernel"][0, 0, 0, 0]) == pytest.approx(-0.05)  # decay on kernels only
    assert float(upd["a"]["bias"][0]) == 0.0 and float(upd["bn"]["scale"][0]) == 0.0


def _load_script():
    from conftest import load_script

    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("cifar")
    y = (np.arange(64) % 10).astype(np.int64)
    x = rng.integers(0, 255, (64, 32, 32, 3)).astype(np.uint8)
    np.savez(d / "tiny.npz", x_train=x, y_train=y, x_test=x[:32], y_test=y[:32])
    return d / "tiny.npz"


def test_script_resumes_exactly(tiny_cifar, tmp_path, monkeypatch):
    monkeypatch.setenv("CFWS_JAX_NO_PROGRESS", "1")
    prev = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))  # the second run reuses the compiles
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    mod = _load_script()
    args = ["--data", str(tiny_cifar), "--canvas", "64", "--depth", "0.01", "--width", "0.125",
            "--batch-size", "2", "--steps", "6", "--epoch-scenes", "6", "--eval-scenes", "0",
            "--final-eval-scenes", "4", "--ckpt-steps", "3", "--max-objects", "3"]
    try:
        assert mod.main(args + ["--out", str(tmp_path / "full")]) == 0
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copytree(tmp_path / "full" / "ckpt", resumed / "ckpt")  # holds step 3 only
        assert json.loads((resumed / "ckpt" / "latest.json").read_text())["step"] == 3
        assert mod.main(args + ["--out", str(resumed)]) == 0
    finally:
        jax.config.update("jax_compilation_cache_dir", prev[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", prev[1])
    la, lb = (json.loads((tmp_path / d / "log.json").read_text()) for d in ("full", "resumed"))
    assert [r["loss"] for r in la["steps_log"]] == [r["loss"] for r in lb["steps_log"]]
    timing = ("images_per_s", "seconds", "eval_seconds")  # wall-clock fields differ between runs
    hist = lambda log: [{k: v for k, v in h.items() if k not in timing} for h in log["history"]]  # noqa: E731
    assert len(la["steps_log"]) == 6 and hist(la) == hist(lb)[:len(la["history"])] and hist(la)
    assert 0.0 <= la["final_heldout"]["mAP"] <= 1.0
    a, b = np.load(tmp_path / "full" / "final.npz"), np.load(resumed / "final.npz")
    assert sorted(a.files) == sorted(b.files) and any(k.startswith("batch_stats/") for k in a.files)
    assert "params/detect/cls_preds_0/kernel" in a.files
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
