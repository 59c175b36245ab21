"""``quantize(...) -> QuantizedModel``, its jitted fake-quant forward, and orbax save / restore.

A :class:`QuantizedModel` is a pytree: ``layers`` (per layer: integer weight codes and scales,
two sets for CFWS layers, bias), ``act_amax`` (one per activation quantization point) and
``extra_params`` (the deploy form's float non-layer params, nested as in the params tree: a
YOLOv6 BottleRep's ``alpha`` ``[1]``; ``{}`` for most models) are leaves; the architecture name,
:class:`QuantConfig`, the :class:`Plan` and JSON metadata are static. It needs no float layer
parameters: the forward rebuilds the kernels from the codes.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from cfws_jax.ptq.calibrate import calibrate_parallel, calibrate_sequential, reusable_amax
from cfws_jax.ptq.config import QuantConfig
from cfws_jax.ptq.graph import discover_layers, non_layer_params
from cfws_jax.ptq.runtime import Plan, build_plan, forward_key, make_forward
from cfws_jax.ptq.weights import dequantize_layer, quantize_layer, split_kernels

FORMAT = "cfws_jax.quantized_model/1"


@struct.dataclass
class QuantizedModel:
    """Quantized weights + activation ranges of one model (a pytree; see module docstring)."""

    layers: dict
    act_amax: Any
    arch: str = struct.field(pytree_node=False)
    config: QuantConfig = struct.field(pytree_node=False)
    plan: Plan = struct.field(pytree_node=False)
    meta_json: str = struct.field(pytree_node=False, default="{}")
    extra_params: dict = struct.field(default_factory=dict)

    @property
    def meta(self) -> dict:
        return json.loads(self.meta_json)

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def dequantized_weights(self, as_jax: bool = False) -> dict[str, dict[str, Any]]:
        """``{layer: {"kernel", "bias"}}`` float32, rebuilt from the integer codes (NumPy, or
        device arrays with ``as_jax`` for the forward pass)."""
        split = self.config.cfws_branch_quant or self.config.int_bias
        out = {name: dequantize_layer({k: np.asarray(v) for k, v in q.items()}, split) for name, q in self.layers.items()}
        if as_jax:
            out = {n: {k: jnp.asarray(v) for k, v in w.items()} for n, w in out.items()}
        return out


def resolve_model(arch_or_model, variables, num_classes):
    """(arch name or None, deploy-form Flax module, deploy-form params)."""
    from cfws_jax.models import create_model, fuse

    if isinstance(arch_or_model, nn.Module):
        return getattr(arch_or_model, "name", None) or None, arch_or_model, variables["params"]
    arch = str(arch_or_model)
    if "batch_stats" in variables:  # train form: re-parameterize first
        variables = fuse(arch, variables)
    params = variables["params"]
    if num_classes is None:
        num_classes = params_num_classes(params)
    return arch, create_model(arch, deploy=True, num_classes=num_classes), params


def params_num_classes(params) -> int | None:
    """Class count of deploy-form params: the classifier's ``linear`` outputs, or a detector
    head's ``detect/cls_preds_0`` outputs; None when neither is present."""
    if "linear" in params:
        return int(np.shape(params["linear"]["kernel"])[-1])
    cls0 = params.get("detect", {}).get("cls_preds_0") if isinstance(params.get("detect"), Mapping) else None
    return int(np.shape(cls0["kernel"])[-1]) if cls0 is not None else None


def layer_params(params, name: str) -> Mapping:
    node = params
    for part in name.split("/"):
        if part not in node:
            raise ValueError(f"params have no entry for layer {name!r} (missing {part!r})")
        node = node[part]
    return node


def _stack_batches(calibration_batches) -> list[jnp.ndarray]:
    batches = [jnp.asarray(b, jnp.float32) for b in calibration_batches]
    batches = [b for b in batches if b.shape[0] > 0]
    if not batches:
        raise ValueError("empty calibration set: give at least one image")
    shapes = {tuple(b.shape[1:]) for b in batches}
    if len(shapes) != 1:
        raise ValueError(f"calibration batches have different image shapes: {sorted(shapes)}")
    for b in batches:
        if not np.all(np.isfinite(np.asarray(b))):
            raise ValueError("calibration images contain NaN or Inf")
    return batches


def quantize(arch_or_model, variables: Mapping, calibration_batches: Sequence, config: QuantConfig = QuantConfig(),
             *, num_classes: int | None = None, progress: bool = True, mesh=None,
             reuse: "QuantizedModel | None" = None) -> QuantizedModel:
    """Calibrate and quantize a model.

    Args:
      arch_or_model: a registry name (``"repvgg_a0"``) -- train-form variables are fused first --
        or a deploy-form Flax module built from QConv/QDense layers.
      variables: ``{"params": ...}`` (deploy) or ``{"params", "batch_stats"}`` (train form).
      calibration_batches: NHWC float32 image batches, preprocessed as for evaluation.
      config: a :class:`QuantConfig` (see ``cfws_jax.ptq.PRESETS``).
      mesh: a :func:`cfws_jax.parallel.local_mesh` (or a device count): calibration batches are
        sharded over its devices (data parallel; the result does not depend on the device count).

    With ``config.reconstruct`` / ``config.bias_correction`` the layers are then reconstructed /
    bias-corrected on the same images (:func:`cfws_jax.ptq.reconstruct.refine`, one device);
    per-layer statistics land in ``meta["reconstruction"]`` / ``meta["bias_correction"]``.

    ``reuse``: an earlier, unrefined result on the same model, images and config except
    ``float_layers`` (``--keep-float`` quantizes again with the most sensitive layers in float):
    the amax its calibration settled for points whose statistics cannot differ are taken as they
    are (:func:`cfws_jax.ptq.calibrate.reusable_amax`); the result is the same as without it.
    """
    batches = _stack_batches(calibration_batches)
    arch, model, params = resolve_model(arch_or_model, variables, num_classes)
    input_shape = (1, *batches[0].shape[1:])
    layers = discover_layers(model, {"params": params}, input_shape)
    plan = build_plan(layers, config)
    cle_meta = None
    if config.cle:  # issue #24: equalize the fused float weights; everything below sees them
        params, cle_meta = equalized_params(model, params, input_shape)

    float_w, q_layers = {}, {}
    for lp in plan.layers:
        p = layer_params(params, lp.info.name)
        float_w[lp.info.name] = {k: jnp.asarray(v, jnp.float32) for k, v in p.items() if k in ("kernel", "bias")}
        q_layers[lp.info.name] = quantize_layer(p["kernel"], p.get("bias"), lp.scheme, lp.w_bits, config)
    split = config.cfws_branch_quant or config.int_bias
    quant_w = {n: {k: jnp.asarray(v) for k, v in dequantize_layer(q, split).items()} for n, q in q_layers.items()}
    if split:  # the float network's split: the coarse codes and the float rest
        for n, q in q_layers.items():
            float_w[n].update({k: jnp.asarray(v) for k, v in split_kernels(q, float_w[n]["kernel"]).items()})

    extra = device_params(non_layer_params(params, plan.names))
    known = None
    if reuse is not None:
        if reuse.config.replace(float_layers=()) != config.replace(float_layers=(), reconstruct=False,
                                                                   bias_correction=False):
            raise ValueError("quantize(reuse=...): the earlier result must have the same config up to float_layers "
                             "and no reconstruction / bias correction")
        known = reusable_amax(reuse.plan, reuse.act_amax, plan, config.calib_order)
    if config.calib_order == "parallel":
        amax = calibrate_parallel(model, plan, float_w, batches, config, progress, mesh=mesh, known=known,
                                  extra_params=extra)
    else:
        amax = calibrate_sequential(model, plan, quant_w, batches, config, progress, mesh=mesh, known=known,
                                    extra_params=extra)

    n_cls = params_num_classes(params)
    meta = {"format": FORMAT, "num_classes": int(layers[-1].out_shape[-1]) if n_cls is None else n_cls,
            "input_shape": list(input_shape),
            "calibration": {"images": int(sum(b.shape[0] for b in batches)), "batches": len(batches),
                            "order": config.calib_order}}
    if cle_meta is not None:
        meta["cle"] = cle_meta
    if config.reconstruct or config.bias_correction:  # issue #14: learned rounding / bias correction
        from cfws_jax.ptq.reconstruct import refine

        q_layers, amax, refine_meta = refine(model, plan, float_w, q_layers, amax, batches, config, progress,
                                             extra_params=extra)
        meta.update(refine_meta)
    return QuantizedModel(layers=q_layers, act_amax=np.asarray(amax, np.float32), arch=arch or "",
                          config=config, plan=plan, meta_json=json.dumps(meta, sort_keys=True),
                          extra_params=host_params(extra))


def equalized_params(model: nn.Module, params, input_shape) -> tuple[dict, dict]:
    """``(params, stats)`` after :func:`cfws_jax.ptq.equalize.cross_layer_equalize` (deploy form)."""
    from cfws_jax.ptq.equalize import cross_layer_equalize

    return cross_layer_equalize(model, params, input_shape)


def float_params(qm: QuantizedModel, variables: Mapping, model: nn.Module | None = None) -> dict:
    """The deploy-form float params ``qm`` was quantized from: ``variables`` fused if in train
    form, then equalized when ``qm.config.cle`` (so layer outputs compare channel for channel)."""
    if "batch_stats" in variables and qm.arch:
        _, _, params = resolve_model(qm.arch, variables, qm.num_classes)
    else:
        params = variables["params"]
    if qm.config.cle:
        params, _ = equalized_params(model_for(qm, model), params, tuple(qm.meta["input_shape"]))
    return params


def model_for(qm: QuantizedModel, model: nn.Module | None):
    if model is not None:
        return model
    if not qm.arch:
        raise ValueError("this QuantizedModel was built from a bare module; pass that module as `model`")
    from cfws_jax.models import create_model

    return create_model(qm.arch, deploy=True, num_classes=qm.num_classes)


def quantized_apply_fn(qm: QuantizedModel, model: nn.Module | None = None, *, enabled=None):
    """``fn(images NHWC float32) -> logits`` simulating the quantized model (jitted).

    Returned as a ``jax.tree_util.Partial`` whose arguments carry the dequantized weights, so
    they are jit arguments rather than constants baked into the compiled program.
    """
    model = model_for(qm, model)
    weights = qm.dequantized_weights(as_jax=True)
    on = jnp.ones((len(qm.plan.points),), bool) if enabled is None else jnp.asarray(enabled, bool)
    return jax.tree_util.Partial(_logits_fn(model, forward_key(qm.plan)), weights, jnp.asarray(qm.act_amax),
                                 qm.plan.qmax(), on, device_params(qm.extra_params))


def host_params(tree) -> dict:
    """A nested dict of arrays (``QuantizedModel.extra_params``) as float32 NumPy arrays."""
    return jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), dict(tree or {}))


def device_params(tree) -> dict:
    """A nested dict of arrays (``QuantizedModel.extra_params``) as float32 device arrays, a jit
    argument of the forward passes (``{}`` stays ``{}``)."""
    return jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), dict(tree or {}))


@functools.lru_cache(maxsize=32)
def _logits_fn(model: nn.Module, key: Plan):
    """One jitted ``(weights, amax, qmax, enabled, extra_params, x) -> logits`` per model and plan structure."""
    fwd = make_forward(model, key)
    return jax.jit(lambda weights, amax, qmax, enabled, extra, x:
                   fwd(weights, amax, qmax, enabled, x, extra_params=extra)["logits"])


def nest_layers(layers: Mapping[str, Mapping]) -> dict:
    """``{"a/b": {leaf: array}}`` -> the nested ``{"a": {"b": {leaf: np.ndarray}}}`` (a Flax params tree)."""
    tree: dict = {}
    for name, arrays in layers.items():
        node = tree
        for part in name.split("/"):
            node = node.setdefault(part, {})
        node.update({k: np.asarray(v) for k, v in arrays.items()})
    return tree


def _unnest(tree: Mapping, names: Sequence[str]) -> dict:
    out = {}
    for name in names:
        node = tree
        for part in name.split("/"):
            node = node[part]
        out[name] = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
    return out


def save_quantized(qm: QuantizedModel, directory, *, overwrite: bool = False, flag: str | None = None) -> str:
    """Write ``qm`` with orbax (``cfws_jax.io`` layout): codes, scales, amax + JSON metadata.

    Atomic and manifest-checked like :func:`cfws_jax.io.save_variables` (``overwrite`` replaces
    only a folder cfws_jax wrote; ``flag`` names the CLI option in errors)."""
    from cfws_jax import io

    if not qm.arch:
        raise ValueError("only QuantizedModels of registry architectures can be saved (arch is empty)")
    meta = {"kind": "quantized_model", "arch": qm.arch, "config": qm.config.to_dict(),
            "layers": qm.plan.names, "points": [p.name for p in qm.plan.points],
            "schemes": {lp.info.name: lp.scheme for lp in qm.plan.layers}, **qm.meta}
    tree = {"layers": nest_layers(qm.layers), "act_amax": np.asarray(qm.act_amax, np.float32)}
    if qm.extra_params:  # absent (not empty) when the model has none: older files look the same
        tree["extra_params"] = host_params(qm.extra_params)
    return io.save_variables(directory, tree, meta, overwrite=overwrite, flag=flag)


def load_quantized(directory, arch: str | None = None) -> QuantizedModel:
    """Restore a :class:`QuantizedModel` saved by :func:`save_quantized`.

    ``arch``, if given, must match the recorded architecture. The plan is rebuilt from the
    architecture and config and checked against the recorded layer and point names.
    """
    from cfws_jax import io
    from cfws_jax.models import create_model

    if io.folder_kind(directory) == "variables":  # say so before restoring a large float checkpoint
        raise ValueError(f"{directory} holds float variables written by cfws-jax convert, not a quantized model: "
                         "pass it as --params (eval, ptq), or give --quantized the folder cfws-jax ptq wrote")
    tree, meta = io.load_variables(directory)
    if meta.get("kind") != "quantized_model":
        raise ValueError(f"{directory} is not a quantized model (it holds {meta.get('kind') or meta.get('form') or 'float variables'}); "
                         "use --params for float checkpoints")
    if arch is not None and arch != meta["arch"]:
        raise ValueError(f"{directory} holds a quantized {meta['arch']}, not {arch}")
    config = QuantConfig.from_dict(meta["config"])
    model = create_model(meta["arch"], deploy=True, num_classes=meta["num_classes"])
    names = list(meta["layers"])
    layers = _unnest(tree["layers"], names)
    extra = dict(tree.get("extra_params") or {})  # files written before extra params: none
    flat = {**traverse_util.flatten_dict(extra),  # layer shapes (and extra params) for discovery
            **traverse_util.flatten_dict(nest_layers({n: dequantize_layer(q) for n, q in layers.items()}))}
    try:
        plan = build_plan(discover_layers(model, {"params": traverse_util.unflatten_dict(flat)}, meta["input_shape"]),
                          config)
    except ValueError as e:
        if extra or not isinstance(e.__cause__, flax.errors.ScopeParamNotFoundError):
            raise
        raise ValueError(f"{directory}: the network reads parameters outside its conv layers (e.g. a BottleRep "
                         "alpha) that this file does not hold (written before cfws_jax stored them); "
                         "run cfws-jax ptq again") from None
    if plan.names != names or [p.name for p in plan.points] != list(meta["points"]):
        raise ValueError(f"{directory}: the recorded layers do not match architecture {meta['arch']} "
                         "(saved by a different cfws_jax version or edited)")
    keep = {k: meta[k] for k in ("format", "num_classes", "input_shape", "calibration", "reconstruction",
                                 "bias_correction", "refine_seconds", "cle") if k in meta}
    return QuantizedModel(layers=layers, act_amax=np.asarray(tree["act_amax"], np.float32), arch=meta["arch"],
                          config=config, plan=plan, meta_json=json.dumps(keep, sort_keys=True),
                          extra_params=host_params(extra))
