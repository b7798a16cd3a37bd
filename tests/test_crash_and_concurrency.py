"""Crash safety (SIGKILL at random moments) and two writers at once."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from compstore import Store, StoreBusyError
from compstore.store.lock import write_lock
from conftest import collect_beside, store_state, tree_sha256


@pytest.fixture(scope="module")
def big_component(tmp_path_factory) -> Path:
    """A component folder of ~96 MB in 3 files: slow enough to be killed mid-way."""
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    for i in range(3):
        tensors = {f"block{i}.layer{j}.weight": rng.standard_normal((1024, 1024), dtype=np.float32)
                   for j in range(8)}
        save_file(tensors, str(folder / f"model-{i}.safetensors"))
    (folder / "config.json").write_text('{"_class_name": "Big"}')
    return folder


def ingest_cmd(home: Path, folder: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "compstore", "--store", str(home), "ingest", str(folder),
            "--name", name, "--json"]


def test_sigkill_at_random_moments_leaves_a_valid_store(big_component, tmp_path):
    home = tmp_path / "store"
    Store(home).close()
    t0 = time.perf_counter()
    subprocess.run(ingest_cmd(tmp_path / "probe", big_component, "x"), check=True,
                   capture_output=True)
    full = time.perf_counter() - t0
    rng = random.Random(1)
    kills = 0
    for i in range(24):  # until 5 kills: on a loaded machine some runs finish first
        if kills >= 5:
            break
        p = subprocess.Popen(ingest_cmd(home, big_component, f"r{i}"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, full))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        with Store(home) as s:
            report = s.verify()
            assert report.ok, report.problems
            for ref in s.ls():  # whatever a ref names is complete and exports
                out = tmp_path / f"out-{i}-{ref['name']}"
                s.export(ref["name"], out)
                assert tree_sha256(out) == tree_sha256(big_component)
                s.rm(ref["name"])  # so that the next ingest writes new content again
            s.gc()
    assert kills >= 3, "the test did not manage to kill ingests mid-way"
    with Store(home) as s:
        r = s.ingest(big_component, "final")
        assert r.status in ("new", "unchanged")
        assert list((home / "tmp").iterdir()) == []
        packs = {p.stem for p in (home / "objects" / "packs").glob("*.pack")}
        assert packs == {row[0] for row in s.db.execute("SELECT name FROM packs")}
        assert s.verify().ok


def test_two_processes_ingesting_the_same_folder_store_one_copy(big_component, tmp_path):
    home = tmp_path / "store"
    Store(home).close()
    procs = [subprocess.Popen(ingest_cmd(home, big_component, f"p{i}"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with Store(home) as s:
        payload = sum(f.stat().st_size for f in big_component.glob("*.safetensors"))
        du = s.du()
        assert du.physical_bytes < 1.01 * payload
        assert {r["name"] for r in du.refs} == {"p0", "p1"}


def test_many_openers_of_a_new_store_all_get_it(tmp_path):
    """Workers of a service starting at once on a fresh machine open the same new
    store: one makes the catalog, the others wait for it (each thread has its own
    SQLite connection and lock file descriptor, as a process would). Unlocked, most
    of them failed with 'database is locked' or 'table already exists'."""
    import threading

    for round in range(5):
        home = tmp_path / f"store{round}"
        start, errors = threading.Barrier(8), []

        def open_it():
            start.wait()
            try:
                Store(home).close()
            except Exception as e:  # reported by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with Store(home) as s:
            assert s.db.journal_mode == "wal" and s.ls() == [] and s.verify().ok


def test_busy_store_waits_then_fails_clearly(family, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPSTORE_LOCK_TIMEOUT", "0.3")
    with Store(tmp_path / "s") as s, write_lock(s.home):
        before = store_state(s.home)
        with pytest.raises(StoreBusyError, match="another compstore process is writing"):
            s.ingest(family["A"], "A")
        assert s.ls() == [] and store_state(s.home) == before


def test_a_writer_clears_dead_scratch_folders_and_keeps_live_ones(family, tmp_path):
    # A push writes its packs in a locked scratch folder under tmp/, holding no write
    # lock: an ingest starting meanwhile must leave it, and clear one a killed push left.
    from compstore.store.lock import scratch_folder

    with Store(tmp_path / "s") as s:
        dead = s.home / "tmp" / "push-killed"
        (dead / "pack").parent.mkdir()
        (dead / "pack").write_bytes(b"half a pack")
        with scratch_folder(s.home, "push-") as live:
            (live / "pack").write_bytes(b"a pack being written")
            s.ingest(family["A"], "A")  # a writer: clears tmp/ first
            assert (live / "pack").read_bytes() == b"a pack being written"
            assert not dead.exists()
        assert not live.exists()
        assert list((s.home / "tmp").iterdir()) == []


def test_ingest_closes_each_mapping_though_the_hash_worker_lets_go_late(tmp_path, monkeypatch):
    """A ThreadPoolExecutor worker sets a call's result, then drops its arguments: a
    memoryview of the file passed to the sha256 call was still exported when the
    ingest closed the mapping (BufferError, seen under Python 3.12). Here every
    worker holds its arguments a while after the result."""
    import threading
    from concurrent.futures import Executor, Future

    from compstore.store import ingest

    class LateToLetGo(Executor):
        def __init__(self, *args, **kwargs):
            self.threads = []

        def submit(self, fn, *args):
            future = Future()

            def run(args=args):
                future.set_result(fn(*args))
                time.sleep(0.3)  # `args` still referenced

            self.threads.append(threading.Thread(target=run))
            self.threads[-1].start()
            return future

        def shutdown(self, wait=True, **kwargs):
            for t in self.threads:
                t.join()

    monkeypatch.setattr(ingest, "ThreadPoolExecutor", LateToLetGo)
    folder = tmp_path / "comp"
    folder.mkdir()
    save_file({"w": np.arange(64, dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"_class_name": "Tiny"}')
    store = Store(tmp_path / "store")
    try:
        store.ingest(folder, "tiny")
        assert store.has_ref("tiny") and store.verify().ok
    finally:
        store.close()


def test_a_load_that_gc_overtakes_is_a_clear_error(family_store, monkeypatch):
    """A ref removed and collected between a load's lookup of its name and its reads
    of the catalog: the load raises RefNotFoundError (three processes loading, rm-ing
    and collecting at once saw a KeyError from inside the template clone)."""
    import compstore
    from compstore import RefNotFoundError
    from compstore.loader import pipeline

    compstore.DiffusionPipeline.from_pretrained("A", store=family_store)  # a template for A's models
    real = pipeline.resolve_snapshot

    def resolved_then_collected(store, label, **kwargs):
        found = real(store, label, **kwargs)
        store.rm("A"), store.rm("D")  # D holds A's content too
        store.gc()
        return found

    monkeypatch.setattr(pipeline, "resolve_snapshot", resolved_then_collected)
    with pytest.raises(RefNotFoundError, match="no ref named 'A'"):
        compstore.DiffusionPipeline.from_pretrained("A", store=family_store)


def test_gc_deletes_no_row_while_a_load_reads(family_store):
    """gc waits for readers before its catalog transaction, not only before it unlinks
    packs: a load in progress finds every row of the snapshot it resolved."""
    snapshot = family_store.resolve("B")
    with family_store.reading():  # what a load holds from its first catalog read to its end
        done = collect_beside(family_store, ["B"], wait_s=1.0)
        assert not done.is_set()
        unet = next(c for c in family_store.components_of(snapshot) if c["slot"] == "unet")
        assert family_store.has_snapshot(snapshot) and family_store.tensor_locations(unet["component_id"])
    assert done.wait(60) and not family_store.has_snapshot(snapshot)
