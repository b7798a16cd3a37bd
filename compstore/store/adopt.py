"""Adopt an existing Hugging Face cache: ingest its diffusers snapshots, optionally reclaim.

Every revision of every model repo in the cache (old layout and huggingface_hub
2.4's shared blob store alike: a snapshot's files are links that `scan_folder`
follows into the cache's own blobs) that holds a diffusers pipeline or component
is ingested as `repo@commit`, and `repo` points at the newest whole one: a
pipeline with every folder its index names, or a component. A revision holding
part of a pipeline (`vae/` or `text_encoder/` alone, from `subfolder=`; a pipeline
loaded with a component passed in) is adopted as `repo@commit` only; loads of that
part find it there offline (`load_component(repo, "vae")`). So is a revision of
single-file checkpoints (`.safetensors` at its root, as diffusers'
`from_single_file(url)` downloads them): `from_single_file` of that URL then
downloads nothing, and offline finds the file there. The tree listing
huggingface_hub keeps beside a snapshot (`trees/<commit>.json`: size, git blob id,
LFS sha256, Xet hash per file) gives each file's Xet hash, recorded beside its
sha256. With `reclaim`, a revision is deleted from the cache through
huggingface_hub's own cache API, and only after every one of its files has been
rebuilt from the store and found byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CompstoreError, InvalidInputError
from .export import file_pieces
from .hub import file_sha256, record_xet_hashes
from .modular import missing_slots

if TYPE_CHECKING:
    from .store import Store

# Folders of a diffusers pipeline that hold transformers models (`text_encoder_2/`).
ENCODER_FOLDERS = ("text_encoder", "image_encoder")


@dataclass
class AdoptReport:
    cache_dir: str
    adopted: list[dict] = field(default_factory=list)  # repo, commit, ref, status, bytes
    skipped: list[dict] = field(default_factory=list)  # repo, commit, reason
    reclaimed_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _is_diffusers(snapshot: Path) -> bool:
    """A pipeline, a diffusers component, or models in folders of their own, as a
    pipeline's `subfolder=` downloads leave them: a diffusers class, or transformers'
    in a folder named as pipelines name their encoders (`text_encoder_2/`)."""
    if (snapshot / "model_index.json").exists() or (snapshot / "modular_model_index.json").exists():
        return True
    folders = {c.parent.name: _config(c) for c in snapshot.glob("*/config.json")}
    return "_class_name" in _config(snapshot / "config.json") or any(
        "_class_name" in c or ("architectures" in c and folder.startswith(ENCODER_FOLDERS))
        for folder, c in folders.items())


def _single_files(snapshot: Path) -> bool:
    """Checkpoints at the root of a revision that is no diffusers folder: what
    diffusers' `from_single_file(url)` leaves in a cache."""
    return any(p.is_file() for p in snapshot.glob("*.safetensors"))


def _config(path: Path) -> dict:
    try:
        value = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError):
        return {}
    return value if isinstance(value, dict) else {}


def _tree_listing(repo_path: Path, commit: str) -> dict:
    path = repo_path / "trees" / f"{commit}.json"
    try:
        files = json.loads(path.read_text()).get("files", {})
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _same_bytes_as_cache(store: "Store", snapshot_id: str, snapshot_path: Path) -> bool:
    """Every file of the snapshot, rebuilt from the store, equals the cached file."""
    stored = {path: fid for path, fid, _, _ in store.snapshot_files(snapshot_id)}
    cached = {p.relative_to(snapshot_path).as_posix() for p in snapshot_path.rglob("*") if p.is_file()}
    if set(stored) != cached:
        return False
    for path, fid in stored.items():
        ours = hashlib.sha256()
        for piece in file_pieces(store, fid):
            ours.update(piece)
        if ours.hexdigest() != file_sha256(snapshot_path / path):
            return False
    return True


def adopt(store: "Store", cache_dir: str | os.PathLike | None = None, *, reclaim: bool = False,
          progress: bool = False) -> AdoptReport:
    """Ingest every diffusers snapshot (and revision of single-file checkpoints) of a
    Hugging Face cache; `reclaim` deletes each revision from the cache once the store
    rebuilds it byte-identically.

    >>> Store().adopt(reclaim=True).reclaimed_bytes  # doctest: +SKIP
    """
    from huggingface_hub import constants, scan_cache_dir

    t0 = time.perf_counter()
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    if not cache.is_dir():
        raise CompstoreError(f"{cache}: no Hugging Face cache there (pass --cache-dir)")
    report = AdoptReport(str(cache))
    info = scan_cache_dir(cache)
    for warning in info.warnings:  # a repo huggingface_hub cannot read (a blob deleted, ...)
        report.skipped.append({"repo": _repo_of(str(warning)), "commit": None,
                               "reason": f"unreadable in the cache: {warning}"})
    to_delete: list[str] = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified)
        for rev in revisions:
            snap = Path(rev.snapshot_path)
            diffusers = _is_diffusers(snap)  # reads its configs
            single_files = not diffusers and _single_files(snap)
            if not (diffusers or single_files):
                report.skipped.append({"repo": repo.repo_id, "commit": rev.commit_hash,
                                       "reason": "not a diffusers pipeline or component"})
                continue
            ref = f"{repo.repo_id}@{rev.commit_hash}"
            try:
                r = store.ingest(snap, ref, source=repo.repo_id, revision=rev.commit_hash,
                                 progress=progress)
            except InvalidInputError as e:  # a damaged download: the other revisions go on
                report.skipped.append({"repo": repo.repo_id, "commit": rev.commit_hash,
                                       "reason": str(e)})
                continue
            # a pull of single files names `repo@commit` alone, as `pull --include` does
            whole = not single_files and r.kind != "components" and not missing_slots(store, r.snapshot)
            for name in sorted(rev.refs) if whole else ():  # the refs the cache names it by
                # as a pull names them: `repo` for main, `repo@<name>` for a branch, a tag, a PR.
                # (Until 2026-12-07 `repo` took the newest whole revision, whatever ref it had.)
                store.tag(repo.repo_id if name == "main" else f"{repo.repo_id}@{name}", r.snapshot, force=True)
            _record_tree_hashes(store, r.snapshot, _tree_listing(Path(repo.repo_path), rev.commit_hash))
            entry = {"repo": repo.repo_id, "commit": rev.commit_hash, "ref": ref,
                     "status": r.status, "bytes": r.logical_bytes, "whole": whole,
                     "single_files": single_files}
            if reclaim:
                with store.reading():
                    entry["verified"] = _same_bytes_as_cache(store, r.snapshot, snap)
                if entry["verified"]:
                    to_delete.append(rev.commit_hash)
            report.adopted.append(entry)
    if to_delete:
        strategy = scan_cache_dir(cache).delete_revisions(*to_delete)
        report.reclaimed_bytes = strategy.expected_freed_size
        strategy.execute()
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _repo_of(message: str) -> str:
    """The repo id a cache path in `message` names ("models--org--name/..." -> "org/name")."""
    found = re.search(r"(?:models|datasets|spaces)--([^/\s]+)", message)
    return found.group(1).replace("--", "/") if found else ""


def _record_tree_hashes(store: "Store", snapshot_id: str, files: dict) -> None:
    record_xet_hashes(store, snapshot_id, {p: e.get("xet_hash") for p, e in files.items()
                                           if isinstance(e, dict)})
