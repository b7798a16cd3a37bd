"""Strict parsing of safetensors headers, without loading any tensor.

The store keeps a safetensors file as (header bytes, tensor blobs in offset order),
so a header must describe its data section exactly: every byte belongs to exactly
one tensor, no gaps, no overlaps, nothing past the end. This is what the
safetensors library itself enforces, checked here before a single byte is stored.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from .errors import InvalidInputError

# Bytes per element of each safetensors dtype (sub-byte float types are not supported).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset inside the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    header_bytes: bytes  # the 8-byte length prefix and the JSON header, as in the file
    tensors: tuple[TensorEntry, ...]  # in data-offset order
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return len(self.header_bytes)


def parse_header(path: str, prefix: bytes, file_size: int) -> SafetensorsHeader:
    """Parse and validate a safetensors header.

    `prefix` holds at least the first 8 + header-length bytes of the file (or the
    whole file if shorter); `path` only names the file in error messages.

    >>> parse_header("x.safetensors", open("x.safetensors", "rb").read(), size)  # doctest: +SKIP
    """

    def bad(problem: str) -> InvalidInputError:
        return InvalidInputError(path, f"malformed safetensors: {problem}")

    if file_size < 8:
        raise bad(f"truncated: {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise bad(f"header length {n} runs past the end of the file ({file_size} bytes)")
    raw = bytes(prefix[8 : 8 + n])
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings")

    data_len = file_size - 8 - n
    entries: list[TensorEntry] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise bad(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {name!r}: shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise bad(f"tensor {name!r}: data_offsets must be two integers")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise bad(f"tensor {name!r}: data_offsets {offsets} are out of order")
        if end > data_len:
            raise bad(
                f"tensor {name!r}: data_offsets {offsets} out of range "
                f"(data section is {data_len} bytes)"
            )
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if expected != end - begin:
            raise bad(
                f"tensor {name!r}: shape {shape} x {dtype} is {expected} bytes "
                f"but data_offsets span {end - begin}"
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))

    entries.sort(key=lambda t: (t.begin, t.end))
    cursor = 0
    for t in entries:
        if t.begin < cursor:
            raise bad(f"tensor {t.name!r}: data_offsets overlap the previous tensor")
        if t.begin > cursor:
            raise bad(f"tensor {t.name!r}: {t.begin - cursor} unused bytes before it")
        cursor = t.end
    if cursor != data_len:
        raise bad(f"{data_len - cursor} bytes after the last tensor are not described")
    return SafetensorsHeader(bytes(prefix[: 8 + n]), tuple(entries), metadata)


def read_header(path: str, display: str | None = None) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at `path`."""
    import os

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if n <= MAX_HEADER_BYTES:
                head += f.read(n)
    return parse_header(display or path, head, size)
