"""Re-hash every stored payload, name the refs that any problem touches, and record
the damaged blobs: an ingest, pull or fetch that brings their bytes again heals them
(`Ingestor.put_blob`), and until then the shortcuts that would skip those bytes
(the stat cache, a pull's "already held") do not."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .catalog import is_damage
from .errors import CorruptStoreError
from .objects import blob_hash
from .progress import progress_bar

if TYPE_CHECKING:
    from .store import Store


@dataclass
class VerifyReport:
    ok: bool
    blobs_checked: int
    bytes_checked: int
    seconds: float
    problems: list[dict] = field(default_factory=list)  # blob, xxh3, pack, offset, problem,
                                                        # files, refs
    recorded: bool = False  # the store now knows these problems (the heals need it)
    catalog_problems: list[str] = field(default_factory=list)  # SQLite's quick_check, if not ok

    def to_dict(self) -> dict:
        return asdict(self)


def _who_uses(store: "Store", blob_id: int) -> tuple[list[str], list[str]]:
    """(ref names, 'ref:path' of files) that reach a blob."""
    rows = store.db.execute(
        """WITH f AS (
             SELECT id FROM files WHERE header_blob = :b OR raw_blob = :b
             UNION SELECT ft.file_id FROM file_tensors ft JOIN tensors t ON t.id = ft.tensor_id
                   WHERE t.blob_id = :b)
           SELECT r.name, sf.path FROM snapshot_files sf JOIN refs r ON r.snapshot_id = sf.snapshot_id
           WHERE sf.file_id IN f ORDER BY r.name, sf.path""", {"b": blob_id}).fetchall()
    return sorted({r[0] for r in rows}), [f"{r[0]}:{r[1]}" for r in rows]


def verify(store: "Store", *, progress: bool = False) -> VerifyReport:
    """Check the catalog file, then re-hash every blob against its xxh3-128; report
    missing, truncated, corrupt ones.

    >>> Store().verify().ok  # doctest: +SKIP
    True
    """
    t0 = time.perf_counter()
    catalog_problems = _check_catalog(store)
    bad: list[tuple[int, str, str, int, str]] = []  # blob, xxh3, pack, offset, problem
    problems: list[dict] = []
    checked = [0, 0]  # blobs, bytes
    try:
        _check_blobs(store, progress, bad, checked)
        for bid, xxh3, pack, offset, problem in bad:
            refs, files = _who_uses(store, bid)
            problems.append({"blob": bid, "xxh3": xxh3, "pack": pack, "offset": offset,
                             "problem": problem, "refs": refs, "files": files})
    except sqlite3.DatabaseError as e:  # a damaged catalog stops the blob checks where it is
        if not is_damage(e):
            raise
        catalog_problems = catalog_problems or [str(e)]
    return VerifyReport(not problems and not catalog_problems, checked[0], checked[1],
                        round(time.perf_counter() - t0, 3), problems, catalog_problems=catalog_problems)


def _check_blobs(store: "Store", progress: bool, bad: list, checked: list[int]) -> None:
    packs_dir = store.home / "objects" / "packs"
    total = store.db.execute("SELECT coalesce(sum(size), 0) FROM blobs").fetchone()[0]
    with progress_bar(total, "verify", progress) as bar:
        for (pack,) in store.db.execute("SELECT name FROM packs ORDER BY name").fetchall():
            blobs = store.db.execute(
                "SELECT id, xxh3, size, offset FROM blobs WHERE pack = ? ORDER BY offset", [pack]
            ).fetchall()
            path = packs_dir / f"{pack}.pack"
            if not path.exists():
                bad.extend((b[0], b[1], pack, b[3], "pack file missing") for b in blobs)
                continue
            size = path.stat().st_size
            for bid, xxh3, bsize, offset in blobs:
                checked[0] += 1
                if offset + bsize > size:
                    bad.append((bid, xxh3, pack, offset, f"truncated: pack is {size} bytes, "
                                                         f"blob ends at {offset + bsize}"))
                    continue
                try:
                    if blob_hash(store.packs.view(pack, offset, bsize)) != xxh3:
                        bad.append((bid, xxh3, pack, offset, "content does not match its hash"))
                except (OSError, CorruptStoreError) as e:
                    bad.append((bid, xxh3, pack, offset, f"unreadable: {e}"))
                checked[1] += bsize
                bar.update(bsize)


def _check_catalog(store: "Store") -> list[str]:
    """SQLite's own check of the catalog file's pages and indexes: [] when sound."""
    try:
        found = [r[0] for r in store.db.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as e:
        if not is_damage(e):
            raise
        return [str(e)]
    return [] if found == ["ok"] else found


def record_damage(db, problems: list[dict]) -> None:
    """Replace the record of damaged blobs with what a verify found (under the store's
    write lock). A blob healed or collected since verify read it is not recorded."""
    with db.atomic():
        db.execute("DELETE FROM damaged_blobs")
        db.conn.executemany(
            "INSERT INTO damaged_blobs (blob_id, xxh3, pack, offset, problem) "
            "SELECT id, xxh3, pack, offset, ? FROM blobs WHERE id = ? AND xxh3 = ? AND pack = ? "
            "AND offset = ?",
            [(p["problem"], p["blob"], p["xxh3"], p["pack"], p["offset"]) for p in problems])
