"""RepVGG key maps: Flax module path -> PyTorch module name, per checkpoint dialect.

Flax names (see :mod:`cfws_jax.models.repvgg`): ``stage0``, ``stage{k}_{j}``, and inside a block
``rbr_dense/{conv,bn}``, ``rbr_1x1/{conv,bn}``, ``rbr_identity``, ``rbr_reparam``,
``se/{down,up}``; head ``linear``.

Dialects (FORMATS.md §2.3, §2.6):

* ``dingxiaoh`` (original DingXiaoH/RepVGG): ``stage0``, ``stage{k}.{j}``, the Flax names
  otherwise unchanged (``stage1.0.rbr_dense.conv``, ``stage0.se.down``, ``linear``);
* ``timm`` (``byobnet``): ``stem``, ``stages.{k-1}.{j}``, ``conv_kxk``, ``conv_1x1``,
  ``identity``, ``reparam_conv``, ``attn.fc1``/``attn.fc2``, ``head.fc``.
"""

from __future__ import annotations

from converters.naming import original_path, timm_path

FAMILY = "repvgg"

_TIMM_PARTS = {
    "rbr_dense": "conv_kxk",
    "rbr_1x1": "conv_1x1",
    "rbr_identity": "identity",
    "rbr_reparam": "reparam_conv",
    "se": "attn",
    "down": "fc1",
    "up": "fc2",
}


def _dingxiaoh(path: tuple[str, ...]) -> str:
    return original_path(path)


def _timm(path: tuple[str, ...]) -> str:
    return timm_path(path, lambda p: _TIMM_PARTS.get(p, p))


DIALECTS = {"dingxiaoh": _dingxiaoh, "timm": _timm}
"""dialect -> function mapping a Flax module path (tuple of names) to the PyTorch module name."""

MAIN_KERNEL = {"train": ("rbr_dense", "conv"), "deploy": ("rbr_reparam",)}
"""form -> module path, inside a block, of the conv whose weight identifies the block."""

SE_PATH = ("se", "down")
IDENTITY_PATH = ("rbr_identity",)  # train form only
