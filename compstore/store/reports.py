"""Read-only reports over the catalog: ls, show, du, diff.

Sizes are bytes. "Logical" is what the refs weigh as published (the sum of their
files); "physical" is what the store holds on disk (its pack files).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .catalog import blobs_of_snapshot, tensor_blobs_of_snapshot

if TYPE_CHECKING:
    from .store import Store


def human(n: int | float) -> str:
    """A byte count as people read it: `human(5_704_000)` -> '5.4 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _refs(store: "Store", name: str | None = None) -> list[dict]:
    """Rows of every ref, or of the ref `name` only."""
    sql = f"""
    SELECT r.name, r.snapshot_id, r.created, r.updated, s.kind, s.source, s.revision,
           count(sf.path) AS files, coalesce(sum(f.size), 0) AS logical_bytes
    FROM refs r JOIN snapshots s ON s.id = r.snapshot_id
    LEFT JOIN snapshot_files sf ON sf.snapshot_id = r.snapshot_id
    LEFT JOIN files f ON f.id = sf.file_id
    {"WHERE r.name = :name" if name is not None else ""}
    GROUP BY r.name ORDER BY r.name"""
    return [dict(row) for row in store.db.query(sql, {"name": name})]


def ls(store: "Store") -> list[dict]:
    """Every ref: name, snapshot, kind, source, file count, logical bytes."""
    return _refs(store)


def _components_of(store: "Store", snapshot_id: str) -> list[dict]:
    return [dict(r) for r in store.db.query(
        """SELECT sc.slot, sc.variant, sc.library, sc.class_name, sc.component_id AS id,
                  c.n_tensors, c.tensor_bytes
           FROM snapshot_components sc JOIN components c ON c.id = sc.component_id
           WHERE sc.snapshot_id = ? ORDER BY sc.slot, sc.variant""", [snapshot_id])]


def _saved_quant_method(store: "Store", component_id: str) -> str | None:
    """The `quant_method` of the quantization config a model was saved with (its
    config.json's), or None; a damaged config is `verify`'s to name, not show's."""
    from .errors import CorruptStoreError

    try:
        saved = (store.component_config(component_id) or {}).get("quantization_config")
    except CorruptStoreError:
        return None
    return str(saved.get("quant_method")) if isinstance(saved, dict) else None


def show(store: "Store", ref: str) -> dict:
    """One ref: its snapshot, files, and components with the other refs sharing each,
    and the method each model was saved quantized with (`quant_method`, None if not)."""
    snap = store.resolve(ref)
    [info] = _refs(store, ref)
    components = _components_of(store, snap)
    for c in components:
        c["shared_with"] = [r[0] for r in store.db.execute(
            """SELECT DISTINCT r.name FROM snapshot_components sc JOIN refs r
               ON r.snapshot_id = sc.snapshot_id WHERE sc.component_id = ? AND r.name != ?
               ORDER BY r.name""", [c["id"], ref])]
        c["quant_method"] = _saved_quant_method(store, c["id"]) if c["n_tensors"] else None
    info["components"] = components
    info["pins"] = [dict(r) for r in store.db.query(
        "SELECT slot, source, subfolder, revision, variant, target_snapshot, component_id "
        "FROM pins WHERE snapshot_id = ? ORDER BY slot", [snap])]
    info["files_list"] = [dict(r) for r in store.db.query(
        """SELECT sf.path, f.size, f.sha256, f.kind FROM snapshot_files sf
           JOIN files f ON f.id = sf.file_id WHERE sf.snapshot_id = ? ORDER BY sf.path""", [snap])]
    return info


@dataclass
class DuReport:
    logical_bytes: int  # sum over refs of their files as published
    physical_bytes: int  # pack files on disk
    payload_bytes: int  # distinct blob bytes referenced by the catalog
    catalog_bytes: int
    dedup_ratio: float  # logical / physical
    refs: list[dict] = field(default_factory=list)  # name, logical_bytes, unique_bytes

    def to_dict(self) -> dict:
        return asdict(self)


def du(store: "Store") -> DuReport:
    """Disk usage: logical vs physical bytes, and per ref the bytes only it holds."""
    refs = _refs(store)
    blobs_by_snap = {s: blobs_of_snapshot(store.db, s) for s in {r["snapshot_id"] for r in refs}}
    owners: Counter[int] = Counter()
    for r in refs:
        owners.update(blobs_by_snap[r["snapshot_id"]].keys())
    out = []
    for r in refs:
        blobs = blobs_by_snap[r["snapshot_id"]]
        unique = sum(size for b, size in blobs.items() if owners[b] == 1)
        out.append({"name": r["name"], "logical_bytes": r["logical_bytes"], "unique_bytes": unique})
    physical = sum(p.stat().st_size for p in (store.home / "objects" / "packs").glob("*.pack"))
    payload = store.db.execute("SELECT coalesce(sum(size), 0) FROM blobs").fetchone()[0]
    catalog = sum(p.stat().st_size for p in store.home.glob("catalog.db*"))
    logical = sum(r["logical_bytes"] for r in refs)
    return DuReport(logical, physical, payload, catalog,
                    round(logical / physical, 3) if physical else 0.0, out)


@dataclass
class DiffReport:
    a: str
    b: str
    shared_bytes: int  # tensor payload bytes of B that A already holds
    delta_bytes: int  # tensor payload bytes of B that A lacks: what A -> B must move
    components: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _tensor_blobs(store: "Store", component_id: str) -> list[tuple[int, int]]:
    """(blob id, size) of each tensor of a component."""
    return [(r[0], r[1]) for r in store.db.execute(
        """SELECT t.blob_id, b.size FROM component_tensors ct JOIN tensors t ON t.id = ct.tensor_id
           JOIN blobs b ON b.id = t.blob_id WHERE ct.component_id = ?""", [component_id])]


def _as_slots_of(store: "Store", model: dict, pipeline: dict) -> dict:
    """A model ref's components (slot "": a model folder, a single file's model)
    re-keyed by the `pipeline` slot of the same class and variant that shares the
    most bytes with them, so that `diff base my-unet` compares the UNets."""
    out = {}
    for (slot, variant), c in model.items():
        blobs = dict(_tensor_blobs(store, c["id"]))
        same = [k for k, p in pipeline.items() if k[1] == variant and p["class_name"] == c["class_name"]]
        best = max(same, key=lambda k: sum(blobs.get(b, 0) for b, _ in _tensor_blobs(store, pipeline[k]["id"])),
                   default=(slot, variant))
        out[best] = c
    return out


def diff(store: "Store", a: str, b: str) -> DiffReport:
    """What B shares with A, per component and in bytes (distinct tensor payloads).
    A model ref (a model folder, or one model's single file) compared with a pipeline
    is compared with the pipeline's model of its class."""
    snap_a, snap_b = store.resolve(a), store.resolve(b)
    blobs_a = tensor_blobs_of_snapshot(store.db, snap_a)
    blobs_b = tensor_blobs_of_snapshot(store.db, snap_b)
    comps_a = {(c["slot"], c["variant"]): c for c in _components_of(store, snap_a)}
    comps_b = {(c["slot"], c["variant"]): c for c in _components_of(store, snap_b)}
    is_model = {side: bool(comps) and all(slot == "" for slot, _ in comps)
                for side, comps in (("a", comps_a), ("b", comps_b))}
    if is_model["a"] and not is_model["b"]:
        comps_a = _as_slots_of(store, comps_a, comps_b)
    elif is_model["b"] and not is_model["a"]:
        comps_b = _as_slots_of(store, comps_b, comps_a)
    rows = []
    for key in sorted(set(comps_a) | set(comps_b)):
        ca, cb = comps_a.get(key), comps_b.get(key)
        row = {"slot": key[0], "variant": key[1], "a_id": ca and ca["id"], "b_id": cb and cb["id"]}
        if cb is None:
            row.update(status=f"only in {a}", shared_tensors=0, tensors=0, shared_bytes=0, delta_bytes=0)
            rows.append(row)
            continue
        tensors = _tensor_blobs(store, cb["id"])
        shared = [(bid, size) for bid, size in tensors if bid in blobs_a]
        delta = {bid: size for bid, size in tensors if bid not in blobs_a}
        if ca is not None and ca["id"] == cb["id"]:
            status = "identical"
        elif ca is None:
            status = f"only in {b}"
        elif tensors and len(shared) == len(tensors):
            status = "same tensors, different config"
        elif shared:
            status = f"{len(shared)} of {len(tensors)} tensors shared"
        else:
            status = "different"
        row.update(status=status, shared_tensors=len(shared), tensors=len(tensors),
                   shared_bytes=sum(dict(shared).values()), delta_bytes=sum(delta.values()))
        rows.append(row)
    shared_bytes = sum(size for bid, size in blobs_b.items() if bid in blobs_a)
    delta_bytes = sum(size for bid, size in blobs_b.items() if bid not in blobs_a)
    return DiffReport(a, b, shared_bytes, delta_bytes, rows)
