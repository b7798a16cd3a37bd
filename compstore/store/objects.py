"""Payload bytes on disk: append-only pack files and the reading of blobs.

Layout (see docs/store-format.md):

    objects/packs/<name>.pack   immutable once renamed here; blobs at 64-byte aligned offsets
    tmp/<name>.pack.tmp         a pack being written; garbage after a crash

A pack is written in tmp/, fsynced, renamed into objects/packs/ and the folder
fsynced, and only then does the catalog transaction that points at it commit: the
catalog never names bytes that are not durably on disk. Packs of ~256 MiB keep a
UNet's ~1,700 tensors in a few files, mmaps and fsyncs (one file per tensor would
cost 1,700 fsyncs per UNet).
"""

from __future__ import annotations

import errno
import mmap
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

from .errors import CorruptStoreError, DiskFullError

ALIGN = 64  # so that tensors mapped straight from a pack are aligned for any dtype
_ZEROS = bytes(ALIGN)
PACK_TARGET = 256 << 20


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


class _Pack:
    """One pack being written in tmp/."""

    def __init__(self, home: Path):
        self.name = f"{time.time_ns():x}-{uuid.uuid4().hex[:12]}"
        self.tmp_path = home / "tmp" / f"{self.name}.pack.tmp"
        self.final_path = home / "objects" / "packs" / f"{self.name}.pack"
        self.fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.size = 0
        self.syncing = False  # its fsync has started: nothing more is appended

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            try:
                n = os.write(self.fd, view[: 1 << 30])
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFullError(
                        f"disk full while writing to {self.tmp_path.parent.parent}: free space "
                        "and retry; nothing was stored") from None
                raise
            view = view[n:]
            self.size += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PackWriter:
    """Appends blobs to new packs in tmp/; `commit()` makes them durable and visible.

    A pack is closed once it passes PACK_TARGET bytes (a blob never spans two):
    several files let the kernel write back and fsync in parallel, and keep gc's
    compaction of a partly dead pack small.
    """

    def __init__(self, home: Path, target: int = PACK_TARGET):
        self.home, self.target = home, target
        self.packs: list[_Pack] = []
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="compstore-fsync")
        self._syncs: list[Future] = []

    @property
    def size(self) -> int:
        return sum(p.size for p in self.packs)

    def append(self, data) -> tuple[str, int]:
        """Write `data` at an aligned offset; return (pack name, offset).

        Plain large writes, not copy_file_range: the kernel's copy fills the page cache
        with 4 KiB folios, and every later load then takes one page fault per 4 KiB
        (measured: 576k faults to read an SD-1.5 UNet, 36k after plain writes).
        """
        if not self.packs or self.packs[-1].syncing or self.packs[-1].size >= self.target:
            self.seal()  # a full pack: its fsync overlaps the writing of the next
            self.packs.append(_Pack(self.home))
        pack = self.packs[-1]
        pad = -pack.size % ALIGN
        if pad:
            pack.write(_ZEROS[:pad])
        offset = pack.size
        pack.write(data)
        return pack.name, offset

    def seal(self) -> None:
        """Start the last pack's fsync on a side thread, beside whatever the caller
        does before `commit()` (a later `append` opens a new pack)."""
        if self.packs and not self.packs[-1].syncing:
            self.packs[-1].syncing = True
            self._syncs.append(self._syncer.submit(os.fsync, self.packs[-1].fd))

    def read(self, pack: str, offset: int, size: int) -> bytes:
        """Read back bytes appended in this run (to confirm a duplicate within it)."""
        p = next(p for p in self.packs if p.name == pack)
        return os.pread(p.fd, size, offset)

    def commit(self) -> list[tuple[str, int]]:
        """fsync and rename every pack into objects/packs/; return [(name, size)]."""
        self.seal()
        for f in self._syncs:
            f.result()
        for p in self.packs:
            p.close()
        for p in self.packs:
            os.rename(p.tmp_path, p.final_path)
        if self.packs:
            fsync_dir(self.home / "objects" / "packs")
        return [(p.name, p.size) for p in self.packs]

    def commit_with(self, write_catalog) -> list[tuple[str, int]]:
        """`commit()`, then `write_catalog(packs)` (one catalog transaction); if that
        fails, the catalog rolled back and the new packs are unlinked too."""
        packs = self.commit()
        try:
            write_catalog(packs)
        except BaseException:
            for name, _ in packs:
                (self.home / "objects" / "packs" / f"{name}.pack").unlink(missing_ok=True)
            raise
        return packs

    def abort(self) -> None:
        for f in self._syncs:
            f.exception()  # never close an fd that an fsync is using
        for p in self.packs:
            p.close()
            p.tmp_path.unlink(missing_ok=True)
        self.packs = []


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
        """The bytes of a blob; `CorruptStoreError` when its pack is missing or short."""
        try:
            m = self.map(pack)
        except FileNotFoundError:
            raise CorruptStoreError(f"pack {pack} is missing; run `compstore verify`") from None
        if offset + size > len(m):
            raise CorruptStoreError(f"pack {pack} is {len(m)} bytes, a blob needs {offset + size}; "
                                    "run `compstore verify`")
        return memoryview(m)[offset : offset + size]

    def readable(self, pack: str, offset: int, size: int) -> bool:
        """Whether a blob's pack is there and long enough (else: damage `verify` names)."""
        try:
            self.view(pack, offset, size)
        except CorruptStoreError:
            return False
        return True

    def drop_deleted(self) -> None:
        """Close the mappings of packs whose files are gone: another process's gc
        deleted them (a mapping holds a deleted file's disk space, as an open file does)."""
        self._let_go([p for p in list(self._maps) if not self.path(p).exists()])

    def close(self) -> None:
        self._let_go(list(self._maps))

    def _let_go(self, packs: list[str]) -> None:
        for pack in packs:
            m = self._maps.pop(pack, None)
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass  # a tensor still views it; the mapping lives as long as that tensor
