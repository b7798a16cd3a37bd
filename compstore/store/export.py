"""Rebuild a ref's original files, byte-for-byte, from the store.

A safetensors file is its stored header bytes followed by its tensor blobs in
offset order; any other file is one blob. Each file is written beside its final
name, checked against the sha256 recorded at ingest, and only then renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import CorruptStoreError, ExportError
from .modular import INDEX, pins_of
from .progress import progress_bar

if TYPE_CHECKING:
    from .store import Store


@dataclass
class ExportResult:
    ref: str
    dest: str
    files: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def file_layout(store: "Store", file_id: int) -> list[tuple[int, str, int, int]]:
    """(blob id, pack, offset, size) of one file's stored pieces, in file order
    (header + tensors, or the raw blob): the file is their bytes end to end."""
    db = store.db
    kind, header_blob, raw_blob = db.execute(
        "SELECT kind, header_blob, raw_blob FROM files WHERE id = ?", [file_id]).fetchone()
    if kind == "raw":
        ids = [raw_blob]
    else:
        ids = [header_blob] + [r[0] for r in db.execute(
            """SELECT t.blob_id FROM file_tensors ft JOIN tensors t ON t.id = ft.tensor_id
               WHERE ft.file_id = ? ORDER BY ft.pos""", [file_id])]
    locs = {r[0]: (r[1], r[2], r[3]) for r in db.execute(
        f"SELECT id, pack, offset, size FROM blobs WHERE id IN ({','.join('?' * len(ids))})", ids)}
    return [(bid, *locs[bid]) for bid in ids]


def piece_view(store: "Store", piece: tuple[int, str, int, int]) -> memoryview:
    """The bytes of one piece of `file_layout`; `CorruptStoreError` if they cannot be read."""
    bid, pack, offset, size = piece
    try:
        return store.packs.view(pack, offset, size)
    except (OSError, CorruptStoreError) as e:
        raise CorruptStoreError(f"blob {bid} cannot be read: {e}") from None


def file_pieces(store: "Store", file_id: int) -> Iterator[memoryview]:
    """The stored pieces of one file, in order (header + tensors, or the raw blob)."""
    for piece in file_layout(store, file_id):
        yield piece_view(store, piece)


def snapshot_files(store: "Store", snapshot_id: str) -> list[tuple[str, int, str, int]]:
    """(path, file id, sha256, size) of every file of a snapshot."""
    return [tuple(r) for r in store.db.execute(
        """SELECT sf.path, f.id, f.sha256, f.size FROM snapshot_files sf
           JOIN files f ON f.id = sf.file_id WHERE sf.snapshot_id = ? ORDER BY sf.path""",
        [snapshot_id])]


def write_file(store: "Store", file_id: int, sha256: str, target: Path) -> int:
    """Write one stored file to `target` atomically, verified against its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".compstore-partial")
    h = hashlib.sha256()
    written = 0
    with open(partial, "wb") as out:
        for piece in file_pieces(store, file_id):
            h.update(piece)
            out.write(piece)
            written += len(piece)
    if h.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise CorruptStoreError(
            f"{target.name}: rebuilt bytes do not match the recorded sha256; run `compstore verify`")
    os.replace(partial, target)
    return written


def flattened_files(store: "Store", snapshot_id: str) -> list[tuple[str, int, str, int]]:
    """The files of a self-contained copy: for a modular snapshot its own files but its
    index (which `flattened_index` rewrites) and, under each pinned slot, the files of
    the pinned source's subfolder. The same as `snapshot_files` for other snapshots."""
    files = snapshot_files(store, snapshot_id)
    if not any(f[0] == INDEX for f in files):
        return files
    out = [f for f in files if f[0] != INDEX]
    for pin in pins_of(store, snapshot_id):
        prefix = f"{pin['subfolder']}/" if pin["subfolder"] else ""
        out += [(f"{pin['slot']}/{path[len(prefix):]}", *rest)
                for path, *rest in snapshot_files(store, pin["target_snapshot"])
                if path.startswith(prefix)]
    return sorted(out)


def flattened_index(store: "Store", snapshot_id: str, root: Path) -> bytes | None:
    """The modular index rewritten so that every component is loaded from `root`."""
    raw = store.read_file(snapshot_id, INDEX)
    if raw is None:
        return None
    index = json.loads(raw)
    pinned = {p["slot"]: p for p in pins_of(store, snapshot_id)}
    local = {c["slot"] for c in store.components_of(snapshot_id)}
    for slot, entry in index.items():
        if slot in local or slot in pinned:
            spec = entry[2]
            spec.update(pretrained_model_name_or_path=str(root.resolve()), subfolder=slot,
                        revision=None)
            if slot in pinned:
                spec["variant"] = pinned[slot]["variant"] or None
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def export(store: "Store", ref: str, dest: str | os.PathLike, *, flatten: bool = False,
           progress: bool = False) -> ExportResult:
    """Write the files of `ref` into `dest` (which must not exist, or be empty).

    With `flatten=True` a modular pipeline becomes self-contained: each pinned
    component's files are written under its slot and the index points at `dest`.

    >>> Store().export("tiny-sd", "/tmp/tiny-sd")  # doctest: +SKIP
    ExportResult(ref='tiny-sd', dest='/tmp/tiny-sd', files=17, bytes=5242880)
    """
    snap = store.resolve(ref)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest}: export target exists and is not an empty folder; "
                          "choose a new path")
    if store._holds_path(dest):
        raise ExportError(f"{dest}: export target is inside the store folder {store.home}; "
                          "choose a path outside it")
    files = flattened_files(store, snap) if flatten else snapshot_files(store, snap)
    index = flattened_index(store, snap, dest) if flatten else None
    total = 0
    with progress_bar(sum(f[3] for f in files), f"export {ref}", progress) as bar:
        for path, file_id, sha256, size in files:
            total += write_file(store, file_id, sha256, dest / path)
            bar.update(size)
    if index is not None:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / INDEX).write_bytes(index)
        return ExportResult(ref, str(dest), len(files) + 1, total + len(index))
    return ExportResult(ref, str(dest), len(files), total)
