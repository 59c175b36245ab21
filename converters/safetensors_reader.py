"""Reader of ``.safetensors`` files, parsed directly (the ``safetensors`` package is not needed).

Layout: an unsigned little-endian int64 ``N``, then ``N`` bytes of UTF-8 JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
byte after the header; an optional ``"__metadata__"`` entry holds strings), then the raw
row-major little-endian tensor bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from converters.errors import CheckpointError, short_repr

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}

_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header size


def _uint(value, what: str) -> int:
    """A JSON unsigned integer (``usize`` in the official reader: no floats, bools or negatives)."""
    if type(value) is not int or not 0 <= value < 2**64:
        raise CheckpointError(f"{what} is {short_repr(value)}, not an unsigned integer")
    return value


def load_safetensors(path: str | os.PathLike, *, with_metadata: bool = False):
    """``{name: np.ndarray}`` (C-contiguous copies) from a ``.safetensors`` file.

    Validation follows the official ``safetensors`` library: header at most 100 MB, a JSON
    object; integer shapes and offsets; each tensor's byte count equal to its offsets' span;
    tensors tiling the data area exactly (no overlaps, gaps or trailing bytes); ``__metadata__``
    strings only. With ``with_metadata=True`` returns ``(tensors, metadata: dict[str, str])``.
    Errors are :class:`CheckpointError` (a ``ValueError``) naming the file and the tensor.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({type(e).__name__}: {e.strerror or e})") from None
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file size {len(data)}")
    try:
        text = data[8:8 + n].decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("header does not start with '{'")
        header = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise CheckpointError(f"{path}: safetensors JSON header is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int limits
        raise CheckpointError(f"{path}: corrupt safetensors JSON header "
                              f"({type(e).__name__}: {short_repr(str(e), 120)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    body = memoryview(data)[8 + n:]
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {short_repr(name)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry is a {type(info).__name__}, not an object")
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape, offsets = info["shape"], info["data_offsets"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: missing field or unsupported dtype ({short_repr(e)})") from None
        if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            raise CheckpointError(f"{where}: shape / data_offsets must be lists (got "
                                  f"{short_repr(shape)}, {short_repr(offsets)})")
        shape = tuple(_uint(s, f"{where}: shape entry") for s in shape)
        begin, end = (_uint(o, f"{where}: data offset") for o in offsets)
        nbytes = math.prod(shape) * dtype.itemsize
        if end < begin or end - begin != nbytes:
            raise CheckpointError(f"{where}: data offsets [{begin}, {end}] do not hold "
                                  f"{short_repr(shape)} x {dtype} ({nbytes} bytes)")
        spans.append((begin, end, name, shape, dtype))
    spans.sort(key=lambda t: (t[0], t[1]))
    pos = 0
    for begin, end, name, _, _ in spans:
        if begin != pos:
            raise CheckpointError(f"{path}: tensor {short_repr(name)}: data offsets [{begin}, {end}] "
                                  f"{'overlap the previous tensor' if begin < pos else 'leave a gap'} "
                                  f"(expected to start at {pos})")
        pos = end
    if pos != len(body):
        raise CheckpointError(f"{path}: tensors cover {pos} data bytes but the file holds {len(body)} "
                              "(truncated file or trailing bytes)")
    tensors: dict[str, np.ndarray] = {}
    for begin, end, name, shape, dtype in spans:
        tensors[name] = np.frombuffer(body[begin:end], dtype).reshape(shape).copy()
    tensors = {name: tensors[name] for name in header}  # header order
    return (tensors, dict(metadata)) if with_metadata else tensors


def _refuse_constant(token: str):
    raise ValueError(f"non-JSON constant {token}")
