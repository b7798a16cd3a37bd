"""The Xet side of the emulated Hub: chunking, hashing, xorbs and reconstructions,
written from the public protocol (huggingface/hub-docs, docs/xet/) and checked
against the real hf_xet client in tests/test_xet.py.

- chunking.md: gearhash content-defined chunking (compstore/store/xet_chunking.py,
  shared with compstore's indexing of files it holds);
- hashing.md: chunk hashes (blake3 keyed with DATA_KEY), xorb and file hashes (an
  aggregated Merkle tree with INTERNAL_NODE_KEY; the file hash then keyed with 32 zeros);
- api.md: hashes as strings (each 8-byte word little-endian);
- xorb.md: chunk headers and compression schemes None, LZ4 (frame), ByteGrouping4LZ4.
  Xorbs here hold the chunk sequence only: their footer (XorbObjectInfo) is read by
  no download, so it is left out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import lz4.frame
from blake3 import blake3

from compstore.store.xet_chunking import MAX_CHUNK, chunk_boundaries  # noqa: F401 (re-exported)

DATA_KEY = bytes([102, 151, 245, 119, 91, 149, 80, 222, 49, 53, 203, 172, 165, 151, 24, 28, 157,
                  228, 33, 16, 155, 235, 43, 88, 180, 208, 176, 75, 147, 173, 242, 41])
INTERNAL_NODE_KEY = bytes([1, 126, 197, 199, 165, 71, 41, 150, 253, 148, 102, 102, 180, 138, 2, 230,
                           93, 221, 83, 111, 55, 199, 109, 210, 248, 99, 82, 230, 74, 83, 113, 63])
MAX_XORB_BYTES, MAX_XORB_CHUNKS = 64 << 20, 8192


def chunk_hash(chunk: bytes) -> bytes:
    return blake3(chunk, key=DATA_KEY).digest()


def hash_hex(h: bytes) -> str:
    """api.md: each 8-byte word as a little-endian u64, in hex."""
    return "".join(f"{x:016x}" for x in struct.unpack("<4Q", h))


def _merged(nodes: list[tuple[bytes, int]]) -> tuple[bytes, int]:
    text = "".join(f"{hash_hex(h)} : {size}\n" for h, size in nodes)
    return blake3(text.encode(), key=INTERNAL_NODE_KEY).digest(), sum(s for _, s in nodes)


def _next_cut(nodes: list[tuple[bytes, int]]) -> int:
    if len(nodes) <= 2:
        return len(nodes)
    end = min(9, len(nodes))
    for i in range(2, end):
        if struct.unpack("<4Q", nodes[i][0])[3] % 4 == 0:
            return i + 1
    return end


def merkle_root(nodes: list[tuple[bytes, int]]) -> bytes:
    """xet-core's aggregated node hash: collapse runs (mean branching 4) until one is left."""
    if not nodes:
        return bytes(32)
    while len(nodes) > 1:
        merged, i = [], 0
        while i < len(nodes):
            cut = i + _next_cut(nodes[i:])
            merged.append(_merged(nodes[i:cut]))
            i = cut
        nodes = merged
    return nodes[0][0]


def file_hash(chunks: list[tuple[bytes, int]]) -> bytes:
    if not chunks:
        return bytes(32)
    return blake3(merkle_root(chunks), key=bytes(32)).digest()


# -- chunk serialization ------------------------------------------------------------------
def bg4_split(data: bytes) -> bytes:
    return b"".join(data[i::4] for i in range(4))


def encode_chunk(data: bytes, scheme: int) -> bytes:
    body = {0: lambda d: d, 1: lz4.frame.compress, 2: lambda d: lz4.frame.compress(bg4_split(d))}[scheme](data)
    n, m = len(body), len(data)
    return bytes([0, n & 0xFF, (n >> 8) & 0xFF, n >> 16, scheme, m & 0xFF, (m >> 8) & 0xFF, m >> 16]) + body


# -- the CAS's contents ----------------------------------------------------------------------
@dataclass
class Xorb:
    hash: str
    data: bytes  # the serialized chunk sequence
    offsets: list[int]  # byte offset of each chunk's header in `data`, plus the end
    lengths: list[int]  # uncompressed length of each chunk


@dataclass
class XetFile:
    hash: str
    size: int
    terms: list[tuple[str, int, int, int]] = field(default_factory=list)  # xorb, start, end, bytes


class ContentStore:
    """Chunks deduplicated across every file added, packed into xorbs in arrival order.

    `schemes` picks each new chunk's compression: "best" (smallest of the three, as
    xet-core's choice aims for) or "cycle" (0, 1, 2, 0, ... so that tests cover all).
    """

    def __init__(self, schemes: str = "best"):
        self.schemes = schemes
        self.xorbs: dict[str, Xorb] = {}
        self.files: dict[str, XetFile] = {}
        self._where: dict[bytes, tuple[str, int]] = {}  # chunk hash -> (xorb, index)
        self._counter = 0

    def _scheme(self, chunk: bytes) -> int:
        self._counter += 1
        if self.schemes == "cycle":
            return self._counter % 3
        sizes = {s: len(encode_chunk(chunk, s)) for s in (0, 1, 2)}
        return min(sizes, key=lambda s: (sizes[s], s))

    def add_file(self, data: bytes) -> str:
        """Chunk, dedup and store `data`; return its Xet file hash."""
        ends, start, chunks = chunk_boundaries(data), 0, []
        for end in ends:
            chunks.append((data[start:end], chunk_hash(data[start:end])))
            start = end
        fh = hash_hex(file_hash([(h, len(c)) for c, h in chunks]))
        if fh in self.files:
            return fh
        pending: list[tuple[bytes, bytes]] = []  # new chunks not yet in a xorb
        pending_hashes, pending_bytes = set(), 0
        placed: list[tuple[bytes, int]] = []  # (chunk hash, length) in file order
        for c, h in chunks:
            if h not in self._where and h not in pending_hashes:
                pending.append((c, h))
                pending_hashes.add(h)
                pending_bytes += len(c)
                if len(pending) >= MAX_XORB_CHUNKS or pending_bytes >= MAX_XORB_BYTES - MAX_CHUNK:
                    self._seal(pending)
                    pending, pending_hashes, pending_bytes = [], set(), 0
            placed.append((h, len(c)))
        if pending:
            self._seal(pending)
        f = XetFile(fh, len(data))
        for h, n in placed:
            xorb, idx = self._where[h]
            last = f.terms[-1] if f.terms else None
            if last and last[0] == xorb and last[2] == idx:
                f.terms[-1] = (xorb, last[1], idx + 1, last[3] + n)
            else:
                f.terms.append((xorb, idx, idx + 1, n))
        self.files[fh] = f
        return fh

    def _seal(self, chunks: list[tuple[bytes, bytes]]) -> None:
        xh = hash_hex(merkle_root([(h, len(c)) for c, h in chunks]))
        parts, offsets, pos = [], [], 0
        for c, _ in chunks:
            enc = encode_chunk(c, self._scheme(c))
            offsets.append(pos)
            parts.append(enc)
            pos += len(enc)
        offsets.append(pos)
        self.xorbs[xh] = Xorb(xh, b"".join(parts), offsets, [len(c) for c, _ in chunks])
        for i, (_, h) in enumerate(chunks):
            self._where[h] = (xh, i)

    def reconstruction(self, file_hash_hex: str, first: int = 0, last: int | None = None,
                       url: str = "", v2: bool = False) -> dict:
        """The reconstruction of bytes [first, last] (inclusive) of a file."""
        f = self.files[file_hash_hex]
        last = f.size - 1 if last is None else min(last, f.size - 1)
        terms, fetch, pos, offset_into_first = [], {}, 0, 0
        for xorb_hash, s, e, n in f.terms:
            x = self.xorbs[xorb_hash]
            if pos + n <= first or pos > last:
                pos += n
                continue
            cs, ce, cpos = s, e, pos  # narrow to the chunks that overlap [first, last]
            while cpos + x.lengths[cs] <= first:
                cpos += x.lengths[cs]
                cs += 1
            if not terms:
                offset_into_first = first - cpos
            end_pos = cpos
            ce = cs
            while ce < e and end_pos <= last:
                end_pos += x.lengths[ce]
                ce += 1
            terms.append({"hash": xorb_hash, "unpacked_length": end_pos - cpos,
                          "range": {"start": cs, "end": ce}})
            fetch.setdefault(xorb_hash, []).append((cs, ce))
            pos += n
        # As the Hub's CAS does, one fetch_info entry serves every term whose chunk
        # ranges touch or overlap: the client downloads those bytes once.
        for xorb_hash, ranges in fetch.items():
            merged: list[list[int]] = []
            for cs, ce in sorted(ranges):
                if merged and cs <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], ce)
                else:
                    merged.append([cs, ce])
            x = self.xorbs[xorb_hash]
            fetch[xorb_hash] = [{"range": {"start": cs, "end": ce},
                                 "url": f"{url}/xorbs/default/{xorb_hash}",
                                 "url_range": {"start": x.offsets[cs], "end": x.offsets[ce] - 1}}
                                for cs, ce in merged]
        if v2:
            xorbs = {h: [{"url": items[0]["url"], "ranges": [
                {"chunks": i["range"], "bytes": i["url_range"]} for i in items]}]
                for h, items in fetch.items()}
            return {"offset_into_first_range": offset_into_first, "terms": terms, "xorbs": xorbs}
        return {"offset_into_first_range": offset_into_first, "terms": terms, "fetch_info": fetch}
