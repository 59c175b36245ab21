"""ONNX export of a :class:`~cfws_jax.ptq.QuantizedModel` with QuantizeLinear / DequantizeLinear
(QDQ) nodes, and of float networks.

``export_onnx(qm)`` -> ``onnx.ModelProto`` (explicit quantization, TensorRT / onnxruntime QDQ
form); ``export_onnx(qm, float_export=True)`` -> the same graph with the dequantized float
weights and no Q/DQ; ``float_onnx(arch, variables)`` -> the float graph of ``{"params"}`` (deploy)
or ``{"params", "batch_stats"}`` (train form, fused first).

Graph interface: input ``input`` float32 **NCHW** ``[batch, 3, H, W]`` (dynamic batch, fixed
H, W), holding exactly the numbers the Flax model reads in NHWC (``(x / 255 - mean) / std``,
:mod:`cfws_jax.data.preprocess`) transposed to NCHW; the normalization is **not** part of the
graph (the model doc string names the statistics). Output ``logits`` ``[batch, classes]``.

How the graph is found (tracing, not a re-statement of the architecture): the deploy-form Flax
module is traced once with ``jax.make_jaxpr`` while ``flax.linen.intercept_methods`` replaces
every QConv / QDense call by one opaque JAX primitive (``cfws_layer``, carrying the layer
name). The jaxpr then holds exactly the layers, in execution order, plus the real glue code of
the model between them (SE pooling and product, the ReLU after an SE, the global average pool,
...), read from the same Flax code that runs in JAX. Each equation is translated to ONNX; each
``cfws_layer`` is emitted from the :class:`~cfws_jax.ptq.runtime.Plan` the fake-quant forward
(:func:`cfws_jax.ptq.runtime.make_forward`) uses, mirroring it step by step, so the Q/DQ
placement is the simulation's by construction. A model change that introduces an operation the
translator does not know fails with an error naming the JAX primitive instead of exporting a
wrong graph. Rank-4 JAX values (NHWC) are stored NCHW in ONNX; reduction axes and broadcasts are
remapped accordingly.

Quantized layers (per ``Plan``):

* ``<layer>:in`` / ``<layer>:out`` points: ``QuantizeLinear -> DequantizeLinear`` per tensor,
  scale ``amax / qmax`` (float32 division, 1 for ``amax <= 2^-24``), zero point 0 (int8; uint8
  at unsigned ReLU-fused points); an ``:out`` point sits after the layer's activation (ReLU
  fusion, sigmoid / SiLU outputs) or before it (``before_act``), as in the simulation. A conv
  therefore always reads a DequantizeLinear output (TensorRT explicit quantization: Q/DQ on
  conv inputs and weights).
* weights: int8 codes stored as initializers (OIHW; Gemm ``[out, in]`` with ``transB=1``) ->
  ``DequantizeLinear`` with per-output-channel scales on axis 0 (a scalar for per-tensor
  configs); bias float32 (``bias="int16"`` configs: its dequantized value).
* CFWS layers: two convolutions whose outputs are added: the coarse centre as a 1x1 conv
  (same stride, padding 0, on the input cropped / padded by ``k//2 - pad`` so it reads the
  centre tap's pixels) with its own per-channel scales, and the fine k x k conv (bias here).
* ``scheme == "float"`` layers: float OIHW weights, no weight DQ.

Known difference from the simulation: ONNX ``QuantizeLinear`` has no narrow-range option, so at
signed points a value below ``-127.5 * scale`` gets code -128 where the simulation clamps to
-127 (ReLU-fused points are non-negative and unaffected). Only 8-bit activations (and weights
of at most 8 bits, or 16 bits with opset >= 21) are exported. YOLOv6 detectors are not
exported (their decoding primitives are not translated).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive

from cfws_jax.models.layers import QConv, QDense
from cfws_jax.ptq.graph import LayerInfo, discover_layers, layer_name
from cfws_jax.quant import ZERO_AMAX

NHWC_TO_NCHW = (0, 3, 1, 2)  # physical ONNX axis i holds logical (JAX) axis NHWC_TO_NCHW[i]
MIN_OPSET = 13  # per-axis DequantizeLinear, ReduceSum / Unsqueeze axes as inputs
DEFAULT_OPSET = 17

_layer_p = Primitive("cfws_layer")


def _layer_abstract(x, *, name, out_shape):
    return jax.core.ShapedArray((x.shape[0], *out_shape), jnp.float32)


_layer_p.def_abstract_eval(_layer_abstract)
_layer_p.def_impl(lambda x, *, name, out_shape: (_ for _ in ()).throw(RuntimeError("cfws_layer is trace-only")))


def _onnx():
    try:
        import onnx
    except ImportError as e:  # a user-facing error
        raise ValueError("ONNX export needs the onnx package: pip install 'cfws-jax[export]' (or pip install onnx)") from e
    return onnx


def input_normalization(arch: str):
    """The :class:`~cfws_jax.data.preprocess.Normalization` the model's input expects
    (CIFAR-10 statistics for ``*_cifar`` architectures, ImageNet otherwise)."""
    from cfws_jax.data.preprocess import CIFAR10, IMAGENET

    return CIFAR10 if str(arch).endswith("_cifar") else IMAGENET


# ---------------------------------------------------------------------------- graph building


class _Graph:
    """ONNX nodes + initializers with unique names."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def uid(self, base: str) -> str:
        self._n += 1
        return f"{base.replace('/', '.')}_{self._n}"

    def const(self, arr, base: str) -> str:
        from onnx import numpy_helper

        name = self.uid(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type: str, inputs, base: str, **attrs) -> str:
        from onnx import helper

        out = self.uid(base)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


def _point_scale(amax: float, qmax: int) -> np.float32:
    a = np.float32(amax)
    return np.float32(a / np.float32(qmax)) if a > np.float32(ZERO_AMAX) else np.float32(1.0)


def _qdq(g: _Graph, x: str, point, amax: float, base: str) -> str:
    """Per-tensor QuantizeLinear -> DequantizeLinear of ``x`` at one plan point."""
    if point.bits != 8:
        raise ValueError(f"point {point.name}: only 8-bit activations can be exported to ONNX QDQ, got {point.bits} bits")
    qmax = 255 if point.unsigned else 127
    scale = g.const(_point_scale(amax, qmax), base + ".scale")
    zp = g.const(np.zeros((), np.uint8 if point.unsigned else np.int8), base + ".zero_point")
    q = g.op("QuantizeLinear", [x, scale, zp], base + ".q")
    return g.op("DequantizeLinear", [q, scale, zp], base + ".dq")


def _weight_dq(g: _Graph, codes: np.ndarray, scale: np.ndarray, base: str) -> str:
    """``DequantizeLinear(int codes initializer)``, per-channel scales on axis 0 (or per-tensor)."""
    codes = np.asarray(codes)
    if codes.dtype.itemsize > 1 and g.opset < 21:
        raise ValueError(f"layer {base}: {codes.dtype} weight codes need --opset 21 or later (int16 DequantizeLinear)")
    c = g.const(codes, base + ".w_codes")
    scale = np.asarray(scale, np.float32)
    s = g.const(scale, base + ".w_scale")
    zp = g.const(np.zeros(scale.shape, codes.dtype), base + ".w_zero_point")
    attrs = {"axis": 0} if scale.ndim == 1 else {}
    return g.op("DequantizeLinear", [c, s, zp], base + ".w_dq", **attrs)


def _oihw(kernel_hwio: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(kernel_hwio, (3, 2, 0, 1)))


def _activation(g: _Graph, y: str, act: str | None, base: str) -> str:
    if act is None:
        return y
    if act == "relu":
        return g.op("Relu", [y], base + ".relu")
    if act == "sigmoid":
        return g.op("Sigmoid", [y], base + ".sigmoid")
    if act == "silu":
        return g.op("Mul", [y, g.op("Sigmoid", [y], base + ".sigmoid")], base + ".silu")
    raise ValueError(f"layer {base}: activation {act!r} cannot be exported")


def _centre_input(g: _Graph, x: str, info: LayerInfo, base: str) -> str:
    """The input of the centre 1x1 conv: ``x`` cropped (``pad < k//2``) or zero-padded
    (``pad > k//2``) by ``d = k//2 - pad`` on each side, so the 1x1 conv at the same stride
    reads the pixel under the k x k kernel's centre tap."""
    d = info.kernel_shape[0] // 2 - info.padding
    if d == 0:
        return x
    if d > 0:
        h, w = info.in_shape[1], info.in_shape[2]
        starts = g.const(np.array([d, d], np.int64), base + ".crop_starts")
        ends = g.const(np.array([h - d, w - d], np.int64), base + ".crop_ends")
        axes = g.const(np.array([2, 3], np.int64), base + ".crop_axes")
        return g.op("Slice", [x, starts, ends, axes], base + ".crop")
    pads = g.const(np.array([0, 0, -d, -d, 0, 0, -d, -d], np.int64), base + ".pads")
    return g.op("Pad", [x, pads], base + ".pad")


def _emit_layer(g: _Graph, x: str, info: LayerInfo, lp, q: Mapping[str, np.ndarray] | None,
                w: Mapping[str, np.ndarray], amax) -> str:
    """One QConv / QDense as ONNX, mirroring ``make_forward``'s interceptor.

    ``lp``: its LayerPlan (None: float export); ``q``: its stored arrays (codes, scales);
    ``w``: float ``{"kernel", "bias"?}`` (the dequantized or float weights)."""
    base = info.name
    quantized = lp is not None
    if quantized and lp.in_point is not None:
        x = _qdq(g, x, lp.point_in, amax[lp.in_point], base + ".in")
    scheme = lp.scheme if quantized else "float"
    bias = w.get("bias")
    b = g.const(np.asarray(bias, np.float32), base + ".bias") if bias is not None else None
    if info.kind == "conv":
        attrs = dict(strides=[info.strides] * 2, pads=[info.padding] * 4, group=info.groups,
                     kernel_shape=list(info.kernel_shape[:2]))
        if scheme == "float":
            kern = g.const(_oihw(np.asarray(w["kernel"], np.float32)), base + ".kernel")
        else:
            kern = _weight_dq(g, _oihw(q["w_codes"]), q["w_scale"], base)
        y = g.op("Conv", [x, kern] + ([b] if b else []), base + ".conv", **attrs)
        if scheme == "cfws":
            cc = np.asarray(q["c_codes"])
            if cc.ndim == 4:  # whole-kernel split: a second k x k conv on the same input
                ck = _weight_dq(g, _oihw(cc), q["c_scale"], base + ".coarse")
                yc = g.op("Conv", [x, ck], base + ".coarse_conv", **attrs)
            else:  # centre codes [I/g, O] -> a 1x1 conv [O, I/g, 1, 1]
                ck = _weight_dq(g, np.ascontiguousarray(cc.T[:, :, None, None]), q["c_scale"], base + ".centre")
                yc = g.op("Conv", [_centre_input(g, x, info, base), ck], base + ".centre_conv",
                          strides=[info.strides] * 2, pads=[0, 0, 0, 0], group=info.groups, kernel_shape=[1, 1])
            y = g.op("Add", [yc, y], base + ".cfws_sum")
    else:
        if scheme == "float":
            kern = g.const(np.ascontiguousarray(np.asarray(w["kernel"], np.float32).T), base + ".kernel")
        else:
            kern = _weight_dq(g, np.ascontiguousarray(np.asarray(q["w_codes"]).T), q["w_scale"], base)
        y = g.op("Gemm", [x, kern] + ([b] if b else []), base + ".gemm", transB=1)
    out_point = lp.out_point if quantized else None
    if out_point is not None and lp.point_out.before_act:
        y = _activation(g, _qdq(g, y, lp.point_out, amax[out_point], base + ".out"), info.act, base)
    else:
        y = _activation(g, y, info.act, base)
        if out_point is not None:
            y = _qdq(g, y, lp.point_out, amax[out_point], base + ".out")
    return y


class _LayerPlan:
    """A LayerPlan with its points resolved (``point_in`` / ``point_out``)."""

    def __init__(self, lp, points):
        self.scheme, self.in_point, self.out_point = lp.scheme, lp.in_point, lp.out_point
        self.point_in = points[lp.in_point] if lp.in_point is not None else None
        self.point_out = points[lp.out_point] if lp.out_point is not None else None


# ---------------------------------------------------------------------------- jaxpr translation


def _trace(model: nn.Module, infos: Mapping[str, LayerInfo], input_shape):
    """Closed jaxpr of ``model`` with every QConv / QDense replaced by the ``cfws_layer`` primitive."""

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (QConv, QDense)):
            return next_fun(*args, **kwargs)
        name = layer_name(mod)
        return _layer_p.bind(args[0], name=name, out_shape=tuple(infos[name].out_shape[1:]))

    def fn(x):
        with nn.intercept_methods(interceptor):
            return model.apply({"params": {}}, x)

    return jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))


_UNARY = {"logistic": "Sigmoid", "exp": "Exp", "neg": "Neg", "tanh": "Tanh", "abs": "Abs", "sqrt": "Sqrt",
          "log": "Log", "floor": "Floor", "ceil": "Ceil"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min", "pow": "Pow"}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}
_SUBJAXPR = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
             "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
             "remat": "jaxpr", "checkpoint": "jaxpr"}


def _physical(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(arr, NHWC_TO_NCHW)) if arr.ndim == 4 else arr


class _Translator:
    def __init__(self, g: _Graph, emit_layer):
        self.g, self.emit_layer = g, emit_layer

    def value(self, env, v) -> str:
        from jax.extend.core import Literal

        if isinstance(v, Literal):
            val = np.asarray(v.val)
            if val.dtype.kind == "f":
                val = val.astype(np.float32)
            return self.g.const(_physical(val), "literal")
        return env[v]

    def run(self, jaxpr, consts, args) -> list[str]:
        env: dict = {}
        for v, c in zip(jaxpr.constvars, consts):
            c = np.asarray(c)
            env[v] = self.g.const(_physical(c.astype(np.float32) if c.dtype.kind == "f" else c), "const")
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for eqn in jaxpr.eqns:
            outs = self.eqn(env, eqn)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [self.value(env, v) for v in jaxpr.outvars]

    def eqn(self, env, eqn) -> list[str]:
        from jax.extend.core import Literal

        g, prim, p = self.g, eqn.primitive.name, eqn.params
        if prim == "max":  # max(x, 0) -> Relu
            var = [v for v in eqn.invars if not isinstance(v, Literal)]
            if len(var) == 1 and len(eqn.invars) == 2 and all(
                    np.all(np.asarray(v.val) == 0) for v in eqn.invars if isinstance(v, Literal)):
                return [g.op("Relu", [env[var[0]]], "relu")]
        ins = [self.value(env, v) for v in eqn.invars]
        shape_in = [tuple(v.aval.shape) for v in eqn.invars]
        shape_out = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
        if prim == "cfws_layer":
            return [self.emit_layer(p["name"], ins[0])]
        if prim in _SUBJAXPR and _SUBJAXPR[prim] in p:
            sub = p[_SUBJAXPR[prim]]
            jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
            return self.run(jaxpr, consts, ins)
        if prim in _UNARY:
            return [g.op(_UNARY[prim], ins, prim)]
        if prim in _BINARY:
            for s in shape_in:
                if s and len(s) != len(shape_out):
                    raise ValueError(f"ONNX export: {prim} with operands of ranks {shape_in} is not supported")
            return [g.op(_BINARY[prim], ins, prim)]
        if prim == "rsqrt":
            return [g.op("Reciprocal", [g.op("Sqrt", ins, "sqrt")], "rsqrt")]
        if prim == "integer_pow":
            e = g.const(np.float32(p["y"]), "exponent")
            return [g.op("Pow", [ins[0], e], "pow")]
        if prim == "convert_element_type":
            if np.dtype(p["new_dtype"]) != np.float32 or eqn.invars[0].aval.dtype != np.float32:
                raise ValueError(f"ONNX export: dtype conversion to {p['new_dtype']} is not supported")
            return [ins[0]]
        if prim in _REDUCE:
            return [self.reduce(prim, ins[0], len(shape_in[0]), tuple(p["axes"]))]
        if prim == "broadcast_in_dim":
            return [self.broadcast(ins[0], shape_in[0], shape_out, tuple(p["broadcast_dimensions"]))]
        raise ValueError(f"ONNX export: JAX primitive {prim!r} (output shape {shape_out}) has no ONNX "
                         "translation; this model cannot be exported yet")

    def reduce(self, prim: str, x: str, rank: int, axes: tuple[int, ...]) -> str:
        g = self.g
        order = NHWC_TO_NCHW if rank == 4 else tuple(range(rank))
        phys = sorted(order.index(a) for a in axes)
        kept = [order[i] for i in range(rank) if i not in phys]  # logical axes in physical order
        if kept != sorted(kept):
            raise ValueError(f"ONNX export: {prim} over axes {axes} of a rank-{rank} tensor is not supported")
        if prim == "reduce_sum" or g.opset >= 18:
            return g.op(_REDUCE[prim], [x, g.const(np.array(phys, np.int64), "axes")], prim, keepdims=0)
        return g.op(_REDUCE[prim], [x], prim, axes=phys, keepdims=0)

    def broadcast(self, x: str, shape_in, shape_out, dims: tuple[int, ...]) -> str:
        """broadcast_in_dim that only inserts size-1 axes (e.g. ``mean(..., keepdims=True)``)."""
        if len(shape_in) == 4 or any(shape_in[i] != shape_out[d] for i, d in enumerate(dims)) or \
                any(shape_out[d] != 1 for d in range(len(shape_out)) if d not in dims):
            raise ValueError(f"ONNX export: broadcast {tuple(shape_in)} -> {tuple(shape_out)} is not supported")
        if shape_in == shape_out:
            return x
        order = NHWC_TO_NCHW if len(shape_out) == 4 else tuple(range(len(shape_out)))
        seq = [order[i] for i in range(len(order)) if order[i] in dims]
        if seq != sorted(seq):
            raise ValueError(f"ONNX export: broadcast {tuple(shape_in)} -> {tuple(shape_out)} is not supported")
        new = [i for i in range(len(order)) if order[i] not in dims]
        return self.g.op("Unsqueeze", [x, self.g.const(np.array(new, np.int64), "axes")], "unsqueeze")


# ---------------------------------------------------------------------------- model assembly


def _build(model: nn.Module, infos: list[LayerInfo], layer_fn, input_shape, opset: int, doc: str,
           meta: Mapping[str, str], graph_name: str):
    onnx = _onnx()
    from onnx import TensorProto, helper

    if not MIN_OPSET <= opset:
        raise ValueError(f"--opset must be >= {MIN_OPSET} (per-channel DequantizeLinear), got {opset}")
    by_name = {i.name: i for i in infos}
    closed = _trace(model, by_name, (1, *input_shape[1:]))
    g = _Graph(opset)
    tr = _Translator(g, lambda name, x: layer_fn(g, by_name[name], x))
    outs = tr.run(closed.jaxpr, closed.consts, ["input"])
    if len(outs) != 1:
        raise ValueError(f"ONNX export: the model returns {len(outs)} outputs; only single-output classifiers are supported")
    g.nodes.append(helper.make_node("Identity", [outs[0]], ["logits"], name="logits"))
    n_out = tuple(closed.jaxpr.outvars[0].aval.shape)
    _, h, w, c = input_shape
    graph = helper.make_graph(
        g.nodes, graph_name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", *n_out[1:]])],
        initializer=g.inits, doc_string=doc)
    model_proto = helper.make_model(graph, producer_name="cfws_jax", doc_string=doc,
                                    opset_imports=[helper.make_opsetid("", opset)])
    model_proto.ir_version = min(model_proto.ir_version, 8 if opset <= 17 else 9 if opset <= 20 else 10)
    helper.set_model_props(model_proto, dict(meta))
    onnx.checker.check_model(model_proto, full_check=True)
    return model_proto


def _doc(arch: str, kind: str, input_shape) -> tuple[str, dict]:
    norm = input_normalization(arch)
    _, h, w, _ = input_shape
    doc = (f"cfws_jax export of {arch} ({kind}). Input 'input': float32 NCHW [batch, 3, {h}, {w}], RGB, "
           f"normalized exactly as the cfws_jax (Flax, NHWC) model input, (x / 255 - mean) / std with "
           f"mean={list(norm.mean)} std={list(norm.std)} ({norm.name} statistics), then transposed to NCHW. "
           "The normalization is NOT part of this graph: apply it before feeding the model. "
           f"Output 'logits': float32 [batch, classes].")
    meta = {"cfws_jax.arch": arch, "cfws_jax.kind": kind, "cfws_jax.input_layout": "NCHW",
            "cfws_jax.normalization": norm.name, "cfws_jax.mean": repr(list(norm.mean)),
            "cfws_jax.std": repr(list(norm.std))}
    return doc, meta


def export_onnx(qm, model: nn.Module | None = None, *, float_export: bool = False, opset: int = DEFAULT_OPSET):
    """ONNX ``ModelProto`` of a QuantizedModel: QDQ (default) or, with ``float_export``, its
    dequantized float weights without Q/DQ. Checked with ``onnx.checker`` (full check)."""
    from cfws_jax.ptq.model import model_for
    from cfws_jax.ptq.weights import dequantize_layer

    model = model_for(qm, model)
    arch = qm.arch or "model"
    input_shape = tuple(qm.meta["input_shape"])
    infos = [lp.info for lp in qm.plan.layers]
    plans = {lp.info.name: _LayerPlan(lp, qm.plan.points) for lp in qm.plan.layers}
    amax = [float(a) for a in np.asarray(qm.act_amax, np.float32)]
    if not float_export:
        for p in qm.plan.points:
            if p.bits != 8:
                raise ValueError(f"point {p.name}: only 8-bit activations can be exported to ONNX QDQ "
                                 f"(this model has {p.bits}-bit activations); use --float for a float export")
    stored = {n: {k: np.asarray(v) for k, v in q.items()} for n, q in qm.layers.items()}

    def layer_fn(g, info, x):
        q = stored[info.name]
        w = dequantize_layer(q)
        if float_export:
            return _emit_layer(g, x, info, None, None, w, amax)
        return _emit_layer(g, x, info, plans[info.name], q, w, amax)

    kind = "float, dequantized weights" if float_export else "INT8 QDQ, " + ("CFWS" if qm.config.cfws else "plain")
    doc, meta = _doc(arch, kind, input_shape)
    return _build(model, infos, layer_fn, input_shape, opset, doc, meta, f"{arch}_{'float' if float_export else 'qdq'}")


def float_onnx(arch: str, variables: Mapping[str, Any], *, image_size: int | None = None,
               opset: int = DEFAULT_OPSET, num_classes: int | None = None):
    """Float ONNX ``ModelProto`` of registry architecture ``arch`` from ``{"params"}`` (deploy form)
    or ``{"params", "batch_stats"}`` (train form, fused first); ``image_size`` default 32 for
    ``*_cifar`` architectures, else 224."""
    from cfws_jax.models.registry import family
    from cfws_jax.ptq.model import layer_params, resolve_model

    if family(arch) == "yolov6":
        raise ValueError(f"ONNX export of YOLOv6 detectors ({arch}) is not supported yet")
    size = image_size or (32 if str(arch).endswith("_cifar") else 224)
    name, model, params = resolve_model(arch, variables, num_classes)
    input_shape = (1, size, size, 3)
    infos = discover_layers(model, {"params": params}, input_shape)
    weights = {i.name: {k: np.asarray(v, np.float32) for k, v in layer_params(params, i.name).items()
                        if k in ("kernel", "bias")} for i in infos}

    def layer_fn(g, info, x):
        return _emit_layer(g, x, info, None, None, weights[info.name], [])

    doc, meta = _doc(arch, "float", input_shape)
    return _build(model, infos, layer_fn, input_shape, opset, doc, meta, f"{arch}_float")
