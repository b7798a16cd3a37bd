"""Where bytes enter the store.

An `Ingestor` takes the files of a validated `FolderScan`, hashes every tensor
payload, header and small file (xxh3-128), confirms each hash hit byte-for-byte
against the stored bytes (`put_blob`), and appends only new bytes to new packs.
`Store.ingest` then makes the packs durable and commits all catalog rows in one
transaction, under the store's write lock.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import sqlite_utils

from .errors import CorruptStoreError, InvalidInputError
from .objects import PackFiles, PackWriter, blob_hash, same_bytes
from .scan import FolderScan, ScannedComponent, ScannedFile

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
    healed_bytes: int = 0  # of written_bytes: fresh copies of stored blobs found damaged


@dataclass
class _NewBlob:
    id: int
    xxh3: str
    size: int
    pack: str
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
        self._new_file_ids: dict[tuple[str, int], int] = {}
        self._next_blob = (db.execute("SELECT max(id) FROM blobs").fetchone()[0] or 0) + 1
        self._next_tensor = (db.execute("SELECT max(id) FROM tensors").fetchone()[0] or 0) + 1
        self._next_file = (db.execute("SELECT max(id) FROM files").fetchone()[0] or 0) + 1
        self.blob_sizes: dict[int, int] = {}
        self.healed: dict[int, tuple[str, int]] = {}  # blob id -> its fresh copy (pack, offset)

    # -- blobs -------------------------------------------------------------------
    def put_blob(self, data) -> int:
        """Return the id of a blob holding exactly `data`, appending it if new.

        A stored blob with this hash whose stored bytes are damaged (they no longer
        hash to it, or their pack is missing or short) is healed: `data` is written
        again and the blob keeps its id, pointed at the fresh copy on commit."""
        size = len(data)
        key = (blob_hash(data), size)
        for bid, pack, offset in self.db.execute(
            "SELECT id, pack, offset FROM blobs WHERE xxh3 = ? AND size = ?", key
        ):
            try:
                stored = (self.writer.read(*self.healed[bid], size) if bid in self.healed
                          else self.packs.view(pack, offset, size))
            except CorruptStoreError:  # its pack is missing or short
                stored = None
            if stored is not None and same_bytes(stored, data):
                self.stats.reused_bytes += size
                return bid
            if stored is None or blob_hash(stored) != key[0]:
                self.healed[bid] = self.writer.append(data)
                self.stats.written_bytes += size
                self.stats.healed_bytes += size
                return bid
        for blob in self._pending_blobs.get(key, []):
            if same_bytes(self.writer.read(blob.pack, blob.offset, size), data):
                self.stats.reused_bytes += size
                return blob.id
        # New content (or a hash collision, which is stored as its own blob).
        pack, offset = self.writer.append(data)
        blob = _NewBlob(self._next_blob, key[0], size, pack, offset)
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
    def ingest_file(self, f: ScannedFile, sha256: str | None = None) -> None:
        """Store the blobs of one file; its sha256 is settled later by `finish()`.

        `sha256`: the file's, computed by the caller from these very bytes (a pull
        checks every download against the Hub's); taken as is, not hashed again."""
        rec = _FileRecord(0, sha256 or "", f.size, _kind(f),
                          None, None)
        with open(f.source, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if f.size else None
            if mm is not None and hasattr(mmap, "MADV_SEQUENTIAL"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            data = memoryview(mm) if mm is not None else memoryview(b"")
            if len(data) != f.size:
                raise InvalidInputError(f.path, "file changed size while being ingested")
            keys: list[tuple[str, str, str, int]] = []
            if f.header is not None:
                rec.header_blob = self._put_range(rec, mm, data, 0, f.header.data_start)
                start = f.header.data_start
                for t in f.header.tensors:
                    blob = self._put_range(rec, mm, data, start + t.begin, start + t.end)
                    keys.append((*_listed(t), blob))
                    self.on_bytes(t.nbytes)
                self.on_bytes(start)
            else:
                rec.raw_blob = self._put_range(rec, mm, data, 0, f.size)
                self.on_bytes(f.size)
            del data
        rec.tensor_keys = keys
        rec.tensor_ids = [self.tensor_id(*k) for k in keys]
        self.files[f.path] = rec
        self.stats.files += 1
        self.stats.tensors += len(keys)
        self.stats.logical_bytes += f.size

        # No new byte (so no sha256 started): every byte was just confirmed equal to
        # stored blobs. If a stored file has exactly this composition, its recorded
        # sha256 is this file's sha256.
        started = self._hashing(rec)
        known = not started and self._known_file(rec)
        if known:
            rec.id, rec.sha256, rec.is_new = known
        elif rec.sha256:
            self._name(rec)
        elif not started:
            self._hash(rec, mm)
        if mm is not None and not self._hashing(rec):  # else the hash closes it
            mm.close()
        while len(self._pending_sha) > 4:  # bound the mapped files held open
            self._settle(self._pending_sha.pop(0))

    def reuse_file(self, f: ScannedFile, sha256: str) -> bool:
        """Take `f` as the stored file with this sha256, without reading it: the stat
        cache vouches that its bytes are those the sha256 was taken of (stat_cache.py).
        False, and nothing taken, when the store holds no such file or the stored one
        lists other tensors than `f`'s header: then `f` must be read."""
        row = self.db.execute("SELECT id, kind, header_blob, raw_blob FROM files "
                              "WHERE sha256 = ? AND size = ?", [sha256, f.size]).fetchone()
        if row is None or row[1] != _kind(f):
            return False
        rows = self.db.execute(
            "SELECT t.id, t.name, t.dtype, t.shape, t.blob_id FROM file_tensors ft "
            "JOIN tensors t ON t.id = ft.tensor_id WHERE ft.file_id = ? ORDER BY ft.pos", [row[0]]).fetchall()
        listed = [_listed(t) for t in f.header.tensors] if f.header else []
        if [tuple(r[1:4]) for r in rows] != listed:
            return False
        self.files[f.path] = _FileRecord(row[0], sha256, f.size, row[1], row[2], row[3],
                                         [r[0] for r in rows], [tuple(r[1:]) for r in rows], is_new=False)
        self.stats.files += 1
        self.stats.tensors += len(rows)
        self.stats.logical_bytes += f.size
        self.stats.reused_bytes += f.size
        self.on_bytes(f.size)
        return True

    def _put_range(self, rec: _FileRecord, mm: mmap.mmap | None, data: memoryview,
                   a: int, b: int) -> int:
        """`put_blob` of bytes [a, b) of the file being ingested. The file's sha256,
        unless given, starts at its first new byte, to run on a side thread beside
        the writing of the rest (a file the store holds whole is never hashed)."""
        _populate(mm, a, b)
        written = self.stats.written_bytes
        blob = self.put_blob(data[a:b])
        if self.stats.written_bytes != written and not (rec.sha256 or self._hashing(rec)):
            self._hash(rec, mm)
        return blob

    def _hashing(self, rec: _FileRecord) -> bool:
        return bool(self._pending_sha) and self._pending_sha[-1][0] is rec

    def _hash(self, rec: _FileRecord, mm: mmap.mmap | None) -> None:
        # The hash gets the mapping, not a view of it: a pool worker holds its call's
        # arguments for a moment after the result is set, and a view it held then
        # would make `_settle`'s close fail ("exported pointers exist").
        self._pending_sha.append((rec, mm, self._sha_pool.submit(_sha256, b"" if mm is None else mm)))

    def _known_file(self, rec: _FileRecord) -> tuple[int, str, bool] | None:
        for fid, sha in self.db.execute(
            "SELECT id, sha256 FROM files WHERE size = ? AND kind = ? AND header_blob IS ? "
            "AND raw_blob IS ?", [rec.size, rec.kind, rec.header_blob, rec.raw_blob]
        ).fetchall():
            ids = [r[0] for r in self.db.execute(
                "SELECT tensor_id FROM file_tensors WHERE file_id = ? ORDER BY pos", [fid])]
            if ids == rec.tensor_ids:
                return fid, sha, False
        return None

    def _settle(self, pending) -> None:
        rec, mm, future = pending
        rec.sha256 = future.result()
        if mm is not None:
            mm.close()
        self._name(rec)

    def _name(self, rec: _FileRecord) -> None:
        """Give a file whose sha256 is known its id: a stored file's, a file's of this
        run with the same bytes, or a new one."""
        row = self.db.execute(
            "SELECT id FROM files WHERE sha256 = ? AND size = ?", [rec.sha256, rec.size]
        ).fetchone()
        key = (rec.sha256, rec.size)
        if row or key in self._new_file_ids:  # the same bytes under two paths: one file
            rec.id, rec.is_new = (row[0] if row else self._new_file_ids[key]), False
        else:
            rec.id = self._next_file
            self._next_file += 1
            self._new_file_ids[key] = rec.id

    def finish(self) -> None:
        """Wait for the sha256 of every new file and give each file its id."""
        while self._pending_sha:
            self._settle(self._pending_sha.pop(0))

    def __enter__(self) -> "Ingestor":
        self._sha_pool = ThreadPoolExecutor(2, thread_name_prefix="compstore-sha256")
        self._pending_sha = []
        return self

    def __exit__(self, *exc) -> None:
        for rec, mm, future in self._pending_sha:
            future.cancel()
        self._sha_pool.shutdown(wait=True)
        for rec, mm, future in self._pending_sha:
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
        self._pending_sha = []


def insert_blob_rows(db: sqlite_utils.Database, ing: Ingestor, packs: list[tuple[str, int]]) -> None:
    """The rows of the packs a run wrote and of its new blobs, and healed blobs pointed
    at their fresh copies (in the caller's transaction: the old copies are left to gc)."""
    db["packs"].insert_all({"name": name, "size": size} for name, size in packs)
    db["blobs"].insert_all(
        ({"id": b.id, "xxh3": b.xxh3, "size": b.size, "pack": b.pack, "offset": b.offset}
         for b in ing.new_blobs), batch_size=1000)
    db.conn.executemany("UPDATE blobs SET pack = ?, offset = ? WHERE id = ?",
                        [(p, o, b) for b, (p, o) in ing.healed.items()])
    if ing.healed and "damaged_blobs" in db.table_names():
        db.conn.executemany("DELETE FROM damaged_blobs WHERE blob_id = ?", [(b,) for b in ing.healed])


# Linux 5.14+: map a range of a file in one call. `write()` from a mapping that
# faults in page by page runs at half speed (1 GiB: 0.55 s, 0.24 s populated first).
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22) if sys.platform == "linux" else None
_POPULATE_MIN = 1 << 16  # smaller ranges fault in a few pages; not worth a call


def _kind(f: ScannedFile) -> str:
    """A file's kind in the catalog."""
    return "raw" if f.header is None else "gguf" if f.is_gguf else "safetensors"


def _listed(t) -> tuple[str, str, str]:
    """A header entry as the catalog's tensors rows hold it: name, dtype, shape (JSON)."""
    return t.name, t.dtype, json.dumps(list(t.shape))


def _populate(mm: mmap.mmap | None, a: int, b: int) -> None:
    global _POPULATE_READ
    if mm is None or _POPULATE_READ is None or b - a < _POPULATE_MIN:
        return
    start = a - a % mmap.PAGESIZE
    try:
        mm.madvise(_POPULATE_READ, start, b - start)
    except OSError as e:  # an older kernel: EINVAL; anything else shows at the read
        if e.errno == errno.EINVAL:
            _POPULATE_READ = None


def _sha256(buffer) -> str:
    return hashlib.sha256(buffer).hexdigest()  # the GIL released on large buffers; no view kept


def component_rows(scan: FolderScan, ing: Ingestor) -> tuple[list[dict], list[dict], list[dict]]:
    """Components (Merkle ids over config + tensor records), their tensors, and slots."""
    components, comp_tensors, slots = [], [], []
    for c in scan.components:
        prefix = f"{c.slot}/" if c.slot else ""
        config_path = f"{prefix}config.json"
        config_blob = ing.files[config_path].raw_blob if config_path in ing.files else None
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
        cid = component_id(scan, c, [[n, d, s, blob_hashes[b]] for n, d, s, b in records],
                           lambda path: ing.files[path].sha256)
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


def component_id(scan: FolderScan, c: ScannedComponent, tensors: list[list[str]],
                 file_sha256: Callable[[str], str]) -> str:
    """A component's id: the Merkle hash of its class, its config (less the keys that
    name a library version or a path) and its tensors ([name, dtype, shape, "xxh3:size"]);
    a component with no tensor (tokenizer, scheduler) by its files' sha256."""
    prefix = f"{c.slot}/" if c.slot else ""
    config = None
    if f"{prefix}config.json" in scan.files:
        with open(scan.files[f"{prefix}config.json"].source, "rb") as fh:
            config = json.loads(fh.read())
        config = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    identity = {"library": c.library, "class": c.class_name, "config": config, "tensors": sorted(tensors)}
    if not tensors:  # tokenizer, scheduler...: identified by their files
        identity["files"] = sorted([p[len(prefix):], file_sha256(p)] for p in c.files)
    return canonical_sha256(identity)


def component_id_unwritten(scan: FolderScan, c: ScannedComponent) -> str:
    """The id an ingest of `scan` would give `c`, from its files' bytes, writing
    nothing (each tensor's bytes hashed as `put_blob` hashes a blob)."""
    tensors = []
    for path in c.weight_files:
        f = scan.files[path]
        with open(f.source, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            for t in f.header.tensors:
                a, b = f.header.data_start + t.begin, f.header.data_start + t.end
                tensors.append([*_listed(t), f"{blob_hash(view[a:b])}:{b - a}"])
            del view

    def file_sha256(path: str) -> str:
        with open(scan.files[path].source, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    return component_id(scan, c, tensors, file_sha256)


def _blob_hashes(ing: Ingestor, ids: set[int]) -> dict[int, str]:
    out = {b.id: f"{b.xxh3}:{b.size}" for b in ing.new_blobs if b.id in ids}
    rest = [i for i in ids if i not in out]
    for i in range(0, len(rest), 500):
        chunk = rest[i : i + 500]
        q = f"SELECT id, xxh3, size FROM blobs WHERE id IN ({','.join('?' * len(chunk))})"
        for bid, h, size in ing.db.execute(q, chunk):
            out[bid] = f"{h}:{size}"
    return out


def snapshot_id(scan: FolderScan, ing: Ingestor, pins=()) -> str:
    """Content identity of a folder: its files, and for a modular one what it pins."""
    identity = {"kind": scan.kind, "files": sorted([p, r.sha256, r.size] for p, r in ing.files.items())}
    if pins:
        identity["pins"] = sorted([p.slot, p.source, p.component_id] for p in pins)
    return canonical_sha256(identity)
