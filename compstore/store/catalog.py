"""The catalog: the SQLite index (through sqlite-utils) of everything the store holds.

    packs(name, size)                                  payload files under objects/packs/
    blobs(id, xxh3, size, pack, offset)                raw bytes: a tensor's payload, a
                                                       safetensors header, a small file
    tensors(id, name, dtype, shape, blob_id)           same bytes, other dtype/shape: new row
    files(id, sha256, size, kind, header_blob, raw_blob, xet_hash)
    file_tensors(file_id, pos, tensor_id)              a safetensors file = header + these
    components(id, library, class_name, config_blob, n_tensors, tensor_bytes)
    component_tensors(component_id, pos, tensor_id)
    snapshots(id, source, revision, kind, created)
    snapshot_files(snapshot_id, path, file_id)         the exact file set, for export
    snapshot_components(snapshot_id, slot, variant, component_id)
    pins(snapshot_id, slot, source, ..., target_snapshot, component_id)
                                                       modular entries resolved at ingest
    refs(name, snapshot_id, created, updated)          the GC roots (pins keep their targets)
    xet_chunks(xorb, chunk_index, file_id, offset, length)
                                                       Xet chunk index: which bytes of a stored
                                                       file a Xet chunk produced (see xet.py)
    stat_cache(ref, stamp, snapshot_id, counts)        the folder a ref was ingested from, as
                                                       its files' stat describes them
                                                       (see stat_cache.py)
    stat_cache_files(ref, path, stamp, sha256, snapshot_id)
                                                       each of its files' stat, and the sha256
                                                       of the bytes read then
    damaged_blobs(blob_id, xxh3, pack, offset, problem)
                                                       what the last `verify` found damaged;
                                                       an ingest, pull or fetch that brings
                                                       those bytes again heals them
    meta(key, value)                                   schema version

Only `Store` writes here, under the store's write lock and in one transaction per
operation.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import sqlite_utils

from .errors import CorruptStoreError

SCHEMA_VERSION = 1


# What a damaged catalog leaves a user, said wherever one is met (a catalog cannot be
# rebuilt from packs: they hold bare bytes).
REBUILD_ADVICE = ("restore catalog.db from a backup (`compstore restore-catalog BACKUP`, of one made by "
                  "`compstore backup-catalog`), or move the store aside and ingest, pull or fetch its "
                  "pipelines into a new one")


def is_damage(e: sqlite3.Error) -> bool:
    """Whether a SQLite error says the catalog file itself is damaged."""
    return "malformed" in str(e) or "not a database" in str(e)


@contextmanager
def damaged_catalog_is_an_error(path: Path) -> Iterator[None]:
    """Turn SQLite's "file is not a database" / "database disk image is malformed"
    into a `CorruptStoreError` that says what to do."""
    try:
        yield
    except sqlite3.DatabaseError as e:
        if not is_damage(e):
            raise
        raise CorruptStoreError(
            f"the catalog {path} is damaged ({e}): {REBUILD_ADVICE}") from None


def open_catalog(path: Path, timeout_s: float = 60.0, read_only: bool = False) -> sqlite_utils.Database:
    if read_only:
        # A writer that has the catalog open (or was killed) left its latest commits in
        # the -wal file: read-only, SQLite reads them through the -shm it left too. With
        # neither beside it (a clean close) and no right to make them, only an immutable
        # open works, and then there is no WAL to miss.
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            conn.close()
            conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, isolation_level=None)
        return sqlite_utils.Database(conn)
    conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    return sqlite_utils.Database(conn)


@contextmanager
def _immediate(db: sqlite_utils.Database) -> Iterator[None]:
    """A transaction that takes SQLite's write lock at its start (BEGIN IMMEDIATE), through
    the busy timeout. sqlite-utils' `atomic()` begins deferred: its first statement reads,
    and asking for the write lock inside a read transaction is refused at once ("database
    is locked": SQLite does not wait there, lest two such transactions deadlock) while
    another connection holds it, as one does that runs WAL recovery on first opening a new
    catalog. Until 2026-12-07 a new store opened by 16 threads at once failed so in 2 of
    1,500 rounds (/tmp/explore/openers16.py, an exploratory script; 8 threads, once in a
    run of the test suite). Within a transaction: a savepoint of it, as `atomic()` makes."""
    if db.conn.in_transaction:
        with db.atomic():
            yield
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")


def schema_ready(db: sqlite_utils.Database) -> bool:
    """Whether the catalog has every table: if not, `ensure_schema` must write, under
    the store's write lock (processes opening a new store at once would race)."""
    return {"meta", *_LATER_TABLES} <= set(db.table_names())


def ensure_schema(db: sqlite_utils.Database, read_only: bool = False) -> None:
    """Create the tables if this is a new store (WAL mode first); refuse a newer
    schema. Creating them, the caller holds the store's write lock."""
    if "meta" in db.table_names():
        if not read_only and not schema_ready(db):
            _create_later_tables(db)  # added within schema 1: older readers ignore them
        version = int(db["meta"].get("schema_version")["value"])
        if version != SCHEMA_VERSION:
            from .errors import CompstoreError

            raise CompstoreError(
                f"catalog schema version {version} is not supported by this compstore "
                f"(expects {SCHEMA_VERSION}); upgrade compstore"
            )
        return
    if read_only:  # an empty catalog.db (a lost one, with no packs beside it either)
        from .errors import CompstoreError

        raise CompstoreError(f"{db.conn.execute('PRAGMA database_list').fetchone()[2]} holds no "
                             "compstore catalog: this folder is not a store (open it writable to make one)")
    if db.journal_mode != "wal":  # kept in the file: every later connection is in WAL mode
        db.enable_wal()
    with _immediate(db):
        db["packs"].create({"name": str, "size": int}, pk="name")
        db["blobs"].create(
            {"id": int, "xxh3": str, "size": int, "pack": str, "offset": int},
            pk="id", foreign_keys=[("pack", "packs", "name")],
        )
        db["blobs"].create_index(["xxh3", "size"])
        db["blobs"].create_index(["pack"])
        db["tensors"].create(
            {"id": int, "name": str, "dtype": str, "shape": str, "blob_id": int},
            pk="id", foreign_keys=[("blob_id", "blobs", "id")],
        )
        db["tensors"].create_index(["name", "dtype", "shape", "blob_id"], unique=True)
        db["tensors"].create_index(["blob_id"])
        db["files"].create(
            {"id": int, "sha256": str, "size": int, "kind": str,
             "header_blob": int, "raw_blob": int, "xet_hash": str},
            pk="id", foreign_keys=[("header_blob", "blobs", "id"), ("raw_blob", "blobs", "id")],
        )
        db["files"].create_index(["sha256", "size"], unique=True)
        db["files"].create_index(["header_blob"])
        db["files"].create_index(["raw_blob"])
        db["file_tensors"].create(
            {"file_id": int, "pos": int, "tensor_id": int},
            pk=("file_id", "pos"),
            foreign_keys=[("file_id", "files", "id"), ("tensor_id", "tensors", "id")],
        )
        db["file_tensors"].create_index(["tensor_id"])
        db["components"].create(
            {"id": str, "library": str, "class_name": str, "config_blob": int,
             "n_tensors": int, "tensor_bytes": int},
            pk="id", foreign_keys=[("config_blob", "blobs", "id")],
        )
        db["component_tensors"].create(
            {"component_id": str, "pos": int, "tensor_id": int},
            pk=("component_id", "pos"),
            foreign_keys=[("component_id", "components", "id"), ("tensor_id", "tensors", "id")],
        )
        db["snapshots"].create(
            {"id": str, "source": str, "revision": str, "kind": str, "created": str}, pk="id"
        )
        db["snapshot_files"].create(
            {"snapshot_id": str, "path": str, "file_id": int},
            pk=("snapshot_id", "path"),
            foreign_keys=[("snapshot_id", "snapshots", "id"), ("file_id", "files", "id")],
        )
        db["snapshot_files"].create_index(["file_id"])
        db["snapshot_components"].create(
            {"snapshot_id": str, "slot": str, "variant": str, "component_id": str,
             "library": str, "class_name": str},
            pk=("snapshot_id", "slot", "variant"),
            foreign_keys=[("snapshot_id", "snapshots", "id"), ("component_id", "components", "id")],
        )
        db["pins"].create(
            {"snapshot_id": str, "slot": str, "pointer": str, "source": str, "subfolder": str,
             "revision": str,
             "variant": str, "target_snapshot": str, "component_id": str, "library": str,
             "class_name": str},
            pk=("snapshot_id", "slot"),
            foreign_keys=[("snapshot_id", "snapshots", "id"), ("target_snapshot", "snapshots", "id"),
                          ("component_id", "components", "id")],
        )
        db["refs"].create(
            {"name": str, "snapshot_id": str, "created": str, "updated": str},
            pk="name", foreign_keys=[("snapshot_id", "snapshots", "id")],
        )
        db["meta"].create({"key": str, "value": str}, pk="key")
        db["meta"].insert({"key": "schema_version", "value": str(SCHEMA_VERSION)})
        _create_later_tables(db)


_LATER_TABLES = ("xet_chunks", "stat_cache", "stat_cache_files", "damaged_blobs", "revision_names")


def _create_later_tables(db: sqlite_utils.Database) -> None:
    """Tables added within schema 1. No foreign keys: gc deletes the rows of dead
    files and refs, and a row that outlives them (an older compstore's gc or rm)
    costs a sha256 mismatch and a re-fetch (xet_chunks), or nothing (stat_cache:
    it is trusted only while its ref points at its snapshot; stat_cache_files: a
    file whose sha256 the store no longer holds is read; damaged_blobs: a row is
    trusted only while its blob is still where verify found it; revision_names: a
    commit no ref holds any more is not found offline, as before the row)."""
    with _immediate(db):
        db["xet_chunks"].create(
            {"xorb": str, "chunk_index": int, "file_id": int, "offset": int, "length": int},
            pk=("xorb", "chunk_index", "file_id"), if_not_exists=True)
        db["xet_chunks"].create_index(["file_id"], if_not_exists=True)
        db["stat_cache"].create({"ref": str, "stamp": str, "snapshot_id": str, "counts": str},
                                pk="ref", if_not_exists=True)
        db["stat_cache_files"].create({"ref": str, "path": str, "stamp": str, "sha256": str,
                                       "snapshot_id": str}, pk=("ref", "path"), if_not_exists=True)
        db["damaged_blobs"].create({"blob_id": int, "xxh3": str, "pack": str, "offset": int,
                                    "problem": str}, pk="blob_id", if_not_exists=True)
        db["revision_names"].create({"repo": str, "revision": str, "commit_id": str},
                                    pk=("repo", "revision"), if_not_exists=True)


def blobs_of_snapshot(db: sqlite_utils.Database, snapshot_id: str) -> dict[int, int]:
    """Every blob a snapshot reaches (headers, tensors, small files): blob id -> size."""
    sql = """
    WITH f AS (SELECT file_id FROM snapshot_files WHERE snapshot_id = :s)
    SELECT b.id, b.size FROM blobs b WHERE b.id IN (
        SELECT header_blob FROM files WHERE id IN f AND header_blob IS NOT NULL
        UNION SELECT raw_blob FROM files WHERE id IN f AND raw_blob IS NOT NULL
        UNION SELECT t.blob_id FROM file_tensors ft JOIN tensors t ON t.id = ft.tensor_id
              WHERE ft.file_id IN f
        UNION SELECT c.config_blob FROM snapshot_components sc
              JOIN components c ON c.id = sc.component_id
              WHERE sc.snapshot_id = :s AND c.config_blob IS NOT NULL
        UNION SELECT t.blob_id FROM pins p JOIN component_tensors ct ON ct.component_id = p.component_id
              JOIN tensors t ON t.id = ct.tensor_id WHERE p.snapshot_id = :s
        UNION SELECT c.config_blob FROM pins p JOIN components c ON c.id = p.component_id
              WHERE p.snapshot_id = :s AND c.config_blob IS NOT NULL
    )"""
    return {row[0]: row[1] for row in db.execute(sql, {"s": snapshot_id})}


def tensor_blobs_of_snapshot(db: sqlite_utils.Database, snapshot_id: str) -> dict[int, int]:
    """The tensor-payload blobs of a snapshot (no headers, no small files): id -> size."""
    sql = """
    SELECT DISTINCT t.blob_id, b.size FROM snapshot_files sf
    JOIN file_tensors ft ON ft.file_id = sf.file_id
    JOIN tensors t ON t.id = ft.tensor_id JOIN blobs b ON b.id = t.blob_id
    WHERE sf.snapshot_id = ?"""
    return {row[0]: row[1] for row in db.execute(sql, [snapshot_id])}


def damaged_blob_ids(db: sqlite_utils.Database) -> set[int]:
    """The blobs the last `verify` found damaged and nothing has healed since: ids whose
    row still names the copy verify read (a healed blob points at a new copy)."""
    if "damaged_blobs" not in db.table_names():  # a read-only catalog of an older compstore
        return set()
    return {r[0] for r in db.execute(
        "SELECT d.blob_id FROM damaged_blobs d JOIN blobs b ON b.id = d.blob_id "
        "AND b.xxh3 = d.xxh3 AND b.pack = d.pack AND b.offset = d.offset")}


def damaged_files(db: sqlite_utils.Database) -> set[tuple[int, str]]:
    """(id, sha256) of the stored files any of whose bytes are in damaged blobs."""
    damaged = damaged_blob_ids(db)
    if not damaged:
        return set()
    return {tuple(r) for r in db.execute(
        """WITH b(id) AS (SELECT value FROM json_each(:ids)),
                f(id) AS (SELECT id FROM files WHERE header_blob IN b OR raw_blob IN b
                          UNION SELECT ft.file_id FROM file_tensors ft
                          JOIN tensors t ON t.id = ft.tensor_id WHERE t.blob_id IN b)
           SELECT id, sha256 FROM files WHERE id IN f""", {"ids": json.dumps(sorted(damaged))})}


def snapshot_is_damaged(db: sqlite_utils.Database, snapshot_id: str) -> bool:
    """Whether a snapshot reaches a blob the last `verify` found damaged."""
    damaged = damaged_blob_ids(db)
    return bool(damaged) and not damaged.isdisjoint(blobs_of_snapshot(db, snapshot_id))
