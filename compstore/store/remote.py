"""A remote: one shared, content-addressed store on object storage, through fsspec.

Layout under the remote's URL (see docs/remote-format.md):

    compstore-remote.json        {"format": 1}
    packs/<sha256>.pack          immutable: blobs the remote lacked when a push wrote it
    index/<sha256>.json          immutable: the blobs of that pack (key, offset, size)
    snapshots/<snapshot>.json    immutable: a snapshot's files, components and pins,
                                 blobs named by key ("<xxh3-128>:<size>")
    refs/<quoted name>.json      the only mutable objects: {"name", "snapshot", ...}
    locks/<kind>-<uuid>.json     leases of running pushes and gcs

A push writes packs, then their indexes, then snapshot documents, then the ref, so
a ref never names what is not there and an interrupted push leaves only objects
the next push reuses (by their index) or gc removes. Each object is written whole
by one PUT (object stores make it visible atomically) or, on a local filesystem, to
a temporary name and renamed. Two pushes of one ref at once: the last write wins,
and either state is complete.

Remote gc and pushes exclude each other by leases: each writes its lock object,
then lists the locks; whoever sees the other's live lease backs off. On top of
that, gc never deletes an unreferenced object younger than its grace period.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime

from .errors import CompstoreError
from .settings import env_setting

FORMAT = 1
LEASE_S = 600.0  # default of $COMPSTORE_REMOTE_LEASE_S
DEFAULT_GRACE_S = 3600.0


class RemoteError(CompstoreError):
    """A remote is unreachable, malformed, incomplete or busy; the local store is unchanged."""


class RemoteBusyError(RemoteError):
    """A push and a remote gc would overlap; one of them backed off. Retry later."""


@dataclass(frozen=True)
class PackEntry:
    pack: str  # sha256 of the pack's bytes
    offset: int
    size: int


def blob_key(xxh3: str, size: int) -> str:
    """How a blob is named on a remote (and in snapshot documents)."""
    return f"{xxh3}:{size}"


def split_key(key: str) -> tuple[str, int]:
    xxh3, size = key.split(":")
    return xxh3, int(size)


class Remote:
    """One remote store at an fsspec URL (`s3://bucket/prefix`, `gs://...`, `file:///path`
    or a plain path). Storage options (credentials, `endpoint_url`, ...) go to fsspec.

    >>> remote = Remote("s3://fleet-weights/compstore", endpoint_url="http://minio:9000")  # doctest: +SKIP
    >>> remote.refs()  # doctest: +SKIP
    {'sdxl-base': '9c1e...'}
    """

    def __init__(self, url: str, **storage_options):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = url
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except (ImportError, ValueError, TypeError, OSError) as e:  # OSError: a filesystem that
            raise RemoteError(f"cannot open remote {url}: {e}") from None  # connects (ftp://)
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.sent_bytes = 0  # every byte this object PUT to the remote
        self.received_bytes = 0  # every byte it GOT from it

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    # -- objects -------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except (OSError, RuntimeError, ValueError) as e:  # botocore/aiohttp errors are OSErrors or wrap
            raise RemoteError(f"{self.url}: {what} failed: {e}") from None

    def _replace_local(self, path: str, write) -> None:
        """A local object: written by `write(tmp path)` beside it, fsynced, renamed."""
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write one whole object, atomically."""
        path = self._path(rel)
        if self.local:
            self._replace_local(path, lambda tmp: self.fs.pipe_file(tmp, data))
        else:
            self._call(f"writing {rel}", self.fs.pipe_file, path, data)
        self.sent_bytes += len(data)

    def put_file(self, rel: str, local_path: str) -> None:
        """Upload a local file as one object, atomically."""
        path = self._path(rel)
        if self.local:
            self._replace_local(path, lambda tmp: self.fs.put_file(local_path, tmp))
        else:
            self._call(f"uploading {rel}", self.fs.put_file, local_path, path)
        self.sent_bytes += os.path.getsize(local_path)

    def get_bytes(self, rel: str) -> bytes:
        data = self._call(f"reading {rel}", self.fs.cat_file, self._path(rel))
        self.received_bytes += len(data)
        return data

    def get_ranges(self, rel_paths: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
        """Byte ranges of objects, fetched concurrently where the filesystem can."""
        out = self._call("reading pack ranges", self.fs.cat_ranges,
                         [self._path(p) for p in rel_paths], starts, ends, on_error="raise")
        for data, a, b in zip(out, starts, ends):
            if isinstance(data, Exception):
                raise RemoteError(f"{self.url}: reading pack ranges failed: {data}")
            if len(data) != b - a:
                raise RemoteError(f"{self.url}: a pack is shorter than its index says "
                                  f"(got {len(data)} of {b - a} bytes); run `compstore remote gc`")
        self.received_bytes += sum(len(d) for d in out)
        return out

    def get_json(self, rel: str):
        data = self.get_bytes(rel)
        try:
            return json.loads(data)
        except ValueError:
            raise RemoteError(f"{self.url}: {rel} is not valid JSON; the remote is damaged") from None

    def put_json(self, rel: str, value) -> None:
        self.put_bytes(rel, json.dumps(value, sort_keys=True, separators=(",", ":")).encode())

    def exists(self, rel: str) -> bool:
        return bool(self._call(f"checking {rel}", self.fs.exists, self._path(rel)))

    def delete(self, rel: str) -> None:
        try:
            self._call(f"deleting {rel}", self.fs.rm_file, self._path(rel))
        except FileNotFoundError:
            pass

    def listdir(self, rel: str) -> list[tuple[str, float, int]]:
        """(name, modification time as epoch seconds, size) of the objects in a folder."""
        self.fs.invalidate_cache()
        try:
            entries = self._call(f"listing {rel}", self.fs.ls, self._path(rel), detail=True)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            if e.get("type") == "directory":
                continue
            out.append((e["name"].rstrip("/").rsplit("/", 1)[-1], _mtime(e), int(e.get("size") or 0)))
        return out

    # -- the remote's parts -----------------------------------------------------------
    def ensure_format(self, create: bool) -> None:
        """Check the remote's format marker; write it on a new remote if `create`."""
        try:
            marker = self.get_json("compstore-remote.json")
        except FileNotFoundError:
            if not create:
                raise RemoteError(f"{self.url} is not a compstore remote (no compstore-remote.json); "
                                  "push to it first") from None
            self.put_json("compstore-remote.json", {"format": FORMAT})
            return
        if not isinstance(marker, dict) or marker.get("format") != FORMAT:
            raise RemoteError(f"{self.url} has remote format {marker!r}; this compstore reads "
                              f"format {FORMAT}: upgrade compstore")

    def refs(self) -> dict[str, str]:
        """Every ref on the remote: name -> snapshot id."""
        out = {}
        for name, _, _ in self.listdir("refs"):
            if name.endswith(".json"):
                doc = self.get_json(f"refs/{name}")
                out[doc["name"]] = doc["snapshot"]
        return out

    def get_ref(self, name: str) -> str | None:
        try:
            return self.get_json(_ref_path(name))["snapshot"]
        except FileNotFoundError:
            return None

    def set_ref(self, name: str, snapshot_id: str) -> None:
        self.put_json(_ref_path(name), {"name": name, "snapshot": snapshot_id,
                                        "updated": time.time(), "host": socket.gethostname()})

    def delete_ref(self, name: str) -> str:
        """Drop a remote ref (its objects stay until `gc`); returns the snapshot it named."""
        snap = self.get_ref(name)
        if snap is None:
            raise RemoteError(f"no ref named {name!r} on remote {self.url} "
                              "(see `compstore remote refs`)")
        self.delete(_ref_path(name))
        return snap

    def blob_index(self) -> dict[str, PackEntry]:
        """Where every blob the remote holds lives, read from all index documents."""
        out: dict[str, PackEntry] = {}
        for name, _, _ in self.listdir("index"):
            if not name.endswith(".json"):
                continue
            doc = self.get_json(f"index/{name}")
            for key, offset in doc["blobs"]:
                out.setdefault(key, PackEntry(doc["pack"], offset, split_key(key)[1]))
        return out

    def snapshot_doc(self, snapshot_id: str) -> dict:
        try:
            return self.get_json(f"snapshots/{snapshot_id}.json")
        except FileNotFoundError:
            raise RemoteError(f"remote {self.url} lacks snapshot {snapshot_id}: a push of it "
                              "was interrupted; push it again") from None

    # -- leases ----------------------------------------------------------------------
    def lease(self, kind: str) -> "Lease":
        return Lease(self, kind)

    def gc(self, *, dry_run: bool = False, grace_s: float = DEFAULT_GRACE_S) -> "RemoteGcReport":
        """Delete what no remote ref reaches; see `remote_gc`."""
        from .remote_gc import remote_gc

        return remote_gc(self, dry_run=dry_run, grace_s=grace_s)


class Lease:
    """A push's or gc's lock object: written, then checked against the others.

    Both sides write before they look, so of a push and a gc starting together at
    least one sees the other and backs off (`RemoteBusyError`). A lease not renewed
    within `$COMPSTORE_REMOTE_LEASE_S` seconds (default `LEASE_S`) is stale: its
    holder crashed, and it is ignored.
    """

    def __init__(self, remote: Remote, kind: str):
        self.remote, self.kind = remote, kind
        self.rel = f"locks/{kind}-{uuid.uuid4().hex}.json"
        self.taken = 0.0
        self.seconds = env_setting("COMPSTORE_REMOTE_LEASE_S", LEASE_S, float, expected="seconds")

    def renew(self) -> None:
        self.taken = time.time()
        self.remote.put_json(self.rel, {"kind": self.kind, "host": socket.gethostname(),
                                        "pid": os.getpid(), "expires": self.taken + self.seconds})

    def expired(self) -> bool:
        return time.time() > self.taken + self.seconds

    def __enter__(self) -> "Lease":
        self.renew()
        rival = "gc" if self.kind == "push" else "push"
        for name, _, _ in self.remote.listdir("locks"):
            if not name.startswith(f"{rival}-") or not name.endswith(".json"):
                continue
            try:
                doc = self.remote.get_json(f"locks/{name}")
            except FileNotFoundError:
                continue
            if doc.get("expires", 0) > time.time():
                self.remote.delete(self.rel)
                raise RemoteBusyError(
                    f"remote {self.remote.url}: a {rival} is running (lease {name} from "
                    f"{doc.get('host')}, pid {doc.get('pid')}); retry when it is done")
        return self

    def __exit__(self, *exc) -> None:
        self.remote.delete(self.rel)


@dataclass
class RemoteGcReport:
    dry_run: bool
    freed_bytes: int  # bytes of the deleted (or, dry run, deletable) objects
    packs_removed: int
    snapshots_removed: int
    locks_removed: int  # stale leases
    kept_young_bytes: int  # unreferenced, but younger than the grace period
    kept_in_live_packs_bytes: int  # unreferenced blobs inside packs that also hold live ones
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _ref_path(name: str) -> str:
    return f"refs/{urllib.parse.quote(name, safe='')}.json"


def _mtime(entry: dict) -> float:
    for key in ("mtime", "LastModified", "updated", "last_modified"):
        value = entry.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return time.time()  # unknown age: young, so only a gc with grace 0 deletes it
