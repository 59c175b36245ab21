"""Safe reader of PyTorch checkpoint files: no torch needed, no code from the file executed.

Supported formats (detected from the file's bytes, not its name, :func:`detect_format`):

* ``torch.save`` zip format (PyTorch >= 1.6 default): ``<prefix>/data.pkl`` plus one raw
  record ``<prefix>/data/<key>`` per storage;
* ``torch.save`` legacy format (``_use_new_zipfile_serialization=False``): magic number,
  protocol and system-info pickles, the object pickle, the list of storage keys, then each
  storage as an int64 element count followed by its raw bytes;
* ``.safetensors`` (see :mod:`converters.safetensors_reader`) and ``.npz`` (``allow_pickle``
  off), for :func:`read_state_dict` / :func:`load_state_dict` only.

This module holds the file containers (format detection, zip members, legacy layout, ``.npz``),
the value checks (:func:`check_state_dict_values`) and the public API (:func:`load_torch_file`,
:func:`read_state_dict`, :func:`load_state_dict`). The pickles themselves are read by
:class:`converters.safe_pickle.SafeUnpickler`, whose ``find_class`` honours only an allow-list
(:data:`ALLOWED_GLOBALS`); any other global raises :class:`CheckpointError` naming it. Tensors
come back as C-contiguous NumPy arrays (PyTorch layouts, e.g. conv weights OIHW; copies, so views,
offsets and shared storages are resolved); ``bfloat16`` comes back as ``ml_dtypes.bfloat16``
(exact; ``np.asarray(x, np.float32)`` widens it).

Hostile files are refused with :class:`CheckpointError` before they can crash, hang or exhaust
the machine: the pickle limits of :mod:`converters.safe_pickle` (:data:`MAX_NESTING`,
:data:`MAX_KEY_ITEMS`, :data:`MAX_WORK` per file, :data:`MAX_EXPANDED_BYTES`), plus storages,
zip members or ``.npy`` arrays declaring more bytes than the file holds, ``data.pkl`` records
over :data:`MAX_PICKLE_BYTES` and compression ratios over :data:`MAX_COMPRESSION_RATIO`. Values
quoted in errors are cut short (:func:`short_repr`).

Whole pickled ``nn.Module`` objects (e.g. YOLOv6 releases) need their classes: pass
``module_classes=`` a set of exact dotted class names (e.g.
:data:`converters.module_classes.YOLOV6_MODULE_CLASSES`); those classes become inert
:class:`PickledObject` records (no constructor, no ``__setstate__`` of the real class runs) that
:func:`converters.containers.module_state_dict` walks. This is the safe way. The older
``stub_globals=("yolov6.", ...)`` keyword (prefixes) still works but stubs *every* class under
the prefixes; prefer ``module_classes``.

:class:`CheckpointError`, :func:`short_repr`, :class:`PickledObject`, :func:`check_nesting`,
:data:`ALLOWED_GLOBALS` and the pickle limits are re-exported here from
:mod:`converters.errors` / :mod:`converters.safe_pickle`.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from converters.containers import unwrap_state_dict
from converters.errors import CheckpointError, short_repr
from converters.safe_pickle import (
    ALLOWED_GLOBALS,
    MAX_EXPANDED_BYTES,
    MAX_KEY_ITEMS,
    MAX_NESTING,
    MAX_WORK,
    PENDING,
    Budget,
    PickledObject,
    SafeUnpickler,
    StorageType,
    as_dims,
    check_nesting,
)
from converters.safetensors_reader import load_safetensors

__all__ = [
    "ALLOWED_GLOBALS", "FORMATS", "KNOWN_INTEGER_BUFFERS", "MAX_COMPRESSION_RATIO", "MAX_EXPANDED_BYTES",
    "MAX_KEY_ITEMS", "MAX_NESTING", "MAX_PICKLE_BYTES", "MAX_WORK", "CheckpointError", "PickledObject",
    "StateDictSource", "check_nesting", "check_state_dict_values", "detect_format", "load_state_dict",
    "load_torch_file", "read_state_dict", "read_zip_member", "short_repr",
]

MAX_PICKLE_BYTES = 1 << 30
"""Largest ``data.pkl`` record accepted."""
MAX_COMPRESSION_RATIO = 200
"""Compressed zip members inflating more than this (and to more than 1 MiB) are refused."""
# MAX_WORK (re-exported) is looked up here each time a file's Budget is made, so patching
# ``converters.torch_reader.MAX_WORK`` bounds the readers below.


# ----------------------------------------------------------------------------- containers

def _frombuffer(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """1-D array of ``dtype`` over ``raw`` (byte-swapped per component when ``big_endian``)."""
    if not big_endian or dtype.itemsize == 1:
        return np.frombuffer(raw, dtype)
    comp = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    swapped = np.frombuffer(raw, np.uint8).reshape(-1, comp)[:, ::-1].copy()
    return swapped.reshape(-1).view(dtype)


def read_zip_member(zf: zipfile.ZipFile, name: str, limit: int | None = None) -> bytes:
    """Bytes of member ``name`` (at most ``limit``), checked before inflating anything.

    Refuses encrypted members, compression methods other than stored / deflate, and
    members whose declared size inflates more than :data:`MAX_COMPRESSION_RATIO` times.
    """
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CheckpointError(f"missing zip record {short_repr(name)}") from None
    if info.flag_bits & 0x1:
        raise CheckpointError(f"zip record {short_repr(name)} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(f"zip record {short_repr(name)} uses unsupported compression method "
                              f"{info.compress_type}")
    if (info.compress_type != zipfile.ZIP_STORED and info.file_size > 2**20
            and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size):
        raise CheckpointError(
            f"zip record {short_repr(name)} declares {info.file_size} bytes from {info.compress_size} "
            f"compressed (ratio > {MAX_COMPRESSION_RATIO}): refused as a decompression bomb")
    n = info.file_size if limit is None else min(limit, info.file_size)
    with zf.open(info) as fh:
        data = fh.read(n)
    if len(data) != n:
        raise CheckpointError(f"zip record {short_repr(name)} is truncated ({len(data)} of {n} bytes)")
    return data


def _read_zip(zf: zipfile.ZipFile, stub_globals, module_classes) -> Any:
    names = zf.namelist()
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError("TorchScript archive (torch.jit.save) is not supported; "
                              "save the model's state_dict with torch.save instead")
    pkls = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if not pkls:
        raise CheckpointError("zip file has no data.pkl record: not a torch.save checkpoint")
    prefix = pkls[0][: -len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in names:
        order = read_zip_member(zf, prefix + "byteorder", 16).decode("ascii", "replace").strip()
    if order not in ("little", "big"):
        raise CheckpointError(f"unknown byteorder record {short_repr(order)}")
    infos = {i.filename: i for i in zf.infolist()}
    storage_bytes = sum(i.file_size for n, i in infos.items() if n.startswith(prefix + "data/"))
    budget = Budget(storage_bytes, MAX_WORK)
    cache: dict[tuple[str, str], np.ndarray] = {}

    def load_storage(stype: StorageType, key: str, numel: int) -> np.ndarray:
        if (key, stype.name) not in cache:
            record = f"{prefix}data/{key}"
            if record not in infos:
                raise CheckpointError(f"missing storage record {short_repr(record)}")
            need = numel * stype.dtype.itemsize
            if infos[record].file_size < need:
                raise CheckpointError(f"storage record {short_repr(record)} has {infos[record].file_size} "
                                      f"bytes, expected {need} ({numel} x {stype.dtype})")
            raw = read_zip_member(zf, record, need)
            cache[(key, stype.name)] = _frombuffer(raw, stype.dtype, order == "big")
        return cache[(key, stype.name)]

    info = infos[pkls[0]]
    if info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{pkls[0]} declares {info.file_size} bytes (limit {MAX_PICKLE_BYTES})")
    data = read_zip_member(zf, pkls[0])
    obj = SafeUnpickler(io.BytesIO(data), load_storage, stub_globals,
                         module_classes=module_classes, budget=budget).load()
    check_nesting(obj)
    return obj


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _read_legacy(data: bytes, stub_globals, module_classes) -> Any:
    f = io.BytesIO(data)
    budget = Budget(len(data), MAX_WORK)

    def no_storage(*_):
        raise CheckpointError("unexpected storage in the legacy header")

    def header():
        return SafeUnpickler(f, no_storage, budget=budget).load()

    if header() != _LEGACY_MAGIC:
        raise CheckpointError("pickle file without the torch.save magic number: not a torch checkpoint")
    if header() != _LEGACY_PROTOCOL:
        raise CheckpointError("unsupported legacy torch.save protocol version")
    sys_info = header()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
        raise CheckpointError("legacy checkpoint written on a big-endian machine is not supported")
    start = f.tell()
    # Pass 1: learn each storage key's dtype and size (tensors are not built yet).
    seen: dict[str, tuple[np.dtype, int]] = {}

    def record(stype: StorageType, key: str, numel: int):
        seen.setdefault(key, (stype.dtype, numel))
        return PENDING

    stubs: dict = {}
    SafeUnpickler(f, record, stub_globals, stubs, module_classes, budget).load()
    keys = SafeUnpickler(f, no_storage, budget=budget).load()
    if not isinstance(keys, list):
        raise CheckpointError("legacy storage key list is missing")
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        if not isinstance(key, str) or key not in seen:
            raise CheckpointError(f"legacy storage {short_repr(key)} is not referenced by the pickle")
        dtype, numel = seen[key]
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"truncated before storage {key!r}")
        (count,) = struct.unpack("<q", head)
        left = len(data) - f.tell()
        if count < 0 or count * dtype.itemsize > left:
            raise CheckpointError(f"storage {key!r} declares {count} x {dtype} but only {left} bytes "
                                  "are left: truncated or corrupt")
        storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype)
    missing = set(seen) - set(storages)
    if missing:
        raise CheckpointError(f"legacy storages {short_repr(sorted(missing))} have no data")

    def lookup(stype: StorageType, key: str, numel: int):
        return storages[key]

    f.seek(start)
    budget.work = 0
    obj = SafeUnpickler(f, lookup, stub_globals, stubs, module_classes, budget).load()
    check_nesting(obj)
    return obj


# ----------------------------------------------------------------------------- public API

FORMATS = ("torch-zip", "torch-legacy", "safetensors", "npz")

_CAUGHT = (Exception,)  # every failure while parsing a file becomes one CheckpointError line


def _fail(path: str, what: str, e: BaseException) -> CheckpointError:
    if isinstance(e, CheckpointError):
        return CheckpointError(f"{path}: {e}")
    if isinstance(e, MemoryError):
        return CheckpointError(f"{path}: {what}: out of memory while reading (MemoryError)")
    return CheckpointError(f"{path}: {what} ({type(e).__name__}: {short_repr(str(e), 120)})")


def _open_error(path: str, e: OSError) -> Exception:
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(f"checkpoint file {path!r} does not exist")
    return CheckpointError(f"{path}: cannot read the file ({type(e).__name__}: {e.strerror or e})")


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`FORMATS`, from the file's leading bytes; :class:`CheckpointError` otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as e:
        raise _open_error(path, e) from None
    if not head:
        raise CheckpointError(f"{path}: file is empty")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except _CAUGHT as e:
            raise _fail(path, "corrupt or truncated zip archive", e) from None
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch-legacy"
    if len(head) >= 263 and head[257:262] == b"ustar":
        raise CheckpointError(f"{path}: tar-format torch checkpoint (PyTorch < 0.4) is not supported; "
                              "re-save it with a recent torch.save")
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + n <= size:
            return "safetensors"
    raise CheckpointError(f"{path}: unrecognised checkpoint format (expected a torch.save zip or "
                          "legacy file, .safetensors or .npz)")


def load_torch_file(path: str | os.PathLike, *, module_classes: Iterable[str] = frozenset(),
                    stub_globals: Sequence[str] = ()) -> Any:
    """Unpickle a ``torch.save`` file (zip or legacy) safely; tensors become NumPy arrays.

    Returns the object tree as saved (dicts, OrderedDicts, lists, ...). ``module_classes``:
    exact dotted class names allowed as pickled ``nn.Module`` records (see the module
    docstring; ``stub_globals`` is the older, prefix-based and less safe way). Errors are
    :class:`CheckpointError` (a ``ValueError``) naming ``path``; a missing file is
    ``FileNotFoundError``.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    module_classes = frozenset(module_classes)
    try:
        if fmt == "torch-zip":
            with zipfile.ZipFile(path) as zf:
                return _read_zip(zf, stub_globals, module_classes)
        if fmt == "torch-legacy":
            with open(path, "rb") as fh:
                data = fh.read()
            return _read_legacy(data, stub_globals, module_classes)
    except _CAUGHT as e:
        raise _fail(path, "corrupt or truncated torch checkpoint", e) from None
    raise CheckpointError(f"{path}: {fmt} file is not a torch.save checkpoint; use load_state_dict")


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """``{name: array}`` of an ``.npz``, each ``.npy`` header's declared size checked against
    its member before anything is allocated (no pickles)."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename
            key = name[:-4]
            head = read_zip_member(zf, name, min(info.file_size, 65536 + 16))
            fh = io.BytesIO(head)
            try:
                version = np.lib.format.read_magic(fh)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"unsupported .npy version {version}")
                shape, fortran, dtype = read_header(fh)
            except (ValueError, SyntaxError, TypeError, EOFError) as e:
                raise CheckpointError(f"member {short_repr(key)}: bad .npy header ({short_repr(str(e))})") \
                    from None
            if dtype.hasobject:
                raise CheckpointError(f"member {short_repr(key)}: object arrays (pickles) are refused")
            offset = fh.tell()
            nbytes = math.prod(as_dims(shape, f"member {key!r} shape")) * dtype.itemsize
            if info.file_size - offset != nbytes:
                raise CheckpointError(
                    f"member {short_repr(key)}: header declares {short_repr(shape)} x {dtype} "
                    f"({nbytes} bytes) but the member holds {info.file_size - offset}")
            raw = read_zip_member(zf, name)[offset:]
            arr = np.frombuffer(raw, dtype)
            arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
            out[key] = np.ascontiguousarray(arr) if arr.dtype.isnative else \
                np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("=")))
    return out


KNOWN_INTEGER_BUFFERS = ("num_batches_tracked", "position_ids", "relative_position_index")
"""Last name components of buffers that are integer by nature (kept as they are)."""


def check_state_dict_values(state_dict: dict[str, np.ndarray], *, cast_integers: bool = False
                            ) -> dict[str, np.ndarray]:
    """Refuse (``ValueError`` naming the key) complex, bool or integer arrays where floating-point
    weights belong, and NaN / Inf values. With ``cast_integers`` integer and bool arrays are cast to
    float32 when exact. :data:`KNOWN_INTEGER_BUFFERS` stay as they are."""
    out = {}
    for key, arr in state_dict.items():
        kind = arr.dtype.kind
        if kind == "c":
            raise ValueError(f"key {key!r} holds complex values ({arr.dtype}): refused (weights are real)")
        if kind in "biu" and key.rsplit(".", 1)[-1] not in KNOWN_INTEGER_BUFFERS:
            if not cast_integers:
                raise ValueError(f"key {key!r} holds {arr.dtype} values where floating-point weights "
                                 "belong: refused (cast_integers=True allows exact integer casts)")
            cast = arr.astype(np.float32)
            if kind != "b" and not np.array_equal(cast.astype(arr.dtype), arr):
                raise ValueError(f"key {key!r}: {arr.dtype} values are not exact in float32: refused")
            arr = cast
        elif kind not in "biu":
            if kind != "f" and arr.dtype.name not in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
                raise ValueError(f"key {key!r} holds unsupported dtype {arr.dtype}")
            finite = np.isfinite(arr if kind == "f" else arr.astype(np.float32))
            if not finite.all():
                bad = int(arr.size - np.count_nonzero(finite))
                raise ValueError(f"key {key!r} holds {bad} NaN/Inf values: refused")
        out[key] = arr
    return out


class StateDictSource(NamedTuple):
    """A flat state dict and where it came from (for summaries)."""
    state_dict: dict[str, np.ndarray]
    file_format: str           # one of FORMATS
    container: str | None      # container key path used, e.g. "ema" or "model/state_dict"; None if bare
    stripped_prefix: str | None  # "module." when it was stripped
    ignored: tuple[str, ...]   # keys dropped on purpose (num_batches_tracked)
    pickled_classes: dict[str, str] = {}  # {module path: class name} of a pickled module tree, else empty


def read_state_dict(path: str | os.PathLike, *, container_key: str | None = None,
                    module_classes: Iterable[str] = frozenset(), cast_integers: bool = False,
                    stub_globals: Sequence[str] = ()) -> StateDictSource:
    """Load any supported file and unwrap it to a flat ``{name: array}`` (PyTorch names, OIHW).

    Every path checks the values (:func:`check_state_dict_values`): complex, bool / integer
    where floats belong (unless ``cast_integers``), NaN and Inf are refused naming the key.
    ``module_classes``: see :func:`load_torch_file`. Errors: :class:`CheckpointError`.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        obj = load_safetensors(path)
    elif fmt == "npz":
        try:
            obj = _load_npz(path)
        except _CAUGHT as e:
            raise _fail(path, "corrupt .npz file", e) from None
    else:
        obj = load_torch_file(path, module_classes=module_classes, stub_globals=stub_globals)
    try:
        un = unwrap_state_dict(obj, container_key=container_key)
        sd = check_state_dict_values(un.state_dict, cast_integers=cast_integers)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except _CAUGHT as e:
        raise _fail(path, "cannot unwrap the state dict", e) from None
    return StateDictSource(sd, fmt, un.container, un.stripped_prefix, un.ignored, un.pickled_classes)


def load_state_dict(path: str | os.PathLike, *, container_key: str | None = None,
                    module_classes: Iterable[str] = frozenset(), cast_integers: bool = False,
                    stub_globals: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Flat, unwrapped ``{PyTorch name: np.ndarray}`` from any supported checkpoint file.

    Unwrapping rules are those of :func:`converters.containers.unwrap_state_dict`
    (``ema`` > ``state_dict`` > ``model``; ``module.`` stripped; ``num_batches_tracked`` ignored);
    value checks and options as :func:`read_state_dict`.
    """
    return read_state_dict(path, container_key=container_key, module_classes=module_classes,
                           cast_integers=cast_integers, stub_globals=stub_globals).state_dict
