"""Checks of the learned-rounding options, shared by :class:`cfws_jax.ptq.config.QuantConfig`
(``recon_*`` fields) and :class:`cfws_jax.ptq.adaround.ReconConfig` (one home for both; this
module imports nothing from either)."""

from __future__ import annotations

from typing import Any

RECON_LOSSES = ("mse", "mae")

_RULES = {  # role -> (holds, what it must be)
    "iters": (lambda v: v >= 0, ">= 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "reg_weight": (lambda v: v >= 0, ">= 0"),
    "loss": (lambda v: v in RECON_LOSSES, f"one of {RECON_LOSSES}"),
    "qdrop": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
}


def check_recon(owner: str, **fields: tuple[str, Any]) -> None:
    """One-line ValueError ``"{owner}.{field} must be ..., got ..."`` for the first option out of range.

    ``fields``: role (``iters``, ``batch_size``, ``lr``, ``reg_weight``, ``loss``, ``qdrop``) ->
    ``(the owner's field name, value)``; roles not given are not checked.
    """
    unknown = sorted(set(fields) - set(_RULES))
    if unknown:
        raise TypeError(f"check_recon: unknown roles {unknown}")
    for role, (field, value) in fields.items():
        holds, want = _RULES[role]
        if not holds(value):
            raise ValueError(f"{owner}.{field} must be {want}, got {value!r}")
