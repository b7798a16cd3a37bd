"""Push a ref to a remote, fetch one from it: only the blobs the other side lacks move.

A snapshot travels as a document (its files, components, pins; every blob named
by its key "<xxh3-128>:<size>") plus the blobs the receiving side lacks. A push
packs the blobs the remote's indexes do not list into new packs; a fetch reads
just the byte ranges of the blobs the local store lacks out of the remote's packs,
re-hashes each one, and writes them through the same `Ingestor.put_blob` as an
ingest. A snapshot document must hash to its snapshot id (the same identity an
ingest computes), so a damaged document is refused, not imported.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from .catalog import damaged_blob_ids
from .errors import CorruptStoreError
from .ingest import Ingestor, canonical_sha256, insert_blob_rows, now
from .lock import scratch_folder
from .objects import PACK_TARGET, PackWriter, blob_hash, fsync_dir
from .progress import progress_bar
from .remote import Lease, Remote, RemoteError, split_key

if TYPE_CHECKING:
    from .store import Store

FETCH_BATCH = 64 << 20  # bytes of ranges asked for at once (bounds memory)
REMOTE_PACK_TARGET = PACK_TARGET  # a push closes a pack past this many bytes


@dataclass
class PushResult:
    ref: str
    remote: str
    remote_ref: str
    snapshot: str
    status: str  # "new" | "updated" | "unchanged" (the remote ref already named it)
    blobs_uploaded: int
    uploaded_bytes: int  # blob payload the remote lacked, now in new packs
    present_bytes: int  # blob payload the remote already held: not sent
    metadata_bytes: int  # indexes, snapshot documents, ref, lease
    packs_written: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FetchResult:
    ref: str
    remote: str
    remote_ref: str
    snapshot: str
    status: str  # "new" | "updated" | "unchanged"
    blobs_downloaded: int
    downloaded_bytes: int  # blob payload the local store lacked
    reused_bytes: int  # blob payload the local store already held: not fetched
    metadata_bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# -- snapshot documents ------------------------------------------------------------
def snapshot_document(store: "Store", snapshot_id: str) -> dict:
    """Everything the catalog knows of one snapshot, with blobs named by key."""
    db = store.db
    snap = store.snapshot(snapshot_id)
    files = []
    for path, fid, sha, size, kind, xet, hkey, rkey in db.execute(
        """SELECT sf.path, f.id, f.sha256, f.size, f.kind, f.xet_hash,
                  hb.xxh3 || ':' || hb.size, rb.xxh3 || ':' || rb.size
           FROM snapshot_files sf JOIN files f ON f.id = sf.file_id
           LEFT JOIN blobs hb ON hb.id = f.header_blob LEFT JOIN blobs rb ON rb.id = f.raw_blob
           WHERE sf.snapshot_id = ? ORDER BY sf.path""", [snapshot_id]).fetchall():
        files.append({"path": path, "sha256": sha, "size": size, "kind": kind, "xet_hash": xet,
                      "header": hkey, "raw": rkey, "tensors": _tensor_records(
                          db, "file_tensors ft", "ft.file_id", fid)})
    slots = store.components_of(snapshot_id)
    pins = [{k: v for k, v in dict(r).items() if k != "snapshot_id"}
            for r in db.query("SELECT * FROM pins WHERE snapshot_id = ? ORDER BY slot", [snapshot_id])]
    components = []
    for cid in sorted({s["component_id"] for s in slots} | {p["component_id"] for p in pins}):
        row = db.execute(
            """SELECT c.library, c.class_name, c.n_tensors, c.tensor_bytes, b.xxh3 || ':' || b.size
               FROM components c LEFT JOIN blobs b ON b.id = c.config_blob WHERE c.id = ?""",
            [cid]).fetchone()
        components.append({"id": cid, "library": row[0], "class_name": row[1], "n_tensors": row[2],
                           "tensor_bytes": row[3], "config": row[4], "tensors": _tensor_records(
                               db, "component_tensors ct", "ct.component_id", cid)})
    return {"format": 1, "snapshot": snap, "files": files, "slots": slots, "pins": pins,
            "components": components}


def _tensor_records(db, table: str, owner_col: str, owner) -> list[list]:
    alias = table.split()[1]
    return [list(r) for r in db.execute(
        f"""SELECT t.name, t.dtype, t.shape, b.xxh3 || ':' || b.size FROM {table}
            JOIN tensors t ON t.id = {alias}.tensor_id JOIN blobs b ON b.id = t.blob_id
            WHERE {owner_col} = ? ORDER BY {alias}.pos""", [owner])]


def document_blob_keys(doc: dict) -> set[str]:
    """Every blob key a snapshot document reaches."""
    keys = set()
    for f in doc["files"]:
        keys.update(k for k in (f["header"], f["raw"]) if k)
        keys.update(t[3] for t in f["tensors"])
    for c in doc["components"]:
        if c["config"]:
            keys.add(c["config"])
        keys.update(t[3] for t in c["tensors"])
    return keys


def check_document(doc, snapshot_id: str, where: str) -> dict:
    """Refuse a document that is malformed or does not hash to its snapshot id."""
    try:
        identity = {"kind": doc["snapshot"]["kind"],
                    "files": sorted([f["path"], f["sha256"], f["size"]] for f in doc["files"])}
        if doc["pins"]:
            identity["pins"] = sorted([p["slot"], p["source"], p["component_id"]] for p in doc["pins"])
        for key in document_blob_keys(doc):
            split_key(key)
        ok = canonical_sha256(identity) == snapshot_id == doc["snapshot"]["id"]
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise RemoteError(f"{where}: the document of snapshot {snapshot_id} is damaged (it does "
                          "not hash to its id); push the ref again from a node that has it")
    return doc


def _closure(first: str, load) -> dict[str, dict]:
    """A snapshot and, transitively, the snapshots its pins name: id -> document."""
    docs: dict[str, dict] = {}
    todo = [first]
    while todo:
        sid = todo.pop()
        if sid not in docs:
            docs[sid] = load(sid)
            todo.extend(p["target_snapshot"] for p in docs[sid]["pins"])
    return docs


# -- push ----------------------------------------------------------------------------
def push(store: "Store", ref: str, remote: Remote, remote_ref: str, *,
         progress: bool = False) -> PushResult:
    t0 = time.perf_counter()
    with store.reading():  # a gc in another process waits: the snapshot resolved stays
        snap = store.resolve(ref)
        docs = _closure(snap, lambda s: snapshot_document(store, s))
        remote.ensure_format(create=True)
        with remote.lease("push") as lease:
            sent_before = remote.sent_bytes
            held = remote.blob_index()
            needed = set().union(*(document_blob_keys(d) for d in docs.values()))
            lacking = [k for k in needed if k not in held]
            locations = {k: v[1:] for k, v in _local_blobs(store, lacking).items()}
            lacking.sort(key=lambda k: locations[k])  # read local packs in order
            with progress_bar(sum(split_key(k)[1] for k in lacking), f"push {ref}", progress) as bar:
                packs = _upload_packs(store, remote, lacking, locations, lease, bar.update)
            for sid, doc in docs.items():
                if not remote.exists(f"snapshots/{sid}.json"):
                    remote.put_json(f"snapshots/{sid}.json", doc)
            if lease.expired():  # a gc may have run meanwhile: do not name what it removed
                raise RemoteError(f"push to {remote.url} outlived its lease; run it again "
                                  "(it resumes where this one stopped)")
            old = remote.get_ref(remote_ref)
            if old != snap:
                remote.set_ref(remote_ref, snap)
    uploaded = sum(split_key(k)[1] for k in lacking)
    return PushResult(
        ref, remote.url, remote_ref, snap,
        "new" if old is None else ("unchanged" if old == snap else "updated"),
        len(lacking), uploaded, sum(split_key(k)[1] for k in needed) - uploaded,
        remote.sent_bytes - sent_before - uploaded, packs, round(time.perf_counter() - t0, 3))


def _local_blobs(store: "Store", keys: Iterable[str]) -> dict[str, tuple[int, str, int, int]]:
    """key -> (blob id, pack, offset, size) of the keys this store holds."""
    out = {}
    for key in keys:
        xxh3, size = split_key(key)
        row = store.db.execute("SELECT id, pack, offset FROM blobs WHERE xxh3 = ? AND size = ? LIMIT 1",
                               [xxh3, size]).fetchone()
        if row:
            out[key] = (row[0], row[1], row[2], size)
    return out


def _intact(store: "Store", key: str, location: tuple[str, int, int]) -> memoryview:
    """A blob's stored bytes (pack, offset, size), checked against its hash: a push
    never spreads damage."""
    try:
        data = store.packs.view(*location)
        if blob_hash(data) == split_key(key)[0]:
            return data
    except CorruptStoreError:  # its pack is missing or short
        pass
    raise CorruptStoreError(f"blob {key} is damaged in this store (pack {location[0]}): nothing "
                            "more was pushed; run `compstore verify`, ingest or pull the sources "
                            "of the refs it names again, and push again")


def _upload_packs(store: "Store", remote: Remote, keys: list[str], locations, lease: Lease,
                  on_bytes) -> int:
    """Write the blobs into ~PACK_TARGET packs, each uploaded before its index."""
    batches: list[list[str]] = [[]]
    size = 0
    for key in keys:
        if batches[-1] and size >= REMOTE_PACK_TARGET:
            batches.append([])
            size = 0
        batches[-1].append(key)
        size += locations[key][2]
    # The packs are written in the store's tmp/ (the system's temp folder for a read-only
    # store): a push killed midway leaves its folder for the next writer to clear.
    with (tempfile.TemporaryDirectory(prefix="compstore-push-") if store.read_only
          else scratch_folder(store.home, "push-")) as tmp:
        for batch in (b for b in batches if b):
            path = Path(tmp) / "pack"
            digest, entries, offset = hashlib.sha256(), [], 0
            with open(path, "wb") as f:
                for key in batch:
                    data = _intact(store, key, locations[key])
                    f.write(data)
                    digest.update(data)
                    entries.append([key, offset])
                    offset += len(data)
                    on_bytes(len(data))
            name = digest.hexdigest()
            remote.put_file(f"packs/{name}.pack", str(path))
            remote.put_json(f"index/{name}.json", {"pack": name, "size": offset, "blobs": entries})
            lease.renew()
    return sum(1 for b in batches if b)


# -- fetch ---------------------------------------------------------------------------
def fetch(store: "Store", remote: Remote, remote_ref: str, name: str, *,
          progress: bool = False) -> FetchResult:
    t0 = time.perf_counter()
    remote.ensure_format(create=False)
    snap = remote.get_ref(remote_ref)
    if snap is None:
        raise RemoteError(f"no ref named {remote_ref!r} on remote {remote.url} "
                          "(see `compstore remote refs`)")
    docs = _closure(snap, lambda s: check_document(remote.snapshot_doc(s), s, remote.url))
    keys = set().union(*(document_blob_keys(d) for d in docs.values()))
    with store.writing():
        store._clean_leftovers()
        damaged = damaged_blob_ids(store.db)  # fetched again: their fresh bytes heal them
        blob_ids = {k: v[0] for k, v in _local_blobs(store, keys).items() if v[0] not in damaged}
        lacking = sorted(k for k in keys if k not in blob_ids)
        where = remote.blob_index() if lacking else {}
        missing = [k for k in lacking if k not in where]
        if missing:
            raise RemoteError(f"remote {remote.url} lacks {len(missing)} blob(s) of {remote_ref!r} "
                              f"(first: {missing[0]}): a push was interrupted; push it again")
        old = store.db.execute("SELECT snapshot_id FROM refs WHERE name = ?", [name]).fetchone()
        writer = PackWriter(store.home)
        try:
            with Ingestor(store.db, store.packs, writer) as ing, \
                    progress_bar(sum(where[k].size for k in lacking), f"fetch {name}", progress) as bar:
                for key, data in _download(remote, lacking, where):
                    if blob_hash(data) != split_key(key)[0]:
                        raise RemoteError(f"blob {key} from remote {remote.url} does not match its "
                                          "hash: the remote is damaged; push the ref again")
                    blob_ids[key] = ing.put_blob(data)
                    bar.update(len(data))

                def write_catalog(packs) -> None:
                    with store.db.atomic():
                        insert_blob_rows(store.db, ing, packs)
                        for sid in _targets_first(docs, snap):
                            _import_document(store.db, ing, docs[sid], blob_ids)
                        store._set_ref(name, snap)
                    fsync_dir(store.home)

                writer.commit_with(write_catalog)
        except BaseException:
            writer.abort()
            raise
    downloaded = sum(split_key(k)[1] for k in lacking)
    return FetchResult(
        name, remote.url, remote_ref, snap,
        "new" if old is None else ("unchanged" if old[0] == snap else "updated"),
        len(lacking), downloaded, sum(split_key(k)[1] for k in keys) - downloaded,
        remote.received_bytes - downloaded, round(time.perf_counter() - t0, 3))


def _download(remote: Remote, keys: list[str], where):
    """Yield (key, bytes) of every blob, reading adjacent blobs of a pack as one range."""
    spans: list[list] = []  # [pack, start, end, [(key, offset, size)]]
    for key in sorted(keys, key=lambda k: (where[k].pack, where[k].offset)):
        e = where[key]
        last = spans[-1] if spans else None
        if last and last[0] == e.pack and last[2] == e.offset and last[2] - last[1] < FETCH_BATCH:
            last[2] += e.size
            last[3].append((key, e.offset, e.size))
        else:
            spans.append([e.pack, e.offset, e.offset + e.size, [(key, e.offset, e.size)]])
    i = 0
    while i < len(spans):
        j, total = i, 0
        while j < len(spans) and (j == i or total + spans[j][2] - spans[j][1] <= FETCH_BATCH):
            total += spans[j][2] - spans[j][1]
            j += 1
        batch = spans[i:j]
        datas = remote.get_ranges([f"packs/{s[0]}.pack" for s in batch],
                                  [s[1] for s in batch], [s[2] for s in batch])
        for (pack, start, end, members), data in zip(batch, datas):
            view = memoryview(data)
            for key, offset, size in members:
                yield key, view[offset - start: offset - start + size]
        i = j


def _targets_first(docs: dict[str, dict], first: str) -> list[str]:
    """Snapshots in an order where every pin's target is imported before its pinner."""
    order: list[str] = []

    def visit(sid: str) -> None:
        if sid in order:
            return
        for p in docs[sid]["pins"]:
            visit(p["target_snapshot"])
        order.append(sid)

    visit(first)
    return order


def _import_document(db, ing: Ingestor, doc: dict, blob_ids: dict[str, int]) -> None:
    """Insert one snapshot's rows (inside the caller's transaction); existing rows stay."""
    snap = doc["snapshot"]
    if db.execute("SELECT 1 FROM snapshots WHERE id = ?", [snap["id"]]).fetchone():
        return  # snapshots are immutable: the same id is the same rows
    next_file = (db.execute("SELECT max(id) FROM files").fetchone()[0] or 0) + 1
    new_tensors_from = len(ing.new_tensors)
    file_ids = {}
    for f in doc["files"]:
        row = db.execute("SELECT id FROM files WHERE sha256 = ? AND size = ?",
                         [f["sha256"], f["size"]]).fetchone()
        if row:
            file_ids[f["path"]] = row[0]
            continue
        tids = [ing.tensor_id(n, d, s, blob_ids[k]) for n, d, s, k in f["tensors"]]
        _flush_tensors(db, ing, new_tensors_from)
        new_tensors_from = len(ing.new_tensors)
        db["files"].insert({"id": next_file, "sha256": f["sha256"], "size": f["size"],
                            "kind": f["kind"], "xet_hash": f["xet_hash"],
                            "header_blob": blob_ids[f["header"]] if f["header"] else None,
                            "raw_blob": blob_ids[f["raw"]] if f["raw"] else None})
        db["file_tensors"].insert_all({"file_id": next_file, "pos": i, "tensor_id": t}
                                      for i, t in enumerate(tids))
        file_ids[f["path"]] = next_file
        next_file += 1
    for c in doc["components"]:
        if db.execute("SELECT 1 FROM components WHERE id = ?", [c["id"]]).fetchone():
            continue
        tids = [ing.tensor_id(n, d, s, blob_ids[k]) for n, d, s, k in c["tensors"]]
        _flush_tensors(db, ing, new_tensors_from)
        new_tensors_from = len(ing.new_tensors)
        db["components"].insert({"id": c["id"], "library": c["library"],
                                 "class_name": c["class_name"], "n_tensors": c["n_tensors"],
                                 "tensor_bytes": c["tensor_bytes"],
                                 "config_blob": blob_ids[c["config"]] if c["config"] else None})
        db["component_tensors"].insert_all({"component_id": c["id"], "pos": i, "tensor_id": t}
                                           for i, t in enumerate(tids))
    db["snapshots"].insert({**snap, "created": snap.get("created") or now()})
    db["snapshot_files"].insert_all({"snapshot_id": snap["id"], "path": p, "file_id": fid}
                                    for p, fid in file_ids.items())
    db["snapshot_components"].insert_all({"snapshot_id": snap["id"], **s} for s in doc["slots"])
    db["pins"].insert_all({"snapshot_id": snap["id"], **p} for p in doc["pins"])


def _flush_tensors(db, ing: Ingestor, start: int) -> None:
    """Insert the tensor rows `ing` created since `start` (file rows reference them)."""
    db["tensors"].insert_all(ing.new_tensors[start:], batch_size=1000)

