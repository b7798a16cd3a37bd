"""The stat cache: how a folder's files looked when it was ingested, so that an
unchanged folder is not read again.

`from_pretrained("./my-finetune")` ingests the folder on every call, and an ingest
of content the store holds still reads and hashes every byte, and compares every
hash hit with the store's copy: gigabytes for an SDXL folder, on top of the load's
own reads. As git's index and restic's change detection do, each ingest of a
folder records, under its ref, a digest of every file's path, target, device,
inode, size, mtime and ctime (a *stamp*). The next ingest under that ref whose
folder gives the same stamp, while the ref still points at the snapshot recorded,
is "unchanged" without reading a payload byte. The folder is still walked and
every safetensors header validated (scan.py): only the payload reads are skipped.

Timestamps are trusted once settled: a file changed shortly before the ingest
started could change again within the same timestamp tick, unseen (git's "racy"
entries), so such a folder gets no stamp and its next ingest reads it. ctime
cannot be set by users (`touch -d`, `cp -p` and `rsync -t` set mtime), so bytes
replaced under an old size and mtime still change the stamp.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import sqlite_utils

from .scan import FolderScan

# How long before an ingest's start a file's last change must lie for its
# timestamps to be trusted: the kernel's coarse clock ticks every few ms on
# filesystems with ns timestamps; FAT's and some network filesystems' tick in
# seconds (FAT: 2 s), and theirs come as whole seconds.
SETTLED_NS = 100_000_000
SETTLED_WHOLE_SECONDS_NS = 3_000_000_000


@dataclass(frozen=True)
class Counts:
    """What an ingest of the folder reports, as an ingest of held content finds it."""
    files: int
    tensors: int
    components: int
    logical_bytes: int
    reused_bytes: int


def stamp(scan: FolderScan, started_ns: int) -> str | None:
    """A digest of what the filesystem says of every file of `scan`; None when one
    changed too recently (before `started_ns`, `time.time_ns()` when the ingest
    began) for its timestamps to be trusted, or changed since the scan."""
    stats = []
    for path, f in sorted(scan.files.items()):
        try:
            st = os.stat(f.source)
        except OSError:
            return None
        if st.st_size != f.size:
            return None
        stats.append((path, f.source, st))
    whole = all(st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0
                for _, _, st in stats)
    settled = started_ns - (SETTLED_WHOLE_SECONDS_NS if whole else SETTLED_NS)
    if any(max(st.st_mtime_ns, st.st_ctime_ns) >= settled for _, _, st in stats):
        return None
    digest = hashlib.sha256()
    for path, source, st in stats:
        digest.update(json.dumps([path, source, st.st_dev, st.st_ino, st.st_size,
                                  st.st_mtime_ns, st.st_ctime_ns]).encode() + b"\n")
    return digest.hexdigest()


def unchanged(db: sqlite_utils.Database, ref: str, folder_stamp: str) -> tuple[str, Counts] | None:
    """(snapshot id, counts) when `ref` was ingested from a folder with this stamp and
    still points at what that ingest made."""
    row = db.execute(
        "SELECT c.snapshot_id, c.counts FROM stat_cache c JOIN refs r "
        "ON r.name = c.ref AND r.snapshot_id = c.snapshot_id WHERE c.ref = ? AND c.stamp = ?",
        [ref, folder_stamp]).fetchone()
    return None if row is None else (row[0], Counts(**json.loads(row[1])))


def record(db: sqlite_utils.Database, ref: str, folder_stamp: str | None, snapshot_id: str,
           counts: Counts) -> None:
    """Remember the folder `ref` was ingested from (under the store's write lock);
    with no stamp, forget it."""
    with db.atomic():
        if folder_stamp is None:
            db.execute("DELETE FROM stat_cache WHERE ref = ?", [ref])
        else:
            db["stat_cache"].upsert({"ref": ref, "stamp": folder_stamp, "snapshot_id": snapshot_id,
                                     "counts": json.dumps(counts.__dict__)}, pk="ref")
