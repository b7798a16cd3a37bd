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
entries), so such a file is read by the next ingest too. ctime cannot be set by
users (`touch -d`, `cp -p` and `rsync -t` set mtime), so bytes replaced under an
old size and mtime still change the stamp.

A folder that changed in part (`unet.save_pretrained("./my-pipe/unet")`) is read
in part: each file's own digest is kept too (`stat_cache_files`), with the sha256
its bytes had, and a file whose digest is as recorded is taken as the stored file
of that sha256 without being read (`Ingestor.reuse_file`). Only the files that
changed are read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import sqlite_utils

from .catalog import damaged_files, snapshot_is_damaged
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


@dataclass(frozen=True)
class FolderStamp:
    """What the filesystem says of a folder's files. `files`: path -> a digest of that
    file's path, target, device, inode, size, mtime and ctime, for each file whose
    timestamps are settled. `whole`: one digest of them all, None when a file is not
    settled."""
    whole: str | None
    files: dict[str, str]


def stamp(scan: FolderScan, started_ns: int) -> FolderStamp | None:
    """The stamp of the files of `scan`; None when a file changed size or went away
    since the scan. A file changed too recently (before `started_ns`, `time.time_ns()`
    when the ingest began) for its timestamps to be trusted gets no digest."""
    stats = []
    for path, f in sorted(scan.files.items()):
        try:
            st = os.stat(f.source)
        except OSError:
            return None
        if st.st_size != f.size:
            return None
        stats.append((path, f.source, st))
    files = _settled_digests(stats, started_ns)
    if len(files) < len(stats):
        return FolderStamp(None, files)
    return FolderStamp(hashlib.sha256("\n".join(files.values()).encode()).hexdigest(), files)


def file_stamp(path: str, started_ns: int) -> str | None:
    """The digest of one file outside any ingested folder (a single-file checkpoint,
    by its absolute path), as `stamp` takes each file's; None when its timestamps
    are not settled yet, or it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _settled_digests([(path, path, st)], started_ns).get(path)


def _settled_digests(stats: list[tuple[str, str, os.stat_result]], started_ns: int) -> dict[str, str]:
    """path -> digest of (path, source, stat) for each file whose timestamps are
    settled before `started_ns` (whole seconds: all of them tick in seconds)."""
    whole = all(st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0
                for _, _, st in stats)
    settled = started_ns - (SETTLED_WHOLE_SECONDS_NS if whole else SETTLED_NS)
    return {path: hashlib.sha256(json.dumps([path, source, st.st_dev, st.st_ino, st.st_size,
                                             st.st_mtime_ns, st.st_ctime_ns]).encode()).hexdigest()
            for path, source, st in stats if max(st.st_mtime_ns, st.st_ctime_ns) < settled}


def unchanged(db: sqlite_utils.Database, ref: str, folder: FolderStamp | None) -> tuple[str, Counts] | None:
    """(snapshot id, counts) when `ref` was ingested from a folder with this stamp (a
    whole one: every file settled) and still points at what that ingest made, and
    none of it was found damaged since (then the folder is read again, to heal it)."""
    if folder is None or folder.whole is None:
        return None
    row = db.execute(
        "SELECT c.snapshot_id, c.counts FROM stat_cache c JOIN refs r "
        "ON r.name = c.ref AND r.snapshot_id = c.snapshot_id WHERE c.ref = ? AND c.stamp = ?",
        [ref, folder.whole]).fetchone()
    if row is None or snapshot_is_damaged(db, row[0]):
        return None
    return row[0], Counts(**json.loads(row[1]))


def known_files(db: sqlite_utils.Database, ref: str, folder: FolderStamp) -> dict[str, str]:
    """path -> sha256 of the files of `folder` whose digest is the one recorded when
    `ref` was last ingested: their bytes are those that sha256 was taken of. Files
    stored with damaged bytes are left out: read again, they heal the store."""
    rows = db.execute("SELECT path, stamp, sha256 FROM stat_cache_files WHERE ref = ?", [ref])
    damaged = {sha256 for _, sha256 in damaged_files(db)}
    return {path: sha256 for path, digest, sha256 in rows
            if folder.files.get(path) == digest and sha256 not in damaged}


def record(db: sqlite_utils.Database, ref: str, folder: FolderStamp | None, snapshot_id: str,
           counts: Counts, sha256s: dict[str, str]) -> None:
    """Remember the folder `ref` was just ingested from, with `sha256s` (path -> the
    sha256 of the bytes read) of its files (under the store's write lock); with no
    stamp, forget it."""
    with db.atomic():
        forget(db, ref)
        if folder is None:
            return
        if folder.whole is not None:
            db["stat_cache"].insert({"ref": ref, "stamp": folder.whole, "snapshot_id": snapshot_id,
                                     "counts": json.dumps(counts.__dict__)})
        db["stat_cache_files"].insert_all(
            ({"ref": ref, "path": path, "stamp": digest, "sha256": sha256s[path],
              "snapshot_id": snapshot_id} for path, digest in folder.files.items()), batch_size=1000)


def forget(db: sqlite_utils.Database, ref: str) -> None:
    """Drop what was recorded of `ref`'s folder."""
    with db.atomic():
        db.execute("DELETE FROM stat_cache WHERE ref = ?", [ref])
        db.execute("DELETE FROM stat_cache_files WHERE ref = ?", [ref])
