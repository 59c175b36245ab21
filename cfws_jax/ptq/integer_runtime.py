"""Whole-network integer execution of a :class:`~cfws_jax.ptq.model.QuantizedModel`.

``integer_apply_fn(qm)(images NHWC float32) -> logits`` (classifiers) or the decoded detections
``[B, N, 5 + nc]`` (YOLOv6): the same plan as the fake-quant forward
(:func:`cfws_jax.ptq.runtime.make_forward`, same ``nn.intercept_methods`` hook over
QConv / QDense, so every registry model runs), but every quantized layer computes in integers:

* activations enter a layer as int8 codes ``q_x`` (per-tensor scale ``s_x = amax / qmax`` of its
  input point; int32 containers for unsigned or > 8-bit codes); weights are the stored int8
  codes; ``lax.conv_general_dilated`` / ``dot_general`` accumulate exactly in int32
  (``preferred_element_type``; :mod:`cfws_jax.integer`);
* bias: int32 at the product scale with ``k`` extra fraction bits,
  ``b_q[o] = round(b[o] * 2^k / (s_x * s_w[o]))`` (CFWS: the fine scale ``s_f``), added to the
  (fine) accumulator shifted left by ``k``: ``acc' = (acc << k) + b_q`` at scale
  ``s_x * s_w / 2^k``. ``k = acc_shift(w)`` (0..8) is the most the layer's worst-case
  accumulator allows without int32 overflow. ``k = 0`` is the textbook product-scale bias; its
  rounding (up to half an accumulator unit, the same offset on a whole channel) moves about 0.02 %
  of the codes of a layer off the simulation's, which compounds over a deep network (0.7 % of
  top-1 on the shipped CIFAR RepVGG-A0); with ``k`` fraction bits the codes match the simulation
  to its own float32 rounding;
* CFWS layer: coarse centre codes as a 1x1 conv (same stride, no padding) and the fine k x k
  conv; the two int32 accumulators carry different per-channel scales and are rescaled by their
  own multipliers before they are summed:
  ``v[o] = M_c[o] * acc_c[o] + M_f[o] * (acc_f[o] + b_q[o])``, ``M = s_x * s_w[o] / s_out``;
* requantization to the output point's scale, ``q_out = clip(R(v), lo, qmax)`` with ``lo = 0``
  at ReLU-fused points (the ReLU is the clamp, in the integer domain), ``-qmax`` otherwise;
  ``requant="float"`` (default): ``M`` in float32, ``v`` in float32, ``R`` the config's rounding
  (half-to-even by default, or half-up); ``requant="fixed"``: per output channel an integer
  multiplier ``m`` (``2^14 <= m <= 2^15`` for the larger of a CFWS pair, the other at the same
  shift; the coarse accumulator first gets up to 16 fraction bits, ``acc_c << j``, so that both
  multipliers keep about 15 bits) and a right shift ``n`` with ``M ~= m * 2^-n``, ``R`` = round-half-up of the exact
  ``(acc_c * m_c + (acc_f + b_q) * m_f) / 2^n``, all in int32 arithmetic (16-bit limbs; no
  int64), as integer-only runtimes do. Its 15-bit multiplier costs at most ``|v| * 2^-15``
  relative error (plus the smaller multiplier's ``2^-(n+1)`` absolute step per accumulator unit);
* the onnxruntime layout (``*_ort`` presets: ``cfws_branch_quant``, ``act_unsigned``,
  ``act_full_range``, ``int_bias``), what ``export --target onnxruntime`` runs as QLinearConv /
  QLinearAdd: each CFWS accumulator is requantized to its own signed branch point (codes
  -128..127), ``q_c = R(M_c' * acc_c)``, ``q_f = R(M_f' * (acc_f + b_q))``, and the two branch
  codes are rescaled to the output point and rounded once, ``q_out = clip(R((s_c' * q_c + s_f' *
  q_f) / s_out), 0, 255)`` at unsigned ReLU-fused points (the ReLU is the clamp); the int32 bias
  is the file's, ``b_q = round(b / (s_x * s_w[o])) * 2^k``;
* layers with SiLU / sigmoid (YOLOv6 non-rep convs and head): the accumulators are dequantized,
  the activation runs in float, then the result is quantized at the output point (what an
  integer runtime without lookup tables does; ``--no_lut`` in the reference);
* output layers (classifier logits, detector ``is_output`` pred convs): the int32 accumulator is
  dequantized, ``s_x * s_w[o] * (acc + b_q)``, and everything after (softmax, DFL, decode) is
  float;
* non-layer ops (pooling, residual adds, concatenations, SE products, depth-to-space) run on the
  dequantized values ``q * s`` (exactly the fake-quant values) and the result is re-quantized at
  the next layer's ``:in`` point, as the plan says;
* ``float``-scheme layers (``float_layers``, unquantized first / last layer) run the float conv
  on the dequantized input, as in simulation.

Measured (tests/test_integer_runtime.py; shipped CIFAR RepVGG-A0, ``cfws_kl``, 64 calibration
images, the first 1,000 CIFAR-10 test images): top-1 agreement with the fake-quant simulation
1.000 with ``requant="float"`` (accuracy 90.4 % both) and 0.998 with ``requant="fixed"`` (90.3 %).
Each layer fed the simulation's input codes reproduces its output codes except for one-code
differences on 1.5e-6 (float) / 1.3e-4 (fixed) of them (100 images, all points). With
``cfws_kl_ort``: top-1 agreement 0.999 (float) and 0.986 (fixed), accuracy 89.9 % / 89.8 % / 89.8 %.

Needs weights and activations of at most 8 bits (int32 accumulators cannot hold 16-bit
products); other configs raise ValueError.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cfws_jax.integer import cfws_accumulators, int_conv, int_dense
from cfws_jax.models.layers import QConv, QDense, activation
from cfws_jax.ptq.graph import layer_name
from cfws_jax.ptq.runtime import Plan, layer_linear
from cfws_jax.ptq.weights import dequantize_layer
from cfws_jax.quant import ZERO_AMAX, _div, round_values

REQUANT_MODES = ("float", "fixed")
FIXED_MANTISSA_BITS = 15  # m < 2^15 keeps lo16(acc) * m inside int32
_MAX_SHIFT = 46
MAX_BIAS_FRAC_BITS = 8


def point_scales(amax, qmax):
    """``(P,)`` float32 activation scales ``amax / qmax`` (1 where ``amax <= 2^-24``), exactly as
    the fake-quant forward computes them."""
    amax = jnp.asarray(amax, jnp.float32)
    return jnp.where(amax > ZERO_AMAX, _div(amax, qmax), jnp.ones_like(amax))


def integer_layers(qm) -> dict[str, dict[str, np.ndarray]]:
    """Host-side arrays per layer for the integer forward: ``w`` (int8 codes, HWIO or [in, out]),
    ``w_scale``, CFWS ``c`` / ``c_scale``, ``bias`` float32 (dequantized int16 codes when stored
    so), or ``kernel`` float32 for ``float``-scheme layers."""
    out = {}
    scales = np.asarray(point_scales(qm.act_amax, qm.plan.qmax()))
    for lp in qm.plan.layers:
        q = {k: np.asarray(v) for k, v in qm.layers[lp.info.name].items()}
        d: dict[str, np.ndarray] = {}
        deq = dequantize_layer(q)
        if lp.scheme == "float":
            d["kernel"] = deq["kernel"]
        else:
            d["w"] = q["w_codes"]
            d["w_scale"] = np.asarray(q["w_scale"], np.float32)
            if "c_codes" in q:
                d["c"], d["c_scale"] = q["c_codes"], np.asarray(q["c_scale"], np.float32)
                c = np.abs(d["c"].astype(np.float64)).reshape(-1, d["c"].shape[-1]).sum(0)
                d["c_shift"] = np.asarray(_fraction_bits(255 * float(np.max(c, initial=1.0)), 16), np.int32)
        if "bias" in deq:
            d["bias"] = deq["bias"]
            src = _input_point(qm.plan, lp)
            if "w" in d and src is not None:
                d["acc_shift"] = np.asarray(acc_shift(d["w"], d["w_scale"], d["bias"], scales[src]), np.int32)
        out[lp.info.name] = d
    return out


def acc_shift(w_codes, w_scale, bias, s_x) -> int:
    """Fraction bits ``k`` (0..8) of a layer's biased accumulator: the largest ``k`` with
    ``max_o (255 * sum |w[..., o]| + |b[o]| / (s_x * s_w[o])) * 2^k <= 2^29``, so
    ``(acc << k) + b_q`` never overflows int32 for any 8-bit input (and the fixed-point products
    stay below ``2^46``). ``s_x``: the input point's scale (host float)."""
    w = np.abs(np.asarray(w_codes, np.float64))
    w = w.reshape(-1, w.shape[-1]).sum(0)
    b = np.abs(np.asarray(bias, np.float64)) / (float(s_x) * np.asarray(w_scale, np.float64))
    return _fraction_bits(float(np.max(255 * w + b, initial=1.0)), MAX_BIAS_FRAC_BITS)


def _fraction_bits(bound: float, most: int) -> int:
    """Largest ``k <= most`` with ``bound * 2^k <= 2^29``."""
    k = 0
    while k < most and bound * 2 ** (k + 1) <= 2**29:
        k += 1
    return k


def _input_point(plan, lp):
    """Index of the point whose codes a layer reads (its ``:in`` or its producer's ``:out``), or None."""
    if lp.in_point is not None:
        return lp.in_point
    return plan.layer(lp.info.input_from).out_point if lp.info.input_from is not None else None


def check_integer_config(qm) -> None:
    bad = [lp.info.name for lp in qm.plan.layers if lp.scheme != "float" and lp.w_bits > 8]
    if bad:
        raise ValueError(f"integer execution needs weights of at most 8 bits; layer {bad[0]} has "
                         f"{qm.plan.layer(bad[0]).w_bits}-bit weights (int32 accumulators would overflow)")
    wide = [p.name for p in qm.plan.points if p.bits > 8]
    if wide:
        raise ValueError(f"integer execution needs activations of at most 8 bits; point {wide[0]} has more")


def _codes_dtype(p):
    return jnp.int8 if (not p.unsigned and p.bits <= 8) else jnp.int32


# ----------------------------------------------------------------------------- fixed point
def fixed_multiplier(big, small=None):
    """Per-channel integer multipliers for ``M ~= m * 2^-n`` (float32 ``(O,)`` inputs, ``M >= 0``).

    ``m_big`` in ``[2^14, 2^15]`` (rounded half-up from the float32 mantissa), ``n`` the common
    shift in ``[0, 46]``; ``m_small = round(small * 2^n)``. Returns int32 ``(m_big, m_small, n)``.
    """
    big = jnp.asarray(big, jnp.float32)
    small = jnp.zeros_like(big) if small is None else jnp.asarray(small, jnp.float32)
    frac, exp = jnp.frexp(big)  # big = frac * 2^exp, frac in [0.5, 1)
    n = jnp.clip(FIXED_MANTISSA_BITS - exp, 0, _MAX_SHIFT).astype(jnp.int32)
    two_n = jnp.exp2(n.astype(jnp.float32))
    m_big = jnp.floor(big * two_n + 0.5)
    m_small = jnp.floor(small * two_n + 0.5)
    lim = float(2**FIXED_MANTISSA_BITS)
    return (jnp.clip(m_big, 0, lim).astype(jnp.int32), jnp.clip(m_small, 0, lim).astype(jnp.int32), n)


def _mul_limbs(acc, m):
    """``acc * m`` (int32 acc, 0 <= m <= 2^15) exactly as ``T * 2^16 + r``, ``0 <= r < 2^16``."""
    hi = jnp.right_shift(acc, 16)  # arithmetic: floor(acc / 2^16)
    lo = jnp.bitwise_and(acc, 0xFFFF)
    lm = lo * m
    return hi * m + jnp.right_shift(lm, 16), jnp.bitwise_and(lm, 0xFFFF)


def fixed_point_round(parts, n):
    """``floor((sum_i acc_i * m_i) / 2^n + 1/2)`` exactly in int32, saturated to about +-2^24.

    ``parts``: ``[(acc int32, m int32), ...]`` (m broadcast along the channel axis), ``n`` int32
    shift per channel. Valid while ``sum |acc_i| * m_i < 2^46``.
    """
    t = jnp.zeros((), jnp.int32)
    r = jnp.zeros((), jnp.int32)
    for acc, m in parts:
        ti, ri = _mul_limbs(acc, m)
        t, r = t + ti, r + ri
    t = t + jnp.right_shift(r, 16)  # carry of the low limbs
    r = jnp.bitwise_and(r, 0xFFFF)
    n = jnp.broadcast_to(n, t.shape)
    # n >= 17: the rounding constant 2^(n-1) is a multiple of 2^16 and r / 2^16 < 1 cannot carry
    big_n = jnp.right_shift(t + jnp.left_shift(1, jnp.maximum(n - 17, 0)), jnp.maximum(n - 16, 0))
    # n <= 16: t * 2^(16-n) + floor((r + 2^(n-1)) / 2^n); clip t first (the result saturates anyway)
    lim = jnp.left_shift(1, jnp.minimum(n + 8, 30))
    tc = jnp.clip(t, -lim, lim)
    half = jnp.where(n > 0, jnp.left_shift(1, jnp.maximum(n - 1, 0)), 0)
    small_n = jnp.left_shift(tc, jnp.maximum(16 - n, 0)) + jnp.right_shift(r + half, jnp.minimum(n, 16))
    return jnp.where(n >= 17, big_n, small_n)


# ----------------------------------------------------------------------------- forward
def make_integer_forward(model: nn.Module, plan: Plan, requant: str = "float", collect_codes: bool = False,
                         int_bias: bool = False):
    """Pure ``forward(layers, amax, qmax, x, forced=None, extra_params=None) -> {"logits", "codes"?}``.

    ``int_bias``: the model's config has ``int_bias`` (its biases already sit on the accumulator
    grid ``s_x * s_w[o]``): ``b_q = round(b / (s_x * s_w)) << k``, the same integer the exported
    file carries, instead of rounding ``b`` to the finer grid of ``k`` fraction bits.

    ``layers``: :func:`integer_layers` (as jnp arrays); ``amax`` / ``qmax``: ``(P,)`` per point;
    ``extra_params``: the non-layer params (``QuantizedModel.extra_params``, e.g. BottleRep
    ``alpha``: float glue, like a residual sum, between quantization points).
    ``collect_codes``: also ``{"codes": {point index: int codes}}`` of every point reached, as
    computed. ``forced``: ``{point index: codes}`` that replace the computed codes downstream
    (tests feed each layer the simulation's input codes to compare layers one at a time).
    """
    if requant not in REQUANT_MODES:
        raise ValueError(f"requant must be one of {REQUANT_MODES}, got {requant!r}")
    by_name = {lp.info.name: lp for lp in plan.layers}

    def forward(layers, amax, qmax, x, forced=None, extra_params=None):
        scales = point_scales(amax, qmax)
        qmaxf = jnp.asarray(qmax, jnp.float32)
        codes_of: dict[int, tuple] = {}  # id(dequantized tensor) -> (codes, point index)
        alive: list = []
        collected: dict[int, jnp.ndarray] = {}

        def emit(i, codes):
            """Codes of point i -> the dequantized float tensor the rest of the network sees."""
            codes = codes.astype(_codes_dtype(plan.points[i]))
            if collect_codes:
                collected[i] = codes
            if forced is not None and i in forced:
                codes = jnp.asarray(forced[i]).astype(codes.dtype)
            y = codes.astype(jnp.float32) * scales[i]
            codes_of[id(y)] = (codes, i)
            alive.append(y)
            return y

        def quantize_float(i, t):
            """Float tensor -> codes at point i (the fake-quant rounding and clamp)."""
            p = plan.points[i]
            q = round_values(_div(jnp.asarray(t, jnp.float32), scales[i]), p.rounding)
            return jnp.clip(q, _lowest(p, qmaxf[i]), qmaxf[i]).astype(jnp.int32)

        def requantize(i, parts, relu=False, cap=16):
            """Codes at point i of ``sum acc * M`` over ``parts = [(int32 acc, float32 M), ...]``
            (one or two terms): float32 multipliers and the point's rounding, or the fixed-point
            multipliers of ``requant="fixed"``; clamped at 0 when a ReLU is fused."""
            p = plan.points[i]
            if requant == "float":
                v = sum(acc.astype(jnp.float32) * m for acc, m in parts)
                v = round_values(v, p.rounding)
            elif len(parts) == 1:
                mf, _, n = fixed_multiplier(parts[0][1])
                v = fixed_point_round([(parts[0][0], mf)], n).astype(jnp.float32)
            else:
                v = _fixed_pair(*parts, cap).astype(jnp.float32)
            return jnp.clip(v, 0 if relu else _lowest(p, qmaxf[i]), qmaxf[i]).astype(jnp.int32)

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, (QConv, QDense)):
                return next_fun(*args, **kwargs)
            lp = by_name[layer_name(mod)]
            info, w = lp.info, layers[lp.info.name]
            out_i = lp.out_point
            out_p = plan.points[out_i] if out_i is not None else None

            def finish_float(y):
                """Float layer output -> activation -> output point (as in simulation)."""
                if out_p is not None and out_p.before_act:
                    return activation(emit(out_i, quantize_float(out_i, y)), info.act)
                y = activation(y, info.act)
                return y if out_p is None else emit(out_i, quantize_float(out_i, y))

            x = args[0]
            if lp.in_point is not None:
                x = emit(lp.in_point, quantize_float(lp.in_point, x))
            xq, si = codes_of.get(id(x), (None, None))
            if lp.scheme == "float" or xq is None:  # float layer, or an unquantized input
                kernel = w["kernel"] if "kernel" in w else _deq_kernel(w)
                return finish_float(layer_linear(info, x, kernel, w.get("bias")))

            s_x = scales[si]
            if info.kind == "conv":
                if "c" in w:
                    acc_c, acc_f = cfws_accumulators(xq, w["c"], w["w"], info.strides, info.groups)
                else:
                    acc_c, acc_f = None, int_conv(xq, w["w"], info.strides, info.padding, info.groups)
            else:
                acc_c, acc_f = None, int_dense(xq, w["w"])
            s_f = w["w_scale"]
            if "bias" in w:  # int32 bias at the (fine) product scale / 2^k, k = the layer's acc_shift
                k = w.get("acc_shift", jnp.zeros((), jnp.int32))
                s_fk = _div(s_f, jnp.exp2(k.astype(jnp.float32)))
                if int_bias:  # the bias is an integer of the product grid: b_q = round(b / (s_x s_w)) * 2^k
                    b_q = jnp.left_shift(_bias_codes(w["bias"], s_x * s_f), k)
                else:  # the bias rounded to the finer grid of k fraction bits
                    b_q = _bias_codes(w["bias"], s_x * s_fk)
                s_f = s_fk
                acc_f = jnp.left_shift(acc_f, k) + b_q
            if lp.coarse_point is not None:  # cfws_branch_quant: each branch to its own 8-bit point,
                # then the two dequantized branches are added (QLinearAdd) and requantized below
                cp, fp = lp.coarse_point, lp.fine_point
                q_c = emit(cp, requantize(cp, [(acc_c, _div(s_x * w["c_scale"], scales[cp]))]))
                q_f = emit(fp, requantize(fp, [(acc_f, _div(s_x * s_f, scales[fp]))]))
                if out_p is None or info.act not in (None, "relu") or out_p.before_act:
                    return finish_float(q_c + q_f)
                # integer add: the branch codes, rescaled to the output point, summed and rounded once
                lo_relu = info.act == "relu"
                cq, fq = codes_of[id(q_c)][0].astype(jnp.int32), codes_of[id(q_f)][0].astype(jnp.int32)
                return emit(out_i, requantize(out_i, [(cq, _div(scales[cp], scales[out_i])),
                                                      (fq, _div(scales[fp], scales[out_i]))], lo_relu))

            if out_p is None or info.act not in (None, "relu"):  # dequantize: float act / output layer
                y = s_x * s_f * acc_f.astype(jnp.float32)
                if acc_c is not None:
                    y = y + s_x * w["c_scale"] * acc_c.astype(jnp.float32)
                return finish_float(y)
            # integer requantization; a ReLU (fused, or after a before-act point) is the clamp at 0
            parts = [(acc_f, _div(s_x * s_f, scales[out_i]))]
            if acc_c is not None:
                parts = [(acc_c, _div(s_x * w["c_scale"], scales[out_i]))] + parts
            return emit(out_i, requantize(out_i, parts, info.act == "relu", w.get("c_shift", 16)))

        with nn.intercept_methods(interceptor):
            logits = model.apply({"params": dict(extra_params or {})}, x)
        out = {"logits": logits}
        if collect_codes:
            out["codes"] = collected
        return out

    return forward


def _bias_codes(bias, grid):
    """``round(bias / grid)`` as int32 (half to even), clamped to ``±2^29`` (accumulator headroom)."""
    return jnp.clip(round_values(_div(bias, grid), "half_even"), -2.0**29, 2.0**29).astype(jnp.int32)


def _lowest(p, qmax):
    """Lowest code of a point: ``-qmax``, or ``-qmax - 1`` for ``act_full_range`` signed points."""
    return -qmax - 1 if p.full_range else -qmax


def _fixed_pair(part_a, part_b, most_bits=16):
    """``round(acc_a * M_a + acc_b * M_b)`` in int32 fixed point: ``acc_a`` (the CFWS coarse
    accumulator, or the first branch's codes) first gets up to ``most_bits`` fraction bits
    (``acc_a << j``, ``j = floor(log2(M_a / M_b))`` clipped to ``[0, most_bits]``, a bound the
    caller keeps: ``|acc_a| * 2^j * m < 2^46``) so that both multipliers keep their mantissa at the
    shared shift."""
    (acc_a, m_a), (acc_b, m_b) = part_a, part_b
    j = jnp.clip(jnp.floor(jnp.log2(_div(m_a, jnp.maximum(m_b, 2.0**-126)))), 0, most_bits)
    acc_a = jnp.left_shift(acc_a, j.astype(jnp.int32))
    m_a = _div(m_a, jnp.exp2(j))
    a_big = m_a >= m_b
    mb, ms, n = fixed_multiplier(jnp.maximum(m_a, m_b), jnp.minimum(m_a, m_b))
    return fixed_point_round([(acc_a, jnp.where(a_big, mb, ms)), (acc_b, jnp.where(a_big, ms, mb))], n)


def _deq_kernel(w):
    """Float kernel from integer-runtime arrays (a quantized layer whose input is not quantized)."""
    q = {"w_codes": np.asarray(w["w"]), "w_scale": np.asarray(w["w_scale"])}
    if "c" in w:
        q.update(c_codes=np.asarray(w["c"]), c_scale=np.asarray(w["c_scale"]))
    return jnp.asarray(dequantize_layer(q)["kernel"])


def integer_key(plan: Plan) -> Plan:
    """The part of a plan the compiled integer forward depends on: as ``runtime.forward_key`` but
    keeping each point's signedness and bits, which fix its codes' dtype (int8, or int32 for
    unsigned codes up to 255)."""
    return Plan(plan.layers, tuple(dataclasses.replace(p, method="") for p in plan.points))


@functools.lru_cache(maxsize=16)
def _jitted(model: nn.Module, key: Plan, requant: str, int_bias: bool):
    fwd = make_integer_forward(model, key, requant, int_bias=int_bias)
    return jax.jit(lambda layers, amax, qmax, extra, x: fwd(layers, amax, qmax, x, extra_params=extra)["logits"])


def device_layers(qm):
    """:func:`integer_layers` as device arrays (int8 codes stay int8)."""
    return {n: {k: jnp.asarray(v) for k, v in d.items()} for n, d in integer_layers(qm).items()}


def integer_apply_fn(qm, model: nn.Module | None = None, *, requant: str = "float"):
    """``fn(images NHWC float32) -> logits`` (or decoded detections) in integer arithmetic (jitted).

    ``requant``: ``"float"`` (float32 multipliers, the config's rounding) or ``"fixed"``
    (integer multiplier + shift, round-half-up); see the module docstring. A
    ``jax.tree_util.Partial`` carrying the codes as jit arguments, like ``quantized_apply_fn``.
    """
    from cfws_jax.ptq.model import device_params, model_for

    if requant not in REQUANT_MODES:
        raise ValueError(f"requant must be one of {REQUANT_MODES}, got {requant!r}")
    check_integer_config(qm)
    model = model_for(qm, model)
    return jax.tree_util.Partial(_jitted(model, integer_key(qm.plan), requant, bool(qm.config.int_bias)), device_layers(qm),
                                 jnp.asarray(qm.act_amax), qm.plan.qmax(), device_params(qm.extra_params))
