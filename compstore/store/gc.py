"""Garbage collection: drop what no ref reaches, compact packs, report what came back.

Reachability: refs -> snapshots -> (pins -> pinned snapshots, transitively) ->
files, components -> tensors -> blobs. Everything else is removed.

Crash safety, in order:
1. live blobs of partly dead packs are copied into new packs (tmp/, fsync, rename):
   unreferenced until step 2, so a crash leaves only garbage the next writer removes;
2. one catalog transaction deletes the dead rows and points moved blobs at their
   new packs. It waits for the readers (loads in progress hold `readers.lock` shared; see
   `Store.reading`): a load finds the rows of the snapshot it resolved until it is
   done (until 2026-12-07 only the unlink waited, and a load that gc overtook
   failed wherever it next read the catalog);
3. dead pack files are unlinked, still before any reader comes back. A crash
   before the unlink leaves packs the catalog no longer names: the next writer
   removes them.
Mappings already made (a loaded pipeline) survive the unlink: Linux keeps the
bytes of an unlinked, mapped file.

A pack is compacted when it holds dead blobs or bytes no blob names (the old copy
of a blob an ingest healed; see verify.py). A pack whose live blobs cannot be read
(missing, short) is left as it is, for `compstore verify` to name and an ingest to
heal: gc never turns damage into an error of its own.

`downloads/` holds what failed pulls left for the next pull to resume; gc removes
it too, and the pulls' lock files (`pulls/`), unless a pull is running (it holds
`pull.lock`; gc does not wait for it).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import StoreBusyError
from .lock import exclusive_readers, no_pull_running
from .objects import ALIGN, PACK_TARGET, PackWriter, fsync_dir

if TYPE_CHECKING:
    from .store import Store


@dataclass
class GcReport:
    dry_run: bool
    freed_bytes: int  # pack bytes on disk that are (or would be) reclaimed
    objects_removed: int  # blobs
    snapshots_removed: int
    packs_removed: int  # dead packs, and those a crashed writer left that the catalog never named
    packs_compacted: int
    seconds: float
    downloads_freed_bytes: int = 0  # files failed pulls left in downloads/ for a resume

    def to_dict(self) -> dict:
        return asdict(self)


_LIVE = """
WITH RECURSIVE
  snaps(id) AS (SELECT snapshot_id FROM refs
                UNION SELECT p.target_snapshot FROM pins p JOIN snaps s ON p.snapshot_id = s.id),
  comps(id) AS (SELECT component_id FROM snapshot_components WHERE snapshot_id IN snaps
                UNION SELECT component_id FROM pins WHERE snapshot_id IN snaps),
  fls(id) AS (SELECT file_id FROM snapshot_files WHERE snapshot_id IN snaps),
  tens(id) AS (SELECT tensor_id FROM file_tensors WHERE file_id IN fls
               UNION SELECT tensor_id FROM component_tensors WHERE component_id IN comps)
"""


def _ids(store: "Store", what: str) -> set:
    return {r[0] for r in store.db.execute(_LIVE + what)}


def gc(store: "Store", *, dry_run: bool = False) -> GcReport:
    """Remove every payload no ref reaches; compact partly dead packs.

    >>> Store().gc(dry_run=True).freed_bytes  # doctest: +SKIP
    5684284
    """
    t0 = time.perf_counter()
    packs_dir = store.home / "objects" / "packs"
    with store.writing():
        db = store.db  # (after `writing()`: it follows a restored catalog)
        leftover_packs, leftover_bytes = store._clean_leftovers(dry_run)  # a crashed writer's
        downloads_freed = _unfinished_downloads(store, dry_run)
        live_snaps = _ids(store, "SELECT id FROM snaps")
        live_comps = _ids(store, "SELECT id FROM comps")
        live_files = _ids(store, "SELECT id FROM fls")
        live_tensors = _ids(store, "SELECT id FROM tens")
        live_blobs = _ids(store, """
            SELECT blob_id FROM tensors WHERE id IN tens
            UNION SELECT header_blob FROM files WHERE id IN fls AND header_blob IS NOT NULL
            UNION SELECT raw_blob FROM files WHERE id IN fls AND raw_blob IS NOT NULL
            UNION SELECT config_blob FROM components WHERE id IN comps AND config_blob IS NOT NULL""")

        blobs = db.execute("SELECT id, pack, offset, size FROM blobs ORDER BY pack, offset").fetchall()
        by_pack: dict[str, list[tuple]] = {}
        for b in blobs:
            by_pack.setdefault(b[1], []).append(b)
        pack_sizes = {name: size for name, size in db.execute("SELECT name, size FROM packs")}
        dead_packs = [p for p in pack_sizes if not any(b[0] in live_blobs for b in by_pack.get(p, []))]
        partial = [p for p in pack_sizes if p not in dead_packs
                   and (any(b[0] not in live_blobs for b in by_pack[p])
                        or _unnamed_bytes(by_pack[p], pack_sizes[p]))
                   and all(store.packs.readable(*b[1:]) for b in by_pack[p] if b[0] in live_blobs)]
        dead_blobs = [b[0] for b in blobs if b[0] not in live_blobs]
        dead_snaps = [r[0] for r in db.execute("SELECT id FROM snapshots") if r[0] not in live_snaps]

        if dry_run:  # what the run below would free: the files' sizes on disk, less the
            # packs its compaction writes (blobs at aligned offsets, as PackWriter puts them)
            kept = _packed_size([b[3] for p in partial for b in by_pack[p] if b[0] in live_blobs])
            freed = sum(_size_on_disk(packs_dir / f"{p}.pack") for p in dead_packs + partial) - kept
            return GcReport(True, freed + leftover_bytes, len(dead_blobs), len(dead_snaps),
                            len(dead_packs) + leftover_packs, len(partial), round(time.perf_counter() - t0, 3),
                            downloads_freed)

        # 1. copy the live blobs of partly dead packs into new packs
        writer = PackWriter(store.home)
        moves: list[tuple[int, str, int]] = []
        try:
            for pack in partial:
                for bid, _, offset, size in by_pack[pack]:
                    if bid in live_blobs:
                        new_pack, new_offset = writer.append(store.packs.view(pack, offset, size))
                        moves.append((bid, new_pack, new_offset))
            new_packs = writer.commit()
        except BaseException:
            writer.abort()
            raise

        # 2. Loads in progress are waited for: a load follows the catalog from the
        # snapshot it resolved, and finds its rows and packs until it is done.
        store.packs.close()
        with exclusive_readers(store.home):
            with db.atomic():  # one transaction: dead rows out, moved blobs repointed
                db["packs"].insert_all({"name": n, "size": s} for n, s in new_packs)
                db.conn.executemany("UPDATE blobs SET pack = ?, offset = ? WHERE id = ?",
                                    [(p, o, b) for b, p, o in moves])
                db.conn.executemany(  # damage moves with the bytes: its record follows them
                    "UPDATE damaged_blobs SET pack = ?, offset = ? WHERE blob_id = ?",
                    [(p, o, b) for b, p, o in moves])
                for table in ("pins", "snapshot_components", "snapshot_files"):
                    _delete_not_in(db, table, "snapshot_id", live_snaps)
                _delete_not_in(db, "snapshots", "id", live_snaps)
                _delete_not_in(db, "component_tensors", "component_id", live_comps)
                _delete_not_in(db, "components", "id", live_comps)
                _delete_not_in(db, "file_tensors", "file_id", live_files)
                _delete_not_in(db, "files", "id", live_files)
                _delete_not_in(db, "xet_chunks", "file_id", live_files)
                _delete_not_in(db, "stat_cache", "snapshot_id", live_snaps)
                _delete_not_in(db, "stat_cache_files", "snapshot_id", live_snaps)
                _delete_not_in(db, "tensors", "id", live_tensors)
                _delete_not_in(db, "blobs", "id", live_blobs)
                _delete_not_in(db, "damaged_blobs", "blob_id", live_blobs)
                for p in dead_packs + partial:
                    db.execute("DELETE FROM packs WHERE name = ?", [p])

            # 3. unlink what the catalog no longer names
            freed = 0
            for p in dead_packs + partial:
                path = packs_dir / f"{p}.pack"
                freed += _size_on_disk(path)  # as the dry run counts it
                path.unlink(missing_ok=True)
            for d in (store.home / "skeletons").glob("*") if (store.home / "skeletons").exists() else []:
                if d.name not in live_snaps:
                    shutil.rmtree(d, ignore_errors=True)
        fsync_dir(packs_dir)
        freed -= sum(s for _, s in new_packs)
    return GcReport(False, freed + leftover_bytes, len(dead_blobs), len(dead_snaps),
                    len(dead_packs) + leftover_packs, len(partial), round(time.perf_counter() - t0, 3),
                    downloads_freed)


def _packed_size(sizes: list[int]) -> int:
    """The bytes of the packs a `PackWriter` writes for blobs of these sizes, in order."""
    total = pos = 0
    for i, size in enumerate(sizes):
        if i == 0 or pos >= PACK_TARGET:
            pos = 0  # a new pack
        pad = -pos % ALIGN
        pos += pad + size
        total += pad + size
    return total


def _size_on_disk(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # a pack deleted under the store: nothing to free
        return 0


def _unnamed_bytes(blobs: list[tuple], pack_size: int) -> bool:
    """Whether a pack holds a run of bytes no blob names, beyond alignment padding."""
    end = 0
    for _, _, offset, size in blobs:  # by offset
        if offset - end >= ALIGN:
            return True
        end = max(end, offset + size)
    return pack_size - end >= ALIGN


def _unfinished_downloads(store: "Store", dry_run: bool) -> int:
    """Bytes in downloads/, removed (with pulls/) unless `dry_run` or a pull is running
    (0 then)."""
    folder = store.home / "downloads"
    try:
        with no_pull_running(store.home):
            if not dry_run:
                shutil.rmtree(store.home / "pulls", ignore_errors=True)
            if not folder.exists():
                return 0
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
            if not dry_run:
                shutil.rmtree(folder)
            return size
    except StoreBusyError:  # a pull is running: its folder stays
        return 0


def _delete_not_in(db, table: str, column: str, keep: set) -> None:
    """DELETE rows whose `column` is not in `keep` (through a temp table: no SQL limits)."""
    db.execute("DROP TABLE IF EXISTS temp.keep_ids")
    db.execute("CREATE TEMP TABLE keep_ids (id PRIMARY KEY)")
    db.conn.executemany("INSERT INTO temp.keep_ids VALUES (?)", [(k,) for k in keep])
    db.execute(f"DELETE FROM [{table}] WHERE [{column}] NOT IN (SELECT id FROM temp.keep_ids)")
    db.execute("DROP TABLE temp.keep_ids")
