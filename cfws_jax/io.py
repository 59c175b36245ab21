"""Saving and restoring variable pytrees (Flax variables, quantized models) with orbax.

On-disk layout of a checkpoint directory ``DIR``::

    DIR/cfws_jax.json   {"format": "cfws_jax.variables", "format_version": 1,
                         "cfws_jax_version": ..., "metadata": {...user...},
                         "tree": nested dicts mirroring the variables, each leaf
                                 {"dtype": str, "shape": [int, ...]}}
    DIR/orbax/          orbax-checkpoint PyTree checkpoint of the same nested dicts

The variables are nested ``dict``\\ s with string keys (no ``.`` in a key: orbax joins paths with
dots) and array leaves of any dtype (``np.ndarray``, ``jax.Array`` or numpy scalars, including
int8 and bfloat16). They are stored as NumPy arrays and restored as NumPy arrays, bit-identical,
with empty sub-dicts preserved (zero-size arrays, which orbax refuses, live in the JSON only). Array layouts are whatever the caller stored (Flax: HWIO kernels).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Mapping

import numpy as np

FORMAT = "cfws_jax.variables"
FORMAT_VERSION = 1
META_FILE = "cfws_jax.json"
ORBAX_DIR = "orbax"


def _to_numpy_tree(tree: Any, path: str) -> tuple[dict, dict]:
    """(numpy tree, JSON structure) of a nested dict of arrays; ValueError naming a bad path."""
    if isinstance(tree, Mapping):
        arrays, struct = {}, {}
        for k, v in tree.items():
            if not isinstance(k, str) or not k or "." in k:
                raise ValueError(f"variables key {k!r} at {path or '/'} must be a non-empty string "
                                 "without '.'")
            arrays[k], struct[k] = _to_numpy_tree(v, f"{path}/{k}")
        return arrays, struct
    if isinstance(tree, np.generic) or isinstance(tree, np.ndarray) or hasattr(tree, "__array__") \
            and hasattr(tree, "dtype") and hasattr(tree, "shape"):
        arr = np.asarray(tree)
        if arr.dtype.hasobject:
            raise ValueError(f"variables leaf {path} has object dtype")
        return arr, {"dtype": arr.dtype.name, "shape": list(arr.shape)}
    raise ValueError(f"variables leaf {path or '/'} is a {type(tree).__name__}; only nested dicts of "
                     "arrays are supported (put scalars and strings in metadata)")


def _drop_empty_leaves(tree: Any) -> Any:
    """``tree`` without zero-size arrays (orbax refuses them; the JSON ``tree`` records them)."""
    if isinstance(tree, dict):
        return {k: _drop_empty_leaves(v) for k, v in tree.items()
                if isinstance(v, dict) or v.size}
    return tree


def _dtype(name: str) -> np.dtype:
    import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with NumPy)

    return np.dtype(name)


def _is_leaf_spec(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"dtype", "shape"} and isinstance(node["shape"], list)


def _is_cfws_checkpoint(directory: str) -> bool:
    try:
        with open(os.path.join(directory, META_FILE)) as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_variables(directory: str | os.PathLike, variables: Mapping[str, Any], metadata: Mapping[str, Any],
                   *, overwrite: bool = False) -> str:
    """Write ``variables`` (nested dicts of arrays) and JSON ``metadata`` to ``directory``.

    ``metadata`` must be JSON-serialisable (e.g. arch, form, source file); the cfws_jax version
    is added. An existing directory is an error unless ``overwrite=True`` and it is empty or a
    cfws_jax checkpoint (never removes anything else). Returns the absolute directory path.
    """
    import orbax.checkpoint as ocp

    import cfws_jax

    directory = os.path.abspath(os.fspath(directory))
    arrays, struct = _to_numpy_tree(variables, "")
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "cfws_jax_version": cfws_jax.__version__,
           "metadata": dict(metadata), "tree": struct}
    try:
        text = json.dumps(doc, indent=1, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"metadata for {directory} is not JSON-serialisable: {e}") from None
    if os.path.lexists(directory):
        if not os.path.isdir(directory):
            raise ValueError(f"{directory} exists and is not a directory")
        if os.listdir(directory):
            if not overwrite:
                raise ValueError(f"{directory} already exists and is not empty (use overwrite)")
            if not _is_cfws_checkpoint(directory):
                raise ValueError(f"refusing to overwrite {directory}: it is not a cfws_jax checkpoint")
            shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    ckptr.save(os.path.join(directory, ORBAX_DIR), args=ocp.args.PyTreeSave(_drop_empty_leaves(arrays)))
    ckptr.close()
    with open(os.path.join(directory, META_FILE), "w") as fh:  # written last: marks completion
        fh.write(text + "\n")
    return directory


def read_metadata(directory: str | os.PathLike) -> dict:
    """The full JSON document of a cfws_jax checkpoint (``format``, ``metadata``, ``tree``, ...)."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{directory} is not a cfws_jax checkpoint (no {META_FILE})")
    try:
        with open(meta_path) as fh:
            doc = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: corrupt JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a cfws_jax checkpoint (format is "
                         f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: unsupported format_version {doc.get('format_version')!r}")
    return doc


def load_variables(directory: str | os.PathLike) -> tuple[dict, dict]:
    """``(variables, metadata)`` saved by :func:`save_variables`; leaves are NumPy arrays.

    ``metadata`` is the user metadata plus ``cfws_jax_version`` (the writer's version).
    """
    import jax
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    doc = read_metadata(directory)
    struct = doc["tree"]
    orbax_path = os.path.join(directory, ORBAX_DIR)
    if not os.path.isdir(orbax_path):
        raise ValueError(f"{directory}: orbax data folder {ORBAX_DIR!r} is missing")

    def restore_args(node):
        if _is_leaf_spec(node):
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return {k: restore_args(v) for k, v in node.items()
                if not (_is_leaf_spec(v) and math.prod(v["shape"]) == 0)}

    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        restored = ckptr.restore(orbax_path, args=ocp.args.PyTreeRestore(restore_args=restore_args(struct)))
    except Exception as e:  # orbax raises many types for damaged data
        raise ValueError(f"{directory}: could not restore the orbax data ({type(e).__name__}: {e})") from None
    finally:
        ckptr.close()

    def rebuild(node, got, path):
        if _is_leaf_spec(node) and math.prod(node["shape"]) == 0:
            return np.zeros(node["shape"], _dtype(node["dtype"]))
        if _is_leaf_spec(node):
            arr = np.asarray(jax.device_get(got)) if got is not None else None
            if arr is None or arr.dtype.name != node["dtype"] or list(arr.shape) != node["shape"]:
                desc = None if arr is None else (arr.dtype.name, list(arr.shape))
                raise ValueError(f"{directory}: leaf {path} restored as {desc}, expected "
                                 f"({node['dtype']}, {node['shape']})")
            return arr
        if not isinstance(got, Mapping):
            got = {}
        return {k: rebuild(v, got.get(k), f"{path}/{k}") for k, v in node.items()}

    variables = rebuild(struct, restored, "")
    metadata = dict(doc.get("metadata") or {})
    metadata.setdefault("cfws_jax_version", doc.get("cfws_jax_version"))
    return variables, metadata
