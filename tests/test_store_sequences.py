"""Random sequences of store operations on folders that change between ingests.

Copies of the tiny family are edited in place as users edit pipeline folders (a
config rewritten, bytes of one tensor changed, a weights file replaced by another
member's, a file touched), and ingested again under their own ref (where the stat
cache decides what to read), under new refs, loaded from their paths, removed and
collected. After each step every ref's files, as the catalog records them, are the
folder's files as they were at that ref's ingest; payloads verify; now and then
every ref is exported and compared byte for byte, and a collection leaves nothing
for the next one to collect.
"""

import json
import random
import shutil
import struct

import diffusers
import pytest
import torch

import compstore
from conftest import recorded_sha256, run_random_steps, tree_sha256


class Sequence:
    def __init__(self, store, family, tmp_path, seed: int):
        self.store, self.tmp, self.rng = store, tmp_path, random.Random(seed)
        self.folders = {}
        for name in "ABC":
            self.folders[name] = tmp_path / f"folder-{name}"
            shutil.copytree(family[name], self.folders[name])
        self.expected: dict[str, dict[str, str]] = {}  # ref -> path -> sha256 at its ingest
        self.log: list[str] = []
        self.refs_made = 0

    def folder(self):
        name = self.rng.choice(sorted(self.folders))
        return name, self.folders[name]

    def files(self, folder, suffix: str) -> list:
        return sorted(p for p in folder.rglob(f"*{suffix}") if p.is_file())

    # -- edits of a folder -------------------------------------------------------------
    def edit_config(self) -> None:
        name, folder = self.folder()
        path = self.rng.choice([p for p in self.files(folder, ".json")  # what loads still take
                                if p.name in ("config.json", "scheduler_config.json", "model_index.json")])
        data = json.loads(path.read_text())
        data["_edited"] = self.rng.randrange(1 << 30)
        path.write_text(json.dumps(data))
        self.log.append(f"edit {name}/{path.relative_to(folder)}")

    def edit_tensor(self) -> None:
        """Bytes of one tensor changed in place: same size, same header."""
        name, folder = self.folder()
        path = self.rng.choice(self.files(folder, ".safetensors"))
        with open(path, "r+b") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            tensor = self.rng.choice(sorted(k for k in header if k != "__metadata__"))
            begin, end = header[tensor]["data_offsets"]
            if end - begin < 4:
                return
            at = 8 + n + self.rng.randrange(begin, end - 3)
            f.seek(at)
            f.write(self.rng.randbytes(4))
        self.log.append(f"edit tensor {tensor} of {name}/{path.relative_to(folder)}")

    def replace_file(self) -> None:
        """A weights file replaced by another member's of the same path (a fine-tune's
        UNet saved over the base's, say)."""
        name, folder = self.folder()
        other, source = self.folder()
        paths = sorted({p.relative_to(folder) for p in self.files(folder, ".safetensors")}
                       & {p.relative_to(source) for p in self.files(source, ".safetensors")})
        if other == name or not paths:
            return
        path = self.rng.choice(paths)
        shutil.copyfile(source / path, folder / path)
        self.log.append(f"replace {name}/{path} with {other}'s")

    def touch(self) -> None:
        """A new mtime, the same bytes: whatever the stat cache does, nothing changes."""
        name, folder = self.folder()
        path = self.rng.choice(self.files(folder, ""))
        path.touch()
        self.log.append(f"touch {name}/{path.relative_to(folder)}")

    # -- store operations --------------------------------------------------------------
    def ingest(self) -> None:
        name, folder = self.folder()
        ref = name if self.rng.random() < 0.6 else f"{name}-{self.refs_made}"
        self.refs_made += 1
        self.store.ingest(folder, ref)
        self.expected[ref] = tree_sha256(folder)
        self.log.append(f"ingest {name} as {ref}")

    def load(self) -> None:
        """A load from the folder's path: ingested on the way (the stat cache's other
        user), its weights those diffusers reads from the same files."""
        name, folder = self.folder()
        ours = compstore.DiffusionPipeline.from_pretrained(str(folder), store=self.store)
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
        for slot in ("unet", "vae", "text_encoder"):
            a, b = getattr(ours, slot).state_dict(), getattr(theirs, slot).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, slot)
        self.expected[str(folder.resolve())] = tree_sha256(folder)
        self.log.append(f"load {name} from its folder")

    def rm(self) -> None:
        if self.expected:
            ref = self.rng.choice(sorted(self.expected))
            self.store.rm(ref)
            del self.expected[ref]
            self.log.append(f"rm {ref}")

    def gc(self) -> None:
        self.store.gc()
        again = self.store.gc(dry_run=True)
        assert again.objects_removed == 0 and again.freed_bytes == 0 and again.snapshots_removed == 0
        self.log.append("gc")

    # -- checks ------------------------------------------------------------------------
    def check(self, export: bool) -> None:
        assert {r["name"] for r in self.store.ls()} == set(self.expected)
        for ref, files in self.expected.items():
            assert recorded_sha256(self.store, ref) == files, ref
        assert self.store.verify().ok
        if export:
            for ref, files in self.expected.items():
                dest = self.tmp / "export"
                self.store.export(ref, dest)
                assert tree_sha256(dest) == files, ref
                shutil.rmtree(dest)


@pytest.mark.parametrize("seed", range(4))
def test_random_edits_ingests_and_collections_keep_every_ref_exact(store, family, tmp_path, seed,
                                                                    monkeypatch):
    from compstore.store.ingest import Ingestor

    reused = []  # files the stat cache vouched for, not read
    real = Ingestor.reuse_file

    def reuse_file(self, f, sha256):
        taken = real(self, f, sha256)
        if taken:
            reused.append(f.path)
        return taken

    monkeypatch.setattr(Ingestor, "reuse_file", reuse_file)
    run = Sequence(store, family, tmp_path, seed)
    steps = ([run.edit_config, run.edit_tensor, run.replace_file, run.touch] + [run.ingest] * 4
             + [run.load, run.rm, run.gc])
    run_random_steps(run.rng, steps, 60, run.log, lambda i: run.check(export=i % 8 == 7), f"seed {seed}, ")
    assert reused  # the stat cache took part
    for ref in list(run.expected):
        store.rm(ref)
    store.gc()
    assert store.du().payload_bytes == 0
