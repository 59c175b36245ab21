"""Discover a model's quantizable layers and where its activation quantizers go.

A *layer* is every :class:`~cfws_jax.models.layers.QConv` / ``QDense`` call, named by its Flax
module path (``stage1_0/rbr_reparam``). A *quantization point* is a tensor that gets a
per-tensor activation quantizer:

* ``<layer>:out`` after every layer except the last one and those marked ``is_output`` (whose
  outputs are network outputs, e.g. a detector's class / box prediction convs: they stay float);
* ``<layer>:in`` before a layer whose input is not the quantized output of another layer
  (the network input, the output of a pooling, an SE product, a residual sum, ...).

Discovery traces the model once with ``jax.eval_shape`` and tracks which tensors are layer
outputs by object identity, so no model needs annotations beyond using QConv/QDense.

YOLOv6 detectors (deploy form, :mod:`cfws_jax.models.yolov6`; tested in
``tests/test_ptq_detector.py``):

* ``:out`` points: every layer but the head prediction convs. Rep convs (``rbr_reparam``) and
  the ReLU Conv+BN layers (``reduce_layer*``, ``downsample*``, SPPF ``cv*``, BiFusion ``cv*``)
  are ReLU-fused (``mode="relu"``); the head's SiLU convs (``stems_i``, ``cls_convs_i``,
  ``reg_convs_i``) are quantized after the SiLU on ``|t|`` (never ReLU-fused); the upsampling
  ``upsample_transpose`` (no activation) is quantized signed on its ``4*O`` channels *before*
  depth-to-space, which only moves values, so this is the same as quantizing the 2x upsampled
  map. A tensor read by several layers (a neck output feeding a head stem and a
  ``downsample``, ``fpn_out*`` feeding an upsample and a later concat) is quantized once, at
  its producer.
* ``:in`` points: the network input (``backbone/stem/rbr_reparam:in``) and every
  concatenation, which gets one per-tensor re-quantization of the joined tensor (its parts
  arrive with their producers' own scales; the per-channel folding of ALGORITHM.md §3.6 is not
  applied): v1.0 / v2.0 ``neck/Rep_p4/conv1`` (cat[upsample0, P4]), ``neck/Rep_p3/conv1``
  (cat[upsample1, P3]), ``neck/Rep_n3/conv1`` (cat[downsample2, fpn_out1]),
  ``neck/Rep_n4/conv1`` (cat[downsample1, fpn_out0]) and ``backbone/ERBlock_5_2/cv2`` (SimSPPF
  cat[y, m(y), m2(y), m3(y)]); v3.0 ``neck/Bifusion{0,1}/cv3`` (cat[upsample, cv1, downsample]),
  ``neck/Rep_n3/conv1``, ``neck/Rep_n4/conv1``, ``backbone/ERBlock_5_2/cv5`` (the pool
  concat of SimCSPSPPF) and ``backbone/ERBlock_5_2/cv7`` (cat[y0, y3]). The SPPF max-pools get no
  point of their own: max-pooling a quantized tensor keeps it on the same grid, and the pool
  concat's ``:in`` point has the same range as ``cv1:out`` (with ``max`` it is exact).
* Head prediction convs (``cls_preds_i``, ``reg_preds_i``, ``obj_preds_i``, ``is_output``) read
  the quantized ``cls_convs_i`` / ``reg_convs_i`` outputs, get plain per-channel weights, and
  their outputs and the decoding (DFL, sigmoid, grid) stay float.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfws_jax.models.layers import QConv, QDense


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Static facts about one quantizable layer (shapes NHWC / HWIO)."""

    name: str
    kind: str  # "conv" | "dense"
    kernel_shape: tuple[int, ...]
    strides: int
    padding: int
    groups: int
    act: str | None
    rep: bool
    use_bias: bool
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input_from: str | None  # name of the layer whose output is this layer's input, if any
    index: int
    is_output: bool = False  # the layer's output is a network output (detector head preds)


def layer_name(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def non_layer_params(params, layer_names) -> dict:
    """The deploy-form ``params`` tree without the named layers' own variables: what the glue
    between layers reads (today a YOLOv6 BottleRep's ``alpha`` ``[1]``), nested as in ``params``;
    ``{}`` for models without such parameters. A layer's own ``{"kernel", "bias"?}`` is
    ``params`` at its path (``name.split("/")``)."""
    from flax import traverse_util

    layers = [tuple(n.split("/")) for n in layer_names]
    flat = traverse_util.flatten_dict(dict(params))
    kept = {k: v for k, v in flat.items() if not any(k[:len(p)] == p for p in layers)}
    return traverse_util.unflatten_dict(kept) if kept else {}


def discover_layers(model: nn.Module, variables, input_shape) -> list[LayerInfo]:
    """Execution-ordered :class:`LayerInfo` of every QConv/QDense in ``model``.

    Raises ValueError naming the input shape when the model cannot run on it.
    """
    found: list[LayerInfo] = []
    produced: dict[int, str] = {}
    alive: list = []

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (QConv, QDense)):
            return next_fun(*args, **kwargs)
        x = args[0]
        y = next_fun(*args, **kwargs)
        kernel = mod.variables["params"]["kernel"]
        is_conv = isinstance(mod, QConv)
        found.append(LayerInfo(
            name=layer_name(mod), kind="conv" if is_conv else "dense",
            kernel_shape=tuple(kernel.shape),
            strides=mod.strides if is_conv else 1, padding=mod.pad if is_conv else 0,
            groups=mod.groups if is_conv else 1, act=mod.act, rep=bool(getattr(mod, "rep", False)),
            use_bias=mod.use_bias, in_shape=tuple(x.shape), out_shape=tuple(y.shape),
            input_from=produced.get(id(x)), index=len(found),
            is_output=bool(getattr(mod, "is_output", False))))
        produced[id(y)] = found[-1].name
        alive.append(y)  # keep y alive so its id() cannot be reused by another tensor
        return y

    def run(v, x):
        with nn.intercept_methods(interceptor):
            return model.apply(v, x)

    try:
        jax.eval_shape(run, variables, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    except Exception as e:  # flax shape errors are long; name what the user controls
        raise ValueError(
            f"the model cannot run on inputs of shape {tuple(input_shape)} (NHWC): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    names = [l.name for l in found]
    if len(set(names)) != len(names):
        raise ValueError("a quantizable layer is called more than once; shared layers are not supported")
    if not found:
        raise ValueError("the model has no QConv/QDense layers to quantize")
    for l in found:
        if l.kind == "conv" and (l.out_shape[1] < 1 or l.out_shape[2] < 1):
            raise ValueError(f"layer {l.name}: input of shape {tuple(input_shape)} is too small "
                             f"(its output would be {l.out_shape})")
    return found
