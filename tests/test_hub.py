"""`pull` against a Hub emulated on 127.0.0.1: only what the store lacks is served."""

import hashlib
from pathlib import Path

import pytest
import torch

import compstore
from compstore import HubError, Store
from conftest import tree_sha256
from hub_emulator import HubEmulator


@pytest.fixture
def hub(monkeypatch, family):
    import huggingface_hub.constants as constants

    hub = HubEmulator()
    for name in "ABCD":
        hub.add_repo(f"org/{name}", family[name])
    hub.add_repo("org/private", family["A"], private=True)
    hub.add_repo("org/gated", family["A"], gated=True)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
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

    for name in "BCD":
        hub.reset_counts()
        r = store.pull(f"org/{name}")
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


@pytest.mark.parametrize("repo,revision,message", [
    ("org/missing", None, "was not found on the Hub, or it is private"),
    ("org/private", None, "was not found on the Hub, or it is private"),
    ("org/gated", None, "is gated: accept its conditions"),
    ("org/A", "no-such-branch", "has no revision 'no-such-branch'"),
])
def test_hub_errors_are_clear(hub, store, repo, revision, message):
    with pytest.raises(HubError, match=message):
        store.pull(repo, revision=revision)
    assert store.ls() == []


def test_private_repo_with_a_token(hub, store):
    r = store.pull("org/private", token=hub.token)
    assert r.downloaded_files > 0


def test_cli_pull_json(hub, tmp_path):
    import json

    from click.testing import CliRunner

    from compstore.cli import cli

    r = CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), "pull", "org/C", "--include",
                                 "tokenizer/*", "--include", "scheduler/*", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["downloaded_bytes"] == hub.served_bytes and doc["files"] == doc["downloaded_files"] == 3
    assert set(hub.served_files) == {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                                     "scheduler/scheduler_config.json"}
    r = CliRunner().invoke(cli, ["--store", str(tmp_path / "s"), "pull", "org/nope"])
    assert r.exit_code == 1 and r.stderr.startswith("Error: org/nope was not found")
