"""The paper's detection comparison on the YOLOv6n shipped with the package
(``cfws-jax demo --task detect``, issue 21).

:func:`run_detect_demo` loads the YOLOv6n trained on synthetic CIFAR-10 scenes
(:mod:`cfws_jax.data.scenes`; training form, ``cfws_jax/assets/yolov6n_scenes_train.npz``),
fuses it, calibrates each preset on seeded *training-split* scenes and scores float and
quantized models on held-out *test-split* scenes with the project's pycocotools path
(:func:`cfws_jax.detection.evaluate.evaluate_detector` on an in-memory
:class:`cfws_jax.data.scene_source.SceneSource`). These are synthetic scenes built from
CIFAR-10 images: the mAPs compare float with quantized models, they are never COCO accuracy.

**Model card.** The scene settings a detector was trained on are data, not code: the JSON of
the same stem beside its ``.npz`` (:func:`cfws_jax.assets.read_model_card`), made by
:func:`scene_card`::

    {"arch": "yolov6n_v3", "class_names": ["airplane", ...], "held_out_seed": 0,
     "scenes": {"canvas": 256, "max_objects": 6, ...},   # SceneConfig fields; omitted ones default
     "training": {...}}                                   # free-form (command, log, ...), shown as is

The demo draws its held-out scenes with the card's ``SceneConfig`` and ``held_out_seed``
(the same set whatever the calibration seed) and its calibration scenes with the same
``SceneConfig`` from the train stream of ``--seed``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np

from cfws_jax.data.scenes import CIFAR10_CLASSES, SceneConfig
from cfws_jax.demo import DEMO_SETTINGS, device_info
from cfws_jax.progress import Progress

DETECT_MODEL = "shipped:yolov6n_scenes"
DETECT_PRESETS = ("minmax", "kl", "cfws_minmax", "cfws_kl", "cfws_kl_bc")
FULL_PRESETS = DETECT_PRESETS + ("cfws_kl_recon",)
"""``--full`` adds learned rounding (minutes per model on a 2-core CPU)."""
DEFAULT_EVAL_SCENES = 200
DEFAULT_NUM_CALIB = 64
SYNTHETIC_NOTE = ("synthetic scenes built from CIFAR-10 images (cfws_jax.data.scenes), not COCO: "
                  "compare the rows with each other, never with COCO mAP")


# ------------------------------------------------------------------------------------ the model


def scene_card(arch: str, scenes: SceneConfig, *, class_names=CIFAR10_CLASSES, held_out_seed: int = 0,
               **training) -> dict:
    """The model card of a detector trained on scenes drawn with ``scenes`` (write it with
    :func:`cfws_jax.assets.write_model_card`); ``training``: free-form JSON values (the command,
    steps, the held-out mAP the training log reached, ...)."""
    return {"arch": str(arch), "class_names": [str(c) for c in class_names], "held_out_seed": int(held_out_seed),
            "scenes": dataclasses.asdict(scenes), "training": training}


@dataclasses.dataclass(frozen=True)
class SceneDetector:
    """A detector trained on synthetic scenes: training-form ``variables`` and its model card.
    ``name``: ``shipped:NAME`` or the ``.npz`` path."""

    name: str
    arch: str
    variables: dict
    scenes: SceneConfig
    class_names: tuple[str, ...]
    held_out_seed: int
    card: dict


def load_scene_detector(params: str = DETECT_MODEL) -> SceneDetector:
    """Load ``shipped:NAME`` (``cfws_jax/assets``) or a flat training-form ``.npz``
    (:func:`cfws_jax.assets.flatten_variables`) with its model card beside it."""
    from cfws_jax.assets import SHIPPED_MODELS, load_npz_variables, model_card_path, read_model_card, shipped_path

    params = str(params)
    shipped = params[len("shipped:"):] if params.startswith("shipped:") else None
    path = shipped_path(shipped) if shipped else Path(params)
    if not shipped and path.suffix != ".npz":
        raise ValueError(f"--params {params}: expected shipped:NAME or a flat variables .npz (with its model card "
                         f"{model_card_path(path).name} beside it)")
    if not path.is_file():
        raise FileNotFoundError(f"variables file {path} does not exist")
    card = read_model_card(path)
    where = model_card_path(path)
    if not isinstance(card.get("arch"), str) or not isinstance(card.get("scenes"), dict):
        raise ValueError(f"{where}: a scene detector's card needs 'arch' (a string) and 'scenes' (SceneConfig fields)")
    if shipped and SHIPPED_MODELS[shipped][0] != card["arch"]:
        raise ValueError(f"{where}: arch {card['arch']!r} differs from SHIPPED_MODELS ({SHIPPED_MODELS[shipped][0]!r})")
    try:
        cfg = SceneConfig(**card["scenes"])
    except TypeError as e:  # an unknown field
        raise ValueError(f"{where}: 'scenes' is not a SceneConfig ({e})") from None
    names = tuple(str(c) for c in card.get("class_names", CIFAR10_CLASSES))
    variables = load_npz_variables(path)
    if "batch_stats" not in variables:
        raise ValueError(f"{path}: expected training-form variables (params and batch_stats)")
    return SceneDetector(params, card["arch"], variables, cfg, names, int(card.get("held_out_seed", 0)), card)


# ------------------------------------------------------------------------------------ the experiment


def resolve_scene_data(data: str | None) -> str:
    """``--data``, which must be given: scenes are pasted from the CIFAR-10 arrays of an ``.npz``."""
    if data:
        return str(data)
    raise ValueError("no CIFAR-10 data: pass --data PATH (a .npz with x_train/y_train/x_test/y_test uint8 arrays, "
                     "e.g. ../shared/data/cifar10_jpeg_yoongikim.npz); the detection scenes are pasted from its images")


@dataclasses.dataclass(frozen=True)
class DetectRow:
    """One table row: mAP@.5:.95 and mAP@.5 (fractions), ``drop`` = mAP - float mAP (fraction),
    BOPs against INT8 (None for float), seconds to calibrate and evaluate."""

    setting: str
    preset: str
    mAP: float
    mAP50: float
    drop: float
    bops_ratio: float | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class SceneExperiment:
    """The detector with its data: held-out scenes in memory, the train split for calibration.

    Shared by ``cfws-jax demo --task detect`` and ``benchmarks/bench_detect_demo.py``.
    """

    data: str
    detector: SceneDetector
    model: object  # deploy-form Flax module
    deploy: dict
    train: tuple  # (images uint8 [N, 32, 32, 3], labels int32 [N]) of the train split
    held_out: object  # SceneSource of test-split scenes
    batch_size: int = 32
    mesh: object = None

    @classmethod
    def load(cls, data: str | None, *, params: str = DETECT_MODEL, eval_scenes: int = DEFAULT_EVAL_SCENES,
             batch_size: int = 32, mesh=None, progress: bool = False) -> "SceneExperiment":
        from cfws_jax.data.scene_source import SceneSource
        from cfws_jax.data.scenes import load_cifar_split
        from cfws_jax.models import create_model, fuse
        from cfws_jax.ptq.model import params_num_classes

        if eval_scenes < 1:
            raise ValueError(f"--eval-scenes must be >= 1, got {eval_scenes}")
        spec = resolve_scene_data(data)
        det = load_scene_detector(params)
        deploy = fuse(det.arch, det.variables)
        nc = params_num_classes(deploy["params"])
        if nc != len(det.class_names):
            raise ValueError(f"{det.name}: the model predicts {nc} classes but its card names {len(det.class_names)}")
        train = load_cifar_split(spec, "train")
        x_test, y_test = load_cifar_split(spec, "test")
        if max(int(train[1].max()), int(y_test.max())) >= nc or min(int(train[1].min()), int(y_test.min())) < 0:
            raise ValueError(f"{spec}: labels must lie in 0..{nc - 1} for a {nc}-class detector")
        bar = Progress(total=eval_scenes, desc="held-out scenes", unit="img", disable=not progress)
        held_out = SceneSource.generate(x_test, y_test, split="test", seed=det.held_out_seed, cfg=det.scenes,
                                        count=eval_scenes, class_names=det.class_names,
                                        progress=lambda k, n: bar.update(1))
        bar.close()
        return cls(spec, det, create_model(det.arch, deploy=True, num_classes=nc), deploy, train, held_out,
                   batch_size, mesh)

    def calibration(self, num_scenes: int = DEFAULT_NUM_CALIB, seed: int = 0) -> list[np.ndarray]:
        """float32 ``[b, S, S, 3]`` batches of train-split scenes ``0 .. num_scenes - 1`` of stream ``seed``."""
        from cfws_jax.data.scene_source import scene_calibration_batches

        if num_scenes < 1:
            raise ValueError(f"--num-calib must be >= 1, got {num_scenes}")
        return scene_calibration_batches(*self.train, seed=seed, cfg=self.detector.scenes, count=num_scenes,
                                         batch_size=min(num_scenes, 32))

    def evaluate(self, apply_fn) -> dict:
        """:func:`evaluate_detector` on every held-out scene (``{"mAP", "mAP50", ...}``)."""
        from cfws_jax.detection.evaluate import evaluate_detector

        return evaluate_detector(apply_fn, self.held_out, batch_size=min(self.batch_size, self.held_out.num_images),
                                 progress=False, mesh=self.mesh)

    def float_apply_fn(self):
        model = self.model
        return jax.tree_util.Partial(jax.jit(lambda p, x: model.apply(p, x)), self.deploy)

    def quantized(self, config, calib) -> tuple[dict, float]:
        """``(evaluate result, BOPs relative to INT8)`` of the model quantized with ``config``."""
        from cfws_jax.ptq import quantize, quantized_apply_fn
        from cfws_jax.ptq.report import bops_ratio

        qm = quantize(self.detector.arch, self.detector.variables, calib, config, progress=False, mesh=self.mesh)
        return self.evaluate(quantized_apply_fn(qm, self.model)), bops_ratio(qm)


def run_detect_demo(data: str | None = None, *, params: str = DETECT_MODEL, eval_scenes: int = DEFAULT_EVAL_SCENES,
                    presets=DETECT_PRESETS, settings=DEMO_SETTINGS, num_calib: int = DEFAULT_NUM_CALIB, seed: int = 0,
                    batch_size: int = 32, progress: bool = True, log=None, mesh=None,
                    experiment: SceneExperiment | None = None) -> tuple[DetectRow, list[DetectRow], dict]:
    """The float :class:`DetectRow` and one per (setting, preset). ``experiment``: reuse a loaded
    one (the benchmark's seeds); else it is loaded from ``data`` / ``params`` / ``eval_scenes``.
    ``log``: where the progress lines go (default: the ``sys.stderr`` of the call)."""
    log = sys.stderr if log is None else log
    from cfws_jax.parallel import local_mesh
    from cfws_jax.ptq import get_preset

    mesh = None if mesh is None else local_mesh(mesh)
    configs = [(w, a, name, get_preset(name, w_bits=w, a_bits=a)) for w, a in settings for name in presets]
    exp = experiment or SceneExperiment.load(data, params=params, eval_scenes=eval_scenes, batch_size=batch_size,
                                             mesh=mesh, progress=progress)
    info = describe(exp, num_calib, seed, mesh)
    print(header(info), file=log)
    calib = exp.calibration(num_calib, seed)
    n_eval = exp.held_out.num_images
    # counts scenes processed (float: evaluation; each quantized model: calibration + evaluation), with ETA
    bar = Progress(total=n_eval + len(configs) * (num_calib + n_eval), desc=f"demo ({len(configs)} models)",
                   unit="img", disable=not progress)
    t0 = time.perf_counter()
    res = exp.evaluate(exp.float_apply_fn())
    float_row = DetectRow("float32", "-", res["mAP"], res["mAP50"], 0.0, None, time.perf_counter() - t0)
    bar.update(n_eval)
    print(f"float: mAP@.5:.95 {100 * float_row.mAP:.2f}, mAP@.5 {100 * float_row.mAP50:.2f}", file=log)
    rows = []
    for w, a, name, config in configs:
        t0 = time.perf_counter()
        res, bops = exp.quantized(config, calib)
        rows.append(DetectRow(f"W{w}A{a}", name, res["mAP"], res["mAP50"], res["mAP"] - float_row.mAP, bops,
                              time.perf_counter() - t0))
        bar.set_postfix(f"W{w}A{a} {name}: mAP {100 * res['mAP']:.2f}")
        bar.update(num_calib + n_eval)
    bar.close()
    return float_row, rows, info


def describe(exp: SceneExperiment, num_calib: int, seed: int, mesh=None) -> dict:
    """The facts the table header names (JSON-serialisable)."""
    det, src = exp.detector, exp.held_out
    return {"model": det.name, "arch": det.arch, "data": exp.data, "canvas": det.scenes.canvas,
            "eval_scenes": src.num_images, "eval_objects": src.num_objects, "held_out_seed": det.held_out_seed,
            "calib_scenes": int(num_calib), "seed": int(seed), "scenes": dataclasses.asdict(det.scenes),
            **device_info(mesh)}


def header(info: dict) -> str:
    return (f"{info['arch']} ({info['model']}, fused) on {info['eval_scenes']} held-out synthetic CIFAR-10 scenes "
            f"({info['canvas']} px canvas, {info['eval_objects']} objects, test split, scene seed "
            f"{info['held_out_seed']}); calibration: {info['calib_scenes']} train-split scenes, seed {info['seed']}; "
            f"{info['device']}")


def format_detect_table(float_row: DetectRow, rows: list[DetectRow], info: dict) -> str:
    def line(r: DetectRow) -> str:
        drop = "-" if r.bops_ratio is None else f"{100 * r.drop:+.2f}"
        bops = "-" if r.bops_ratio is None else f"{r.bops_ratio:.3f}x"
        return (f"| {r.setting} | {r.preset} | {100 * r.mAP:.2f} | {100 * r.mAP50:.2f} | {drop} | {bops} | "
                f"{r.seconds:.0f} |")

    return "\n".join([header(info),
                      "| setting | preset | mAP@.5:.95 | mAP@.5 | drop vs float (pts) | BOPs vs INT8 | seconds |",
                      "|---|---|---|---|---|---|---|", line(float_row), *map(line, rows),
                      f"mAP in % (pycocotools) on {SYNTHETIC_NOTE}."])
