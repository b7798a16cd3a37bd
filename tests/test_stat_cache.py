"""The stat cache: a folder ingested before, unchanged since, is not read again."""

from __future__ import annotations

import hashlib
import os
import time

import compstore
from compstore.store import stat_cache
from compstore.store.ingest import Ingestor
from compstore.store.scan import scan_folder

from conftest import same_state


def settle() -> None:
    """Wait until the files just written have settled timestamps (stat_cache.SETTLED_NS)."""
    time.sleep(stat_cache.SETTLED_NS / 1e9 + 0.05)


def forbid_reads(monkeypatch) -> None:
    """From here on, an ingest that reads a file fails the test."""
    def read(self, f, sha256=None):
        raise AssertionError(f"{f.path} was read")
    monkeypatch.setattr(Ingestor, "ingest_file", read)


def record_reads(monkeypatch) -> list[str]:
    """From here on, the paths an ingest reads, in order."""
    reads, real = [], Ingestor.ingest_file

    def read(self, f, sha256=None):
        reads.append(f.path)
        return real(self, f, sha256)
    monkeypatch.setattr(Ingestor, "ingest_file", read)
    return reads


def result(r) -> dict:
    return {k: v for k, v in r.to_dict().items() if k != "seconds"}


def test_an_unchanged_folder_is_not_read_again(store, pipeline_copy, monkeypatch):
    folder = pipeline_copy("A")
    settle()
    assert store.ingest(folder, "A").status == "new"
    store.db.execute("DELETE FROM stat_cache")  # what an ingest that reads reports ...
    read = store.ingest(folder, "A")
    assert read.status == "unchanged"
    forbid_reads(monkeypatch)
    again = store.ingest(folder, "A")  # ... and one that reads nothing
    assert result(again) == result(read)


def test_a_file_rewritten_under_its_old_size_and_mtime_is_read(store, pipeline_copy):
    folder = pipeline_copy("A")
    settle()
    first = store.ingest(folder, "A")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    st = os.stat(weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or `rsync -t` leave it
    settle()  # so the stamp, not the recent change, says it changed
    assert stat_cache.stamp(scan_folder(folder), time.time_ns()).whole is not None
    again = store.ingest(folder, "A")
    assert again.status == "updated" and again.snapshot != first.snapshot
    out = folder.parent / "out"
    store.export("A", out)
    assert hashlib.sha256((out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
                          ).hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_folder_changed_just_before_its_ingest_is_read_next_time(store, pipeline_copy, monkeypatch):
    folder = pipeline_copy("A")
    (folder / "README.md").write_text("just written")
    with monkeypatch.context() as m:
        m.setattr(stat_cache, "SETTLED_NS", 60 * 10**9)  # "just", however slow this machine is today
        store.ingest(folder, "A")
    assert store.db.execute("SELECT count(*) FROM stat_cache").fetchone()[0] == 0
    reads = record_reads(monkeypatch)
    settle()
    assert store.ingest(folder, "A").status == "unchanged" and "README.md" in reads
    reads.clear()
    assert store.ingest(folder, "A").status == "unchanged" and reads == []  # settled: stamped


def test_a_file_just_changed_gets_no_digest_and_the_others_do(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    time.sleep(stat_cache.SETTLED_NS / 1e9 * 2)
    (tmp_path / "README.md").write_text("just written")
    scan = scan_folder(tmp_path)
    started = os.stat(tmp_path / "README.md").st_ctime_ns + 1  # the ingest starts right after
    folder = stat_cache.stamp(scan, started)
    assert folder.whole is None and sorted(folder.files) == ["config.json", "tokenizer.json"]


def test_whole_second_timestamps_must_be_older(tmp_path, monkeypatch):
    """Filesystems that keep whole seconds (FAT: 2 s) tick too slowly for SETTLED_NS."""
    (tmp_path / "config.json").write_text("{}")
    scan = scan_folder(tmp_path)
    real = os.stat(tmp_path / "config.json")
    now = time.time_ns()

    def changed_at(ns: int):
        fields = list(real)
        fields[8] = fields[9] = ns // 10**9  # st_mtime, st_ctime (seconds)
        st = os.stat_result(fields, {"st_mtime_ns": ns, "st_ctime_ns": ns})
        monkeypatch.setattr(stat_cache.os, "stat", lambda path: st)

    def stamped() -> bool:
        folder = stat_cache.stamp(scan, now)
        assert (folder.whole is None) == (folder.files == {})  # one file: both or neither
        return folder.whole is not None

    changed_at((now // 10**9 - 1) * 10**9)  # one whole second ago: not settled
    assert not stamped()
    changed_at((now // 10**9 - 5) * 10**9)
    assert stamped()
    changed_at(now - 10**9 + 1)  # a second ago, in ns: settled
    assert stamped()


def test_a_ref_moved_elsewhere_or_removed_reads_the_folder_again(store, family, pipeline_copy,
                                                                  monkeypatch):
    folder = pipeline_copy("A")
    settle()
    a = store.ingest(folder, "A")
    b = store.ingest(family["B"], "B")
    store.tag("A", b.snapshot, force=True)

    def stamped() -> tuple[int, int]:
        return tuple(store.db.execute(f"SELECT count(*) FROM {table} WHERE ref = 'A'").fetchone()[0]
                     for table in ("stat_cache", "stat_cache_files"))

    assert stamped()[1] > 0
    store.gc()  # A's first snapshot is dead, and its stamps with it
    assert stamped() == (0, 0)
    assert store.ingest(folder, "A").status == "updated" and store.resolve("A") == a.snapshot
    store.rm("A")
    assert stamped() == (0, 0)
    assert store.ingest(folder, "A").status == "new"


def test_loading_a_folder_twice_reads_it_once(store, pipeline_copy, monkeypatch):
    folder = pipeline_copy("A")
    settle()
    first = compstore.DiffusionPipeline.from_pretrained(folder, store=store)
    forbid_reads(monkeypatch)
    again = compstore.DiffusionPipeline.from_pretrained(folder, store=store)
    for slot in ("unet", "vae", "text_encoder"):
        same_state(getattr(first, slot), getattr(again, slot))


def test_a_folder_changed_in_part_reads_only_the_files_that_changed(store, family, pipeline_copy,
                                                                   monkeypatch):
    """`unet.save_pretrained("./my-pipe/unet")`: the next load of the folder reads the
    UNet's files, not the VAE's and text encoder's, and ingests what a full read does."""
    import shutil

    folder = pipeline_copy("A")
    settle()
    store.ingest(folder, "A")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):  # B's UNet, a fine-tune
        shutil.copyfile(family["B"] / "unet" / name, folder / "unet" / name)
    settle()
    reads = record_reads(monkeypatch)
    again = store.ingest(folder, "A")
    assert sorted(reads) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert again.status == "updated"
    monkeypatch.undo()
    store.db.execute("DELETE FROM stat_cache_files")
    full = store.ingest(folder, "A-read-whole")  # the same folder, every file read
    moved = ("ref", "status", "written_bytes", "reused_bytes")  # B's UNet was new, then held
    assert {k: v for k, v in result(again).items() if k not in moved} == \
        {k: v for k, v in result(full).items() if k not in moved}
    assert again.written_bytes + again.reused_bytes == full.written_bytes + full.reused_bytes
    out = folder.parent / "out"
    store.export("A", out)
    for f in folder.rglob("*"):
        if f.is_file():
            assert (out / f.relative_to(folder)).read_bytes() == f.read_bytes(), f


def test_a_file_whose_recorded_content_the_store_lost_is_read(store, pipeline_copy, monkeypatch):
    """A row that outlived its file (an older compstore's gc leaves them): the file is
    read, not taken for content the store no longer holds."""
    folder = pipeline_copy("A")
    settle()
    first = store.ingest(folder, "A")
    store.db.execute("DELETE FROM stat_cache")  # the folder stamp: or nothing is read at all
    store.db.execute("UPDATE stat_cache_files SET sha256 = ? WHERE path LIKE 'vae/%'", ["0" * 64])
    reads = record_reads(monkeypatch)
    again = store.ingest(folder, "A")
    assert sorted(reads) == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert again.status == "unchanged" and again.snapshot == first.snapshot


def test_a_stored_file_that_lists_other_tensors_is_not_taken(store, family):
    """reuse_file takes a stored file only where its tensors are those the scanned
    header lists (the scan's components were built from the header)."""
    import dataclasses

    from compstore.store.objects import PackWriter

    store.ingest(family["A"], "A")
    scan = scan_folder(family["A"])
    unet, vae = (scan.files[f"{s}/diffusion_pytorch_model.safetensors"] for s in ("unet", "vae"))
    (sha256,) = store.db.execute("SELECT f.sha256 FROM snapshot_files s JOIN files f ON f.id = s.file_id "
                                 "WHERE s.path = ?", [unet.path]).fetchone()
    with Ingestor(store.db, store.packs, PackWriter(store.home)) as ing:
        assert not ing.reuse_file(dataclasses.replace(unet, header=vae.header), sha256)
        assert not ing.reuse_file(unet, "0" * 64)
        assert ing.files == {} and ing.stats.files == 0
        assert ing.reuse_file(unet, sha256) and ing.files[unet.path].tensor_keys


def test_a_store_an_older_compstore_made_gains_the_tables(tmp_path, pipeline_copy, monkeypatch):
    """Stores made before the stat cache (or before its per-file rows) get its tables
    when opened for writing, and their refs' folders are read once more."""
    folder = pipeline_copy("A")
    settle()
    with compstore.Store(tmp_path / "store") as store:
        first = store.ingest(folder, "A")
        for table in ("stat_cache", "stat_cache_files"):
            store.db[table].drop()
    with compstore.Store(tmp_path / "store") as store:
        reads = record_reads(monkeypatch)
        assert store.ingest(folder, "A").snapshot == first.snapshot and len(reads) == first.files
        reads.clear()
        assert store.ingest(folder, "A").status == "unchanged" and reads == []
