"""YOLOv6 train-form -> deploy-form variables (FORMATS.md §4.8; LARGE §4.17.2; QA §4.24), pure
``jnp`` (jittable).

Walks the train ``params`` tree (``batch_stats`` alongside):

* a RepVGGBlock node (``rbr_dense`` + ``rbr_1x1/{conv,bn}`` [+ ``rbr_identity``]) ->
  ``{"rbr_reparam": {kernel [3, 3, I, O], bias}}`` via :func:`cfws_jax.fusion.fuse_yolov6_repvgg_block`;
* a QARepVGG node (``rbr_dense`` + bare ``rbr_1x1/kernel`` + ``bn`` = BN_post) -> the same
  ``rbr_reparam``, fully folded (QA §4.24 steps 1-5) via :func:`cfws_jax.fusion.fuse_qarepvgg_block`.
  Identity (and, V2, the 1/9 average-pool kernel) is added iff I == O and the block is not a
  stride-2 one (``stem``, ``ERBlock_k_0``); V1 vs V2 comes from ``config.block`` (the variables
  cannot tell, QA §4.27);
* a Conv+BN node (exactly ``conv`` + ``bn``; the conv may carry a bias: ConvWrapper basic blocks)
  -> ``{"conv": {kernel, bias}}`` via :func:`cfws_jax.fusion.fold_bn`;
* a BottleRep's ``alpha`` ``[1]`` is copied (it scales the block input and cannot fold, LARGE §4.17.2);
* a plain conv (``kernel`` leaf: pred convs, ``upsample_transpose``) is copied.

BN eps is 1e-3 everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cfws_jax import fusion
from cfws_jax.models.yolov6.blocks import BN_EPS

_STRIDE2 = re.compile(r"(^|/)(stem|ERBlock_\d+_0)$")


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


def _check_keys(p: Mapping, allowed: set, what: str, where: str) -> None:
    extra = sorted(set(p) - allowed)
    if extra:
        raise ValueError(f"fuse: unexpected modules {extra} in {what} {where}")


def _fuse_qa(p: Mapping, s: Mapping, where: str, qa_avg: bool | None) -> dict:
    _check_keys(p, {"rbr_dense", "rbr_1x1", "bn"}, "QARepVGG block", where)
    if qa_avg is None:
        raise ValueError(f"fuse: {where} is a QARepVGG block; pass the config (V1 or V2 cannot be told from the variables)")
    dense = _conv_bn(_get(p, "rbr_dense", where), _get(s, "rbr_dense", where), f"{where}/rbr_dense")
    w1 = _get(_get(p, "rbr_1x1", where), "kernel", f"{where}/rbr_1x1")
    post = _bn(_get(p, "bn", where), _get(s, "bn", where), f"{where}/bn")
    ident = dense[0].shape[2] == dense[0].shape[3] and not _STRIDE2.search(where)
    kernel, bias = fusion.fuse_qarepvgg_block(dense, w1, ident, post, eps=BN_EPS, avg_pool=ident and qa_avg, name=where)
    return {"rbr_reparam": {"kernel": kernel, "bias": bias}}


def _fuse_node(p: Mapping, s: Mapping, where: str, qa_avg: bool | None) -> dict:
    if "rbr_dense" in p and "bn" in p:
        return _fuse_qa(p, s, where, qa_avg)
    if "rbr_dense" in p:
        _check_keys(p, {"rbr_dense", "rbr_1x1", "rbr_identity"}, "RepVGG block", where)
        dense = _conv_bn(_get(p, "rbr_dense", where), _get(s, "rbr_dense", where), f"{where}/rbr_dense")
        one = _conv_bn(_get(p, "rbr_1x1", where), _get(s, "rbr_1x1", where), f"{where}/rbr_1x1")
        ident = None
        if "rbr_identity" in p:
            ident = _bn(p["rbr_identity"], _get(s, "rbr_identity", where), f"{where}/rbr_identity")
        kernel, bias = fusion.fuse_yolov6_repvgg_block(dense, one, ident, eps=BN_EPS, name=where)
        return {"rbr_reparam": {"kernel": kernel, "bias": bias}}
    if set(p) == {"conv", "bn"}:
        kernel, bn = _conv_bn(p, s, where)
        kernel, bias = fusion.fold_bn(kernel, bn, BN_EPS, bias=p["conv"].get("bias"))
        return {"conv": {"kernel": kernel, "bias": bias}}
    if "kernel" in p:
        return dict(p)
    if not isinstance(p, Mapping) or not p:
        raise ValueError(f"fuse: unexpected variable {where}")
    out = {}
    for k, v in p.items():
        sub = f"{where}/{k}" if where else k
        if k == "alpha":
            if getattr(v, "shape", None) != (1,):
                raise ValueError(f"fuse: {sub} must have shape (1,), got {getattr(v, 'shape', type(v).__name__)}")
            out[k] = v
        else:
            out[k] = _fuse_node(v, s.get(k, {}) if isinstance(s, Mapping) else {}, sub, qa_avg)
    return out


def fuse_yolov6(variables: Mapping[str, Any], name: str = "yolov6", config=None) -> dict:
    """Train-form ``{"params", "batch_stats"}`` of a :class:`YOLOv6` -> deploy-form ``{"params"}``.

    ``config`` (a :class:`~cfws_jax.models.yolov6.config.YOLOv6Config`) is needed only for
    QARepVGG models (V1 or V2). Raises ValueError naming the first missing or unexpected variable
    (``name`` labels the model).
    """
    params, stats = variables["params"], variables.get("batch_stats", {})
    extra = sorted(set(params) - {"backbone", "neck", "detect"})
    if extra:
        raise ValueError(f"fuse({name}): unexpected modules in params: {extra}")
    qa_avg = None if config is None or not config.block.startswith("qarepvgg") else config.block == "qarepvggv2"
    return {"params": _fuse_node(params, stats, "", qa_avg)}
