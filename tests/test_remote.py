"""Remote stores: push/fetch move only what the other side lacks; gc; crashes; bad input.

Two "nodes" are two local stores; the remote is a real S3-compatible server (moto)
on 127.0.0.1, counted on the server side, or a `file://` folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from compstore import Store
from compstore.cli.main import cli
from compstore.store.remote import Remote, RemoteBusyError, RemoteError
from compstore.store.remote_sync import _closure, document_blob_keys, snapshot_document
from conftest import collect_beside, store_state, tree_sha256
from test_modular import repos  # noqa: F401  (a module fixture: modular repos with pins)


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto")
    from s3_server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3.endpoint}.items():
        monkeypatch.setenv(k, v)
    return s3


@pytest.fixture
def s3_url(s3_env):
    """A fresh bucket on the server; the remote lives under a prefix in it."""
    bucket = f"b{uuid.uuid4().hex[:12]}"
    Remote(f"s3://{bucket}").fs.mkdir(bucket)
    s3_env.reset_counts()
    return f"s3://{bucket}/fleet"


def node(tmp_path: Path, name: str, url: str) -> Store:
    s = Store(tmp_path / name)
    s.remote_add("fleet", url)
    return s


def blobs(store: Store, ref: str) -> dict[str, int]:
    """Blob key -> size of everything a ref reaches, read from the catalog."""
    docs = _closure(store.resolve(ref), lambda s: snapshot_document(store, s))
    keys = set().union(*(document_blob_keys(d) for d in docs.values()))
    return {k: int(k.split(":")[1]) for k in keys}


def lacking(want: dict[str, int], have: dict[str, int]) -> int:
    return sum(size for k, size in want.items() if k not in have)


def test_two_nodes_share_an_s3_remote_moving_only_what_is_lacking(family, tmp_path, s3_url, s3_env):
    n1, n2 = node(tmp_path, "n1", s3_url), node(tmp_path, "n2", s3_url)
    for name in "AB":
        n1.ingest(family[name], name)
    n2.ingest(family["A"], "A")  # node 2 already has the base

    r = n1.push("A")
    assert r.status == "new" and r.uploaded_bytes == sum(blobs(n1, "A").values())
    assert s3_env.received["packs"] == r.uploaded_bytes  # what the server got, counted there
    s3_env.reset_counts()
    r = n1.push("B")
    expect = lacking(blobs(n1, "B"), blobs(n1, "A"))  # B's blobs the remote lacked
    assert 0 < expect < sum(blobs(n1, "B").values())
    assert r.uploaded_bytes == s3_env.received["packs"] == expect
    assert r.present_bytes == sum(blobs(n1, "B").values()) - expect

    s3_env.reset_counts()
    f = n2.fetch("B")
    expect = lacking(blobs(n1, "B"), blobs(n2, "A"))  # B's blobs node 2 lacked
    assert f.status == "new" and f.downloaded_bytes == expect
    assert s3_env.sent["packs"] == expect  # served by the remote: exactly the lacking bytes
    n2.export("B", tmp_path / "B-n2")
    assert tree_sha256(tmp_path / "B-n2") == tree_sha256(family["B"])
    assert n2.verify().ok

    assert n2.fetch("B").status == "unchanged"
    assert n1.push("B").uploaded_bytes == 0
    assert n2.remote_refs() == {"A": n1.resolve("A"), "B": n1.resolve("B")}


def test_file_remote_round_trip_and_loads(family, tmp_path):
    import compstore

    n1, n2 = node(tmp_path, "n1", (tmp_path / "remote").as_uri()), node(tmp_path, "n2", str(tmp_path / "remote"))
    n1.ingest(family["C"], "C")
    n1.push("C", as_ref="team/c-v1")
    n2.fetch("team/c-v1", name="C")
    n2.export("C", tmp_path / "C")
    assert tree_sha256(tmp_path / "C") == tree_sha256(family["C"])
    pipe = compstore.DiffusionPipeline.from_pretrained("C", store=n2)
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_modular_pins_travel_with_their_targets(repos, tmp_path):
    """A modular ref reaches other snapshots through its pins: they are pushed and
    fetched with it, and it loads on the other node."""
    import torch

    import compstore

    url = (tmp_path / "remote").as_uri()
    n1, n2 = node(tmp_path, "n1", url), node(tmp_path, "n2", url)
    n1.ingest(repos / "remix", "remix")
    n1.push("remix")
    assert len(list((tmp_path / "remote" / "snapshots").iterdir())) == 2  # remix + pinned base
    n2.fetch("remix")
    assert [r["name"] for r in n2.ls()] == ["remix"]  # the base comes as a pin, not a ref
    for s, dest in ((n1, tmp_path / "flat1"), (n2, tmp_path / "flat2")):
        s.export("remix", dest, flatten=True)
    assert flat_tree(tmp_path / "flat1") == flat_tree(tmp_path / "flat2")
    pipe = compstore.ModularPipeline.from_pretrained("remix", store=n2)
    pipe.load_components(torch_dtype=torch.float32)
    theirs = compstore.ModularPipeline.from_pretrained("remix", store=n1)
    theirs.load_components(torch_dtype=torch.float32)
    for slot in ("unet", "vae", "text_encoder_2"):
        a, b = getattr(pipe, slot).state_dict(), getattr(theirs, slot).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    n2.gc()  # the pinned base survives a local gc: the pin keeps it
    n2.export("remix", tmp_path / "flat3", flatten=True)
    assert flat_tree(tmp_path / "flat3") == flat_tree(tmp_path / "flat1")


def flat_tree(folder: Path) -> tuple:
    """A flattened export's files; its index names its own folder, so compare it without."""
    index = (folder / "modular_model_index.json").read_text().replace(str(folder), "<dest>")
    files = {k: v for k, v in tree_sha256(folder).items() if k != "modular_model_index.json"}
    return files, index


@pytest.fixture
def pushed(family, tmp_path):
    """Node 1 has A and B and pushed both to a file:// remote."""
    url = (tmp_path / "remote").as_uri()
    n1 = node(tmp_path, "n1", url)
    for name in "AB":
        n1.ingest(family[name], name)
        n1.push(name)
    return n1, Remote(url)


def test_remote_gc_frees_what_no_ref_reaches(pushed, tmp_path, family):
    n1, remote = pushed
    remote.delete_ref("B")
    assert remote.gc(grace_s=3600).freed_bytes == 0  # everything is younger than the grace
    dry = remote.gc(dry_run=True, grace_s=0)
    only_b = lacking(blobs(n1, "B"), blobs(n1, "A"))
    assert dry.dry_run and dry.packs_removed == 1 and dry.snapshots_removed == 1
    assert dry.freed_bytes > only_b
    before = sorted(p.name for p in (tmp_path / "remote").rglob("*"))
    assert sorted(p.name for p in (tmp_path / "remote").rglob("*")) == before
    real = remote.gc(grace_s=0)
    assert real.freed_bytes == dry.freed_bytes and real.packs_removed == 1
    packs = list((tmp_path / "remote" / "packs").iterdir())
    assert sum(p.stat().st_size for p in packs) == sum(blobs(n1, "A").values())
    n3 = node(tmp_path, "n3", remote.url)
    n3.fetch("A")
    n3.export("A", tmp_path / "A")
    assert tree_sha256(tmp_path / "A") == tree_sha256(family["A"])
    with pytest.raises(RemoteError, match="no ref named 'B'"):
        n3.fetch("B")


def test_gc_and_push_exclude_each_other_by_leases(pushed, tmp_path):
    n1, remote = pushed
    with remote.lease("push"):
        with pytest.raises(RemoteBusyError, match="a push is running"):
            remote.gc(grace_s=0)
    with remote.lease("gc"):
        with pytest.raises(RemoteBusyError, match="a gc is running"):
            n1.push("A")
    # A crashed holder's lease expires and is cleared by the next gc.
    remote.put_json("locks/push-dead.json", {"kind": "push", "expires": time.time() - 1})
    assert remote.gc(grace_s=3600).locks_removed == 1
    assert not list((tmp_path / "remote" / "locks").iterdir())


def test_push_killed_midway_leaves_remote_readable_and_next_push_completes(family, tmp_path, s3_url, s3_env):
    n1 = node(tmp_path, "n1", s3_url)
    n1.ingest(family["A"], "A")
    n1.close()
    # Small packs so that the push is many uploads; kill it after the second pack.
    script = (
        "import sys, compstore.store.remote_sync as rs; rs.REMOTE_PACK_TARGET = 1 << 20\n"
        "from compstore import Store; Store(sys.argv[1]).push('A')\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "n1")], env=os.environ.copy())
    deadline = time.time() + 120
    while s3_env.received["packs"] < 2 << 20 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the push finished before it could be killed"
    left = list((tmp_path / "n1" / "tmp").glob("push-*"))
    assert len(left) == 1  # its scratch folder, in the store: the next writer clears it

    remote = Remote(s3_url)
    assert remote.refs() == {}  # readable, and names nothing half-pushed
    n2 = node(tmp_path, "n2", s3_url)
    state = store_state(n2.home)
    with pytest.raises(RemoteError, match="no ref named 'A'"):
        n2.fetch("A")
    assert store_state(n2.home) == state

    n1 = Store(tmp_path / "n1")
    total = sum(blobs(n1, "A").values())
    already = s3_env.received["packs"]
    r = n1.push("A")
    assert 0 < r.uploaded_bytes < total and r.present_bytes > 0  # resumed, not restarted
    assert r.uploaded_bytes + r.present_bytes == total
    n2.fetch("A")
    n2.export("A", tmp_path / "A")
    assert tree_sha256(tmp_path / "A") == tree_sha256(family["A"])
    assert already > 0
    n1.ingest(family["B"], "B")  # a writer
    assert not left[0].exists()


# -- bad input: a clear error, the local store unchanged ------------------------------
def test_damaged_remote_objects_are_refused(pushed, tmp_path):
    n1, remote = pushed
    root = tmp_path / "remote"
    n2 = node(tmp_path, "n2", remote.url)
    state = store_state(n2.home)

    pack = max((root / "packs").iterdir(), key=lambda p: p.stat().st_size)
    original = pack.read_bytes()
    pack.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    with pytest.raises(RemoteError, match="does not match its hash"):
        n2.fetch("A")
    assert store_state(n2.home) == state
    pack.write_bytes(original[: len(original) // 2])
    with pytest.raises(RemoteError, match="shorter than its index"):
        n2.fetch("A")
    assert store_state(n2.home) == state
    pack.write_bytes(original)

    snap = n1.resolve("A")
    doc_path = root / "snapshots" / f"{snap}.json"
    doc = json.loads(doc_path.read_text())
    doc["files"][0]["sha256"] = "0" * 64
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(RemoteError, match="damaged"):
        n2.fetch("A")
    doc_path.write_text("{not json")
    with pytest.raises(RemoteError, match="not valid JSON"):
        n2.fetch("A")
    assert store_state(n2.home) == state

    for index in (root / "index").iterdir():
        index.unlink()
    doc_path.write_text(json.dumps(snapshot_document(n1, snap)))
    with pytest.raises(RemoteError, match="lacks .* blob"):
        n2.fetch("A")
    assert store_state(n2.home) == state


def test_bad_remote_input(family, tmp_path):
    s = Store(tmp_path / "s")
    s.ingest(family["A"], "A")
    state = store_state(s.home)
    with pytest.raises(Exception, match="invalid remote name"):
        s.remote_add("bad name", "s3://b/p")
    with pytest.raises(Exception, match="is a URL"):
        s.remote_add("r", "relative/path")
    with pytest.raises(RemoteError, match="cannot open remote"):
        s.remote_add("r", "nosuchproto://x")
    with pytest.raises(RemoteError, match="cannot open remote ftp://nonexistent.invalid/p"):
        s.remote_add("r", "ftp://nonexistent.invalid/p")  # fsspec connects at once: an OSError
    with pytest.raises(RemoteError, match="cannot open remote"):
        s.push("A", to="ftp://nonexistent.invalid/p")
    with pytest.raises(RemoteError, match="name the remote"):
        s.push("A")
    with pytest.raises(RemoteError, match="no remote named 'nope'"):
        s.fetch("A", from_="nope")
    with pytest.raises(RemoteError, match="no remote named 'nope'"):
        s.remote_rm("nope")
    r = CliRunner().invoke(cli, ["--store", str(s.home), "remote", "add", "r", "s3://b/p", "-o", "novalue"])
    assert r.exit_code != 0 and "is not KEY=VALUE" in r.output
    assert store_state(s.home) == state
    s.remote_add("r", str(tmp_path / "empty"))
    with pytest.raises(Exception, match="exists"):
        s.remote_add("r", str(tmp_path / "other"))
    state = store_state(s.home)
    with pytest.raises(RemoteError, match="not a compstore remote"):
        s.fetch("A", from_="r")
    with pytest.raises(RemoteError, match="not a compstore remote"):
        s.remote_gc("r", dry_run=True)
    with pytest.raises(Exception, match="no ref named 'nope'"):
        s.push("nope", to="r")
    with pytest.raises(Exception, match="invalid ref name"):
        s.push("A", to="r", as_ref=" padded ")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "compstore-remote.json").write_text('{"format": 99}')
    with pytest.raises(RemoteError, match="upgrade compstore"):
        s.fetch("A", from_=str(tmp_path / "other"))
    assert store_state(s.home) == state


def test_cli_remote_commands(family, tmp_path):
    run = lambda *a: CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), *a])  # noqa: E731
    url = (tmp_path / "remote").as_uri()
    assert run("ingest", str(family["A"]), "--name", "A").exit_code == 0
    r = run("remote", "add", "fleet", url, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["url"] == url
    assert json.loads(run("remote", "ls", "--json").output) == [{"name": "fleet", "url": url, "options": {}}]
    r = run("push", "A", "--to", "fleet", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["uploaded_bytes"] > 0 and doc["status"] == "new"
    assert json.loads(run("remote", "refs", "fleet", "--json").output) == {"A": doc["snapshot"]}
    r = CliRunner().invoke(cli, ["--store", str(tmp_path / "t"), "remote", "add", "fleet", url])
    assert r.exit_code == 0
    r = CliRunner().invoke(cli, ["--store", str(tmp_path / "t"), "fetch", "A", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["downloaded_bytes"] == doc["uploaded_bytes"]
    r = run("remote", "rm-ref", "fleet", "A", "--json")
    assert json.loads(r.output)["removed"] == "A"
    r = run("remote", "gc", "fleet", "--grace", "0", "--dry-run", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["freed_bytes"] > 0
    r = run("fetch", "A", "--from", "fleet")
    assert r.exit_code != 0 and "no ref named 'A'" in r.output
    assert run("remote", "rm", "fleet").exit_code == 0
    assert json.loads(run("remote", "ls", "--json").output) == []


def test_two_nodes_pushing_at_once_leave_a_complete_remote(family, tmp_path, s3_url):
    """Concurrent pushes from two processes (different refs sharing blobs, and the same
    ref) through the S3 server: every ref names a complete snapshot that fetches."""
    nodes = [node(tmp_path, f"n{i}", s3_url) for i in range(2)]
    for n in nodes:
        for name in "AB":
            n.ingest(family[name], name)
        n.close()
    script = "import sys; from compstore import Store; Store(sys.argv[1]).push(sys.argv[2], as_ref=sys.argv[3])"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / n), ref, as_ref],
                              stderr=subprocess.PIPE, text=True)
             for n, ref, as_ref in (("n0", "A", "A"), ("n1", "B", "B"), ("n0", "B", "same"),
                                    ("n1", "A", "same"))]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    refs = Remote(s3_url).refs()
    snaps = {Store(tmp_path / "n0").resolve(r) for r in "AB"}
    assert set(refs) == {"A", "B", "same"} and refs["same"] in snaps
    reader = node(tmp_path, "reader", s3_url)
    for ref in ("A", "B", "same"):
        reader.fetch(ref)
        reader.export(ref, tmp_path / f"out-{ref}")
    assert tree_sha256(tmp_path / "out-A") == tree_sha256(family["A"])
    assert tree_sha256(tmp_path / "out-B") == tree_sha256(family["B"])
    assert tree_sha256(tmp_path / "out-same") in (tree_sha256(family["A"]), tree_sha256(family["B"]))


def test_a_push_that_a_gc_overtakes_is_a_clear_error(family, tmp_path, monkeypatch):
    """A ref removed and collected by another process as a push begins: RefNotFoundError
    (it was "snapshot ... is not in store": the push resolved the ref before it held
    the readers' lock that gc waits for). Found by processes pushing, fetching and
    collecting at once."""
    from compstore import RefNotFoundError

    n1 = node(tmp_path, "n1", (tmp_path / "remote").as_uri())
    n1.ingest(family["B"], "B")
    real_reading, collected = n1.reading, []

    def reading_after_a_gc():  # another process removes B and collects, just before
        if not collected:
            collected.append(collect_beside(n1, ["B"], wait_s=10))
        return real_reading()

    monkeypatch.setattr(n1, "reading", reading_after_a_gc)
    with pytest.raises(RefNotFoundError, match="no ref named 'B'"):
        n1.push("B")


def test_remote_gc_leaves_a_lease_being_written(pushed, tmp_path):
    """A lease is written to a temporary name, then renamed: with `--grace 0` a remote
    gc deleted it under the push's feet (FileNotFoundError in the push)."""
    n1, remote = pushed
    locks = tmp_path / "remote" / "locks"
    locks.mkdir(exist_ok=True)
    writing = locks / "push-1234.json.tmp-abcd"
    writing.write_text("")
    remote.gc(grace_s=0)
    assert writing.exists()
    old = time.time() - 2 * 600  # older than a lease lasts: its writer crashed
    os.utime(writing, (old, old))
    remote.gc(grace_s=0)
    assert not writing.exists()
