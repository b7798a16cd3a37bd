"""Pull a repo from the Hugging Face Hub into the store, fetching only what it lacks.

Metadata first: `model_info` pins the revision to a commit, `list_repo_tree` gives
every file's size, LFS sha256 and git blob id. A file whose content the store
already holds, from any repo, is not downloaded at all: it is rebuilt from the
store into the pull's folder. The rest goes through huggingface_hub (hf_xet
underneath where the server offers Xet) into `<store>/downloads/`, which a crashed
pull leaves in place so the next one resumes, is checked against the Hub's sha256,
ingested, and removed.

Xet deduplicates uploads, not downloads, and hf_xet 1.8 keeps no chunk cache
(`HF_XET_CHUNK_CACHE_SIZE_BYTES` has no effect, xet-core#715): the store is the
client-side cache. Not here yet: Xet-hash matching, tensor-level range fetches
with a manifest, pinning modular pointers to Hub repos, and `adopt`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CompstoreError
from .export import file_pieces, write_file

if TYPE_CHECKING:
    from .store import IngestResult, Store


class HubError(CompstoreError):
    """The Hub refused or could not serve the request (missing, private, gated, network)."""


@dataclass
class PullResult:
    repo_id: str
    commit: str
    ref: str
    files: int
    downloaded_files: int
    downloaded_bytes: int
    skipped_files: int  # already in the store: not downloaded
    skipped_bytes: int
    status: str  # the ingest's: "new" | "updated" | "unchanged"
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _held_file(store: "Store", size: int, sha256: str | None, git_oid: str | None) -> tuple | None:
    """(file id, sha256) of a stored file with this content, if the store holds one."""
    if sha256:
        row = store.db.execute("SELECT id, sha256 FROM files WHERE sha256 = ? AND size = ?",
                               [sha256.lower(), size]).fetchone()
        return tuple(row) if row else None
    if git_oid and size <= 10 << 20:  # small files: compare git blob ids of same-size ones
        for fid, sha in store.db.execute(
                "SELECT id, sha256 FROM files WHERE size = ? AND kind = 'raw'", [size]).fetchall():
            data = b"".join(bytes(p) for p in file_pieces(store, fid))
            if _git_blob_sha1(data) == git_oid:
                return fid, sha
    return None


def _hub_errors(repo_id: str, revision: str | None):
    from huggingface_hub import errors

    def translate(e: Exception) -> HubError:
        if isinstance(e, errors.GatedRepoError):
            return HubError(f"{repo_id} is gated: accept its conditions on the Hub, then log in "
                            "(`hf auth login` or HF_TOKEN)")
        if isinstance(e, errors.RepositoryNotFoundError):
            return HubError(f"{repo_id} was not found on the Hub, or it is private: check the name, "
                            "or log in (`hf auth login` or HF_TOKEN)")
        if isinstance(e, errors.RevisionNotFoundError):
            return HubError(f"{repo_id} has no revision {revision!r}")
        if isinstance(e, errors.RemoteEntryNotFoundError):
            return HubError(f"{repo_id}: a file listed by the Hub could not be downloaded ({e})")
        return HubError(f"{repo_id}: the Hub request failed: {str(e).splitlines()[0]}")

    return translate


def pull(store: "Store", repo_id: str, *, revision: str | None = None,
         include: list[str] | None = None, name: str | None = None,
         token: str | bool | None = None, progress: bool = False) -> PullResult:
    """Pull `repo_id` at `revision` into the store; download only what it lacks.

    Creates the refs `repo_id@<commit>` (or `name`) and `repo_id` (moved to this commit).

    >>> Store().pull("stabilityai/sdxl-turbo", include=["*.json", "unet/*"])  # doctest: +SKIP
    """
    import huggingface_hub
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    t0 = time.perf_counter()
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    translate = _hub_errors(repo_id, revision)
    try:
        commit = api.model_info(repo_id, revision=revision).sha
        entries = [f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                   if isinstance(f, RepoFile)]
    except (huggingface_hub.errors.HfHubHTTPError, OSError) as e:
        raise translate(e) from None
    if name is None and not include and store.has_ref(f"{repo_id}@{commit}"):
        # This commit is already in the store: nothing to fetch or ingest.
        ref = f"{repo_id}@{commit}"
        store.tag(repo_id, store.resolve(ref))
        return PullResult(repo_id, commit, ref, len(entries), 0, 0, len(entries),
                          sum(f.size for f in entries), "unchanged", round(time.perf_counter() - t0, 3))
    if include:
        entries = [f for f in entries if any(fnmatch.fnmatch(f.path, g) for g in include)]
    if not entries:
        raise HubError(f"{repo_id}@{commit}: no files to pull (check --include)")

    store._writable()
    folder = store.home / "downloads" / repo_id.replace("/", "--") / commit
    folder.mkdir(parents=True, exist_ok=True)
    downloaded = skipped = 0
    n_down = n_skip = 0
    for f in entries:
        target = folder / f.path
        sha = f.lfs.sha256 if f.lfs else None
        held = _held_file(store, f.size, sha, None if f.lfs else f.blob_id)
        if held is not None:
            if not target.exists():
                with store.reading():
                    write_file(store, held[0], held[1], target)
            skipped += f.size
            n_skip += 1
            continue
        try:
            path = hf_hub_download(repo_id, f.path, revision=commit, local_dir=folder,
                                   token=token, endpoint=endpoint)
        except (huggingface_hub.errors.HfHubHTTPError, OSError) as e:
            raise translate(e) from None
        if sha and _sha256(path) != sha.lower():
            Path(path).unlink(missing_ok=True)
            raise HubError(f"{repo_id}/{f.path}@{commit[:12]}: the downloaded bytes do not match "
                           "the Hub's sha256; nothing was stored (retry the pull)")
        downloaded += f.size
        n_down += 1

    ref = name or f"{repo_id}@{commit}"
    # hf_hub_download's own bookkeeping under .cache/ is skipped by the scan.
    result: IngestResult = store.ingest(folder, ref, source=repo_id, revision=commit,
                                        progress=progress)
    if name is None:
        store.tag(repo_id, result.snapshot)  # `org/name` follows the latest pull
    _record_xet_hashes(store, result.snapshot, entries)
    shutil.rmtree(folder, ignore_errors=True)
    return PullResult(repo_id, commit, ref, len(entries), n_down, downloaded, n_skip, skipped,
                      result.status, round(time.perf_counter() - t0, 3))


def _record_xet_hashes(store: "Store", snapshot_id: str, entries) -> None:
    """Keep the Hub's Xet hash beside each file's sha256 (64 hex digits, else unknown)."""
    rows = []
    for f in entries:
        xet = getattr(f, "xet_hash", None)
        if isinstance(xet, str) and len(xet) == 64 and all(c in "0123456789abcdef" for c in xet.lower()):
            rows.append((xet.lower(), snapshot_id, f.path))
    if rows:
        with store.db.atomic():
            store.db.conn.executemany(
                "UPDATE files SET xet_hash = ? WHERE id = (SELECT file_id FROM snapshot_files "
                "WHERE snapshot_id = ? AND path = ?)", rows)


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
