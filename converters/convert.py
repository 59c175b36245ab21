"""PyTorch ``state_dict`` (RepVGG / MobileOne, several dialects) -> Flax variables.

``convert_state_dict(state_dict, arch=None, *, num_classes=None) -> ConvertResult``:

* the input is an unwrapped flat ``{name: array}`` (OIHW conv weights, ``[out, in]`` linear);
  ``*.num_batches_tracked`` entries are ignored;
* the form (``"train"`` multi-branch, or ``"deploy"`` fused) and the dialect (RepVGG:
  ``dingxiaoh``/``timm``; MobileOne: ``apple``/``timm``; see :mod:`converters.repvgg`,
  :mod:`converters.mobileone`) are detected from the stem's key;
* ``arch`` (a :func:`cfws_jax.models.list_models` name) is inferred when omitted, from the
  block names, conv shapes, SE and (train form) identity branches; a tie (e.g. deploy-form
  ``repvgg_a0`` vs ``repvgg_a0_cifar``, which then differ only in strides) is broken by the
  classifier size matching the architecture's default, else a ValueError lists the candidates;
* the expected keys come from the Flax model itself (``jax.eval_shape`` of
  ``create_model(arch, deploy=form == "deploy", num_classes)``); missing keys, unexpected keys and
  shape mismatches are all reported by name in one ValueError;
* values are cast to float32; conv weights OIHW -> HWIO (``transpose(2, 3, 1, 0)``), linear
  ``[out, in]`` -> ``[in, out]``; BN ``weight``/``bias`` -> params ``scale``/``bias``,
  ``running_mean``/``running_var`` -> batch_stats ``mean``/``var``.

``ConvertResult.variables`` is ``{"params", "batch_stats"}`` (train) or ``{"params"}`` (deploy),
ready for ``create_model(arch, deploy=form == "deploy", num_classes).apply``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from cfws_jax.models import registry
from converters import mobileone, repvgg, yolov6
from converters.common import LEAF_TO_TORCH, ConvertResult, flax_shapes, to_flax, torch_shape

__all__ = ["ConvertResult", "convert_state_dict", "key_table"]

FAMILIES = {"repvgg": repvgg, "mobileone": mobileone}
FORMS = ("train", "deploy")


def key_table(arch: str, form: str, dialect: str, num_classes: int | None = None) -> dict:
    """``{torch key: (flax path tuple, torch shape)}`` expected for ``arch`` in ``form``/``dialect``."""
    fam = FAMILIES[registry.family(arch)]
    to_torch = fam.DIALECTS[dialect]
    table = {}
    for path, shape in flax_shapes(arch, form == "deploy", num_classes).items():
        col, *mod, leaf = path
        table[f"{to_torch(tuple(mod))}.{LEAF_TO_TORCH[col, leaf]}"] = (path, torch_shape(shape))
    return table


def _kernel_key(fam, dialect: str, block: str, sub: tuple[str, ...]) -> str:
    return fam.DIALECTS[dialect]((block, *sub)) + ".weight"


def _detect_forms(family: str, keys) -> list[tuple[str, str, str]]:
    """``(family, dialect, form)`` whose stem main-kernel key is present."""
    fam = FAMILIES[family]
    return [
        (family, d, f)
        for d in fam.DIALECTS
        for f in FORMS
        if _kernel_key(fam, d, "stage0", fam.MAIN_KERNEL[f]) in keys
    ]


def _matches(arch: str, dialect: str, form: str, sd: Mapping[str, Any]) -> bool:
    """Cheap structural check: every block's main kernel present with its shape, no other block."""
    fam = FAMILIES[registry.family(arch)]
    main = fam.MAIN_KERNEL[form]
    expected = set()
    for b in registry.block_specs(arch):
        key = _kernel_key(fam, dialect, b.name, main)
        want = (b.cout, b.cin // b.groups, b.kernel, b.kernel)
        if key not in sd or tuple(np.shape(sd[key])) != want:
            return False
        if (_kernel_key(fam, dialect, b.name, fam.SE_PATH) in sd) != b.se:
            return False
        if form == "train" and (_kernel_key(fam, dialect, b.name, fam.IDENTITY_PATH) in sd) != b.identity:
            return False
        expected.add(key)
    stem = fam.DIALECTS[dialect](("stage0",))
    suffix = _kernel_key(fam, dialect, "stage0", main)[len(stem):]  # e.g. ".rbr_dense.conv.weight"
    return {k for k in sd if k.endswith(suffix)} == expected


def _num_classes(arch: str, dialect: str, sd: Mapping[str, Any]) -> int | None:
    key = FAMILIES[registry.family(arch)].DIALECTS[dialect](("linear",)) + ".weight"
    return int(np.shape(sd[key])[0]) if key in sd and np.ndim(sd[key]) == 2 else None


def _infer(sd: Mapping[str, Any], arch: str | None) -> tuple[str, str, str]:
    """``(arch, dialect, form)`` for a state_dict; ValueError when none or several fit."""
    families = [registry.family(arch)] if arch is not None else list(FAMILIES)
    forms = [c for fam in families for c in _detect_forms(fam, sd)]
    if not forms:
        stems = sorted(
            {_kernel_key(FAMILIES[f], d, "stage0", FAMILIES[f].MAIN_KERNEL[m]) for f in families
             for d in FAMILIES[f].DIALECTS for m in FORMS}
        )
        raise ValueError(
            "cannot recognise the checkpoint dialect: none of the stem keys "
            f"{stems} is present (first keys: {sorted(sd)[:5]})"
        )
    if arch is not None:
        if len(forms) > 1:
            raise ValueError(f"{arch}: checkpoint mixes dialects/forms {[(d, f) for _, d, f in forms]}")
        return arch, forms[0][1], forms[0][2]
    cands = [
        (a, d, f)
        for fam, d, f in forms
        for a in registry.list_models()
        if registry.family(a) == fam and _matches(a, d, f, sd)
    ]
    if len(cands) > 1:
        best = [c for c in cands if _num_classes(c[0], c[1], sd) == registry.get_config(c[0]).num_classes]
        cands = best if len(best) == 1 else cands
    if len(cands) == 1:
        return cands[0]
    if not cands:
        stem = [f"{k} {tuple(np.shape(sd[k]))}" for fam, d, f in forms
                 for k in [_kernel_key(FAMILIES[fam], d, "stage0", FAMILIES[fam].MAIN_KERNEL[f])] if k in sd]
        raise ValueError(
            f"cannot infer the architecture: the keys look like {[(fam, d, f) for fam, d, f in forms]} "
            f"(stem {', '.join(stem) or '?'}; {len(sd)} keys) but no registered architecture has these blocks "
            f"and shapes; pass --arch (one of {registry.list_models()})"
        )
    raise ValueError(
        f"ambiguous architecture: candidates {sorted(a for a, _, _ in cands)} all fit the keys and "
        "shapes; pass --arch explicitly"
    )


def convert_state_dict(
    state_dict: Mapping[str, Any], arch: str | None = None, *, num_classes: int | None = None,
    pickled_classes: Mapping[str, str] | None = None,
) -> ConvertResult:
    """Map a PyTorch ``state_dict`` to Flax variables (see the module docstring).

    YOLOv6 detectors (``arch`` a yolov6 name / size alias, or YOLOv6 keys) go to
    :func:`converters.yolov6.convert_yolov6`, with ``pickled_classes`` (``{module path: class}``
    of a pickled module tree, ``StateDictSource.pickled_classes``) telling variants whose keys agree.
    """
    if yolov6.is_yolov6_arch(arch) or (arch is None and yolov6.looks_like_yolov6(state_dict)):
        return yolov6.convert_yolov6(state_dict, arch, num_classes=num_classes, pickled_classes=pickled_classes)
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    if arch is not None:
        registry.get_config(arch)  # clear error for unknown names
    arch, dialect, form = _infer(sd, arch)
    if num_classes is None:
        num_classes = _num_classes(arch, dialect, sd)
    table = key_table(arch, form, dialect, num_classes)
    missing = sorted(set(table) - set(sd))
    unexpected = sorted(set(sd) - set(table))
    mismatched = [
        f"{k}: got {tuple(np.shape(sd[k]))}, expected {table[k][1]}"
        for k in sorted(set(table) & set(sd))
        if tuple(np.shape(sd[k])) != table[k][1]
    ]
    if missing or unexpected or mismatched:
        parts = [f"state_dict does not fit {arch} ({form} form, {dialect} keys)"]
        problems = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        for title, items in problems:
            if items:
                parts.append(f"{title} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}")
        try:  # which architecture the keys and shapes do fit, if any
            fits = _infer(sd, None)[0]
        except ValueError:
            fits = None
        if fits is not None and fits != arch:
            parts.append(f"the keys and shapes fit {fits}: pass --arch {fits}")
        raise ValueError("; ".join(parts))
    flat = {path: to_flax(sd[k]) for k, (path, _) in table.items()}
    variables = traverse_util.unflatten_dict(flat)
    return ConvertResult(arch, form, dialect, variables)
