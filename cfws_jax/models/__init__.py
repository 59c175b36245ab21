"""Flax model zoo: RepVGG, MobileOne and YOLOv6 (family ``"yolov6"``) in train (multi-branch) and deploy (fused) forms.

``create_model(name, deploy=False, num_classes=None)``, ``list_models()``, ``get_config(name)``
and ``fuse(name, train_variables) -> deploy_variables``.
"""

from cfws_jax.models.fuse import fuse
from cfws_jax.models.registry import (
    block_specs,
    canonical_arch,
    create_model,
    family,
    get_config,
    list_models,
)

__all__ = ["block_specs", "canonical_arch", "create_model", "family", "fuse", "get_config", "list_models"]
