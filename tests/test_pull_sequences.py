"""Random sequences of pulls from an emulated Hub, with loads, removals, collections
and new commits in between; two of the repos are served the Xet way too.

Pulls ask for whole pipelines, one folder (`include`), all but one (`exclude`), or
the fp16 variant; repos get new commits. After each pull no file was downloaded
whose content the store held before it (what a store holds is fetched once), and
after each step every ref's files are the Hub's at the ref's commit, payloads
verify, and loads equal plain diffusers' from the same files.
"""

import hashlib
import random

import diffusers
import pytest
import torch

import compstore
from compstore import VariantNotFoundError
from conftest import recorded_sha256, run_random_steps, store_state, use_hub
from hub_emulator import HubEmulator, publish_with_extras

SLOTS = ("unet", "vae", "text_encoder")
XET = {"org/B", "org/D"}  # their weights come through compstore's Xet client


class Sequence:
    def __init__(self, store, family, tmp_path, monkeypatch, seed: int):
        self.store, self.family, self.rng = store, family, random.Random(seed)
        self.hub = HubEmulator()
        use_hub(monkeypatch, self.hub)
        self.folder_of: dict[str, object] = {}  # commit -> the family folder it publishes
        for name in "ABC":
            self.publish(f"org/{name}", family[name])
        self.publish("org/D", publish_with_extras(family, tmp_path / "D"))  # fp16 files and extras
        self.log: list[str] = []
        self.via = {"xet": 0, "http": 0}  # files downloaded each way, in all

    def close(self) -> None:
        self.hub.close()

    def publish(self, repo: str, folder) -> None:
        self.folder_of[self.hub.add_repo(repo, folder, xet=repo in XET)] = folder

    def repo(self) -> str:
        return self.rng.choice(sorted(self.hub.repos))

    def hub_files(self, repo: str, commit: str) -> dict[str, str]:
        files = self.hub.repos[repo].commits[commit]
        return {p: hashlib.sha256(data).hexdigest() for p, data in files.items()}

    def held(self) -> set[str]:
        return {row[0] for row in self.store.db.execute("SELECT sha256 FROM files")}

    # -- the steps ---------------------------------------------------------------------
    def pull(self, repo: str | None = None) -> None:
        repo, slot = repo or self.repo(), self.rng.choice(SLOTS)
        kwargs = self.rng.choice([{}, {}, {"include": [f"{slot}/*"]}, {"exclude": [f"{slot}/*"]}])
        if self.rng.random() < 0.3:
            kwargs["variant"] = "fp16"
        self.log.append(f"pull {repo} {kwargs}")
        held, before = self.held(), store_state(self.store.home)
        commit = self.hub.repos[repo].refs["main"]
        self.hub.reset_counts()
        try:
            result = self.store.pull(repo, **kwargs)
        except VariantNotFoundError:  # fp16 of a repo without fp16 files: refused, as diffusers does
            assert "variant" in kwargs and not any(".fp16." in p for p in self.hub_files(repo, commit))
            assert store_state(self.store.home) == before  # the index may have been fetched, no weight
            assert set(self.hub.served_files) <= {"model_index.json"}
            return
        assert result.commit == commit
        files = self.hub_files(repo, commit)
        fetched_again = [p for p in self.hub.served_files if files[p] in held]
        assert not fetched_again, f"downloaded again: {fetched_again}"
        assert result.http_files == len(self.hub.served_files)
        self.via["xet"] += result.xet_files
        self.via["http"] += result.http_files
        new = {p for p, sha in recorded_sha256(self.store, result.ref).items() if sha not in held}
        if not new & set(self.hub.repos[repo].xet_files.get(commit, {})):
            assert self.hub.xet_served_bytes == 0  # no Xet file it lacked: no chunk fetched

    def load_component(self) -> None:
        """Online: pulls the folder (if the store lacks it) and loads it."""
        repo, slot = self.repo(), self.rng.choice(SLOTS)
        self.log.append(f"load_component {repo} {slot}")
        ours = compstore.load_component(repo, slot, store=self.store)
        folder = self.folder_of[self.hub.repos[repo].refs["main"]]
        theirs = getattr(diffusers.StableDiffusionPipeline.from_pretrained(folder), slot)
        self.assert_same(ours, theirs, repo, slot)

    def load_offline(self) -> None:
        held = [r["name"] for r in self.store.ls() if "@" not in r["name"] and "[" not in r["name"]]
        if not held:
            return
        repo = self.rng.choice(sorted(held))
        self.log.append(f"load {repo} offline")
        ours = compstore.DiffusionPipeline.from_pretrained(repo, store=self.store, local_files_only=True)
        folder = self.folder_of[self.store.snapshot(self.store.resolve(repo))["revision"]]
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
        for slot in SLOTS:
            self.assert_same(getattr(ours, slot), getattr(theirs, slot), repo, slot)

    def new_commit(self) -> None:
        repo, name = self.rng.choice(["org/A", "org/B"]), self.rng.choice("ABC")
        self.log.append(f"commit {name}'s files to {repo}")
        self.publish(repo, self.family[name])

    def rm(self) -> None:
        refs = sorted(r["name"] for r in self.store.ls())
        if refs:
            ref = self.rng.choice(refs)
            self.log.append(f"rm {ref}")
            self.store.rm(ref)

    def gc(self) -> None:
        self.log.append("gc")
        self.store.gc()

    # -- checks ------------------------------------------------------------------------
    @staticmethod
    def assert_same(ours, theirs, repo: str, slot: str) -> None:
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (repo, slot)

    def check(self) -> None:
        for ref in self.store.ls():
            snapshot = self.store.snapshot(self.store.resolve(ref["name"]))
            recorded = recorded_sha256(self.store, ref["name"])
            hub = self.hub_files(snapshot["source"], snapshot["revision"])
            assert recorded and recorded.items() <= hub.items(), ref["name"]
        assert self.store.verify().ok


@pytest.mark.parametrize("seed", range(3))
def test_random_pulls_fetch_what_the_store_lacks_once_and_load_as_diffusers(store, family, tmp_path,
                                                                           monkeypatch, seed):
    run = Sequence(store, family, tmp_path, monkeypatch, seed)
    steps = [run.pull] * 4 + [run.load_component, run.load_offline, run.new_commit, run.rm, run.gc]
    try:
        run.pull("org/D")  # a Xet repo first, so that every run takes both ways
        run_random_steps(run.rng, steps, 30, run.log, lambda i: run.check(), f"seed {seed}, ")
    finally:
        run.close()
    assert all(run.via.values()), run.via  # both ways were taken
