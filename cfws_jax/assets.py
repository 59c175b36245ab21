"""Flat ``.npz`` form of variable trees, and the models shipped inside the package.

A variables tree ``{"params": {...}, "batch_stats": {...}}`` is stored as one ``.npz`` whose keys
are the ``/``-joined paths (``params/stage0/rbr_dense/conv/kernel``). Loading uses
``allow_pickle=False``: no code runs from an asset file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

SHIPPED_MODELS = {
    # name -> (architecture, file in cfws_jax/assets, form)
    "repvgg_a0_cifar": ("repvgg_a0_cifar", "repvgg_a0_cifar_train.npz", "train"),
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


def load_shipped_model(name: str = "repvgg_a0_cifar"):
    """``(arch, variables, form)`` of a model shipped in ``cfws_jax/assets``."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model {name!r}; shipped: {', '.join('shipped:' + n for n in sorted(SHIPPED_MODELS))}")
    arch, filename, form = SHIPPED_MODELS[name]
    path = ASSETS_DIR / filename
    if not path.exists():
        raise FileNotFoundError(f"shipped model file {path} is missing from this installation")
    return arch, load_npz_variables(path), form


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
