"""Unwrapping of checkpoint containers into a flat ``{PyTorch name: np.ndarray}`` state dict.

Rules (FORMATS.md §1):

* A mapping whose values are all arrays is a bare state dict.
* Otherwise the first key of :data:`CONTAINER_KEYS` present with a non-None value is entered,
  in this precedence: ``ema`` (the EMA weights, which YOLOv6-style trainers evaluate),
  ``state_dict``, ``model``; repeated while nested (e.g. ``model`` -> ``state_dict``). An
  explicit ``container_key`` overrides the first step.
* A pickled ``nn.Module`` record (a :class:`converters.torch_reader.PickledObject` of a class the
  caller allowed, see ``module_classes``) is walked through ``_parameters``, persistent
  ``_buffers`` and ``_modules``. Nothing else is walked: a plain (Ordered)dict yields its items
  only, whatever attributes a pickle gave it (as ``torch.load(weights_only=True)``).
* A leading ``module.`` (DataParallel) is stripped when every key carries it.
* ``num_batches_tracked`` entries are ignored (reported in ``ignored``); nothing else is dropped:
  a non-array value raises ``ValueError`` naming its key.
* For a pickled module tree the class of every module is reported by path
  (``Unwrapped.pickled_classes``, :func:`pickled_classes`): some checkpoints differ only there
  (YOLOv6 v2.0 ``l`` vs ``l_base``, QARepVGG V1 vs V2).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from converters.errors import short_repr
from converters.safe_pickle import PickledObject

CONTAINER_KEYS = ("ema", "state_dict", "model")
"""Container keys tried, in precedence order."""

IGNORED_SUFFIX = "num_batches_tracked"
DATA_PARALLEL_PREFIX = "module."
_MAX_DEPTH = 8


class Unwrapped(NamedTuple):
    state_dict: dict[str, np.ndarray]
    container: str | None          # e.g. "ema" or "model/state_dict"; None for a bare state dict
    stripped_prefix: str | None    # "module." when stripped
    ignored: tuple[str, ...]       # original names of the ignored num_batches_tracked entries
    pickled_classes: dict[str, str] = {}  # {module path: class name} of a pickled module tree (see
    #                                        pickled_classes); empty for a plain state dict


_MAX_MODULE_DEPTH = 64


def _is_module(obj: Any) -> bool:
    return isinstance(obj, PickledObject) and "_parameters" in vars(obj) and "_modules" in vars(obj)


def _named(mapping: Any, what: str) -> list[tuple[str, Any]]:
    if mapping is None:
        return []
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise ValueError(f"{what} is a {type(mapping).__name__}, not a dict of names")
    return list(mapping.items())


def _walk_modules(module: Any, prefix: str = ""):
    """``(path prefix, module record)`` of an inert pickled ``nn.Module`` tree, depth-first in
    ``_modules`` order like torch (the root first, prefix ``""``); at most 64 levels of submodules."""
    todo = [(module, prefix, 0)]
    while todo:
        mod, pre, depth = todo.pop()
        if depth > _MAX_MODULE_DEPTH:
            raise ValueError(f"modules nested deeper than {_MAX_MODULE_DEPTH} levels at {short_repr(pre)}")
        yield pre, mod
        children = []
        for name, child in _named(vars(mod).get("_modules"), f"{pre}_modules"):
            if child is None:
                continue
            if not _is_module(child):
                raise ValueError(f"submodule {short_repr(pre + name)} is a {type(child).__name__}, "
                                 "not an allowed module record")
            children.append((child, pre + name + ".", depth + 1))
        todo.extend(reversed(children))


def module_state_dict(module: Any, prefix: str = "") -> dict[str, Any]:
    """``state_dict()`` of an inert pickled ``nn.Module`` tree (parameters, persistent buffers).

    Iterative, depth-first in ``_modules`` order like torch; at most 64 levels of submodules.
    """
    out: dict[str, Any] = {}
    for pre, mod in _walk_modules(module, prefix):
        state = vars(mod)
        for name, value in _named(state.get("_parameters"), f"{pre}_parameters"):
            if value is not None:
                out[pre + name] = value
        skip = state.get("_non_persistent_buffers_set") or ()
        if not isinstance(skip, (set, frozenset, list, tuple)):
            raise ValueError(f"{pre}_non_persistent_buffers_set is a {type(skip).__name__}")
        for name, value in _named(state.get("_buffers"), f"{pre}_buffers"):
            if value is not None and name not in skip:
                out[pre + name] = value
    return out


def pickled_classes(module: Any) -> dict[str, str]:
    """``{module path: pickled class name}`` of an inert pickled ``nn.Module`` tree, in
    ``state_dict`` order; the root's path is ``""`` (e.g. ``{"": "yolov6.models.yolo.Model",
    "backbone.stem": "yolov6.layers.common.RepVGGBlock", ...}``)."""
    return {pre[:-1]: mod.pickled_global for pre, mod in _walk_modules(module)}


def _is_ignored(key: str) -> bool:
    return key == IGNORED_SUFFIX or key.endswith("." + IGNORED_SUFFIX)


def _check_flat(mapping: Mapping) -> str | None:
    """None if ``mapping`` is a flat ``{str: array}``; else a description of the first offender."""
    if not mapping:
        return "it is empty"
    for k, v in mapping.items():
        if not isinstance(k, str):
            return f"key {short_repr(k)} is not a string"
        if not isinstance(v, np.ndarray):
            return f"key {short_repr(k)} holds a {type(v).__name__}, not a tensor"
    return None


def unwrap_state_dict(obj: Any, *, container_key: str | None = None) -> Unwrapped:
    """Flat state dict from a loaded checkpoint object (see the module docstring for the rules)."""
    path: list[str] = []
    classes: dict[str, str] = {}
    if container_key is not None:
        if not isinstance(obj, Mapping) or obj.get(container_key) is None:
            keys = short_repr(sorted(map(short_repr, obj)), 200) if isinstance(obj, Mapping) \
                else type(obj).__name__
            raise ValueError(f"container key {container_key!r} not found (or None); top level: {keys}")
        obj, path = obj[container_key], [container_key]
    for _ in range(_MAX_DEPTH):
        if _is_module(obj):
            classes = pickled_classes(obj)
            obj = module_state_dict(obj)
            break
        if not isinstance(obj, Mapping):
            where = "/".join(path) or "top level"
            raise ValueError(f"{where}: expected a state dict or container, got {type(obj).__name__}")
        problem = _check_flat(obj)
        if problem is None:
            break
        nxt = next((k for k in CONTAINER_KEYS if obj.get(k) is not None), None)
        if nxt is None:
            where = "/".join(path) or "top level"
            raise ValueError(f"{where} is not a state dict ({problem}) and has none of the container "
                             f"keys {list(CONTAINER_KEYS)}; keys: {short_repr(sorted(map(short_repr, obj))[:20], 200)}")
        obj = obj[nxt]
        path.append(nxt)
    else:
        raise ValueError(f"containers nested deeper than {_MAX_DEPTH} levels: {'/'.join(path)}")
    problem = _check_flat(obj)
    if problem is not None:
        raise ValueError(f"{'/'.join(path) or 'state dict'}: {problem}")

    ignored = tuple(k for k in obj if _is_ignored(k))
    kept = {k: v for k, v in obj.items() if not _is_ignored(k)}
    stripped = None
    if kept and all(k.startswith(DATA_PARALLEL_PREFIX) for k in kept):
        kept = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in kept.items()}
        stripped = DATA_PARALLEL_PREFIX
        classes = {_strip_module(p): c for p, c in classes.items()}
    if not kept:
        raise ValueError(f"{'/'.join(path) or 'state dict'} holds only {IGNORED_SUFFIX} entries")
    return Unwrapped(kept, "/".join(path) or None, stripped, ignored, classes)


def _strip_module(path: str) -> str:
    """A module path without its DataParallel ``module`` component (the wrapper itself -> ``""``)."""
    head = DATA_PARALLEL_PREFIX[:-1]
    return "" if path == head else path[len(DATA_PARALLEL_PREFIX):] if path.startswith(DATA_PARALLEL_PREFIX) else path
