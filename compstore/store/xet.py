"""compstore's own Xet download: fetch only the chunks the store lacks, from any repo.

The public protocol (huggingface/hub-docs, docs/xet/): a read token from the Hub
(`/api/models/{repo}/xet-read-token/{revision}`: casUrl, accessToken), then the CAS
reconstruction of a file (`GET {casUrl}/v1/reconstructions/{xet hash}`): ordered
terms, each a xorb hash and a chunk index range, and `fetch_info` with URLs and
byte ranges of the serialized xorbs; chunks are decoded per xorb.md (an 8-byte
header, then the data stored as-is, LZ4 frame, or 4-byte-grouped then LZ4).

The chunk index (catalog table `xet_chunks`) records, for every file pulled this
way, which bytes of the stored file each (xorb, chunk index) produced. On the next
pull the reconstruction's terms say which chunks the store already has: those
bytes are read from the store, and only the file byte ranges made of chunks the
store lacks are asked for (reconstruction with `Range`), then downloaded. The
assembled file must match the Hub's sha256 before it is ingested; if a reused
chunk was wrong (a stale index row), the file is fetched again without reuse.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .catalog import damaged_blob_ids, damaged_files
from .errors import CompstoreError, CorruptStoreError
from .export import file_layout, file_pieces, piece_view
from .settings import env_setting
from .xet_chunking import stream_boundaries

if TYPE_CHECKING:
    from .store import Store


class XetError(CompstoreError):
    """The Xet transfer failed or produced wrong bytes; nothing was stored."""


class XetUnavailable(XetError):
    """The Hub offers no Xet for this file (no token or no CAS): use plain HTTP."""


NONE, LZ4, BG4_LZ4 = 0, 1, 2
PARALLEL = 4  # xorb ranges in flight: the default of $COMPSTORE_XET_PARALLEL


def decode_chunks(data: bytes | memoryview, count: int) -> list[bytes]:
    """The first `count` chunks of serialized xorb bytes, decompressed (xorb.md)."""
    import lz4.frame

    out, pos, view = [], 0, memoryview(data)
    for _ in range(count):
        if pos + 8 > len(view):
            raise XetError(f"xorb data ends inside a chunk header (at byte {pos})")
        h = bytes(view[pos:pos + 8])
        version, stored, scheme, size = h[0], int.from_bytes(h[1:4], "little"), h[4], \
            int.from_bytes(h[5:8], "little")
        if version != 0:
            raise XetError(f"unknown xorb chunk version {version}")
        body = view[pos + 8:pos + 8 + stored]
        if len(body) != stored:
            raise XetError("xorb data ends inside a chunk")
        if scheme == NONE:
            chunk = bytes(body)
        elif scheme == LZ4:
            chunk = lz4.frame.decompress(body)
        elif scheme == BG4_LZ4:
            chunk = bg4_regroup(lz4.frame.decompress(body))
        else:
            raise XetError(f"unknown chunk compression scheme {scheme}")
        if len(chunk) != size:
            raise XetError(f"chunk decompressed to {len(chunk)} bytes, header says {size}")
        out.append(chunk)
        pos += 8 + stored
    return out


def bg4_regroup(grouped: bytes) -> bytes:
    """Undo byte grouping: group g holds bytes g, g+4, g+8, ... of the chunk."""
    n = len(grouped)
    out = bytearray(n)
    start = 0
    for g in range(4):
        size = n // 4 + (1 if g < n % 4 else 0)
        out[g::4] = grouped[start:start + size]
        start += size
    return bytes(out)


class XetSource:
    """The Xet service of one repo revision: token, reconstructions, xorb ranges."""

    def __init__(self, endpoint: str, repo_id: str, revision: str, headers: dict[str, str]):
        self.endpoint, self.repo_id, self.revision, self.headers = endpoint, repo_id, revision, headers
        self._cas: tuple[str, str] | None = None
        self.fetched_bytes = 0  # xorb bytes received
        self._lock = threading.Lock()

    def _get(self, url: str, headers: dict[str, str]):
        from huggingface_hub.utils import get_session

        return get_session().get(url, headers=headers, follow_redirects=True)

    def cas(self) -> tuple[str, str]:
        """(CAS URL, access token), asked of the Hub once."""
        if self._cas is None:
            url = f"{self.endpoint.rstrip('/')}/api/models/{self.repo_id}/xet-read-token/{self.revision}"
            r = self._get(url, self.headers)
            if r.status_code != 200:
                raise XetUnavailable(f"{self.repo_id}: no Xet read token (HTTP {r.status_code})")
            doc = r.json() if r.content else {}
            cas_url = doc.get("casUrl") or r.headers.get("X-Xet-Cas-Url")
            token = doc.get("accessToken") or r.headers.get("X-Xet-Access-Token")
            if not cas_url or not token:
                raise XetUnavailable(f"{self.repo_id}: the Xet token response names no CAS")
            self._cas = (cas_url.rstrip("/"), token)
        return self._cas

    def reconstruction(self, xet_hash: str, first: int | None = None, last: int | None = None) -> dict:
        """The reconstruction of a file, or of its bytes [first, last] (inclusive)."""
        cas_url, token = self.cas()
        headers = {"Authorization": f"Bearer {token}"}
        if first is not None:
            headers["Range"] = f"bytes={first}-{last}"
        r = self._get(f"{cas_url}/v1/reconstructions/{xet_hash}", headers)
        if r.status_code != 200:  # this file only: the others may still come through Xet
            raise XetError(f"{self.repo_id}: the CAS has no reconstruction of {xet_hash[:12]} "
                           f"(HTTP {r.status_code})")
        return r.json()

    def xorb_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes [start, end] (inclusive) of a serialized xorb."""
        r = self._get(url, {"Range": f"bytes={start}-{end}"})
        if r.status_code not in (200, 206) or len(r.content) != end - start + 1:
            raise XetError(f"{self.repo_id}: a xorb range came back as HTTP {r.status_code}, "
                           f"{len(r.content)} of {end - start + 1} bytes")
        with self._lock:
            self.fetched_bytes += len(r.content)
        return r.content


@dataclass
class XetFileResult:
    fetched_bytes: int  # xorb bytes downloaded for this file
    reused_bytes: int  # file bytes read from chunks the store already held
    chunks: list[tuple[str, int, int, int]] = field(default_factory=list)  # xorb, index, offset, length


def _starts(sizes: list[int]) -> list[int]:
    starts, pos = [], 0
    for n in sizes:
        starts.append(pos)
        pos += n
    return starts


class _StoredFiles:
    """Byte ranges of stored files, for chunks the store already has. Only the pieces
    a range covers are read: a chunk of a file whose other pieces are damaged is
    still good."""

    def __init__(self, store: "Store"):
        self.store = store
        self._files: dict[int, tuple[list[int], list[tuple]]] = {}

    def read(self, file_id: int, offset: int, length: int) -> bytes:
        if file_id not in self._files:
            layout = file_layout(self.store, file_id)
            self._files[file_id] = (_starts([p[3] for p in layout]), layout)
        starts, layout = self._files[file_id]
        out, i = bytearray(), bisect.bisect_right(starts, offset) - 1
        while len(out) < length and i < len(layout):
            a = offset + len(out) - starts[i]
            out += piece_view(self.store, layout[i])[a:a + length - len(out)]
            i += 1
        return bytes(out)


def _damaged_ranges(store: "Store") -> dict[int, list[tuple[int, int]]]:
    """file id -> the byte ranges [start, end) of the file held in blobs the last
    `verify` found damaged (`damaged_blobs`)."""
    damaged = damaged_blob_ids(store.db)
    out = {}
    for fid, _ in damaged_files(store.db):
        layout = file_layout(store, fid)
        out[fid] = [(a, a + p[3]) for a, p in zip(_starts([p[3] for p in layout]), layout) if p[0] in damaged]
    return out


def _chunk_index(store: "Store", xorb: str, cache: dict,
                 damaged: dict[int, list[tuple[int, int]]]) -> dict[int, tuple[int, int, int, bool]]:
    """chunk index -> (file id, offset, length, intact) of the stored chunks of one
    xorb, an intact copy where there is one. A chunk holding bytes of damaged blobs
    is fetched again, but its recorded length still places the chunks after it, so
    that only such chunks are fetched, not their whole file (until 2026-12-07 a pull
    that healed one damaged tensor downloaded every chunk of its file)."""
    if xorb not in cache:
        index: dict[int, tuple[int, int, int, bool]] = {}
        for i, f, o, n in store.db.execute(
                """SELECT x.chunk_index, x.file_id, x.offset, x.length FROM xet_chunks x
                   JOIN files f ON f.id = x.file_id WHERE x.xorb = ?""", [xorb]):
            intact = not any(a < o + n and o < b for a, b in damaged.get(f, ()))
            if i not in index or (intact and not index[i][3]):
                index[i] = (f, o, n, intact)
        cache[xorb] = index
    return cache[xorb]


MERGE_GAP = 1 << 20  # stored bytes between two damaged chunks that a heal fetches too: one request


def _add(segments: list[tuple], seg: tuple, gap: int = 0) -> None:
    """Append a segment of `_plan`; a fetch joins the fetch before it when they touch,
    or when at most `gap` stored bytes lie between them (`MERGE_GAP` for a damaged
    chunk: each fetch is a reconstruction request and its xorb downloads, and a heal
    of many small damaged runs would cost more requests than bytes)."""
    if seg[0] == "fetch":
        k, between = len(segments) - 1, 0
        while k >= 0 and segments[k][0] == "store" and between <= gap:
            between += segments[k][2] - segments[k][1]
            k -= 1
        if k >= 0 and segments[k][0] == "fetch" and between <= gap:
            segments[k:] = [("fetch", segments[k][1], seg[2])]
            return
    segments.append(seg)


def _plan(store: "Store", recon: dict, reuse: bool) -> list[tuple]:
    """The file as segments: ("store", start, end, (xorb, idx, file, offset)) for chunks
    the store holds intact, ("fetch", start, end) for byte ranges it must download.
    Within a Xet term, chunks are placed by their recorded lengths from either end;
    from the first chunk the store has no record of to the last, the term is fetched
    (the lengths in between are unknown)."""
    cache: dict = {}
    damaged = _damaged_ranges(store) if reuse else {}
    segments: list[tuple] = []
    pos = 0
    for term in recon["terms"]:
        xorb, s, e = term["hash"], term["range"]["start"], term["range"]["end"]
        n = term["unpacked_length"]
        index = _chunk_index(store, xorb, cache, damaged) if reuse else {}
        known = [index.get(i) for i in range(s, e)]
        head, i, fwd = [], 0, pos
        while i < len(known) and known[i] is not None:
            head.append(_placed(xorb, s + i, fwd, known[i]))
            fwd += known[i][2]
            i += 1
        tail, j, bwd = [], len(known) - 1, pos + n
        while j >= i and known[j] is not None:
            bwd -= known[j][2]
            tail.insert(0, _placed(xorb, s + j, bwd, known[j]))
            j -= 1
        if fwd > bwd or (i == len(known) and fwd != pos + n):  # lengths disagree: trust nothing
            head, tail, fwd, bwd = [], [], pos, pos + n
        for seg, gap in head + ([(("fetch", fwd, bwd), 0)] if fwd < bwd else []) + tail:
            _add(segments, seg, gap)
        pos += n
    return segments


def _placed(xorb: str, idx: int, at: int, entry: tuple[int, int, int, bool]) -> tuple[tuple, int]:
    """A chunk the store has a record of, at file offset `at`: a "store" segment if
    intact, else a "fetch" of its bytes; with the gap `_add` may merge it across."""
    file_id, offset, n, intact = entry
    if intact:
        return ("store", at, at + n, (xorb, idx, file_id, offset)), 0
    return ("fetch", at, at + n), MERGE_GAP


def _write_reconstruction(source: XetSource, recon: dict, start: int, length: int, out,
                          chunks: list, h) -> int:
    """Download and write `length` file bytes described by `recon` (starting at file
    offset `start`); record each whole chunk written. Returns bytes written.

    Xorb ranges are downloaded and decoded `$COMPSTORE_XET_PARALLEL` (default
    `PARALLEL`) at a time, ahead of the writer,
    and written in term order; a range several terms share is fetched once."""
    plan = []  # per term: (term, fetch key)
    for term in recon["terms"]:
        xorb, s, e = term["hash"], term["range"]["start"], term["range"]["end"]
        info = next((f for f in recon["fetch_info"].get(xorb, [])
                     if f["range"]["start"] <= s and f["range"]["end"] >= e), None)
        if info is None:
            raise XetError(f"{source.repo_id}: the reconstruction has no fetch_info for xorb "
                           f"{xorb[:12]} chunks [{s}, {e})")
        plan.append((term, (info["url"], info["url_range"]["start"], info["url_range"]["end"],
                            info["range"]["start"], info["range"]["end"])))
    keys = list(dict.fromkeys(key for _, key in plan))
    last_use = {key: i for i, (_, key) in enumerate(plan)}

    def download(key) -> list[bytes]:
        url, a, b, first, end = key
        return decode_chunks(source.xorb_range(url, a, b), end - first)

    skip = recon.get("offset_into_first_range", 0)
    written, pos = 0, start - skip
    parallel = env_setting("COMPSTORE_XET_PARALLEL", PARALLEL, minimum=1)
    with ThreadPoolExecutor(parallel, thread_name_prefix="compstore-xet") as pool:
        pending = {key: pool.submit(download, key) for key in keys[:parallel]}
        submitted = len(pending)
        for i, (term, key) in enumerate(plan):
            xorb, s, e = term["hash"], term["range"]["start"], term["range"]["end"]
            decoded = pending[key].result()[s - key[3]: e - key[3]]
            if last_use[key] == i:
                del pending[key]  # free it, and keep `parallel` ranges in flight
                if submitted < len(keys):
                    pending[keys[submitted]] = pool.submit(download, keys[submitted])
                    submitted += 1
            if sum(len(c) for c in decoded) != term["unpacked_length"]:
                raise XetError(f"{source.repo_id}: xorb {xorb[:12]} chunks [{s}, {e}) decoded to "
                               "the wrong length")
            for idx, chunk in zip(range(s, e), decoded):
                a = max(0, start - pos)  # bytes of this chunk before the wanted range
                b = min(len(chunk), start + length - pos)
                if b > a:
                    piece = chunk[a:b]
                    out.write(piece)
                    h.update(piece)
                    written += len(piece)
                    if a == 0 and b == len(chunk):
                        chunks.append((xorb, idx, pos, len(chunk)))
                pos += len(chunk)
    return written


def pull_file(store: "Store", source: XetSource, xet_hash: str, size: int, sha256: str,
              target: Path, on_bytes: Callable[[int], None] = lambda n: None) -> XetFileResult:
    """Assemble one Xet file at `target` from the store's chunks and the CAS."""
    for reuse in (True, False):
        fetched_before = source.fetched_bytes
        recon = source.reconstruction(xet_hash)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".compstore-partial")
        h, chunks, reused = hashlib.sha256(), [], 0
        files = _StoredFiles(store)
        try:
            with open(partial, "wb") as out, store.reading():  # the chunks planned stay until read
                for seg in _plan(store, recon, reuse):
                    if seg[0] == "store":
                        _, a, b, (xorb, idx, fid, offset) = seg
                        data = files.read(fid, offset, b - a)
                        out.write(data)
                        h.update(data)
                        reused += len(data)
                        chunks.append((xorb, idx, a, b - a))
                    else:
                        _, a, b = seg
                        sub = recon if (a, b) == (0, size) else source.reconstruction(xet_hash, a, b - 1)
                        if _write_reconstruction(source, sub, a, b - a, out, chunks, h) != b - a:
                            raise XetError(f"{source.repo_id}: the CAS returned too few bytes for "
                                           f"[{a}, {b}) of {xet_hash[:12]}")
                    on_bytes(seg[2] - seg[1])
        except CorruptStoreError:  # a stored chunk's pack is missing or short: fetch it all
            partial.unlink(missing_ok=True)
            continue
        if h.hexdigest() == sha256.lower() and os.path.getsize(partial) == size:
            os.replace(partial, target)
            return XetFileResult(source.fetched_bytes - fetched_before, reused, chunks)
        partial.unlink(missing_ok=True)
        if not reused:
            break
    raise XetError(f"{source.repo_id}: the file assembled from Xet chunks does not match the "
                   f"Hub's sha256 ({sha256[:12]}); nothing was stored (retry the pull)")


def record_chunks(store: "Store", snapshot_id: str, chunks_by_path: dict[str, list]) -> None:
    """Index the chunks of files just pulled through Xet under their stored file ids."""
    rows = []
    for path, chunks in chunks_by_path.items():
        row = store.db.execute("SELECT file_id FROM snapshot_files WHERE snapshot_id = ? AND path = ?",
                               [snapshot_id, path]).fetchone()
        if row:
            rows += [{"xorb": x, "chunk_index": i, "file_id": row[0], "offset": o, "length": n}
                     for x, i, o, n in chunks]
    _insert_chunks(store, rows)


def _insert_chunks(store: "Store", rows: list[dict]) -> None:
    if rows:
        with store.writing(), store.db.atomic():  # every catalog writer holds it
            store.db["xet_chunks"].insert_all(rows, ignore=True, batch_size=1000)


def index_file(store: "Store", source: XetSource, file_id: int, xet_hash: str, size: int) -> int:
    """Index the Xet chunks of a file the store holds but did not pull through Xet
    (plain HTTP, `adopt`, a local folder with a known Xet hash): the reconstruction's
    terms (metadata only) laid over chunk boundaries computed here. Returns the rows
    added; 0 when the two disagree (then nothing is recorded)."""
    recon = source.reconstruction(xet_hash)
    with store.reading():
        ends = stream_boundaries(file_pieces(store, file_id), size)
    lengths = [b - a for a, b in zip([0] + ends, ends)]
    rows, k, pos = [], 0, 0
    for term in recon["terms"]:
        xorb, s, e = term["hash"], term["range"]["start"], term["range"]["end"]
        if k + (e - s) > len(lengths) or sum(lengths[k:k + e - s]) != term["unpacked_length"]:
            return 0
        for idx in range(s, e):
            rows.append({"xorb": xorb, "chunk_index": idx, "file_id": file_id, "offset": pos,
                         "length": lengths[k]})
            pos += lengths[k]
            k += 1
    if k != len(lengths):
        return 0
    _insert_chunks(store, rows)
    return len(rows)


def index_snapshot(store: "Store", snapshot_id: str, repo_id: str, revision: str,
                   token: str | bool | None = None) -> dict:
    """Index every file of a snapshot that has a Xet hash and no chunk index yet."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers

    source = XetSource(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT, repo_id, revision,
                       build_hf_headers(token=token))
    todo = store.db.execute(
        """SELECT DISTINCT f.id, f.xet_hash, f.size FROM snapshot_files sf JOIN files f ON f.id = sf.file_id
           WHERE sf.snapshot_id = ? AND f.xet_hash IS NOT NULL AND f.size > 0
           AND NOT EXISTS (SELECT 1 FROM xet_chunks x WHERE x.file_id = f.id)""",
        [snapshot_id]).fetchall()
    indexed = chunks = 0
    for file_id, xet_hash, size in todo:
        n = index_file(store, source, file_id, xet_hash, size)
        indexed += n > 0
        chunks += n
    return {"files": len(todo), "files_indexed": indexed, "chunks": chunks}
