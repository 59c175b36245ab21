"""ONNX export of a :class:`~cfws_jax.ptq.QuantizedModel` with QuantizeLinear / DequantizeLinear
(QDQ) nodes, and of float networks.

``export_onnx(qm)`` -> ``onnx.ModelProto`` (explicit quantization, TensorRT / onnxruntime QDQ
form); ``export_onnx(qm, float_export=True)`` -> the same graph with the dequantized float
weights and no Q/DQ; ``float_onnx(arch, variables)`` -> the float graph of ``{"params"}`` (deploy)
or ``{"params", "batch_stats"}`` (train form, fused first).

Graph interface: input ``input`` float32 **NCHW** ``[batch, 3, H, W]`` (dynamic batch, H and W
fixed at export), holding exactly the numbers the Flax model reads in NHWC, transposed to NCHW.
Classifiers: ``(x / 255 - mean) / std`` (:mod:`cfws_jax.data.preprocess`), the normalization
**not** part of the graph (the model doc string names the statistics); output ``logits``
``[batch, classes]``. YOLOv6 detectors: the letterboxed RGB canvas ``/ 255`` in [0, 1], no
mean / std (:mod:`cfws_jax.detection.letterbox`); output ``outputs`` ``[batch, N, 5 + nc]``,
the Flax model's decoded rows in its element order (``cx, cy, w, h`` in input pixels,
confidence, class scores; levels of strides 8, 16, 32 (P6 models: and 64), row-major within a level); NMS is not in
the graph.

How the graph is found (tracing, not a re-statement of the architecture): the deploy-form Flax
module is traced once with ``jax.make_jaxpr`` while ``flax.linen.intercept_methods`` replaces
every QConv / QDense call by one opaque JAX primitive (``cfws_layer``, carrying the layer
name), and every YOLOv6 ``Transpose`` upsampling by ``cfws_upsample`` (its 1x1
``upsample_transpose`` layer, then ONNX ``DepthToSpace`` in DCR mode: output channel ``o`` of
pixel ``(2h+a, 2w+b)`` is input channel ``(2a+b)*O + o``, as
:func:`cfws_jax.models.yolov6.blocks.depth_to_space`). The batch axis is traced as a symbolic
dimension, so every batch-dependent shape (reshapes, the constant-confidence column of a v2 head)
is known as such and becomes a dynamic ONNX shape. The jaxpr then holds exactly the layers, in
execution order, plus the real glue code of the model between them (SE pooling and product,
the global average pool, SPPF max-pools and concatenations, the detector decode: sigmoid,
exp-wh, DFL softmax expectation, ltrb -> xywh), read from the same Flax code that runs in JAX.
Equations that do not depend on the input (anchor grids, ``iota``) are evaluated at export time
and stored as constants for the fixed spatial size. Each equation is translated to ONNX; each
``cfws_layer`` is emitted from the :class:`~cfws_jax.ptq.runtime.Plan` the fake-quant forward
(:func:`cfws_jax.ptq.runtime.make_forward`) uses, mirroring it step by step, so the Q/DQ
placement is the simulation's by construction. A model change that introduces an operation the
translator does not know fails with an error naming the JAX primitive instead of exporting a
wrong graph. Every ONNX tensor carries a layout (which logical JAX axis each physical axis
holds): convolution, pooling and depth-to-space outputs are NCHW, reshape outputs are in JAX
order; an operation that needs another layout gets a ``Transpose`` (a ``Reshape`` where only
size-1 axes move; constants are transposed at export time) and JAX ``transpose`` only relabels
axes.

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
-127 (ReLU-fused points are non-negative and unaffected; ``act_full_range`` models clamp at -128
in the simulation too).

Targets: ``tensorrt`` (default) as above; ``onnxruntime`` (:mod:`cfws_jax.export.ort_conv`, models
of the ``*_ort`` presets): uint8 activations (zero point 128 at signed points), int32 biases on
the accumulator grid, each CFWS layer as two requantized convs whose sum is a ``DQ , DQ -> Add ->
[Relu] -> Q`` (the ``cfws_branch_quant`` points, emitted for either target), so that
onnxruntime's CPU provider fuses every quantized conv into ``QLinearConv``. Only 8-bit activations (and weights
of at most 8 bits, or 16 bits with opset >= 21) are exported.

YOLOv6 Q/DQ placement (the plan of :mod:`cfws_jax.ptq.graph`): the network input and every
concatenation are re-quantized at the consuming layer's ``:in`` point (after the ONNX
``Concat``); the SPPF ``MaxPool`` (5, stride 1, pad 2) reads ``cv1``'s dequantized output; the
``upsample_transpose`` output is quantized before ``DepthToSpace``; the head's SiLU convs
(``Sigmoid`` * ``Mul``) are quantized after the SiLU; the prediction convs have quantized
weights and float outputs, and the decode runs in float.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive

from cfws_jax.models.layers import QConv, QDense
from cfws_jax.ptq.graph import LayerInfo, discover_layers, layer_name, non_layer_params
from cfws_jax.quant import ZERO_AMAX

NHWC_TO_NCHW = (0, 3, 1, 2)  # physical ONNX axis i holds logical (JAX) axis NHWC_TO_NCHW[i]
MIN_OPSET = 13  # per-axis DequantizeLinear, ReduceSum / Unsqueeze / Squeeze axes as inputs
DEFAULT_OPSET = 17
DETECTOR_SIZE = 640  # default YOLOv6 export size when nothing records one (P6 models: 1280)


def _detector_size(arch) -> int:
    """The official canvas of a YOLOv6 ``arch`` (:func:`cfws_jax.detection.image_size_for`)."""
    from cfws_jax.detection.letterbox import image_size_for

    return image_size_for(str(arch)) if arch else DETECTOR_SIZE


def _layer_abstract(x, *, name, out_shape):
    return jax.core.ShapedArray((x.shape[0], *out_shape), jnp.float32)


def _trace_only(name: str) -> Primitive:
    prim = Primitive(name)
    prim.def_abstract_eval(_layer_abstract)
    prim.def_impl(lambda x, **_: (_ for _ in ()).throw(RuntimeError(f"{name} is trace-only")))
    return prim


_layer_p = _trace_only("cfws_layer")  # one QConv / QDense call
_upsample_p = _trace_only("cfws_upsample")  # one YOLOv6 Transpose: upsample_transpose layer + depth-to-space


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

    def __init__(self, opset: int, target: str = "tensorrt"):
        self.opset = opset
        self.target = target
        self.codes: dict = {}  # DequantizeLinear output -> its Codes
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
    """Per-tensor QuantizeLinear -> DequantizeLinear of ``x`` at one plan point: int8, zero point
    0, scale ``amax / 127``; unsigned points uint8, zero point 0, scale ``amax / 255``. Target
    ``onnxruntime``: signed points as uint8 with zero point 128 (the same grid, -128..127), so
    every activation is uint8 (onnxruntime's fast u8 x s8 kernels; it left s8 x s8 convs of
    3-channel inputs in float). The codes are recorded in ``g.codes`` (DequantizeLinear output ->
    :class:`Codes`)."""
    if point.bits != 8:
        raise ValueError(f"point {point.name}: only 8-bit activations can be exported to ONNX QDQ, got {point.bits} bits")
    qmax = 255 if point.unsigned else 127
    sv = _point_scale(amax, qmax)
    scale = g.const(sv, base + ".scale")
    if g.target == "onnxruntime":
        zpv = np.uint8(0 if point.unsigned else 128)
    else:
        zpv = np.zeros((), np.uint8 if point.unsigned else np.int8)
    zp = g.const(zpv, base + ".zero_point")
    q = g.op("QuantizeLinear", [x, scale, zp], base + ".q")
    dq = g.op("DequantizeLinear", [q, scale, zp], base + ".dq")
    g.codes[dq] = Codes(q, scale, zp, float(sv))
    return dq


class Codes(NamedTuple):
    """8-bit codes of a quantized tensor: names of the codes / scale / zero point tensors, and the
    scale's value."""

    q: str
    scale: str
    zp: str
    scale_value: float


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


def _centre_input(g: _Graph, x: str, info: LayerInfo, base: str, pad_value: str | None = None) -> str:
    """The input of the centre 1x1 conv: ``x`` cropped (``pad < k//2``) or padded with zeros
    (``pad_value``: the name of a scalar, e.g. a zero point, for int8 codes) (``pad > k//2``) by
    ``d = k//2 - pad`` on each side, so the 1x1 conv at the same stride reads the pixel under the
    k x k kernel's centre tap."""
    d = info.kernel_shape[0] // 2 - info.padding
    if d == 0:
        return x
    if d > 0:
        starts = g.const(np.array([d, d], np.int64), base + ".crop_starts")
        ends = g.const(np.array([-d, -d], np.int64), base + ".crop_ends")
        axes = g.const(np.array([2, 3], np.int64), base + ".crop_axes")
        return g.op("Slice", [x, starts, ends, axes], base + ".crop")
    pads = g.const(np.array([0, 0, -d, -d, 0, 0, -d, -d], np.int64), base + ".pads")
    return g.op("Pad", [x, pads] + ([pad_value] if pad_value else []), base + ".pad")


def _emit_layer(g: _Graph, x: str, info: LayerInfo, lp, q: Mapping[str, np.ndarray] | None,
                w: Mapping[str, np.ndarray], amax) -> str:
    """One QConv / QDense as ONNX, mirroring ``make_forward``'s interceptor.

    ``lp``: its LayerPlan (None: float export); ``q``: its stored arrays (codes, scales);
    ``w``: float ``{"kernel", "bias"?}`` (the dequantized or float weights). Target
    ``onnxruntime``: the same QDQ layout with uint8 codes and int32 biases
    (:mod:`cfws_jax.export.ort_conv`)."""
    base = info.name
    quantized = lp is not None
    if quantized and lp.in_point is not None:
        x = _qdq(g, x, lp.point_in, amax[lp.in_point], base + ".in")
    scheme = lp.scheme if quantized else "float"
    if quantized and lp.coarse_point is not None:  # cfws_branch_quant: both branches quantized, then added
        return _output(g, _branches(g, x, info, lp, q, w, amax), info, lp, amax)
    return _output(g, _linear(g, x, info, scheme, q, w), info, lp, amax)


def _branches(g: _Graph, x: str, info: LayerInfo, lp, q, w, amax) -> str:
    """A CFWS layer with branch points (``cfws_branch_quant``, :func:`cfws_jax.ptq.runtime.layer_pre`):
    ``QDQ(centre 1x1 conv) + QDQ(fine k x k conv + bias)``, both convs on DequantizeLinear'd int8
    weights (and, target ``onnxruntime``, an int32 bias): onnxruntime fuses each conv into a
    QLinearConv and the sum (with the ReLU before an unsigned point) into a QLinearAdd."""
    from cfws_jax.export.ort_conv import centre_codes_input, int_bias

    base = info.name
    fine = _oihw(q["w_codes"])
    inputs = [x, _weight_dq(g, fine, q["w_scale"], base)]
    bias = w.get("bias")
    if bias is not None:
        if g.target == "onnxruntime" and x in g.codes:
            inputs.append(int_bias(g, bias, g.codes[x].scale_value, q["w_scale"], fine.shape[0], base))
        else:
            inputs.append(g.const(np.asarray(bias, np.float32), base + ".bias"))
    yf = g.op("Conv", inputs, base + ".conv", **conv_attrs(info))
    cc = np.asarray(q["c_codes"])
    if cc.ndim == 4:  # whole-kernel split: a second k x k conv
        yc = g.op("Conv", [x, _weight_dq(g, _oihw(cc), q["c_scale"], base + ".coarse")], base + ".coarse_conv",
                  **conv_attrs(info))
    else:
        xc = centre_codes_input(g, x, info, base) if x in g.codes else _centre_input(g, x, info, base)
        yc = g.op("Conv", [xc, _weight_dq(g, centre_oihw(cc), q["c_scale"], base + ".centre")], base + ".centre_conv",
                  **centre_attrs(info))
    yc = _qdq(g, yc, lp.point_coarse, amax[lp.coarse_point], base + ".coarse_out")
    yf = _qdq(g, yf, lp.point_fine, amax[lp.fine_point], base + ".fine_out")
    return g.op("Add", [yc, yf], base + ".cfws_sum")


def _linear(g: _Graph, x: str, info: LayerInfo, scheme: str, q, w) -> str:
    """The layer's conv / Gemm on float ``x`` (NCHW / ``[batch, in]``) with DequantizeLinear'd
    integer weights (float weights for ``scheme == "float"``), bias added (target ``onnxruntime``,
    input codes: the int32 bias of ``int_bias``), no activation."""
    base = info.name
    bias = w.get("bias")
    b = g.const(np.asarray(bias, np.float32), base + ".bias") if bias is not None else None
    if b and g.target == "onnxruntime" and scheme != "float" and x in g.codes:  # int_bias
        from cfws_jax.export.ort_conv import int_bias

        scale = np.asarray(q["w_scale"], np.float32)
        b = int_bias(g, bias, g.codes[x].scale_value, scale, np.shape(bias)[0], base)
    if info.kind == "conv":
        attrs = conv_attrs(info)
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
                ck = _weight_dq(g, centre_oihw(cc), q["c_scale"], base + ".centre")
                yc = g.op("Conv", [_centre_input(g, x, info, base), ck], base + ".centre_conv", **centre_attrs(info))
            y = g.op("Add", [yc, y], base + ".cfws_sum")
        return y
    if scheme == "float":
        kern = g.const(np.ascontiguousarray(np.asarray(w["kernel"], np.float32).T), base + ".kernel")
    else:
        kern = _weight_dq(g, np.ascontiguousarray(np.asarray(q["w_codes"]).T), q["w_scale"], base)
    return g.op("Gemm", [x, kern] + ([b] if b else []), base + ".gemm", transB=1)


def conv_attrs(info: LayerInfo) -> dict:
    """ONNX Conv attributes of a conv layer (square stride / padding)."""
    return dict(strides=[info.strides] * 2, pads=[info.padding] * 4, group=info.groups,
                kernel_shape=list(info.kernel_shape[:2]))


def centre_attrs(info: LayerInfo) -> dict:
    """Attributes of a CFWS layer's centre 1x1 conv (same stride and groups, no padding)."""
    return dict(strides=[info.strides] * 2, pads=[0, 0, 0, 0], group=info.groups, kernel_shape=[1, 1])


def centre_oihw(c_codes) -> np.ndarray:
    """Centre codes ``[I/g, O]`` -> a 1x1 OIHW kernel ``[O, I/g, 1, 1]``."""
    return np.ascontiguousarray(np.asarray(c_codes).T[:, :, None, None])


def _output(g: _Graph, y: str, info: LayerInfo, lp, amax) -> str:
    """Activation and ``:out`` point of a layer output ``y`` (before or after the activation, as
    the plan says). Target ``onnxruntime``: a ReLU after a before-activation point is followed by
    a Q / DQ on the same grid (exact: ReLU keeps grid values), so the next conv reads codes."""
    base = info.name
    out_point = lp.out_point if lp is not None else None
    if out_point is not None and lp.point_out.before_act:
        yq = _qdq(g, y, lp.point_out, amax[out_point], base + ".out")
        y = _activation(g, yq, info.act, base)
        if g.target == "onnxruntime" and info.act == "relu":
            c = g.codes[yq]
            qq = g.op("QuantizeLinear", [y, c.scale, c.zp], base + ".relu_q")
            y = g.op("DequantizeLinear", [qq, c.scale, c.zp], base + ".relu_dq")
            g.codes[y] = c._replace(q=qq)
        return y
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
        self.coarse_point, self.fine_point = lp.coarse_point, lp.fine_point
        self.point_coarse = points[lp.coarse_point] if lp.coarse_point is not None else None
        self.point_fine = points[lp.fine_point] if lp.fine_point is not None else None


# ---------------------------------------------------------------------------- jaxpr translation


def _trace(model: nn.Module, infos: Mapping[str, LayerInfo], input_shape, params: Mapping[str, Any] | None = None):
    """Closed jaxpr of ``model`` on ``input_shape`` (batch axis symbolic) with every QConv / QDense
    replaced by ``cfws_layer`` and every YOLOv6 ``Transpose`` upsampling by ``cfws_upsample``;
    ``params``: the non-layer parameters (:func:`non_layer_params`, e.g. BottleRep ``alpha``: a
    constant multiply in the graph)."""
    from cfws_jax.models.yolov6.blocks import Transpose

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(mod, (QConv, QDense)):
            name = layer_name(mod)
            return _layer_p.bind(args[0], name=name, out_shape=tuple(infos[name].out_shape[1:]))
        if isinstance(mod, Transpose):
            name = layer_name(mod) + "/upsample_transpose"
            _, h, w, c = infos[name].out_shape
            return _upsample_p.bind(args[0], name=name, out_shape=(2 * h, 2 * w, c // 4))
        return next_fun(*args, **kwargs)

    def fn(x):
        with nn.intercept_methods(interceptor):
            return model.apply({"params": dict(params or {})}, x)

    batch, = jax.export.symbolic_shape("batch")
    try:
        return jax.make_jaxpr(fn)(jax.ShapeDtypeStruct((batch, *input_shape[1:]), jnp.float32)), batch
    except (flax.errors.ScopeParamNotFoundError, flax.errors.ScopeCollectionNotFound) as e:  # no alpha given
        raise ValueError(f"ONNX export: the network reads a parameter outside its conv layers that was not "
                         f"given ({' '.join(str(e).split())[:200]})") from None


_UNARY = {"logistic": "Sigmoid", "exp": "Exp", "neg": "Neg", "tanh": "Tanh", "abs": "Abs", "sqrt": "Sqrt",
          "log": "Log", "floor": "Floor", "ceil": "Ceil"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min", "pow": "Pow"}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}
_SUBJAXPR = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
             "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
             "remat": "jaxpr", "checkpoint": "jaxpr"}
_PASS = ("stop_gradient", "copy", "copy_p", "optimization_barrier")
_OURS = ("cfws_layer", "cfws_upsample")


def _static(shape) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in shape)


class _Const:
    """An input-independent value (logical JAX layout), evaluated at export time."""

    __slots__ = ("val",)

    def __init__(self, val):
        self.val = np.asarray(val)


class _Val:
    """ONNX tensor ``name`` of logical (JAX) shape ``shape``; physical axis i holds logical axis ``perm[i]``."""

    __slots__ = ("name", "perm", "shape")

    def __init__(self, name: str, perm, shape):
        self.name, self.perm, self.shape = name, tuple(perm), tuple(shape)


def _ident(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def _drop_axes(perm, axes) -> tuple[int, ...]:
    """``perm`` without the logical ``axes``, the remaining logical axes renumbered."""
    return tuple(a - sum(x < a for x in axes) for a in perm if a not in axes)


class _Translator:
    """JAX equations -> ONNX nodes on ``g`` (see the module docstring: layouts, constant folding)."""

    def __init__(self, g: _Graph, infos: Mapping[str, LayerInfo], emit_layer, batch, input_name: str):
        self.g, self.infos, self.emit_layer, self.batch, self.input_name = g, infos, emit_layer, batch, input_name
        self._cache: dict = {}

    # ---- values and layouts

    def read(self, env, v):
        from jax.extend.core import Literal

        if isinstance(v, Literal):
            return _Const(np.asarray(v.val, dtype=v.aval.dtype))
        return env[v]

    def tensor(self, v, perm=None) -> str:
        """ONNX name of ``v`` in layout ``perm`` (default: JAX order)."""
        g = self.g
        if isinstance(v, _Const):
            val = v.val
            perm = _ident(val.ndim) if perm is None or val.ndim == 0 else tuple(perm)
            key = ("const", id(v), perm)
            if key not in self._cache:
                self._cache[key] = g.const(np.ascontiguousarray(np.transpose(val, perm)), "const"), v
            return self._cache[key][0]
        perm = _ident(len(v.shape)) if perm is None else tuple(perm)
        if v.perm == perm:
            return v.name
        key = (v.name, perm)
        if key not in self._cache:
            big = lambda order: [a for a in order if v.shape[a] != 1]  # noqa: E731 (symbolic = not 1)
            phys = [v.shape[a] for a in perm]
            if big(v.perm) == big(perm) and sum(not isinstance(d, (int, np.integer)) for d in phys) <= 1:
                shape = np.array([d if isinstance(d, (int, np.integer)) else -1 for d in phys], np.int64)
                self._cache[key] = g.op("Reshape", [v.name, g.const(shape, "shape")], "relayout")
            else:
                self._cache[key] = g.op("Transpose", [v.name], "transpose", perm=[v.perm.index(a) for a in perm])
        return self._cache[key]

    def batch_dim(self) -> str:
        if "batch" not in self._cache:
            g = self.g
            shape = g.op("Shape", [self.input_name], "input_shape")
            self._cache["batch"] = g.op("Slice", [shape, g.const(np.array([0], np.int64), "start"),
                                                  g.const(np.array([1], np.int64), "end")], "batch")
        return self._cache["batch"]

    def shape_tensor(self, dims) -> str:
        """int64 ONNX tensor of ``dims`` (ints and the symbolic batch size)."""
        g = self.g
        if _static(dims):
            return g.const(np.array(dims, np.int64), "shape")
        parts, run = [], []
        for d in dims:
            if isinstance(d, (int, np.integer)):
                run.append(int(d))
                continue
            if d != self.batch:
                raise ValueError(f"ONNX export: shape {tuple(dims)} depends on the batch size in a way "
                                 "that is not supported")
            if run:
                parts.append(g.const(np.array(run, np.int64), "shape"))
                run = []
            parts.append(self.batch_dim())
        if run:
            parts.append(g.const(np.array(run, np.int64), "shape"))
        return parts[0] if len(parts) == 1 else g.op("Concat", parts, "shape", axis=0)

    # ---- jaxpr walking

    def run(self, jaxpr, consts, args) -> list:
        env: dict = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = _Const(c)
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for eqn in jaxpr.eqns:
            outs = self.eqn(env, eqn)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [self.read(env, v) for v in jaxpr.outvars]

    def eqn(self, env, eqn) -> list:
        prim, p = eqn.primitive.name, eqn.params
        ins = [self.read(env, v) for v in eqn.invars]
        if prim in _SUBJAXPR and _SUBJAXPR[prim] in p:
            sub = p[_SUBJAXPR[prim]]
            jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
            return self.run(jaxpr, consts, ins)
        out_shapes = [tuple(v.aval.shape) for v in eqn.outvars]
        if prim not in _OURS and all(isinstance(i, _Const) for i in ins) and all(map(_static, out_shapes)):
            outs = eqn.primitive.bind(*[jnp.asarray(i.val) for i in ins], **p)  # constant folding
            return [_Const(o) for o in (outs if eqn.primitive.multiple_results else [outs])]
        shape = out_shapes[0] if out_shapes else ()
        handler = getattr(self, "p_" + prim, None)
        if handler is not None:
            return [handler(ins, p, shape, eqn)]
        if prim in _UNARY:
            x = ins[0]
            return [_Val(self.g.op(_UNARY[prim], [self.tensor(x, x.perm)], prim), x.perm, shape)]
        if prim in _BINARY:
            return [self.elementwise(_BINARY[prim], ins, shape, prim)]
        if prim in _PASS and len(ins) == 1:
            return ins
        if prim in _REDUCE:
            return [self.reduce(prim, ins[0], tuple(p["axes"]), shape)]
        raise ValueError(f"ONNX export: JAX primitive {prim!r} (output shape {shape}) has no ONNX "
                         "translation; this model cannot be exported yet")

    def elementwise(self, op: str, ins, shape, base: str) -> _Val:
        rank = len(shape)
        vals = [i for i in ins if isinstance(i, _Val) and len(i.shape) == rank]
        perm = vals[0].perm if vals else _ident(rank)
        names = [self.tensor(i, perm if (i.val.ndim if isinstance(i, _Const) else len(i.shape)) == rank else None)
                 for i in ins]
        return _Val(self.g.op(op, names, base), perm, shape)

    # ---- primitives (p_<name>(ins, params, out_shape, eqn) -> value)

    def p_cfws_layer(self, ins, p, shape, eqn):
        x = ins[0]
        if self.infos[p["name"]].kind == "conv":
            return _Val(self.emit_layer(p["name"], self.tensor(x, NHWC_TO_NCHW)), NHWC_TO_NCHW, shape)
        return _Val(self.emit_layer(p["name"], self.tensor(x)), _ident(len(shape)), shape)

    def p_cfws_upsample(self, ins, p, shape, eqn):
        y = self.emit_layer(p["name"], self.tensor(ins[0], NHWC_TO_NCHW))
        return _Val(self.g.op("DepthToSpace", [y], p["name"] + ".depth_to_space", blocksize=2, mode="DCR"),
                    NHWC_TO_NCHW, shape)

    def p_max(self, ins, p, shape, eqn):
        var = [i for i in ins if isinstance(i, _Val)]
        if len(var) == 1 and all(np.all(i.val == 0) for i in ins if isinstance(i, _Const)):  # max(x, 0) -> Relu
            return _Val(self.g.op("Relu", [var[0].name], "relu"), var[0].perm, shape)
        return self.elementwise("Max", ins, shape, "max")

    def p_rsqrt(self, ins, p, shape, eqn):
        x = ins[0]
        return _Val(self.g.op("Reciprocal", [self.g.op("Sqrt", [x.name], "sqrt")], "rsqrt"), x.perm, shape)

    def p_integer_pow(self, ins, p, shape, eqn):
        x = ins[0]
        return _Val(self.g.op("Pow", [x.name, self.g.const(np.float32(p["y"]), "exponent")], "pow"), x.perm, shape)

    def p_convert_element_type(self, ins, p, shape, eqn):
        if np.dtype(p["new_dtype"]) != np.float32 or eqn.invars[0].aval.dtype != np.float32:
            raise ValueError(f"ONNX export: dtype conversion to {p['new_dtype']} is not supported")
        return ins[0]

    def reduce(self, prim: str, x: _Val, axes: tuple[int, ...], shape) -> _Val:
        g = self.g
        phys = sorted(x.perm.index(a) for a in axes)
        if prim == "reduce_sum" or g.opset >= 18:
            y = g.op(_REDUCE[prim], [x.name, g.const(np.array(phys, np.int64), "axes")], prim, keepdims=0)
        else:
            y = g.op(_REDUCE[prim], [x.name], prim, axes=phys, keepdims=0)
        return _Val(y, _drop_axes(x.perm, axes), shape)

    def p_broadcast_in_dim(self, ins, p, shape, eqn):
        """Insert axes (Unsqueeze) and repeat size-1 / new axes (Expand, shape possibly batch-dependent)."""
        g, x = self.g, ins[0]
        dims = tuple(p["broadcast_dimensions"])
        rank, in_shape = len(shape), tuple(eqn.invars[0].aval.shape)
        if isinstance(x, _Const):
            unsq = np.reshape(x.val, [in_shape[dims.index(a)] if a in dims else 1 for a in range(rank)])
            y, perm, have = self.tensor(_Const(unsq)), _ident(rank), unsq.shape
        elif dims == _ident(rank):
            y, perm, have = x.name, x.perm, in_shape
        else:
            y, perm = self.tensor(x), _ident(rank)
            new = [a for a in range(rank) if a not in dims]
            y = g.op("Unsqueeze", [y, g.const(np.array(new, np.int64), "axes")], "unsqueeze")
            have = tuple(in_shape[dims.index(a)] if a in dims else 1 for a in range(rank))
        if tuple(have) != tuple(shape):
            y = g.op("Expand", [y, self.shape_tensor([shape[a] for a in perm])], "expand")
        return _Val(y, perm, shape)

    def p_reshape(self, ins, p, shape, eqn):
        x = ins[0]
        if p.get("dimensions") is not None:
            raise ValueError("ONNX export: reshape with a dimension order is not supported")
        if tuple(x.shape) == tuple(shape):
            return x
        sym = [d for d in shape if not isinstance(d, (int, np.integer))]
        if len(sym) > 1:
            raise ValueError(f"ONNX export: reshape to {shape} is not supported")
        target = np.array([d if isinstance(d, (int, np.integer)) else -1 for d in shape], np.int64)
        y = self.g.op("Reshape", [self.tensor(x), self.g.const(target, "shape")], "reshape")
        return _Val(y, _ident(len(shape)), shape)

    def p_transpose(self, ins, p, shape, eqn):
        x, perm = ins[0], tuple(p["permutation"])  # logical output axis j is input axis perm[j]
        return _Val(x.name, tuple(perm.index(a) for a in x.perm), shape)

    def p_squeeze(self, ins, p, shape, eqn):
        x, axes = ins[0], tuple(p["dimensions"])
        phys = sorted(x.perm.index(a) for a in axes)
        y = self.g.op("Squeeze", [x.name, self.g.const(np.array(phys, np.int64), "axes")], "squeeze")
        return _Val(y, _drop_axes(x.perm, axes), shape)

    def p_concatenate(self, ins, p, shape, eqn):
        vals = [i for i in ins if isinstance(i, _Val)]
        perm = vals[0].perm
        y = self.g.op("Concat", [self.tensor(i, perm) for i in ins], "concat", axis=perm.index(p["dimension"]))
        return _Val(y, perm, shape)

    def p_stack(self, ins, p, shape, eqn):
        g, axis = self.g, int(p["axis"])
        ax = g.const(np.array([axis], np.int64), "axes")
        parts = [g.op("Unsqueeze", [self.tensor(i), ax], "unsqueeze") for i in ins]
        return _Val(g.op("Concat", parts, "stack", axis=axis), _ident(len(shape)), shape)

    def _slice(self, x: _Val, starts, limits, steps, shape) -> _Val:
        g = self.g
        axes, s0, s1, st = [], [], [], []
        for a, (b, e, s) in enumerate(zip(starts, limits, steps)):
            if b == 0 and s == 1 and (e == x.shape[a]):
                continue
            if not all(isinstance(t, (int, np.integer)) for t in (b, e, s)):
                raise ValueError(f"ONNX export: a batch-dependent slice of {x.shape} is not supported")
            axes.append(x.perm.index(a))
            s0.append(int(b)), s1.append(int(e)), st.append(int(s))
        if not axes:
            return x
        c = lambda v, n: g.const(np.array(v, np.int64), n)  # noqa: E731
        y = g.op("Slice", [x.name, c(s0, "starts"), c(s1, "ends"), c(axes, "axes"), c(st, "steps")], "slice")
        return _Val(y, x.perm, shape)

    def p_slice(self, ins, p, shape, eqn):
        x = ins[0]
        steps = p.get("strides") or (1,) * len(x.shape)
        return self._slice(x, p["start_indices"], p["limit_indices"], steps, shape)

    def p_gather(self, ins, p, shape, eqn):
        """Only the static-slice form jnp indexing produces with a symbolic batch (``x[..., a:b]``)."""
        x, idx = ins
        dn, rank = p["dimension_numbers"], len(ins[0].shape)
        ok = (isinstance(idx, _Const) and idx.val.size == 1 and tuple(dn.offset_dims) == _ident(rank)
              and not dn.collapsed_slice_dims and len(dn.start_index_map) == 1
              and not getattr(dn, "operand_batching_dims", ()) and not getattr(dn, "start_indices_batching_dims", ()))
        if ok:
            axis = dn.start_index_map[0]
            sizes = tuple(p["slice_sizes"])
            ok = all(sizes[a] == x.shape[a] for a in range(rank) if a != axis) and _static([x.shape[axis]])
        if not ok:
            raise ValueError(f"ONNX export: gather (output shape {shape}) other than a static slice is not supported")
        start = int(np.clip(int(idx.val.reshape(-1)[0]), 0, x.shape[axis] - sizes[axis]))
        starts = [0] * rank
        limits = list(x.shape)
        starts[axis], limits[axis] = start, start + sizes[axis]
        return self._slice(x, starts, limits, [1] * rank, shape)

    def p_dot_general(self, ins, p, shape, eqn):
        """``x[..., K] @ w[K] | w[K, N]`` (e.g. the DFL expectation) -> MatMul."""
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        lhs, rhs = ins
        lr, rr = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
        if lb or rb or tuple(lc) != (lr - 1,) or tuple(rc) != (0,) or rr not in (1, 2):
            raise ValueError(f"ONNX export: dot_general {p['dimension_numbers']} is not supported")
        return _Val(self.g.op("MatMul", [self.tensor(lhs), self.tensor(rhs)], "matmul"), _ident(len(shape)), shape)

    def p_reduce_window_max(self, ins, p, shape, eqn):
        """NHWC max-pool (window ``(1, k, k, 1)``) -> MaxPool on NCHW (padding never wins, as -inf)."""
        x = ins[0]
        win, st, pad = tuple(p["window_dimensions"]), tuple(p["window_strides"]), tuple(p["padding"])
        if (len(win) != 4 or win[0] != 1 or win[3] != 1 or st[0] != 1 or st[3] != 1 or tuple(pad[0]) != (0, 0)
                or tuple(pad[3]) != (0, 0) or any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"]))):
            raise ValueError(f"ONNX export: reduce_window_max {win} / {st} / {pad} is not supported")
        y = self.g.op("MaxPool", [self.tensor(x, NHWC_TO_NCHW)], "maxpool", kernel_shape=[win[1], win[2]],
                      strides=[st[1], st[2]], pads=[pad[1][0], pad[2][0], pad[1][1], pad[2][1]])
        return _Val(y, NHWC_TO_NCHW, shape)


# ---------------------------------------------------------------------------- model assembly


def _is_detector(model: nn.Module) -> bool:
    from cfws_jax.models.yolov6 import YOLOv6

    return isinstance(model, YOLOv6)


def _build(model: nn.Module, infos: list[LayerInfo], layer_fn, input_shape, opset: int, doc: str,
           meta: Mapping[str, str], graph_name: str, params: Mapping[str, Any] | None = None,
           target: str = "tensorrt"):
    onnx = _onnx()
    from onnx import TensorProto, helper

    if not MIN_OPSET <= opset:
        raise ValueError(f"--opset must be >= {MIN_OPSET} (per-channel DequantizeLinear), got {opset}")
    out_name = "outputs" if _is_detector(model) else "logits"
    by_name = {i.name: i for i in infos}
    closed, batch = _trace(model, by_name, input_shape, params)
    g = _Graph(opset, target)
    tr = _Translator(g, by_name, lambda name, x: layer_fn(g, by_name[name], x), batch, "input")
    _, h, w, c = input_shape
    outs = tr.run(closed.jaxpr, closed.consts, [_Val("input", NHWC_TO_NCHW, (batch, h, w, c))])
    if len(outs) != 1:
        raise ValueError(f"ONNX export: the model returns {len(outs)} outputs; only single-output models are supported")
    g.nodes.append(helper.make_node("Identity", [tr.tensor(outs[0])], [out_name], name=out_name))
    out_shape = ["batch" if d == batch else int(d) for d in closed.jaxpr.outvars[0].aval.shape]
    graph = helper.make_graph(
        g.nodes, graph_name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, h, w])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        initializer=g.inits, doc_string=doc)
    model_proto = helper.make_model(graph, producer_name=PRODUCER, doc_string=doc,
                                    opset_imports=[helper.make_opsetid("", opset)])
    model_proto.ir_version = min(model_proto.ir_version, 8 if opset <= 17 else 9 if opset <= 20 else 10)
    helper.set_model_props(model_proto, dict(meta))
    onnx.checker.check_model(model_proto, full_check=True)
    return model_proto


PRODUCER = "cfws_jax"  # ModelProto.producer_name of every file this module writes


def _strides(model: nn.Module) -> str:
    """``"8, 16, 32"`` (``"8, 16, 32, 64"`` for a P6 detector)."""
    strides = getattr(getattr(model, "config", None), "strides", (8, 16, 32))
    return ", ".join(map(str, strides))


def _doc(arch: str, kind: str, input_shape, detector: bool = False, strides: str = "8, 16, 32") -> tuple[str, dict]:
    _, h, w, _ = input_shape
    if detector:
        doc = (f"cfws_jax export of the YOLOv6 detector {arch} ({kind}). Input 'input': float32 NCHW "
               f"[batch, 3, {h}, {w}], RGB in [0, 1]: the letterboxed canvas (colour 114 padding, "
               "cfws_jax.detection.letterbox) divided by 255, no mean/std, transposed to NCHW. Output "
               "'outputs': float32 [batch, N, 5 + classes], decoded: cx, cy, w, h (input pixels), confidence "
               "(sigmoid(objectness) for v1.0 heads, 1 for v2.0 / v3.0), sigmoid class scores; rows level by "
               f"level (strides {strides}), row-major within a level. NMS is NOT part of this graph.")
        meta = {"cfws_jax.arch": arch, "cfws_jax.kind": kind, "cfws_jax.task": "detect",
                "cfws_jax.input_layout": "NCHW", "cfws_jax.input_range": "[0, 1] (RGB / 255, no mean/std)",
                "cfws_jax.image_size": f"{h}x{w}",
                "cfws_jax.output": "[batch, N, 5 + classes]: cx, cy, w, h, confidence, class scores"}
        return doc, meta
    norm = input_normalization(arch)
    doc = (f"cfws_jax export of {arch} ({kind}). Input 'input': float32 NCHW [batch, 3, {h}, {w}], RGB, "
           f"normalized exactly as the cfws_jax (Flax, NHWC) model input, (x / 255 - mean) / std with "
           f"mean={list(norm.mean)} std={list(norm.std)} ({norm.name} statistics), then transposed to NCHW. "
           "The normalization is NOT part of this graph: apply it before feeding the model. "
           f"Output 'logits': float32 [batch, classes].")
    meta = {"cfws_jax.arch": arch, "cfws_jax.kind": kind, "cfws_jax.input_layout": "NCHW",
            "cfws_jax.normalization": norm.name, "cfws_jax.mean": repr(list(norm.mean)),
            "cfws_jax.std": repr(list(norm.std))}
    return doc, meta


def _nested_shapes(weights: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """``{"params": nested {kernel, bias} ShapeDtypeStructs}`` for layer discovery."""
    tree: dict = {}
    for name, arrays in weights.items():
        node = tree
        for part in name.split("/"):
            node = node.setdefault(part, {})
        node.update({k: jax.ShapeDtypeStruct(np.shape(v), jnp.float32) for k, v in arrays.items()})
    return {"params": tree}


def _check_size(image_size) -> int | None:
    if image_size is None:
        return None
    if int(image_size) < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    return int(image_size)


TARGETS = ("tensorrt", "onnxruntime")


def check_target(qm, target: str) -> None:
    """ValueError (one line) unless ``qm`` can be exported for ``target``: ``onnxruntime`` needs
    unsigned ReLU-fused points (``act_unsigned``: uint8 with zero point 0, so the ReLU folds into
    the integer conv) and CFWS branch points
    (``cfws_branch_quant``: each CFWS conv requantized, QLinearConv + QLinearAdd) -- the
    ``cfws_kl_ort`` / ``cfws_minmax_ort`` / ``kl_ort`` presets."""
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target != "onnxruntime":
        return
    signed_relu = [p.name for p in qm.plan.points if p.mode == "relu" and not p.unsigned]
    joint = [lp.info.name for lp in qm.plan.layers if lp.scheme == "cfws" and lp.coarse_point is None]
    if signed_relu or joint:
        what = (f"point {signed_relu[0]} is a signed ReLU-fused point" if signed_relu
                else f"CFWS layer {joint[0]} has no branch points")
        raise ValueError(f"--target onnxruntime needs a model quantized for it (cfws-jax ptq --preset cfws_kl_ort: "
                         f"unsigned ReLU-fused points, CFWS branches requantized); {what}; re-quantize it or "
                         "use --target tensorrt")


def export_onnx(qm, model: nn.Module | None = None, *, float_export: bool = False, opset: int = DEFAULT_OPSET,
                image_size: int | None = None, target: str = "tensorrt"):
    """ONNX ``ModelProto`` of a QuantizedModel: QDQ (default) or, with ``float_export``, its
    dequantized float weights without Q/DQ. ``image_size``: square input size of the graph
    (default: the input size the model records, e.g. its calibration size; YOLOv6: 640 when
    none is recorded). ``target``: ``"tensorrt"`` (explicit QDQ around float convs) or
    ``"onnxruntime"`` (integer convs for the CPU execution provider, :mod:`cfws_jax.export.ort_conv`;
    needs a ``*_ort`` preset's model, :func:`check_target`). Checked with ``onnx.checker`` (full check)."""
    from cfws_jax.ptq.model import model_for
    from cfws_jax.ptq.weights import dequantize_layer

    if not float_export:
        check_target(qm, target)
    model = model_for(qm, model)
    detector = _is_detector(model)
    arch = qm.arch or "model"
    recorded = qm.meta.get("input_shape")
    default = _detector_size(arch)
    input_shape = tuple(recorded) if recorded else (1, default, default, 3)
    size = _check_size(image_size)
    stored = {n: {k: np.asarray(v) for k, v in q.items()} for n, q in qm.layers.items()}
    dequant = {n: dequantize_layer(q) for n, q in stored.items()}
    infos = [lp.info for lp in qm.plan.layers]
    if size is not None and (size, size) != tuple(input_shape[1:3]):
        input_shape = (1, size, size, input_shape[3])
        infos = discover_layers(model, _nested_shapes(dequant), input_shape)
        if [i.name for i in infos] != qm.plan.names:
            raise ValueError(f"--image-size {size}: the network's layers differ from the quantized model's")
    plans = {lp.info.name: _LayerPlan(lp, qm.plan.points) for lp in qm.plan.layers}
    amax = [float(a) for a in np.asarray(qm.act_amax, np.float32)]
    if not float_export:
        for p in qm.plan.points:
            if p.bits != 8:
                raise ValueError(f"point {p.name}: only 8-bit activations can be exported to ONNX QDQ "
                                 f"(this model has {p.bits}-bit activations); use --float for a float export")

    def layer_fn(g, info, x):
        w = dequant[info.name]
        if float_export:
            return _emit_layer(g, x, info, None, None, w, amax)
        return _emit_layer(g, x, info, plans[info.name], stored[info.name], w, amax)

    kind = "float, dequantized weights" if float_export else "INT8 QDQ, " + ("CFWS" if qm.config.cfws else "plain")
    if not float_export and target == "onnxruntime":
        kind += ", onnxruntime integer convs"
    doc, meta = _doc(arch, kind, input_shape, detector, _strides(model))
    return _build(model, infos, layer_fn, input_shape, opset, doc, meta, f"{arch}_{'float' if float_export else 'qdq'}",
                  getattr(qm, "extra_params", None), target=target if not float_export else "tensorrt")


def float_onnx(arch, variables: Mapping[str, Any], *, image_size: int | None = None,
               opset: int = DEFAULT_OPSET, num_classes: int | None = None):
    """Float ONNX ``ModelProto`` of registry architecture ``arch`` (or a deploy-form Flax module)
    from ``{"params"}`` (deploy form) or ``{"params", "batch_stats"}`` (train form of a registry
    architecture, fused first); ``image_size`` default 32 for
    ``*_cifar`` architectures, 640 for YOLOv6 detectors, else 224."""
    from cfws_jax.ptq.model import layer_params, resolve_model

    name, model, params = resolve_model(arch, variables, num_classes)
    arch = name or "model"  # a bare deploy-form module: its name, if any
    detector = _is_detector(model)
    size = _check_size(image_size) or (_detector_size(arch) if detector else 32 if str(arch).endswith("_cifar") else 224)
    input_shape = (1, size, size, 3)
    infos = discover_layers(model, {"params": params}, input_shape)
    weights = {i.name: {k: np.asarray(v, np.float32) for k, v in layer_params(params, i.name).items()
                        if k in ("kernel", "bias")} for i in infos}

    def layer_fn(g, info, x):
        return _emit_layer(g, x, info, None, None, weights[info.name], [])

    doc, meta = _doc(str(arch), "float", input_shape, detector, _strides(model))
    return _build(model, infos, layer_fn, input_shape, opset, doc, meta, f"{arch}_float",
                  non_layer_params(params, [i.name for i in infos]))
