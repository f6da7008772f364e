"""Torch-free safetensors reading and writing on numpy memory maps.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw bytes. Reading through ``np.memmap`` keeps multi-GB SDXL
checkpoints out of memory until a tensor is used; bf16 and fp8 map to ``ml_dtypes``.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file and tensor."""


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Returns (header dict, byte offset of the data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: file too short to be safetensors ({len(raw)} bytes)")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise SafetensorsError(f"{path}: header length {n} exceeds file size {size}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    return header, 8 + n


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's ``__metadata__`` (string to string; empty when it has none)."""
    return dict(read_header(path)[0].get("__metadata__") or {})


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of one safetensors file as a read-only numpy memory map."""
    header, start = read_header(path)
    size = os.path.getsize(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = DTYPES.get(info["dtype"])
        if dt is None:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        shape = tuple(info["shape"])
        b, e = info["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
        if e - b != count * dt.itemsize or start + e > size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} byte range [{b}, {e}) does not fit shape {shape} "
                f"of {info['dtype']} or the file size {size}")
        if count == 0:
            out[name] = np.zeros(shape, dt)
        else:
            out[name] = np.memmap(path, dtype=dt, mode="r", offset=start + b, shape=shape)
    return out


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy (or jax) arrays to a safetensors file readable by any implementation."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays, offset = [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = np.ascontiguousarray(a).reshape(a.shape)  # ascontiguousarray makes a 0-d array 1-d: keep scalars []
        if a.dtype not in _NAMES:
            raise SafetensorsError(f"{path}: cannot store tensor {name!r} of dtype {a.dtype}")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
