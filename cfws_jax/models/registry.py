"""Registry of architecture names (timm spelling) -> Flax modules.

``create_model(name, deploy=False, num_classes=None)`` (``name`` may also be a
``RepVGGConfig`` / ``MobileOneConfig`` for custom sizes) returns an unbound Flax module whose
``__call__(x, train=False)`` maps NHWC images ``[B, H, W, 3]`` to logits ``[B, classes]``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from cfws_jax.models import mobileone, repvgg

_FAMILIES = {
    **{name: ("repvgg", cfg) for name, cfg in repvgg.REPVGG_CONFIGS.items()},
    **{name: ("mobileone", cfg) for name, cfg in mobileone.MOBILEONE_CONFIGS.items()},
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
    cfg = get_config(arch)
    return _FAMILIES[arch][0], cfg


def family(arch) -> str:
    """``"repvgg"`` or ``"mobileone"`` for a name or a config."""
    return _resolve(arch)[0]


def block_specs(arch) -> list:
    """The :class:`~cfws_jax.models.blocks.BlockSpec` list of a name or config."""
    fam, cfg = _resolve(arch)
    return (repvgg if fam == "repvgg" else mobileone).block_specs(cfg)


def create_model(arch, deploy: bool = False, num_classes: int | None = None) -> nn.Module:
    """Flax module for ``arch`` (a registry name or a config) in train or deploy (fused) form."""
    fam, cfg = _resolve(arch)
    if num_classes is not None:
        cfg = dataclasses.replace(cfg, num_classes=int(num_classes))
    if fam == "repvgg":
        return repvgg.RepVGG(cfg, deploy=deploy)
    return mobileone.MobileOne(cfg, deploy=deploy)
