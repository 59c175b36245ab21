"""Per-layer quantization report and single-layer sensitivity ranking.

``layer_report(qm, variables, images)`` compares the quantized model with its float original,
layer by layer, on a few images: weight SQNR, output SQNR and cosine (the quantized network's
layer output against the float network's), the centre/surround range ratio that motivates
CFWS, scales, activation ranges, MACs and BOPs. ``sensitivity(...)`` quantizes one layer at a
time (its weights and its activation quantizers; all else float) and ranks layers by the
damage to the logits (SQNR in dB, lower is worse; KL of the softmax).

Detectors (a decoded ``[B, N, 5 + nc]`` output, :mod:`cfws_jax.models.yolov6.model`) are
compared on two parts of that output, never by mAP: ``box`` = the ``cx, cy, w, h`` columns with
each anchor cell's centre (in input pixels) taken off ``cx, cy`` (so the fixed grid positions do
not count as signal), and ``score`` = confidence x class scores (what NMS ranks). The totals add
``box_sqnr_db`` / ``box_cosine`` / ``score_sqnr_db`` / ``score_cosine`` and
``class_agreement`` (argmax class agreement over the anchors whose float top score is >= 0.03,
the NMS candidates; None when there are none), and set the classifier-only ``top1_agreement`` to
None; ``logits_*`` still compare the whole decoded tensor. Sensitivity rows of a detector are
``{"layer", "output_sqnr_db" (the worse of the two, the ranking key), "box_sqnr_db",
"score_sqnr_db"}`` (no ``logits_kl``); per-layer rows are the same for both kinds (the head
prediction convs' rows compare the raw head outputs).
"""

from __future__ import annotations

import csv
import json
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from cfws_jax.bops import ConvGeometry, network_bops
from cfws_jax.ptq.model import QuantizedModel, device_params, float_params, layer_params, model_for
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


def _float_weights(qm: QuantizedModel, variables, model=None):
    """Float ``{layer: {"kernel", "bias"}}`` of the original model (train-form variables are
    fused; equalized like ``qm`` when ``qm.config.cle``: :func:`cfws_jax.ptq.model.float_params`)."""
    params = float_params(qm, variables, model)
    return {lp.info.name: {k: jnp.asarray(v, jnp.float32) for k, v in layer_params(params, lp.info.name).items()
                           if k in ("kernel", "bias")} for lp in qm.plan.layers}


def _comparison(qm: QuantizedModel, variables, images, model=None, return_outputs: bool = False):
    """``(run(weights, enabled) -> forward dict, float weights, dequantized weights, images)``."""
    model = model_for(qm, model)
    x = jnp.asarray(images, jnp.float32)
    fwd = jitted_forward(model, qm.plan, return_outputs=return_outputs)
    amax, qmax, extra = jnp.asarray(qm.act_amax), qm.plan.qmax(), device_params(qm.extra_params)

    def run(weights, enabled):
        return fwd(weights, amax, qmax, jnp.asarray(enabled, bool), x, extra_params=extra)

    return run, _float_weights(qm, variables, model), qm.dequantized_weights(as_jax=True), x


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
    """``{"layers": [row, ...], "totals": {...}}`` (see module docstring). images: NHWC float32.

    A model made with ``reconstruct`` / ``bias_correction`` adds, per layer, ``recon_loss_before``
    / ``recon_loss_after`` / ``recon_seconds`` and ``bc_loss_before`` / ``bc_loss_after`` /
    ``bc_seconds`` (its output error on the calibration images, from ``qm.meta``) and
    ``totals["refine_seconds"]``."""
    run, fw, qw, x = _comparison(qm, variables, images, model, return_outputs=True)
    P = len(qm.plan.points)
    f_out = run(fw, np.zeros((P,), bool))
    q_out = run(qw, np.ones((P,), bool))
    bops = network_bops([(lp.info.name, geometry(lp.info), bops_scheme(lp, qm.config)) for lp in qm.plan.layers],
                        qm.config.w_bits, qm.config.a_bits)
    rows = []
    refine = qm.meta
    for lp, b in zip(qm.plan.layers, bops["layers"]):
        info, name = lp.info, lp.info.name
        wf, wq = np.asarray(fw[name]["kernel"]), np.asarray(qw[name]["kernel"])
        q = qm.layers[name]
        row = {"layer": name, "kind": _kind(info), "scheme": lp.scheme, "w_bits": lp.w_bits,
               "kernel": "x".join(map(str, info.kernel_shape)), "groups": info.groups,
               "center_surround_ratio": _center_ratio(wf),
               "w_scale_min": _min(_real_scales(q.get("w_codes"), q.get("w_scale"))),
               "w_scale_max": _max(_real_scales(q.get("w_codes"), q.get("w_scale"))),
               "coarse_scale_max": _max(_real_scales(q.get("c_codes"), q.get("c_scale"))),
               "zero_weight_channels": _zero_channels(q),
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
        for prefix, key in (("recon", "reconstruction"), ("bc", "bias_correction")):  # issue #14 statistics
            st = refine.get(key, {}).get(name)
            if st is not None:
                row[f"{prefix}_loss_before"] = st["loss_before"]
                row[f"{prefix}_loss_after"] = st["loss_after"]
                row[f"{prefix}_seconds"] = st["seconds"]
        rows.append(row)
    totals = {"logits_sqnr_db": sqnr_db(f_out["logits"], q_out["logits"]),
              "logits_cosine": cosine(f_out["logits"], q_out["logits"]),
              "top1_agreement": float(np.mean(np.argmax(f_out["logits"], -1) == np.argmax(q_out["logits"], -1))),
              "total_macs": bops["total_macs"], "total_bops": bops["total_bops"],
              "bops_ratio_vs_int8": bops["ratio_vs_int8"], "images": int(x.shape[0])}
    if "refine_seconds" in refine:
        totals["refine_seconds"] = refine["refine_seconds"]
    if is_detection_output(f_out["logits"]):
        totals.update(detection_agreement(f_out["logits"], q_out["logits"], tuple(x.shape[1:3])))
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


def _real_scales(codes, scale):
    """The scales of output channels (last axis) with a non-zero code; all-zero channels carry
    the placeholder scale 1 of the quantizer, which is no range and is left out."""
    if codes is None or scale is None:
        return None
    codes, scale = np.asarray(codes), np.asarray(scale, np.float64).reshape(-1)
    if scale.size == 1:
        return scale if np.any(codes) else scale[:0]
    live = np.any(codes.reshape(-1, codes.shape[-1]) != 0, axis=0)
    return scale[live] if live.shape == scale.shape else scale


def _zero_channels(q) -> int:
    """Output channels whose every weight code (fine and coarse) is zero."""
    codes = [np.asarray(q[k]) for k in ("w_codes", "c_codes") if k in q]
    if not codes:
        return 0
    live = np.zeros((codes[0].shape[-1],), bool)
    for c in codes:
        live |= np.any(c.reshape(-1, c.shape[-1]) != 0, axis=0)
    return int(np.sum(~live))


def _min(v):
    return None if v is None or np.size(v) == 0 else float(np.min(v))


def _max(v):
    return None if v is None or np.size(v) == 0 else float(np.max(v))


NULL_NOTE = ("null stands for a value JSON cannot hold: an SQNR of +inf (identical outputs) or -inf "
             "(zero signal), an undefined cosine (a zero vector), a centre/surround ratio of +inf "
             "(all-zero neighbours); scale statistics leave out all-zero channels (zero_weight_channels) "
             "and are null when no channel is left")


def strict_json(obj):
    """``obj`` with every NaN / +-Infinity float replaced by None (numpy scalars made Python)."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


COLUMNS = ("layer", "kind", "scheme", "center_surround_ratio", "w_scale_max", "out_amax", "out_method",
           "weight_sqnr_db", "output_sqnr_db", "output_cosine")
# shown by format_report when some row has them: the layer output's loss (per element, on the
# calibration images) before / after reconstruction and bias correction (issue #14)
REFINE_COLUMNS = ("recon_loss_before", "recon_loss_after", "bc_loss_before", "bc_loss_after")


def format_report(report: dict) -> str:
    """Fixed-width text table of the main columns plus the totals."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cols = COLUMNS + tuple(c for c in REFINE_COLUMNS if any(c in r for r in report["layers"]))
    table = [cols] + [tuple(cell(r.get(c)) for c in cols) for r in report["layers"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    t = report["totals"]
    bops = f"BOPs {t['total_bops']:.4g} ({t['bops_ratio_vs_int8']:.3f}x INT8)"
    if "box_sqnr_db" in t:  # a detector
        agree = "-" if t.get("class_agreement") is None else f"{t['class_agreement']:.3f}"
        lines.append(f"decoded output: box SQNR {t['box_sqnr_db']:.2f} dB (cosine {t['box_cosine']:.5f}), "
                     f"score SQNR {t['score_sqnr_db']:.2f} dB (cosine {t['score_cosine']:.5f}), "
                     f"class agreement {agree} on {t['images']} images; {bops}")
    else:
        lines.append(f"logits: SQNR {t['logits_sqnr_db']:.2f} dB, cosine {t['logits_cosine']:.5f}, "
                     f"top-1 agreement {t['top1_agreement']:.3f} on {t['images']} images; {bops}")
    if "refine_seconds" in t:
        lines.append(f"reconstruction / bias correction: {t['refine_seconds']:.1f} s "
                     "(losses: per-element output error on the calibration images)")
    return "\n".join(lines)


def report_text(report: dict, path: str) -> str:
    """The report as strict JSON (``.json``: non-finite values as null, explained under
    ``"null_means"``) or CSV (``.csv``, one row per layer), chosen by extension."""
    if path.lower().endswith(".csv"):
        import io as _io

        keys = sorted({k for r in report["layers"] for k in r},
                      key=lambda k: (COLUMNS.index(k) if k in COLUMNS else len(COLUMNS), k))
        buf = _io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(report["layers"])
        return buf.getvalue()
    if path.lower().endswith(".json"):
        return json.dumps({**strict_json(report), "null_means": NULL_NOTE}, indent=1, allow_nan=False) + "\n"
    from cfws_jax.io import OutputError

    raise OutputError(f"report file {path}: use a .json or .csv extension")


def write_report(report: dict, path: str, *, overwrite: bool = False, flag: str | None = None) -> str:
    """Write :func:`report_text` atomically (:func:`cfws_jax.io.write_file_atomic`); the path."""
    from cfws_jax.io import write_file_atomic

    return write_file_atomic(path, report_text(report, path), overwrite=overwrite, flag=flag,
                             suffixes=(".json", ".csv"))


def sensitivity(qm: QuantizedModel, variables: Mapping, images, model=None) -> list[dict]:
    """Quantize each layer alone; ``[{"layer", "logits_sqnr_db", "logits_kl"}]`` (detectors:
    ``[{"layer", "output_sqnr_db", "box_sqnr_db", "score_sqnr_db"}]``), most damaging first
    (:func:`sensitivity_db` is the ranking key of either)."""
    run, fw, qw, x = _comparison(qm, variables, images, model)
    P = len(qm.plan.points)
    ref = np.asarray(run(fw, np.zeros((P,), bool))["logits"], np.float64)
    if is_detection_output(ref):
        return _detector_sensitivity(qm, run, fw, qw, ref, tuple(x.shape[1:3]))
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


def sensitivity_db(row: Mapping) -> float:
    """The ranking value of a :func:`sensitivity` row (classifier or detector), in dB."""
    return row["logits_sqnr_db"] if "logits_sqnr_db" in row else row["output_sqnr_db"]


def _detector_sensitivity(qm, run, fw, qw, ref, input_hw) -> list[dict]:
    ref_box, ref_score = detection_parts(ref, input_hw)
    rows = []
    for lp in qm.plan.layers:
        w = dict(fw)
        w[lp.info.name] = qw[lp.info.name]
        en = np.zeros((len(qm.plan.points),), bool)
        for idx in (lp.in_point, lp.out_point):
            if idx is not None:
                en[idx] = True
        box, score = detection_parts(np.asarray(run(w, en)["logits"], np.float64), input_hw)
        b, s = sqnr_db(ref_box, box), sqnr_db(ref_score, score)
        rows.append({"layer": lp.info.name, "output_sqnr_db": min(b, s), "box_sqnr_db": b, "score_sqnr_db": s})
    return sorted(rows, key=lambda r: (r["output_sqnr_db"], r["layer"]))


DETECTION_STRIDES = (8, 16, 32)
CANDIDATE_SCORE = 0.03  # the official NMS confidence threshold


def is_detection_output(y) -> bool:
    """True for a detector's decoded ``[B, N, 5 + nc]`` output (classifier logits are ``[B, C]``)."""
    return np.ndim(y) == 3 and np.shape(y)[-1] >= 6


def _anchor_centres(n: int, input_hw) -> np.ndarray:
    """``[n, 2]`` cell centres ``(x + 0.5, y + 0.5) * stride`` in input pixels, level by level
    (strides 8, 16, 32), row-major; zeros when ``n`` does not match that layout."""
    h, w = input_hw
    pts = []
    for s in DETECTION_STRIDES:
        ys, xs = np.meshgrid(np.arange(h // s), np.arange(w // s), indexing="ij")
        pts.append((np.stack([xs.ravel(), ys.ravel()], -1) + 0.5) * s)
    pts = np.concatenate(pts) if pts else np.zeros((0, 2))
    return pts if len(pts) == n else np.zeros((n, 2))


def detection_parts(pred, input_hw) -> tuple[np.ndarray, np.ndarray]:
    """Decoded ``[B, N, 5 + nc]`` -> (box ``[B, N, 4]``: ``cx, cy`` relative to the anchor cell
    centre, ``w, h``, input pixels; score ``[B, N, nc]``: confidence x class scores), float64."""
    pred = np.asarray(pred, np.float64)
    box = pred[..., :4].copy()
    box[..., :2] -= _anchor_centres(pred.shape[1], input_hw)
    return box, pred[..., 4:5] * pred[..., 5:]


def detection_agreement(ref, test, input_hw) -> dict:
    """Totals of a detector's float (``ref``) vs quantized (``test``) decoded outputs (see the
    module docstring)."""
    rb, rs = detection_parts(ref, input_hw)
    tb, ts = detection_parts(test, input_hw)
    cand = rs.max(-1) >= CANDIDATE_SCORE
    agree = float(np.mean(np.argmax(rs, -1)[cand] == np.argmax(ts, -1)[cand])) if cand.any() else None
    return {"box_sqnr_db": sqnr_db(rb, tb), "box_cosine": cosine(rb, tb), "score_sqnr_db": sqnr_db(rs, ts),
            "score_cosine": cosine(rs, ts), "class_agreement": agree, "candidates": int(cand.sum()),
            "top1_agreement": None}


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)
