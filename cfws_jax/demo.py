"""The paper's comparison on the RepVGG shipped with the package (``cfws-jax demo``).

``run_demo`` loads the CIFAR-10 RepVGG-A0 trained by ``examples/train_cifar.py`` (training form,
``cfws_jax/assets``), fuses it, calibrates each preset on a seeded sample of training images,
and evaluates float and quantized models on the test split. Everything is deterministic for a
given seed and evaluation subset.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax

from cfws_jax.progress import Progress

DEMO_PRESETS = ("minmax", "kl", "cfws_minmax", "cfws_kl")
DEMO_SETTINGS = ((8, 8), (6, 6))  # (w_bits, a_bits); W6A6 is where the presets separate (README)


@dataclasses.dataclass(frozen=True)
class DemoRow:
    setting: str
    preset: str
    top1: float
    drop: float
    bops_ratio: float
    seconds: float


def resolve_data(data: str | None) -> str:
    """``--data`` if given, else ``tfds:cifar10`` when tensorflow-datasets has it prepared."""
    if data:
        return data
    try:
        import tensorflow_datasets as tfds  # noqa: F401

        return "tfds:cifar10"
    except ImportError:
        raise ValueError(
            "no CIFAR-10 data: pass --data PATH (a .npz with x_train/y_train/x_test/y_test uint8 arrays, "
            "e.g. ../shared/data/cifar10_jpeg_yoongikim.npz, or an image folder with train/ and test/ "
            "class sub-folders), or install tensorflow-datasets and prepare 'cifar10'") from None


def run_demo(data: str | None = None, *, limit: int | None = 1000, presets=DEMO_PRESETS, settings=DEMO_SETTINGS,
             num_calib: int = 32, seed: int = 0, batch_size: int = 250, progress: bool = True,
             log=sys.stderr) -> tuple[float, list[DemoRow], dict]:
    """Float top-1 and one :class:`DemoRow` per (setting, preset). ``limit=None``: full test split."""
    from cfws_jax.assets import load_shipped_model
    from cfws_jax.data import calibration_batches, open_source
    from cfws_jax.evaluate import evaluate_classifier
    from cfws_jax.models import create_model, fuse
    from cfws_jax.ptq import get_preset, quantize, quantized_apply_fn
    from cfws_jax.ptq.report import bops_ratio

    spec = resolve_data(data)
    arch, variables, _ = load_shipped_model()
    deploy = fuse(arch, variables)
    model = create_model(arch, deploy=True)
    train = open_source(spec, split="train")
    test = open_source(spec, split="test")
    n_eval = test.num_images if limit is None else min(limit, test.num_images)
    print(f"model: {arch} (shipped, fused); calibration: {num_calib} train images, seed {seed}; "
          f"evaluation: {'all' if n_eval == test.num_images else 'the first'} {n_eval} of "
          f"{test.num_images} test images" + ("" if n_eval == test.num_images else " (--full for all)"), file=log)
    calib = calibration_batches(train, num_calib, min(num_calib, 32), seed)
    fn = jax.tree_util.Partial(jax.jit(lambda p, x: model.apply(p, x)), deploy)
    float_top1 = evaluate_classifier(fn, test, batch_size=batch_size, limit=n_eval, progress=False)["top1"]
    print(f"float: top-1 {100 * float_top1:.2f}%", file=log)
    rows = []
    bar = Progress(total=len(settings) * len(presets), desc="demo", unit="model", disable=not progress)
    for w_bits, a_bits in settings:
        for name in presets:
            t0 = time.perf_counter()
            qm = quantize(arch, variables, calib, get_preset(name, w_bits=w_bits, a_bits=a_bits), progress=False)
            top1 = evaluate_classifier(quantized_apply_fn(qm, model), test, batch_size=batch_size, limit=n_eval,
                                       progress=False)["top1"]
            rows.append(DemoRow(f"W{w_bits}A{a_bits}", name, top1, top1 - float_top1, bops_ratio(qm),
                                time.perf_counter() - t0))
            bar.set_postfix(f"W{w_bits}A{a_bits} {name}: {100 * top1:.2f}%")
            bar.update()
    bar.close()
    info = {"arch": arch, "data": spec, "eval_images": n_eval, "calib_images": num_calib, "seed": seed,
            "device": str(jax.devices()[0])}
    return float_top1, rows, info


def format_table(float_top1: float, rows: list[DemoRow], info: dict) -> str:
    lines = [f"{info['arch']} on {info['eval_images']} CIFAR-10 test images "
             f"(calibration: {info['calib_images']} train images, seed {info['seed']}; {info['device']})",
             "| setting | preset | top-1 (%) | drop vs float (pts) | BOPs vs INT8 |",
             "|---|---|---|---|---|",
             f"| float32 | - | {100 * float_top1:.2f} | - | - |"]
    for r in rows:
        lines.append(f"| {r.setting} | {r.preset} | {100 * r.top1:.2f} | {100 * r.drop:+.2f} | {r.bops_ratio:.3f}x |")
    return "\n".join(lines)
