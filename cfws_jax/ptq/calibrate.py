"""Activation calibration drivers: parallel (float network) and sequential (quantized upstream).

Both are two-pass per tensor, as ALGORITHM.md §4.2 prescribes for ``cfws_jax``: pass 1 finds
the tensor's max over all calibration batches, pass 2 fills a fixed ``[0, max]`` histogram of
``num_bins`` bins with exact integer counts; the amax method then runs on the host in float64
(``cfws_jax.calib.compute_amax``), so the chosen bin does not depend on the batch split.

* parallel: every point's statistics come from one float forward per batch and pass;
* sequential: points are calibrated one at a time in execution order; point ``i`` sees the
  network with quantized weights and the activation quantizers of points ``< i`` enabled.
  One jitted forward serves all stages (the stage index is a traced argument).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cfws_jax import calib
from cfws_jax.progress import Progress
from cfws_jax.ptq.config import QuantConfig
from cfws_jax.ptq.runtime import Plan, jitted_forward


def _amax_from(point, hist_state, tensor_max: float, config: QuantConfig) -> float:
    if point.method == "max":
        return float(tensor_max)
    hist = calib.finalize(hist_state, name=point.name)
    return float(calib.compute_amax(hist, point.method, num_bits=point.bits, unsigned=point.unsigned,
                                    percentile=config.percentile, name=point.name))


def _check_finite(value, name: str):
    if not np.isfinite(value):
        raise ValueError(f"{name}: calibration activations contain NaN or Inf")


def calibrate_parallel(model, plan: Plan, weights, batches, config: QuantConfig, progress=True) -> np.ndarray:
    """amax ``(P,)`` of every point from the float network (``weights`` = float weights)."""
    P = len(plan.points)
    fwd = jitted_forward(model, plan, collect="all", num_bins=config.num_bins)
    qmax = plan.qmax()
    off = jnp.zeros((P,), bool)
    dummy = jnp.ones((P,), jnp.float32)
    init_states = [calib.init(config.num_bins, "abs", "fixed", 0.0) for _ in range(P)]
    maxes = np.zeros((P,), np.float64)
    bar = Progress(total=2 * len(batches), desc="calibrate (parallel)", unit="batch", disable=not progress)
    for x in batches:  # pass 1: ranges
        m = np.asarray(fwd(weights, dummy, qmax, off, x, states=init_states)["maxes"])
        maxes = np.maximum(maxes, m)
        bar.update()
    for p, m in zip(plan.points, maxes):
        _check_finite(m, p.name)
    states = [calib.init(config.num_bins, "abs", "fixed", float(m)) for m in maxes]
    for x in batches:  # pass 2: histograms
        states = fwd(weights, dummy, qmax, off, x, states=states)["states"]
        bar.update()
    bar.close()
    return np.asarray([_amax_from(p, s, m, config) for p, s, m in zip(plan.points, states, maxes)],
                      np.float32)


def calibrate_sequential(model, plan: Plan, weights, batches, config: QuantConfig, progress=True) -> np.ndarray:
    """amax ``(P,)``, each point calibrated on quantized weights and quantized upstream tensors."""
    P = len(plan.points)
    fwd = jitted_forward(model, plan, collect="stage", num_bins=config.num_bins)
    qmax = plan.qmax()
    amax = np.zeros((P,), np.float32)
    idx = np.arange(P)
    empty = calib.init(config.num_bins, "abs", "fixed", 0.0)
    bar = Progress(total=P, desc="calibrate (sequential)", unit="tensor", disable=not progress)
    for i, p in enumerate(plan.points):
        enabled = jnp.asarray(idx < i)
        a = jnp.asarray(amax)
        if len(batches) == 1:  # one batch: range and histogram from a single forward
            out = fwd(weights, a, qmax, enabled, batches[0], stage=i, stage_state=None)
            m, state = float(out["stage_max"]), out["stage_state"]
        else:
            m = 0.0
            for x in batches:  # pass 1: range
                m = max(m, float(fwd(weights, a, qmax, enabled, x, stage=i, stage_state=empty)["stage_max"]))
            state = calib.init(config.num_bins, "abs", "fixed", m)
            if p.method != "max":
                for x in batches:  # pass 2: histogram
                    state = fwd(weights, a, qmax, enabled, x, stage=i, stage_state=state)["stage_state"]
        _check_finite(m, p.name)
        amax[i] = m if p.method == "max" else _amax_from(p, state, m, config)
        bar.set_postfix(f"{p.name} amax={amax[i]:.4g}")
        bar.update()
    bar.close()
    return amax
