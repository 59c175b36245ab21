"""YOLOv6 train-form -> deploy-form variables (FORMATS.md §4.8), pure ``jnp`` (jittable).

Walks the train ``params`` tree (``batch_stats`` alongside):

* a RepVGGBlock node (has ``rbr_dense``) -> ``{"rbr_reparam": {kernel [3, 3, I, O], bias}}`` via
  :func:`cfws_jax.fusion.fuse_yolov6_repvgg_block` (eps 1e-3);
* a Conv+BN node (exactly ``conv`` + ``bn``) -> ``{"conv": {kernel, bias}}`` via
  :func:`cfws_jax.fusion.fold_bn` (eps 1e-3);
* a plain conv (``kernel`` leaf: pred convs, ``upsample_transpose``) is copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cfws_jax import fusion
from cfws_jax.models.yolov6.blocks import BN_EPS


def _get(tree, key: str, where: str):
    try:
        return tree[key]
    except (KeyError, TypeError):
        raise ValueError(f"fuse: missing variable {where}/{key}") from None


def _bn(p: Mapping, s: Mapping, where: str) -> fusion.BN:
    return fusion.BN(_get(p, "scale", where), _get(p, "bias", where), _get(s, "mean", where), _get(s, "var", where))


def _conv_bn(p: Mapping, s: Mapping, where: str):
    kernel = _get(_get(p, "conv", where), "kernel", f"{where}/conv")
    return kernel, _bn(_get(p, "bn", where), _get(s, "bn", where), f"{where}/bn")


def _fuse_node(p: Mapping, s: Mapping, where: str) -> dict:
    if "rbr_dense" in p:
        extra = sorted(set(p) - {"rbr_dense", "rbr_1x1", "rbr_identity"})
        if extra:
            raise ValueError(f"fuse: unexpected modules {extra} in RepVGG block {where}")
        dense = _conv_bn(_get(p, "rbr_dense", where), _get(s, "rbr_dense", where), f"{where}/rbr_dense")
        one = _conv_bn(_get(p, "rbr_1x1", where), _get(s, "rbr_1x1", where), f"{where}/rbr_1x1")
        ident = None
        if "rbr_identity" in p:
            ident = _bn(p["rbr_identity"], _get(s, "rbr_identity", where), f"{where}/rbr_identity")
        kernel, bias = fusion.fuse_yolov6_repvgg_block(dense, one, ident, eps=BN_EPS, name=where)
        return {"rbr_reparam": {"kernel": kernel, "bias": bias}}
    if set(p) == {"conv", "bn"}:
        if "bias" in p["conv"]:
            raise ValueError(f"fuse: {where}/conv has a bias; expected a bias-free train-form conv")
        kernel, bias = fusion.fold_bn(*_conv_bn(p, s, where), BN_EPS)
        return {"conv": {"kernel": kernel, "bias": bias}}
    if "kernel" in p:
        return dict(p)
    if not isinstance(p, Mapping) or not p:
        raise ValueError(f"fuse: unexpected variable {where}")
    return {k: _fuse_node(v, s.get(k, {}) if isinstance(s, Mapping) else {}, f"{where}/{k}" if where else k)
            for k, v in p.items()}


def fuse_yolov6(variables: Mapping[str, Any], name: str = "yolov6") -> dict:
    """Train-form ``{"params", "batch_stats"}`` of a :class:`YOLOv6` -> deploy-form ``{"params"}``.

    Raises ValueError naming the first missing or unexpected variable (``name`` labels the model).
    """
    params, stats = variables["params"], variables.get("batch_stats", {})
    extra = sorted(set(params) - {"backbone", "neck", "detect"})
    if extra:
        raise ValueError(f"fuse({name}): unexpected modules in params: {extra}")
    return {"params": _fuse_node(params, stats, "")}
