"""Modular pipelines: components that live in other repos, pinned when they enter the store.

diffusers 0.42 writes each `modular_model_index.json` component as
`[library, class, {"pretrained_model_name_or_path", "subfolder", "revision",
"variant", "type_hint"}]`. An entry whose slot has no folder in the repo points
elsewhere. compstore resolves each such pointer once, at ingest, to a snapshot in
the store and the content-hashed component in it: a **pin**. Loads use the pin
ever after, so a pointed-to repo that changes is never loaded silently; the next
ingest of the modular repo refuses until the user re-pins (`--repin`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .components import pick_component
from .errors import (CompstoreError, ComponentNotFoundError, InvalidInputError, RefNotFoundError,
                     VariantNotFoundError)
from .scan import PIPELINE_INDEXES, FolderScan, index_entries, safe_relpath

if TYPE_CHECKING:
    from .store import Store

INDEX = "modular_model_index.json"


class PinChangedError(CompstoreError):
    """A pinned component's source now holds different content; nothing was changed."""


@dataclass(frozen=True)
class Pointer:
    slot: str
    library: str
    class_name: str
    source: str  # pretrained_model_name_or_path as written
    subfolder: str
    revision: str | None
    variant: str | None


@dataclass
class Pin:
    slot: str
    pointer: str  # pretrained_model_name_or_path as the index writes it
    source: str  # the folder (absolute) or ref (`repo@commit` for the Hub) it resolved to
    subfolder: str
    revision: str | None
    variant: str  # the variant picked ("" = default weights)
    target_snapshot: str
    component_id: str
    library: str
    class_name: str

    def to_dict(self) -> dict:
        return asdict(self)


def read_index(scan: FolderScan) -> dict:
    with open(scan.files[INDEX].source, "rb") as f:
        return json.loads(f.read())


def external_pointers(scan: FolderScan) -> list[Pointer]:
    """Entries of a modular index that name a class and point outside the folder."""
    if scan.kind != "modular":
        return []
    local_slots = {c.slot for c in scan.components}
    out = []
    for slot, entry in sorted(read_index(scan).items()):
        if slot.startswith("_") or not isinstance(entry, list) or len(entry) < 3:
            continue
        library, cls, spec = entry[0], entry[1], entry[2]
        if library is None or cls is None or not isinstance(spec, dict):
            continue
        source = spec.get("pretrained_model_name_or_path")
        if not source or slot in local_slots:
            continue
        fields = {"pretrained_model_name_or_path": source, "subfolder": spec.get("subfolder"),
                  "revision": spec.get("revision"), "variant": spec.get("variant"),
                  "library": library, "class": cls}
        for field, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise InvalidInputError(INDEX, f"entry {slot!r}: {field} must be a string, not {value!r}")
        subfolder = spec.get("subfolder") or ""
        if subfolder:
            safe_relpath(subfolder, INDEX)
        out.append(Pointer(slot, library, cls, source, subfolder, spec.get("revision"),
                           spec.get("variant")))
    return out


def resolve_pointers(store: "Store", scan: FolderScan, *,
                     token: str | bool | None = None) -> list[Pin]:
    """Pin every external pointer: a local folder is ingested (ref = its absolute path),
    a Hub repo id is pulled (ref = `repo@commit`), anything else must already be a
    ref of the store (`name@revision` or `name`).

    Runs before the caller takes the write lock (a folder pointed at is ingested
    under its own lock).
    """
    from .hub import hub_reachable, is_repo_id  # hub.py imports this module

    # Check every pointer before resolving any: refused input must not have
    # ingested or pulled the pointers that came before the bad one.
    pointers = external_pointers(scan)
    for p in pointers:
        folder = Path(p.source).expanduser()
        if folder.is_dir():
            if str(folder.resolve()) == scan.root:
                raise InvalidInputError(INDEX, f"entry {p.slot!r} points at this folder, which has "
                                               f"no {p.subfolder or p.slot!r} folder")
            if p.subfolder and not (folder / p.subfolder).is_dir():
                raise InvalidInputError(INDEX, f"entry {p.slot!r}: {p.source} has no subfolder "
                                               f"{p.subfolder!r}")
        elif not (hub_reachable() and is_repo_id(p.source)) and not _refs_for(store, p):
            raise InvalidInputError(
                INDEX, f"entry {p.slot!r} points at {p.source!r}"
                f"{f' (revision {p.revision})' if p.revision else ''}, which is neither a local "
                f"folder nor a ref of this store; ingest it first: compstore ingest FOLDER "
                f"--name {_candidate_refs(p)[0]}")

    pins = []
    pulled: dict[tuple, str] = {}  # (repo, revision, variant) -> the ref its one pull made
    for p in pointers:
        folder = Path(p.source).expanduser()
        if folder.is_dir():
            target = folder.resolve()
            snap = store.ingest(target, str(target)).snapshot
            source, revision = str(target), None
        else:
            if hub_reachable() and is_repo_id(p.source):
                # A Hub repo: pull the folders the pointers name in it (only what the
                # store lacks), and pin the commit it names now.
                key = (p.source, p.revision, p.variant)
                if key not in pulled:
                    folders = {q.subfolder for q in pointers
                               if (q.source, q.revision, q.variant) == key}
                    include = None if "" in folders else [f"{f}/*" for f in sorted(folders)]
                    try:
                        pulled[key] = store.pull(p.source, revision=p.revision, variant=p.variant,
                                                 include=include, token=token).ref
                    except VariantNotFoundError:  # pinned below: the default weights, with a warning
                        pulled[key] = store.pull(p.source, revision=p.revision, include=include,
                                                 token=token).ref
                ref = pulled[key]
            else:
                ref = _refs_for(store, p)[0]
            snap = store.resolve(ref)
            source, revision = ref, p.revision or store.snapshot(snap)["revision"]
        try:
            comp = pick_component(store.components_of(snap), p.subfolder, p.variant)
        except ComponentNotFoundError as e:
            raise InvalidInputError(INDEX, f"entry {p.slot!r}: {p.source}: {e}") from None
        pins.append(Pin(p.slot, p.source, source, p.subfolder, revision, comp["variant"], snap,
                        comp["component_id"], p.library, p.class_name))
    return pins


def _candidate_refs(p: Pointer) -> list[str]:
    """The refs a pointer names, most specific first: `repo@revision`, and the plain
    name only for main (the Hub cache's refs/main): a pointer at a tag or a branch
    never gets main's weights. (Until 2026-12-07 it fell back to the plain name.)"""
    if p.revision is None:
        return [p.source]
    return [f"{p.source}@{p.revision}"] + ([p.source] if p.revision == "main" else [])


def _refs_for(store: "Store", p: Pointer) -> list[str]:
    """The refs of the store a pointer may name, most specific first; with a revision,
    also the commit that a pull at that revision got (a pointer's pull takes only the
    folders pointed at, so it names the commit, `repo@<commit>`, not `repo@revision`)."""
    from .hub import revision_commit  # hub.py imports this module

    refs = _candidate_refs(p)
    commit = revision_commit(store, p.source, p.revision) if p.revision else None
    if commit:
        refs.append(f"{p.source}@{commit}")
    return [r for r in refs if store.has_ref(r)]


def check_pins(store: "Store", ref: str, pins: list[Pin], repin_command: str, repin: bool) -> None:
    """Refuse a re-ingest whose pointed-to content changed, unless re-pinning."""
    if repin or not pins or not store.has_ref(ref):
        return
    old = {p["slot"]: p for p in pins_of(store, store.resolve(ref))}
    for pin in pins:
        before = old.get(pin.slot)
        same_pointer = before and (before["pointer"], before["subfolder"]) == (pin.pointer, pin.subfolder)
        if same_pointer and before["component_id"] != pin.component_id:
            raise _changed(ref, pin.slot, pin.source, pin.subfolder, before["component_id"],
                           pin.component_id, repin_command)


def refuse_changed_folder_pins(store: "Store", ref: str, scan: FolderScan, repin_command: str) -> None:
    """`check_pins` for the pointers to local folders, before they are ingested: a
    re-ingest refused for a folder whose pinned component changed leaves the store as
    it was (the folder is not ingested under its own ref first). A folder unchanged
    since its last ingest is not read (its stat stamp); a changed one is read and
    hashed, not written."""
    from . import stat_cache
    from .ingest import component_id_unwritten
    from .scan import scan_folder

    try:
        old = {p["slot"]: p for p in pins_of(store, store.resolve(ref))}
    except RefNotFoundError:  # a first ingest (or its ref just removed): nothing pinned yet
        return
    for p in external_pointers(scan):
        before, folder = old.get(p.slot), Path(p.source).expanduser()
        same_pointer = before and (before["pointer"], before["subfolder"]) == (p.source, p.subfolder)
        if not (same_pointer and folder.is_dir()):
            continue
        target = folder.resolve()
        there = scan_folder(target)
        hit = stat_cache.unchanged(store.db, str(target), stat_cache.stamp(there, time.time_ns()))
        if hit:
            rows = store.components_of(hit[0])
        else:
            rows = [{"slot": c.slot, "variant": c.variant, "component": c} for c in there.components]
        try:  # resolve_pointers picks (and warns) again
            row = pick_component(rows, p.subfolder, p.variant, warn=False)
        except ComponentNotFoundError:
            continue  # resolve_pointers names the problem
        now = row["component_id"] if hit else component_id_unwritten(there, row["component"])
        if now != before["component_id"]:
            raise _changed(ref, p.slot, str(target), p.subfolder, before["component_id"], now, repin_command)


def _changed(ref: str, slot: str, source: str, subfolder: str, pinned: str, now: str,
             repin_command: str) -> PinChangedError:
    return PinChangedError(
        f"modular component {slot!r} of {ref}: {source}{'/' + subfolder if subfolder else ''} "
        f"changed since it was pinned (pinned {pinned[:12]}, now {now[:12]}); nothing was "
        f"loaded or changed. To use the new content, re-pin: {repin_command}")


def pins_of(store: "Store", snapshot_id: str) -> list[dict]:
    return [dict(r) for r in store.db.query(
        "SELECT * FROM pins WHERE snapshot_id = ? ORDER BY slot", [snapshot_id])]


def components_with_pins(store: "Store", snapshot_id: str) -> list[dict]:
    """A snapshot's components as a load finds them (rows of `Store.components_of`):
    its own, and those its modular entries are pinned to, in their slots (such an
    entry has no folder of its own)."""
    pinned = pins_of(store, snapshot_id)
    slots = {p["slot"] for p in pinned}
    return [c for c in store.components_of(snapshot_id) if c["slot"] not in slots] + pinned


def missing_slots(store: "Store", snapshot_id: str) -> set[str]:
    """The entries of a snapshot's pipeline index it holds no model or folder for, or
    a model's config.json without its weights (a pull or a download that left them
    out); none for a whole pipeline."""
    for name in PIPELINE_INDEXES:
        raw = store.read_file(snapshot_id, name)
        if raw is not None:
            have = {c["slot"] for c in components_with_pins(store, snapshot_id)
                    if not _config_without_weights(store, c["component_id"])}
            return {slot for slot, _, _ in index_entries(json.loads(raw))} - have
    return set()


def _config_without_weights(store: "Store", component_id: str) -> bool:
    """A model's folder with config.json and no tensors (schedulers, tokenizers and
    processors keep their own *_config.json, not a config.json)."""
    row = store.db.execute("SELECT config_blob, n_tensors FROM components WHERE id = ?",
                           [component_id]).fetchone()
    return row is not None and row[0] is not None and not row[1]
