"""Activation calibration drivers: parallel (float network) and sequential (quantized upstream).

Both are two-pass per tensor, as ALGORITHM.md §4.2 prescribes for ``cfws_jax``: pass 1 finds
the tensor's max over all calibration batches, pass 2 fills a fixed ``[0, max]`` histogram of
``num_bins`` bins with exact integer counts; the amax method then runs on the host in float64
(``cfws_jax.calib.compute_amax``), so the chosen bin does not depend on the batch split.

* parallel: every point's statistics come from one float forward per batch and pass;
* sequential: points are calibrated one at a time in execution order; point ``i`` sees the
  network with quantized weights and the activation quantizers of points ``< i`` enabled.
  :func:`calibrate_sequential` does it in one pass (each layer its own small jitted function,
  the batches meeting at every point); :func:`calibrate_sequential_reference` runs the whole
  jitted network once per point (stage index traced) and is its bit-exact test reference.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cfws_jax import calib
from cfws_jax.models.layers import QConv, QDense, activation
from cfws_jax.progress import Progress
from cfws_jax.ptq.config import QuantConfig
from cfws_jax.ptq.graph import LayerInfo, layer_name
from cfws_jax.ptq.runtime import Plan, jitted_forward, layer_linear
from cfws_jax.quant import fake_quant_symmetric


def _amax_from(point, hist_state, tensor_max: float, config: QuantConfig) -> float:
    if point.method == "max":
        return float(tensor_max)
    hist = calib.finalize(hist_state, name=point.name)
    return float(calib.compute_amax(hist, point.method, num_bits=point.bits, unsigned=point.unsigned,
                                    percentile=config.percentile, name=point.name))


def _check_finite(value, name: str):
    if not np.isfinite(value):
        raise ValueError(f"{name}: calibration activations contain NaN or Inf")


def reusable_amax(old_plan: Plan, old_amax, new_plan: Plan, order: str) -> dict[int, float]:
    """``{new point index: amax}`` of the points of ``new_plan`` whose calibration an earlier run
    (``old_plan``, its calibrated ``old_amax`` ``(P_old,)``, same model, images and settings but
    other float layers) already settled, bit for bit:

    * ``"parallel"``: every point defined alike in both plans (its statistics come from the float
      network, which the plan does not change);
    * ``"sequential"``: the points of the layers before the first layer whose plan differs (a
      point sees the quantized network upstream of it: after that layer it is another network).
    """
    old = {p.name: (p, float(a)) for p, a in zip(old_plan.points, np.asarray(old_amax, np.float32))}
    same = {i: old[p.name][1] for i, p in enumerate(new_plan.points) if p.name in old and old[p.name][0] == p}
    if order == "parallel":
        return same
    prefix = set()
    for a, b in zip(old_plan.layers, new_plan.layers):
        if a != b:
            break
        prefix.update(i for i in (b.in_point, b.out_point) if i is not None)
    return {i: v for i, v in same.items() if i in prefix}


def _shard(weights, batches, mesh):
    """Replicated weights (any pytree), batches sharded over ``mesh`` (padded) and their row
    masks (None without a mesh: the single-device path, unchanged)."""
    if mesh is None:
        return weights, list(batches), [None] * len(batches)
    from cfws_jax import parallel

    mesh = parallel.local_mesh(mesh)
    pairs = [parallel.shard_batch(x, mesh) for x in batches]
    return parallel.replicate(weights, mesh), [p[0] for p in pairs], [p[1] for p in pairs]


def calibrate_parallel(model, plan: Plan, weights, batches, config: QuantConfig, progress=True,
                       mesh=None, known=None, extra_params=None) -> np.ndarray:
    """amax ``(P,)`` of every point from the float network (``weights`` = float weights).

    ``mesh``: a :func:`cfws_jax.parallel.local_mesh` (or device count) to shard every batch over
    (padding rows masked out; maxes and exact integer histogram counts reduced by XLA).
    ``known``: ``{point index: amax}`` already settled (:func:`reusable_amax`): taken as they are,
    their amax search skipped, and no pass at all when every point is known.
    ``extra_params``: the deploy form's non-layer params (:func:`cfws_jax.ptq.graph.non_layer_params`)."""
    P = len(plan.points)
    known = dict(known or {})
    if P and all(i in known for i in range(P)):
        return np.asarray([known[i] for i in range(P)], np.float32)
    rows = [int(b.shape[0]) for b in batches]
    n_img = sum(rows)
    (weights, extra), batches, masks = _shard((weights, dict(extra_params or {})), batches, mesh)
    fwd = jitted_forward(model, plan, collect="all", num_bins=config.num_bins)
    qmax = plan.qmax()
    off = jnp.zeros((P,), bool)
    dummy = jnp.ones((P,), jnp.float32)
    init_states = [calib.init(config.num_bins, "abs", "fixed", 0.0) for _ in range(P)]
    maxes = np.zeros((P,), np.float64)
    bar = Progress(total=2 * n_img, desc="calibrate (parallel, 2 passes)", unit="img", disable=not progress)
    for x, k, r in zip(batches, masks, rows):  # pass 1: ranges
        m = np.asarray(fwd(weights, dummy, qmax, off, x, states=init_states, mask=k, extra_params=extra)["maxes"])
        maxes = np.maximum(maxes, m)
        bar.update(r)
    for p, m in zip(plan.points, maxes):
        _check_finite(m, p.name)
    states = [calib.init(config.num_bins, "abs", "fixed", float(m)) for m in maxes]
    for x, k, r in zip(batches, masks, rows):  # pass 2: histograms
        states = fwd(weights, dummy, qmax, off, x, states=states, mask=k, extra_params=extra)["states"]
        bar.update(r)
    bar.close()
    return np.asarray([known[i] if i in known else _amax_from(p, s, m, config)
                       for i, (p, s, m) in enumerate(zip(plan.points, states, maxes))], np.float32)


def calibrate_sequential_reference(model, plan: Plan, weights, batches, config: QuantConfig,
                                   progress=True, mesh=None, known=None, extra_params=None) -> np.ndarray:
    """amax ``(P,)``, each point calibrated on quantized weights and quantized upstream tensors.

    The slow reference: the whole network runs once (one batch) or twice (range + histogram)
    per point. :func:`calibrate_sequential` gives the bit-identical result in one pass.
    ``mesh``, ``known``, ``extra_params``: as in :func:`calibrate_sequential` (a known point is
    taken as it is, without its passes)."""
    known = dict(known or {})
    P = len(plan.points)
    rows = [int(b.shape[0]) for b in batches]
    n_img = sum(rows)
    (weights, extra), batches, masks = _shard((weights, dict(extra_params or {})), batches, mesh)
    fwd = jitted_forward(model, plan, collect="stage", num_bins=config.num_bins)
    qmax = plan.qmax()
    amax = np.zeros((P,), np.float32)
    idx = np.arange(P)
    empty = calib.init(config.num_bins, "abs", "fixed", 0.0)
    # the bar counts images pushed through the network: one pass per quantizer with one batch,
    # else a range pass plus (except for "max") a histogram pass
    passes = [1 if len(batches) == 1 or p.method == "max" else 2 for p in plan.points]
    bar = Progress(total=n_img * sum(passes), desc=f"calibrate (sequential, {P} quantizers)", unit="img",
                   disable=not progress)
    for i, p in enumerate(plan.points):
        if i in known:
            amax[i] = known[i]
            bar.update(n_img * passes[i])
            continue
        enabled = jnp.asarray(idx < i)
        a = jnp.asarray(amax)
        if len(batches) == 1:  # one batch: range and histogram from a single forward
            out = fwd(weights, a, qmax, enabled, batches[0], stage=i, stage_state=None, mask=masks[0],
                      extra_params=extra)
            m, state = float(out["stage_max"]), out["stage_state"]
            bar.update(n_img)
        else:
            m = 0.0
            for x, k, r in zip(batches, masks, rows):  # pass 1: range
                m = max(m, float(fwd(weights, a, qmax, enabled, x, stage=i, stage_state=empty, mask=k,
                                     extra_params=extra)["stage_max"]))
                bar.update(r)
            state = calib.init(config.num_bins, "abs", "fixed", m)
            if p.method != "max":
                for x, k, r in zip(batches, masks, rows):  # pass 2: histogram
                    state = fwd(weights, a, qmax, enabled, x, stage=i, stage_state=state, mask=k,
                                extra_params=extra)["stage_state"]
                    bar.update(r)
        _check_finite(m, p.name)
        amax[i] = m if p.method == "max" else _amax_from(p, state, m, config)
        bar.set_postfix(f"{i + 1}/{P} {p.name} amax={amax[i]:.4g}")
    bar.close()
    return amax


# ----------------------------------------------------------------------------- one-pass sequential
# Small jitted pieces of the sequential driver. jax.jit caches them per static argument and
# argument shape, so there is one compile per distinct layer geometry / tensor shape, not per
# point. ``TRACE_COUNTS`` counts how often each python body is traced (tests read it).
TRACE_COUNTS = {"layer": 0, "act": 0, "max": 0, "hist": 0, "fq": 0}


def _stat(t, relu: bool):
    """The calibration statistic of a point: relu(t) at ReLU-fused points, else |t| (float32)."""
    return (jnp.maximum(t, 0) if relu else jnp.abs(t)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("info", "act"))
def _layer_fn(x, kernel, bias, *, info, act):
    """``act(linear(x))`` of one layer; ``info`` is the layer's static geometry (a LayerInfo with
    name / index / shapes blanked, so layers of one structure share a compile)."""
    TRACE_COUNTS["layer"] += 1
    return activation(layer_linear(info, x, kernel, bias), act)


@functools.partial(jax.jit, static_argnames=("act",))
def _act_fn(y, *, act):
    TRACE_COUNTS["act"] += 1
    return activation(y, act)


@functools.partial(jax.jit, static_argnames=("relu",))
def _max_fn(t, mask, *, relu):
    TRACE_COUNTS["max"] += 1
    return calib.max_abs(_stat(t, relu), mask=mask)


@functools.partial(jax.jit, static_argnames=("relu",))
def _hist_fn(state, t, mask, *, relu):
    TRACE_COUNTS["hist"] += 1
    return calib.update(state, _stat(t, relu), mask)


@functools.partial(jax.jit, static_argnames=("rounding", "full_range"))
def _fq_fn(t, amax, qmax, *, rounding, full_range=False):
    TRACE_COUNTS["fq"] += 1
    return fake_quant_symmetric(t, amax, qmax, rounding, full_range)


def _geometry(info: LayerInfo) -> LayerInfo:
    return dataclasses.replace(info, name="", in_shape=(), out_shape=(), input_from=None, index=0, is_output=False)


class _Done(Exception):
    """Raised inside a batch's forward once its last point is quantized (the rest is not needed)."""


# ----------------------------------------------------------------------------- lockstep machinery
# Shared by the one-pass sequential calibration and the one-pass refinement
# (cfws_jax.ptq.reconstruct): one eager Flax forward per thread, every QConv / QDense run as
# its small jitted function, the threads meeting at a threading.Barrier.

def apply_layer(lp, plan: Plan, geom: LayerInfo, w, x, point=None):
    """One layer of a lockstep forward: ``point(i, t)`` quantizes at point ``i`` (None: the float
    network, no points); the ``:in`` point, then ``act(linear)`` with the ``:out`` point before
    or after the activation as the plan says. ``w``: ``{"kernel", "bias"?}``, ``geom``: the
    layer's :func:`_geometry`."""
    if point is not None and lp.in_point is not None:
        x = point(lp.in_point, x)
    out = lp.out_point if point is not None else None
    pre = out is not None and plan.points[out].before_act
    if point is not None and lp.coarse_point is not None:  # cfws_branch_quant (runtime.layer_pre)
        y = point(lp.coarse_point, _layer_fn(x, w["coarse_kernel"], None, info=geom, act=None))
        y = y + point(lp.fine_point, _layer_fn(x, w["fine_kernel"], w.get("bias"), info=geom, act=None))
        y = y if pre else _act_fn(y, act=lp.info.act)
    else:
        y = _layer_fn(x, w["kernel"], w.get("bias"), info=geom, act=None if pre else lp.info.act)
    if out is not None:
        y = point(out, y)
        if pre:
            y = _act_fn(y, act=lp.info.act)
    return y


def intercepted_forward(model, x, on_layer, what: str, extra_params=None) -> None:
    """``model.apply`` on ``x`` with every QConv / QDense call replaced by ``on_layer(module, x)``
    (``extra_params``: the non-layer params the rest of the model reads, e.g. BottleRep ``alpha``);
    returns when ``on_layer`` raises :class:`_Done` (an error if the forward ends first)."""

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (QConv, QDense)):
            return next_fun(*args, **kwargs)
        return on_layer(mod, args[0])

    try:
        with nn.intercept_methods(interceptor):
            model.apply({"params": dict(extra_params or {})}, x)
    except _Done:
        return
    raise RuntimeError(f"{what}: the forward ended before its last stop")


def run_in_lockstep(jobs, run_one, barrier: threading.Barrier) -> None:
    """``run_one(job)`` for every job, the first in the calling thread and the others in their
    own; the first error aborts ``barrier`` (the others then stop) and is re-raised."""
    errors: list = []

    def worker(job):
        try:
            run_one(job)
        except threading.BrokenBarrierError:
            pass  # another thread failed first; its error is reported
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(j,), daemon=True) for j in jobs[1:]]
    for th in threads:
        th.start()
    worker(jobs[0])
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def _settle_point(p, slots, masks, config: QuantConfig) -> float:
    """amax of point ``p`` from its tensor in every batch (``slots``): max, then the fixed
    ``[0, max]`` histogram and the amax search (``max``: the max itself)."""
    relu = p.mode == "relu"
    m = 0.0
    for t, k in zip(slots, masks):
        m = max(m, float(_max_fn(t, k, relu=relu)))
    _check_finite(m, p.name)
    if p.method == "max":
        return m
    state = calib.init(config.num_bins, "abs", "fixed", m)
    for t, k in zip(slots, masks):
        state = _hist_fn(state, t, k, relu=relu)
    return _amax_from(p, state, m, config)


def calibrate_sequential(model, plan: Plan, weights, batches, config: QuantConfig, progress=True,
                         mesh=None, known=None, extra_params=None) -> np.ndarray:
    """amax ``(P,)`` as :func:`calibrate_sequential_reference` computes it, bit for bit, in one
    pass through the network.

    Each calibration batch runs the Flax model once (one thread per batch beyond the first),
    under an interceptor that runs every QConv/QDense as its own small jitted function on the
    dequantized ``weights``. At a point, all batches meet (a barrier); the last to arrive computes
    the tensor's max over all batches, the fixed ``[0, max]`` histogram (exact integer counts),
    and the amax on the host exactly as the reference does; then every batch quantizes its own
    tensor with that amax and goes on. Per-batch layer results are those of a per-batch forward,
    so the statistics match the reference's.

    ``mesh``: as in :func:`calibrate_parallel`; every batch is sharded over it, the layers run
    SPMD on the shards and each point's max / histogram is reduced over the devices by XLA
    (padding rows masked out, counts exact).
    ``known``: ``{point index: amax}`` already settled upstream of every other point
    (:func:`reusable_amax`): taken as they are, without their max, histogram and amax search;
    no pass at all when every point is known. ``extra_params``: as in :func:`calibrate_parallel`.
    """
    P = len(plan.points)
    n_img = sum(int(b.shape[0]) for b in batches)
    known = dict(known or {})
    amax = np.zeros((P,), np.float32)
    if P == 0:
        return amax
    if all(i in known for i in range(P)):
        return np.asarray([known[i] for i in range(P)], np.float32)
    (weights, extra), batches, masks = _shard((weights, dict(extra_params or {})), batches, mesh)
    qmax = [jnp.asarray(p.spec.qmax, jnp.float32) for p in plan.points]
    by_name = {lp.info.name: lp for lp in plan.layers}
    geoms = {lp.info.name: _geometry(lp.info) for lp in plan.layers}
    nb = len(batches)
    slots: list = [None] * nb
    current = [None]  # the point being calibrated
    # the whole calibration is one pass of the images through the network: count it in images
    # (point i settled = (i + 1) / P of the pass), so the rate is images/s and the ETA real
    shown = [0]
    bar = Progress(total=n_img, desc=f"calibrate (sequential, one pass, {P} quantizers)", unit="img",
                   disable=not progress)

    def settle():  # run by exactly one thread, once all batches hold the tensor of point current[0]
        i = current[0]
        p = plan.points[i]
        if i in known:  # settled by an earlier run with the same upstream
            amax[i] = known[i]
        else:
            amax[i] = _settle_point(p, slots, masks, config)
        done = (n_img * (i + 1)) // P  # whole images: the bar shows integers
        bar.update(done - shown[0])
        shown[0] = done
        bar.set_postfix(f"point {i + 1}/{P} {p.name} amax={amax[i]:.4g}")

    barrier = threading.Barrier(nb, action=settle)

    def point(i: int, b: int, t):
        slots[b] = t
        current[0] = i
        barrier.wait()
        q = _fq_fn(t, jnp.asarray(amax[i]), qmax[i], rounding=plan.points[i].rounding,
                   full_range=plan.points[i].full_range)
        if i == P - 1:
            raise _Done
        return q

    def run(b: int):
        def on_layer(mod, x):
            lp = by_name[layer_name(mod)]
            return apply_layer(lp, plan, geoms[lp.info.name], weights[lp.info.name], x,
                               point=lambda i, t: point(i, b, t))

        intercepted_forward(model, batches[b], on_layer, "sequential calibration", extra)

    try:
        run_in_lockstep(list(range(nb)), run, barrier)
    finally:
        bar.close()
    return amax
