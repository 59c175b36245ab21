"""Discover a model's quantizable layers and where its activation quantizers go.

A *layer* is every :class:`~cfws_jax.models.layers.QConv` / ``QDense`` call, named by its Flax
module path (``stage1_0/rbr_reparam``). A *quantization point* is a tensor that gets a
per-tensor activation quantizer:

* ``<layer>:out`` after every layer except the last one (whose output is the network output);
* ``<layer>:in`` before a layer whose input is not the quantized output of another layer
  (the network input, the output of a pooling, an SE product, a residual sum, ...).

Discovery traces the model once with ``jax.eval_shape`` and tracks which tensors are layer
outputs by object identity, so no model needs annotations beyond using QConv/QDense.
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


def layer_name(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


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
            input_from=produced.get(id(x)), index=len(found)))
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
