"""The compact binary form in which P_n(x) crosses from the sensor (Router) to an expert.

A frame is: magic b"BMW1", uint32 count, then per array: uint8 dtype-code length, the numpy
dtype code (e.g. b"|u1", b"<f4"), uint8 ndim, ndim x uint32 shape, and the raw C-order bytes.
No pickle: a frame is decoded with np.frombuffer only, and every length is checked, so a
malformed frame raises WireError instead of executing or allocating anything unexpected.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["WireError", "encode", "decode"]

MAGIC = b"BMW1"
_ALLOWED_KINDS = "biuf"  # bool, signed, unsigned, float: plain numeric arrays only


class WireError(ValueError):
    """A frame that is not a well-formed BMW1 encoding."""


def encode(arrays: list[np.ndarray]) -> bytes:
    """Frame a list of numeric arrays (e.g. one request's P_n units) as bytes."""
    parts = [MAGIC, struct.pack("<I", len(arrays))]
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        if arr.dtype.kind not in _ALLOWED_KINDS:
            raise WireError(f"cannot frame dtype {arr.dtype}: numeric arrays only")
        code = arr.dtype.str.encode()
        parts += [struct.pack("<B", len(code)), code, struct.pack("<B", arr.ndim),
                  struct.pack(f"<{arr.ndim}I", *arr.shape), arr.tobytes()]
    return b"".join(parts)


def decode(frame: bytes) -> list[np.ndarray]:
    """The arrays of a frame (read-only views on it); WireError if it is malformed."""
    view = memoryview(frame)
    if bytes(view[:4]) != MAGIC:
        raise WireError("not a BMW1 frame (bad magic)")
    pos = 4
    (count,) = _unpack("<I", view, pos)
    pos += 4
    arrays = []
    for _ in range(count):
        (code_len,) = _unpack("<B", view, pos)
        if pos + 1 + code_len > len(view):
            raise WireError("frame truncated in a header")
        code = bytes(view[pos + 1:pos + 1 + code_len]).decode("ascii", errors="replace")
        pos += 1 + code_len
        try:
            dtype = np.dtype(code)
        except TypeError:
            raise WireError(f"unknown dtype code {code!r}") from None
        if dtype.kind not in _ALLOWED_KINDS:
            raise WireError(f"dtype {dtype} is not allowed in a frame")
        (ndim,) = _unpack("<B", view, pos)
        shape = _unpack(f"<{ndim}I", view, pos + 1)
        pos += 1 + 4 * ndim
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if pos + size > len(view):
            raise WireError(f"frame truncated: array needs {size} bytes, {len(view) - pos} left")
        arrays.append(np.frombuffer(view[pos:pos + size], dtype=dtype).reshape(shape))
        pos += size
    if pos != len(view):
        raise WireError(f"{len(view) - pos} trailing bytes after the last array")
    return arrays


def _unpack(fmt: str, view: memoryview, pos: int) -> tuple:
    size = struct.calcsize(fmt)
    if pos + size > len(view):
        raise WireError("frame truncated in a header")
    return struct.unpack_from(fmt, view, pos)
