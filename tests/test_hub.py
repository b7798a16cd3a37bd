"""`pull` against a Hub emulated on 127.0.0.1: only what the store lacks is served."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import compstore
from compstore import HubError, Store
from conftest import collect_beside, recorded_sha256, same_state, store_state, tree_sha256, use_hub
from hub_emulator import HubEmulator


@pytest.fixture
def hub(monkeypatch, family):
    hub = HubEmulator()
    for name in "ABCD":
        hub.add_repo(f"org/{name}", family[name])
    hub.add_repo("org/private", family["A"], private=True)
    hub.add_repo("org/gated", family["A"], gated=True)
    use_hub(monkeypatch, hub)
    yield hub
    hub.close()


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file()}


def lacking_bytes(store_folders: list[Path], new: Path) -> int:
    """Bytes of `new`'s files whose content none of `store_folders` has (by sha256)."""
    held = {hashlib.sha256(b).hexdigest() for f in store_folders for b in files_of(f).values()}
    return sum(len(b) for b in files_of(new).values() if hashlib.sha256(b).hexdigest() not in held)


def test_pull_serves_only_the_files_the_store_lacks(hub, store, family, tmp_path):
    a = store.pull("org/A")
    assert a.downloaded_bytes == hub.served_bytes == sum(len(b) for b in files_of(family["A"]).values())
    assert a.ref.startswith("org/A@") and store.resolve("org/A") == store.resolve(a.ref)
    store.export("org/A", tmp_path / "A")
    assert tree_sha256(tmp_path / "A") == tree_sha256(family["A"])

    for name in "BCD":  # D as published: its fp16 files too
        hub.reset_counts()
        r = store.pull(f"org/{name}", all_files=True)
        expected = lacking_bytes([family[n] for n in "ABCD" if n < name], family[name])
        assert hub.served_bytes == r.downloaded_bytes == expected, name
        assert r.skipped_bytes > 0
        store.export(f"org/{name}", tmp_path / name)
        assert tree_sha256(tmp_path / name) == tree_sha256(family[name])
    assert store.verify().ok
    assert list((store.home / "downloads").rglob("*.safetensors")) == []  # no second copy left


def test_pulling_the_same_commit_again_fetches_nothing(hub, store):
    store.pull("org/A")
    hub.reset_counts()
    r = store.pull("org/A")
    assert (r.status, r.downloaded_bytes, hub.served_bytes) == ("unchanged", 0, 0)


def test_from_pretrained_with_a_repo_id_pulls_on_the_way(hub, store, family):
    import diffusers

    pipe = compstore.DiffusionPipeline.from_pretrained("org/B", store=store)
    theirs = diffusers.DiffusionPipeline.from_pretrained(family["B"])
    for k, v in theirs.unet.state_dict().items():
        assert torch.equal(v, pipe.unet.state_dict()[k])
    hub.reset_counts()
    compstore.DiffusionPipeline.from_pretrained("org/B", store=store, local_files_only=True)
    assert hub.served_bytes == 0


def test_tampered_download_is_rejected_and_nothing_enters_the_store(hub, store, family):
    from conftest import store_state

    path = "unet/diffusion_pytorch_model.safetensors"
    repo = hub.repos["org/A"]
    good = repo.commits[repo.refs["main"]][path]
    repo.tampered[path] = good[:-1] + bytes([good[-1] ^ 1])
    before = store_state(store.home)
    with pytest.raises(HubError, match="do not match the Hub's sha256; nothing was stored"):
        store.pull("org/A")
    assert store_state(store.home)[:2] == before[:2]


@pytest.mark.parametrize("workers", [1, 4])
def test_http_downloads_run_the_set_number_at_a_time(hub, store, family, monkeypatch, tmp_path, workers):
    """Files fetched over HTTP are downloaded $COMPSTORE_PULL_WORKERS at a time, so a
    far server's latency is paid per batch of files, not per file."""
    monkeypatch.setenv("COMPSTORE_PULL_WORKERS", str(workers))
    hub.latency = 0.2  # long enough that files queued together overlap on the server
    r = store.pull("org/A")
    assert r.http_files == r.downloaded_files == len(files_of(family["A"]))
    assert (hub.max_in_flight == 1) if workers == 1 else (2 <= hub.max_in_flight <= workers)
    store.export("org/A", tmp_path / "A")
    assert tree_sha256(tmp_path / "A") == tree_sha256(family["A"])
    assert store.verify().ok


@pytest.mark.parametrize("value", ["0", "many"])
def test_a_bad_pull_workers_setting_is_refused_before_any_download(hub, store, monkeypatch, value):
    from conftest import store_state

    from compstore import SettingError

    monkeypatch.setenv("COMPSTORE_PULL_WORKERS", value)
    before = store_state(store.home)
    with pytest.raises(SettingError, match=f"^COMPSTORE_PULL_WORKERS='{value}': expected a whole number, at least 1"):
        store.pull("org/A")
    assert hub.served_files == [] and store_state(store.home) == before


def test_a_file_failing_its_check_beside_other_downloads_costs_only_itself(hub, store, family):
    """One download fails its sha256 check while others run: the pull fails, nothing is
    stored, and the files that arrived are kept, so the next pull fetches each other
    file at most once in all."""
    from conftest import store_state

    bad = "unet/diffusion_pytorch_model.safetensors"
    repo = hub.repos["org/A"]
    good = repo.commits[repo.refs["main"]][bad]
    repo.tampered[bad] = good[:-1] + bytes([good[-1] ^ 1])
    hub.latency = 0.05
    before = store_state(store.home)
    with pytest.raises(HubError, match="do not match the Hub's sha256; nothing was stored"):
        store.pull("org/A")
    assert store_state(store.home)[:2] == before[:2]
    first = dict(hub.served_per_file)
    del repo.tampered[bad]
    hub.reset_counts()
    store.pull("org/A")
    for path, data in files_of(family["A"]).items():
        served = first.get(path, 0) + hub.served_per_file.get(path, 0)
        assert served == (2 * len(data) if path == bad else len(data)), path
    assert store.verify().ok


def pull_side_by_side(hub, home: Path, repos: list[str]) -> list:
    """Pull `repos` into the store at `home` from threads, each with its own Store
    (as separate processes would be), each started once the one before it has a
    file download in flight."""
    import threading
    import time

    results: list = [None] * len(repos)

    def run(i: int) -> None:
        with Store(home) as s:
            try:
                results[i] = s.pull(repos[i])
            except Exception as e:  # reported by the assertion below
                results[i] = e

    threads = []
    for i in range(len(repos)):
        if threads:
            deadline = time.monotonic() + 10
            while hub.in_flight == 0 and threads[-1].is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            assert hub.in_flight > 0, "the pull before did not get to download"
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    assert not [r for r in results if isinstance(r, Exception)], results
    return results


def test_pulls_of_one_repo_side_by_side_download_it_once(hub, store, family, caplog):
    """A second pull started while the first downloads waits for it, then finds the
    commit in the store (several workers of one service calling from_pretrained at
    once): each file is served once."""
    import logging

    hub.latency = 0.5  # the first pull downloads for ~1 s: the others start, and wait, meanwhile
    with caplog.at_level(logging.INFO, logger="compstore"):
        first, second, third = pull_side_by_side(hub, store.home, ["org/A"] * 3)
    assert caplog.text.count("waiting for another pull of org/A to finish") == 2
    assert first.status == "new" and second.status == third.status == "unchanged"
    assert second.downloaded_bytes == third.downloaded_bytes == 0
    assert hub.served_bytes == sum(len(b) for b in files_of(family["A"]).values())
    assert sorted(hub.served_files) == sorted(files_of(family["A"]))
    assert store.verify().ok


def test_pulls_of_two_fine_tunes_side_by_side_fetch_what_they_share_once(hub, store, family, caplog):
    """A and B share the VAE, text encoder, tokenizer and configs: pulled at once,
    the second waits for the first and downloads only what it lacks."""
    import logging

    hub.latency = 0.2
    with caplog.at_level(logging.INFO, logger="compstore"):
        a, b = pull_side_by_side(hub, store.home, ["org/A", "org/B"])
    assert "waiting for other pulls fetching files this one wants to finish" in caplog.text
    assert a.status == b.status == "new"
    assert hub.served_bytes == lacking_bytes([], family["A"]) + lacking_bytes([family["A"]], family["B"])
    assert b.skipped_files > 0 and store.verify().ok


def test_pulls_that_share_no_large_file_run_side_by_side(hub, store, tmp_path, caplog):
    """A small pull does not wait out a large one it shares no weights with: org/U
    is pulled while org/A's UNet download is held up, and A then completes."""
    import logging
    import threading
    import time

    from compstore.loader.synthetic import tiny_sd_pipeline

    tiny_sd_pipeline(7).save_pretrained(tmp_path / "U")  # other weights; the same configs
    hub.add_repo("org/U", tmp_path / "U")
    gate = hub.gates["org/A", "unet/diffusion_pytorch_model.safetensors"] = threading.Event()
    results = {}

    def pull_a():  # its own Store, as another process's
        with Store(store.home) as s:
            results["A"] = s.pull("org/A")

    t = threading.Thread(target=pull_a)
    t.start()
    while hub.in_flight == 0 and t.is_alive():  # A is downloading, and holds its locks
        time.sleep(0.005)
    with caplog.at_level(logging.INFO, logger="compstore"), Store(store.home) as s:
        u = s.pull("org/U")
    held_up = t.is_alive() and not gate.is_set()  # A still waits for its UNet (at most 30 s)
    gate.set()
    t.join()
    assert held_up and "waiting for" not in caplog.text
    assert results["A"].status == u.status == "new" and store.verify().ok
    compstore.DiffusionPipeline.from_pretrained("org/U", store=store, local_files_only=True)


@pytest.fixture
def sha256_fed(monkeypatch) -> list[int]:
    """The sizes of the buffers the pull feeds to sha256, in order."""
    import hashlib as real_hashlib
    import types

    from compstore.store import hub as hub_module

    fed: list[int] = []

    class Counting:
        def __init__(self):
            self.h = real_hashlib.sha256()

        def update(self, data):
            fed.append(len(data))
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(hub_module, "hashlib", types.SimpleNamespace(sha256=Counting))
    return fed


def test_a_download_is_hashed_once_as_it_arrives(hub, store, family, monkeypatch, sha256_fed):
    """The pull hashes each file as its bytes arrive, to check it against the Hub's
    sha256 (LFS files); the ingest records that sha256 instead of hashing again."""
    from compstore.store import ingest

    hashed = []
    real_hash = ingest._sha256
    monkeypatch.setattr(ingest, "_sha256", lambda buf: (hashed.append(len(buf)), real_hash(buf))[1])
    store.pull("org/A")
    files = files_of(family["A"])
    weights = [p for p in files if p.endswith(".safetensors")]
    assert weights and sum(sha256_fed) == sum(len(b) for b in files.values())  # each byte once
    assert hashed == []  # not again by the ingest
    assert recorded_sha256(store, "org/A") == tree_sha256(family["A"])


def test_a_file_left_by_a_pull_stopped_before_its_check_is_checked(hub, store, family):
    """A download renamed into place, then the process killed before the sha256 check:
    the next pull checks the file it finds, and refuses a wrong one."""
    from conftest import store_state

    path = "unet/diffusion_pytorch_model.safetensors"
    commit = hub.repos["org/A"].refs["main"]
    left = store.home / "downloads" / "org--A" / commit / path
    left.parent.mkdir(parents=True)
    good = (family["A"] / path).read_bytes()
    left.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    before = store_state(store.home)
    with pytest.raises(HubError, match="do not match the Hub's sha256; nothing was stored"):
        store.pull("org/A")
    assert store_state(store.home)[:2] == before[:2] and not left.exists()
    store.pull("org/A")  # the retry downloads it
    assert store.verify().ok and store.resolve("org/A")


@pytest.mark.parametrize("repo,revision,message", [
    ("org/missing", None, "was not found on the Hub, or it is private"),
    ("org/private", None, "was not found on the Hub, or it is private"),
    ("org/gated", None, "is gated: accept its conditions"),
    ("org/A", "no-such-branch", "has no revision 'no-such-branch'"),
    ("../x", None, "'../x' is not a Hub repo id"),  # refused before any request
    ("a/b/c", None, "'a/b/c' is not a Hub repo id"),
    ("", None, "'' is not a Hub repo id"),
])
def test_hub_errors_are_clear(hub, store, repo, revision, message):
    from conftest import store_state

    before = store_state(store.home)
    with pytest.raises(HubError, match=message):
        store.pull(repo, revision=revision)
    assert store.ls() == [] and store_state(store.home) == before


@pytest.mark.parametrize("kwargs, message", [
    ({"include": ["nothing/*"]}, "no files to pull: none matches nothing/"),
    ({"exclude": ["*"]}, r"no files to pull: every one matches \*"),
])
def test_an_include_or_exclude_leaving_nothing_is_a_clear_error(hub, store, kwargs, message):
    from conftest import store_state

    before = store_state(store.home)
    with pytest.raises(HubError, match=message):
        store.pull("org/A", **kwargs)
    assert store_state(store.home) == before and set(hub.served_files) <= {"model_index.json"}


def test_private_repo_with_a_token(hub, store):
    r = store.pull("org/private", token=hub.token)
    assert r.downloaded_files > 0


def test_from_pretrained_passes_its_token_to_the_pull(hub, store):
    with pytest.raises(HubError, match="not found on the Hub, or it is private"):
        compstore.DiffusionPipeline.from_pretrained("org/private", store=store)
    pipe = compstore.DiffusionPipeline.from_pretrained("org/private", store=store, token=hub.token)
    assert pipe.unet is not None
    unet = compstore.load_component("org/private", "unet", store=store, token=hub.token)
    assert unet.config == pipe.unet.config


def test_cli_pull_json(hub, tmp_path):
    import json

    from click.testing import CliRunner

    from compstore.cli import cli

    r = CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), "pull", "org/C", "--include",
                                 "tokenizer/*", "--include", "scheduler/*", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["downloaded_bytes"] == hub.served_bytes and doc["files"] == doc["downloaded_files"] == 4
    assert set(hub.served_files) == {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                                     "scheduler/scheduler_config.json", "model_index.json"}
    r = CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), "pull", "org/nope"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: org/nope was not found")


def publish_with_manifest(hub, family, name, tmp_path) -> str:
    """Publish family member `name` with a compstore manifest, as `org/{name}-m`."""
    import json
    import shutil

    folder = tmp_path / f"{name}-m"
    shutil.copytree(family[name], folder)
    with Store(tmp_path / "publisher") as pub:
        pub.ingest(family[name], name)
        (folder / "compstore.manifest.json").write_text(json.dumps(pub.manifest(name)))
    hub.add_repo(f"org/{name}-m", folder)
    return f"org/{name}-m"


def safetensors_header_bytes(path: Path) -> int:
    import struct

    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_with_a_manifest_only_missing_tensors_are_served(hub, store, family, tmp_path):
    repo = publish_with_manifest(hub, family, "C", tmp_path)
    store.pull("org/A")
    with Store(tmp_path / "reference") as ref:  # the tensor delta, computed by the catalog
        ref.ingest(family["A"], "A")
        ref.ingest(family["C"], "C")
        delta = ref.diff("A", "C").delta_bytes
    held = {hashlib.sha256(b).hexdigest() for b in files_of(family["A"]).values()}
    new_files = [p for p in Path(family["C"]).rglob("*") if p.is_file()
                 and hashlib.sha256(p.read_bytes()).hexdigest() not in held]
    headers = sum(safetensors_header_bytes(p) for p in new_files if p.suffix == ".safetensors")
    small = sum(p.stat().st_size for p in new_files if p.suffix != ".safetensors")
    manifest = len(hub.repos[repo].commits[hub.repos[repo].refs["main"]]["compstore.manifest.json"])
    hub.reset_counts()
    r = store.pull(repo)
    assert hub.served_bytes == r.downloaded_bytes == delta + headers + small + manifest
    assert hub.served_bytes < 0.5 * sum(p.stat().st_size for p in new_files)
    store.export(repo, tmp_path / "out")
    out = tree_sha256(tmp_path / "out")
    assert out.pop("compstore.manifest.json") and out == tree_sha256(family["C"])


def test_a_wrong_manifest_costs_a_download_never_a_wrong_byte(hub, store, family, tmp_path):
    import json

    repo = publish_with_manifest(hub, family, "B", tmp_path)
    files = hub.repos[repo].commits[hub.repos[repo].refs["main"]]
    doc = json.loads(files["compstore.manifest.json"])
    pieces = doc["files"]["unet/diffusion_pytorch_model.safetensors"]["pieces"]
    with Store(tmp_path / "pub2") as pub:  # claim that B's UNet tensors are A's (same sizes)
        pub.ingest(family["A"], "A")
        a = json.loads(json.dumps(pub.manifest("A")))["files"]["unet/diffusion_pytorch_model.safetensors"]
    doc["files"]["unet/diffusion_pytorch_model.safetensors"]["pieces"] = a["pieces"]
    assert [p[:2] for p in a["pieces"]] == [p[:2] for p in pieces]
    files["compstore.manifest.json"] = json.dumps(doc).encode()
    store.pull("org/A")
    store.pull(repo)
    store.export(repo, tmp_path / "out")
    out = tree_sha256(tmp_path / "out")
    out.pop("compstore.manifest.json")
    assert out == tree_sha256(family["B"])


def test_an_interrupted_download_resumes_where_it_stopped(hub, store, family):
    path = "unet/diffusion_pytorch_model.safetensors"
    total = sum(len(b) for b in files_of(family["A"]).values())
    hub.repos["org/A"].cuts[path] = [1 << 20]  # the connection drops after 1 MiB
    store.pull("org/A")
    assert hub.served_bytes == total  # the rest came with a Range request, nothing twice


def test_a_resume_the_server_ignores_starts_the_file_over(hub, store, family, tmp_path, sha256_fed):
    """A server that answers a Range request with the whole file (200): the download
    starts over, its hash too, and the file, its check and its recorded sha256 are
    right."""
    path = "unet/diffusion_pytorch_model.safetensors"
    repo = hub.repos["org/A"]
    repo.cuts[path] = [1 << 20]
    repo.ignore_range = True
    store.pull("org/A")
    total = sum(len(b) for b in files_of(family["A"]).values())
    assert hub.served_per_file[path] == (1 << 20) + (family["A"] / path).stat().st_size
    assert sum(sha256_fed) == (1 << 20) + total  # what came, once: no file read back
    store.export("org/A", tmp_path / "A")
    assert tree_sha256(tmp_path / "A") == tree_sha256(family["A"])
    assert store.verify().ok


def test_a_failed_pull_resumes_on_the_next_one(hub, store, family, sha256_fed):
    path = "unet/diffusion_pytorch_model.safetensors"
    size = (family["A"] / path).stat().st_size
    hub.repos["org/A"].cuts[path] = [1 << 20] + [0] * 20  # 1 MiB, then every retry fails
    with pytest.raises(HubError):
        store.pull("org/A")
    assert store.ls() == []
    hub.repos["org/A"].cuts[path] = []
    hub.reset_counts()
    left = set(files_of(next((store.home / "downloads").glob("*/*"))))  # the first pull's
    assert path + ".partial" in left
    sha256_fed.clear()
    store.pull("org/A")
    # Each file hashed once: on arrival, or read back (the first pull's LFS files, and
    # the UNet's kept MiB); the first pull's git files have no Hub sha256 to check.
    files = files_of(family["A"])
    assert sum(sha256_fed) == sum(len(b) for p, b in files.items()
                                  if p not in left or p.endswith(".safetensors"))
    assert hub.served_files.count(path) == 1
    assert hub.served_per_file[path] == size - (1 << 20)  # only what the first pull did not get
    assert store.verify().ok


def test_a_kept_partial_download_gone_bad_is_downloaded_again_whole(hub, store, family):
    """The next pull resumed from the kept bytes, failed the Hub's sha256 ("retry the
    pull") and only the pull after that worked."""
    path = "unet/diffusion_pytorch_model.safetensors"
    size = (family["A"] / path).stat().st_size
    hub.repos["org/A"].cuts[path] = [1 << 20] + [0] * 20  # 1 MiB kept, then every retry fails
    with pytest.raises(HubError):
        store.pull("org/A")
    hub.repos["org/A"].cuts[path] = []
    partial = next((store.home / "downloads").rglob("*.partial"))
    data = bytearray(partial.read_bytes())
    data[1000] ^= 0xFF  # the disk changed a kept byte
    partial.write_bytes(bytes(data))
    hub.reset_counts()
    store.pull("org/A")
    assert hub.served_per_file[path] == (size - (1 << 20)) + size  # the rest, then all of it
    assert store.verify().ok


def test_gc_removes_what_failed_pulls_left_unless_a_pull_is_running(hub, store, family, tmp_path):
    import json
    import threading

    from click.testing import CliRunner

    from compstore.cli.main import cli
    from compstore.store.lock import pulls_running

    path = "unet/diffusion_pytorch_model.safetensors"
    hub.repos["org/A"].cuts[path] = [1 << 20] + [0] * 20  # 1 MiB, then every retry fails
    with pytest.raises(HubError):
        store.pull("org/A")
    downloads = store.home / "downloads"
    left = sum(f.stat().st_size for f in downloads.rglob("*") if f.is_file())
    assert left >= 1 << 20

    held, release = threading.Event(), threading.Event()

    def another_pull():  # holds the lock as a running pull in another process would
        with pulls_running(store.home):
            held.set()
            release.wait(10)

    t = threading.Thread(target=another_pull)
    t.start()
    held.wait(10)
    try:
        assert store.gc().downloads_freed_bytes == 0  # gc does not wait for the pull
        assert sum(f.stat().st_size for f in downloads.rglob("*") if f.is_file()) == left
        assert list((store.home / "pulls").glob("*.lock"))  # the failed pull's: kept meanwhile
    finally:
        release.set()
        t.join()

    assert store.gc(dry_run=True).downloads_freed_bytes == left
    assert downloads.exists()
    r = CliRunner().invoke(cli, ["--store", str(store.home), "gc", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["downloads_freed_bytes"] == left
    assert not downloads.exists() and not (store.home / "pulls").exists()
    r = CliRunner().invoke(cli, ["--store", str(store.home), "gc"])
    assert "downloads/" not in r.output  # nothing left to mention

    hub.repos["org/A"].cuts[path] = []
    hub.reset_counts()
    store.pull("org/A")  # starts over, and gets there
    assert hub.served_bytes == sum(len(b) for b in files_of(family["A"]).values())
    assert store.verify().ok


def publish_remix(hub, tmp_path, base: str, slots: tuple[str, ...], *, private: bool = False,
                  **pointer) -> None:
    """org/remix: a modular tiny SDXL whose `slots` point at `base` (a modular tiny
    SDXL published too) instead of folders of its own."""
    import json
    import shutil

    from compstore.loader.synthetic import tiny_sdxl_pipeline
    from test_modular import save_modular

    save_modular(tiny_sdxl_pipeline(seed=0), tmp_path / "base")
    hub.add_repo(base, tmp_path / "base", private=private)
    remix = tmp_path / "remix"
    save_modular(tiny_sdxl_pipeline(seed=3), remix)
    index = json.loads((remix / "modular_model_index.json").read_text())
    for slot in slots:
        index[slot][2].update(pretrained_model_name_or_path=base, subfolder=slot, revision=None,
                              **pointer)
        shutil.rmtree(remix / slot)
    (remix / "modular_model_index.json").write_text(json.dumps(index))
    hub.add_repo("org/remix", remix)


def test_a_modular_pull_and_a_pull_of_the_repo_it_points_at_both_finish(hub, store, tmp_path, caplog):
    """org/remix re-publishes org/sdxl-base's UNet file and points at its VAE. Its pull
    downloads the UNet; a pull of org/sdxl-base then waits for that file. The remix's
    ingest pulls org/sdxl-base, which that pull holds: the remix lets its file locks
    go before its ingest, or each pull would wait for the other for ever."""
    import logging
    import shutil
    import threading
    import time

    publish_remix(hub, tmp_path, "org/sdxl-base", ("vae",))
    shutil.rmtree(tmp_path / "remix" / "unet")
    shutil.copytree(tmp_path / "base" / "unet", tmp_path / "remix" / "unet")
    hub.add_repo("org/remix", tmp_path / "remix")
    gate = hub.gates["org/remix", "unet/diffusion_pytorch_model.safetensors"] = threading.Event()
    results = {}

    def pull(repo):
        with Store(store.home) as s:
            results[repo] = s.pull(repo)

    threads = {repo: threading.Thread(target=pull, args=(repo,), daemon=True)
               for repo in ("org/remix", "org/sdxl-base")}
    with caplog.at_level(logging.INFO, logger="compstore"):
        threads["org/remix"].start()
        while hub.in_flight == 0:  # the remix downloads its UNet, and holds its lock
            time.sleep(0.005)
        threads["org/sdxl-base"].start()
        deadline = time.monotonic() + 10
        while "waiting for other pulls fetching" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.005)
        assert "waiting for other pulls fetching" in caplog.text  # the base waits for the UNet
        gate.set()
        for t in threads.values():
            t.join(30)
    assert not any(t.is_alive() for t in threads.values()), "the two pulls wait for each other"
    assert set(results) == {"org/remix", "org/sdxl-base"} and store.verify().ok
    pins = {p["slot"]: p for p in store.show("org/remix")["pins"]}
    assert pins["vae"]["source"].startswith("org/sdxl-base@")


def test_modular_repo_pointing_at_hub_repos_pins_their_commit(hub, store, tmp_path):
    from compstore import PinChangedError
    from compstore.loader.synthetic import tiny_sdxl_pipeline

    publish_remix(hub, tmp_path, "org/sdxl-base", ("vae", "text_encoder"))
    store.pull("org/remix")  # pulls and pins org/sdxl-base on the way
    pins = {p["slot"]: p for p in store.show("org/remix")["pins"]}
    pin = pins["vae"]
    assert pin["source"].startswith("org/sdxl-base@") and pin["revision"]
    # One pull of org/sdxl-base, of the folders pointed at: not its UNet, nor its other text encoder.
    assert pins["text_encoder"]["source"] == pin["source"]
    pulled = {row[0] for row in store.snapshot_files(store.resolve(pin["source"]))}
    assert {p.split("/")[0] for p in pulled} == {"modular_model_index.json", "vae", "text_encoder"}
    pipe = compstore.ModularPipeline.from_pretrained("org/remix", store=store, local_files_only=True)
    pipe.load_components(names=["vae"])

    tiny_sdxl_pipeline(seed=9).vae.save_pretrained(tmp_path / "base" / "vae")
    hub.add_repo("org/sdxl-base", tmp_path / "base")  # a new commit on main
    with pytest.raises(PinChangedError, match="'vae'.*compstore pull org/remix --repin"):
        store.pull("org/remix")  # the same remix commit, but what it points at changed
    pipe = compstore.ModularPipeline.from_pretrained("org/remix", store=store, local_files_only=True)
    pipe.load_components(names=["vae"])  # still the pinned VAE
    store.pull("org/remix", repin=True)
    new_pin = next(p for p in store.show("org/remix")["pins"] if p["slot"] == "vae")
    assert new_pin["component_id"] != pin["component_id"]


def test_a_modular_pointer_in_a_variant_its_repo_lacks_pins_the_default_weights(hub, store, tmp_path,
                                                                              caplog):
    import logging

    publish_remix(hub, tmp_path, "org/sdxl-base", ("vae",), variant="fp16")
    with caplog.at_level(logging.WARNING, logger="compstore"):
        store.pull("org/remix")
    assert "vae: no 'fp16' variant stored, loading the default weights" in caplog.text
    [pin] = store.show("org/remix")["pins"]
    assert pin["source"].startswith("org/sdxl-base@") and pin["variant"] == ""
    assert "vae/diffusion_pytorch_model.safetensors" in hub.served_files


def test_a_modular_repo_pointing_at_a_private_repo_pulls_it_with_the_token(hub, store, tmp_path):
    publish_remix(hub, tmp_path, "org/private-base", ("vae",), private=True)
    with pytest.raises(HubError, match="org/private-base was not found on the Hub, or it is private"):
        store.pull("org/remix")
    store.pull("org/remix", token=hub.token)  # the pointer's pull too (it had no token before)
    pins = store.show("org/remix")["pins"]
    assert [p["source"].split("@")[0] for p in pins] == ["org/private-base"]


def test_adopt_a_hugging_face_cache_and_reclaim_it(hub, store, family, tmp_path):
    from huggingface_hub import scan_cache_dir, snapshot_download

    cache = tmp_path / "hf-cache"
    for name in "AB":
        snapshot_download(f"org/{name}", cache_dir=cache, endpoint=hub.url)
    before = scan_cache_dir(cache).size_on_disk
    report = store.adopt(cache)
    assert {(a["repo"], a["whole"]) for a in report.adopted} == {("org/A", True), ("org/B", True)}
    for name in "AB":
        store.export(f"org/{name}", tmp_path / f"out-{name}")
        assert tree_sha256(tmp_path / f"out-{name}") == tree_sha256(family[name])
    assert scan_cache_dir(cache).size_on_disk == before  # no --reclaim: cache untouched

    report = store.adopt(cache, reclaim=True)
    assert all(a["verified"] for a in report.adopted)
    assert report.reclaimed_bytes == before
    assert scan_cache_dir(cache).repos == frozenset() or all(
        not r.revisions for r in scan_cache_dir(cache).repos)
    pipe = compstore.DiffusionPipeline.from_pretrained("org/B", store=store, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_a_part_pulled_at_a_branch_tag_or_pr_loads_offline_at_that_name(hub, store, family):
    """`subfolder=` at a revision pulls that folder alone; offline, or with the Hub down,
    the same load at the same name gets that commit (until 2026-12-07 a
    RefNotFoundError: only a whole pipeline's pull was found by its revision's name)."""
    main = hub.add_repo("org/V", family["A"])
    pr = hub.add_repo("org/V", family["B"])
    hub.repos["org/V"].refs.update({"main": main, "refs/pr/1": pr, "v1": pr})
    b = compstore.load_component(str(family["B"]), "unet", store=Store(store.home.parent / "b"))

    def unet(revision, **kwargs):
        return compstore.UNet2DConditionModel.from_pretrained("org/V", subfolder="unet", revision=revision,
                                                              store=store, **kwargs)

    for revision in ("v1", "refs/pr/1"):
        same_state(unet(revision), b)
        same_state(unet(revision, local_files_only=True), b)
    with pytest.raises(compstore.RefNotFoundError, match="no ref named 'org/V@v2'"):
        unet("v2", local_files_only=True)
    with pytest.raises(compstore.RefNotFoundError):  # main's was never pulled: never the PR's
        unet("main", local_files_only=True)
    hub.close()  # the Hub down: the store's, with a warning
    same_state(unet("v1"), b)


def test_adopt_names_revisions_by_the_caches_refs(hub, store, family, tmp_path):
    """A cache with main and, downloaded after it, a PR: `org/V` is main's, as a pull
    names it, and the PR is `org/V@refs/pr/1` (until 2026-12-07 the newest whole
    revision became `org/V`, here the PR's)."""
    from huggingface_hub import snapshot_download

    main = hub.add_repo("org/V", family["A"])
    pr = hub.add_repo("org/V", family["B"])
    hub.repos["org/V"].refs.update({"main": main, "refs/pr/1": pr})
    cache = tmp_path / "hf-cache"
    snapshot_download("org/V", cache_dir=cache, endpoint=hub.url)
    snapshot_download("org/V", revision="refs/pr/1", cache_dir=cache, endpoint=hub.url)
    store.adopt(cache)
    assert store.resolve("org/V") == store.resolve(f"org/V@{main}")
    assert store.resolve("org/V@refs/pr/1") == store.resolve(f"org/V@{pr}")


def test_adopt_takes_revisions_holding_part_of_a_pipeline(hub, store, family, tmp_path):
    """What diffusers and transformers leave in a cache for `subfolder=` (vae/ alone,
    text_encoder/ alone), and for a pipeline loaded with its VAE passed in (all but
    vae/), is adopted as `repo@commit` (the first two were skipped: "not a diffusers
    pipeline or component"), loads offline, and does not become `repo`, which names
    whole pipelines."""
    import diffusers
    from hub_emulator import huggingface_hub_default_endpoint

    from transformers import CLIPTextModel

    cache = tmp_path / "hf-cache"
    with huggingface_hub_default_endpoint(hub.url):
        vae = diffusers.AutoencoderKL.from_pretrained("org/A", subfolder="vae", cache_dir=cache)
        diffusers.DiffusionPipeline.from_pretrained("org/B", vae=vae, cache_dir=cache)
        text_encoder = CLIPTextModel.from_pretrained("org/C", subfolder="text_encoder", cache_dir=cache)
    report = store.adopt(cache)
    assert {(a["repo"], a["whole"]) for a in report.adopted} == {
        ("org/A", False), ("org/B", False), ("org/C", False)}
    assert not report.skipped and not {"org/A", "org/B", "org/C"} & {r["name"] for r in store.ls()}
    for repo, slot, model in (("org/A", "vae", vae), ("org/C", "text_encoder", text_encoder)):
        same_state(compstore.load_component(repo, slot, store=store, local_files_only=True), model)
    pipe = compstore.DiffusionPipeline.from_pretrained("org/B", vae=vae, store=store, local_files_only=True)
    assert pipe.vae is vae and type(pipe.unet).__name__ == "UNet2DConditionModel"
    with pytest.raises(compstore.RefNotFoundError):  # the whole pipeline was never in the cache
        compstore.DiffusionPipeline.from_pretrained("org/B", store=store, local_files_only=True)
    from click.testing import CliRunner

    from compstore.cli import cli

    r = CliRunner().invoke(cli, ["--store", str(store.home), "adopt", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and [line.split()[2] for line in r.output.splitlines()
                                 if line.startswith("org/")] == ["part"] * 3, r.output


def test_adopt_goes_on_past_damaged_revisions_and_names_them(hub, store, family, tmp_path):
    """One bad download no longer stops the adoption of the rest of the cache (it
    raised at the first one), nor is a repo huggingface_hub cannot read dropped
    without a word, nor a model folder left without its weights called whole."""
    import os

    from click.testing import CliRunner
    from huggingface_hub import snapshot_download

    from compstore.cli import cli

    cache = tmp_path / "hf-cache"
    snaps = {n: Path(snapshot_download(f"org/{n}", cache_dir=cache, endpoint=hub.url)) for n in "ABCD"}
    (snaps["A"] / "vae" / "diffusion_pytorch_model.safetensors").resolve().unlink()  # a broken link
    unet_b = (snaps["B"] / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    os.truncate(unet_b, unet_b.stat().st_size // 2)  # an interrupted download
    for f in (snaps["C"] / "unet").glob("diffusion_pytorch_model*"):  # weights never fetched
        f.unlink()
    report = store.adopt(cache)
    assert {(a["repo"], a["whole"]) for a in report.adopted} == {("org/C", False), ("org/D", True)}
    reasons = {k["repo"]: k["reason"] for k in report.skipped}
    assert "malformed safetensors" in reasons["org/B"] and "broken symlink" in reasons["org/A"]
    assert {r["name"] for r in store.ls()} >= {"org/D"} and "org/C" not in {r["name"] for r in store.ls()}
    assert not [r for r in store.ls() if r["name"].startswith(("org/A", "org/B"))]  # nothing of them
    [c_ref] = [a["ref"] for a in report.adopted if a["repo"] == "org/C"]
    with pytest.raises(compstore.WeightsNotFoundError):  # C's unet: config.json alone
        compstore.DiffusionPipeline.from_pretrained(c_ref, store=store)
    r = CliRunner().invoke(cli, ["--store", str(store.home), "adopt", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and "org/B@" in r.output and "malformed safetensors" in r.output
    assert "org/A@?: unreadable in the cache" in r.output


def test_adopt_without_a_cache_is_a_clear_error(store, tmp_path):
    from conftest import store_state

    before = store_state(store.home)
    with pytest.raises(compstore.CompstoreError, match="no Hugging Face cache"):
        store.adopt(tmp_path / "nope")
    assert store_state(store.home) == before


def test_xet_hashes_from_the_hub_are_kept_beside_sha256(hub, store, family):
    from hub_emulator import xet_hash

    hub.repos["org/A"].xet_hashes = True
    r = store.pull("org/A")  # the emulator has no Xet service: hf_xet fails, HTTP takes over
    assert r.downloaded_bytes == sum(len(b) for b in files_of(family["A"]).values())
    rows = store.db.execute("SELECT sha256, xet_hash, size FROM files WHERE kind = 'safetensors'").fetchall()
    by_sha = {hashlib.sha256(p.read_bytes()).hexdigest(): xet_hash(p.read_bytes())
              for p in Path(family["A"]).rglob("*.safetensors")}
    assert rows and all(xet == by_sha[sha] for sha, xet, _ in rows)


@pytest.fixture
def published(hub, family, tmp_path):
    """org/X: D with a published repo's extras (`hub_emulator.publish_with_extras`)."""
    from hub_emulator import publish_with_extras

    repo = publish_with_extras(family, tmp_path / "X")
    hub.add_repo("org/X", repo)
    return repo


def diffusers_download(hub, variant, cache_dir) -> set[str]:
    """The files diffusers' own `from_pretrained` downloads from the emulated Hub."""
    import diffusers
    from hub_emulator import huggingface_hub_default_endpoint

    with huggingface_hub_default_endpoint(hub.url):
        folder = diffusers.DiffusionPipeline.download("org/X", variant=variant, cache_dir=str(cache_dir))
    return set(files_of(Path(folder)))


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_a_pull_fetches_what_from_pretrained_loads(hub, store, published, tmp_path, variant):
    """Not the other variant's weights, nor the single-file checkpoint, the LoRA or the
    folder model_index.json does not name: the files diffusers downloads (less
    vae_1_0's weights, which diffusers takes as it takes every `diffusion_pytorch_model`
    file one folder deep, and its pipeline never loads), and the README at the root
    (but not the model card's image: diffusers leaves both).
    The pipeline loads as diffusers loads the folder."""
    import diffusers

    theirs = diffusers_download(hub, variant, tmp_path / "hf")
    hub.reset_counts()
    r = store.pull("org/X", variant=variant)
    ours = {row[0] for row in store.snapshot_files(store.resolve(r.ref))}
    assert ours == {p for p in theirs if not p.startswith("vae_1_0/")} | {"README.md"}
    assert "grid.jpg" not in theirs | ours | set(hub.served_files)
    assert r.files == r.downloaded_files == len(ours) and hub.served_bytes == r.downloaded_bytes
    pipe = compstore.DiffusionPipeline.from_pretrained("org/X", store=store, variant=variant)
    reference = diffusers.DiffusionPipeline.from_pretrained(published, variant=variant)
    for slot in ("unet", "vae", "text_encoder"):
        same_state(getattr(pipe, slot), getattr(reference, slot))
    hub.reset_counts()
    assert store.pull("org/X", variant=variant).status == "unchanged" and hub.served_bytes == 0


def test_pull_all_fetches_the_repo_as_published(hub, store, published, tmp_path):
    store.pull("org/X")
    r = store.pull("org/X", all_files=True)  # adds the rest to the commit's ref
    assert r.status == "updated" and store.resolve("org/X") == store.resolve(r.ref)
    store.export(r.ref, tmp_path / "out")
    expected = tree_sha256(published)
    del expected["unet/openvino_model.xml"]  # another framework's weights: never pulled
    assert tree_sha256(tmp_path / "out") == expected
    hub.reset_counts()
    assert store.pull("org/X").status == "unchanged" and hub.served_bytes == 0  # held: all of it


def test_pull_all_with_a_variant_is_refused(hub, store, published):
    from click.testing import CliRunner

    from compstore.cli import cli
    from conftest import store_state

    before = store_state(store.home)
    r = CliRunner().invoke(cli, ["--store", str(store.home), "pull", "org/X", "--all", "--variant", "fp16"])
    assert r.exit_code == 1 and "--all) takes every variant" in r.stderr
    assert hub.served_bytes == 0 and store_state(store.home) == before


def test_an_include_pull_then_a_full_one_fetches_the_rest(hub, store, family, tmp_path):
    """An `include` pull holds part of a commit (and its model_index.json); a later
    pull of that commit adds what it lacks to it, and the pipeline loads."""
    first = store.pull("org/A", include=["unet/*"])
    assert {row[0] for row in store.snapshot_files(store.resolve(first.ref))} == {
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    hub.reset_counts()
    r = store.pull("org/A")
    unet = (family["A"] / "unet/diffusion_pytorch_model.safetensors").stat().st_size
    total = sum(len(b) for b in files_of(family["A"]).values())
    assert (r.status, r.ref) == ("updated", first.ref)
    assert hub.served_bytes == r.downloaded_bytes == total - unet - sum(
        (family["A"] / p).stat().st_size for p in ("model_index.json", "unet/config.json"))
    store.export("org/A", tmp_path / "A")
    assert tree_sha256(tmp_path / "A") == tree_sha256(family["A"])
    compstore.DiffusionPipeline.from_pretrained("org/A", store=store)


def test_files_the_index_lists_in_ignore_files_are_not_pulled(hub, store, family, tmp_path):
    """diffusers' download leaves out the files model_index.json lists in `_ignore_files`."""
    import json
    import shutil

    repo = tmp_path / "ignoring"
    shutil.copytree(family["A"], repo)
    (repo / "unet" / "training_notes.txt").write_text("not for download\n" * 1000)
    index = json.loads((repo / "model_index.json").read_text())
    (repo / "model_index.json").write_text(json.dumps({**index, "_ignore_files": [
        "unet/training_notes.txt"]}))
    hub.add_repo("org/X", repo)
    theirs = diffusers_download(hub, None, tmp_path / "hf")
    hub.reset_counts()
    r = store.pull("org/X")
    ours = {row[0] for row in store.snapshot_files(store.resolve(r.ref))}
    assert "unet/training_notes.txt" not in theirs | ours | set(hub.served_files)
    assert ours == theirs
    compstore.DiffusionPipeline.from_pretrained("org/X", store=store, local_files_only=True)


def test_a_pipeline_index_that_is_not_json_is_refused_before_any_weight_is_fetched(hub, store, family,
                                                                                   tmp_path):
    import shutil

    from conftest import store_state

    repo = tmp_path / "bad"
    shutil.copytree(family["A"], repo)
    (repo / "model_index.json").write_text("{not json")
    hub.add_repo("org/bad", repo)
    before = store_state(store.home)
    with pytest.raises(compstore.InvalidInputError, match="model_index.json: not a JSON object"):
        store.pull("org/bad")
    assert set(hub.served_files) == {"model_index.json"}
    assert store_state(store.home) == before


def test_a_variant_no_folder_has_is_refused_before_any_weight_is_fetched(hub, store):
    """diffusers' download refuses it too, rather than fetching the default weights."""
    from click.testing import CliRunner

    from compstore.cli import cli
    from conftest import store_state

    before = store_state(store.home)
    with pytest.raises(compstore.VariantNotFoundError,
                       match=r"org/A@\w+ has no 'fp16' weights \(the weights come as: default\); "
                             r"pull it without --variant"):
        store.pull("org/A", variant="fp16")
    assert set(hub.served_files) == {"model_index.json"}
    with pytest.raises(ValueError):  # from_pretrained pulls first: the same refusal
        compstore.DiffusionPipeline.from_pretrained("org/A", store=store, variant="fp16")
    r = CliRunner().invoke(cli, ["--store", str(store.home), "pull", "org/A", "--variant", "fp16"])
    assert r.exit_code == 1 and "has no 'fp16' weights" in r.stderr
    assert set(hub.served_files) == {"model_index.json"}
    assert store_state(store.home) == before


def test_a_variant_pull_is_found_offline(hub, store):
    """A pull in a variant moves `repo[variant]`, where offline loads in it look."""
    r = store.pull("org/D", variant="fp16")
    assert store.resolve("org/D[fp16]") == store.resolve(r.ref) and not store.has_ref("org/D")
    hub.reset_counts()
    pipe = compstore.DiffusionPipeline.from_pretrained("org/D", store=store, variant="fp16",
                                                       local_files_only=True)
    assert pipe.text_encoder.dtype == torch.float16 and hub.served_bytes == 0


def test_load_component_pulls_the_variant_it_asks_for(hub, store):
    te = compstore.load_component("org/D", "text_encoder", store=store, variant="fp16")
    assert te.dtype == torch.float16
    assert "text_encoder/model.fp16.safetensors" in hub.served_files
    assert "text_encoder/model.safetensors" not in hub.served_files


def test_pull_a_variant_and_skip_pickles(hub, store, family, tmp_path):
    import shutil

    repo = tmp_path / "D-with-bin"
    shutil.copytree(family["D"], repo)
    (repo / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04N." * 1000)
    hub.add_repo("org/D2", repo)
    r = store.pull("org/D2", variant="fp16")
    assert r.ref.endswith("[fp16]")
    served = set(hub.served_files)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in served
    assert "unet/diffusion_pytorch_model.safetensors" not in served
    assert not any(p.endswith(".bin") for p in served)
    pipe = compstore.DiffusionPipeline.from_pretrained(r.ref, store=store, variant="fp16")
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float16  # as diffusers


def test_load_component_from_the_hub_pulls_that_folder_alone(hub, store, family):
    """As diffusers' `subfolder=` downloads one folder: org/A's UNet costs its folder
    (and the index), not the pipeline. Offline, it is found again; a later pull of
    the pipeline fetches the rest only; a folder the repo lacks is a clear error."""
    import diffusers

    theirs = diffusers.UNet2DConditionModel.from_pretrained(family["A"], subfolder="unet")
    unet_files = {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    for local_files_only in (False, True):
        hub.reset_counts()
        same_state(compstore.load_component("org/A", "unet", store=store,
                                            local_files_only=local_files_only), theirs)
        assert set(hub.served_files) == (set() if local_files_only else {"model_index.json"} | unet_files)
    with pytest.raises(compstore.RefNotFoundError):  # the pipeline was not pulled
        compstore.DiffusionPipeline.from_pretrained("org/A", store=store, local_files_only=True)
    hub.reset_counts()
    store.pull("org/A")
    assert hub.served_files and not set(hub.served_files) & unet_files
    compstore.DiffusionPipeline.from_pretrained("org/A", store=store, local_files_only=True)
    with pytest.raises(HubError, match="no files to pull: none matches nothing/"):
        compstore.load_component("org/A", "nothing", store=store)


def test_components_passed_in_are_not_pulled(hub, store, family):
    """As diffusers' download leaves out the folders of the components passed in:
    with vae= given, org/A's vae/ is not fetched, online or offline the pipeline
    loads with it, and its image is diffusers'."""
    import diffusers
    import numpy as np
    from test_loader import image

    vae = diffusers.AutoencoderKL.from_pretrained(family["A"], subfolder="vae")
    for local_files_only in (False, True):
        hub.reset_counts()
        pipe = compstore.DiffusionPipeline.from_pretrained(
            "org/A", store=store, vae=vae, safety_checker=None, local_files_only=local_files_only)
        assert pipe.vae is vae and bool(hub.served_files) != local_files_only
        assert not [p for p in hub.served_files if p.startswith("vae/")]
    theirs = diffusers.DiffusionPipeline.from_pretrained(family["A"], vae=vae, safety_checker=None)
    assert np.array_equal(image(pipe), image(theirs))
    with pytest.raises(compstore.RefNotFoundError):  # the pipeline with its own VAE was not pulled
        compstore.DiffusionPipeline.from_pretrained("org/A", store=store, local_files_only=True)
    compstore.DiffusionPipeline.from_pretrained("org/A", store=store, token=None)  # no component
    assert store.has_ref("org/A")  # so the whole pipeline: `org/A` names it


def test_pull_exclude_leaves_files_out(hub, store, family):
    import json

    from click.testing import CliRunner

    from compstore.cli import cli

    r = CliRunner().invoke(cli, ["--store", str(store.home), "pull", "org/A", "--exclude", "vae/*",
                                 "--exclude", "text_encoder/*", "--json"])
    assert r.exit_code == 0, r.output
    held = {row[0] for row in store.snapshot_files(store.resolve(json.loads(r.output)["ref"]))}
    assert held == set(files_of(family["A"])) - {p for p in files_of(family["A"])
                                                  if p.startswith(("vae/", "text_encoder/"))}
    assert set(hub.served_files) == held and not store.has_ref("org/A")  # `org/A`: whole pulls only


def test_load_component_of_a_modular_repo_follows_its_pointer(hub, store, tmp_path):
    """org/remix's VAE is an entry pointing at org/sdxl-base: one model of it pulls
    the remix's index and what its entries point at, not the remix's own UNet (a
    pinned model was not found by load_component before: "no component in slot")."""
    import diffusers

    publish_remix(hub, tmp_path, "org/sdxl-base", ("vae", "text_encoder"))
    same_state(compstore.load_component("org/remix", "vae", store=store),
               diffusers.AutoencoderKL.from_pretrained(tmp_path / "base", subfolder="vae"))
    assert not [p for p in hub.served_files if p.startswith("unet/")]


def test_a_pull_needs_the_disk_of_one_copy_of_what_it_downloads(hub, store, family, monkeypatch):
    """Each downloaded weights file is deleted once its bytes are in the store's new
    packs: while the pull ingests, its downloads and the packs do not hold the
    weights twice (they did: up to twice the new bytes)."""
    from compstore.store import ingest

    held = []

    def on_disk() -> int:
        return sum(p.stat().st_size for d in ("downloads", "tmp") for p in (store.home / d).rglob("*")
                   if p.is_file())

    real = ingest.Ingestor.ingest_file
    monkeypatch.setattr(ingest.Ingestor, "ingest_file",
                        lambda self, f, sha256=None: (held.append(on_disk()), real(self, f, sha256))[1])
    store.pull("org/A")
    total = sum(len(b) for b in files_of(family["A"]).values())
    assert len(held) == len(files_of(family["A"])) and held[0] >= total  # all downloaded first
    assert max(held) <= total * 1.02  # pack alignment aside
    assert not list((store.home / "downloads").iterdir()) and store.verify().ok


def test_a_pull_whose_ingest_fails_gets_there_next_time(hub, store, family, monkeypatch):
    """The weights files ingested before the failure are gone from downloads/ (their
    bytes were in packs the failure dropped): the next pull fetches those again,
    and only those."""
    from compstore import DiskFullError
    from compstore.store import ingest
    from conftest import store_state

    before = store_state(store.home)
    real, calls = ingest.Ingestor.ingest_file, []

    def fails_after_a_weights_file(self, f, sha256=None):
        if any(p.endswith(".safetensors") for p in calls):
            raise DiskFullError("disk full (test)")
        calls.append(f.path)
        return real(self, f, sha256)

    monkeypatch.setattr(ingest.Ingestor, "ingest_file", fails_after_a_weights_file)
    with pytest.raises(DiskFullError):
        store.pull("org/A")
    assert store_state(store.home) == before
    monkeypatch.setattr(ingest.Ingestor, "ingest_file", real)
    hub.reset_counts()
    store.pull("org/A")
    consumed = [p for p in calls if p.endswith(".safetensors")]
    assert len(consumed) == 1 and hub.served_files == consumed and store.verify().ok
    store.export("org/A", store.home.parent / "out")
    assert tree_sha256(store.home.parent / "out") == tree_sha256(family["A"])


def test_a_pull_of_many_files_may_open_a_lock_for_each():
    """A pull holds one lock file open per large file it fetches: it raises the
    process's soft limit on open files as far as the hard one lets it."""
    import resource

    from compstore.store.hub import _may_open

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"hard limit {hard}: too low to raise the soft one here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        assert _may_open(2048) and resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 2048
        assert hard == resource.RLIM_INFINITY or not _may_open(hard + 1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_disk_that_fills_up_during_a_download_is_named_as_such(hub, store, monkeypatch):
    """A full disk is not a Hub failure: the error says so, and what to do."""
    import errno

    from compstore import DiskFullError
    from compstore.store import hub as hub_module
    from conftest import store_state

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hub_module, "_fetch", full)
    before = store_state(store.home)
    with pytest.raises(DiskFullError, match="org/A: the disk filled up while downloading: free space"):
        store.pull("org/A")
    assert store_state(store.home) == before


def test_a_load_falls_back_to_the_store_when_the_hub_is_unreachable(hub, store, family, caplog):
    """As diffusers falls back to its cache: with the network down, a repo the store
    holds loads from it, with a warning naming the failure and the commit; one it
    lacks is a clear error, and the store is left as it was."""
    from conftest import store_state

    pulled = store.pull("org/A")
    store.pull("org/B", include=["vae/*"])
    theirs = compstore.DiffusionPipeline.from_pretrained("org/A", store=store, local_files_only=True)
    hub.close()  # connection refused from here on
    before = store_state(store.home)
    with caplog.at_level("WARNING", logger="compstore"):
        ours = compstore.DiffusionPipeline.from_pretrained("org/A", store=store)
    same_state(ours.unet, theirs.unet)
    assert "the Hub request failed ([Errno 111] Connection refused); nothing was downloaded" in caplog.text
    assert f"Loading the store's org/A (commit {pulled.commit}) instead" in caplog.text
    same_state(compstore.load_component("org/B", "vae", store=store),
               compstore.load_component(str(family["B"]), "vae", store=Store(store.home.parent / "other")))
    with pytest.raises(compstore.HubUnavailableError, match="org/C: the Hub request failed"):
        compstore.DiffusionPipeline.from_pretrained("org/C", store=store)
    with pytest.raises(compstore.HubUnavailableError, match="org/B: the Hub request failed"):
        compstore.DiffusionPipeline.from_pretrained("org/B", store=store)  # it holds B's vae alone
    assert store_state(store.home) == before


def test_an_offline_load_at_a_revision_gets_that_commit_or_an_error(hub, store, family):
    """A pull at a tag records it (`org/V@v1.0`), so an offline load at that tag gets
    that commit. A revision the store holds no pull of is an error, never the
    latest pull of another commit, as it was until 2026-12-07."""
    old = hub.add_repo("org/V", family["A"])
    hub.repos["org/V"].refs["v1.0"] = old
    new = hub.add_repo("org/V", family["B"])  # main moves on
    store.pull("org/V", revision="v1.0")
    store.pull("org/V")
    assert {"org/V", f"org/V@{old}", f"org/V@{new}", "org/V@v1.0"} == {r["name"] for r in store.ls()}
    a = compstore.load_component(str(family["A"]), "unet", store=Store(store.home.parent / "a"))
    b = compstore.load_component(str(family["B"]), "unet", store=Store(store.home.parent / "b"))

    def unet(revision, **kwargs):
        return compstore.DiffusionPipeline.from_pretrained("org/V", store=store, revision=revision,
                                                           **kwargs).unet

    for revision, expected in [("v1.0", a), (old, a), (old[:7], a), (new[:7], b), ("main", b), (None, b)]:
        same_state(unet(revision, local_files_only=True), expected)
    before = store_state(store.home)
    for revision in ("0" * 40, "0" * 7, "v2.0"):
        with pytest.raises(compstore.RefNotFoundError, match=f"no ref named 'org/V@{revision}'"):
            unet(revision, local_files_only=True)
    assert store_state(store.home) == before
    hub.close()  # the Hub down: the same, with a warning, and its error where the store lacks it
    same_state(unet("v1.0"), a)
    with pytest.raises(compstore.HubUnavailableError, match="org/V: the Hub request failed"):
        unet("v2.0")


def test_a_pull_of_a_pr_or_a_tag_leaves_the_repos_ref_at_main(hub, store, family):
    """`revision="refs/pr/1"` (a PR's weights, tried before it merges) is pulled and
    loaded at that revision, and leaves `org/V` where main's pull put it, as the Hub
    cache's refs/main stays on main: until 2026-12-07 it moved `org/V`, so an offline
    load of the repo, or at "main", got the PR's weights. So does an older tag."""
    main = hub.add_repo("org/V", family["A"])
    pr = hub.add_repo("org/V", family["B"])
    old = hub.add_repo("org/V", family["C"])
    hub.repos["org/V"].refs.update({"main": main, "refs/pr/1": pr, "v0.9": old})
    a = compstore.load_component(str(family["A"]), "unet", store=Store(store.home.parent / "a"))
    b = compstore.load_component(str(family["B"]), "unet", store=Store(store.home.parent / "b"))

    def unet(revision, **kwargs):
        return compstore.DiffusionPipeline.from_pretrained("org/V", store=store, revision=revision,
                                                           **kwargs).unet

    store.pull("org/V")
    same_state(unet("refs/pr/1"), b)  # pulled on the way
    assert store.pull("org/V", revision="v0.9").status == "new"
    assert {"org/V", "org/V@refs/pr/1", "org/V@v0.9"} <= {r["name"] for r in store.ls()}
    assert store.resolve("org/V") == store.resolve(f"org/V@{main}")
    for revision, expected in [(None, a), ("main", a), ("refs/pr/1", b), (pr[:7], b)]:
        same_state(unet(revision, local_files_only=True), expected)
    from click.testing import CliRunner

    from compstore.cli import cli

    r = CliRunner().invoke(cli, ["--store", str(store.home), "pull", "org/V", "--revision", "refs/pr/1", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "unchanged" and store.resolve("org/V") == store.resolve(f"org/V@{main}")


def test_a_pull_that_a_gc_overtakes_rebuilds_held_files_or_fetches_them(hub, store, family, monkeypatch):
    """Three processes pulling, removing and collecting at once saw pulls fail: a file
    found held was gone when it was written out (TypeError), a stored index read as
    None ('not a JSON object'), a snapshot gone when its ref was moved. The lookups
    and what follows them now run under `store.reading()`, which gc waits for."""
    import compstore.store.hub as hub_module

    a = store.pull("org/A")
    store.rm(a.ref), store.rm("org/A")  # A's files stay until a gc: B finds its index, VAE ... held
    real_reading, collected = store.reading, []

    def reading_after_a_gc():  # the pull's first reading: a gc comes first, or waits for it
        if not collected:
            collected.append(collect_beside(store))
        return real_reading()

    monkeypatch.setattr(store, "reading", reading_after_a_gc)
    b = store.pull("org/B")
    assert collected and recorded_sha256(store, b.ref) == tree_sha256(family["B"])
    collected[0].wait(30)
    monkeypatch.setattr(store, "reading", real_reading)
    assert store.verify().ok

    real_pins = hub_module.pins_of

    def pins_then_collected(store_, snapshot):  # `already_here` has resolved the ref
        collect_beside(store, [b.ref, "org/B"])
        return real_pins(store_, snapshot)

    monkeypatch.setattr(hub_module, "pins_of", pins_then_collected)
    again = store.pull("org/B")  # found held, then removed: fetched again
    assert recorded_sha256(store, again.ref) == tree_sha256(family["B"]) and store.verify().ok


def test_a_modular_pointer_at_a_tag_is_pinned_offline_at_that_tag_only(hub, store, tmp_path, monkeypatch):
    """A modular repo's pointer at another repo's tag: online, the tag's commit is
    pulled and pinned. Offline, an ingest of the same folder finds the commit that
    tag named when it was pulled, and never the repo's main: until 2026-12-07 it
    pinned whatever the store held as the repo at main. A tag never pulled is
    refused, with the store unchanged."""
    import json

    from huggingface_hub import constants

    from compstore import InvalidInputError
    from compstore.loader.synthetic import tiny_sdxl_pipeline

    publish_remix(hub, tmp_path, "org/sdxl-base", ("vae",))
    base = hub.repos["org/sdxl-base"]
    base.refs["v1"] = tagged = base.refs["main"]
    tiny_sdxl_pipeline(seed=9).vae.save_pretrained(tmp_path / "base" / "vae")
    assert hub.add_repo("org/sdxl-base", tmp_path / "base") != tagged  # main moves on
    remix = tmp_path / "remix"
    index = json.loads((remix / "modular_model_index.json").read_text())
    index["vae"][2]["revision"] = "v1"
    (remix / "modular_model_index.json").write_text(json.dumps(index))
    hub.add_repo("org/remix", remix)

    store.pull("org/sdxl-base")  # main: the other VAE
    store.pull("org/remix")
    [pin] = store.show("org/remix")["pins"]
    assert pin["source"] == f"org/sdxl-base@{tagged}"

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    store.ingest(remix, "remix-offline")
    [again] = store.show("remix-offline")["pins"]
    assert (again["source"], again["component_id"]) == (pin["source"], pin["component_id"])

    index["vae"][2]["revision"] = "v2"  # a tag the store never pulled
    (remix / "modular_model_index.json").write_text(json.dumps(index))
    before = store_state(store.home)
    with pytest.raises(InvalidInputError, match="neither a local folder nor a ref.*--name org/sdxl-base@v2"):
        store.ingest(remix, "remix-v2")
    assert store_state(store.home) == before
