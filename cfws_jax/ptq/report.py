"""Per-layer quantization report and single-layer sensitivity ranking.

``layer_report(qm, variables, images)`` compares the quantized model with its float original,
layer by layer, on a few images: weight SQNR, output SQNR and cosine (the quantized network's
layer output against the float network's), the centre/surround range ratio that motivates
CFWS, scales, activation ranges, MACs and BOPs. ``sensitivity(...)`` quantizes one layer at a
time (its weights and its activation quantizers; all else float) and ranks layers by the
damage to the logits (SQNR in dB, lower is worse; KL of the softmax).
"""

from __future__ import annotations

import csv
import json
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from cfws_jax.bops import ConvGeometry, network_bops
from cfws_jax.ptq.model import QuantizedModel, layer_params, model_for, resolve_model
from cfws_jax.ptq.runtime import jitted_forward


def sqnr_db(ref, test) -> float:
    """``10 log10(|ref|^2 / |ref - test|^2)``; +inf when identical."""
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    noise = np.sum((ref - test) ** 2)
    signal = np.sum(ref**2)
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float("nan")


def _float_weights(qm: QuantizedModel, variables):
    """Float ``{layer: {"kernel", "bias"}}`` of the original model (train-form variables are fused)."""
    if "batch_stats" in variables and qm.arch:
        _, _, params = resolve_model(qm.arch, variables, qm.num_classes)
    else:
        params = variables["params"]
    return {lp.info.name: {k: jnp.asarray(v, jnp.float32) for k, v in layer_params(params, lp.info.name).items()
                           if k in ("kernel", "bias")} for lp in qm.plan.layers}


def _comparison(qm: QuantizedModel, variables, images, model=None, return_outputs: bool = False):
    """``(run(weights, enabled) -> forward dict, float weights, dequantized weights, images)``."""
    model = model_for(qm, model)
    x = jnp.asarray(images, jnp.float32)
    fwd = jitted_forward(model, qm.plan, return_outputs=return_outputs)
    amax, qmax = jnp.asarray(qm.act_amax), qm.plan.qmax()

    def run(weights, enabled):
        return fwd(weights, amax, qmax, jnp.asarray(enabled, bool), x)

    return run, _float_weights(qm, variables), qm.dequantized_weights(as_jax=True), x


def bops_scheme(lp, config) -> str:
    if lp.scheme == "cfws":
        return "cfws" if config.cfws_extract_center else "split_whole"
    return "int16_weights" if lp.w_bits == 16 else "int8"


def geometry(info) -> ConvGeometry:
    if info.kind == "dense":
        return ConvGeometry(1, info.kernel_shape[0], info.kernel_shape[1])
    return ConvGeometry.from_kernel(info.kernel_shape, info.out_shape[1], info.out_shape[2], info.groups)


def bops_ratio(qm: QuantizedModel) -> float:
    """Total BOPs of the quantized model relative to plain INT8 at the same bit-widths."""
    rows = [(lp.info.name, geometry(lp.info), bops_scheme(lp, qm.config)) for lp in qm.plan.layers]
    return network_bops(rows, qm.config.w_bits, qm.config.a_bits)["ratio_vs_int8"]


def layer_report(qm: QuantizedModel, variables: Mapping, images, model=None) -> dict:
    """``{"layers": [row, ...], "totals": {...}}`` (see module docstring). images: NHWC float32."""
    run, fw, qw, x = _comparison(qm, variables, images, model, return_outputs=True)
    P = len(qm.plan.points)
    f_out = run(fw, np.zeros((P,), bool))
    q_out = run(qw, np.ones((P,), bool))
    bops = network_bops([(lp.info.name, geometry(lp.info), bops_scheme(lp, qm.config)) for lp in qm.plan.layers],
                        qm.config.w_bits, qm.config.a_bits)
    rows = []
    for lp, b in zip(qm.plan.layers, bops["layers"]):
        info, name = lp.info, lp.info.name
        wf, wq = np.asarray(fw[name]["kernel"]), np.asarray(qw[name]["kernel"])
        q = qm.layers[name]
        row = {"layer": name, "kind": _kind(info), "scheme": lp.scheme, "w_bits": lp.w_bits,
               "kernel": "x".join(map(str, info.kernel_shape)), "groups": info.groups,
               "center_surround_ratio": _center_ratio(wf),
               "w_scale_min": _min(q.get("w_scale")), "w_scale_max": _max(q.get("w_scale")),
               "coarse_scale_max": _max(q.get("c_scale")),
               "weight_sqnr_db": sqnr_db(wf, wq),
               "output_sqnr_db": sqnr_db(f_out["outputs"][name], q_out["outputs"][name]),
               "output_cosine": cosine(f_out["outputs"][name], q_out["outputs"][name]),
               "macs": b["macs"], "bops": b["bops"]}
        for side, idx in (("in", lp.in_point), ("out", lp.out_point)):
            if idx is not None:
                p = qm.plan.points[idx]
                row[f"{side}_amax"] = float(qm.act_amax[idx])
                row[f"{side}_method"] = p.method
                row[f"{side}_mode"] = p.mode
        rows.append(row)
    totals = {"logits_sqnr_db": sqnr_db(f_out["logits"], q_out["logits"]),
              "logits_cosine": cosine(f_out["logits"], q_out["logits"]),
              "top1_agreement": float(np.mean(np.argmax(f_out["logits"], -1) == np.argmax(q_out["logits"], -1))),
              "total_macs": bops["total_macs"], "total_bops": bops["total_bops"],
              "bops_ratio_vs_int8": bops["ratio_vs_int8"], "images": int(x.shape[0])}
    return {"arch": qm.arch, "config": qm.config.to_dict(), "layers": rows, "totals": totals}


def _kind(info) -> str:
    if info.kind == "dense":
        return "dense"
    k = info.kernel_shape[0]
    if info.groups > 1 and info.groups == info.kernel_shape[-1] and info.kernel_shape[2] == 1:
        return f"dw{k}x{k}"
    return f"conv{k}x{k}" + (f"/g{info.groups}" if info.groups > 1 else "")


def _center_ratio(kernel: np.ndarray) -> float | None:
    """max |centre tap| / max |other taps| of an odd k x k kernel (None for 1x1 / dense)."""
    if kernel.ndim != 4 or kernel.shape[0] < 3 or kernel.shape[0] % 2 == 0:
        return None
    c = kernel.shape[0] // 2
    centre = np.abs(kernel[c, c]).max()
    rest = np.abs(kernel).copy()
    rest[c, c] = 0
    return float(centre / rest.max()) if rest.max() > 0 else float("inf")


def _min(v):
    return None if v is None else float(np.min(v))


def _max(v):
    return None if v is None else float(np.max(v))


COLUMNS = ("layer", "kind", "scheme", "center_surround_ratio", "w_scale_max", "out_amax", "out_method",
           "weight_sqnr_db", "output_sqnr_db", "output_cosine")


def format_report(report: dict) -> str:
    """Fixed-width text table of the main columns plus the totals."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [COLUMNS] + [tuple(cell(r.get(c)) for c in COLUMNS) for r in report["layers"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    t = report["totals"]
    lines.append(f"logits: SQNR {t['logits_sqnr_db']:.2f} dB, cosine {t['logits_cosine']:.5f}, "
                 f"top-1 agreement {t['top1_agreement']:.3f} on {t['images']} images; "
                 f"BOPs {t['total_bops']:.4g} ({t['bops_ratio_vs_int8']:.3f}x INT8)")
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    """JSON (``.json``) or CSV (``.csv``, one row per layer) by file extension."""
    if path.endswith(".csv"):
        keys = sorted({k for r in report["layers"] for k in r},
                      key=lambda k: (COLUMNS.index(k) if k in COLUMNS else len(COLUMNS), k))
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(report["layers"])
    elif path.endswith(".json"):
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1, default=float)
    else:
        raise ValueError(f"report file {path!r}: use a .json or .csv extension")


def sensitivity(qm: QuantizedModel, variables: Mapping, images, model=None) -> list[dict]:
    """Quantize each layer alone; ``[{"layer", "logits_sqnr_db", "logits_kl"}]``, most damaging first."""
    run, fw, qw, _ = _comparison(qm, variables, images, model)
    P = len(qm.plan.points)
    ref = np.asarray(run(fw, np.zeros((P,), bool))["logits"], np.float64)
    ref_p = _softmax(ref)
    rows = []
    for lp in qm.plan.layers:
        w = dict(fw)
        w[lp.info.name] = qw[lp.info.name]
        en = np.zeros((P,), bool)
        for idx in (lp.in_point, lp.out_point):
            if idx is not None:
                en[idx] = True
        out = np.asarray(run(w, en)["logits"], np.float64)
        kl = float(np.mean(np.sum(ref_p * (np.log(ref_p + 1e-12) - np.log(_softmax(out) + 1e-12)), -1)))
        rows.append({"layer": lp.info.name, "logits_sqnr_db": sqnr_db(ref, out), "logits_kl": kl})
    return sorted(rows, key=lambda r: (r["logits_sqnr_db"], r["layer"]))


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)
