"""The quantization plan of a model and the pure forward pass that simulates it (fake-quant).

``build_plan(layers, config)`` decides, per layer, the weight scheme (``cfws`` / ``plain`` /
``float``) and the activation quantization points (see :mod:`cfws_jax.ptq.graph`).
``make_forward(model, plan, collect=...)`` returns a pure, jittable
``forward(weights, amax, enabled, x, ...)``:

* ``weights``: ``{layer: {"kernel": HWIO or [in, out] float32, "bias": (O,)}}``, the (already
  dequantized) weights to use; the model's own layer params are not read.
* ``extra_params`` (keyword): the deploy form's non-layer params
  (:func:`cfws_jax.ptq.graph.non_layer_params`, e.g. YOLOv6 BottleRep ``alpha``), nested as in
  the params tree; None / ``{}`` for models without them.
* ``amax``: ``(P,)`` float32 per quantization point; ``qmax``: ``(P,)`` largest integer code
  (``plan.qmax()``); ``enabled``: ``(P,)`` bool, points whose quantizer is active (``False`` =
  pass the float tensor through).
* ``collect="stage"``: also return the max and a histogram (``cfws_jax.calib`` fixed-range
  state) of the tensor at point ``stage`` only (sequential calibration);
  ``collect="all"``: max and histogram of every point (parallel calibration);
  ``return_outputs``: every layer's output tensor (for the per-layer report).

The statistic at a point is ``relu(t)`` for ReLU-fused points (``mode="relu"``), else ``|t|``.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfws_jax import calib
from cfws_jax.cfws import is_splittable
from cfws_jax.models.layers import QConv, QDense, activation, conv2d, conv2d_unrolled
from cfws_jax.ptq.config import QuantConfig
from cfws_jax.ptq.graph import LayerInfo, layer_name
from cfws_jax.quant import ZERO_AMAX, QuantSpec, fake_quant_symmetric


@dataclasses.dataclass(frozen=True)
class Point:
    """One per-tensor activation quantizer."""

    name: str  # "<layer>:in" or "<layer>:out"
    layer: str
    mode: str  # "relu" (post-ReLU, non-negative) | "abs" (symmetric, signed)
    method: str
    bits: int
    unsigned: bool
    before_act: bool = False  # an output point placed before the layer's activation
    rounding: str = "half_even"
    full_range: bool = False  # signed point whose lowest code is -2^(b-1) (act_full_range)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, signed=not self.unsigned, rounding=self.rounding)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    info: LayerInfo
    scheme: str  # "cfws" | "plain" | "float"
    w_bits: int
    in_point: int | None
    out_point: int | None
    coarse_point: int | None = None  # cfws_branch_quant: the coarse / fine conv output points
    fine_point: int | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    layers: tuple[LayerPlan, ...]
    points: tuple[Point, ...]

    def qmax(self):
        """``(P,)`` float32 largest code of every point (a forward argument, not a constant)."""
        return jnp.asarray([p.spec.qmax for p in self.points], jnp.float32)

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.info.name == name:
                return lp
        raise KeyError(f"no quantizable layer named {name!r}")

    @property
    def names(self) -> list[str]:
        return [lp.info.name for lp in self.layers]


def build_plan(layers: list[LayerInfo], config: QuantConfig) -> Plan:
    """Decide weight schemes and activation points for ``layers`` (execution order)."""
    plans: list[LayerPlan] = []
    points: list[Point] = []
    has_out: dict[str, bool] = {}
    last = len(layers) - 1
    for info in layers:
        i = info.index
        is_last = i == last or info.is_output  # an output layer: its output stays float
        if config.keeps_float(info.name):
            scheme = "float"
        elif (i == 0 and not config.quantize_first_layer) or (is_last and not config.quantize_last_layer):
            scheme = "float"
        elif (info.rep and config.cfws and info.kind == "conv" and is_splittable(info.kernel_shape)
              and (config.cfws_grouped or info.groups == 1)):
            scheme = "cfws"
        else:
            scheme = "plain"
        w_bits = config.w_bits
        if scheme == "plain" and info.rep and not config.cfws and config.rep_w_bits:
            w_bits = config.rep_w_bits

        in_point = out_point = None
        upstream_quantized = info.input_from is not None and has_out.get(info.input_from, False)
        fully_float = config.keeps_float(info.name)
        if not upstream_quantized and not fully_float and (i > 0 or config.quantize_input):
            method = config.input_method if info.input_from is None and i == 0 else config.method_for(False)
            points.append(Point(f"{info.name}:in", info.name, "abs", method, config.a_bits, False,
                                rounding=config.rounding, full_range=config.act_full_range))
            in_point = len(points) - 1
        branch = [None, None]
        if scheme == "cfws" and config.cfws_branch_quant:
            for j, part in enumerate(("coarse", "fine")):
                points.append(Point(f"{info.name}:{part}", info.name, "abs", "max", config.a_bits, False,
                                    rounding=config.rounding, full_range=config.act_full_range))
                branch[j] = len(points) - 1
        if not is_last and not fully_float:
            fused = info.act == "relu" and config.relu_fusion
            points.append(Point(
                f"{info.name}:out", info.name, "relu" if fused else "abs", config.method_for(info.rep),
                config.a_bits, bool(config.act_unsigned and fused),
                before_act=info.act == "relu" and not fused, rounding=config.rounding,
                full_range=config.act_full_range and not (config.act_unsigned and fused)))
            out_point = len(points) - 1
        has_out[info.name] = out_point is not None
        plans.append(LayerPlan(info, scheme, w_bits, in_point, out_point, *branch))
    return Plan(tuple(plans), tuple(points))


def layer_linear(info: LayerInfo, x, kernel, bias, unrolled: bool = False):
    """``conv(x) + b`` or ``x @ W + b`` with the layer's geometry (no activation); ``unrolled``:
    convs through :func:`cfws_jax.models.layers.conv2d_unrolled` (no convolution op)."""
    if info.kind == "conv":
        conv = conv2d_unrolled if unrolled else conv2d
        return conv(x, kernel, bias, info.strides, info.padding, info.groups)
    y = x @ kernel.astype(x.dtype)
    return y if bias is None else y + bias.astype(y.dtype)


def layer_pre(lp: LayerPlan, w, x, point):
    """Pre-activation output of one layer on (quantized) input ``x``: ``layer_linear`` with the
    dequantized kernel, or, for a layer with CFWS branch points (``cfws_branch_quant``),
    ``point(coarse, conv(x, coarse_kernel)) + point(fine, conv(x, fine_kernel) + b)``
    (``w["coarse_kernel"]``: the coarse weights on the full k x k grid, zero off the centre)."""
    if lp.coarse_point is None:
        return layer_linear(lp.info, x, w["kernel"], w.get("bias"))
    yc = point(lp.coarse_point, layer_linear(lp.info, x, w["coarse_kernel"], None))
    return yc + point(lp.fine_point, layer_linear(lp.info, x, w["fine_kernel"], w.get("bias")))


def input_points(plan: Plan) -> dict[str, int]:
    """``{layer: index of the point its input codes come from}`` (its ``:in`` point, or the
    producing layer's ``:out`` point) for the quantized layers whose input is quantized."""
    by_name = {lp.info.name: lp for lp in plan.layers}
    out = {}
    for lp in plan.layers:
        src = lp.in_point
        if src is None and lp.info.input_from is not None:
            src = by_name[lp.info.input_from].out_point
        if src is not None and lp.scheme != "float":
            out[lp.info.name] = src
    return out


def rounded_bias(bias, w_scale, amax, qmax):
    """``bias`` on the accumulator grid ``s_x * w_scale[o]`` (``s_x = amax / qmax``, 1 for
    ``amax <= ZERO_AMAX``), as an int32 bias (``int_bias``); float32 ``(O,)``."""
    amax = jnp.asarray(amax, jnp.float32)
    sx = jnp.where(amax > ZERO_AMAX, amax / jnp.asarray(qmax, jnp.float32), jnp.float32(1))
    grid = sx * jnp.asarray(w_scale, jnp.float32)
    return jnp.round(bias / grid) * grid


def make_forward(model: nn.Module, plan: Plan, collect: str | None = None, return_outputs: bool = False,
                 num_bins: int = 2048):
    """Pure ``forward(weights, amax, qmax, enabled, x, stage=None, stage_state=None, states=None,
    mask=None, extra_params=None) -> dict``.

    ``mask``: optional bool ``[B]``, the rows that count in the statistics (False: padding).
    Returns ``{"logits"}`` plus ``"stage_max"``, ``"stage_state"`` (collect="stage"),
    ``"maxes"`` ``(P,)``, ``"states"`` (collect="all"), ``"outputs"`` (return_outputs).
    """
    if collect not in (None, "stage", "all"):
        raise ValueError(f"collect must be None, 'stage' or 'all', got {collect!r}")
    by_name = {lp.info.name: lp for lp in plan.layers}
    sources = input_points(plan)

    def forward(weights, amax, qmax, enabled, x, stage=None, stage_state=None, states=None, mask=None,
                extra_params=None):
        out: dict = {"outputs": {}}
        if collect == "stage":
            out["stage_max"] = jnp.zeros((), jnp.float32)
            out["stage_state"] = calib.init(num_bins, "abs", "fixed", 0.0) if stage_state is None else stage_state
        if collect == "all":
            out["maxes"], out["states"] = [None] * len(plan.points), list(states)

        def point(i: int, t):
            p = plan.points[i]
            if collect is not None:  # the statistic: relu(t) at fused points, else |t|
                v = (jnp.maximum(t, 0) if p.mode == "relu" else jnp.abs(t)).astype(jnp.float32)
            if collect == "stage":
                hit = stage == i
                out["stage_max"] = jax.lax.cond(hit, lambda m: calib.max_abs(v, mask=mask), lambda m: m,
                                                out["stage_max"])
                if stage_state is None:  # single batch: bin over this tensor's own range
                    out["stage_state"] = jax.lax.cond(
                        hit, lambda s: calib.update(calib.init(num_bins, "abs", "fixed", calib.max_abs(v, mask=mask)),
                                                    v, mask),
                        lambda s: s, out["stage_state"])
                else:
                    out["stage_state"] = jax.lax.cond(hit, lambda s: calib.update(s, v, mask), lambda s: s,
                                                      out["stage_state"])
            if collect == "all":
                out["maxes"][i] = calib.max_abs(v, mask=mask)
                out["states"][i] = calib.update(out["states"][i], v, mask)
            q = fake_quant_symmetric(t, amax[i], qmax[i], p.rounding, p.full_range)
            return jnp.where(enabled[i], q, t)

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, (QConv, QDense)):
                return next_fun(*args, **kwargs)
            lp = by_name[layer_name(mod)]
            x = args[0]
            if lp.in_point is not None:
                x = point(lp.in_point, x)
            w = weights[lp.info.name]
            src = sources.get(lp.info.name)
            if "w_scale" in w and w.get("bias") is not None and src is not None:  # int_bias
                w = dict(w, bias=rounded_bias(w["bias"], w["w_scale"], amax[src], qmax[src]))
            y = layer_pre(lp, w, x, point)
            if lp.out_point is not None and plan.points[lp.out_point].before_act:
                y = activation(point(lp.out_point, y), lp.info.act)
            else:
                y = activation(y, lp.info.act)
                if lp.out_point is not None:
                    y = point(lp.out_point, y)
            if return_outputs:
                out["outputs"][lp.info.name] = y
            return y

        with nn.intercept_methods(interceptor):
            out["logits"] = model.apply({"params": dict(extra_params or {})}, x)
        if collect == "all":
            out["maxes"] = jnp.stack(out["maxes"]) if out["maxes"] else jnp.zeros((0,), jnp.float32)
        if not return_outputs:
            del out["outputs"]
        return out

    return forward


def forward_key(plan: Plan) -> Plan:
    """The part of a plan the compiled forward depends on: amax methods only matter on the host
    and bit-widths arrive as the traced ``qmax`` argument."""
    return Plan(plan.layers, tuple(dataclasses.replace(p, method="", bits=8, unsigned=False) for p in plan.points))


@functools.lru_cache(maxsize=32)
def _cached_jit(model: nn.Module, key: Plan, collect, return_outputs, num_bins):
    return jax.jit(make_forward(model, key, collect, return_outputs, num_bins))


def jitted_forward(model: nn.Module, plan: Plan, collect: str | None = None, return_outputs: bool = False,
                   num_bins: int = 2048):
    """``jax.jit(make_forward(...))``, shared by every plan with the same structure (presets that
    differ only in their amax methods reuse one compilation)."""
    return _cached_jit(model, forward_key(plan), collect, return_outputs, num_bins)
