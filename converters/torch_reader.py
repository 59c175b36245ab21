"""Safe reader of PyTorch checkpoint files: no torch needed, no code from the file executed.

Supported formats (detected from the file's bytes, not its name):

* ``torch.save`` zip format (PyTorch >= 1.6 default): ``<prefix>/data.pkl`` plus one raw
  record ``<prefix>/data/<key>`` per storage;
* ``torch.save`` legacy format (``_use_new_zipfile_serialization=False``): magic number,
  protocol and system-info pickles, the object pickle, the list of storage keys, then each
  storage as an int64 element count followed by its raw bytes;
* ``.safetensors`` (see :mod:`converters.safetensors_reader`) and ``.npz`` (``allow_pickle``
  off), for :func:`load_state_dict` only.

The pickles are read by an unpickler whose ``find_class`` honours only an allow-list
(:data:`ALLOWED_GLOBALS`): the tensor / parameter rebuild functions, the storage types and
torch dtypes, ``collections.OrderedDict``, the builtin containers, ``torch.Size`` and numpy
scalars, each mapped to a small function written here. Any other global raises
:class:`CheckpointError` naming it. Tensors come back as C-contiguous NumPy arrays (copies, so
views, offsets and shared storages are resolved); ``bfloat16`` comes back as
``ml_dtypes.bfloat16`` (exact; ``np.asarray(x, np.float32)`` widens it).

Whole pickled ``nn.Module`` objects (e.g. YOLOv6 releases) need their classes; pass
``stub_globals=("yolov6.", "torch.nn.modules.")`` to turn globals under those prefixes into
inert :class:`PickledObject` records (no constructor, no ``__setstate__`` of the real class
runs); :func:`converters.containers.module_state_dict` then walks them.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import types
import zipfile
from typing import Any, NamedTuple, Sequence

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file could not be read safely (refused global, corrupt or truncated data)."""


# ----------------------------------------------------------------------------- dtypes

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

_TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn), "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


class _StorageType(NamedTuple):
    """Stand-in for ``torch.<X>Storage`` (as referenced from a storage persistent id)."""
    name: str
    dtype: np.dtype


class _TorchDType(NamedTuple):
    """Stand-in for a ``torch.<dtype>`` global (``_rebuild_tensor_v3``'s dtype argument)."""
    name: str
    dtype: np.dtype


class _TensorType(NamedTuple):
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` used as a class argument."""
    name: str


_PENDING = object()  # storage placeholder during the first pass over a legacy file


class PickledObject:
    """Inert record of an instance of a stubbed class (see ``stub_globals``).

    ``args`` holds the constructor arguments the pickle passed; the pickled state is in
    ``__dict__`` (or ``pickled_state`` when it was not a dict). Never runs the real class.
    """

    pickled_global = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})
        else:
            self.__dict__["pickled_state"] = state

    def __repr__(self) -> str:
        return f"<PickledObject {self.pickled_global}>"


# ----------------------------------------------------------------------------- rebuilders

def _strided_copy(storage: np.ndarray, offset, size, stride) -> np.ndarray:
    """C-contiguous copy of the view ``storage[offset + sum(i_k * stride_k)]`` of shape ``size``.

    ``storage`` is 1-D; ``offset`` and ``stride`` count elements (PyTorch convention).
    """
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(offset)
    if len(size) != len(stride):
        raise CheckpointError(f"tensor size {size} and stride {stride} have different ranks")
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise CheckpointError(f"negative size/stride/offset in tensor view {size}/{stride}/{offset}")
    if math.prod(size) == 0:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointError(
            f"tensor view (offset {offset}, size {size}, stride {stride}) reaches element {last} "
            f"of a storage holding {storage.size}: truncated or corrupt storage")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, order="C")


def _check_storage(storage, what: str) -> None:
    if storage is not _PENDING and not (isinstance(storage, np.ndarray) and storage.ndim == 1):
        raise CheckpointError(f"{what}: expected a storage, got {type(storage).__name__}")


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """``torch._utils._rebuild_tensor(_v2)``: (storage, offset, size, stride, requires_grad, hooks, ...)."""
    _check_storage(storage, "_rebuild_tensor")
    if storage is _PENDING:
        return None
    return _strided_copy(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       *_ignored):
    """``torch._utils._rebuild_tensor_v3``: an untyped (byte) storage plus an explicit dtype."""
    _check_storage(storage, "_rebuild_tensor_v3")
    if not isinstance(dtype, _TorchDType):
        raise CheckpointError(f"_rebuild_tensor_v3: dtype argument is {dtype!r}, not a torch dtype")
    if storage is _PENDING:
        return None
    raw = storage.view(np.uint8)
    usable = raw.size - raw.size % dtype.dtype.itemsize
    return _strided_copy(raw[:usable].view(dtype.dtype), storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_state):
    """``torch._utils._rebuild_parameter(_with_state)``: a Parameter is just its data here."""
    if data is not None and not isinstance(data, np.ndarray):
        raise CheckpointError(f"_rebuild_parameter: data is {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type_v2``: only plain Tensor / Parameter types are accepted."""
    if not isinstance(new_type, _TensorType):
        raise CheckpointError(f"_rebuild_from_type_v2: refusing tensor subclass {new_type!r}")
    return func(*args)


def _torch_size(dims=()):
    return tuple(int(d) for d in dims)


def _torch_device(kind, index=None):
    return str(kind) if index is None else f"{kind}:{index}"


def _np_dtype(spec, align=False, copy=False):
    """``numpy.dtype``: only builtin, non-object dtype strings."""
    if not isinstance(spec, str):
        raise CheckpointError(f"numpy.dtype: refusing non-string dtype spec {spec!r}")
    dt = np.dtype(spec)
    if dt.hasobject:
        raise CheckpointError(f"numpy.dtype: refusing object dtype {spec!r}")
    return dt


def _np_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar``: a numpy scalar from its raw bytes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise CheckpointError(f"numpy scalar: refusing ({dtype!r}, {type(data).__name__})")
    if len(data) != dtype.itemsize:
        raise CheckpointError(f"numpy scalar: {len(data)} bytes for dtype {dtype}")
    return np.frombuffer(data, dtype)[0]


def _codecs_encode(text, encoding="utf-8"):
    """``_codecs.encode``: how protocol-2 pickles spell ``bytes`` (latin-1 text -> bytes)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"_codecs.encode: refusing ({type(text).__name__}, {encoding!r})")
    return text.encode("latin-1")


class _SafeCallable:
    """Immutable wrapper of an allow-listed function, so a pickle's BUILD opcode cannot
    set attributes (``__defaults__``, ...) on the function itself."""

    __slots__ = ("_fn",)

    def __init__(self, fn):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args):
        return self._fn(*args)

    def __setattr__(self, name, value):
        raise CheckpointError(f"pickle tried to set attribute {name!r} on {self._fn.__name__}")

    def __repr__(self) -> str:
        return f"<allow-listed {self._fn.__name__}>"


def _allowed_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Tensor"): _TensorType("torch.Tensor"),
        ("torch.nn.parameter", "Parameter"): _TensorType("torch.nn.parameter.Parameter"),
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", _STORAGE_DTYPES["UntypedStorage"]),
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "dtype"): _np_dtype,
        ("numpy.core.multiarray", "scalar"): _np_scalar,
        ("numpy._core.multiarray", "scalar"): _np_scalar,
    }
    for name, obj in (("dict", dict), ("list", list), ("tuple", tuple), ("set", set),
                      ("frozenset", frozenset)):
        table[("builtins", name)] = obj
    table = {k: _SafeCallable(v) if isinstance(v, types.FunctionType) else v for k, v in table.items()}
    for name, dt in _STORAGE_DTYPES.items():
        table[("torch", name)] = _StorageType(name, dt)
    for name, dt in _TORCH_DTYPES.items():
        table[("torch", name)] = _TorchDType(name, dt)
    return table


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 spellings

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = _allowed_globals()
"""``(module, name) -> safe replacement`` honoured by the unpickler; everything else is refused."""


# ----------------------------------------------------------------------------- unpickler

class _SafeUnpickler(pickle.Unpickler):
    """Unpickler resolving globals through :data:`ALLOWED_GLOBALS` (or inert stubs) only.

    ``load_storage(storage_type, key, numel) -> 1-D array`` supplies storages for persistent ids.
    """

    def __init__(self, file, load_storage, stub_globals: Sequence[str] = (), stub_cache=None):
        super().__init__(file)
        self._load_storage = load_storage
        self._stub_prefixes = tuple(stub_globals)
        self._stubs = {} if stub_cache is None else stub_cache

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)
        key = (module, name)
        if key in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[key]
        full = f"{module}.{name}"
        if any(full.startswith(p) for p in self._stub_prefixes):
            if full not in self._stubs:
                self._stubs[full] = type(name, (PickledObject,), {"pickled_global": full})
            return self._stubs[full]
        raise CheckpointError(
            f"refusing to load global {full!r}: it is not in the allow-list of tensor-rebuild and "
            "container constructors (the file may execute code when loaded by torch.load)")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointError(f"unsupported persistent id {pid!r}")
        if pid[0] == "module" and len(pid) >= 2:  # legacy format: pickled nn.Module class + source
            return pid[1]
        if pid[0] != "storage" or len(pid) < 5:
            raise CheckpointError(f"unsupported persistent id {pid[:1]!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"persistent id names storage type {storage_type!r}")
        storage = self._load_storage(storage_type, str(key), int(numel))
        view = pid[5] if len(pid) > 5 else None
        if view is not None and storage is not _PENDING:  # legacy storage view (old torch)
            _view_key, view_offset, view_size = view
            storage = storage[int(view_offset):int(view_offset) + int(view_size)]
        return storage


def _frombuffer(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """1-D array of ``dtype`` over ``raw`` (byte-swapped per component when ``big_endian``)."""
    if not big_endian or dtype.itemsize == 1:
        return np.frombuffer(raw, dtype)
    comp = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    swapped = np.frombuffer(raw, np.uint8).reshape(-1, comp)[:, ::-1].copy()
    return swapped.reshape(-1).view(dtype)


def _read_zip(zf: zipfile.ZipFile, stub_globals) -> Any:
    names = zf.namelist()
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError("TorchScript archive (torch.jit.save) is not supported; "
                              "save the model's state_dict with torch.save instead")
    pkls = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if not pkls:
        raise CheckpointError("zip file has no data.pkl record: not a torch.save checkpoint")
    prefix = pkls[0][: -len("data.pkl")]
    order = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    if order not in ("little", "big"):
        raise CheckpointError(f"unknown byteorder record {order!r}")
    cache: dict[tuple[str, str], np.ndarray] = {}

    def load_storage(stype: _StorageType, key: str, numel: int) -> np.ndarray:
        if (key, stype.name) not in cache:
            record = f"{prefix}data/{key}"
            try:
                raw = zf.read(record)
            except KeyError:
                raise CheckpointError(f"missing storage record {record!r}") from None
            need = numel * stype.dtype.itemsize
            if len(raw) < need:
                raise CheckpointError(f"storage record {record!r} has {len(raw)} bytes, "
                                      f"expected {need} ({numel} x {stype.dtype})")
            cache[(key, stype.name)] = _frombuffer(raw[:need], stype.dtype, order == "big")
        return cache[(key, stype.name)]

    return _SafeUnpickler(io.BytesIO(zf.read(pkls[0])), load_storage, stub_globals).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _read_legacy(data: bytes, stub_globals) -> Any:
    f = io.BytesIO(data)

    def no_storage(*_):
        raise CheckpointError("unexpected storage in the legacy header")

    def header():
        return _SafeUnpickler(f, no_storage).load()

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

    def record(stype: _StorageType, key: str, numel: int):
        seen.setdefault(key, (stype.dtype, numel))
        return _PENDING

    stubs: dict = {}
    _SafeUnpickler(f, record, stub_globals, stubs).load()
    keys = _SafeUnpickler(f, no_storage).load()
    if not isinstance(keys, list):
        raise CheckpointError("legacy storage key list is missing")
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        if key not in seen:
            raise CheckpointError(f"legacy storage {key!r} is not referenced by the pickle")
        dtype, numel = seen[key]
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"truncated before storage {key!r}")
        (count,) = struct.unpack("<q", head)
        raw = f.read(count * dtype.itemsize)
        if count < 0 or len(raw) != count * dtype.itemsize:
            raise CheckpointError(f"storage {key!r} is truncated ({len(raw)} of "
                                  f"{count * dtype.itemsize} bytes)")
        storages[key] = np.frombuffer(raw, dtype)
    missing = set(seen) - set(storages)
    if missing:
        raise CheckpointError(f"legacy storages {sorted(missing)} have no data")

    def lookup(stype: _StorageType, key: str, numel: int):
        return storages[key]

    f.seek(start)
    return _SafeUnpickler(f, lookup, stub_globals, stubs).load()


# ----------------------------------------------------------------------------- public API

FORMATS = ("torch-zip", "torch-legacy", "safetensors", "npz")


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`FORMATS`, from the file's leading bytes; :class:`CheckpointError` otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(512)
    if not head:
        raise CheckpointError(f"{path}: file is empty")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated zip archive ({e})") from None
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


def load_torch_file(path: str | os.PathLike, *, stub_globals: Sequence[str] = ()) -> Any:
    """Unpickle a ``torch.save`` file (zip or legacy) safely; tensors become NumPy arrays.

    Returns the object tree as saved (dicts, OrderedDicts, lists, ...). Errors are
    :class:`CheckpointError` (a ``ValueError``) naming ``path``.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    try:
        if fmt == "torch-zip":
            with zipfile.ZipFile(path) as zf:
                return _read_zip(zf, stub_globals)
        if fmt == "torch-legacy":
            with open(path, "rb") as fh:
                return _read_legacy(fh.read(), stub_globals)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, TypeError, ValueError,
            IndexError, KeyError, AttributeError, struct.error, UnicodeDecodeError, RecursionError,
            MemoryError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated torch checkpoint "
                              f"({type(e).__name__}: {e})") from None
    raise CheckpointError(f"{path}: {fmt} file is not a torch.save checkpoint; use load_state_dict")


class StateDictSource(NamedTuple):
    """A flat state dict and where it came from (for summaries)."""
    state_dict: dict[str, np.ndarray]
    file_format: str           # one of FORMATS
    container: str | None      # container key path used, e.g. "ema" or "model/state_dict"; None if bare
    stripped_prefix: str | None  # "module." when it was stripped
    ignored: tuple[str, ...]   # keys dropped on purpose (num_batches_tracked)


def read_state_dict(path: str | os.PathLike, *, container_key: str | None = None,
                    stub_globals: Sequence[str] = ()) -> StateDictSource:
    """Load any supported file and unwrap it to a flat ``{name: array}`` (PyTorch names, OIHW)."""
    from converters.containers import unwrap_state_dict
    from converters.safetensors_reader import load_safetensors

    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        obj = load_safetensors(path)
    elif fmt == "npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise CheckpointError(f"{path}: corrupt .npz file ({e})") from None
    else:
        obj = load_torch_file(path, stub_globals=stub_globals)
    try:
        un = unwrap_state_dict(obj, container_key=container_key)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return StateDictSource(un.state_dict, fmt, un.container, un.stripped_prefix, un.ignored)


def load_state_dict(path: str | os.PathLike, *, container_key: str | None = None,
                    stub_globals: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Flat, unwrapped ``{PyTorch name: np.ndarray}`` from any supported checkpoint file.

    Unwrapping rules are those of :func:`converters.containers.unwrap_state_dict`
    (``ema`` > ``state_dict`` > ``model``; ``module.`` stripped; ``num_batches_tracked`` ignored).
    """
    return read_state_dict(path, container_key=container_key, stub_globals=stub_globals).state_dict
