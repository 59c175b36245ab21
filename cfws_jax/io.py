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


class OutputError(ValueError):
    """An output path that cannot be written safely: a symbolic link or a file where a folder
    belongs, a folder holding files this library did not write, an existing output without
    ``overwrite``, an unwritable parent. The message names the path (and the flag when known)."""


MANIFEST_KEY = "files"  # in cfws_jax.json: every file the library wrote (relative, '/'-separated)
TMP_TAG = ".cfws-tmp-"  # hidden sibling ``.NAME.cfws-tmp-XXXX`` a writer fills before the rename
OLD_TAG = ".cfws-old-"  # hidden sibling holding the old output while it is replaced (no RENAME_EXCHANGE)
KILL_ENV = "CFWS_JAX_TEST_KILL_AT"  # test hook: SIGKILL this process at the named write step


def _crash_point(name: str) -> None:
    """Kill the process here when ``$CFWS_JAX_TEST_KILL_AT == name`` (crash-consistency tests)."""
    if os.environ.get(KILL_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _label(path: str, flag: str | None) -> str:
    return f"{flag} {path}" if flag else path


def _list_files(directory: str) -> list[str]:
    """Every non-directory entry under ``directory`` (symlinks not followed), relative, '/'-joined."""
    out = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        rel = os.path.relpath(root, directory)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            out.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(out)


def _owned_files(directory: str) -> list[str] | None:
    """Files of ``directory`` this library wrote (manifest of its cfws_jax.json), or None when
    it is not a cfws_jax checkpoint. Checkpoints written before the manifest existed own
    ``cfws_jax.json`` and everything under ``orbax/``."""
    try:
        with open(os.path.join(directory, META_FILE)) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    files = doc.get(MANIFEST_KEY)
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return sorted(set(files) | {META_FILE})
    orbax = os.path.join(directory, ORBAX_DIR)
    legacy = [f"{ORBAX_DIR}/{f}" for f in _list_files(orbax)] if os.path.isdir(orbax) else []
    return sorted(set(legacy) | {META_FILE})


def _check_parent(path: str, label: str) -> None:
    parent = os.path.dirname(path)
    while parent and not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    parent = parent or os.sep
    if not os.path.isdir(parent):
        raise OutputError(f"{label}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{label}: cannot write in {parent} (permission denied)")


def _probe(path: str, label: str) -> None:
    """OutputError for a path the file system refuses to even look up (name too long, loop, ...)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OutputError(f"{label}: {e.strerror or e}") from None
    if len(os.path.basename(path).encode()) > 200:  # room for the temporary sibling's suffix
        raise OutputError(f"{label}: the name is too long (at most 200 bytes)")


def check_output_dir(directory: str | os.PathLike, *, overwrite: bool = False, flag: str | None = "--out") -> str:
    """Validate an output folder before any work starts; the absolute path, or OutputError.

    Accepted: a path that does not exist (its nearest existing ancestor a writable folder), an
    empty folder, or with ``overwrite`` a cfws_jax checkpoint holding only the files its
    manifest lists. Refused: a symbolic link, a file, a non-empty folder without ``overwrite``,
    a folder holding anything this library did not write.
    """
    directory = os.path.abspath(os.fspath(directory))
    label = _label(directory, flag)
    _probe(directory, label)
    if os.path.islink(directory):
        raise OutputError(f"{label} is a symbolic link; give the real folder")
    if os.path.lexists(directory):
        if not os.path.isdir(directory):
            raise OutputError(f"{label} exists and is a file, not a folder")
        try:
            present = _list_files(directory)
            entries = os.listdir(directory)
        except OSError as e:
            raise OutputError(f"{label}: cannot list the folder ({e.strerror or e})") from None
        if entries:
            owned = _owned_files(directory)
            if owned is None:
                raise OutputError(f"{label} is a non-empty folder that is not a cfws_jax checkpoint; "
                                  "refusing to touch it (choose a new folder)")
            if not overwrite:
                raise OutputError(f"{label} already exists and holds a cfws_jax checkpoint (add --overwrite to replace it)")
            foreign = sorted(set(present) - set(owned))
            foreign_dirs = [e for e in entries if e not in {p.split("/")[0] for p in present}]
            if foreign or foreign_dirs:
                extra = foreign + [d + "/" for d in foreign_dirs]
                raise OutputError(f"{label} holds {len(extra)} file(s) cfws_jax did not write "
                                  f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}); "
                                  "refusing to replace it (move them or choose a new folder)")
        if not os.access(directory, os.W_OK | os.X_OK) or not os.access(os.path.dirname(directory), os.W_OK):
            raise OutputError(f"{label}: permission denied")
        return directory
    _check_parent(directory, label)
    return directory


def check_output_file(path: str | os.PathLike, *, overwrite: bool = False, flag: str | None = None,
                      suffixes: tuple[str, ...] | None = None) -> str:
    """Validate an output file before any work starts; the absolute path, or OutputError.

    Refused: a symbolic link, a folder, an existing file without ``overwrite``, a name not
    ending in one of ``suffixes``, an unwritable parent.
    """
    path = os.path.abspath(os.fspath(path))
    label = _label(path, flag)
    _probe(path, label)
    if suffixes and not path.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise OutputError(f"{label}: use a {' or '.join(suffixes)} file name")
    if os.path.islink(path):
        raise OutputError(f"{label} is a symbolic link; give a plain file name")
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise OutputError(f"{label} exists and is not a regular file")
        if not overwrite:
            raise OutputError(f"{label} already exists (add --overwrite to replace it)")
    _check_parent(path, label)
    return path


def _temp_sibling(path: str, tag: str = TMP_TAG) -> str:
    import tempfile

    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{name}{tag}{os.getpid()}-", dir=parent)


def write_file_atomic(path: str | os.PathLike, data: str | bytes, *, overwrite: bool = False,
                      flag: str | None = None, suffixes: tuple[str, ...] | None = None) -> str:
    """Write ``data`` to a hidden temporary file beside ``path``, then rename it over ``path``.

    Readers see the old file or the complete new one, never a partial file (also under SIGKILL).
    Checks as :func:`check_output_file`. Returns the absolute path.
    """
    import tempfile

    path = check_output_file(path, overwrite=overwrite, flag=flag, suffixes=suffixes)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}{TMP_TAG}{os.getpid()}-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            _crash_point("file_written")
            os.fsync(fh.fileno())
        check_output_file(path, overwrite=overwrite, flag=flag)  # again: it may have appeared meanwhile
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _crash_point("file_replaced")
    return path


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False when unsupported."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), b)


def _remove_owned(directory: str, owned: list[str]) -> list[str]:
    """Delete the listed files of ``directory`` and the folders that held them, once empty;
    the entries left behind (not ours), which keep ``directory`` in place."""
    for rel in owned:
        p = os.path.join(directory, *rel.split("/"))
        if os.path.islink(p) or os.path.isfile(p):
            os.unlink(p)
    dirs = sorted({os.path.join(directory, *rel.split("/")[:i]) for rel in owned
                   for i in range(1, rel.count("/") + 1)}, key=len, reverse=True)
    for d in dirs + [directory]:
        try:
            os.rmdir(d)
        except OSError:
            pass
    return _list_files(directory) if os.path.lexists(directory) else []


def _commit_dir(tmp: str, directory: str, overwrite: bool, flag: str | None) -> None:
    """Move the finished folder ``tmp`` to ``directory``; an old checkpoint there is swapped out
    atomically and then only its manifest files are removed."""
    check_output_dir(directory, overwrite=overwrite, flag=flag)  # again, right before replacing
    if not os.path.lexists(directory) or not os.listdir(directory):
        os.rename(tmp, directory)  # a missing or empty folder: plain atomic rename
        _crash_point("renamed")
        return
    owned = _owned_files(directory) or []
    if _exchange(tmp, directory):
        old = tmp  # the old checkpoint now lives at the temporary name
        _crash_point("swapped")
    else:  # no atomic swap here: park the old one under a hidden name for the instant between renames
        old = _temp_sibling(directory, OLD_TAG)
        os.rmdir(old)
        os.rename(directory, old)
        _crash_point("parked")
        os.rename(tmp, directory)
        _crash_point("swapped")
    left = _remove_owned(old, owned)
    if left:
        import warnings

        warnings.warn(f"kept {old}: it holds {left[:5]}, which cfws_jax did not write")


def save_variables(directory: str | os.PathLike, variables: Mapping[str, Any], metadata: Mapping[str, Any],
                   *, overwrite: bool = False, flag: str | None = None) -> str:
    """Write ``variables`` (nested dicts of arrays) and JSON ``metadata`` to ``directory``.

    ``metadata`` must be JSON-serialisable (e.g. arch, form, source file); the cfws_jax version
    is added, and the list of written files (``cfws_jax.json`` ``"files"``). The checkpoint is
    written into a hidden sibling folder and renamed into place when complete, so a crash
    leaves the old output intact or the new one complete. An existing folder is an error
    unless it is empty, or ``overwrite=True`` and it is a cfws_jax checkpoint holding nothing
    but what its manifest lists (:func:`check_output_dir`, :class:`OutputError`); only those
    files are removed. ``flag`` names the option in messages. Returns the absolute path.
    """
    import orbax.checkpoint as ocp

    import cfws_jax

    directory = check_output_dir(directory, overwrite=overwrite, flag=flag)
    arrays, struct = _to_numpy_tree(variables, "")
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "cfws_jax_version": cfws_jax.__version__,
           "metadata": dict(metadata), "tree": struct}
    try:
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata for {directory} is not JSON-serialisable: {e}") from None
    tmp = _temp_sibling(directory)
    try:
        _crash_point("tmp_created")
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        ckptr.save(os.path.join(tmp, ORBAX_DIR), args=ocp.args.PyTreeSave(_drop_empty_leaves(arrays)))
        ckptr.close()
        _crash_point("orbax_written")
        doc[MANIFEST_KEY] = _list_files(tmp)
        with open(os.path.join(tmp, META_FILE), "w") as fh:  # written last: marks completion
            fh.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        _crash_point("meta_written")
        _commit_dir(tmp, directory, overwrite, flag)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _crash_point("committed")
    return directory


def folder_kind(directory: str | os.PathLike) -> str | None:
    """``"quantized_model"`` (written by ``cfws-jax ptq``), ``"variables"`` (``cfws-jax convert``)
    or None (not a cfws_jax checkpoint), from the folder's ``cfws_jax.json``."""
    try:
        with open(os.path.join(os.fspath(directory), META_FILE)) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    meta = doc.get("metadata")
    return "quantized_model" if isinstance(meta, dict) and meta.get("kind") == "quantized_model" else "variables"


def read_metadata(directory: str | os.PathLike) -> dict:
    """The full JSON document of a cfws_jax checkpoint (``format``, ``metadata``, ``tree``, ...)."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        if os.path.isfile(directory):
            raise ValueError(f"{directory} is a file, not a cfws_jax checkpoint folder (a PyTorch or "
                             "safetensors file must first go through cfws-jax convert)")
        parent, name = os.path.split(directory)
        parked = sorted(f for f in (os.listdir(parent) if os.path.isdir(parent) else ())
                        if f.startswith(f".{name}{OLD_TAG}"))
        hint = f" (an interrupted --overwrite left the old one at {os.path.join(parent, parked[-1])})" \
            if parked else ""
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist{hint}")
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{directory} is not a cfws_jax checkpoint (no {META_FILE})")
    try:
        with open(meta_path) as fh:
            doc = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: corrupt JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{meta_path}: cannot read ({e.strerror or e})") from None
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
