"""Damaged payloads: `verify` names them, an ingest, pull or fetch of their source heals
them, gc never fails on them, and a push never spreads them.

Damage is done to the pack files as a disk or a careless hand would: a flipped byte in
a blob, a pack cut short, a pack deleted. The random sequence at the end checks the
whole story against a model of which blobs are damaged.
"""

import random
from pathlib import Path
import sqlite3

import pytest
import torch
from safetensors.torch import load_file

import compstore
from compstore import CorruptStoreError, Store
from compstore.store.catalog import blobs_of_snapshot, damaged_blob_ids
from conftest import run_random_steps, tree_sha256, use_hub
from hub_emulator import HubEmulator


def blob_rows(store: Store) -> list[tuple]:
    """(id, pack, offset, size) of every blob, by pack and offset."""
    return store.db.execute("SELECT id, pack, offset, size FROM blobs ORDER BY pack, offset").fetchall()


def pack_path(store: Store, pack: str):
    return store.home / "objects" / "packs" / f"{pack}.pack"


def flip(store: Store, blob: tuple, at: int) -> set[int]:
    """Flip one byte of a blob; the ids damaged."""
    bid, pack, offset, size = blob
    with open(pack_path(store, pack), "r+b") as f:
        f.seek(offset + at % size)
        b = f.read(1)
        f.seek(offset + at % size)
        f.write(bytes([b[0] ^ 0x5A]))
    return {bid}


def truncate(store: Store, pack: str, size: int) -> set[int]:
    """Cut a pack to `size` bytes; the ids of the blobs that no longer fit. (As by
    another process: this one's mappings go first, or touching them would be a SIGBUS.)"""
    store.packs.close()
    with open(pack_path(store, pack), "r+b") as f:
        f.truncate(size)
    return {b[0] for b in blob_rows(store) if b[1] == pack and b[2] + b[3] > size}


def delete(store: Store, pack: str) -> set[int]:
    store.packs.close()  # as by another process: a mapping would keep the bytes readable
    pack_path(store, pack).unlink()
    return {b[0] for b in blob_rows(store) if b[1] == pack}


def damage(store: Store, how: str) -> set[int]:
    """Damage the largest pack (it holds blobs of every ref); the ids damaged."""
    rows = blob_rows(store)
    pack = max({b[1] for b in rows}, key=lambda p: pack_path(store, p).stat().st_size)
    if how == "flip":
        return flip(store, max((b for b in rows if b[1] == pack), key=lambda b: b[3]), 1000)
    if how == "truncate":
        return truncate(store, pack, pack_path(store, pack).stat().st_size // 2)
    return delete(store, pack)


def problem_blobs(store: Store) -> set[int]:
    report = store.verify()
    assert report.ok == (not report.problems)
    return {p["blob"] for p in report.problems}


def exports_equal(store: Store, family, refs: dict[str, str], tmp_path) -> None:
    for ref, member in refs.items():
        out = tmp_path / f"export-{ref}-{len(list(tmp_path.iterdir()))}"
        store.export(ref, out)
        assert tree_sha256(out) == tree_sha256(family[member]), ref


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_ingesting_the_source_again_heals_what_verify_found(store, family, tmp_path, how):
    store.ingest(family["A"], "A")
    store.ingest(family["B"], "B")  # shares A's VAE and text encoder
    damaged = damage(store, how)
    assert problem_blobs(store) == damaged
    with pytest.raises(CorruptStoreError, match="compstore verify"):
        store.export("A", tmp_path / "broken")
    assert damaged_blob_ids(store.db) == damaged  # recorded: the stat cache no longer vouches

    r = store.ingest(family["A"], "A")  # the same folder, unchanged since its ingest
    assert r.status == "unchanged" and r.healed_bytes == r.written_bytes > 0
    healed_b = store.ingest(family["B"], "B").healed_bytes  # what only B held
    assert r.healed_bytes + healed_b == sum(b[3] for b in blob_rows(store) if b[0] in damaged)
    assert store.verify().ok and damaged_blob_ids(store.db) == set()
    exports_equal(store, family, {"A": "A", "B": "B"}, tmp_path)

    # The old copies are garbage: gc reclaims them and every pack is then full of live bytes;
    # a dry run says how much, counting the files on disk (a missing pack frees nothing).
    dry, real = store.gc(dry_run=True), store.gc()
    assert dry.freed_bytes == real.freed_bytes and (real.freed_bytes > 0) == (how != "delete")
    assert store.verify().ok
    exports_equal(store, family, {"A": "A", "B": "B"}, tmp_path)
    on_disk = sum(p.stat().st_size for p in (store.home / "objects" / "packs").glob("*.pack"))
    assert on_disk - sum(b[3] for b in blob_rows(store)) < 64 * len(blob_rows(store))
    assert store.gc().freed_bytes == 0


def test_a_new_ref_of_the_same_bytes_heals_without_verify(store, family, tmp_path):
    store.ingest(family["A"], "A")
    damaged = damage(store, "flip")
    r = store.ingest(family["A"], "copy")  # its bytes are read and compared to the stored ones
    assert r.healed_bytes == sum(b[3] for b in blob_rows(store) if b[0] in damaged)
    assert store.verify().ok
    exports_equal(store, family, {"A": "A", "copy": "A"}, tmp_path)


def test_a_damaged_blob_is_healed_once_however_often_a_run_meets_it(store, tmp_path):
    folder = tmp_path / "twice"
    (folder / "unet").mkdir(parents=True)
    from safetensors.torch import save_file

    ones = torch.ones(64, 64)
    save_file({"a": ones, "b": ones.clone()}, folder / "unet" / "diffusion_pytorch_model.safetensors")
    (folder / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    store.ingest(folder, "x")
    payload = max(blob_rows(store), key=lambda b: b[3])
    flip(store, payload, 7)
    r = store.ingest(folder, "y")
    assert r.healed_bytes == payload[3] and r.reused_bytes >= payload[3]  # the second: reused
    assert store.verify().ok


def test_gc_keeps_a_pack_it_cannot_read_and_collects_it_once_healed(store, family, tmp_path):
    store.ingest(family["B"], "B")  # one pack: B's UNet, and the VAE and text encoder A shares
    store.ingest(family["A"], "A")
    shared = set(blobs_of_snapshot(store.db, store.resolve("A")))
    pack = blob_rows(store)[0][1]
    last = max((b for b in blob_rows(store) if b[1] == pack and b[0] in shared), key=lambda b: b[2])
    damaged = truncate(store, pack, last[2] + 1)  # a blob A needs is cut
    assert damaged & shared
    store.rm("B")
    dry = store.gc(dry_run=True)
    report = store.gc()  # the pack is partly dead, but a live blob of it cannot be read
    assert dry.freed_bytes == report.freed_bytes
    assert report.packs_compacted == 0 and pack_path(store, pack).exists()
    assert problem_blobs(store) == damaged & shared
    store.ingest(family["A"], "A")
    assert store.verify().ok
    assert store.gc().packs_compacted == 1 and not pack_path(store, pack).exists()
    assert store.verify().ok and store.gc().freed_bytes == 0
    exports_equal(store, family, {"A": "A"}, tmp_path)


def test_a_damaged_blob_gc_moves_stays_known_as_damaged(store, family):
    store.ingest(family["B"], "B")  # one pack: B's UNet, and the VAE and text encoder A shares
    store.ingest(family["A"], "A")
    shared = set(blobs_of_snapshot(store.db, store.resolve("A")))
    pack = blob_rows(store)[0][1]
    damaged = flip(store, max((b for b in blob_rows(store) if b[1] == pack and b[0] in shared),
                              key=lambda b: b[3]), 100)
    store.rm("B")
    assert problem_blobs(store) == damaged  # recorded
    assert store.gc().packs_compacted == 1  # A's blobs, the damaged one too, copied out
    assert damaged_blob_ids(store.db) == damaged  # the record followed the bytes
    assert store.ingest(family["A"], "A").healed_bytes > 0
    assert store.verify().ok


def test_a_load_never_returns_damaged_weights_when_asked_to_verify(store, family):
    store.ingest(family["A"], "A")
    damage(store, "flip")  # the largest blob of the largest pack: a UNet or VAE weight
    with pytest.raises(CorruptStoreError):
        compstore.DiffusionPipeline.from_pretrained("A", store=store, verify=True)
    store.verify()
    store.ingest(family["A"], "A")
    pipe = compstore.DiffusionPipeline.from_pretrained("A", store=store, verify=True)
    want = load_file(family["A"] / "unet" / "diffusion_pytorch_model.safetensors")
    got = pipe.unet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


@pytest.fixture
def hub(monkeypatch, family):
    hub = HubEmulator()
    for name in "AB":
        hub.add_repo(f"org/{name}", family[name])
    use_hub(monkeypatch, hub)
    yield hub
    hub.close()


def test_pulling_again_downloads_and_heals_the_damaged_files(hub, store, family, tmp_path):
    store.pull("org/A")
    store.pull("org/B")
    damaged = damage(store, "flip")
    hub.reset_counts()
    assert store.pull("org/A").status == "unchanged" and hub.served_bytes == 0  # not yet known
    assert problem_blobs(store) == damaged
    r = store.pull("org/A")
    assert 0 < r.downloaded_bytes == hub.served_bytes < sum(
        p.stat().st_size for p in family["A"].rglob("*") if p.is_file())  # only damaged files
    assert store.verify().ok
    exports_equal(store, family, {"org/A": "A", "org/B": "B"}, tmp_path)


def test_push_refuses_damaged_blobs_and_fetch_heals_them(family, tmp_path):
    remote = (tmp_path / "remote").as_uri()
    n1, n2 = Store(tmp_path / "n1"), Store(tmp_path / "n2")
    n1.remote_add("fleet", remote)
    n2.remote_add("fleet", remote)
    n1.ingest(family["A"], "A")
    n2.ingest(family["A"], "A")
    damage(n2, "flip")
    from conftest import store_state

    before = store_state(n2.home)
    with pytest.raises(CorruptStoreError, match="damaged in this store"):
        n2.push("A")
    assert store_state(n2.home) == before and n2.remote_refs() == {}  # no ref made on the remote
    n1.push("A")
    n2.verify()
    n2.fetch("A", name="A")
    assert n2.verify().ok
    exports_equal(n2, family, {"A": "A"}, tmp_path)


def test_verify_never_waits_for_a_writer_and_then_leaves_the_record_to_the_next(store, family):
    from compstore.store.lock import write_lock

    store.ingest(family["A"], "A")
    damaged = damage(store, "flip")
    with write_lock(store.home):  # as another process ingesting
        r = store.verify()
    assert not r.ok and not r.recorded and damaged_blob_ids(store.db) == set()
    assert store.ingest(family["A"], "A").healed_bytes == 0  # unknown: the stat cache vouches
    assert store.verify().recorded and damaged_blob_ids(store.db) == damaged
    with Store(store.home, read_only=True) as ro:  # reports, and records nothing
        r = ro.verify()
        assert {p["blob"] for p in r.problems} == damaged and not r.recorded
    assert store.ingest(family["A"], "A").healed_bytes > 0 and store.verify().ok


def test_verify_cli_says_how_to_heal(store, family):
    from click.testing import CliRunner

    from compstore.cli.main import cli

    store.ingest(family["A"], "A")
    damage(store, "delete")
    r = CliRunner().invoke(cli, ["--store", str(store.home), "verify"])
    assert r.exit_code == 1 and "pack file missing" in r.output
    assert "ingest or pull their sources again" in r.output
    r = CliRunner().invoke(cli, ["--store", str(store.home), "ingest", str(family["A"]), "--name", "A"])
    assert r.exit_code == 0 and "healed" in r.output, r.output
    assert CliRunner().invoke(cli, ["--store", str(store.home), "verify"]).exit_code == 0


class DamageSequence:
    """Random damage, verifies, heals (same ref after verify, or a new ref), rm, gc,
    exports and verified loads, checked against `self.damaged`: the blob ids whose
    stored bytes are not theirs."""

    def __init__(self, store, family, tmp_path, seed):
        self.store, self.family, self.tmp = store, family, tmp_path
        self.rng = random.Random(seed)
        self.refs: dict[str, str] = {}  # ref -> family member
        self.damaged: set[int] = set()
        self.recorded: set[int] = set()  # what the last verify found, less what healed or went
        self.log: list[str] = []
        self.made = 0
        for name in "ABC":
            self.ingest(name, name)

    def live(self) -> set[int]:
        return {b[0] for b in blob_rows(self.store)}

    def ref_blobs(self, ref: str) -> set[int]:
        return set(blobs_of_snapshot(self.store.db, self.store.resolve(ref)))

    def ingest(self, member: str, ref: str) -> None:
        before = {b[0]: b for b in blob_rows(self.store)}
        r = self.store.ingest(self.family[member], ref)
        self.refs[ref] = member
        # A folder read whole heals every damaged blob of its files; one the stat
        # cache vouches for is read in the files verify recorded damaged.
        healed = {b for b in self.damaged if before[b][1:3] != tuple(
            self.store.db.execute("SELECT pack, offset FROM blobs WHERE id = ?", [b]).fetchone())}
        assert r.healed_bytes == sum(before[b][3] for b in healed)
        assert not (healed - self.ref_blobs(ref))
        self.damaged -= healed
        self.recorded -= healed

    def step_damage(self) -> None:
        rows = blob_rows(self.store)
        how = self.rng.choice(["flip", "flip", "truncate", "delete"])
        packs = sorted({b[1] for b in rows if pack_path(self.store, b[1]).exists()})
        if not packs:
            return
        if how == "flip":
            blob = self.rng.choice([b for b in rows if pack_path(self.store, b[1]).exists()
                                    and b[2] + b[3] <= pack_path(self.store, b[1]).stat().st_size])
            self.damaged |= flip(self.store, blob, self.rng.randrange(blob[3]))
        elif how == "truncate":
            pack = self.rng.choice(packs)
            self.damaged |= truncate(self.store, pack,
                                     self.rng.randrange(pack_path(self.store, pack).stat().st_size))
        else:
            self.damaged |= delete(self.store, self.rng.choice(packs))
        self.log.append(how)

    def step_verify(self) -> None:
        assert problem_blobs(self.store) == self.damaged
        assert damaged_blob_ids(self.store.db) == self.damaged
        self.recorded = set(self.damaged)
        self.log.append("verify")

    def step_heal_same_ref(self, ref: str | None = None) -> None:
        ref = ref or self.rng.choice(sorted(self.refs))
        self.step_verify()
        want = self.damaged & self.ref_blobs(ref)
        self.ingest(self.refs[ref], ref)
        assert not (want & self.damaged), "a same-ref ingest after verify heals all of its damage"
        self.log.append(f"heal {ref}")

    def step_heal_as_recorded(self) -> None:
        """Ingest a ref's folder again with no verify first: what the last verify
        recorded heals (gc may have moved it since), what is newer may not."""
        ref = self.rng.choice(sorted(self.refs))
        want = self.recorded & self.ref_blobs(ref)
        self.ingest(self.refs[ref], ref)
        assert not (want & self.damaged), "the recorded damage of a ref heals"
        self.log.append(f"heal {ref} as recorded")

    def step_ingest_new_ref(self) -> None:
        member = self.rng.choice("ABCD")
        ref = f"r{self.made}"
        self.made += 1
        self.ingest(member, ref)
        assert not (self.damaged & self.ref_blobs(ref)), "a folder read whole heals all of it"
        self.log.append(f"ingest {member} as {ref}")

    def step_rm_gc(self) -> None:
        if len(self.refs) > 1 and self.rng.random() < 0.7:
            ref = self.rng.choice(sorted(self.refs))
            self.store.rm(ref)
            del self.refs[ref]
            self.log.append(f"rm {ref}")
        self.store.gc()
        self.damaged &= self.live()
        self.recorded &= self.live()
        self.log.append("gc")

    def step_export(self) -> None:
        ref = self.rng.choice(sorted(self.refs))
        out = self.tmp / f"out{len(self.log)}"
        if self.damaged & self.ref_blobs(ref):
            with pytest.raises(CorruptStoreError):
                self.store.export(ref, out)
        else:
            self.store.export(ref, out)
            assert tree_sha256(out) == tree_sha256(self.family[self.refs[ref]])
        self.log.append(f"export {ref}")

    def step_load(self) -> None:
        ref = self.rng.choice(sorted(self.refs))
        try:
            pipe = compstore.DiffusionPipeline.from_pretrained(ref, store=self.store, verify=True)
        except CorruptStoreError:
            assert self.damaged & self.ref_blobs(ref)
        else:
            folder = self.family[self.refs[ref]]
            for slot in ("unet", "vae"):
                want = {}
                for f in (folder / slot).glob("diffusion_pytorch_model*.safetensors"):
                    if ".fp16." not in f.name:  # the default weights, however sharded
                        want.update(load_file(f))
                got = getattr(pipe, slot).state_dict()
                assert want and want.keys() <= got.keys()
                assert all(torch.equal(got[k], v) for k, v in want.items()), slot
        self.log.append(f"load {ref}")


@pytest.mark.parametrize("seed", range(3))
def test_random_damage_and_heals_keep_the_store_honest(store, family, tmp_path, seed):
    seq = DamageSequence(store, family, tmp_path, seed)
    steps = [seq.step_damage, seq.step_damage, seq.step_verify, seq.step_heal_same_ref,
             seq.step_heal_as_recorded, seq.step_ingest_new_ref, seq.step_rm_gc, seq.step_export,
             seq.step_load]
    run_random_steps(seq.rng, steps, 30, seq.log, label=f"seed {seed}: ")
    for ref in sorted(seq.refs):  # in the end: heal everything, collect, and all is whole
        seq.step_heal_same_ref(ref)
    seq.store.gc()
    assert seq.store.verify().ok
    exports_equal(seq.store, family, seq.refs, tmp_path)


def test_a_catalog_that_is_not_a_database_is_a_clear_error(store, family):
    from click.testing import CliRunner

    from compstore.cli.main import cli

    store.ingest(family["A"], "A")
    store.close()
    (store.home / "catalog.db").write_bytes(b"not sqlite" * 1000)
    for name in ("catalog.db-wal", "catalog.db-shm"):
        (store.home / name).unlink(missing_ok=True)
    before = sorted((p.name, p.read_bytes()) for p in store.home.iterdir() if p.is_file())
    with pytest.raises(CorruptStoreError, match="catalog .* is damaged .*restore catalog.db from a backup"):
        Store(store.home)
    r = CliRunner().invoke(cli, ["--store", str(store.home), "ls"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "is damaged" in r.stderr
    assert sorted((p.name, p.read_bytes()) for p in store.home.iterdir() if p.is_file()) == before


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_a_store_whose_catalog_was_lost_is_refused_and_its_packs_kept(store, family, how):
    """A catalog.db deleted (or emptied) beside its packs: opening the store made a new,
    empty catalog, and the next `compstore gc` deleted every pack as one the catalog
    never named, saying "freed 0 B" (until 2026-12-07). Now the store is refused
    with what to do, and nothing in it changes."""
    from click.testing import CliRunner

    from compstore.cli.main import cli

    store.ingest(family["A"], "A")
    store.close()
    catalog = store.home / "catalog.db"
    for name in ("catalog.db-wal", "catalog.db-shm"):
        (store.home / name).unlink(missing_ok=True)
    catalog.unlink() if how == "missing" else catalog.write_bytes(b"")
    before = sorted((p.relative_to(store.home), p.read_bytes()) for p in store.home.rglob("*") if p.is_file())
    for read_only in (False, True):
        with pytest.raises(CorruptStoreError, match=f"catalog .* is {how}, but objects/packs holds 1 pack file"):
            Store(store.home, read_only=read_only)
    for args in (["ls"], ["gc"], ["ingest", str(family["B"]), "--name", "B"]):
        r = CliRunner().invoke(cli, ["--store", str(store.home), *args])
        assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "the catalog was lost" in r.stderr, args
    after = sorted((p.relative_to(store.home), p.read_bytes()) for p in store.home.rglob("*") if p.is_file())
    assert after == before


def test_an_empty_catalog_opened_read_only_is_not_a_store(tmp_path):
    """It was SQLite's "attempt to write a readonly database" (a read-only open went on
    to create the tables)."""
    (tmp_path / "catalog.db").write_bytes(b"")
    with pytest.raises(compstore.CompstoreError, match="holds no compstore catalog"):
        Store(tmp_path, read_only=True)
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.db"] and not (tmp_path / "catalog.db").stat().st_size


def test_damaged_catalog_pages_are_named_by_verify_and_a_clear_error_elsewhere(store, family):
    from click.testing import CliRunner

    from compstore.cli.main import cli

    store.ingest(family["A"], "A")
    store.ingest(family["B"], "B")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    path = store.home / "catalog.db"
    data = bytearray(path.read_bytes())
    middle = len(data) // 4096 // 2 * 4096  # a page of rows, far from the schema's
    data[middle:middle + 4096] = random.Random(0).randbytes(4096)
    path.write_bytes(bytes(data))
    with Store(store.home) as s:  # opens: the schema page is whole
        r = s.verify()
        assert not r.ok and r.catalog_problems and not r.recorded
    r = CliRunner().invoke(cli, ["--store", str(store.home), "verify"])
    assert r.exit_code == 1 and "catalog.db:" in r.output and "catalog is damaged" in r.stderr
    for args in (["ls"], ["du"], ["export", "A", str(store.home.parent / "out")],
                 ["ingest", str(family["C"]), "--name", "C"], ["gc"]):
        r = CliRunner().invoke(cli, ["--store", str(store.home), *args])
        assert r.exit_code == 0 or (r.exit_code == 1 and "catalog is damaged" in r.stderr
                                    and r.stderr.count("\n") == 1), (args, r.output)


@pytest.mark.parametrize("how", ["edit", "delete", "add"])
def test_a_skeleton_changed_on_disk_is_rebuilt_not_trusted(family_store, how):
    """The configs and tokenizer files a load reads come from `skeletons/<snapshot>/`,
    built once. An edited scheduler config was loaded as it stood (1000 train steps
    became 7), a removed tokenizer file failed the load."""
    import json

    pipe = compstore.DiffusionPipeline.from_pretrained("A", store=family_store)
    skeleton = family_store.home / "skeletons" / family_store.resolve("A")
    config = skeleton / "scheduler" / "scheduler_config.json"
    if how == "edit":
        config.write_text(json.dumps({**json.loads(config.read_text()), "num_train_timesteps": 7}))
    elif how == "delete":
        next((skeleton / "tokenizer").iterdir()).unlink()
    else:
        (skeleton / "unet" / "stray.json").write_text("{}")
    again = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, private=True)
    assert dict(again.scheduler.config) == dict(pipe.scheduler.config)
    assert again.tokenizer("a cat").input_ids == pipe.tokenizer("a cat").input_ids
    assert not (skeleton / "unet" / "stray.json").exists()
    assert family_store.gc().freed_bytes == 0 and [p.name for p in skeleton.parent.iterdir()] == [skeleton.name]


def test_a_verified_load_keeps_the_bytes_it_checked_though_the_pack_changes_after(store, family, monkeypatch):
    """verify=True hashed the mapped bytes, then built the tensors on the same mapping,
    which shows the file as it is now: a byte that went bad in between reached the
    model unseen. (Found by processes loading while another flipped pack bytes: 12
    of 855 verified loads in 90 s had other weights than the source's.)"""
    import compstore.loader.component as component

    store.ingest(family["A"], "A")
    checked = component.check_tensors

    def check_then_damage(packs, locations, what):
        checked(packs, locations, what)
        loc = max(locations, key=lambda loc: loc.size)
        with open(pack_path(store, loc.pack), "r+b") as f:  # the disk goes bad now
            f.seek(loc.offset)
            b = f.read(1)
            f.seek(loc.offset)
            f.write(bytes([b[0] ^ 0xFF]))

    monkeypatch.setattr(component, "check_tensors", check_then_damage)
    pipe = compstore.DiffusionPipeline.from_pretrained("A", store=store, verify=True)
    for slot in ("unet", "vae"):
        want = load_file(family["A"] / slot / "diffusion_pytorch_model.safetensors")
        got = getattr(pipe, slot).state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items()), slot
    assert not store.verify().ok  # the pack did go bad: verify says so


@pytest.mark.parametrize("how", ["lost", "damaged"])
def test_a_catalog_backup_brings_back_a_lost_or_damaged_catalog(store, family, tmp_path, how):
    """`compstore backup-catalog` then `restore-catalog`: the store loads and exports
    what it held at the backup, and what was ingested since is named as such."""
    import json

    from click.testing import CliRunner

    from compstore.cli.main import cli

    store.ingest(family["A"], "A")
    run = lambda *args: CliRunner().invoke(cli, ["--store", str(store.home), *args, "--json"])
    r = run("backup-catalog", str(tmp_path / "catalog.bak"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout).keys() == {"path", "bytes", "refs", "seconds"} and json.loads(r.stdout)["refs"] == 1
    catalog, wal = store.home / "catalog.db", store.home / "catalog.db-wal"
    reader = sqlite3.connect(catalog)  # keeps the -wal from being checkpointed away at close
    reader.execute("SELECT count(*) FROM refs").fetchone()
    store.ingest(family["B"], "B")  # after the backup
    store.close()
    stale = wal.read_bytes()  # B's commits, as a killed process leaves them
    reader.close()
    assert stale and not wal.exists()
    if how == "lost":  # with the -wal a killed process left: a restore must not let
        catalog.unlink()  # SQLite replay it into the backup
        wal.write_bytes(stale)
    else:  # (with that -wal, SQLite would replay it over the damage: here it held every page)
        catalog.write_bytes(b"not sqlite" * 1000)
    with pytest.raises(CorruptStoreError, match="compstore restore-catalog BACKUP"):
        Store(store.home)
    r = run("restore-catalog", str(tmp_path / "catalog.bak"))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc.keys() == {"home", "refs", "missing_packs", "unnamed_packs", "seconds"}
    assert (doc["refs"], doc["missing_packs"]) == (1, 0) and doc["unnamed_packs"] >= 1  # B's new bytes
    with Store(store.home) as s:
        assert s.ref_names() == ["A"] and s.verify().ok
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        s.export("A", tmp_path / "A")
        assert s.gc().packs_removed == doc["unnamed_packs"]
        s.ingest(family["B"], "B")
        assert s.verify().ok
    assert tree_sha256(tmp_path / "A") == tree_sha256(family["A"])


def test_a_restore_names_the_packs_a_gc_removed_since_the_backup(store, family, tmp_path):
    from compstore import restore_catalog

    store.ingest(family["A"], "A")
    store.ingest(family["B"], "B")
    backup = store.backup_catalog(tmp_path / "catalog.bak")
    assert backup.refs == 2 and backup.bytes == (tmp_path / "catalog.bak").stat().st_size
    store.rm("B")
    store.gc()
    store.close()
    r = restore_catalog(tmp_path / "catalog.bak", store.home, force=True)  # over a whole catalog
    assert r.missing_packs >= 1 and r.unnamed_packs == 0
    with Store(store.home) as s:
        report = s.verify()
        assert not report.ok and {ref for p in report.problems for ref in p["refs"]} == {"B"}


def test_a_store_kept_open_through_a_restore_follows_the_restored_catalog(store, family, tmp_path):
    """An inference service keeps its `Store` open while an operator restores the
    catalog from another process. Its next reads see the restored refs, and what it
    ingests goes into the restored catalog: before, its connection went on with the
    replaced file, its ingest was recorded there and lost, and the next writer
    elsewhere removed the ingest's packs as ones no catalog named."""
    from compstore import RefNotFoundError, restore_catalog

    store.ingest(family["A"], "A")
    store.backup_catalog(tmp_path / "catalog.bak")
    store.ingest(family["C"], "C")  # after the backup: gone with the restore
    # (another process, as far as `store` knows: the function opens the catalog itself)
    restore_catalog(tmp_path / "catalog.bak", store.home, force=True)
    assert store.backup_catalog(tmp_path / "again.bak").refs == 1  # a backup is of the restored catalog
    assert store.ref_names() == ["A"]  # a lookup follows it too
    with pytest.raises(RefNotFoundError):
        store.resolve("C")
    assert [r["name"] for r in store.ls()] == ["A"]
    store.ingest(family["B"], "B")  # a writer follows it too
    with Store(store.home) as other:  # another process
        assert other.ref_names() == ["A", "B"]
        other.gc()  # (C's packs, named by no catalog now, went with B's ingest: a writer's leftovers)
        assert other.verify().ok
        other.export("B", tmp_path / "B")
    assert tree_sha256(tmp_path / "B") == tree_sha256(family["B"])
    pipe = compstore.DiffusionPipeline.from_pretrained("B", store=store)  # the loader, through `reading()`
    want = load_file(family["B"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in want.items())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_a_store_opens_its_catalog_once_unless_it_was_restored(family, tmp_path):
    """Following a restored catalog reopens it only when the file was replaced: a new
    store's first operations do not take the catalog it just made for another one."""
    import os

    def opened(store):  # catalog.db opened by this process
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str((store.home / "catalog.db").resolve()))

    with Store(tmp_path / "new") as store:
        store.ingest(family["A"], "A")
        store.ls()
        assert opened(store) == 1
        store.backup_catalog(tmp_path / "catalog.bak")
        compstore.restore_catalog(tmp_path / "catalog.bak", store.home, force=True)
        assert store.ref_names() == ["A"]
        assert opened(store) == 1  # the restored file (the replaced one is not catalog.db now)


def test_bad_catalog_backups_and_restores_are_clear_errors_and_change_nothing(store, family, tmp_path):
    from compstore import CompstoreError, restore_catalog
    from conftest import store_state

    store.ingest(family["A"], "A")
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(CompstoreError, match="exists: back up to a new file"):
        store.backup_catalog(tmp_path / "taken")
    with pytest.raises(CompstoreError, match="is not a folder"):
        store.backup_catalog(tmp_path / "no-such-folder" / "catalog.bak")
    with pytest.raises(CompstoreError, match="inside the store folder"):
        store.backup_catalog(store.home / "tmp" / "catalog.bak")
    assert not (store.home / "tmp" / "catalog.bak").exists()
    assert (tmp_path / "taken").read_text() == "mine"
    damaged = tmp_path / "damaged.bak"
    store.backup_catalog(damaged)
    store.backup_catalog(tmp_path / "whole.bak")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)
    damaged.write_bytes(bytes(data))
    before = store_state(store.home)
    for backup, problem in [(tmp_path / "whole.bak", "catalog of .* is whole .*pass --force"),
                            (tmp_path / "missing.bak", "no such file"), (tmp_path / "taken", "not a compstore catalog"),
                            (family["A"] / "model_index.json", "not a compstore catalog"),
                            (damaged, "damaged|not a compstore catalog")]:
        with pytest.raises(CompstoreError, match=problem):
            restore_catalog(backup, store.home)
        assert store_state(store.home) == before, backup
    with pytest.raises(CompstoreError, match="not a compstore store"):
        restore_catalog(tmp_path / "whole.bak", tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_a_catalog_backup_or_restore_that_cannot_write_is_a_clear_error_and_changes_nothing(store, family,
                                                                                             tmp_path):
    """Files capped at 64 KiB (RLIMIT_FSIZE, in a child process) stand for a full disk."""
    import subprocess
    import sys

    from conftest import store_state

    store.ingest(family["A"], "A")
    store.backup_catalog(tmp_path / "catalog.bak")
    store.close()
    before = store_state(store.home)
    code = f"""
import resource, signal
from compstore import CompstoreError, Store, restore_catalog
s = Store({str(store.home)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
for write in (lambda: s.backup_catalog({str(tmp_path / "out" / "catalog.bak")!r}),
              lambda: restore_catalog({str(tmp_path / "catalog.bak")!r}, {str(store.home)!r}, force=True)):
    try:
        write()
    except CompstoreError as e:
        print("refused:", e)
"""
    (tmp_path / "out").mkdir()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stdout + r.stderr
    assert all(line.startswith("refused: could not write") and "nothing was changed" in line for line in lines)
    assert list((tmp_path / "out").iterdir()) == [] and store_state(store.home) == before


def test_a_catalog_backup_on_a_full_disk_is_a_disk_full_error(store, family, tmp_path, monkeypatch):
    import errno

    from compstore import DiskFullError
    from compstore.store import catalog_backup

    store.ingest(family["A"], "A")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(catalog_backup.os, "fsync", full)
    with pytest.raises(DiskFullError, match="disk full while writing .*catalog.bak: free space and retry"):
        store.backup_catalog(tmp_path / "catalog.bak")
    assert list(tmp_path.glob("*catalog.bak*")) == []
