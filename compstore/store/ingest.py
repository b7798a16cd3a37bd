"""Where bytes enter the store.

`ingest_scan` takes a validated `FolderScan`, hashes every tensor payload, header
and small file (xxh3-128), confirms each hash hit byte-for-byte against the stored
bytes, appends only the new bytes to one pack, makes the pack durable, and then
commits all catalog rows in one transaction. Called by `Store.ingest` under the
store's write lock.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import sqlite_utils

from .errors import InvalidInputError
from .objects import PackFiles, PackWriter, blob_hash, same_bytes
from .scan import FolderScan, ScannedFile

# Config keys that record who saved a file, not what the model is: an identical VAE
# saved by two diffusers versions is still one component.
VOLATILE_CONFIG_KEYS = {"_diffusers_version", "_name_or_path", "transformers_version", "_commit_hash"}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def canonical_sha256(value) -> str:
    return hashlib.sha256(
        json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


@dataclass
class IngestStats:
    files: int = 0
    tensors: int = 0
    logical_bytes: int = 0  # bytes of the input files
    written_bytes: int = 0  # new payload bytes appended to the store
    reused_bytes: int = 0  # payload bytes the store already held (confirmed byte-for-byte)


@dataclass
class _NewBlob:
    id: int
    xxh3: str
    size: int
    offset: int


@dataclass
class _FileRecord:
    id: int
    sha256: str
    size: int
    kind: str
    header_blob: int | None
    raw_blob: int | None
    tensor_ids: list[int] = field(default_factory=list)
    tensor_keys: list[tuple[str, str, str, int]] = field(default_factory=list)  # name,dtype,shape,blob
    is_new: bool = True


class Ingestor:
    """One ingest run: dedups against the catalog and this run's own pending rows."""

    def __init__(self, db: sqlite_utils.Database, packs: PackFiles, writer: PackWriter,
                 on_bytes: Callable[[int], None] = lambda n: None):
        self.db, self.packs, self.writer, self.on_bytes = db, packs, writer, on_bytes
        self.stats = IngestStats()
        self.new_blobs: list[_NewBlob] = []
        self._pending_blobs: dict[tuple[str, int], list[_NewBlob]] = {}
        self.new_tensors: list[dict] = []
        self._tensor_ids: dict[tuple[str, str, str, int], int] = {}
        self.files: dict[str, _FileRecord] = {}  # by path in the folder
        self._next_blob = (db.execute("SELECT max(id) FROM blobs").fetchone()[0] or 0) + 1
        self._next_tensor = (db.execute("SELECT max(id) FROM tensors").fetchone()[0] or 0) + 1
        self._next_file = (db.execute("SELECT max(id) FROM files").fetchone()[0] or 0) + 1
        self.blob_sizes: dict[int, int] = {}

    # -- blobs -------------------------------------------------------------------
    def put_blob(self, data) -> int:
        """Return the id of a blob holding exactly `data`, appending it if new."""
        size = len(data)
        key = (blob_hash(data), size)
        for bid, pack, offset in self.db.execute(
            "SELECT id, pack, offset FROM blobs WHERE xxh3 = ? AND size = ?", key
        ):
            if same_bytes(self.packs.view(pack, offset, size), data):
                self.stats.reused_bytes += size
                return bid
        for blob in self._pending_blobs.get(key, []):
            if same_bytes(os.pread(self.writer_fd_reader(), size, blob.offset), data):
                self.stats.reused_bytes += size
                return blob.id
        # New content (or a hash collision, which is stored as its own blob).
        offset = self.writer.append(data)
        blob = _NewBlob(self._next_blob, key[0], size, offset)
        self._next_blob += 1
        self.new_blobs.append(blob)
        self._pending_blobs.setdefault(key, []).append(blob)
        self.blob_sizes[blob.id] = size
        self.stats.written_bytes += size
        return blob.id

    def blob_size(self, blob_id: int) -> int:
        size = self.blob_sizes.get(blob_id)
        if size is None:
            size = self.db.execute("SELECT size FROM blobs WHERE id = ?", [blob_id]).fetchone()[0]
            self.blob_sizes[blob_id] = size
        return size

    _reader_fd: int = -1

    def writer_fd_reader(self) -> int:
        if self._reader_fd < 0:
            self._reader_fd = os.open(self.writer.tmp_path, os.O_RDONLY)
        return self._reader_fd

    def close(self) -> None:
        if self._reader_fd >= 0:
            os.close(self._reader_fd)
            self._reader_fd = -1

    # -- tensors -----------------------------------------------------------------
    def tensor_id(self, name: str, dtype: str, shape: str, blob_id: int) -> int:
        key = (name, dtype, shape, blob_id)
        tid = self._tensor_ids.get(key)
        if tid is None:
            row = self.db.execute(
                "SELECT id FROM tensors WHERE name=? AND dtype=? AND shape=? AND blob_id=?", key
            ).fetchone()
            if row:
                tid = row[0]
            else:
                tid = self._next_tensor
                self._next_tensor += 1
                self.new_tensors.append(
                    {"id": tid, "name": name, "dtype": dtype, "shape": shape, "blob_id": blob_id}
                )
            self._tensor_ids[key] = tid
        return tid

    # -- files -------------------------------------------------------------------
    def ingest_file(self, f: ScannedFile, sha_pool: ThreadPoolExecutor) -> None:
        with open(f.source, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if f.size else None
        try:
            data = memoryview(mm) if mm is not None else memoryview(b"")
            if len(data) != f.size:
                raise InvalidInputError(f.path, "file changed size while being ingested")
            sha = sha_pool.submit(lambda d=data: hashlib.sha256(d).hexdigest())
            header_blob = raw_blob = None
            keys: list[tuple[str, str, str, int]] = []
            if f.header is not None:
                header_blob = self.put_blob(data[: f.header.data_start])
                start = f.header.data_start
                for t in f.header.tensors:
                    blob = self.put_blob(data[start + t.begin : start + t.end])
                    keys.append((t.name, t.dtype, json.dumps(list(t.shape)), blob))
                    self.on_bytes(t.nbytes)
                self.on_bytes(start)
            else:
                raw_blob = self.put_blob(data)
                self.on_bytes(f.size)
            sha256 = sha.result()
            del data
        finally:
            if mm is not None:
                mm.close()

        row = self.db.execute(
            "SELECT id FROM files WHERE sha256 = ? AND size = ?", [sha256, f.size]
        ).fetchone()
        same = next((r for r in self.files.values() if (r.sha256, r.size) == (sha256, f.size)), None)
        if row or same:
            rec = _FileRecord(row[0] if row else same.id, sha256, f.size,
                              "safetensors" if f.header else "raw", header_blob, raw_blob,
                              is_new=False)
        else:
            rec = _FileRecord(self._next_file, sha256, f.size,
                              "safetensors" if f.header else "raw", header_blob, raw_blob)
            self._next_file += 1
        rec.tensor_keys = keys
        rec.tensor_ids = [self.tensor_id(*k) for k in keys]
        self.files[f.path] = rec
        self.stats.files += 1
        self.stats.tensors += len(keys)
        self.stats.logical_bytes += f.size


def component_rows(scan: FolderScan, ing: Ingestor) -> tuple[list[dict], list[dict], list[dict]]:
    """Components (Merkle ids over config + tensor records), their tensors, and slots."""
    components, comp_tensors, slots = [], [], []
    for c in scan.components:
        prefix = f"{c.slot}/" if c.slot else ""
        config_path = f"{prefix}config.json"
        config_blob = ing.files[config_path].raw_blob if config_path in ing.files else None
        config = None
        if config_path in scan.files:
            with open(scan.files[config_path].source, "rb") as fh:
                config = json.loads(fh.read())
            config = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
        tensors: dict[str, int] = {}
        records = []
        for path in c.weight_files:
            rec = ing.files[path]
            for key, tid in zip(rec.tensor_keys, rec.tensor_ids):
                if key[0] in tensors:
                    raise InvalidInputError(path, f"tensor {key[0]!r} also appears in another "
                                                  f"weights file of {c.slot or 'the folder'}")
                tensors[key[0]] = tid
                records.append(key)
        blob_hashes = _blob_hashes(ing, {k[3] for k in records})
        records.sort()
        identity = {
            "library": c.library, "class": c.class_name, "config": config,
            "tensors": [[n, d, s, blob_hashes[b]] for n, d, s, b in records],
        }
        if not records:  # tokenizer, scheduler...: identified by their files
            identity["files"] = sorted(
                [p[len(prefix):], ing.files[p].sha256] for p in c.files
            )
        cid = canonical_sha256(identity)
        tensor_bytes = sum(ing.blob_size(k[3]) for k in records)
        components.append({
            "id": cid, "library": c.library, "class_name": c.class_name,
            "config_blob": config_blob, "n_tensors": len(records), "tensor_bytes": tensor_bytes,
        })
        comp_tensors.extend(
            {"component_id": cid, "pos": i, "tensor_id": tensors[name]}
            for i, name in enumerate(sorted(tensors))
        )
        slots.append({"slot": c.slot, "variant": c.variant, "component_id": cid,
                      "library": c.library, "class_name": c.class_name})
    return components, comp_tensors, slots


def _blob_hashes(ing: Ingestor, ids: set[int]) -> dict[int, str]:
    out = {b.id: f"{b.xxh3}:{b.size}" for b in ing.new_blobs if b.id in ids}
    rest = [i for i in ids if i not in out]
    for i in range(0, len(rest), 500):
        chunk = rest[i : i + 500]
        q = f"SELECT id, xxh3, size FROM blobs WHERE id IN ({','.join('?' * len(chunk))})"
        for bid, h, size in ing.db.execute(q, chunk):
            out[bid] = f"{h}:{size}"
    return out


def snapshot_id(scan: FolderScan, ing: Ingestor) -> str:
    return canonical_sha256({
        "kind": scan.kind,
        "files": sorted([p, r.sha256, r.size] for p, r in ing.files.items()),
    })
