"""Remote gc: delete the remote's objects that no remote ref reaches.

Reachability: refs -> snapshot documents -> (pins -> their snapshots) -> blob keys.
A pack is deleted when none of its blobs is reachable (its index first, then the
pack: a crash between leaves an index-less pack, which the next gc deletes).
Packs that hold live and dead blobs are kept whole and their dead bytes reported:
rewriting them would race with fetches reading the old pack.

Never deleted: anything while a push holds a live lease (see `remote.Lease`), and
anything unreferenced younger than `grace_s`, so that the objects of a push that
has not yet written its ref survive even a push whose lease lapsed.
"""

from __future__ import annotations

import json
import time

from .remote import LEASE_S, Remote, RemoteGcReport, split_key
from .remote_sync import document_blob_keys


def remote_gc(remote: Remote, *, dry_run: bool = False, grace_s: float) -> RemoteGcReport:
    t0 = time.perf_counter()
    remote.ensure_format(create=False)
    if dry_run:
        return _collect(remote, True, grace_s, t0)
    with remote.lease("gc"):
        return _collect(remote, False, grace_s, t0)


def _collect(remote: Remote, dry_run: bool, grace_s: float, t0: float) -> RemoteGcReport:
    now = time.time()

    def old(mtime: float) -> bool:
        return now - mtime >= grace_s

    # What the refs reach.
    live_snaps: set[str] = set()
    live_keys: set[str] = set()
    todo = list(remote.refs().values())
    while todo:
        sid = todo.pop()
        if sid in live_snaps:
            continue
        live_snaps.add(sid)
        doc = remote.snapshot_doc(sid)
        live_keys |= document_blob_keys(doc)
        todo.extend(p["target_snapshot"] for p in doc["pins"])

    deletions: list[tuple[str, int]] = []  # (relative path, size), in deletion order
    packs = {name[: -len(".pack")]: (mtime, size)
             for name, mtime, size in remote.listdir("packs") if name.endswith(".pack")}
    indexed: set[str] = set()
    packs_removed, kept_young, kept_in_live = 0, 0, 0
    for name, _, index_size in remote.listdir("index"):
        if not name.endswith(".json"):
            continue
        pack = name[: -len(".json")]
        indexed.add(pack)
        if pack not in packs:  # names a pack that is gone: it can only mislead fetches
            deletions.append((f"index/{name}", index_size))
            continue
        keys = [k for k, _ in remote.get_json(f"index/{name}")["blobs"]]
        dead = sum(split_key(k)[1] for k in keys if k not in live_keys)
        if dead == 0:
            continue
        if len(keys) != sum(1 for k in keys if k not in live_keys):
            kept_in_live += dead
        elif not old(packs[pack][0]):
            kept_young += packs[pack][1]
        else:
            deletions += [(f"index/{name}", index_size), (f"packs/{pack}.pack", packs[pack][1])]
            packs_removed += 1
    for pack, (mtime, size) in packs.items():
        if pack not in indexed:  # a push died between pack and index
            if old(mtime):
                deletions.append((f"packs/{pack}.pack", size))
                packs_removed += 1
            else:
                kept_young += size
    snapshots_removed = 0
    for name, mtime, size in remote.listdir("snapshots"):
        if name.endswith(".json") and name[: -len(".json")] not in live_snaps and old(mtime):
            deletions.append((f"snapshots/{name}", size))
            snapshots_removed += 1
    locks_removed = 0
    for name, mtime, size in remote.listdir("locks"):
        if ".tmp-" in name:  # a lease being written (whatever the grace: a push may be starting)
            stale = mtime < now - LEASE_S
            if stale:
                deletions.append((f"locks/{name}", size))
            continue
        try:
            stale = json.loads(remote.get_bytes(f"locks/{name}")).get("expires", 0) < now
        except (FileNotFoundError, ValueError):
            stale = old(mtime)
        if stale:
            deletions.append((f"locks/{name}", size))
            locks_removed += 1
    for folder in ("packs", "index", "snapshots", "refs"):  # crashed local writes
        deletions += [(f"{folder}/{n}", s) for n, m, s in remote.listdir(folder)
                      if ".tmp-" in n and old(m)]

    if not dry_run:
        for rel, _ in deletions:
            remote.delete(rel)
    return RemoteGcReport(dry_run, sum(s for _, s in deletions), packs_removed, snapshots_removed,
                          locks_removed, kept_young, kept_in_live, round(time.perf_counter() - t0, 3))
