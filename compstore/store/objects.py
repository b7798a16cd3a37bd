"""Payload bytes on disk: append-only pack files and the reading of blobs.

Layout (see docs/store-format.md):

    objects/packs/<name>.pack   immutable once renamed here; blobs at 64-byte aligned offsets
    tmp/<name>.pack.tmp         a pack being written; garbage after a crash

A pack is written in tmp/, fsynced, renamed into objects/packs/ and the folder
fsynced, and only then does the catalog transaction that points at it commit: the
catalog never names bytes that are not durably on disk. One pack per ingest keeps
a UNet's ~1,700 tensors in one file, one mmap and one fsync.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from pathlib import Path

import numpy as np
import xxhash

ALIGN = 64  # so that tensors mapped straight from a pack are aligned for any dtype
_ZEROS = bytes(ALIGN)


def blob_hash(data) -> str:
    """The content address of a blob: xxh3-128 of its bytes, as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(data)


def same_bytes(a, b) -> bool:
    """Byte-for-byte equality of two buffers, fast (no copies of large inputs)."""
    if len(a) != len(b):
        return False
    n = len(a)
    head = n - n % 8
    step = 1 << 24
    for i in range(0, head, step):
        j = min(i + step, head)
        if not np.array_equal(
            np.frombuffer(a, np.uint64, (j - i) // 8, i), np.frombuffer(b, np.uint64, (j - i) // 8, i)
        ):
            return False
    return bytes(a[head:]) == bytes(b[head:])


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PackWriter:
    """Appends blobs to a new pack in tmp/; `commit()` makes it durable and visible."""

    def __init__(self, home: Path):
        self.name = f"{time.time_ns():x}-{uuid.uuid4().hex[:12]}"
        self.tmp_path = home / "tmp" / f"{self.name}.pack.tmp"
        self.final_path = home / "objects" / "packs" / f"{self.name}.pack"
        self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.size = 0

    def append(self, data) -> int:
        """Write `data` at the next aligned offset; return that offset."""
        pad = -self.size % ALIGN
        if pad:
            self._write(_ZEROS[:pad])
        offset = self.size
        self._write(data)
        return offset

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view[: 1 << 30])
            view = view[n:]
            self.size += n

    def commit(self) -> str | None:
        """fsync and rename into objects/packs/; return the pack name (None if empty)."""
        if self.size == 0:
            self.abort()
            return None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.rename(self.tmp_path, self.final_path)
        fsync_dir(self.final_path.parent)
        return self.name

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp_path.unlink(missing_ok=True)


class PackFiles:
    """Maps packs on demand and hands out views of their blobs.

    `private=True` maps copy-on-write (MAP_PRIVATE, writable): tensors built on these
    views can be edited in place without the edit ever reaching the store.
    """

    def __init__(self, packs_dir: Path, private: bool = False):
        self.packs_dir = packs_dir
        self.private = private
        self._maps: dict[str, mmap.mmap] = {}

    def path(self, pack: str) -> Path:
        return self.packs_dir / f"{pack}.pack"

    def map(self, pack: str) -> mmap.mmap:
        m = self._maps.get(pack)
        if m is None:
            with open(self.path(pack), "rb") as f:
                if self.private:
                    m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
                else:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[pack] = m
        return m

    def view(self, pack: str, offset: int, size: int) -> memoryview:
        m = self.map(pack)
        if offset + size > len(m):
            raise ValueError(f"pack {pack} is {len(m)} bytes, blob needs {offset + size}")
        return memoryview(m)[offset : offset + size]

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass  # a tensor still views it; the mapping lives as long as that tensor
        self._maps.clear()
