"""Learned rounding of a *unit* of several layers jointly (BRECQ-style block reconstruction).

A unit is a chain: layer ``j + 1``'s only input is layer ``j``'s output (a YOLOv6 RepBlock:
``conv1`` then ``block_0 .. block_{n-2}``, each a fused 3x3 conv + ReLU). Between two layers
sits the activation point the quantized network has there (layer ``j``'s ``:out`` point, before
or after its activation as the plan says). Every layer of the unit gets its rounding variables
(:mod:`cfws_jax.ptq.adaround`: ``plain`` and ``cfws`` layers, coarse and fine codes), and one
Adam step lowers ``loss(unit(q_in(x_q)), y_fp)`` (the unit's *last* output against the float
unit's) plus the sum of the layers' annealed regularizers. The intermediate points fake-quantize
with a straight-through gradient, so the rounding of an early layer sees how its error propagates
through the later ones. QDrop (``qdrop_prob``) drops each element of the unit input and of each
intermediate point back to its float value with that probability (independent masks).

At the end each layer's codes are hardened (same keys, dtypes, scales), and the unit is kept only
if its output error on all calibration rows is below round-to-nearest's. Layouts as in
adaround: kernels HWIO / ``[in, out]``, activations NHWC / ``[N, in]``. A one-layer unit is
:func:`cfws_jax.ptq.adaround.reconstruct_layer`'s problem (the driver calls that instead).
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cfws_jax.models.layers import activation
from cfws_jax.ptq.adaround import (TRACE_COUNTS, ReconConfig, _amax_of, _err, _quant_in, accept_if_better,
                                   beta_schedule, harden, kept_stats, prepare_rounding, qdrop_mask,
                                   rounding_regularizer, run_steps, soft_kernel, train_lowering_unrolled)
from cfws_jax.ptq.calibrate import _geometry
from cfws_jax.ptq.graph import LayerInfo
from cfws_jax.ptq.runtime import layer_linear
from cfws_jax.ptq.weights import dequantize_layer
from cfws_jax.quant import ZERO_AMAX, fake_quant_symmetric


class UnitLayer(NamedTuple):
    """One layer of a unit. ``q``: stored arrays (plain / cfws); ``kernel`` / ``bias``: float
    weights ``q`` was made from (HWIO / ``[in, out]``); ``link``: the point between this layer and
    the next, ``(amax, qmax, rounding, before_act)``, or None (the unit's last layer)."""

    info: LayerInfo
    q: dict
    kernel: Any
    bias: Any
    w_bits: int
    link: tuple | None


def _forward(geoms, acts, links, kernels, biases, amaxes, qmaxes, x, *, hard, unrolled, drop=None):
    """The unit on ``x`` (after the unit's ``:in`` point): ``act(linear)`` per layer with the
    intermediate points; ``hard``: plain fake-quant there (the quantized network), else the
    straight-through one; ``drop``: None or ``(bits, prob)`` for QDrop at the points."""
    fq = fake_quant_symmetric if hard else None
    for j, (geom, act, link) in enumerate(zip(geoms, acts, links)):
        y = layer_linear(geom, x, kernels[j], biases[j], unrolled)
        if link is None:
            x = activation(y, act)
            continue
        rounding, before_act = link
        pre = y if before_act else activation(y, act)
        if hard:
            post = fq(pre, amaxes[j], qmaxes[j], rounding)
        else:
            post = _quant_in(pre, amaxes[j], qmaxes[j], rounding)
        if drop is not None:
            bits, prob = drop
            salt = jnp.uint32((0x9E3779B9 * (j + 1)) & 0xFFFFFFFF)
            post = jnp.where(qdrop_mask(bits ^ salt, prob, post.shape), pre, post)
        x = activation(post, act) if before_act else post
    return x


@functools.partial(jax.jit, static_argnames=("geoms", "acts", "links", "rounding", "learn_act", "loss", "qdrop",
                                             "unrolled"))
def _unit_step(params, opt_state, t, idx, bits, arrays, biases, amaxes, qmaxes, x_q, x_fp, y_fp, amax0, in_qmax,
               w_qmax, hyper, *, geoms, acts, links, rounding, learn_act, loss, qdrop, unrolled):
    """One Adam step of the whole unit on rows ``idx``; returns ``(params, opt_state)``."""
    TRACE_COUNTS["unit_train"] += 1
    opt = optax.adam(hyper["lr"])
    beta, reg_on = beta_schedule(t, hyper["iters"], hyper["warmup"], hyper["beta_start"], hyper["beta_end"])

    def objective(p):
        x = _quant_in(x_q[idx], _amax_of(p, amax0, learn_act), in_qmax, rounding)
        if qdrop:
            x = jnp.where(qdrop_mask(bits, hyper["qdrop"], x.shape), x_fp[idx], x)
        kernels = [soft_kernel(a, v["vf"], v["vc"], qm) for a, v, qm in zip(arrays, p["layers"], w_qmax)]
        y = _forward(geoms, acts, links, kernels, biases, amaxes, qmaxes, x, hard=False, unrolled=unrolled,
                     drop=(bits, hyper["qdrop"]) if qdrop else None)
        rec = jnp.mean(jnp.sum(_err(y, y_fp[idx], loss), axis=-1))
        reg = sum(rounding_regularizer(v[k], beta, a[m]) for v, a in zip(p["layers"], arrays)
                  for k, m in (("vf", "lf"), ("vc", "lc")))
        return rec + reg_on * hyper["reg_weight"] * reg

    upd, opt_state = opt.update(jax.grad(objective)(params), opt_state, params)
    return optax.apply_updates(params, upd), opt_state


@functools.partial(jax.jit, static_argnames=("geoms", "acts", "links", "rounding", "loss", "batch"))
def _unit_eval_chunk(kernels, biases, amaxes, qmaxes, x_q, y_fp, amax, in_qmax, start, *, geoms, acts, links,
                     rounding, loss, batch):
    """Sum of the error of the hard unit on rows ``start .. start+batch-1`` (rows past N masked)."""
    TRACE_COUNTS["unit_eval"] += 1
    n = x_q.shape[0]
    rows = start + jnp.arange(batch)
    valid = rows < n
    rows = jnp.minimum(rows, n - 1)
    x = x_q[rows] if rounding is None else fake_quant_symmetric(x_q[rows], amax, in_qmax, rounding)
    e = _err(_forward(geoms, acts, links, kernels, biases, amaxes, qmaxes, x, hard=True, unrolled=False),
             y_fp[rows], loss)
    return jnp.sum(jnp.where(valid.reshape((-1,) + (1,) * (e.ndim - 1)), e, 0.0))


def unit_output(layers, x, amax_in=None, chunk: int = 32, quantized: bool = False) -> np.ndarray:
    """``[N, ..., O]`` float32: the unit's output on ``x`` ``[N, ...]`` with the *float* kernels
    (``quantized=False``: the float network, no points) or the dequantized stored ones with every
    point (``quantized=True``, ``amax_in`` None or ``(amax, qmax, rounding)`` of the ``:in`` point)."""
    geoms, acts, links, kernels, biases, amaxes, qmaxes = _static(layers, quantized)
    if not quantized:
        links = tuple(None for _ in layers)
    parts = []
    for a in range(0, x.shape[0], chunk):
        t = jnp.asarray(x[a:a + chunk], jnp.float32)
        if quantized and amax_in is not None:
            t = fake_quant_symmetric(t, jnp.float32(amax_in[0]), jnp.float32(amax_in[1]), amax_in[2])
        parts.append(np.asarray(_forward(geoms, acts, links, kernels, biases, amaxes, qmaxes, t, hard=True,
                                         unrolled=False), np.float32))
    return np.concatenate(parts)


def _static(layers, quantized: bool):
    geoms = tuple(_geometry(u.info) for u in layers)
    acts = tuple(u.info.act for u in layers)
    links = tuple(None if u.link is None else (u.link[2], bool(u.link[3])) for u in layers)
    if quantized:
        deq = [dequantize_layer({k: np.asarray(v) for k, v in u.q.items()}) for u in layers]
        kernels = [jnp.asarray(d["kernel"]) for d in deq]
        biases = [jnp.asarray(d["bias"]) if "bias" in d else None for d in deq]
    else:
        kernels = [jnp.asarray(u.kernel, jnp.float32) for u in layers]
        biases = [None if u.bias is None else jnp.asarray(u.bias, jnp.float32) for u in layers]
    amaxes = [jnp.float32(0 if u.link is None else u.link[0]) for u in layers]
    qmaxes = [jnp.float32(1 if u.link is None else u.link[1]) for u in layers]
    return geoms, acts, links, kernels, biases, amaxes, qmaxes


def reconstruct_unit(layers, *, x_q, x_fp, y_fp, in_quant, rcfg: ReconConfig) -> tuple[list[dict], dict]:
    """Learn the rounding of every layer of ``layers`` (a chain of :class:`UnitLayer`) jointly.

    ``x_q`` / ``x_fp`` ``[N, ...]``: the unit input in the quantized / float network (before the
    first layer's ``:in`` point); ``y_fp``: the float unit's output ``[N, ..., O]``;
    ``in_quant``: None or ``(amax, qmax, rounding)`` of the first layer's ``:in`` point.
    Returns ``(new stored arrays per layer, stats)``, stats ``{"loss_before", "loss_after",
    "seconds", "accepted"}`` (+ ``"in_amax"`` with ``rcfg.learn_act_step``): per-element losses
    of the unit's output on all N rows; the stored arrays are returned unchanged when learning
    does not lower the loss, and with ``rcfg.iters == 0`` (round-to-nearest kept, only measured).
    """
    t0 = time.perf_counter()
    if len(layers) < 2 or any(u.link is None for u in layers[:-1]) or layers[-1].link is not None:
        raise ValueError("reconstruct_unit: a unit is >= 2 layers, every layer but the last with a link")
    rs = [prepare_rounding(u.q, u.kernel, u.w_bits, u.info.name or "layer") for u in layers]
    x_q, x_fp, y_fp = (jnp.asarray(a, jnp.float32) for a in (x_q, x_fp, y_fp))
    n = x_q.shape[0]
    if x_q.shape != x_fp.shape or y_fp.shape[0] != n or n < 1:
        raise ValueError(f"unit {layers[0].info.name}: x_q {x_q.shape}, x_fp {x_fp.shape}, y_fp {y_fp.shape} "
                         "must share N >= 1 rows")
    if in_quant is None:
        rounding, amax0, in_qmax = None, jnp.float32(0), jnp.float32(1)
    else:
        rounding, amax0, in_qmax = in_quant[2], jnp.float32(in_quant[0]), jnp.float32(in_quant[1])
    learn_act = bool(rcfg.learn_act_step and in_quant is not None)
    geoms, acts, links, _, _, amaxes, qmaxes = _static(layers, quantized=False)
    biases = []
    for u in layers:  # the stored (dequantized) bias when the layer stores one, as the quantized network
        d = dequantize_layer({k: np.asarray(v) for k, v in u.q.items()})
        b = d.get("bias", None if u.bias is None else np.asarray(u.bias, np.float32))
        biases.append(None if b is None else jnp.asarray(b, jnp.float32))
    batch = min(rcfg.batch_size, n)
    hyper = {k: jnp.float32(v) for k, v in dict(
        iters=rcfg.iters, lr=rcfg.lr, reg_weight=rcfg.reg_weight, beta_start=rcfg.beta_start,
        beta_end=rcfg.beta_end, warmup=rcfg.warmup, qdrop=rcfg.qdrop_prob).items()}
    per = float(np.prod(y_fp.shape))

    def loss_of(qs, amax) -> float:
        deq = [dequantize_layer({k: np.asarray(v) for k, v in q.items()}) for q in qs]
        kernels = [jnp.asarray(d["kernel"]) for d in deq]
        sums = [_unit_eval_chunk(kernels, biases, amaxes, qmaxes, x_q, y_fp, jnp.float32(amax), in_qmax,
                                 jnp.int32(i), geoms=geoms, acts=acts, links=links, rounding=rounding,
                                 loss=rcfg.loss, batch=batch) for i in range(0, n, batch)]
        return float(np.sum(np.asarray(sums, np.float64))) / per

    if rcfg.iters == 0:
        return [dict(u.q) for u in layers], kept_stats(loss_of, [u.q for u in layers], amax0, learn_act)
    params = {"layers": [{"vf": jnp.asarray(r.vf0), "vc": jnp.asarray(r.vc0)} for r in rs]}
    if learn_act:
        params["log_amax"] = jnp.log(jnp.maximum(amax0, ZERO_AMAX))
    opt_state = optax.adam(hyper["lr"]).init(params)
    arrays = [r.arrays() for r in rs]
    w_qmax = [jnp.float32(r.qmax) for r in rs]
    static = dict(geoms=geoms, acts=acts, links=links, rounding=rounding, learn_act=learn_act, loss=rcfg.loss,
                  qdrop=rcfg.qdrop_prob > 0, unrolled=train_lowering_unrolled())
    params, opt_state = run_steps(
        lambda p, o, t, idx, bits: _unit_step(p, o, t, idx, bits, arrays, biases, amaxes, qmaxes, x_q, x_fp, y_fp,
                                              amax0, in_qmax, w_qmax, hyper, **static),
        params, opt_state, rcfg, n, batch)
    new_qs = [harden(r, u.q, v["vf"], v["vc"]) for r, u, v in zip(rs, layers, params["layers"])]
    amax1 = np.float32(_amax_of(params, amax0, learn_act))
    out_qs, stats = accept_if_better(loss_of, [u.q for u in layers], new_qs, amax0, amax1, learn_act, t0)
    return [dict(q) for q in out_qs], stats
