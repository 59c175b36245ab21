"""Train-form -> deploy-form variables: re-parameterize every block with :mod:`cfws_jax.fusion`.

``fuse(arch, variables)`` takes the multi-branch variables ``{"params", "batch_stats"}`` of
``create_model(arch)`` and returns ``{"params"}`` for ``create_model(arch, deploy=True)``:
each block's branches (HWIO kernels + BatchNorm) become one ``rbr_reparam`` (RepVGG) or
``reparam_conv`` (MobileOne) kernel ``[k, k, C/groups, O]`` and bias ``(O,)``; SE and ``linear``
params are copied. Pure ``jnp`` (jittable with ``arch`` static); BatchNorm eps 1e-5.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cfws_jax import fusion
from cfws_jax.models.blocks import BN_EPS
from cfws_jax.models.registry import block_specs, family, get_config
from cfws_jax.models.yolov6.fuse import fuse_yolov6


def _sub(tree: Mapping, key: str, where: str):
    try:
        return tree[key]
    except (KeyError, TypeError):
        raise ValueError(f"fuse: missing variable {where}/{key}") from None


def _bn(params: Mapping, stats: Mapping, where: str) -> fusion.BN:
    return fusion.BN(
        _sub(params, "scale", where), _sub(params, "bias", where),
        _sub(stats, "mean", where), _sub(stats, "var", where),
    )


def _conv_bn(params: Mapping, stats: Mapping, where: str):
    p, s = _sub(params, where.split("/")[-1], where), _sub(stats, where.split("/")[-1], where)
    kernel = _sub(_sub(p, "conv", where), "kernel", where + "/conv")
    return kernel, _bn(_sub(p, "bn", where), _sub(s, "bn", where), where + "/bn")


def _identity(params: Mapping, stats: Mapping, block: str, name: str) -> fusion.BN:
    return _bn(_sub(params, name, block), _sub(stats, name, block), f"{block}/{name}")


def fuse(arch, variables: Mapping[str, Any]) -> dict:
    """Fuse train-form ``{"params", "batch_stats"}`` of ``arch`` into deploy-form ``{"params"}``.

    ``arch``: a registry name or a ``RepVGGConfig`` / ``MobileOneConfig`` / ``YOLOv6Config``
    (YOLOv6: :func:`cfws_jax.models.yolov6.fuse.fuse_yolov6`, BN eps 1e-3).
    Raises ValueError naming the first missing variable, or listing unexpected top-level modules.
    """
    fam = family(arch)
    if fam == "yolov6":
        return fuse_yolov6(variables, name=str(arch), config=arch if not isinstance(arch, str) else get_config(arch))
    params, stats = variables["params"], variables.get("batch_stats", {})
    specs = block_specs(arch)
    extra = sorted(set(params) - {b.name for b in specs} - {"linear"})
    if extra:
        raise ValueError(f"fuse({arch}): unexpected modules in params: {extra}")
    out: dict = {}
    for b in specs:
        p, s = _sub(params, b.name, "params"), stats.get(b.name, {})
        if fam == "repvgg":
            dense = _conv_bn(p, s, f"{b.name}/rbr_dense")
            one = _conv_bn(p, s, f"{b.name}/rbr_1x1")
            ident = _identity(p, s, b.name, "rbr_identity") if b.identity else None
            kernel, bias = fusion.fuse_repvgg_block(dense, one, ident, groups=b.groups, eps=BN_EPS, name=b.name)
            block = {"rbr_reparam": {"kernel": kernel, "bias": bias}}
        else:
            kxk = [_conv_bn(p, s, f"{b.name}/rbr_conv_{i}") for i in range(b.branches)]
            scale = _conv_bn(p, s, f"{b.name}/rbr_scale") if b.scale else None
            ident = _identity(p, s, b.name, "rbr_skip") if b.identity else None
            kernel, bias = fusion.fuse_mobileone_block(kxk, scale, ident, groups=b.groups, eps=BN_EPS, name=b.name)
            block = {"reparam_conv": {"kernel": kernel, "bias": bias}}
        if b.se:
            block["se"] = _sub(p, "se", b.name)
        out[b.name] = block
    out["linear"] = _sub(params, "linear", "params")
    return {"params": out}
