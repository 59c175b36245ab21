"""MobileOne key maps: Flax module path -> PyTorch module name, per checkpoint dialect.

Flax names (see :mod:`cfws_jax.models.mobileone`): ``stage0``, ``stage{k}_{m}``, and inside a
block ``rbr_conv_{i}/{conv,bn}``, ``rbr_scale/{conv,bn}``, ``rbr_skip``, ``reparam_conv``,
``se/{reduce,expand}``; head ``linear``.

Dialects (FORMATS.md §3.1, §3.3):

* ``apple`` (apple/ml-mobileone): ``stage0``, ``stage{k}.{m}``, ``rbr_conv.{i}``, the Flax
  names otherwise unchanged (``stage2.3.rbr_scale.bn``, ``stage4.0.se.reduce``, ``linear``);
* ``timm`` (``byobnet``): ``stem``, ``stages.{k-1}.{m}``, ``conv_kxk.{i}``, ``conv_scale``,
  ``identity``, ``reparam_conv``, ``attn.fc1``/``attn.fc2``, ``head.fc``.
"""

from __future__ import annotations

import re

from converters.naming import original_path, timm_path

FAMILY = "mobileone"
_BRANCH = re.compile(r"^rbr_conv_(\d+)$")

_TIMM_PARTS = {"rbr_scale": "conv_scale", "rbr_skip": "identity", "se": "attn", "reduce": "fc1", "expand": "fc2"}


def _branch(part: str, name: str) -> str:
    m = _BRANCH.match(part)
    return f"{name}.{m.group(1)}" if m else part


def _apple(path: tuple[str, ...]) -> str:
    return original_path(path, lambda p: _branch(p, "rbr_conv"))


def _timm(path: tuple[str, ...]) -> str:
    return timm_path(path, lambda p: _TIMM_PARTS.get(p, _branch(p, "conv_kxk")))


DIALECTS = {"apple": _apple, "timm": _timm}
"""dialect -> function mapping a Flax module path (tuple of names) to the PyTorch module name."""

MAIN_KERNEL = {"train": ("rbr_conv_0", "conv"), "deploy": ("reparam_conv",)}
"""form -> module path, inside a block, of the conv whose weight identifies the block."""

SE_PATH = ("se", "reduce")
IDENTITY_PATH = ("rbr_skip",)  # train form only
