"""Module-path naming shared by the key maps: Flax block names <-> PyTorch prefixes.

Flax blocks are ``stage0`` and ``stage{k}_{j}``; the original PyTorch code names them
``stage0`` / ``stage{k}.{j}``, timm ``stem`` / ``stages.{k-1}.{j}`` and ``head.fc``.
"""

from __future__ import annotations

import re
from typing import Callable

BLOCK = re.compile(r"^stage(\d+)_(\d+)$")


def original_path(path: tuple[str, ...], part: Callable[[str], str] = lambda p: p) -> str:
    """``("stage1_0", "rbr_dense", "conv")`` -> ``"stage1.0.rbr_dense.conv"`` (parts mapped by ``part``)."""
    head, *rest = path
    m = BLOCK.match(head)
    head = f"stage{m.group(1)}.{m.group(2)}" if m else head
    return ".".join([head, *(part(p) for p in rest)])


def timm_path(path: tuple[str, ...], part: Callable[[str], str]) -> str:
    """``("stage1_0", ...)`` -> ``"stages.0.0..."``; ``stage0`` -> ``stem``; ``linear`` -> ``head.fc``."""
    head, *rest = path
    if head == "linear":
        return "head.fc"
    m = BLOCK.match(head)
    head = "stem" if head == "stage0" else f"stages.{int(m.group(1)) - 1}.{m.group(2)}"
    return ".".join([head, *(part(p) for p in rest)])
