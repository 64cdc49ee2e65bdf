"""A memory-mapped GGUF file: its metadata, its tensor directory, and each tensor's raw bytes.

The layout (GGUF v2/v3, little-endian):

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset

`gguf.GGUFReader` reads the same thing but builds a numpy view per array element, which takes
~8 s for a 262k-token vocabulary; this parser reads string arrays with `struct` and numeric
arrays with one `np.frombuffer`, so opening any file takes well under a second. Type ids and
block sizes still come from the `gguf` package.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tokenmill.errors import ModelLoadError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value type id -> (struct format, numpy dtype) for the fixed-size scalar types.
_SCALAR_TYPES: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "?"),
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF's ne reversed, so ne0 (contiguous) is last
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    num_bytes: int


class GGUFFile:
    """An open GGUF: `metadata` (key -> value), `tensors` (name -> info, in file order).

    Numeric metadata arrays are numpy arrays, string arrays are lists of str. `raw(info)` is a
    read-only uint8 view into the memory map; nothing is read until it is touched.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise ModelLoadError(f"GGUF file not found: {path}")
        self._file = open(path, "rb")  # noqa: SIM115 - kept open for the memory map's lifetime
        try:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file cannot be mapped
            self._file.close()
            raise _corrupt(path, str(exc)) from exc
        try:
            self.version, self.metadata, self.tensors = _parse(self._map, path)
        except (struct.error, IndexError, ValueError, OverflowError, UnicodeDecodeError) as exc:
            self.close()
            raise _corrupt(path, f"{type(exc).__name__}: {exc}") from exc
        except ModelLoadError:
            self.close()
            raise
        self._data = np.frombuffer(self._map, dtype=np.uint8)

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        return self._data[info.offset : info.offset + info.num_bytes]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def close(self) -> None:
        # Views handed out by raw() keep the map alive; closing then would raise BufferError.
        self._data = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError):
            self._map.close()
        self._file.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _corrupt(path: str, detail: str) -> ModelLoadError:
    return ModelLoadError(f"GGUF file {path} is truncated or corrupt ({detail})")


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def need(self, num_bytes: int) -> None:
        if num_bytes < 0 or self.pos + num_bytes > self.size:
            raise ValueError(f"needs {num_bytes} bytes at offset {self.pos}, file has {self.size}")

    def string(self) -> str:
        length = self.unpack("<Q")
        self.need(length)
        text = self.buf[self.pos : self.pos + length].decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_TYPES:
            return self.unpack(_SCALAR_TYPES[value_type][0])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        raise ValueError(f"unknown metadata value type {value_type}")

    def array(self) -> Any:
        item_type = self.unpack("<I")
        count = self.unpack("<Q")
        if item_type in _SCALAR_TYPES:
            dtype = np.dtype(_SCALAR_TYPES[item_type][1])
            self.need(count * dtype.itemsize)
            out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return out
        # Every string or nested array takes at least 8 bytes; refuse absurd counts up front.
        self.need(count * 8)
        if item_type == _STRING:
            return [self.string() for _ in range(count)]
        return [self.value(item_type) for _ in range(count)]


def _parse(buf: mmap.mmap, path: str) -> tuple[int, dict[str, Any], dict[str, GGUFTensorInfo]]:
    cur = _Cursor(buf)
    cur.need(24)
    if buf[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
    version = cur.unpack("<4xI")
    if version not in (2, 3):
        raise UnsupportedModelError(
            f"GGUF version {version} of {path} is not supported (supported: 2, 3; "
            "big-endian files are not supported)"
        )
    num_tensors, num_kv = cur.unpack("<Q"), cur.unpack("<Q")
    cur.need(num_kv * 12 + num_tensors * 24)
    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    raw_infos = []
    for _ in range(num_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        cur.need(n_dims * 8)
        ne = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos)
        cur.pos += n_dims * 8
        raw_infos.append((name, ne, cur.unpack("<I"), cur.unpack("<Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, ne, type_id, offset in raw_infos:
        info = _tensor_info(path, name, ne, type_id, data_start + offset)
        if info.offset + info.num_bytes > cur.size:
            raise _corrupt(
                path,
                f"tensor {name} ends at byte {info.offset + info.num_bytes}, "
                f"file has {cur.size} bytes",
            )
        tensors[name] = info
    return version, metadata, tensors


def _tensor_info(path: str, name: str, ne: tuple[int, ...], type_id: int, offset: int):
    try:
        ggml_type = GGMLQuantizationType(type_id)
    except ValueError:
        raise UnsupportedModelError(
            f"tensor {name} in {path} has unknown GGML type id {type_id}"
        ) from None
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    num_elements = int(np.prod(ne, dtype=np.int64)) if ne else 1
    if ne and ne[0] % block_size:
        raise _corrupt(path, f"tensor {name}: row of {ne[0]} is not a multiple of {block_size}")
    num_bytes = num_elements // block_size * type_size
    return GGUFTensorInfo(name, tuple(reversed(ne)), ggml_type, offset, num_bytes)
