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

from converters.torch_reader import CheckpointError

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}

_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header size


def load_safetensors(path: str | os.PathLike, *, with_metadata: bool = False):
    """``{name: np.ndarray}`` (C-contiguous copies) from a ``.safetensors`` file.

    With ``with_metadata=True`` returns ``(tensors, metadata: dict[str, str])``. Errors are
    :class:`CheckpointError` (a ``ValueError``) naming the file and, where relevant, the tensor.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file size {len(data)}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors JSON header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    body = memoryview(data)[8 + n:]
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {name!r}: missing field or unsupported dtype {e}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r}: malformed header entry ({e})") from None
        if any(s < 0 for s in shape):
            raise CheckpointError(f"{path}: tensor {name!r}: negative shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if not (0 <= begin <= end <= len(body)) or end - begin != nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r}: data offsets [{begin}, {end}] do not hold {shape} x {dtype} "
                f"within {len(body)} data bytes (truncated or corrupt file)")
        tensors[name] = np.frombuffer(body[begin:end], dtype).reshape(shape).copy()
    return (tensors, dict(metadata)) if with_metadata else tensors
