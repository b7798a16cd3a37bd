"""`Store`: the public API of the store layer. Each CLI command calls one method here.

    >>> from compstore import Store
    >>> store = Store()                       # $COMPSTORE_HOME or ~/.cache/compstore
    >>> store.ingest("./sdxl-base", name="sdxl-base")
    >>> store.du().dedup_ratio

Writers (ingest, rm, gc, pull, fetch, ...) take the store's write lock through
`Store.writing()`; readers (ls, show, du, diff, export, verify, and the loader) never
wait for it, and hold `Store.reading()` while they follow the catalog to pack files
(gc waits for them). Both reopen a catalog that `restore_catalog` replaced.
"""

from __future__ import annotations

import hashlib
import contextlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import sqlite_utils

from . import reports
from .catalog_backup import CatalogBackup, backup_catalog
from .catalog import REBUILD_ADVICE, damaged_catalog_is_an_error, ensure_schema, open_catalog, schema_ready
from .errors import (CompstoreError, CorruptStoreError, InvalidInputError, ReadOnlyStoreError,
                     RefExistsError, RefNotFoundError, StoreBusyError)
from .export import (ExportResult, file_pieces, flattened_files, flattened_index, snapshot_files,
                     write_file)
from .export import export as export_ref
from .ingest import Ingestor, component_rows, insert_blob_rows, now, snapshot_id
from .lock import remove_unless_locked, shared_readers, write_lock
from .adopt import AdoptReport
from .adopt import adopt as adopt_cache
from .manifest import build_manifest
from .hub import PullResult
from .hub import pull as pull_repo
from .gc import GcReport
from .gc import gc as collect_garbage
from .modular import check_pins, refuse_changed_folder_pins, resolve_pointers
from .objects import PackFiles, PackWriter, blob_hash, fsync_dir
from .progress import progress_bar
from .remote import DEFAULT_GRACE_S, Remote, RemoteError, RemoteGcReport
from .remote_sync import FetchResult, PushResult
from .remote_sync import fetch as fetch_ref
from .remote_sync import push as push_ref
from . import stat_cache
from .scan import FolderScan, scan_folder
from .verify import VerifyReport
from .verify import record_damage, verify as verify_store

_REF_RE = re.compile(r"^(?!\s)[^\x00-\x1f\x7f]{1,1024}(?<!\s)$")


def default_home() -> Path:
    """`$COMPSTORE_HOME`, else `~/.cache/compstore`."""
    env = os.environ.get("COMPSTORE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "compstore"


_private_skeletons: tempfile.TemporaryDirectory | None = None
_private_skeletons_lock = threading.Lock()


def private_skeletons() -> Path:
    """Where a read-only store's skeletons go: one folder per process, in the system's
    temporary folder, shared by every read-only store (a snapshot id names its content)
    and removed when the process exits. (A folder per load, kept, as until 2026-12-07,
    left one behind in /tmp at every load.)"""
    global _private_skeletons
    with _private_skeletons_lock:
        if _private_skeletons is None:
            _private_skeletons = tempfile.TemporaryDirectory(prefix="compstore-skeletons-")
        return Path(_private_skeletons.name)


def check_ref_name(name: str) -> str:
    if not isinstance(name, str) or not _REF_RE.match(name):
        raise InvalidInputError(
            repr(name), "invalid ref name: use 1-1024 characters, no control characters, "
            "no leading or trailing spaces"
        )
    return name


class TensorLocation(NamedTuple):
    name: str
    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]
    pack: str
    offset: int
    size: int
    xxh3: str


@dataclass
class IngestResult:
    ref: str
    snapshot: str
    status: str  # "new" | "updated" (ref moved to new content) | "unchanged" (no-op)
    kind: str
    files: int
    tensors: int
    components: int
    logical_bytes: int
    written_bytes: int
    reused_bytes: int
    seconds: float
    healed_bytes: int = 0  # of written_bytes: fresh copies of blobs `verify` found damaged

    def to_dict(self) -> dict:
        return asdict(self)


_SKELETON_STAMP = ".compstore-stamp.json"  # path -> [size, mtime_ns] of a skeleton's files


def _skeleton_files(folder: Path) -> dict[str, list[int]]:
    out, todo = {}, [("", os.fspath(folder))]
    while todo:  # os.scandir: a stat per file, none per folder twice (a load checks this)
        prefix, path = todo.pop()
        with os.scandir(path) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    todo.append((prefix + e.name + "/", e.path))
                elif e.name != _SKELETON_STAMP:
                    st = e.stat(follow_symlinks=False)
                    out[prefix + e.name] = [st.st_size, st.st_mtime_ns]
    return out


def _stamp_skeleton(folder: Path) -> None:
    (folder / _SKELETON_STAMP).write_text(json.dumps(_skeleton_files(folder)))


def _skeleton_intact(folder: Path) -> bool:
    """Whether a built skeleton holds exactly the files it was built with, as their
    stat describes them (a few stat calls per load; an edit that keeps a file's size
    and mtime goes unseen, as it would by `make`)."""
    try:
        return json.loads((folder / _SKELETON_STAMP).read_text()) == _skeleton_files(folder)
    except (OSError, ValueError):  # no stamp (built by an older compstore), or a bad one
        return False


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _close_catalog(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.ProgrammingError:  # dropped last in another thread: the collector closes it
        pass


def _refuse_packs_without_a_catalog(home: Path) -> None:
    """A store whose catalog.db is gone (or empty: SQLite takes an empty file for a new
    database) but whose packs are still there lost its catalog: a new store writes its
    catalog before any pack. Opening it would make an empty catalog, and the next `gc`
    would delete every pack as unreferenced."""
    catalog = home / "catalog.db"
    if catalog.exists() and catalog.stat().st_size > 0:
        return
    packs = list((home / "objects" / "packs").glob("*.pack"))
    if packs:
        size = sum(p.stat().st_size for p in packs)
        state = "is empty" if catalog.exists() else "is missing"
        raise CorruptStoreError(
            f"the catalog {catalog} {state}, but objects/packs holds {len(packs)} pack file"
            f"{'s' if len(packs) > 1 else ''} ({reports.human(size)}): the catalog was lost: {REBUILD_ADVICE}")


# What a store folder holds (store-format.md); a new store is made only where nothing else is.
_STORE_NAMES = {"catalog.db", "catalog.db-wal", "catalog.db-shm", "objects", "tmp", "lock", "readers.lock",
                "pull.lock", "pulls", "downloads", "skeletons"}


def _refuse_a_new_store_among_other_files(home: Path) -> None:
    """A new store goes into a new or empty folder: the store empties its tmp/ and
    objects/ of what it did not write, which in a folder of the user's would be the
    user's files. (A volume's lost+found and hidden files are allowed.)"""
    if home.exists() and not home.is_dir():
        raise CompstoreError(f"{home} is a file, not a store folder: pass a folder (--store, COMPSTORE_HOME)")
    if (home / "catalog.db").exists() or not home.is_dir():
        return
    others = sorted(p.name for p in home.iterdir()
                    if p.name not in _STORE_NAMES and p.name != "lost+found" and not p.name.startswith("."))
    if (home / "tmp").is_dir():  # a new store's tmp/ is empty until its catalog exists
        others += sorted(f"tmp/{p.name}" for p in (home / "tmp").iterdir())
    if others and not (home / "catalog.db").exists():  # (another process may have just made it)
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise CompstoreError(f"{home} is not a compstore store (no catalog.db) and holds other files "
                             f"({shown}): a new store needs a new or empty folder; pass another "
                             "(--store, COMPSTORE_HOME)")


class Store:
    """A content-addressed store of pipeline weights in one folder.

    Args:
        home: the store folder; defaults to `$COMPSTORE_HOME` or `~/.cache/compstore`.
            Created on first use.
        read_only: open without writing anything (loads, export, verify, reports
            work; ingest, rm, gc raise `ReadOnlyStoreError`). Default: read-only when
            the folder is not writable.
    """

    def __init__(self, home: str | os.PathLike | None = None, *, read_only: bool | None = None):
        self.home = Path(home).expanduser() if home is not None else default_home()
        if read_only is None:
            read_only = self.home.exists() and not os.access(self.home, os.W_OK)
        self.read_only = read_only
        _refuse_packs_without_a_catalog(self.home)
        if read_only:
            if not (self.home / "catalog.db").exists():
                raise CompstoreError(f"{self.home} is not a compstore store (no catalog.db)")
        else:
            _refuse_a_new_store_among_other_files(self.home)
            (self.home / "objects" / "packs").mkdir(parents=True, exist_ok=True)
            (self.home / "tmp").mkdir(exist_ok=True)
        self._catalog_file = _file_id(self.home / "catalog.db")  # (before opening: see _follow_the_catalog)
        with damaged_catalog_is_an_error(self.home / "catalog.db"):
            self.db = open_catalog(self.home / "catalog.db", read_only=read_only)
            if not read_only and not schema_ready(self.db):  # a new store: one process makes it
                with write_lock(self.home):
                    ensure_schema(self.db)
            ensure_schema(self.db, read_only=read_only)
        if self._catalog_file is None:  # a new store: the catalog it just made
            self._catalog_file = _file_id(self.home / "catalog.db")
        # CPython's sqlite3 connection sits in a reference cycle (its statement cache), so
        # a Store dropped without close() kept its catalog open until the cyclic collector
        # ran: 30 Stores opened and dropped in a loop held 30 catalog.db files open
        self._closers = [weakref.finalize(self, _close_catalog, self.db.conn)]
        self.packs = PackFiles(self.home / "objects" / "packs")

    def _holds_path(self, path: str | os.PathLike) -> bool:
        """Whether `path` is inside the store's folder, which is the store's own: its tmp/
        is emptied by the next writer (an export or a catalog backup goes elsewhere)."""
        return Path(path).resolve().is_relative_to(self.home.resolve())

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(f"store {self.home} is read-only: it can be loaded from, "
                                     "exported and verified, not changed")

    def __repr__(self) -> str:
        return f"Store({str(self.home)!r})"

    def close(self) -> None:
        self.packs.close()
        for close in self._closers:
            close()

    def _follow_the_catalog(self) -> None:
        """Reopen catalog.db if it is another file than the one this Store opened:
        `restore_catalog` (another process's, say) renamed a backup into its place. The
        old connection would go on reading the replaced catalog, and what this Store
        wrote would go into it and be lost, its packs unnamed in the restored catalog
        and removed by the next writer. Called where a restore cannot run meanwhile:
        holding the write lock or the readers' lock (`writing`, `reading`), and where
        refs are looked up."""
        now = _file_id(self.home / "catalog.db")
        if now is None or now == self._catalog_file:
            return
        with damaged_catalog_is_an_error(self.home / "catalog.db"):
            db = open_catalog(self.home / "catalog.db", read_only=self.read_only)
            try:
                ensure_schema(db, read_only=True)  # (`restore_catalog` made its tables)
            except BaseException:
                db.conn.close()
                raise
        # The old connection stays open until close(): a caller may still hold a cursor of it.
        self.db, self._catalog_file = db, now
        self._closers.append(weakref.finalize(self, _close_catalog, db.conn))

    def _follow_what_others_did(self) -> None:
        """At the start of an operation (holding a lock, so that neither a restore nor a
        gc runs meanwhile): reopen a restored catalog, and let go of the packs a gc
        elsewhere deleted. Until 2026-12-07 a Store kept every pack it had mapped (to
        compare an ingest's bytes, rebuild a pulled file, export) until `close()`: after
        `rm` and `gc` in another process, a long-running one held their disk space."""
        self._follow_the_catalog()
        self.packs.drop_deleted()

    @contextlib.contextmanager
    def writing(self, timeout_s: float | None = None) -> Iterator[None]:
        """The store's write lock, held by every catalog writer (`StoreBusyError` after
        `timeout_s`; default: the `COMPSTORE_LOCK_TIMEOUT` setting, 600 s)."""
        with write_lock(self.home, timeout_s=timeout_s):
            self._follow_what_others_did()
            yield

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- refs --------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """The snapshot id a ref points at; `RefNotFoundError` if there is no such ref."""
        self._follow_the_catalog()
        row = self.db.execute("SELECT snapshot_id FROM refs WHERE name = ?", [ref]).fetchone()
        if row is None:
            raise RefNotFoundError(ref, str(self.home), self.ref_names())
        return row[0]

    def ref_names(self) -> list[str]:
        """Every ref's name, sorted."""
        self._follow_the_catalog()
        return [name for name, in self.db.execute("SELECT name FROM refs ORDER BY name")]

    def pulls(self, repo_id: str) -> list[tuple[str, str]]:
        """(ref, snapshot id) of the refs named `repo_id@...` (a pull's: at a commit, a
        revision's name, a variant or a part), the latest made or moved first: where an
        offline load looks for a repo's pulls."""
        self._follow_the_catalog()
        return self.db.execute("SELECT name, snapshot_id FROM refs WHERE substr(name, 1, ?) = ? "
                               "ORDER BY updated DESC, name DESC", [len(repo_id) + 1, f"{repo_id}@"]).fetchall()

    def has_ref(self, ref: str) -> bool:
        self._follow_the_catalog()
        return self.db.execute("SELECT 1 FROM refs WHERE name = ?", [ref]).fetchone() is not None

    def rm(self, ref: str) -> dict:
        """Drop a ref. Its bytes stay until `gc` finds nothing else reaches them.

        >>> Store().rm("sdxl-base")  # doctest: +SKIP
        {'removed': 'sdxl-base', 'snapshot': '9c1e...'}
        """
        self._writable()
        with self.writing():
            snap = self.resolve(ref)
            with self.db.atomic():
                self.db.execute("DELETE FROM refs WHERE name = ?", [ref])
                stat_cache.forget(self.db, ref)
        return {"removed": ref, "snapshot": snap}

    def tag(self, ref: str, target: str, *, force: bool = False, missing_ok: bool = False) -> dict | None:
        """Point `ref` at `target`: a snapshot id, or a ref whose snapshot it takes (a
        name of your own for what you load, say, kept as later pulls move the repo's
        ref). A `ref` that names another snapshot moves only with `force`, else it is
        a `RefExistsError`. `missing_ok`: return None, and change nothing, if
        `target` names nothing (a snapshot a gc removed meanwhile).

        >>> Store().tag("sdxl-prod", "stabilityai/stable-diffusion-xl-base-1.0")  # doctest: +SKIP
        {'ref': 'sdxl-prod', 'snapshot': '9c1e...', 'moved_from': None}
        """
        self._writable()
        check_ref_name(ref)
        with self.writing(), self.db.atomic():
            if self.has_snapshot(target):
                snapshot_id = target
            elif missing_ok and not self.has_ref(target):
                return None
            else:
                snapshot_id = self.resolve(target)  # (no such ref: RefNotFoundError)
            was = self.resolve(ref) if self.has_ref(ref) else None
            if was not in (None, snapshot_id) and not force:
                raise RefExistsError(ref, was)
            self._set_ref(ref, snapshot_id)
        return {"ref": ref, "snapshot": snapshot_id, "moved_from": was if was != snapshot_id else None}

    def _set_ref(self, ref: str, snapshot_id: str) -> None:
        """Create or move a ref (inside the caller's transaction and write lock)."""
        self.db["refs"].upsert({"name": ref, "snapshot_id": snapshot_id, "updated": now()}, pk="name")
        self.db.execute("UPDATE refs SET created = coalesce(created, updated) WHERE name = ?", [ref])

    def pull(self, repo_id: str, *, revision: str | None = None, include: list[str] | None = None,
             exclude: list[str] | None = None, variant: str | None = None, name: str | None = None,
             token: str | bool | None = None, repin: bool = False, all_files: bool = False,
             progress: bool = False) -> PullResult:
        """Pull a Hub repo, downloading only the files whose content the store lacks:
        what `from_pretrained` loads, or with `all_files=True` the repo as published
        (see `hub.pull`).

        >>> Store().pull("org/tiny-sd", revision="main").downloaded_bytes  # doctest: +SKIP
        """
        return pull_repo(self, repo_id, revision=revision, include=include, exclude=exclude,
                         variant=variant,
                         name=name, token=token, repin=repin, all_files=all_files,
                         progress=progress)

    def xet_index(self, ref: str, *, token: str | bool | None = None) -> dict:
        """Index the Xet chunks of `ref`'s files that were not pulled through Xet
        (plain HTTP, `adopt`), so that later pulls of related repos fetch only the
        chunks the store lacks. Asks the Hub for reconstructions (metadata only) and
        chunks the stored files here (~130 MB/s).

        >>> Store().xet_index("stabilityai/sdxl-base")  # doctest: +SKIP
        {'ref': 'stabilityai/sdxl-base', 'files': 3, 'files_indexed': 3, 'chunks': 81233, ...}
        """
        from .hub import HubError, is_repo_id
        from .xet import XetError, index_snapshot

        self._writable()
        t0 = time.perf_counter()
        snap = self.snapshot(self.resolve(ref))
        if not snap["revision"] or not is_repo_id(snap["source"] or ""):
            raise InvalidInputError(ref, "was not pulled from the Hub (no repo and commit "
                                    "recorded): only Hub snapshots have Xet chunks to index")
        try:
            report = index_snapshot(self, snap["id"], snap["source"], snap["revision"], token)
        except XetError as e:
            raise HubError(f"{ref}: {e}") from None
        return {"ref": ref, **report, "seconds": round(time.perf_counter() - t0, 3)}

    def adopt(self, cache_dir: str | os.PathLike | None = None, *, reclaim: bool = False,
              progress: bool = False) -> AdoptReport:
        """Ingest every diffusers snapshot of a Hugging Face cache; see `adopt.py`."""
        self._writable()
        return adopt_cache(self, cache_dir, reclaim=reclaim, progress=progress)

    def manifest(self, ref: str) -> dict:
        """The tensor manifest of `ref` (commit it to the repo as compstore.manifest.json)
        so that pulls of it fetch only the tensors a store lacks; see `manifest.py`."""
        with self.reading():
            return build_manifest(self, ref)

    # -- remotes -------------------------------------------------------------------
    def remote_add(self, name: str, url: str, **storage_options) -> dict:
        """Remember a remote store (an fsspec URL) under `name`; options go to fsspec.

        Prefer credentials from the environment or the provider's config files: options
        are kept in the catalog in plain text.

        >>> Store().remote_add("fleet", "s3://weights/compstore")  # doctest: +SKIP
        {'name': 'fleet', 'url': 's3://weights/compstore', 'options': {}}
        """
        self._writable()
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", name or ""):
            raise InvalidInputError(repr(name), "invalid remote name: use letters, digits, '.', '_', "
                                    "'-' (at most 64)")
        if "://" not in url and not url.startswith("/"):
            raise InvalidInputError(url, "a remote is a URL (s3://bucket/prefix, gs://..., "
                                    "file:///path) or an absolute path")
        Remote(url, **storage_options)  # fails now, not at the first push, if fsspec cannot
        with self.writing(), self.db.atomic():
            if self.db.execute("SELECT 1 FROM meta WHERE key = ?", [f"remote:{name}"]).fetchone():
                raise InvalidInputError(name, "a remote of that name exists; `compstore remote rm` it first")
            self.db["meta"].insert({"key": f"remote:{name}",
                                    "value": json.dumps({"url": url, "options": storage_options})})
        return {"name": name, "url": url, "options": storage_options}

    def remote_rm(self, name: str) -> dict:
        """Forget a remote (nothing on the remote is touched)."""
        self._writable()
        with self.writing(), self.db.atomic():
            self._remote_config(name)
            self.db.execute("DELETE FROM meta WHERE key = ?", [f"remote:{name}"])
        return {"removed": name}

    def remotes(self) -> list[dict]:
        """The remotes this store knows: name, url, options."""
        return [{"name": k[len("remote:"):], **json.loads(v)} for k, v in self.db.execute(
            "SELECT key, value FROM meta WHERE key LIKE 'remote:%' ORDER BY key")]

    def _remote_config(self, name: str) -> dict:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [f"remote:{name}"]).fetchone()
        if row is None:
            known = ", ".join(r["name"] for r in self.remotes()) or "none yet"
            raise RemoteError(f"no remote named {name!r} (known: {known}); add one with "
                              "`compstore remote add NAME URL`")
        return json.loads(row[0])

    def remote(self, name: str | None = None) -> Remote:
        """The `Remote` of a configured name; with no name, the only configured one.
        A URL (anything with `://`) is opened as it is."""
        if name is not None and ("://" in name or name.startswith("/")):
            return Remote(name)
        if name is None:
            names = [r["name"] for r in self.remotes()]
            if len(names) != 1:
                raise RemoteError("name the remote (--to/--from NAME): this store has "
                                  f"{len(names)} remotes ({', '.join(names) or 'none'})")
            name = names[0]
        config = self._remote_config(name)
        return Remote(config["url"], **config["options"])

    def push(self, ref: str, *, to: str | None = None, as_ref: str | None = None,
             progress: bool = False) -> PushResult:
        """Upload `ref` to a remote: only the blobs the remote lacks, then the ref.

        >>> Store().push("sdxl-base", to="fleet").uploaded_bytes  # doctest: +SKIP
        """
        return push_ref(self, ref, self.remote(to), check_ref_name(as_ref or ref), progress=progress)

    def fetch(self, ref: str, *, from_: str | None = None, name: str | None = None,
              progress: bool = False) -> FetchResult:
        """Bring a remote's `ref` into this store (as `name`, default the same name),
        downloading only the blobs this store lacks, each checked against its hash.

        >>> Store().fetch("sdxl-base", from_="fleet").downloaded_bytes  # doctest: +SKIP
        """
        self._writable()
        return fetch_ref(self, self.remote(from_), ref, check_ref_name(name or ref), progress=progress)

    def remote_refs(self, name: str | None = None) -> dict[str, str]:
        """The refs of a remote: name -> snapshot id."""
        return self.remote(name).refs()

    def remote_rm_ref(self, ref: str, *, remote: str | None = None) -> dict:
        """Drop a ref on a remote; its objects stay until `remote_gc`."""
        r = self.remote(remote)
        return {"removed": ref, "remote": r.url, "snapshot": r.delete_ref(ref)}

    def remote_gc(self, name: str | None = None, *, dry_run: bool = False,
                  grace_s: float = DEFAULT_GRACE_S) -> RemoteGcReport:
        """Delete what no ref of the remote reaches (unreferenced objects younger than
        `grace_s` stay); see `remote_gc.py`."""
        return self.remote(name).gc(dry_run=dry_run, grace_s=grace_s)

    # -- writing -----------------------------------------------------------------
    def _clean_leftovers(self, dry_run: bool = False) -> tuple[int, int]:
        """Remove what a crashed writer left: tmp files, packs the catalog never named
        (a writer renames its pack into place before its catalog commit). Returns the
        number and bytes of those packs; `dry_run` only counts them.

        Called under the write lock, so no other writer can be mid-way.
        """
        if not dry_run:
            for p in (self.home / "tmp").iterdir():
                if p.is_dir():
                    remove_unless_locked(p)  # a live push's scratch folder stays
                else:
                    p.unlink(missing_ok=True)
        known = {r[0] for r in self.db.execute("SELECT name FROM packs")}
        count = size = 0
        for p in (self.home / "objects" / "packs").glob("*.pack"):
            if p.stem not in known:
                count, size = count + 1, size + p.stat().st_size
                if not dry_run:
                    p.unlink(missing_ok=True)
        return count, size

    def ingest(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        *,
        allow_pickle: bool = False,
        exclude: list[str] | None = None,
        source: str | None = None,
        revision: str | None = None,
        repin: bool = False,
        progress: bool = False,
        checked_sha256: dict[str, str] | None = None,
        token: str | bool | None = None,
        consume_weights: bool = False,
        check: Callable[[FolderScan], object] | None = None,
    ) -> IngestResult:
        """Ingest a pipeline folder or a single component folder under ref `name`.

        Every tensor, safetensors header and small file is stored once, whatever
        file, shard layout or repo it arrives in. Re-ingesting identical content is
        a no-op (`status == "unchanged"`). Bad input raises `InvalidInputError` and
        leaves the store as it was. A modular pipeline's entries that point at other
        folders or refs are pinned (see `modular.py`); if a pinned source changed
        since, `PinChangedError` is raised unless `repin=True`. `checked_sha256`
        (path in the folder -> sha256) gives files' sha256 the caller has just computed
        from the very same bytes (a pull checks each download against the Hub's);
        those files are not hashed again, and a wrong value is recorded as given.
        `token`: for the pulls of Hub repos that a modular pipeline's entries point at.
        `consume_weights` (a pull's downloads): each safetensors file of `path` is
        deleted once its bytes are in the store's new packs, so that the ingest
        needs the disk of the largest file beside the downloads, not of all of them;
        if it then fails, those files must be fetched again. `check(scan)` is called
        once the folder is read and validated, before anything is written: what it
        raises refuses the ingest.

        A folder whose files' size, mtime, ctime and inode are as when `name` was
        last ingested from it, while `name` still points at what that ingest made,
        is "unchanged" without a payload byte read; of a folder changed in part,
        only the files changed are read (stat_cache.py).

        >>> Store().ingest("./tiny-sd", name="tiny-sd").status  # doctest: +SKIP
        'new'
        """
        self._writable()
        t0, started_ns = time.perf_counter(), time.time_ns()
        scan = scan_folder(path, allow_pickle=allow_pickle, exclude=exclude)
        ref = check_ref_name(Path(scan.root).name if name is None else name)
        if check is not None:
            check(scan)
        # A modular folder's pointers are followed again (what they name may have moved);
        # a pull's downloads are new files, deleted as they go.
        stamp = None if scan.kind == "modular" or consume_weights else stat_cache.stamp(scan, started_ns)
        if (hit := stat_cache.unchanged(self.db, ref, stamp)) is not None:
            snap, c = hit
            return IngestResult(ref, snap, "unchanged", scan.kind, c.files, c.tensors, c.components,
                                c.logical_bytes, 0, c.reused_bytes, round(time.perf_counter() - t0, 3))
        repin_command = (f"compstore pull {source} --repin" if revision else
                         f"compstore ingest {scan.root} --name {ref} --repin")
        if scan.kind == "modular" and not repin:  # before a pointed-to folder is ingested
            refuse_changed_folder_pins(self, ref, scan, repin_command)
        pins = resolve_pointers(self, scan, token=token)
        with self.writing():
            self._clean_leftovers()
            check_pins(self, ref, pins, repin_command, repin)
            writer = PackWriter(self.home)
            try:
                with progress_bar(scan.total_bytes, f"ingest {ref}", progress) as bar, \
                        Ingestor(self.db, self.packs, writer, bar.update) as ing:
                    known = stat_cache.known_files(self.db, ref, stamp) if stamp is not None else {}
                    for f in sorted(scan.files.values(), key=lambda f: f.path):
                        if f.path in known and ing.reuse_file(f, known[f.path]):
                            continue  # unchanged since the ref's last ingest: not read
                        ing.ingest_file(f, (checked_sha256 or {}).get(f.path))
                        if consume_weights and f.header is not None:
                            os.unlink(f.source)  # its bytes are in the packs (an mmap still open keeps them)
                    writer.seal()  # the last pack's fsync runs beside the last sha256s
                    ing.finish()
                components, comp_tensors, slots = component_rows(scan, ing)
                snap = snapshot_id(scan, ing, pins)
                old = self.db.execute("SELECT snapshot_id FROM refs WHERE name = ?", [ref]).fetchone()
                status = "new" if old is None else ("unchanged" if old[0] == snap else "updated")

                def write_catalog(packs) -> None:
                    if status != "unchanged" or packs:
                        self._commit(ing, packs, components, comp_tensors, slots, pins, scan,
                                     snap, ref, source, revision)

                writer.commit_with(write_catalog)
            except BaseException:
                writer.abort()
                raise
            s = ing.stats
            stat_cache.record(self.db, ref, stamp, snap, stat_cache.Counts(  # as a re-ingest counts
                s.files, s.tensors, len(slots), s.logical_bytes, s.written_bytes + s.reused_bytes),
                {path: r.sha256 for path, r in ing.files.items()})
        return IngestResult(ref, snap, status, scan.kind, s.files, s.tensors, len(slots),
                            s.logical_bytes, s.written_bytes, s.reused_bytes,
                            round(time.perf_counter() - t0, 3), s.healed_bytes)

    def _commit(self, ing: Ingestor, packs, components, comp_tensors, slots, pins,
                scan, snap, ref, source, revision) -> None:
        db = self.db
        with db.atomic():  # one transaction: all of it or none of it
            insert_blob_rows(db, ing, packs)
            db["tensors"].insert_all(ing.new_tensors, batch_size=1000)
            new_files = {r.id: r for r in ing.files.values() if r.is_new}
            db["files"].insert_all(
                ({"id": r.id, "sha256": r.sha256, "size": r.size, "kind": r.kind,
                  "header_blob": r.header_blob, "raw_blob": r.raw_blob, "xet_hash": None}
                 for r in new_files.values()), batch_size=1000)
            db["file_tensors"].insert_all(
                ({"file_id": r.id, "pos": i, "tensor_id": t}
                 for r in new_files.values() for i, t in enumerate(r.tensor_ids)), batch_size=1000)
            db["components"].insert_all(components, ignore=True)
            db["component_tensors"].insert_all(comp_tensors, ignore=True, batch_size=1000)
            db["snapshots"].insert(
                {"id": snap, "source": source or scan.root, "revision": revision,
                 "kind": scan.kind, "created": now()}, ignore=True)
            db["snapshot_files"].insert_all(
                ({"snapshot_id": snap, "path": p, "file_id": r.id} for p, r in ing.files.items()),
                ignore=True, batch_size=1000)
            db["snapshot_components"].insert_all(
                ({"snapshot_id": snap, **s} for s in slots), ignore=True)
            db["pins"].insert_all(({"snapshot_id": snap, **p.to_dict()} for p in pins), ignore=True)
            self._set_ref(ref, snap)
        fsync_dir(self.home)

    def recorded_file_sha256(self, ref: str, path: str | os.PathLike, started_ns: int) -> str | None:
        """The sha256 recorded (`record_file_sha256`) for the file at absolute `path`
        under `ref`, if the file's stat (device, inode, size, mtime, ctime) is as it was
        then, and `ref` still points at the snapshot it was recorded with: the bytes
        are those that sha256 was taken of, without reading them (see stat_cache.py).
        `started_ns`: `time.time_ns()` when the caller began; a file changed shortly
        before is not trusted."""
        digest = stat_cache.file_stamp(os.fspath(path), started_ns)
        row = digest and self.db.execute(
            "SELECT f.sha256 FROM stat_cache_files f JOIN refs r ON r.name = f.ref AND "
            "r.snapshot_id = f.snapshot_id WHERE f.ref = ? AND f.path = ? AND f.stamp = ?",
            [ref, os.fspath(path), digest]).fetchone()
        return row[0] if row else None

    def record_file_sha256(self, ref: str, snapshot_id: str, path: str | os.PathLike, sha256: str,
                           started_ns: int) -> None:
        """Remember that the file at absolute `path`, as it stands, has `sha256`, while
        `ref` points at `snapshot_id` (made from that file: a single-file checkpoint's
        conversion). Nothing is recorded for a file changed too recently, a ref that
        points elsewhere by now, or in a read-only store."""
        digest = stat_cache.file_stamp(os.fspath(path), started_ns)
        if digest is None or self.read_only:
            return
        with self.writing(), self.db.atomic():
            if not (self.has_ref(ref) and self.resolve(ref) == snapshot_id):
                return
            self.db.execute("DELETE FROM stat_cache_files WHERE ref = ? AND path = ?", [ref, os.fspath(path)])
            self.db["stat_cache_files"].insert({"ref": ref, "path": os.fspath(path), "stamp": digest,
                                                "sha256": sha256, "snapshot_id": snapshot_id})

    def gc(self, *, dry_run: bool = False) -> GcReport:
        """Remove every payload no ref reaches and compact packs; see `gc.py`.

        >>> Store().gc().freed_bytes  # doctest: +SKIP
        """
        self._writable()
        return collect_garbage(self, dry_run=dry_run)

    # -- reading for the loader ---------------------------------------------------
    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Context manager held while following the catalog to pack files: gc deletes no
        catalog row and unlinks no pack while any reader holds it (it waits). A
        read-only store takes no lock (it cannot make the lock file)."""
        with contextlib.nullcontext() if self.read_only else shared_readers(self.home):
            self._follow_what_others_did()
            yield

    @contextlib.contextmanager
    def reading_snapshot(self, snapshot_id: str, name: str):
        """`reading()`, for a snapshot resolved from `name` before: `RefNotFoundError` if
        a `rm` and a gc removed it since (else its rows stay until the block ends)."""
        with self.reading():
            if not self.has_snapshot(snapshot_id):
                raise RefNotFoundError(name, str(self.home))
            yield

    def has_snapshot(self, snapshot_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM snapshots WHERE id = ?", [snapshot_id]).fetchone() is not None

    def snapshot(self, snapshot_id: str) -> dict:
        """A snapshot's row: id, source, revision, kind, created."""
        try:
            return self.db["snapshots"].get(snapshot_id)
        except sqlite_utils.db.NotFoundError:
            raise CompstoreError(f"snapshot {snapshot_id} is not in store {self.home}") from None

    def snapshot_files(self, snapshot_id: str) -> list[tuple[str, int, str, int]]:
        """(path, file id, sha256, size) of every file of a snapshot, sorted by path."""
        return snapshot_files(self, snapshot_id)

    def read_file(self, snapshot_id: str, path: str) -> bytes | None:
        """The bytes of one (small) file of a snapshot, or None if it has no such file."""
        row = self.db.execute(
            "SELECT f.id, f.sha256 FROM snapshot_files sf JOIN files f ON f.id = sf.file_id "
            "WHERE sf.snapshot_id = ? AND sf.path = ?", [snapshot_id, path]).fetchone()
        if row is None:
            return None
        data = b"".join(bytes(p) for p in file_pieces(self, row[0]))
        if hashlib.sha256(data).hexdigest() != row[1]:  # small files: checked at every read
            raise CorruptStoreError(f"{path}: stored bytes do not match the recorded sha256; "
                                    "run `compstore verify`")
        return data

    def components_of(self, snapshot_id: str) -> list[dict]:
        """slot, variant, component id, library, class_name of each component of a snapshot."""
        return [dict(r) for r in self.db.query(
            """SELECT slot, variant, component_id, library, class_name FROM snapshot_components
               WHERE snapshot_id = ? ORDER BY slot, variant""", [snapshot_id])]

    def component_config(self, component_id: str) -> dict | None:
        """The stored config.json of a component, parsed (None for config-less ones)."""
        row = self.db.execute(
            """SELECT b.pack, b.offset, b.size, b.xxh3 FROM components c JOIN blobs b
               ON b.id = c.config_blob WHERE c.id = ?""", [component_id]).fetchone()
        if row is None:
            return None
        return json.loads(self._checked_blob(*row, f"the stored config of component {component_id[:12]}"))

    def weights_metadata(self, component_id: str) -> dict[str, str]:
        """The `__metadata__` of a component's own safetensors files (in the snapshots
        that hold it, the files all of whose tensors are the component's), merged: what
        a library reads from the files of a model saved quantized (torchao's layout of
        its tensor subclasses). Another repo's file that holds some of the same tensors
        beside others, or a subset of them, is not the component's.

        >>> store.weights_metadata(store.components_of(store.resolve("sd-q"))[0]["component_id"])  # doctest: +SKIP
        {'format': 'pt', 'tensor_names': '["conv_in.weight", ...]', ...}
        """
        metadata: dict[str, str] = {}
        for pack, offset, size, xxh3 in self.db.execute(
                """WITH mine(tensor_id) AS (SELECT tensor_id FROM component_tensors WHERE component_id = :c),
                        files_of AS (SELECT DISTINCT sf.file_id FROM snapshot_components sc
                                     JOIN snapshot_files sf ON sf.snapshot_id = sc.snapshot_id
                                     WHERE sc.component_id = :c)
                   SELECT b.pack, b.offset, b.size, b.xxh3 FROM files f JOIN blobs b ON b.id = f.header_blob
                   WHERE f.id IN files_of
                     AND f.id IN (SELECT ft.file_id FROM file_tensors ft WHERE ft.tensor_id IN mine)
                     AND NOT EXISTS (SELECT 1 FROM file_tensors ft WHERE ft.file_id = f.id
                                     AND ft.tensor_id NOT IN mine)
                   ORDER BY f.id""", {"c": component_id}):
            data = self._checked_blob(pack, offset, size, xxh3,
                                      f"a stored safetensors header of component {component_id[:12]}")
            metadata.update(json.loads(data[8:]).get("__metadata__") or {})  # checked at ingest (scan.py)
        return metadata

    def _checked_blob(self, pack: str, offset: int, size: int, xxh3: str, what: str) -> bytes:
        """A small blob's bytes, read once and checked against their hash: a flipped bit
        in a config or a header is an error naming `what`, never a wrong value."""
        data = bytes(self.packs.view(pack, offset, size))
        if blob_hash(data) != xxh3:
            raise CorruptStoreError(f"{what} does not match its hash; run `compstore verify`")
        return data

    def tensor_locations(self, component_id: str) -> list[TensorLocation]:
        """Where each tensor of a component lives: name, dtype, shape, pack, offset, size."""
        return [TensorLocation(name, dtype, tuple(json.loads(shape)), pack, offset, size, xxh3)
                for name, dtype, shape, pack, offset, size, xxh3 in self.db.execute(
                    """SELECT t.name, t.dtype, t.shape, b.pack, b.offset, b.size, b.xxh3
                       FROM component_tensors ct JOIN tensors t ON t.id = ct.tensor_id
                       JOIN blobs b ON b.id = t.blob_id WHERE ct.component_id = ?
                       ORDER BY ct.pos""", [component_id])]

    def materialize(self, snapshot_id: str, keep: Callable[[str], bool]) -> Path:
        """A folder holding the snapshot's files for which `keep(path)` is true.

        A modular snapshot is flattened: pinned components' files under their slots,
        the index rewritten to point at this folder. Built once per snapshot under
        `<store>/skeletons/` (a read-only store's: `private_skeletons()`), tmp + rename
        so that a half-written one is never seen, and reused: snapshots are immutable.
        """
        # A read-only store: nothing may be written in it, so the process's own folder.
        root = private_skeletons() if self.read_only else self.home / "skeletons"
        dest = root / snapshot_id
        if dest.exists():
            if _skeleton_intact(dest):
                return dest
            # A file edited, removed or added since it was built (by hand, by a cleaner
            # of old files): loading it would give another scheduler or tokenizer.
            stale = root / f".stale-{snapshot_id}-{uuid.uuid4().hex[:8]}"  # gc removes it
            try:
                os.rename(dest, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:  # another process set it aside first
                pass
        # Built beside its final place, not in tmp/: readers hold no lock, and a
        # writer clears tmp/ at start. A crash leaves a .building-* folder for gc.
        tmp = root / f".building-{snapshot_id}-{uuid.uuid4().hex[:8]}"
        with self.reading():
            for path, file_id, sha256, size in flattened_files(self, snapshot_id):
                if keep(path):
                    write_file(self, file_id, sha256, tmp / path)
            tmp.mkdir(parents=True, exist_ok=True)
            index = flattened_index(self, snapshot_id, dest)  # modular: every slot from here
            if index is not None:
                (tmp / "modular_model_index.json").write_bytes(index)
        _stamp_skeleton(tmp)
        dest.parent.mkdir(exist_ok=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # -- reading: each report lives in its own module --------------------------
    # Each under `reading()`: a gc in another process waits, so the rows of the
    # snapshots a report resolved are there until it is done.
    def ls(self) -> list[dict]:
        """Every ref with its snapshot, kind, source, file count and logical bytes."""
        with self.reading():
            return reports.ls(self)

    def show(self, ref: str) -> dict:
        """One ref: files, components (ids, sizes) and which other refs share each."""
        with self.reading():
            return reports.show(self, ref)

    def du(self) -> reports.DuReport:
        """Logical vs physical bytes, dedup ratio, and per ref the bytes only it holds."""
        with self.reading():
            return reports.du(self)

    def diff(self, a: str, b: str) -> reports.DiffReport:
        """Per component, what B shares with A; `delta_bytes` is what A -> B must move."""
        with self.reading():
            return reports.diff(self, a, b)

    def export(self, ref: str, dest: str | os.PathLike, *, flatten: bool = False,
               progress: bool = False) -> ExportResult:
        """Rebuild the files of `ref` in `dest`, byte-for-byte (same sha256); `flatten`
        makes a modular pipeline self-contained (pinned components copied in)."""
        with self.reading():
            return export_ref(self, ref, dest, flatten=flatten, progress=progress)

    def backup_catalog(self, dest: str | os.PathLike) -> CatalogBackup:
        """Copy the catalog, consistently, to the new file `dest`: what a lost or damaged
        catalog is restored from (`compstore.restore_catalog`; catalog_backup.py).

        >>> Store().backup_catalog("catalog-2026-12-07.db").refs  # doctest: +SKIP
        4
        """
        with self.reading():  # the catalog as it is now (one a restore put in place), and none put meanwhile
            return backup_catalog(self, dest)

    def verify(self, *, progress: bool = False) -> VerifyReport:
        """Re-hash every payload; `ok` is False and the refs are named on any problem.

        The damaged blobs are recorded (`recorded`: in a writable store no other
        process is writing to): ingesting or pulling their sources again, or
        fetching them from a remote, writes them afresh.

        >>> Store().verify().problems  # doctest: +SKIP
        []
        """
        with self.reading():
            report = verify_store(self, progress=progress)
        # Recorded after reading() (a writer never waits for gc while it reads), and only
        # if no other writer holds the lock: verify is a reader, and never waits for one.
        if not self.read_only and not report.catalog_problems:
            try:
                with self.writing(timeout_s=0):
                    record_damage(self.db, report.problems)
                    report.recorded = True
            except StoreBusyError:
                pass  # the next verify records it
        return report
