"""Bias correction and layer-wise reconstruction (learned rounding) after calibration (issue #14).

:func:`refine` runs inside :func:`cfws_jax.ptq.quantize` after calibration when
``config.bias_correction`` or ``config.reconstruct`` is set. It walks the layers in execution
order (``plan.layers``), skipping ``float`` layers, and for each layer:

1. **captures**, over all calibration images, ``x_q`` = the layer's input in the quantized
   network (dequantized codes everywhere, the layers before it already reconstructed /
   corrected, every activation point before the layer's own ``:in`` point quantized) and
   ``x_fp`` = the same tensor in the float network. :func:`refine` does it in one pass: every
   batch runs through both networks at once (two threads per batch, each QConv / QDense a small
   jitted function per layer geometry, as in the one-pass sequential calibration), and all
   threads meet at each refined layer, which is refined there before they go on. Its tensors
   are bit for bit those of :func:`capture`, the slow reference: one jitted *capture function*
   per layer, the fake-quant forward of :func:`cfws_jax.ptq.runtime.make_forward` under an
   outer interceptor that stops at the layer and returns its ``args[0]`` (only the prefix of the
   network is traced and run; float and quantized captures share the compile).
2. **reconstructs** (``config.reconstruct``): :func:`cfws_jax.ptq.adaround.reconstruct_layer`
   learns the rounding of the layer's codes against ``y_fp = act(linear(x_fp, W, b))`` (float
   kernel and bias); the layer's codes are replaced (scales never change) and, with
   ``recon_act_step``, the amax of its ``:in`` point too.
3. **corrects the bias** (``config.bias_correction``), after the reconstruction when both are
   on (the correction then removes the mean shift that the final codes leave): per output
   channel, ``b -= mean over images and positions of linear(q_in(x_q), W_q, b_q) -
   linear(x_fp, W, b)`` (pre-activation; ``W_q`` / ``b_q`` the dequantized stored weights,
   ``q_in`` the layer's ``:in`` quantizer), only where that mean is significant: ``|mean| >
   z * std_err`` with ``z = config.bias_correction_z`` (default 2) and ``std_err`` from the
   per-image means (:func:`significant_shift`; a shift estimated from a few hundred images is
   mostly noise where it is tiny, and subtracting noise costs accuracy at W8A8). Stored as the float ``bias``, or requantized to
   int16 codes with a fresh per-tensor scale (``bias="int16"``, as
   :func:`cfws_jax.ptq.weights.quantize_layer` makes them). Layers without a bias are left alone.

Statistics (``QuantizedModel.meta``, saved and restored with the model):
``meta["reconstruction"][layer] = {"loss_before", "loss_after", "seconds", "capture_seconds",
"accepted"}`` (losses per element, ``recon_loss``, on all calibration rows: round-to-nearest
and the learned rounding; ``seconds`` the learning alone, ``capture_seconds`` the forward up to
the layer and its float target; ``recon_iters=0`` keeps the round-to-nearest codes and only
measures) and ``meta["bias_correction"][layer] = {"loss_before", "loss_after", "max_shift",
"corrected", "seconds"}`` (the layer output's loss before / after the correction, the largest
estimated shift, the number of channels corrected); ``meta["refine_seconds"]``
the whole pass.

Granularity (``config.recon_unit``): ``"block"`` (default) reconstructs each YOLOv6 RepBlock
(``conv1`` and its ``block_j`` RepVGG blocks, a chain of fused 3x3 convs) as one unit, all its
layers' rounding learned jointly against the block's float output, BRECQ-style
(:mod:`cfws_jax.ptq.block_recon`; :func:`recon_units` finds the units); every other layer, and
every layer with ``"layer"``, is its own unit. A depthwise conv and the pointwise 1x1 conv that
reads its output (MobileOne: each depthwise block and the pointwise block after it) are one unit
too. For the RepVGG deploy form one layer is one block (re-parameterized conv + ReLU), so both
settings are the same there; in MobileOne SE blocks the SE product stands between the depthwise
and the pointwise conv, so the rep conv (before SE), ``se/reduce`` and ``se/expand`` stay three
units. A unit's
statistics (its output's losses) are repeated on each of its layers with ``"unit"`` = its layer
names; the learning seconds are on its first layer. Bias correction stays per layer: an inner
layer of a unit is corrected when the pass reaches it, after the unit's codes changed.

Cost: the pass runs each network once per image (no prefix is recomputed) and compiles one
small function per layer geometry, not per layer; on the shipped CIFAR RepVGG-A0 with 32 images
bias correction takes ~6 s where per-layer prefix captures (:func:`capture`) took ~43 s (same
biases, bit for bit). The learning is ``recon_iters`` steps of ``recon_batch_size`` rows per
layer and dominates the time of a reconstruction. Memory: ``x_q``, ``x_fp`` and ``y_fp`` of
the current layer, float32 on the host, plus the per-batch tensors the threads hold (the same
size again) and the device copy the learning makes (on the CPU backend all host memory):
MobileOne-S0 at 224 with 256 images peaks at its first depthwise layer, whose two
``[256, 112, 112, 48]`` inputs are 0.6 GB each and its output 0.15 GB: about 1.4 GB, 4 GB at
the peak.
Reconstruction runs on one device (a ``mesh`` given to ``quantize`` only shards calibration).
"""

from __future__ import annotations

import functools
import re
import threading
import time
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cfws_jax.models.layers import QConv, QDense, activation
from cfws_jax.progress import Progress
from cfws_jax.ptq.adaround import ReconConfig, reconstruct_layer
from cfws_jax.ptq.block_recon import UnitLayer, reconstruct_unit, unit_output
from cfws_jax.ptq.calibrate import _Done, _fq_fn, _geometry, _layer_fn, apply_layer, intercepted_forward, run_in_lockstep
from cfws_jax.ptq.config import QuantConfig
from cfws_jax.ptq.graph import LayerInfo, layer_name
from cfws_jax.ptq.runtime import LayerPlan, Plan, forward_key, layer_linear, make_forward
from cfws_jax.ptq.weights import dequantize_layer, quantize_layer
from cfws_jax.quant import fake_quant_symmetric, int_range

TRACE_COUNTS = {"capture": 0, "shift": 0, "loss": 0}
"""How often the capture functions and the bias-shift function were traced (tests read it)."""


def recon_config(config: QuantConfig) -> ReconConfig:
    """The :class:`~cfws_jax.ptq.adaround.ReconConfig` of a QuantConfig's ``recon_*`` fields
    (seed: ``config.seed``; beta schedule and warm-up: ReconConfig's defaults)."""
    return ReconConfig(iters=config.recon_iters, batch_size=config.recon_batch_size, lr=config.recon_lr,
                       reg_weight=config.recon_reg_weight, loss=config.recon_loss, qdrop_prob=config.recon_qdrop,
                       learn_act_step=config.recon_act_step, seed=config.seed)


# ----------------------------------------------------------------------------------------------
# capture functions


class _Captured(Exception):
    """Raised (while tracing) by the capture interceptor at the target layer; carries its input."""

    def __init__(self, value):
        super().__init__("captured")
        self.value = value


@functools.lru_cache(maxsize=512)
def _capture_jit(model: nn.Module, key: Plan, name: str):
    """One jitted ``(weights, amax, qmax, enabled, x) -> args[0] of layer name`` per model, plan
    structure and layer."""
    fwd = make_forward(model, key)

    def grab(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (QConv, QDense)) and layer_name(mod) == name:
            raise _Captured(args[0])
        return next_fun(*args, **kwargs)

    def fn(weights, amax, qmax, enabled, x, extra_params):
        TRACE_COUNTS["capture"] += 1
        try:
            with nn.intercept_methods(grab):  # outer: runs before the fake-quant interceptor
                fwd(weights, amax, qmax, enabled, x, extra_params=extra_params)
        except _Captured as c:
            return c.value
        raise ValueError(f"layer {name!r} is not called by the model")

    return jax.jit(fn)


def capture(model: nn.Module, plan: Plan, name: str, weights: Mapping, amax, enabled,
            batches: Sequence, extra_params=None) -> np.ndarray:
    """``[N, ...]`` float32 (NumPy): the input of layer ``name`` as the fake-quant forward sees it
    (before the layer's ``:in`` point), for every image of ``batches`` (NHWC, concatenated).

    ``weights`` ``{layer: {"kernel", "bias"?}}``, ``amax`` ``(P,)`` and ``enabled`` ``(P,)`` bool
    are the arguments of :func:`cfws_jax.ptq.runtime.make_forward`'s forward (float weights with
    nothing enabled: the float network; ``extra_params`` the non-layer params,
    :func:`cfws_jax.ptq.graph.non_layer_params`). The reference of :func:`refine`'s one-pass capture: one
    compile per layer, and the network up to the layer runs again for every layer.
    """
    fn = _capture_jit(model, forward_key(plan), name)
    qmax, amax, enabled = plan.qmax(), jnp.asarray(amax, jnp.float32), jnp.asarray(enabled, bool)
    n = sum(int(b.shape[0]) for b in batches)
    out, i = None, 0
    for x in batches:
        t = np.asarray(fn(weights, amax, qmax, enabled, jnp.asarray(x, jnp.float32), dict(extra_params or {})),
                       np.float32)
        if out is None:
            out = np.empty((n, *t.shape[1:]), np.float32)
        out[i:i + t.shape[0]] = t
        i += t.shape[0]
    return out


# ----------------------------------------------------------------------------------------------
# bias correction


@functools.partial(jax.jit, static_argnames=("geom", "rounding"))
def _shift_rows(x_q, x_fp, kq, bq, kf, bf, amax, qmax, *, geom, rounding):
    """``[B, O]``: per row, the sum over positions of ``linear(q_in(x_q), kq, bq) - linear(x_fp, kf, bf)``
    (``rounding`` None: no ``:in`` quantizer)."""
    TRACE_COUNTS["shift"] += 1
    if rounding is not None:
        x_q = fake_quant_symmetric(x_q, amax, qmax, rounding)
    d = layer_linear(geom, x_q, kq, bq) - layer_linear(geom, x_fp, kf, bf)
    return d.reshape(d.shape[0], -1, d.shape[-1]).sum(1)


def _chunks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _in_args(in_quant):
    if in_quant is None:
        return jnp.float32(0), jnp.float32(1), None
    amax, qmax, rounding = in_quant
    return jnp.float32(amax), jnp.float32(qmax), rounding


def image_shifts(info, q: Mapping, kernel, bias, x_q, x_fp, in_quant, chunk: int = 32) -> np.ndarray:
    """``[N, O]`` float64: per image, the mean over positions of the pre-activation output error
    of the stored layer ``q`` (dequantized) on ``q_in(x_q)`` against the float ``kernel`` /
    ``bias`` on ``x_fp`` (``[N, ...]`` arrays; ``in_quant`` None or ``(amax, qmax, rounding)``)."""
    deq = dequantize_layer({k: np.asarray(v) for k, v in q.items()})
    kq, bq = jnp.asarray(deq["kernel"]), jnp.asarray(deq["bias"]) if "bias" in deq else None
    kf, bf = jnp.asarray(kernel, jnp.float32), None if bias is None else jnp.asarray(bias, jnp.float32)
    amax, qmax, rounding = _in_args(in_quant)
    geom = _geometry(info)
    rows = [np.asarray(_shift_rows(jnp.asarray(x_q[a:b]), jnp.asarray(x_fp[a:b]), kq, bq, kf, bf, amax, qmax,
                                   geom=geom, rounding=rounding), np.float64)
            for a, b in _chunks(x_q.shape[0], chunk)]
    positions = int(np.prod(info.out_shape[1:-1]))  # 1 for dense layers ([1, O])
    return np.concatenate(rows) / positions


def significant_shift(per_image, z: float) -> np.ndarray:
    """``(O,)`` float64: the mean over images of ``per_image`` ``[N, O]`` where it is significant,
    ``|mean| > z * std_err`` (``std_err`` = sample std over the images, ``ddof=1``, over
    ``sqrt(N)``: images are the independent unit, positions within one are not), else 0.

    ``z = 0`` keeps every channel's mean (plain bias correction); with ``z > 0`` and one image
    nothing is significant (no error estimate)."""
    d = np.asarray(per_image, np.float64)
    mean = d.mean(0)
    if z == 0:
        return mean
    if d.shape[0] < 2:
        return np.zeros_like(mean)
    std_err = d.std(0, ddof=1) / np.sqrt(d.shape[0])
    return np.where(np.abs(mean) > z * std_err, mean, 0.0)


def corrected_bias(q: Mapping, shift, kernel, scheme: str, w_bits: int, config: QuantConfig) -> dict:
    """``q`` with its bias lowered by ``shift`` ``(O,)``: the float ``bias``, or int16 ``b_codes`` /
    ``b_scale`` requantized from the corrected float bias (``config.bias == "int16"``)."""
    deq = dequantize_layer({k: np.asarray(v) for k, v in q.items()})
    new = (deq["bias"].astype(np.float64) - np.asarray(shift, np.float64)).astype(np.float32)
    out = dict(q)
    if "b_codes" in q:
        fresh = quantize_layer(kernel, new, scheme, w_bits, config)
        out["b_codes"], out["b_scale"] = fresh["b_codes"], fresh["b_scale"]
    else:
        out["bias"] = new
    return out


# ----------------------------------------------------------------------------------------------
# reconstruction units

_REPBLOCK_LAYER = re.compile(r"^(?P<block>.+)/(conv1|block_\d+)/rbr_reparam$")


def recon_units(plan: Plan, unit: str = "block") -> dict[str, tuple[LayerPlan, ...]]:
    """``{first layer: the unit's LayerPlans}`` for every unit of >= 2 layers (``unit="layer"``: none).

    A unit is a maximal run of consecutive quantized (plain / cfws) layers of one YOLOv6 RepBlock
    (``<block>/conv1/rbr_reparam``, ``<block>/block_j/rbr_reparam``) where each layer's input is
    the previous layer's output, through that layer's ``:out`` point and no ``:in`` point of its own;
    or a depthwise conv and the 1x1 pointwise conv that reads its output that way (MobileOne's
    blocks, issue #24).
    """
    if unit == "layer":
        return {}
    units, run, block = {}, [], None

    def close():
        if len(run) >= 2:
            units[run[0].info.name] = tuple(run)

    for lp in plan.layers:
        m = _REPBLOCK_LAYER.match(lp.info.name)
        chained = (m is not None and run and m["block"] == block and lp.info.input_from == run[-1].info.name
                   and run[-1].out_point is not None and lp.in_point is None)
        if lp.scheme == "float" or m is None:
            close()
            run, block = [], None
        elif chained:
            run.append(lp)
        else:
            close()
            run, block = [lp], m["block"]
    close()
    # depthwise -> pointwise pairs (MobileOne, MobileNet-style): the pointwise conv reads the
    # depthwise conv's output directly, through its :out point
    taken = {lp.info.name for u in units.values() for lp in u}
    by_name = {lp.info.name: lp for lp in plan.layers}
    for b in plan.layers:
        a = by_name.get(b.info.input_from) if b.info.input_from is not None else None
        if (a is not None and _depthwise(a.info) and _pointwise(b.info) and a.out_point is not None
                and b.in_point is None and "float" not in (a.scheme, b.scheme)
                and not {a.info.name, b.info.name} & taken):
            units[a.info.name] = (a, b)
            taken |= {a.info.name, b.info.name}
    return dict(sorted(units.items(), key=lambda kv: kv[1][0].info.index))


def _depthwise(info: LayerInfo) -> bool:
    return info.kind == "conv" and info.groups > 1 and info.groups == info.in_shape[-1]


def _pointwise(info: LayerInfo) -> bool:
    return info.kind == "conv" and info.groups == 1 and tuple(info.kernel_shape[:2]) == (1, 1)


def _unit_layers(units: tuple[LayerPlan, ...], st: dict) -> list[UnitLayer]:
    plan, amax = st["plan"], st["amax"]
    out = []
    for j, lp in enumerate(units):
        link = None
        if j + 1 < len(units):
            p = plan.points[lp.out_point]
            link = (float(amax[lp.out_point]), float(p.spec.qmax), p.rounding, bool(p.before_act))
        fw = st["float_w"][lp.info.name]
        out.append(UnitLayer(lp.info, st["q_layers"][lp.info.name], fw["kernel"], fw.get("bias"), lp.w_bits, link))
    return out


def _reconstruct_unit(units: tuple[LayerPlan, ...], x_q, x_fp, st: dict, t_cap: float) -> str:
    """Reconstruct a multi-layer unit from its first layer's captured inputs; returns the progress text."""
    plan, chunk = st["plan"], st["config"].calib_batch_size
    layers = _unit_layers(units, st)
    first = units[0]
    y_fp = unit_output(layers, x_fp, chunk=chunk)
    in_quant = _in_quant(plan, first, st["amax"])
    names = [lp.info.name for lp in units]
    new_qs, r = reconstruct_unit(layers, x_q=x_q, x_fp=x_fp, y_fp=y_fp, in_quant=in_quant, rcfg=st["rcfg"])
    for lp, q in zip(units, new_qs):
        _check_layout(lp.info.name, st["q_layers"][lp.info.name], q, lp.w_bits)
        st["q_layers"][lp.info.name] = q
        st["quant_w"][lp.info.name] = {k: jnp.asarray(v) for k, v in dequantize_layer(q).items()}
    if "in_amax" in r and first.in_point is not None:
        st["amax"][first.in_point] = np.float32(r["in_amax"])
    for j, name in enumerate(names):
        st["recon"][name] = {"loss_before": float(r["loss_before"]), "loss_after": float(r["loss_after"]),
                             "seconds": float(r["seconds"]) if j == 0 else 0.0,
                             "capture_seconds": t_cap if j == 0 else 0.0, "accepted": bool(r["accepted"]),
                             "unit": names}
        if "in_amax" in r and j == 0 and first.in_point is not None:
            st["recon"][name]["in_amax"] = float(st["amax"][first.in_point])
    return f"unit of {len(names)} layers {r['loss_before']:.4g} -> {r['loss_after']:.4g}"


# ----------------------------------------------------------------------------------------------
# the driver


def _float_outputs(info, kernel, bias, x_fp, chunk: int) -> np.ndarray:
    """``act(linear(x_fp, kernel, bias))`` ``[N, ..., O]`` float32, ``chunk`` rows at a time."""
    geom = _geometry(info)
    kernel = jnp.asarray(kernel, jnp.float32)
    bias = None if bias is None else jnp.asarray(bias, jnp.float32)
    parts = [np.asarray(_layer_fn(jnp.asarray(x_fp[a:b]), kernel, bias, info=geom, act=info.act), np.float32)
             for a, b in _chunks(x_fp.shape[0], chunk)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


@functools.partial(jax.jit, static_argnames=("geom", "act", "rounding", "loss"))
def _loss_sum(x_q, y_fp, kernel, bias, amax, qmax, *, geom, act, rounding, loss):
    """Sum over the chunk of ``(y - y_fp)^2`` ("mse") or ``|y - y_fp|`` ("mae"), ``y`` the layer output."""
    TRACE_COUNTS["loss"] += 1
    if rounding is not None:
        x_q = fake_quant_symmetric(x_q, amax, qmax, rounding)
    d = activation(layer_linear(geom, x_q, kernel, bias), act) - y_fp
    return jnp.sum(d * d if loss == "mse" else jnp.abs(d))


def layer_loss(info, q: Mapping, x_q, y_fp, in_quant, loss: str = "mse", chunk: int = 32) -> float:
    """Per-element ``loss`` ("mse" | "mae") of ``act(linear(q_in(x_q)))`` of the stored layer ``q``
    against ``y_fp`` on all rows (the measure ``reconstruct_layer`` reports)."""
    deq = dequantize_layer({k: np.asarray(v) for k, v in q.items()})
    amax, qmax, rounding = _in_args(in_quant)
    k, b = jnp.asarray(deq["kernel"]), jnp.asarray(deq["bias"]) if "bias" in deq else None
    geom = _geometry(info)
    total = sum(float(_loss_sum(jnp.asarray(x_q[a:e]), jnp.asarray(y_fp[a:e]), k, b, amax, qmax, geom=geom,
                                act=info.act, rounding=rounding, loss=loss))
                for a, e in _chunks(x_q.shape[0], chunk))
    return total / float(np.prod(y_fp.shape))


def _check_layout(name: str, old: Mapping, new: Mapping, w_bits: int) -> None:
    """The reconstruction may change integer codes only (within their range)."""
    if sorted(old) != sorted(new):
        raise ValueError(f"layer {name}: reconstruction changed the stored keys {sorted(old)} -> {sorted(new)}")
    lo, hi = int_range(w_bits)
    for k in old:
        a, b = np.asarray(old[k]), np.asarray(new[k])
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"layer {name}: reconstruction changed {k} from {a.dtype}{a.shape} to {b.dtype}{b.shape}")
        if k in ("w_codes", "c_codes"):
            if b.size and (b.min() < lo or b.max() > hi):
                raise ValueError(f"layer {name}: reconstructed {k} leave [{lo}, {hi}]")
        elif not np.array_equal(a, b):
            raise ValueError(f"layer {name}: reconstruction changed {k} (only codes may change)")


def _in_quant(plan: Plan, lp: LayerPlan, amax) -> tuple | None:
    if lp.in_point is None:
        return None
    p = plan.points[lp.in_point]
    return float(amax[lp.in_point]), float(p.spec.qmax), p.rounding


def _refine_layer(lp: LayerPlan, x_q, x_fp, st: dict) -> str:
    """Reconstruct and / or bias-correct one layer from its captured inputs (``[N, ...]``); updates
    ``st["q_layers"]``, ``st["amax"]``, ``st["quant_w"]`` and the statistics; returns the progress text."""
    config, plan, chunk = st["config"], st["plan"], st["config"].calib_batch_size
    name, info = lp.info.name, lp.info
    q_layers, amax, fw = st["q_layers"], st["amax"], st["float_w"][name]
    in_unit = config.reconstruct and (name in st["inner"] or name in st["units"])
    needs_target = not in_unit or (config.bias_correction and "bias" in dequantize_layer(q_layers[name]))
    t0 = time.perf_counter()
    # the layer's own float output: the target of a one-layer reconstruction and of bias correction
    y_fp = _float_outputs(info, fw["kernel"], fw.get("bias"), x_fp, chunk) if needs_target else None
    t_cap = time.perf_counter() - t0 + st["capture_seconds"]
    in_quant = _in_quant(plan, lp, amax)
    shown = []
    if config.reconstruct and name in st["inner"]:
        shown.append(f"reconstructed with {st['inner'][name]}")
    elif config.reconstruct and name in st["units"]:
        shown.append(_reconstruct_unit(st["units"][name], x_q, x_fp, st, t_cap))
        in_quant = _in_quant(plan, lp, amax)
    elif config.reconstruct:
        new_q, r = reconstruct_layer(q_layers[name], fw["kernel"], fw.get("bias"), info=info, act=info.act,
                                     x_q=x_q, x_fp=x_fp, y_fp=y_fp, in_quant=in_quant, w_bits=lp.w_bits,
                                     config=config, rcfg=st["rcfg"])
        _check_layout(name, q_layers[name], new_q, lp.w_bits)
        q_layers[name] = new_q
        st["recon"][name] = {"loss_before": float(r["loss_before"]), "loss_after": float(r["loss_after"]),
                             "seconds": float(r["seconds"]), "capture_seconds": t_cap,
                             "accepted": bool(r.get("accepted", r["loss_after"] < r["loss_before"]))}
        if "in_amax" in r and lp.in_point is not None:
            amax[lp.in_point] = np.float32(r["in_amax"])
            st["recon"][name]["in_amax"] = float(amax[lp.in_point])
            in_quant = _in_quant(plan, lp, amax)
        shown.append(f"{r['loss_before']:.4g} -> {r['loss_after']:.4g}")
    if config.bias_correction and "bias" in dequantize_layer(q_layers[name]):
        t1 = time.perf_counter()
        before = layer_loss(info, q_layers[name], x_q, y_fp, in_quant, config.recon_loss, chunk)
        per_image = image_shifts(info, q_layers[name], fw["kernel"], fw.get("bias"), x_q, x_fp, in_quant, chunk)
        shift = significant_shift(per_image, config.bias_correction_z)
        if np.any(shift != 0):
            q_layers[name] = corrected_bias(q_layers[name], shift, fw["kernel"], lp.scheme, lp.w_bits, config)
        after = layer_loss(info, q_layers[name], x_q, y_fp, in_quant, config.recon_loss, chunk)
        st["bc"][name] = {"loss_before": before, "loss_after": after,
                          "max_shift": float(np.max(np.abs(per_image.mean(0)))),
                          "corrected": int(np.count_nonzero(shift)),
                          "seconds": time.perf_counter() - t1 + (0.0 if config.reconstruct else t_cap)}
        shown.append(f"bc {before:.4g} -> {after:.4g} ({np.count_nonzero(shift)}/{shift.size} channels)")
    st["quant_w"][name] = {k: jnp.asarray(v) for k, v in dequantize_layer(q_layers[name]).items()}
    return f"{name}: " + ", ".join(shown)


def refine(model: nn.Module, plan: Plan, float_w: Mapping, q_layers: Mapping, amax, batches: Sequence,
           config: QuantConfig, progress: bool = True, extra_params=None) -> tuple[dict, np.ndarray, dict]:
    """Reconstruct and / or bias-correct every non-float layer (module docstring), in one pass.

    Every calibration batch runs through the float and the quantized network at once (two
    threads per batch; the Flax model eagerly, each QConv / QDense as a small jitted function
    per layer geometry, as :func:`cfws_jax.ptq.calibrate.calibrate_sequential` does). At a
    refined layer all threads meet; the last to arrive concatenates the layer's inputs (``x_q``
    from the quantized threads, ``x_fp`` from the float ones), refines the layer and updates the
    quantized weights (and amax); then every thread goes on. The tensors are those
    :func:`capture` returns (the test reference).

    Args:
      float_w: ``{layer: {"kernel", "bias"?}}`` float deploy weights (HWIO / ``[in, out]``).
      q_layers: ``{layer: stored arrays}`` after round-to-nearest (weights.py layout).
      amax: ``(P,)`` calibrated activation ranges.
      batches: the calibration batches (NHWC float32).
      extra_params: the deploy form's non-layer params (:func:`cfws_jax.ptq.graph.non_layer_params`).
    Returns ``(new q_layers, new amax (P,), meta)``, ``meta`` holding ``"reconstruction"`` and / or
    ``"bias_correction"`` per-layer statistics and ``"refine_seconds"``; the inputs are not changed.
    """
    t_all = time.perf_counter()
    todo = [lp for lp in plan.layers if lp.scheme != "float"]
    st = {"config": config, "plan": plan, "float_w": float_w, "q_layers": dict(q_layers),
          "amax": np.array(amax, np.float32), "rcfg": recon_config(config) if config.reconstruct else None,
          "recon": {}, "bc": {}, "capture_seconds": 0.0, "extra_params": dict(extra_params or {}),
          "units": recon_units(plan, config.recon_unit) if config.reconstruct else {},
          "quant_w": {n: {k: jnp.asarray(v) for k, v in dequantize_layer(q).items()} for n, q in q_layers.items()}}
    st["inner"] = {lp.info.name: first for first, u in st["units"].items() for lp in u[1:]}
    meta: dict = {}
    if todo:
        _one_pass(model, plan, todo, [jnp.asarray(b, jnp.float32) for b in batches], st, progress)
    meta["refine_seconds"] = time.perf_counter() - t_all
    if config.reconstruct:
        meta["reconstruction"] = st["recon"]
    if config.bias_correction:
        meta["bias_correction"] = st["bc"]
    return st["q_layers"], st["amax"], meta


def _one_pass(model, plan: Plan, todo, batches, st: dict, progress: bool) -> None:
    config = st["config"]
    what = " + ".join(w for w, f in (("reconstruct", config.reconstruct), ("bias correction", config.bias_correction))
                      if f)
    bar = Progress(total=len(todo), desc=f"{what} ({len(todo)} layers)", unit="layer", disable=not progress)
    refined = {lp.info.name for lp in todo}
    last = todo[-1].info.name
    by_name = {lp.info.name: lp for lp in plan.layers}
    geoms = {lp.info.name: _geometry(lp.info) for lp in plan.layers}
    qmax = [jnp.asarray(p.spec.qmax, jnp.float32) for p in plan.points]
    nb = len(batches)
    slots = {"q": [None] * nb, "fp": [None] * nb}
    current: list = [None, time.perf_counter()]  # the layer being refined, when its captures began

    def settle():  # run by exactly one thread, once every thread holds the input of layer current[0]
        lp = current[0]
        x_q = np.concatenate([np.asarray(t, np.float32) for t in slots["q"]])
        x_fp = np.concatenate([np.asarray(t, np.float32) for t in slots["fp"]])
        slots["q"], slots["fp"] = [None] * nb, [None] * nb
        st["capture_seconds"] = time.perf_counter() - current[1]
        text = _refine_layer(lp, x_q, x_fp, st)
        bar.set_postfix(text)
        bar.update(1)
        current[1] = time.perf_counter()

    barrier = threading.Barrier(2 * nb, action=settle)

    def point(i: int, t):
        return _fq_fn(t, jnp.asarray(st["amax"][i]), qmax[i], rounding=plan.points[i].rounding)

    def run(job):
        kind, b = job
        quant = kind == "q"

        def on_layer(mod, x):
            lp = by_name[layer_name(mod)]
            name = lp.info.name
            if name in refined:
                slots[kind][b] = x
                current[0] = lp
                barrier.wait()
                if name == last:
                    raise _Done
            w = (st["quant_w"] if quant else st["float_w"])[name]
            return apply_layer(lp, plan, geoms[name], w, x, point=point if quant else None)

        intercepted_forward(model, batches[b], on_layer, "reconstruction", st["extra_params"])

    try:
        run_in_lockstep([(k, b) for b in range(nb) for k in ("q", "fp")], run, barrier)
    finally:
        bar.close()
