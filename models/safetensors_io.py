"""A strict, zero-copy safetensors reader over numpy memory maps.

The safetensors format is an 8-byte little-endian header size, a JSON header
mapping tensor names to dtype, shape and byte offsets, then raw data. Reading it
ourselves gives errors that name the file and the tensor, bf16 via ml_dtypes,
and views into the mmap (no copy until a tensor is placed in its final array).
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, corrupt or of the wrong shape."""


class SafetensorsFile:
    """Read-only view of one .safetensors file; ``tensor(name)`` returns an mmap view."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open weights file {path}: {e}") from e
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        (header_len,) = struct.unpack("<Q", self._map[:8])
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {header_len} bytes)")
        try:
            header = json.loads(bytes(self._map[8:8 + header_len]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._data_size = size - self._data_start
        self._entries = header

    def keys(self) -> list[str]:
        return list(self._entries)

    def tensor(self, name: str) -> np.ndarray:
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} has a corrupt header entry {entry!r}") from e
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not (0 <= begin <= end <= self._data_size) or end - begin != expected:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} data [{begin}, {end}) does not fit its shape {shape} "
                f"{entry['dtype']} or the file ({self._data_size} data bytes): truncated or corrupt")
        return np.frombuffer(self._map, dtype=dtype, count=expected // np.dtype(dtype).itemsize,
                             offset=self._data_start + begin).reshape(shape)

    def close(self) -> None:
        # Views returned by tensor() keep the buffer alive; let GC close it then.
        try:
            self._map.close()
        except BufferError:
            pass
        self._file.close()
