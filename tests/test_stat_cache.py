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
    assert stat_cache.stamp(scan_folder(folder), time.time_ns()) is not None
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
    reads, real = [], Ingestor.ingest_file

    def read(self, f, sha256=None):
        reads.append(f.path)
        return real(self, f, sha256)
    monkeypatch.setattr(Ingestor, "ingest_file", read)
    settle()
    assert store.ingest(folder, "A").status == "unchanged" and "README.md" in reads
    reads.clear()
    assert store.ingest(folder, "A").status == "unchanged" and reads == []  # settled: stamped


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

    changed_at((now // 10**9 - 1) * 10**9)  # one whole second ago: not settled
    assert stat_cache.stamp(scan, now) is None
    changed_at((now // 10**9 - 5) * 10**9)
    assert stat_cache.stamp(scan, now) is not None
    changed_at(now - 10**9 + 1)  # a second ago, in ns: settled
    assert stat_cache.stamp(scan, now) is not None


def test_a_ref_moved_elsewhere_or_removed_reads_the_folder_again(store, family, pipeline_copy,
                                                                  monkeypatch):
    folder = pipeline_copy("A")
    settle()
    a = store.ingest(folder, "A")
    b = store.ingest(family["B"], "B")
    store.tag("A", b.snapshot)
    stamped = "SELECT count(*) FROM stat_cache WHERE ref = 'A'"
    store.gc()  # A's first snapshot is dead, and its stamp with it
    assert store.db.execute(stamped).fetchone()[0] == 0
    assert store.ingest(folder, "A").status == "updated" and store.resolve("A") == a.snapshot
    store.rm("A")
    assert store.db.execute(stamped).fetchone()[0] == 0
    assert store.ingest(folder, "A").status == "new"


def test_loading_a_folder_twice_reads_it_once(store, pipeline_copy, monkeypatch):
    folder = pipeline_copy("A")
    settle()
    first = compstore.DiffusionPipeline.from_pretrained(folder, store=store)
    forbid_reads(monkeypatch)
    again = compstore.DiffusionPipeline.from_pretrained(folder, store=store)
    for slot in ("unet", "vae", "text_encoder"):
        same_state(getattr(first, slot), getattr(again, slot))
