"""Tensor manifests: what a publisher commits so that pulls fetch only missing tensors.

`compstore manifest REF` writes `compstore.manifest.json`:

    {"format": "compstore-manifest/1",
     "files": {"unet/diffusion_pytorch_model.safetensors": {
         "size": 5742160, "sha256": "...",
         "pieces": [[0, 12345, "<xxh3 of the header>"],          # [begin, end, xxh3]
                    [12345, 12473, "<xxh3 of the first tensor>"], ...]}}}

Pieces cover the file exactly, in order: the header, then each tensor's bytes. A
pull that finds a manifest in the repo rebuilds each safetensors file from the
pieces the store already holds and fetches the others with HTTP range requests;
the assembled file must match the Hub's sha256 or it is thrown away and
downloaded whole. A manifest is a hint, never trusted: a wrong one costs a
download, never a wrong byte.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Store

FORMAT = "compstore-manifest/1"
FILENAME = "compstore.manifest.json"


def build_manifest(store: "Store", ref: str) -> dict:
    """The manifest of every safetensors file of `ref`."""
    snap = store.resolve(ref)
    files = {}
    for path, file_id, sha256, size in store.snapshot_files(snap):
        if not path.endswith(".safetensors"):
            continue
        rows = store.db.execute(
            """SELECT b.xxh3, b.size FROM files f JOIN blobs b ON b.id = f.header_blob WHERE f.id = ?
               UNION ALL
               SELECT * FROM (SELECT b.xxh3, b.size FROM file_tensors ft
                              JOIN tensors t ON t.id = ft.tensor_id JOIN blobs b ON b.id = t.blob_id
                              WHERE ft.file_id = ? ORDER BY ft.pos)""", [file_id, file_id]).fetchall()
        pieces, cursor = [], 0
        for xxh3, n in rows:
            pieces.append([cursor, cursor + n, xxh3])
            cursor += n
        files[path] = {"size": size, "sha256": sha256, "pieces": pieces}
    return {"format": FORMAT, "files": files}


def parse_manifest(raw: bytes) -> dict[str, dict] | None:
    """The files of a manifest, or None if it is not a well-formed one (then unused)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        return None
    out = {}
    for path, entry in doc["files"].items():
        try:
            size, sha, pieces = entry["size"], entry["sha256"], entry["pieces"]
            cursor = 0
            for begin, end, xxh3 in pieces:
                if begin != cursor or end < begin or not isinstance(xxh3, str):
                    raise ValueError
                cursor = end
            if cursor != size or not isinstance(sha, str):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            return None
        out[path] = entry
    return out
