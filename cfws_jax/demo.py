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


@dataclasses.dataclass(frozen=True)
class ShippedExperiment:
    """The shipped model with its data: float and quantized top-1 on ``limit`` test images (a
    class-balanced subset, :func:`cfws_jax.data.source.subset_indices`).

    Shared by ``cfws-jax demo`` and ``benchmarks/bench_cifar_tables.py``.
    """

    data: str  # the resolved data source
    arch: str
    variables: dict  # training form
    model: object  # deploy-form Flax module
    deploy: dict
    train: object
    test: object
    limit: int | None
    batch_size: int = 250
    mesh: object = None  # a cfws_jax.parallel.local_mesh (data parallel), or None: one device

    @classmethod
    def load(cls, data: str | None, limit: int | None, batch_size: int = 250, mesh=None) -> "ShippedExperiment":
        from cfws_jax.assets import load_shipped_model
        from cfws_jax.data import open_source
        from cfws_jax.models import create_model, fuse

        spec = resolve_data(data)
        arch, variables, _ = load_shipped_model()
        test = open_source(spec, split="test")
        n = test.num_images if limit is None else min(limit, test.num_images)
        return cls(spec, arch, variables, create_model(arch, deploy=True), fuse(arch, variables),
                   open_source(spec, split="train"), test, n, batch_size, mesh)

    def calibration(self, num_images: int = 32, seed: int = 0):
        from cfws_jax.data import calibration_batches

        return calibration_batches(self.train, num_images, min(num_images, 32), seed)

    def _top1(self, apply_fn) -> float:
        from cfws_jax.evaluate import evaluate_classifier

        return evaluate_classifier(apply_fn, self.test, batch_size=self.batch_size, limit=self.limit,
                                   progress=False, mesh=self.mesh)["top1"]

    def float_top1(self) -> float:
        model = self.model
        return self._top1(jax.tree_util.Partial(jax.jit(lambda p, x: model.apply(p, x)), self.deploy))

    def quantized_top1(self, config, calib) -> tuple[float, float]:
        """``(top-1, BOPs relative to INT8)`` of the model quantized with ``config``."""
        from cfws_jax.ptq import quantize, quantized_apply_fn
        from cfws_jax.ptq.report import bops_ratio

        qm = quantize(self.arch, self.variables, calib, config, progress=False, mesh=self.mesh)
        return self._top1(quantized_apply_fn(qm, self.model)), bops_ratio(qm)


def run_demo(data: str | None = None, *, limit: int | None = 1000, presets=DEMO_PRESETS, settings=DEMO_SETTINGS,
             num_calib: int = 32, seed: int = 0, batch_size: int = 250, progress: bool = True,
             log=None, mesh=None) -> tuple[float, list[DemoRow], dict]:
    """Float top-1 and one :class:`DemoRow` per (setting, preset). ``limit=None``: full test split.
    ``mesh``: :func:`cfws_jax.parallel.local_mesh` to calibrate and evaluate on (None: one device).
    ``log``: where the progress lines go (default: the ``sys.stderr`` of the call, not of the import)."""
    log = sys.stderr if log is None else log
    from cfws_jax.parallel import local_mesh
    from cfws_jax.ptq import get_preset

    mesh = None if mesh is None else local_mesh(mesh)
    exp = ShippedExperiment.load(data, limit, batch_size, mesh)
    n_eval, n_test = exp.limit, exp.test.num_images
    from cfws_jax.evaluate import subset_description

    subset = subset_description(exp.test, n_eval)
    print(f"model: {exp.arch} (shipped, fused); calibration: {num_calib} train images, seed {seed}; "
          f"evaluation: {subset}" + ("" if n_eval == n_test else " (--full for all)"), file=log)
    calib = exp.calibration(num_calib, seed)
    float_top1 = exp.float_top1()
    print(f"float: top-1 {100 * float_top1:.2f}%", file=log)
    rows = []
    # counts evaluated test images (each quantized model: calibration + n_eval images), with ETA
    bar = Progress(total=len(settings) * len(presets) * n_eval, desc=f"demo ({len(settings) * len(presets)} models)",
                   unit="img", disable=not progress)
    for w_bits, a_bits in settings:
        for name in presets:
            t0 = time.perf_counter()
            top1, bops = exp.quantized_top1(get_preset(name, w_bits=w_bits, a_bits=a_bits), calib)
            rows.append(DemoRow(f"W{w_bits}A{a_bits}", name, top1, top1 - float_top1, bops,
                                time.perf_counter() - t0))
            bar.set_postfix(f"W{w_bits}A{a_bits} {name}: {100 * top1:.2f}%")
            bar.update(n_eval)
    bar.close()
    info = {"arch": exp.arch, "data": exp.data, "eval_images": n_eval, "eval_subset": subset,
            "calib_images": num_calib, "seed": seed, **device_info(mesh)}
    return float_top1, rows, info


def device_info(mesh=None) -> dict:
    """``{"devices": [names], "device": one line}`` of ``mesh`` (None: the default device)."""
    from cfws_jax.parallel import device_list

    devices = device_list(mesh) if mesh is not None else [str(jax.devices()[0])]
    return {"devices": devices, "device": devices[0] if len(devices) == 1 else f"{len(devices)} x {devices[0]}"}


def format_table(float_top1: float, rows: list[DemoRow], info: dict) -> str:
    lines = [f"{info['arch']} on CIFAR-10: {info.get('eval_subset', str(info['eval_images']) + ' test images')} "
             f"(calibration: {info['calib_images']} train images, seed {info['seed']}; {info['device']})",
             "| setting | preset | top-1 (%) | drop vs float (pts) | BOPs vs INT8 |",
             "|---|---|---|---|---|",
             f"| float32 | - | {100 * float_top1:.2f} | - | - |"]
    for r in rows:
        lines.append(f"| {r.setting} | {r.preset} | {100 * r.top1:.2f} | {100 * r.drop:+.2f} | {r.bops_ratio:.3f}x |")
    return "\n".join(lines)
