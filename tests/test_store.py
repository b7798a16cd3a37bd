"""The store on the A/B/C/D family: dedup, export, verify, reports."""

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from safetensors import safe_open

import compstore
from compstore import CorruptStoreError, RefNotFoundError
from compstore.store import ingest, objects
from compstore.store.ingest import Ingestor
from conftest import recorded_sha256, store_state, tree_sha256


def distinct_content_bytes(folders) -> int:
    """Distinct tensor payloads + distinct non-safetensors files, computed without compstore."""
    seen: dict[str, int] = {}
    for folder in folders:
        for p in Path(folder).rglob("*"):
            if not p.is_file():
                continue
            if p.suffix == ".safetensors":
                with safe_open(p, "pt") as f:
                    for k in f.keys():
                        b = f.get_tensor(k).contiguous().view(-1).view(dtype=__import__("torch").uint8)
                        data = b.numpy().tobytes()
                        seen[hashlib.sha256(data).hexdigest()] = len(data)
            else:
                data = p.read_bytes()
                seen[hashlib.sha256(data).hexdigest()] = len(data)
    return sum(seen.values())


def test_physical_bytes_within_3_percent_of_unique_content(family_store, family):
    du = family_store.du()
    unique = distinct_content_bytes(family.values())
    assert du.logical_bytes == sum(
        p.stat().st_size for f in family.values() for p in Path(f).rglob("*") if p.is_file())
    assert unique <= du.physical_bytes <= 1.03 * unique, (du.physical_bytes, unique)
    assert du.dedup_ratio > 1.7


def test_export_of_every_ref_is_byte_identical(family_store, family, tmp_path):
    for name in "ABCD":
        r = family_store.export(name, tmp_path / f"out-{name}")
        assert tree_sha256(tmp_path / f"out-{name}") == tree_sha256(family[name])
        assert r.files == len(tree_sha256(family[name]))


def test_dedup_is_tensor_level_across_files_shards_and_variants(family_store):
    show = {n: {(c["slot"], c["variant"]): c for c in family_store.show(n)["components"]} for n in "ABCD"}
    # B is a fine-tune: VAE and text encoder are the very same components as A's.
    for slot in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert show["A"][(slot, "")]["id"] == show["B"][(slot, "")]["id"]
    assert show["A"][("unet", "")]["id"] != show["B"][("unet", "")]["id"]
    # C stores its VAE in shards: a different file layout, the same component.
    assert show["C"][("vae", "")]["id"] == show["A"][("vae", "")]["id"]
    # D has fp16 variants beside the default weights.
    assert {v for (s, v) in show["D"] if s == "unet"} == {"", "fp16"}
    assert "B" in show["A"][("vae", "")]["shared_with"]


def test_diff_counts_shared_and_delta_tensor_bytes(family_store):
    d = family_store.diff("A", "C").to_dict()
    assert {"shared_bytes", "delta_bytes", "components"} <= set(d)
    unet = next(c for c in d["components"] if c["slot"] == "unet")
    # perturb_fraction(1/3) changed every third parameter of C's UNet.
    assert 0 < unet["shared_tensors"] < unet["tensors"]
    assert unet["status"] == f"{unet['shared_tensors']} of {unet['tensors']} tensors shared"
    vae = next(c for c in d["components"] if c["slot"] == "vae")
    assert vae["status"] == "identical" and vae["delta_bytes"] == 0
    assert d["delta_bytes"] == unet["delta_bytes"]
    same = family_store.diff("A", "A")
    assert same.delta_bytes == 0 and same.shared_bytes > 0


def test_diff_compares_a_model_ref_with_the_pipelines_model_of_its_class(family_store, family, pipeline_copy):
    """`diff A my-unet`: the UNet ref (slot "") is set against A's UNet, not listed
    apart as if the two shared nothing; variants pair by name; with two models of
    its class, against the one it shares most with."""
    import json
    import shutil

    family_store.ingest(family["C"] / "unet", "c-unet")
    family_store.ingest(family["D"] / "unet", "d-unet")
    for a, b in (("A", "c-unet"), ("c-unet", "A")):
        d = family_store.diff(a, b).to_dict()
        [unet] = [c for c in d["components"] if c["a_id"] and c["b_id"]]
        assert unet["slot"] == "unet" and 0 < unet["shared_tensors"] < unet["tensors"]
        assert all(c["slot"] != "" for c in d["components"])
    assert family_store.diff("A", "c-unet").delta_bytes == family_store.diff("A", "C").delta_bytes
    paired = {(c["slot"], c["variant"]): c["status"] for c in family_store.diff("D", "d-unet").components}
    assert paired[("unet", "")] == paired[("unet", "fp16")] == "identical"
    two = pipeline_copy("A")  # A with C's UNet beside its own, as a second slot of the class
    shutil.copytree(family["C"] / "unet", two / "unet_2")
    index = json.loads((two / "model_index.json").read_text())
    (two / "model_index.json").write_text(json.dumps({**index, "unet_2": index["unet"]}))
    family_store.ingest(two, "two-unets")
    rows = {c["slot"]: c["status"] for c in family_store.diff("two-unets", "c-unet").components}
    assert (rows["unet_2"], rows["unet"]) == ("identical", "only in two-unets")


def test_reingest_is_a_noop(store, family):
    first = store.ingest(family["A"], "A")
    before = store_state(store.home)
    again = store.ingest(family["A"], "A")
    assert (first.status, again.status) == ("new", "unchanged")
    assert again.written_bytes == 0
    assert store_state(store.home) == before


def test_same_content_under_two_refs_costs_nothing(store, family):
    store.ingest(family["A"], "A")
    physical = store.du().physical_bytes
    r = store.ingest(family["A"], "A-again")
    assert r.status == "new" and r.written_bytes == 0
    assert store.du().physical_bytes == physical
    assert {x["name"] for x in store.ls()} == {"A", "A-again"}


def test_a_file_is_hashed_from_its_first_new_byte_and_a_held_one_never(store, family, monkeypatch):
    """sha256, the slowest step of ingesting new bytes, starts on a side thread at a
    file's first new byte, beside the writing of the rest; a file the store holds
    whole takes its recorded sha256 without being read again."""
    events: list = []
    for name, event in (("ingest_file", lambda self, f, *_: ["file", f.path]),
                        ("put_blob", lambda self, data: "put"),
                        ("_hash", lambda self, rec, mm: "hash")):
        real = getattr(Ingestor, name)
        monkeypatch.setattr(Ingestor, name, lambda self, *a, real=real, event=event:
                            (events.append(event(self, *a)), real(self, *a))[1])

    def per_file() -> dict[str, list]:
        files, now = {}, None
        for e in events:
            if isinstance(e, list):
                now = files[e[1]] = []
            else:
                now.append(e)
        events.clear()
        return files

    store.ingest(family["A"], "A")
    a = per_file()
    weights = [p for p in a if p.endswith(".safetensors")]
    assert weights and all(a[p][:3] == ["put", "hash", "put"] for p in weights)  # header, then hash
    assert all(e.count("hash") == 1 for e in a.values())

    store.ingest(family["B"], "B")
    b = per_file()
    held = {p for p, sha in tree_sha256(family["B"]).items() if sha in tree_sha256(family["A"]).values()}
    assert held and "unet/diffusion_pytorch_model.safetensors" not in held
    assert {p for p, e in b.items() if "hash" not in e} == held
    unet = b["unet/diffusion_pytorch_model.safetensors"]
    assert unet.count("hash") == 1 and unet[-1] == "put"  # started before the file's last blob

    for ref in "AB":
        assert recorded_sha256(store, ref) == tree_sha256(family[ref])


def test_ingest_works_where_the_kernel_cannot_populate_a_mapping(store, family, monkeypatch, tmp_path):
    """Ingest maps each range it writes in one madvise call (MADV_POPULATE_READ, Linux
    5.14+); where that advice is unknown the call fails with EINVAL, and ingest goes
    on without it."""
    monkeypatch.setattr(ingest, "_POPULATE_MIN", 0)
    monkeypatch.setattr(ingest, "_POPULATE_READ", 0x7fff)  # no such advice
    store.ingest(family["A"], "A")
    assert ingest._POPULATE_READ is None
    store.export("A", tmp_path / "out")
    assert tree_sha256(tmp_path / "out") == tree_sha256(family["A"])
    assert recorded_sha256(store, "A") == tree_sha256(family["A"])


@pytest.mark.skipif(os.uname().sysname != "Linux" or tuple(map(int, os.uname().release.split(".")[:2])) < (5, 14),
                    reason="MADV_POPULATE_READ is Linux 5.14+")
def test_the_kernel_takes_the_populate_advice(store, family, monkeypatch):
    monkeypatch.setattr(ingest, "_POPULATE_MIN", 0)
    store.ingest(family["A"], "A")
    assert ingest._POPULATE_READ is not None  # not turned off by an EINVAL


def test_a_sealed_pack_is_fsynced_beside_the_caller_and_takes_no_more_blobs(tmp_path, monkeypatch):
    home = tmp_path / "store"
    (home / "tmp").mkdir(parents=True)
    (home / "objects" / "packs").mkdir(parents=True)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    writer = objects.PackWriter(home)
    first, _ = writer.append(b"a" * 100)
    writer.seal()
    fd = writer.packs[0].fd
    writer._syncs[0].result()
    assert synced == [fd]  # started by seal(), before commit
    second, offset = writer.append(b"b" * 100)
    assert second != first and offset == 0
    packs = writer.commit()
    assert [n for n, _ in packs] == [first, second] and len(synced) == 3  # + the second pack, the folder
    assert (home / "objects" / "packs" / f"{second}.pack").read_bytes() == b"b" * 100


def test_du_unique_bytes_and_json_keys(family_store):
    du = family_store.du().to_dict()
    assert {"logical_bytes", "physical_bytes", "refs"} <= set(du)
    refs = {r["name"]: r for r in du["refs"]}
    assert set(refs["A"]) >= {"name", "logical_bytes", "unique_bytes"}
    assert refs["A"]["unique_bytes"] == 0  # D holds all of A (A + fp16 files)
    assert refs["B"]["unique_bytes"] > 0


def test_flipping_any_byte_makes_verify_fail_naming_refs(family_store):
    assert family_store.verify().ok
    blobs = family_store.db.execute("SELECT id, pack, offset, size FROM blobs WHERE size > 0").fetchall()
    rng = random.Random(0)
    for bid, pack, offset, size in rng.sample(blobs, 25):
        path = family_store.home / "objects" / "packs" / f"{pack}.pack"
        pos = offset + rng.randrange(size)
        with open(path, "r+b") as f:
            f.seek(pos)
            old = f.read(1)
            f.seek(pos)
            f.write(bytes([old[0] ^ 0x01]))
        report = family_store.verify()
        assert not report.ok
        [problem] = report.problems
        assert problem["blob"] == bid and problem["refs"], problem
        with open(path, "r+b") as f:
            f.seek(pos)
            f.write(old)
    assert family_store.verify().ok


def test_verify_reports_missing_and_truncated_packs(family_store):
    pack = next((family_store.home / "objects" / "packs").glob("*.pack"))
    data = pack.read_bytes()
    pack.write_bytes(data[: len(data) // 2])
    r = family_store.verify()
    assert not r.ok and any("truncated" in p["problem"] for p in r.problems)
    pack.unlink()
    r = family_store.verify()
    assert any(p["problem"] == "pack file missing" for p in r.problems)


def test_hash_collision_is_caught_by_byte_comparison(store, family, tmp_path, monkeypatch):
    # Every blob gets the same "hash": only the byte-for-byte check keeps them apart.
    monkeypatch.setattr("compstore.store.ingest.blob_hash", lambda data: "0" * 32)
    store.ingest(family["A"], "A")
    store.ingest(family["B"], "B")
    for name in "AB":
        store.export(name, tmp_path / name)
        assert tree_sha256(tmp_path / name) == tree_sha256(family[name])


def test_tag_names_a_ref_or_a_snapshot_and_moves_a_name_only_when_forced(family_store, family):
    from click.testing import CliRunner

    from compstore import RefExistsError
    from compstore.cli import cli
    from conftest import same_state, store_state

    a, b = family_store.resolve("A"), family_store.resolve("B")
    assert family_store.tag("prod", "A") == {"ref": "prod", "snapshot": a, "moved_from": None}
    assert family_store.tag("prod", a) == {"ref": "prod", "snapshot": a, "moved_from": None}  # already there
    same_state(compstore.DiffusionPipeline.from_pretrained("prod", store=family_store).unet,
               compstore.DiffusionPipeline.from_pretrained("A", store=family_store).unet)
    family_store.rm("A")  # the name keeps the snapshot: gc frees none of it
    family_store.gc()
    assert family_store.show("prod")["snapshot_id"] == a
    before = store_state(family_store.home)
    bad = [("prod", "B", {}, RefExistsError, r"ref 'prod' already names snapshot .*--force"),
           ("next", "nope", {}, RefNotFoundError, "no ref named 'nope'"),
           ("next", "0" * 64, {}, RefNotFoundError, "no ref named '0000"),
           (" prod", "B", {}, compstore.InvalidInputError, "invalid ref name"),
           ("a\nb", "B", {}, compstore.InvalidInputError, "invalid ref name")]
    for name, target, kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            family_store.tag(name, target, **kwargs)
    run = lambda *args: CliRunner().invoke(cli, ["--store", str(family_store.home), *args])  # noqa: E731
    r = run("tag", "prod", "B")
    assert r.exit_code == 1 and "already names snapshot" in r.stderr and r.stderr.count("\n") == 1
    assert store_state(family_store.home) == before
    r = run("tag", "prod", "B", "--force", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"ref": "prod", "snapshot": b, "moved_from": a}
    assert run("tag", "v1", b[:12]).exit_code == 1  # a snapshot is named whole
    assert run("tag", "stable", "prod").stdout == f"stable -> snapshot {b[:12]}\n" and family_store.resolve("stable") == b


def test_rm_drops_only_the_ref(family_store):
    physical = family_store.du().physical_bytes
    family_store.rm("B")
    assert "B" not in {r["name"] for r in family_store.ls()}
    assert family_store.du().physical_bytes == physical
    with pytest.raises(RefNotFoundError, match="no ref named 'B'"):
        family_store.show("B")


def test_a_mistyped_ref_is_refused_with_the_refs_meant(store, family):
    from click.testing import CliRunner

    from compstore.cli import cli

    from conftest import store_state

    store.ingest(family["A"], "sd-base")
    store.ingest(family["B"], "sd-finetune")
    before = store_state(store.home)
    with pytest.raises(RefNotFoundError, match=r"no ref named 'sd-bse' .*; did you mean 'sd-base'\?$"):
        store.show("sd-bse")
    with pytest.raises(RefNotFoundError, match=r"\(see `compstore ls`\)$"):  # nothing near: no guess
        store.resolve("zzz")
    r = CliRunner().invoke(cli, ["--store", str(store.home), "export", "sdfinetune", str(store.home.parent / "x")])
    assert r.exit_code == 1 and "did you mean 'sd-finetune'?" in r.stderr
    with pytest.raises(RefNotFoundError, match="did you mean 'sd-base'"):
        compstore.DiffusionPipeline.from_pretrained("sd-bse", store=store)
    assert store_state(store.home) == before


def test_ref_update_moves_the_ref(store, family):
    store.ingest(family["A"], "x")
    r = store.ingest(family["B"], "x")
    assert r.status == "updated"
    assert store.resolve("x") == store.ingest(family["B"], "B").snapshot


def test_single_component_folder(store, family):
    r = store.ingest(family["A"] / "unet", "unet-only")
    assert r.kind == "component"
    [c] = store.show("unet-only")["components"]
    assert c["class_name"] == "UNet2DConditionModel" and c["library"] == "diffusers"
    store.ingest(family["A"], "A")
    full = {x["slot"]: x for x in store.show("A")["components"]}
    assert c["id"] == full["unet"]["id"]  # the same component, ingested either way
    assert r.written_bytes > 0


def test_models_in_folders_without_an_index(store, family, tmp_path):
    """`vae/` and `text_encoder/` alone, as diffusers' `subfolder=` downloads leave
    them: each folder is a component in its slot (the folder was one component with
    no class, in slot ""), the same component as in the whole pipeline."""
    import shutil

    for slot in ("vae", "text_encoder"):
        shutil.copytree(family["A"] / slot, tmp_path / "part" / slot)
    r = store.ingest(tmp_path / "part", "part")
    assert r.kind == "components"
    parts = {c["slot"]: c for c in store.show("part")["components"]}
    assert {s: c["class_name"] for s, c in parts.items()} == {"vae": "AutoencoderKL",
                                                             "text_encoder": "CLIPTextModel"}
    store.ingest(family["A"], "A")
    full = {c["slot"]: c for c in store.show("A")["components"]}
    assert all(parts[s]["id"] == full[s]["id"] for s in parts)
    store.export("part", tmp_path / "out")
    assert tree_sha256(tmp_path / "out") == tree_sha256(tmp_path / "part")


def test_hf_cache_snapshot_symlinks_into_blobs_are_followed(store, family, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    for src in Path(family["A"]).rglob("*"):
        if src.is_file():
            data = src.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snap / src.relative_to(family["A"])
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    r = store.ingest(snap, "cached")
    assert r.files == len(tree_sha256(family["A"]))
    store.export("cached", tmp_path / "out")
    assert tree_sha256(tmp_path / "out") == tree_sha256(family["A"])


def test_json_documents_are_plain_json(family_store):
    for doc in (family_store.du().to_dict(), family_store.diff("A", "B").to_dict(),
                family_store.verify().to_dict(), family_store.show("A"), family_store.ls()):
        json.loads(json.dumps(doc))


def test_same_bytes_helper():
    a = bytes(range(256)) * 1001
    assert objects.same_bytes(memoryview(a), bytearray(a))
    b = bytearray(a)
    b[-1] ^= 1
    assert not objects.same_bytes(a, b)
    b = bytearray(a)
    b[5] ^= 1
    assert not objects.same_bytes(a, b)
    assert not objects.same_bytes(a, a[:-1])


def test_side_by_side_checkpoints_become_separate_variants(store, family, tmp_path):
    import shutil
    folder = tmp_path / "two-checkpoints"
    folder.mkdir()
    shutil.copy(family["A"] / "vae" / "config.json", folder / "config.json")
    shutil.copy(family["A"] / "vae" / "diffusion_pytorch_model.safetensors", folder / "vae-a.safetensors")
    shutil.copy(family["B"] / "unet" / "diffusion_pytorch_model.safetensors", folder / "other.safetensors")
    shutil.copy(family["A"] / "vae" / "diffusion_pytorch_model.safetensors", folder / "vae-b.safetensors")
    store.ingest(folder, "two")
    variants = {c["variant"] for c in store.show("two")["components"]}
    assert variants == {"vae-a.safetensors", "vae-b.safetensors", "other.safetensors"}


def _open_files(path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_a_store_dropped_without_close_closes_its_catalog_at_once(family_store, monkeypatch):
    """CPython's sqlite3 connections sit in a reference cycle, so a Store dropped
    without close() kept its catalog open until the cyclic collector ran (30 Stores
    opened and dropped in a loop: 30 open catalog.db files). Also when the last
    reference drops in another thread, where sqlite3 refuses the close: the collector
    closes that one, and nothing is raised."""
    import gc
    import sys
    import threading

    catalog = family_store.home / "catalog.db"
    before = _open_files(catalog)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    gc.disable()
    try:
        for _ in range(10):
            s = compstore.Store(family_store.home)
            s.ls()
            del s
        assert _open_files(catalog) <= before + 1  # SQLite may keep one for its next open
        s = compstore.Store(family_store.home)
        handed = [s]
        del s
        last = threading.Thread(target=handed.clear)  # the last reference drops there
        last.start()
        last.join()
    finally:
        gc.enable()
    gc.collect()
    assert unraisable == []
    assert _open_files(catalog) <= before + 1


def test_weights_metadata_is_of_the_files_holding_the_component_alone(store, tmp_path):
    """A component's safetensors metadata (what a torchao checkpoint describes its
    tensors with) comes from its own files: not from another repo's file that holds
    the same tensor beside others."""
    import torch
    from safetensors.torch import save_file

    def write(folder, tensors, metadata):
        folder.mkdir()
        (folder / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
        save_file(tensors, folder / "diffusion_pytorch_model.safetensors", metadata=metadata)
        return folder

    w = torch.arange(8, dtype=torch.float32)
    store.ingest(write(tmp_path / "mine", {"w": w}, {"k": "mine", "only": "mine"}), "mine")
    store.ingest(write(tmp_path / "theirs", {"w": w, "v": torch.zeros(2)}, {"k": "theirs"}), "theirs")
    [mine] = store.components_of(store.resolve("mine"))
    [theirs] = store.components_of(store.resolve("theirs"))
    assert store.weights_metadata(mine["component_id"]) == {"k": "mine", "only": "mine"}
    assert store.weights_metadata(theirs["component_id"]) == {"k": "theirs"}

    from test_damage import flip  # a damaged header: an error that says what to run, no metadata

    [header] = store.db.execute("SELECT b.id, b.pack, b.offset, b.size FROM files f JOIN snapshot_files sf "
                                "ON sf.file_id = f.id JOIN blobs b ON b.id = f.header_blob "
                                "WHERE sf.snapshot_id = ?", [store.resolve("mine")]).fetchall()
    flip(store, header, 20)
    with pytest.raises(CorruptStoreError, match="safetensors header of component .* run `compstore verify`"):
        store.weights_metadata(mine["component_id"])
