"""Backing up the catalog, and putting a backup back.

Packs hold bare bytes: the catalog is the only record of what they are, and it
cannot be rebuilt from them (store-format.md, "Damage"). It is small (584 KiB for
the tiny family's A and B), so a copy of it is the way back from a lost or damaged
one. A plain `cp catalog.db` is not such a copy: the latest commits may still be in
catalog.db-wal, and a stale -wal beside a copied-back catalog.db is replayed into
it. `backup_catalog` copies through SQLite's online backup (consistent while other
processes use the store); `restore_catalog` puts a backup in place with no writer or
load running, the old -wal and -shm removed first. A `Store` open meanwhile, here
or in another process, reopens the restored catalog at its next lock or ref lookup
(`Store._follow_the_catalog`).

A restored catalog names what the store held when the backup was taken: pipelines
ingested since then are gone from it (their packs are left for the next writer or
`gc` to remove), and packs gc removed since then are missing (`compstore verify`
names their refs; ingesting or pulling them again heals them).
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .catalog import SCHEMA_VERSION, ensure_schema, open_catalog
from .errors import CompstoreError, DiskFullError
from .lock import exclusive_readers, write_lock
from .objects import fsync_dir

if TYPE_CHECKING:
    from .store import Store


@dataclass
class CatalogBackup:
    path: str
    bytes: int
    refs: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CatalogRestore:
    home: str
    refs: int
    missing_packs: int  # packs the backup names that are gone (removed by a gc since)
    unnamed_packs: int  # packs on disk the backup does not name (written since)
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def backup_catalog(store: "Store", dest: str | os.PathLike) -> CatalogBackup:
    """Write a consistent copy of `store`'s catalog to `dest` (a new file).

    >>> Store().backup_catalog("catalog-2026-12-07.db")  # doctest: +SKIP
    CatalogBackup(path='catalog-2026-12-07.db', bytes=598016, refs=4, seconds=0.004)

    Raises:
        CompstoreError: `dest` exists, or its folder does not.
    """
    t0 = time.perf_counter()
    dest = Path(dest)
    if dest.exists():
        raise CompstoreError(f"{dest} exists: back up to a new file")
    if not dest.parent.is_dir():
        raise CompstoreError(f"{dest.parent} is not a folder: back up into an existing folder")
    if store._holds_path(dest):  # lost with the store (in tmp/: at the next write)
        raise CompstoreError(f"{dest} is inside the store folder {store.home}: back up outside it")
    part = dest.with_name(f".{dest.name}.partial")
    try:
        target = sqlite3.connect(part)
        try:
            store.db.conn.backup(target)  # pages copied from one read transaction: consistent
            target.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal
            refs = target.execute("SELECT count(*) FROM refs").fetchone()[0]
        finally:
            target.close()
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
    except (sqlite3.Error, OSError) as e:
        raise _write_failed(e, dest, part, part.with_name(part.name + "-journal")) from None
    fsync_dir(dest.parent)
    return CatalogBackup(str(dest), dest.stat().st_size, refs, round(time.perf_counter() - t0, 3))


def _write_failed(e: Exception, dest: Path, *partial: Path) -> CompstoreError:
    """The error for a write of `dest` that failed, its `partial` files removed."""
    for leftover in partial:
        leftover.unlink(missing_ok=True)
    if "full" in str(e) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full while writing {dest}: free space and retry; nothing was changed")
    return CompstoreError(f"could not write {dest} ({e}); nothing was changed")


def _read_catalog(path: Path, *, immutable: bool) -> tuple[list[str], str | None, int]:
    """`quick_check`'s lines, the schema version and the number of refs of the catalog
    at `path`, opened read-only (`immutable`: its -wal, if any, unread).

    Raises:
        sqlite3.DatabaseError: `path` is not a compstore catalog.
    """
    conn = sqlite3.connect(f"file:{path}?mode=ro{'&immutable=1' if immutable else ''}", uri=True)
    try:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        refs = conn.execute("SELECT count(*) FROM refs").fetchone()[0]
    finally:
        conn.close()
    return problems, version and version[0], refs


def _whole_catalog_refs(catalog: Path) -> int | None:
    """The number of refs in `catalog` if it opens and passes `quick_check`, else None."""
    if not catalog.exists():
        return None
    try:
        problems, _, refs = _read_catalog(catalog, immutable=False)
    except sqlite3.DatabaseError:
        return None
    return refs if problems == ["ok"] else None


def _check_backup(backup: Path) -> int:
    """The number of refs in `backup`, if it is a whole compstore catalog of this schema."""
    if not backup.is_file():
        raise CompstoreError(f"{backup}: no such file (a catalog made by `compstore backup-catalog`)")
    try:
        problems, version, refs = _read_catalog(backup, immutable=True)  # the file alone is copied
    except sqlite3.DatabaseError as e:
        raise CompstoreError(f"{backup} is not a compstore catalog ({e}): nothing was changed") from None
    if problems != ["ok"]:
        first = next(line for line in "\n".join(problems).splitlines() if not line.startswith("***"))
        raise CompstoreError(f"{backup} is damaged ({first}, ...): nothing was changed; "
                             "restore another backup")
    if version is None or int(version) != SCHEMA_VERSION:
        raise CompstoreError(f"{backup} is a catalog of schema {version}, this "
                             f"compstore reads {SCHEMA_VERSION}: nothing was changed")
    return refs


def restore_catalog(backup: str | os.PathLike, home: str | os.PathLike | None = None, *,
                    force: bool = False) -> CatalogRestore:
    """Make `backup` (from `backup_catalog`) the catalog of the store in `home`
    (default `$COMPSTORE_HOME` or ~/.cache/compstore), replacing a lost or damaged one
    (a whole one only with `force=True`: what was stored since the backup is dropped).
    Waits for running writers and loads; a `Store` open meanwhile (an inference
    service's, say) follows the restored catalog from its next operation on. Check
    the result with `Store().verify()`.

    >>> restore_catalog("catalog-2026-12-07.db")  # doctest: +SKIP
    CatalogRestore(home='/root/.cache/compstore', refs=4, missing_packs=0, unnamed_packs=1, seconds=0.01)

    Raises:
        CompstoreError: `backup` is not a whole catalog of this compstore's schema,
            `home` is not a store folder (it has no objects/packs), or its catalog is
            whole and `force` is not set. The store is then left as it was.
    """
    from .store import default_home

    t0 = time.perf_counter()
    backup = Path(backup)
    home = Path(home).expanduser() if home is not None else default_home()
    refs = _check_backup(backup)
    packs_dir = home / "objects" / "packs"
    if not packs_dir.is_dir():
        raise CompstoreError(f"{home} is not a compstore store (no objects/packs): nothing was changed")
    with write_lock(home), exclusive_readers(home):
        current = _whole_catalog_refs(home / "catalog.db")
        if current is not None and not force:
            raise CompstoreError(f"the catalog of {home} is whole ({current} refs): restoring {backup} over it "
                                 "drops what was stored since the backup; pass --force (force=True) to restore "
                                 "anyway")
        part = home / "tmp" / "catalog.db.restoring"
        try:
            part.parent.mkdir(exist_ok=True)
            shutil.copyfile(backup, part)
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as e:
            raise _write_failed(e, home / "catalog.db", part) from None
        # the old catalog's -wal would be replayed into the restored one: it goes first
        for name in ("catalog.db-wal", "catalog.db-shm"):
            (home / name).unlink(missing_ok=True)
        os.replace(part, home / "catalog.db")
        fsync_dir(home)
        db = open_catalog(home / "catalog.db")
        try:
            db.enable_wal()  # as every store's catalog (the backup is not)
            ensure_schema(db)  # tables added within this schema: a Store that follows it only reads
            named = {r[0] for r in db.execute("SELECT name FROM packs")}
        finally:
            db.conn.close()
    on_disk = {p.stem for p in packs_dir.glob("*.pack")}
    return CatalogRestore(str(home), refs, len(named - on_disk), len(on_disk - named),
                          round(time.perf_counter() - t0, 3))
