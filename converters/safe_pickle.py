"""Allow-listed, bounded unpickler for ``torch.save`` pickles: no torch needed, no code from the file run.

:class:`SafeUnpickler` (a pure-Python ``pickle._Unpickler`` subclass) resolves globals only
through :data:`ALLOWED_GLOBALS`: the tensor / parameter rebuild functions, the storage types and
torch dtypes, ``collections.OrderedDict``, the builtin containers, ``torch.Size`` and numpy
scalars, each mapped to a small function written here (wrapped in an immutable callable). Any
other global raises :class:`~converters.errors.CheckpointError` naming it, except exact dotted
class names passed as ``module_classes`` (or, older and less safe, any class under a
``stub_globals`` prefix): those become inert :class:`PickledObject` records.

Rebuilt tensors are C-contiguous NumPy copies of the view ``storage[offset + sum(i_k *
stride_k)]`` (PyTorch element strides; views, offsets and shared storages resolved);
``bfloat16`` is ``ml_dtypes.bfloat16``. Storages are supplied by the caller's
``load_storage(storage_type, key, numel) -> 1-D array`` (see :mod:`converters.torch_reader`).

Limits, checked before anything large is allocated: nesting deeper than :data:`MAX_NESTING`
(pickle marks while loading, the built tree after, :func:`check_nesting`); dict keys / set items
other than str, int, float, bytes, None or small tuples of those (:data:`MAX_KEY_ITEMS`); more
than :data:`MAX_WORK` opcodes + copied elements and tensors much larger than the storages present
(:class:`Budget`, one per file); views reaching past their storage or broadcast views beyond
:data:`MAX_EXPANDED_BYTES`.
"""

from __future__ import annotations

import collections
import itertools
import math
import pickle
import struct
import types
from typing import Any, Iterable, NamedTuple, Sequence

import ml_dtypes
import numpy as np

from converters.errors import CheckpointError, short_repr

# ----------------------------------------------------------------------------- limits

MAX_NESTING = 300
"""Deepest container nesting (lists, tuples, dicts, module records) accepted in a pickle."""
MAX_WORK = 20_000_000
"""Most pickle opcodes + container elements copied per file (bounds CPU time and memory)."""
MAX_KEY_ITEMS = 64
"""Most scalars in one tuple used as a dict key or set item (keys nest at most 3 levels)."""
MAX_EXPANDED_BYTES = 16 * 2**20
"""A tensor may hold more elements than its storage (stride-0 views) only up to this many bytes."""
_MAX_DIM = 1 << 48  # bound on every size / stride / offset / element count (no OverflowError)


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


class StorageType(NamedTuple):
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


PENDING = object()  # storage placeholder during the first pass over a legacy file


class PickledObject:
    """Inert record of an instance of an allowed module class (``module_classes``, ``stub_globals``).

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
            if not all(isinstance(k, str) for k in state):
                raise CheckpointError(f"{self.pickled_global}: state has non-string attribute names")
            self.__dict__.update(state)
        else:
            self.__dict__["pickled_state"] = state

    def __repr__(self) -> str:
        return f"<PickledObject {self.pickled_global}>"


# ----------------------------------------------------------------------------- rebuilders

def _as_int(value, what: str) -> int:
    """``value`` as a bounded non-negative Python int (ints only: no floats, no ``inf``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CheckpointError(f"{what} is {short_repr(value)}, not an integer")
    value = int(value)
    if not 0 <= value < _MAX_DIM:
        raise CheckpointError(f"{what} {short_repr(value)} is out of range")
    return value


def as_dims(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64:
        raise CheckpointError(f"{what} is {short_repr(value)}, not a short tuple of integers")
    return tuple(_as_int(v, what) for v in value)


def _strided_copy(storage: np.ndarray, offset, size, stride) -> np.ndarray:
    """C-contiguous copy of the view ``storage[offset + sum(i_k * stride_k)]`` of shape ``size``.

    ``storage`` is 1-D; ``offset`` and ``stride`` count elements (PyTorch convention). Every
    declared number is checked against the storage before anything is allocated.
    """
    size = as_dims(size, "tensor size")
    stride = as_dims(stride, "tensor stride")
    offset = _as_int(offset, "tensor storage offset")
    if len(size) != len(stride):
        raise CheckpointError(f"tensor size {size} and stride {stride} have different ranks")
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointError(
            f"tensor view (offset {offset}, size {short_repr(size)}, stride {short_repr(stride)}) reaches "
            f"element {last} of a storage holding {storage.size}: truncated or corrupt storage")
    item = storage.dtype.itemsize
    if numel > storage.size and numel * item > MAX_EXPANDED_BYTES:
        raise CheckpointError(
            f"tensor view of size {short_repr(size)} declares {numel} elements ({numel * item} bytes) "
            f"over a storage of {storage.size}: refusing to expand a broadcast view that large")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view, order="C")


def _check_storage(storage, what: str) -> None:
    if storage is not PENDING and not (isinstance(storage, np.ndarray) and storage.ndim == 1):
        raise CheckpointError(f"{what}: expected a storage, got {type(storage).__name__}")


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """``torch._utils._rebuild_tensor(_v2)``: (storage, offset, size, stride, requires_grad, hooks, ...)."""
    _check_storage(storage, "_rebuild_tensor")
    if storage is PENDING:
        return None
    return _strided_copy(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       *_ignored):
    """``torch._utils._rebuild_tensor_v3``: an untyped (byte) storage plus an explicit dtype."""
    _check_storage(storage, "_rebuild_tensor_v3")
    if not isinstance(dtype, _TorchDType):
        raise CheckpointError(f"_rebuild_tensor_v3: dtype argument is {short_repr(dtype)}, not a torch dtype")
    if storage is PENDING:
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
        raise CheckpointError(f"_rebuild_from_type_v2: refusing tensor subclass {short_repr(new_type)}")
    if not isinstance(func, _SafeCallable) or not isinstance(args, tuple):
        raise CheckpointError(f"_rebuild_from_type_v2: refusing rebuild function {short_repr(func)}")
    return func(*args)


def _torch_size(dims=()):
    return as_dims(dims, "torch.Size")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or len(kind) > 64 or not (index is None or isinstance(index, int)):
        raise CheckpointError(f"torch.device: refusing ({short_repr(kind)}, {short_repr(index)})")
    return kind if index is None else f"{kind}:{_as_int(index, 'device index')}"


def _np_dtype(spec, align=False, copy=False):
    """``numpy.dtype``: only builtin, non-object dtype strings."""
    if not isinstance(spec, str) or len(spec) > 16:
        raise CheckpointError(f"numpy.dtype: refusing dtype spec {short_repr(spec)}")
    try:
        dt = np.dtype(spec)
    except (TypeError, ValueError):
        raise CheckpointError(f"numpy.dtype: unknown dtype spec {short_repr(spec)}") from None
    if dt.hasobject or dt.kind not in "biufc" or dt.shape or dt.fields is not None:
        raise CheckpointError(f"numpy.dtype: refusing dtype {short_repr(spec)}")
    return dt


def _np_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar``: a numpy scalar from its raw bytes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise CheckpointError(f"numpy scalar: refusing ({short_repr(dtype)}, {type(data).__name__})")
    if len(data) != dtype.itemsize:
        raise CheckpointError(f"numpy scalar: {len(data)} bytes for dtype {dtype}")
    return np.frombuffer(data, dtype)[0]


def _codecs_encode(text, encoding="utf-8"):
    """``_codecs.encode``: how protocol-2 pickles spell ``bytes`` (latin-1 text -> bytes)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"_codecs.encode: refusing ({type(text).__name__}, {short_repr(encoding)})")
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
        raise CheckpointError(f"pickle tried to set attribute {short_repr(name)} on {self._fn.__name__}")

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
        ("torch.storage", "UntypedStorage"): StorageType("UntypedStorage", _STORAGE_DTYPES["UntypedStorage"]),
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
        table[("torch", name)] = StorageType(name, dt)
    for name, dt in _TORCH_DTYPES.items():
        table[("torch", name)] = _TorchDType(name, dt)
    return table


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 spellings

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = _allowed_globals()
"""``(module, name) -> safe replacement`` honoured by the unpickler; everything else is refused."""


# ----------------------------------------------------------------------------- unpickler

_CONTAINER_TYPES = (dict, collections.OrderedDict, list, tuple, set, frozenset)
_SCALAR_KEY_TYPES = (str, int, float, bytes, type(None))


def _check_key(key, what: str = "dict key") -> None:
    """Refuse dict keys / set items that could be costly to hash (deep or shared tuples).

    Allowed: str, int, float, bytes, None, and tuples (nested at most 3 levels, at most
    :data:`MAX_KEY_ITEMS` scalars in all) of those: the kinds real checkpoints use.
    """
    if type(key) in _SCALAR_KEY_TYPES or type(key) is bool:
        return
    budget = MAX_KEY_ITEMS
    todo = [(key, 0)]
    while todo:
        obj, level = todo.pop()
        if type(obj) is tuple:
            budget -= len(obj)
            if level >= 3 or budget < 0:
                raise CheckpointError(f"{what} {short_repr(key)} is a tuple nested deeper than 3 levels "
                                      f"or holding more than {MAX_KEY_ITEMS} items: refused")
            todo.extend((o, level + 1) for o in obj)
        elif not (type(obj) in _SCALAR_KEY_TYPES or type(obj) is bool):
            raise CheckpointError(f"{what} of type {type(obj).__name__} ({short_repr(key)}) is not a "
                                  "str, int, float, bytes, None or tuple of those: refused")


class Budget:
    """Work and tensor-memory budget shared by the unpicklers reading one file.

    ``storage_bytes``: raw storage bytes the file holds (tensors may take at most 4x that, plus
    4 x :data:`MAX_EXPANDED_BYTES`); ``max_work``: opcodes + copied elements allowed (default
    :data:`MAX_WORK`, read when the budget is made).
    """

    def __init__(self, storage_bytes: int, max_work: int | None = None):
        self.work = 0
        self.max_work = MAX_WORK if max_work is None else max_work
        self.tensor_bytes = 0
        self.max_tensor_bytes = 4 * storage_bytes + 4 * MAX_EXPANDED_BYTES

    def spend(self, n: int) -> None:
        self.work += n
        if self.work > self.max_work:
            raise CheckpointError(f"pickle builds more than {self.max_work} objects: refused (bounded work)")

    def tensor(self, arr) -> None:
        if isinstance(arr, np.ndarray):
            self.tensor_bytes += arr.nbytes
            if self.tensor_bytes > self.max_tensor_bytes:
                raise CheckpointError(
                    f"tensors rebuilt so far take {self.tensor_bytes} bytes, more than 4x the "
                    f"{self.max_tensor_bytes // 4 - MAX_EXPANDED_BYTES} storage bytes present: refused")


def _children(obj) -> Iterable:
    if isinstance(obj, (list, tuple, set, frozenset)):
        return iter(obj)
    if isinstance(obj, dict):
        items = itertools.chain.from_iterable(obj.items())
        if type(obj) is collections.OrderedDict and vars(obj):
            return itertools.chain(items, vars(obj).values())
        return items
    if isinstance(obj, PickledObject):
        return iter(list(vars(obj).values()))
    return iter(())


def _is_node(obj) -> bool:
    return isinstance(obj, (list, tuple, set, frozenset, dict, PickledObject))


def check_nesting(root, limit: int = MAX_NESTING) -> None:
    """Refuse an object tree nested deeper than ``limit`` containers.

    Iterative (no recursion); each shared node is walked once, its height remembered.
    """
    if not _is_node(root):
        return
    end = object()
    height: dict[int, int] = {}
    on_path = {id(root)}
    path = [[root, _children(root), 0]]  # node, children iterator, tallest child so far
    while path:
        frame = path[-1]
        child = next(frame[1], end)
        if child is end:
            path.pop()
            on_path.discard(id(frame[0]))
            height[id(frame[0])] = h = frame[2] + 1
            if path:
                path[-1][2] = max(path[-1][2], h)
            continue
        if not _is_node(child) or id(child) in on_path:
            continue
        h = height.get(id(child))
        if h is None and len(path) >= limit or h is not None and len(path) + h > limit:
            raise CheckpointError(f"objects nested deeper than {limit} levels: refused")
        if h is not None:
            frame[2] = max(frame[2], h)
            continue
        on_path.add(id(child))
        path.append([child, _children(child), 0])


_Disp = pickle._Unpickler.dispatch  # type: ignore[attr-defined]


class SafeUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python unpickler resolving globals through :data:`ALLOWED_GLOBALS` (or inert
    module records) only, with bounded nesting, keys, work and tensor memory.

    ``load_storage(storage_type, key, numel) -> 1-D array`` supplies storages for persistent ids.
    """

    dispatch = dict(_Disp)

    def __init__(self, file, load_storage, stub_globals: Sequence[str] = (), stub_cache=None,
                 module_classes: Iterable[str] = frozenset(), budget: Budget | None = None):
        super().__init__(file)
        self._load_storage = load_storage
        self._stub_prefixes = tuple(stub_globals)
        self._module_classes = frozenset(module_classes)
        self._stubs = {} if stub_cache is None else stub_cache
        self._budget = budget or Budget(0)

    # -- globals and persistent ids
    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)
        key = (module, name)
        if key in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[key]
        full = f"{module}.{name}"
        if full in self._module_classes or any(full.startswith(p) for p in self._stub_prefixes):
            if full not in self._stubs:
                self._stubs[full] = type(name, (PickledObject,), {"pickled_global": full})
            return self._stubs[full]
        raise CheckpointError(
            f"refusing to load global {short_repr(full)}: it is not in the allow-list of tensor-rebuild "
            "and container constructors (the file may execute code when loaded by torch.load); a "
            "pickled nn.Module class must be named in module_classes")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointError(f"unsupported persistent id {short_repr(pid)}")
        if pid[0] == "module" and len(pid) >= 2:  # legacy format: pickled nn.Module class + source
            return pid[1]
        if pid[0] != "storage" or len(pid) < 5:
            raise CheckpointError(f"unsupported persistent id {short_repr(pid[:1])}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, StorageType):
            raise CheckpointError(f"persistent id names storage type {short_repr(storage_type)}")
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(_as_int(key, "storage key"))  # legacy files use int-like keys
        if not isinstance(key, str) or len(key) > 256:
            raise CheckpointError(f"storage key {short_repr(key)} is not a short string")
        storage = self._load_storage(storage_type, key, _as_int(numel, f"storage {key!r} element count"))
        view = pid[5] if len(pid) > 5 else None
        if view is not None and storage is not PENDING:  # legacy storage view (old torch)
            if not isinstance(view, tuple) or len(view) != 3:
                raise CheckpointError(f"storage {key!r}: malformed view {short_repr(view)}")
            view_offset = _as_int(view[1], "storage view offset")
            view_size = _as_int(view[2], "storage view size")
            storage = storage[view_offset:view_offset + view_size]
        return storage

    # -- the opcode loop, with a work budget
    def load(self):
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # type: ignore[attr-defined]
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch, budget = self.read, self.dispatch, self._budget
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                budget.spend(1)
                dispatch[key[0]](self)
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value

    def load_bytearray8(self):
        # pickle's own allocates the declared length before reading (found by fuzz/: 2**40 -> MemoryError)
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)  # at most the bytes the pickle holds
        if len(data) != n:
            raise CheckpointError(f"BYTEARRAY8 declares {n:,} bytes but the pickle holds {len(data):,}")
        self.append(bytearray(data))
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def load_mark(self):
        if len(self.metastack) >= MAX_NESTING:
            raise CheckpointError(f"pickle marks nested deeper than {MAX_NESTING} levels: refused")
        _Disp[pickle.MARK[0]](self)
    dispatch[pickle.MARK[0]] = load_mark

    # -- containers: targets of the exact expected types, keys checked before hashing
    def _target(self, kinds, op: str):
        target = self.stack[-1]
        if type(target) not in kinds:
            raise CheckpointError(f"pickle {op} on a {type(target).__name__}: refused")
        return target

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        _check_key(key)
        self._target((dict, collections.OrderedDict), "SETITEM")[key] = value
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        target = self._target((dict, collections.OrderedDict), "SETITEMS")
        if len(items) % 2:
            raise CheckpointError("pickle SETITEMS with an odd number of items")
        for i in range(0, len(items), 2):
            _check_key(items[i])
            target[items[i]] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise CheckpointError("pickle DICT with an odd number of items")
        for k in items[::2]:
            _check_key(k)
        self.append(dict(zip(items[::2], items[1::2])))
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        items = self.pop_mark()
        target = self._target((set,), "ADDITEMS")
        for item in items:
            _check_key(item, "set item")
        target.update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        items = self.pop_mark()
        for item in items:
            _check_key(item, "set item")
        self.append(frozenset(items))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_append(self):
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, PickledObject):
            inst.__setstate__(state)
        elif isinstance(inst, np.dtype) and type(state) is tuple and len(state) >= 2 \
                and state[1] in ("<", ">", "|", "="):
            # numpy's dtype state: only the byte order is honoured (never mutate the shared dtype)
            self.stack[-1] = inst.newbyteorder(state[1]) if state[1] in "<>" else inst
        elif type(inst) is collections.OrderedDict and type(state) is dict:
            # as torch.load(weights_only=True): attributes only (e.g. ``_metadata``), never items
            if not all(isinstance(k, str) for k in state):
                raise CheckpointError("OrderedDict attribute names must be strings")
            inst.__dict__.update(state)
        else:
            raise CheckpointError(f"pickle BUILD on a {type(inst).__name__} with a "
                                  f"{type(state).__name__} state: refused")
    dispatch[pickle.BUILD[0]] = load_build

    # -- calls: allow-listed functions, module records, and checked container constructors
    def _construct(self, func, args):
        if not isinstance(args, tuple):
            raise CheckpointError(f"pickle call arguments are a {type(args).__name__}: refused")
        if isinstance(func, _SafeCallable):
            result = func(*args)
            self._budget.tensor(result)
            return result
        if isinstance(func, type) and issubclass(func, PickledObject):
            return func(*args)
        if func in _CONTAINER_TYPES:
            if not args:
                return func()
            (arg,) = args if len(args) == 1 else (None,)
            if type(arg) not in (list, tuple, set, frozenset, dict, collections.OrderedDict):
                raise CheckpointError(f"{func.__name__}() of a {type(arg).__name__}: refused")
            self._budget.spend(len(arg))
            if func in (dict, collections.OrderedDict):
                pairs = list(arg.items()) if isinstance(arg, dict) else list(arg)
                for pair in pairs:
                    if type(pair) not in (list, tuple) or len(pair) != 2:
                        raise CheckpointError(f"{func.__name__}() item {short_repr(pair)} is not a pair")
                    _check_key(pair[0])
                return func(pairs)
            if func in (set, frozenset):
                for item in arg:
                    _check_key(item, "set item")
            return func(arg)
        raise CheckpointError(f"pickle calls {short_repr(func)}: refused (not an allow-listed callable)")

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._construct(self.stack[-1], args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not ((isinstance(cls, type) and issubclass(cls, PickledObject)) or
                (cls in _CONTAINER_TYPES and args == ())):
            raise CheckpointError(f"pickle NEWOBJ of {short_repr(cls)}: refused")
        self.append(self._construct(cls, args))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def _refused(self):
        raise CheckpointError("pickle opcode for protocol-0 instances / extensions / buffers: refused")
    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4,
                pickle.NEXT_BUFFER, pickle.READONLY_BUFFER, pickle.PERSID):
        dispatch[_op[0]] = _refused
    del _op
