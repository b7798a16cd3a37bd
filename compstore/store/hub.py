"""Pull a repo from the Hugging Face Hub into the store, fetching only what it lacks.

Metadata first: `model_info` pins the revision to a commit, `list_repo_tree` gives
every file's size, LFS sha256 and git blob id, and the pipeline index (read first)
says which files `from_pretrained` loads: those are pulled (selection.py), not the
repo as published. A file whose content the store already holds, from any repo,
is not downloaded at all: it is rebuilt from the store into the pull's folder.
The rest is downloaded into `<store>/downloads/`, which a crashed pull leaves in
place so the next one resumes, is checked against the Hub's sha256, ingested,
and removed.

Files the Hub stores in Xet go through compstore's own Xet client (xet.py): only
the chunks the store lacks are downloaded, the rest is read from the store. Files
without Xet, and Xet files whose transfer fails, use huggingface_hub's session,
URLs and auth headers with compstore's own ranged, resumable GET (`_fetch`):
huggingface_hub 2.4's `hf_hub_download` starts every download over in a new
temporary file, so only `_fetch` resumes across pulls.

Xet deduplicates uploads, not downloads, and hf_xet 1.8 keeps no chunk cache
(`HF_XET_CHUNK_CACHE_SIZE_BYTES` has no effect, xet-core#715): the store is the
client-side cache. A repo that carries a `compstore.manifest.json` (see
manifest.py) is fetched tensor by tensor: only the tensors the store lacks are
requested, with HTTP ranges. Each file's Xet hash from the Hub (or from a cache's
`trees/<commit>.json`, see adopt.py) is kept beside its sha256, so content is
recognised by either. Xet hashes are not computed locally: `hf_xet.hash_files`
took 4.5 s for a 1.6 GB UNet here (~370 MB/s), too slow for every ingest.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from contextlib import ExitStack
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .catalog import damaged_blob_ids, damaged_files, snapshot_is_damaged
from .errors import (CompstoreError, CorruptStoreError, DiskFullError, InvalidInputError,
                     RefNotFoundError, VariantNotFoundError)
from .export import file_pieces, write_file
from .lock import pull_lock, pulls_running
from .manifest import FILENAME as MANIFEST
from .manifest import parse_manifest
from .modular import INDEX as MODULAR_INDEX
from .modular import pins_of
from .progress import progress_bar, say
from .selection import pipeline_index_path, select_files
from .settings import env_setting
from .xet import XetError, XetSource, XetUnavailable, record_chunks
from .xet import pull_file as pull_xet_file

if TYPE_CHECKING:
    from .store import IngestResult, Store

logger = logging.getLogger("compstore")


class HubError(CompstoreError):
    """The Hub refused or could not serve the request (missing, private, gated, network)."""


class HubUnavailableError(HubError):
    """A pull got no metadata for the repo (no network, the Hub down, the repo missing
    or refused to you), so it fetched nothing. A load then falls back to the store's
    copy, as diffusers falls back to its cache."""


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
    xet_files: int = 0  # downloaded through compstore's Xet client
    http_files: int = 0  # downloaded over plain HTTP (no Xet, or Xet failed)
    chunk_fetched_bytes: int = 0  # xorb bytes the Xet files cost
    chunk_reused_bytes: int = 0  # bytes of the Xet files read from chunks the store held
    chunk_dedup_ratio: float = 0.0  # chunk_reused / (bytes of the Xet files)

    def to_dict(self) -> dict:
        return asdict(self)


PULL_WORKERS = 8  # HTTP downloads at a time, as huggingface_hub's snapshot_download: $COMPSTORE_PULL_WORKERS


REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_repo_id(name: str) -> bool:
    """Whether `name` has the shape of a Hub repo id ("org/name")."""
    return bool(REPO_ID.match(name))


def hub_reachable() -> bool:
    """False in huggingface_hub's offline mode (HF_HUB_OFFLINE): use refs only."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _held_file(store: "Store", size: int, sha256: str | None, git_oid: str | None,
               xet_hash: str | None, damaged: set[int]) -> tuple | None:
    """(file id, sha256) of a stored file with this content, if the store holds one
    intact: not one of `damaged` (`_damaged_file_ids`: a file stored with damaged
    bytes is downloaded again, and heals them)."""
    if xet_hash:
        row = store.db.execute("SELECT id, sha256 FROM files WHERE xet_hash = ? AND size = ?",
                               [xet_hash.lower(), size]).fetchone()
        if row:
            return None if row[0] in damaged else tuple(row)
    if sha256:
        row = store.db.execute("SELECT id, sha256 FROM files WHERE sha256 = ? AND size = ?",
                               [sha256.lower(), size]).fetchone()
        return tuple(row) if row and row[0] not in damaged else None
    if git_oid and size <= 10 << 20:  # small files: compare git blob ids of same-size ones
        for fid, sha in store.db.execute(
                "SELECT id, sha256 FROM files WHERE size = ? AND kind = 'raw'", [size]).fetchall():
            if fid in damaged:
                continue
            try:
                data = b"".join(bytes(p) for p in file_pieces(store, fid))
            except CorruptStoreError:  # its pack is missing or short: not held, then
                continue
            if _git_blob_sha1(data) == git_oid:
                return fid, sha
    return None


def _damaged_file_ids(store: "Store") -> set[int]:
    """The stored files a pull must not count as held (read once per listing)."""
    return {fid for fid, _ in damaged_files(store.db)}


def _hub_errors(repo_id: str, revision: str | None):
    from huggingface_hub import errors

    def translate(e: Exception, then: str = "retry: what was downloaded is kept and the next "
                  "pull resumes") -> CompstoreError:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # here, not the Hub
            return DiskFullError(f"{repo_id}: the disk filled up while downloading: free space "
                                 "and retry; what was downloaded is kept and the next pull resumes")
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
        return HubError(f"{repo_id}: the Hub request failed ({str(e).splitlines()[0]}); {then}")

    return translate


def pull(store: "Store", repo_id: str, *, revision: str | None = None,
         include: list[str] | None = None, exclude: list[str] | None = None,
         variant: str | None = None, name: str | None = None,
         token: str | bool | None = None, repin: bool = False, all_files: bool = False,
         progress: bool = False) -> PullResult:
    """Pull `repo_id` at `revision` into the store; download only what it lacks.

    Pulls what `from_pretrained` loads (selection.py): of a pipeline repo, the
    folders its index names, and in each folder one variant's weights (`variant`'s
    where it has them, else the default ones, as diffusers picks them); not the
    other variants, nor single-file checkpoints at the root. `include` globs choose
    from every folder; `exclude` globs leave files out (the components a load is
    given, as diffusers leaves out their folders); `all_files=True` pulls the repo
    as published. Pickle
    checkpoints and other frameworks' weights (.bin, .ckpt, .msgpack, .onnx, ...)
    are never pulled.

    Creates the refs `repo_id@<commit>` (`repo_id@<commit>[variant]` with a variant,
    or `name`) and, unless `include` or an `exclude` that leaves files out, moves
    `repo_id@<revision>` for a `revision` other than the full commit (a branch, a tag,
    `refs/pr/1`) and, for a pull of main (no `revision`, or "main"), `repo_id`
    (`repo_id[variant]`) to this commit, as the Hub cache's `refs/main` follows main. A `variant` that none of
    the weights come in raises `VariantNotFoundError` before any weight is fetched.
    A pull that gets no metadata from the Hub raises `HubUnavailableError`.
    A pull whose files that ref already holds downloads nothing ("unchanged"); one
    that wants more adds them to what the ref holds. Files fetched over plain HTTP
    are downloaded `$COMPSTORE_PULL_WORKERS` (default 8) at a time. Two pulls of one
    repo take turns, and a pull that wants a large file another pull is fetching
    waits for it (`lock.pull_lock`): the second fetches only what the first did not
    bring. Pulls that share no large file run side by side.

    >>> Store().pull("stabilityai/sdxl-turbo", variant="fp16")  # doctest: +SKIP
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.hf_api import RepoFile

    if all_files and variant:
        raise CompstoreError(f"pull {repo_id}: all_files (--all) takes every variant as published; "
                             f"leave out variant={variant!r}, or all_files to pull that variant")
    t0 = time.perf_counter()
    workers = env_setting("COMPSTORE_PULL_WORKERS", PULL_WORKERS, minimum=1)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    translate = _hub_errors(repo_id, revision)
    try:
        commit = api.model_info(repo_id, revision=revision).sha
        listed = [f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                  if isinstance(f, RepoFile)]
    except HFValidationError as e:  # checked before any request
        raise HubError(f"{repo_id!r} is not a Hub repo id: {str(e).splitlines()[0]}") from None
    except _network_errors() as e:
        raise HubUnavailableError(str(translate(e, then="nothing was downloaded"))) from None
    default_ref = f"{repo_id}@{commit}" + (f"[{variant}]" if variant else "")
    # `repo_id` (`repo_id[variant]`) follows the latest pull of main of the whole pipeline
    # (in that variant): offline loads find it there. A pull that leaves out what `exclude`
    # matches is of part of it (`wanted_given` clears this then).
    latest_ref = None if include else repo_id + (f"[{variant}]" if variant else "")
    # A pipeline repo's index names the folders to pull: it is read first.
    index_path = None if include or all_files else pipeline_index_path({f.path for f in listed})

    def wanted_given(index: dict | None) -> list:
        nonlocal latest_ref
        try:
            wanted = select_files(listed, index=index, variant=variant, include=include,
                                  all_files=all_files)
        except VariantNotFoundError as e:
            raise VariantNotFoundError(f"{repo_id}@{commit} has {e}; pull it without "
                                       f"--variant (variant=None) for the default weights") from None
        if exclude:  # never the index: it says what the snapshot is
            kept = [f for f in wanted if f.path == index_path
                    or not any(fnmatch.fnmatch(f.path, g) for g in exclude)]
            if len(kept) < len(wanted):
                latest_ref, wanted = None, kept
            if {f.path for f in kept} <= {index_path}:
                raise HubError(f"{repo_id}@{commit}: no files to pull: every one matches "
                               f"{', '.join(exclude)}")
        if not wanted:
            raise HubError(f"{repo_id}@{commit}: no files to pull" + (
                f": none matches {', '.join(include)}" if include else ""))
        return wanted

    def tag_latest(snapshot: str) -> bool:
        """`repo_id` follows the latest pull of main of the whole pipeline, and
        `repo_id@<revision>` the latest at a revision named otherwise than by its full
        commit (a branch, a tag): offline loads look there. A pull of another revision
        leaves `repo_id` where main was (until 2026-12-07 it moved it: after a pull of
        `refs/pr/1`, an offline load of the repo, or at "main", got the PR's weights).
        False when gc removed `snapshot` meanwhile."""
        if not latest_ref:
            return True
        names = [latest_ref] if revision in (None, "main") else []
        if revision and revision != commit:
            names.append(f"{repo_id}@{revision}" + latest_ref[len(repo_id):])
        return all(store.tag(ref, snapshot, force=True, missing_ok=True) is not None for ref in names)

    def held_paths() -> set[str]:
        """The files of this commit that its ref holds (none for a `name`d pull)."""
        if name is not None or not store.has_ref(default_ref):
            return set()
        return {row[0] for row in store.snapshot_files(store.resolve(default_ref))}

    def already_here() -> PullResult | None:
        """The ref holds every file wanted: nothing to fetch or ingest. (A modular repo is
        ingested again: what its pointers name may have changed.) Read under
        `store.reading()`: a `rm` + `gc` in another process waits, or came first."""
        if name is not None or repin:
            return None
        with store.reading():
            try:
                have = held_paths()
                snapshot = store.resolve(default_ref) if have else None
            except RefNotFoundError:  # removed since `has_ref`
                return None
            if (snapshot is None or (index_path and index_path not in have) or pins_of(store, snapshot)
                    or snapshot_is_damaged(store.db, snapshot)):  # pulled again, to heal it
                return None
            index = None
            if index_path:
                index = _parse_index(store.read_file(snapshot, index_path), repo_id, commit, index_path)
        wanted = wanted_given(index)
        if not {f.path for f in wanted} <= have or not tag_latest(snapshot):
            return None
        record_revision(store, repo_id, revision, commit)
        return PullResult(repo_id, commit, default_ref, len(wanted), 0, 0, len(wanted),
                          sum(f.size for f in wanted), "unchanged", round(time.perf_counter() - t0, 3))

    if (done := already_here()) is not None:
        return done
    store._writable()
    on_wait = say if progress else logger.info
    with pulls_running(store.home), ExitStack() as locks:
        locks.enter_context(pull_lock(store.home, "repo--" + repo_id.replace("/", "--"),
                                      f"another pull of {repo_id} to finish", on_wait))
        if (done := already_here()) is not None:  # brought by the pull this one waited for
            return done
        folder = store.home / "downloads" / repo_id.replace("/", "--") / commit

        def fetch(files: list, progress: bool) -> _Downloaded:
            return _download(store, repo_id, commit, files, folder=folder, endpoint=endpoint,
                             token=token, workers=workers, translate=translate, progress=progress)

        got, index = _Downloaded(), None
        if index_path:
            got = fetch([f for f in listed if f.path == index_path], progress=False)
            index = _parse_index((folder / index_path).read_bytes(), repo_id, commit, index_path)
        keep = {f.path for f in wanted_given(index)} | held_paths()  # what the ref holds stays in it
        entries = [f for f in listed if f.path in keep]
        content = locks.enter_context(ExitStack())
        said: list[str] = []

        def say_once(line: str) -> None:  # however many of its files other pulls are fetching
            if not said:
                said.append(line)
                on_wait(line)

        for key in _content_keys(store, entries):
            content.enter_context(pull_lock(store.home, key, "other pulls fetching files this one "
                                            "wants to finish", say_once))
        got.add(fetch([f for f in entries if f.path != index_path], progress=progress))
        if index_path == MODULAR_INDEX:  # its ingest pulls the repos it points at, and a pull
            content.close()              # of one of them may be waiting for these locks
        ref = name or default_ref
        result: IngestResult = store.ingest(folder, ref, source=repo_id, revision=commit, repin=repin,
                                            progress=progress, checked_sha256=got.checked, token=token,
                                            consume_weights=True)  # the disk of one copy, not two
        if name is None:
            tag_latest(result.snapshot)
        record_revision(store, repo_id, revision, commit)
        record_xet_hashes(store, result.snapshot, {f.path: f.xet_hash for f in entries})
        record_chunks(store, result.snapshot, got.xet_chunks)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()  # downloads/<repo>/, under the repo's lock
        except OSError:  # a failed pull of another commit left a folder in it
            pass
    return PullResult(repo_id, commit, ref, len(entries), got.files, got.bytes, got.skipped_files,
                      got.skipped_bytes, result.status, round(time.perf_counter() - t0, 3),
                      got.xet_files, got.http_files, got.chunk_fetched, got.chunk_reused,
                      round(got.chunk_reused / got.xet_bytes, 4) if got.xet_bytes else 0.0)


def _content_keys(store: "Store", entries: list) -> list[str]:
    """The `pull_lock` keys of the large (LFS) files of `entries` the store lacks, in
    the order they are taken (sorted: two pulls never wait for each other). A key is
    the first 4 hex digits of the file's sha256: at most 65,536 lock files (two
    unrelated files may share a key; then one pull waits for the other, as if they
    shared the file). A pull holds one open file per key: where the process may not
    open that many, it may open more, up to its hard limit; a pull of more files
    than that (none seen) takes 2 digits, 256 keys, which pulls that take 4 do not
    wait for."""
    damaged = _damaged_file_ids(store)
    shas = {f.lfs.sha256.lower() for f in entries if f.lfs
            and _held_file(store, f.size, f.lfs.sha256, None, f.xet_hash, damaged) is None}
    width = 4 if _may_open(len(shas) + 256) else 2
    return sorted({f"sha256-{sha[:width]}" for sha in shas})


def _may_open(files: int) -> bool:
    """Whether this process may have `files` files open, raising its soft limit up to
    its hard one if that is what it takes."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or files <= soft:
        return True
    if hard != resource.RLIM_INFINITY and files > hard:
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, hard))
    return True


def _parse_index(data: bytes | None, repo_id: str, commit: str, path: str) -> dict:
    """A pipeline index, which says which folders a pull fetches."""
    try:
        index = json.loads(data or b"")
    except ValueError:
        index = None
    if not isinstance(index, dict):
        raise InvalidInputError(f"{repo_id}@{commit[:12]}/{path}",
                                "not a JSON object, so which files the pipeline needs is not known; "
                                "nothing was stored")
    return index


@dataclass
class _Downloaded:
    """What `_download` put in the pull's folder, and how."""

    files: int = 0  # downloaded (whole, by Xet chunks, or by manifest pieces)
    bytes: int = 0  # fetched from the Hub
    skipped_files: int = 0  # rebuilt from the store
    skipped_bytes: int = 0
    xet_files: int = 0
    http_files: int = 0
    chunk_fetched: int = 0
    chunk_reused: int = 0
    xet_bytes: int = 0  # size of the files that came through Xet
    checked: dict[str, str] = field(default_factory=dict)  # path -> sha256, hashed by this pull
    xet_chunks: dict[str, list] = field(default_factory=dict)  # path -> its chunks (record_chunks)

    def add(self, other: "_Downloaded") -> None:
        for f in fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, dict):
                mine.update(getattr(other, f.name))
            else:
                setattr(self, f.name, mine + getattr(other, f.name))


def _download(store: "Store", repo_id: str, commit: str, entries: list, folder: Path, *,
              endpoint: str | None, token, workers: int, translate, progress: bool) -> _Downloaded:
    """Fill `folder` with `entries`: files the store holds are rebuilt from it, the
    rest come by manifest pieces, Xet chunks or HTTP, each checked against the Hub's
    sha256. Under the repo's `pull_lock`: nothing else writes to `folder`."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    network_errors = _network_errors()
    folder.mkdir(parents=True, exist_ok=True)
    got = _Downloaded()
    xet = XetSource(endpoint or constants.ENDPOINT, repo_id, commit, build_hf_headers(token=token))
    manifest: dict | None = None
    entries = sorted(entries, key=lambda f: f.path != MANIFEST)  # the manifest first: it steers the rest
    with store.reading():  # found and written out before a gc in another process may drop them
        damaged = _damaged_file_ids(store)
        held_by_path = {f.path: _held_file(store, f.size, f.lfs.sha256 if f.lfs else None,
                                           None if f.lfs else f.blob_id, f.xet_hash, damaged)
                        for f in entries}
        for f in entries:
            if held_by_path[f.path] is not None and not (folder / f.path).exists():
                write_file(store, *held_by_path[f.path], folder / f.path)
    bar_lock = threading.Lock()  # tqdm's counter is not thread-safe; downloads run on a pool

    def check(f, target: Path, digest: str | None) -> None:
        """Check a downloaded (or left in place) file against the Hub's sha256; record it."""
        sha = f.lfs.sha256.lower() if f.lfs else None
        if sha and f.path not in got.checked:  # downloaded now, or left by a pull stopped before its check
            if (digest or file_sha256(target)) != sha:
                target.unlink()
                raise HubError(f"{repo_id}/{f.path}@{commit[:12]}: the downloaded bytes do not "
                               "match the Hub's sha256; nothing was stored (retry the pull)")
            got.checked[f.path] = sha
        elif digest:
            got.checked[f.path] = digest  # a git file: no Hub sha256 to check it against

    def wait_for(job: Future) -> tuple[int, str]:
        try:
            return job.result()
        except network_errors as e:
            raise translate(e) from None

    # HTTP downloads run `workers` at a time, beside the Xet transfers and store reads
    # of the loop; a failure waits for the running ones (their bytes are kept for the
    # next pull to resume) and drops the queued ones.
    downloads = ThreadPoolExecutor(workers, thread_name_prefix="compstore-pull")
    in_flight: dict[Future, object] = {}
    try:
        with progress_bar(sum(f.size for f in entries if held_by_path[f.path] is None),
                          f"pull {repo_id}", progress) as bar:
            def on_bytes(n: int) -> None:
                with bar_lock:
                    bar.update(n)

            for f in entries:
                target = folder / f.path
                sha = f.lfs.sha256 if f.lfs else None
                if held_by_path[f.path] is not None:  # written out above
                    if f.path == MANIFEST:
                        manifest = parse_manifest(target.read_bytes())
                    got.skipped_bytes += f.size
                    got.skipped_files += 1
                    continue
                plan = manifest.get(f.path) if manifest else None
                if plan and sha and plan["sha256"] == sha.lower() and plan["size"] == f.size:
                    try:
                        fetched = _assemble(store, repo_id, f.path, commit, endpoint, token, plan, target)
                    except network_errors as e:
                        raise translate(e) from None
                    if fetched is not None:  # else: the manifest lied; download the whole file
                        got.checked[f.path] = sha.lower()
                        got.bytes += fetched
                        on_bytes(f.size)
                        got.files += 1
                        continue
                use_xet = xet and f.xet_hash and sha and f.size and not _partial(target).exists()
                if use_xet and not target.exists():
                    try:
                        x = pull_xet_file(store, xet, f.xet_hash.lower(), f.size, sha, target, on_bytes)
                        got.checked[f.path] = sha.lower()
                        got.xet_chunks[f.path] = x.chunks
                        got.bytes += x.fetched_bytes
                        got.chunk_fetched += x.fetched_bytes
                        got.chunk_reused += x.reused_bytes
                        got.xet_bytes += f.size
                        got.xet_files += 1
                    except XetUnavailable as e:  # this repo has no Xet service: HTTP from now on
                        logger.info("%s: %s; downloading over HTTP", repo_id, e)
                        xet = None
                    except (XetError, *network_errors) as e:
                        logger.warning("%s: Xet download failed (%s); downloading over HTTP",
                                       f.path, str(e).splitlines()[0])
                got.files += 1
                if target.exists():  # fetched above, or left in place by an earlier pull
                    check(f, target, None)
                else:
                    got.http_files += 1
                    job = downloads.submit(
                        _fetch, hf_hub_url(repo_id, f.path, revision=commit, endpoint=endpoint),
                        build_hf_headers(token=token), target, f.size, on_bytes, sha256=sha)
                    if f.path != MANIFEST:
                        in_flight[job] = f
                        continue
                    fetched, digest = wait_for(job)  # the manifest steers the rest: wait for it
                    got.bytes += fetched
                    check(f, target, digest)
                if f.path == MANIFEST:
                    manifest = parse_manifest(target.read_bytes())
            for job in as_completed(in_flight):
                f = in_flight[job]
                fetched, digest = wait_for(job)
                got.bytes += fetched
                check(f, folder / f.path, digest)
    finally:
        downloads.shutdown(wait=True, cancel_futures=True)
    return got


def _network_errors() -> tuple[type[Exception], ...]:
    """What a failed Hub request raises: huggingface_hub's HTTP errors, its HTTP
    library's (transport, protocol), and OSError."""
    import huggingface_hub

    return (huggingface_hub.errors.HfHubHTTPError, _http_library().HTTPError, OSError)


def _assemble(store: "Store", repo_id: str, path: str, commit: str, endpoint: str | None,
              token, plan: dict, target: Path) -> int | None:
    """Rebuild one file from the store's pieces and HTTP ranges for the rest.

    Returns the bytes fetched, or None if the result does not match the Hub's sha256
    (the partial file is removed; the caller downloads the file whole)."""
    with store.reading():  # the pieces found stay where they are until written out
        return _assemble_reading(store, repo_id, path, commit, endpoint, token, plan, target)


def _assemble_reading(store: "Store", repo_id: str, path: str, commit: str, endpoint: str | None,
                      token, plan: dict, target: Path) -> int | None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    pieces = []
    damaged = damaged_blob_ids(store.db)
    for begin, end, xxh3 in plan["pieces"]:
        row = store.db.execute("SELECT id, pack, offset FROM blobs WHERE xxh3 = ? AND size = ?",
                               [xxh3, end - begin]).fetchone()
        if row and (row[0] in damaged or not store.packs.readable(*row[1:], end - begin)):
            row = None  # fetched from the Hub instead
        pieces.append((begin, end, row[1:] if row else None))
    ranges: list[list[int]] = []  # coalesced [begin, end) of the pieces the store lacks
    for begin, end, row in pieces:
        if row is None:
            if ranges and ranges[-1][1] == begin:
                ranges[-1][1] = end
            else:
                ranges.append([begin, end])
    url = hf_hub_url(repo_id, path, revision=commit, endpoint=endpoint)
    headers = build_hf_headers(token=token)
    fetched: dict[int, bytes] = {}
    for begin, end in ranges:
        if end == begin:
            continue
        r = get_session().get(url, headers={**headers, "Range": f"bytes={begin}-{end - 1}"},
                              follow_redirects=True)
        hf_raise_for_status(r)
        if len(r.content) != end - begin:
            return None
        fetched[begin] = r.content
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".compstore-partial")
    h = hashlib.sha256()
    with open(partial, "wb") as out:
        for begin, end, row in pieces:
            if row is not None:
                data = store.packs.view(row[0], row[1], end - begin)
            else:
                start = max(b for b in fetched if b <= begin)
                data = memoryview(fetched[start])[begin - start : end - start]
            h.update(data)
            out.write(data)
    if h.hexdigest() != plan["sha256"]:
        partial.unlink(missing_ok=True)
        return None
    os.replace(partial, target)
    return sum(end - begin for begin, end in ranges)


def record_revision(store: "Store", repo_id: str, revision: str | None, commit: str) -> None:
    """Remember the commit that a pull's `revision` (a branch, a tag, `refs/pr/1`)
    named, as the Hub cache's `refs/<revision>` does: an offline load at that
    revision finds the commit's snapshots, a pull of part of the pipeline's too
    (`revision_commit`). Until 2026-12-07 only a whole pipeline's pull could be
    found by its revision's name: `from_pretrained(repo, subfolder="unet",
    revision="v1")` offline was a RefNotFoundError though the store held it."""
    if revision and revision != commit:
        with store.writing(), store.db.atomic():  # every catalog writer holds it
            store.db["revision_names"].upsert({"repo": repo_id, "revision": revision, "commit_id": commit},
                                              pk=("repo", "revision"))


def revision_commit(store: "Store", repo_id: str, revision: str) -> str | None:
    """The commit the latest pull of `repo_id` at `revision` got (`record_revision`)."""
    if "revision_names" not in store.db.table_names():  # a read-only store an older compstore made
        return None
    row = store.db.execute("SELECT commit_id FROM revision_names WHERE repo = ? AND revision = ?",
                           [repo_id, revision]).fetchone()
    return row[0] if row else None


def record_xet_hashes(store: "Store", snapshot_id: str, xet_by_path: dict[str, str | None]) -> None:
    """Keep the Hub's Xet hash beside each file's sha256 (64 hex digits, else unknown)."""
    rows = [(x.lower(), snapshot_id, path) for path, x in xet_by_path.items()
            if isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x.lower())]
    if rows:
        with store.writing(), store.db.atomic():  # every catalog writer holds it
            store.db.conn.executemany(
                "UPDATE files SET xet_hash = ? WHERE id = (SELECT file_id FROM snapshot_files "
                "WHERE snapshot_id = ? AND path = ?)", rows)


def _fetch(url: str, headers: dict, target: Path, size: int, on_bytes=lambda n: None,
           retries: int = 3, sha256: str | None = None) -> tuple[int, str]:
    """Download `url` to `target` through huggingface_hub's HTTP session, resuming from
    `target`'s `.partial` file (kept by an interrupted pull). Returns the bytes fetched
    and the file's sha256, hashed as the bytes arrive (a resumed file's kept bytes
    are read back once). A resumed file that does not hash to `sha256` (the kept
    part went bad on disk) is downloaded again whole, once: the caller's check then
    sees the bytes the Hub serves, not the kept ones.

    Not hf_hub_download: huggingface_hub 2.4 writes each download to a new,
    process-unique temporary file, so an interrupted download starts over."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    http = _http_library()

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(target)
    fetched = 0
    h, hashed = hashlib.sha256(), 0  # `h` covers the first `hashed` bytes of `partial`
    for attempt in range(retries + 1):
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            partial.unlink()
            have = 0
        if have == size:
            break
        req = {**headers, "Accept-Encoding": "identity"}
        if have:
            req["Range"] = f"bytes={have}-"
        try:
            with get_session().stream("GET", url, headers=req, follow_redirects=True) as r:
                hf_raise_for_status(r)
                if have and r.status_code != 206:  # the server ignored the range: start over
                    have = 0
                if hashed != have:
                    h, hashed = _sha256_of_start(partial, have), have
                with open(partial, "ab" if have else "wb") as out:
                    for chunk in r.iter_bytes(1 << 20):
                        out.write(chunk)  # each chunk kept at once: a drop loses nothing
                        h.update(chunk)
                        hashed += len(chunk)
                        fetched += len(chunk)
                        on_bytes(len(chunk))
        except (http.TransportError, http.RemoteProtocolError):
            if attempt == retries:
                raise
    if partial.stat().st_size != size:
        raise OSError(f"{target.name}: got {partial.stat().st_size} bytes, expected {size}")
    if hashed != size:
        h = _sha256_of_start(partial, size)
    if sha256 and fetched < size and h.hexdigest() != sha256.lower():  # resumed, and wrong
        partial.unlink()
        more, digest = _fetch(url, headers, target, size, on_bytes, retries)
        return fetched + more, digest
    os.replace(partial, target)
    return fetched, h.hexdigest()


def _http_library():
    """The HTTP library of huggingface_hub's session, whose errors a download raises:
    httpx2 from huggingface_hub 2.0 on, httpx before."""
    import importlib

    from huggingface_hub.utils import get_session

    return importlib.import_module(type(get_session()).__module__.partition(".")[0])


def _partial(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def file_sha256(path: str | os.PathLike) -> str:
    return _sha256_of_start(path, os.path.getsize(path)).hexdigest()


def _sha256_of_start(path: str | os.PathLike, n: int):
    """A sha256 object fed the first `n` bytes of the file at `path`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while n > 0:
            chunk = f.read(min(n, 1 << 24))
            if not chunk:
                break
            h.update(chunk)
            n -= len(chunk)
    return h
