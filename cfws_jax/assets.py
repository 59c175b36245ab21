"""Flat ``.npz`` form of variable trees, and the models shipped inside the package.

A variables tree ``{"params": {...}, "batch_stats": {...}}`` is stored as one ``.npz`` whose keys
are the ``/``-joined paths (``params/stage0/rbr_dense/conv/kernel``). Loading uses
``allow_pickle=False``: no code runs from an asset file.

A model may carry a *model card*: a small JSON object of the same stem beside its ``.npz``
(``yolov6n_scenes_train.npz`` -> ``yolov6n_scenes_train.json``) recording what the weights alone
do not say, e.g. the synthetic-scene settings a detector was trained on
(:mod:`cfws_jax.demo_detect` reads its ``"scenes"``). :func:`read_model_card` /
:func:`write_model_card`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

SHIPPED_MODELS = {
    # name -> (architecture, file in cfws_jax/assets, form)
    "repvgg_a0_cifar": ("repvgg_a0_cifar", "repvgg_a0_cifar_train.npz", "train"),
    # YOLOv6n (v3.0, 10 classes) trained on synthetic CIFAR-10 scenes (issue 21); its model card
    # yolov6n_scenes_train.json records the scene settings (canvas, ...) it was trained with
    "yolov6n_scenes": ("yolov6n_v3", "yolov6n_scenes_train.npz", "train"),
}


def flatten_variables(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> ``{"a/b/c": np.ndarray}``."""
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if "/" in str(key):
            raise ValueError(f"variable name {path!r} contains '/', which the flat format reserves")
        if isinstance(value, dict) or hasattr(value, "items"):
            out.update(flatten_variables(value, path))
        else:
            out[path] = np.asarray(value)
    return out


def unflatten_variables(flat) -> dict:
    """``{"a/b/c": array}`` -> nested dict."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(value)
    return tree


def load_npz_variables(path) -> dict:
    """Read a flat ``.npz`` variables file (no pickles)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"variables file {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        return unflatten_variables({k: data[k] for k in data.files})


def shipped_path(name: str) -> Path:
    """Path of shipped model ``name``'s ``.npz`` (ValueError for an unknown name,
    FileNotFoundError when the file is not installed)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model {name!r}; shipped: {', '.join('shipped:' + n for n in sorted(SHIPPED_MODELS))}")
    path = ASSETS_DIR / SHIPPED_MODELS[name][1]
    if not path.exists():
        raise FileNotFoundError(f"shipped model file {path} is missing from this installation")
    return path


def load_shipped_model(name: str = "repvgg_a0_cifar"):
    """``(arch, variables, form)`` of a model shipped in ``cfws_jax/assets``."""
    path = shipped_path(name)
    arch, _, form = SHIPPED_MODELS[name]
    return arch, load_npz_variables(path), form


def model_card_path(npz_path) -> Path:
    """The model card of a variables file: the ``.json`` of the same stem beside it."""
    return Path(npz_path).with_suffix(".json")


def read_model_card(npz_path) -> dict:
    """The model card (a JSON object) of the variables file ``npz_path``; FileNotFoundError or
    ValueError (one line, naming the file) when it is missing or not a JSON object."""
    path = model_card_path(npz_path)
    if not path.is_file():
        raise FileNotFoundError(f"model card {path} (beside {Path(npz_path).name}) does not exist")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a JSON model card ({type(e).__name__}: {e})") from None
    if not isinstance(card, dict):
        raise ValueError(f"{path}: a model card must be a JSON object")
    return card


def write_model_card(npz_path, card: dict) -> Path:
    """Write ``card`` (JSON-serialisable) as the model card of ``npz_path``; returns its path."""
    path = model_card_path(npz_path)
    path.write_text(json.dumps(card, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_params(spec) -> tuple[dict, dict]:
    """``(variables, metadata)`` from an orbax directory written by ``cfws-jax convert`` or from
    ``shipped:NAME`` (a model shipped in the package, e.g. ``shipped:repvgg_a0_cifar``)."""
    spec = str(spec)
    if spec.startswith("shipped:"):
        arch, variables, form = load_shipped_model(spec[len("shipped:"):])
        return variables, {"arch": arch, "form": form, "source": spec}
    from cfws_jax import io

    if io.folder_kind(spec) == "quantized_model":
        raise ValueError(f"{spec} is a quantized model written by cfws-jax ptq, not float variables: "
                         "pass it as --quantized (eval), or give --params the folder cfws-jax convert wrote")
    return io.load_variables(spec)
