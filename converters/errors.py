"""Error type and value quoting shared by every checkpoint reader module.

:class:`CheckpointError` is the one exception the readers raise for files they refuse
(:mod:`converters.safe_pickle`, :mod:`converters.torch_reader`,
:mod:`converters.safetensors_reader`, :mod:`converters.containers`); :func:`short_repr` quotes a
value from a hostile file in an error message without expanding it. No imports of other
``converters`` modules (so no import cycles).
"""

from __future__ import annotations

import reprlib
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint file could not be read safely (refused global, corrupt, truncated or hostile data)."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 40, 40, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, never expanding big or deep values."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
