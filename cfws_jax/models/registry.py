"""Registry of architecture names (timm spelling) -> Flax modules.

``create_model(name, deploy=False, num_classes=None)`` (``name`` may also be a
``RepVGGConfig`` / ``MobileOneConfig`` / ``YOLOv6Config`` for custom sizes) returns an unbound Flax
module whose ``__call__(x, train=False)`` maps NHWC images ``[B, H, W, 3]`` to logits
``[B, classes]`` (classifiers) or to the decoded detections ``[B, N, 5 + nc]`` (family ``"yolov6"``,
see :mod:`cfws_jax.models.yolov6.model`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from cfws_jax.models import mobileone, repvgg, yolov6

_FAMILIES = {
    **{name: ("repvgg", cfg) for name, cfg in repvgg.REPVGG_CONFIGS.items()},
    **{name: ("mobileone", cfg) for name, cfg in mobileone.MOBILEONE_CONFIGS.items()},
    **{name: ("yolov6", cfg) for name, cfg in yolov6.YOLOV6_CONFIGS.items()},
}


def list_models() -> list[str]:
    """All registered architecture names, sorted."""
    return sorted(_FAMILIES)


def get_config(name: str):
    """The frozen architecture config of ``name`` (ValueError listing known names if unknown)."""
    try:
        return _FAMILIES[name][1]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(list_models())}") from None


def _resolve(arch):
    """(family, config) of an architecture name or of a config object."""
    if isinstance(arch, repvgg.RepVGGConfig):
        return "repvgg", arch
    if isinstance(arch, mobileone.MobileOneConfig):
        return "mobileone", arch
    if isinstance(arch, yolov6.YOLOv6Config):
        return "yolov6", arch
    cfg = get_config(arch)
    return _FAMILIES[arch][0], cfg


def canonical_arch(name: str, recorded: str | None = None) -> str:
    """The registry name for ``name``: ``name`` itself if registered; for a size alias such as
    ``yolov6s`` (not a registry entry) the ``recorded`` name when it is ``name + "_v<k>"`` and
    registered (e.g. the version found in a checkpoint); ValueError otherwise."""
    if name in _FAMILIES:
        return name
    if recorded is not None and recorded in _FAMILIES:
        suffix = recorded[len(name):] if recorded.startswith(name) else ""
        if len(suffix) > 2 and suffix[:2] == "_v" and suffix[2:].isdigit():
            return recorded
    versions = sorted(n for n in _FAMILIES if n.startswith(name + "_v"))
    if versions:
        raise ValueError(
            f"architecture {name!r} is an alias of {', '.join(versions)}: the version could not be "
            f"determined (recorded: {recorded!r})"
        )
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join(list_models())}")


def family(arch) -> str:
    """``"repvgg"``, ``"mobileone"`` or ``"yolov6"`` for a name or a config."""
    return _resolve(arch)[0]


def block_specs(arch) -> list:
    """The :class:`~cfws_jax.models.blocks.BlockSpec` list of a name or config."""
    fam, cfg = _resolve(arch)
    if fam == "yolov6":
        raise ValueError(f"block_specs: {arch} is a YOLOv6 detector, not a RepVGG / MobileOne classifier")
    return (repvgg if fam == "repvgg" else mobileone).block_specs(cfg)


def create_model(arch, deploy: bool = False, num_classes: int | None = None) -> nn.Module:
    """Flax module for ``arch`` (a registry name or a config) in train or deploy (fused) form."""
    fam, cfg = _resolve(arch)
    if num_classes is not None:
        cfg = dataclasses.replace(cfg, num_classes=int(num_classes))
    if fam == "repvgg":
        return repvgg.RepVGG(cfg, deploy=deploy)
    if fam == "yolov6":
        return yolov6.YOLOv6(cfg, deploy=deploy)
    return mobileone.MobileOne(cfg, deploy=deploy)
