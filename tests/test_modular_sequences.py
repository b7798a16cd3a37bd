"""Random sequences on a modular repo whose VAE and text encoders point at another
folder: that folder's components change, the repo is ingested again with and
without --repin, loaded, exported flat, and the store collected.

An ingest after a change refuses (PinChangedError) and leaves the store as it was
(until 2026-12-07 it had ingested the changed folder first); a repin takes the new
content; loads and flat exports always give the pinned components.
"""

import json
import random
import shutil

import pytest
import torch

import compstore
from compstore import PinChangedError, Store
from compstore.loader.synthetic import tiny_sdxl_pipeline
from conftest import run_random_steps, store_state
from test_modular import load_theirs, repos  # noqa: F401  (repos: a module fixture)

PINNED = ("vae", "text_encoder", "text_encoder_2")
SEEDS = (0, 99, 123)  # the pipelines whose components the pointed-to folder takes in turn


@pytest.fixture(scope="module")
def alternatives():
    return {seed: tiny_sdxl_pipeline(seed=seed) for seed in SEEDS}


class Sequence:
    def __init__(self, repos, alternatives, tmp_path, seed: int):
        self.rng, self.alternatives, self.tmp = random.Random(seed), alternatives, tmp_path
        self.base, self.remix = tmp_path / "base", tmp_path / "remix"
        shutil.copytree(repos / "base", self.base)
        shutil.copytree(repos / "remix", self.remix)
        index_path = self.remix / "modular_model_index.json"
        index = json.loads(index_path.read_text())
        for slot in PINNED:
            index[slot][2]["pretrained_model_name_or_path"] = str(self.base)
        index_path.write_text(json.dumps(index))
        self.store = Store(tmp_path / "store")
        self.now = {slot: 0 for slot in PINNED}  # the seed each of base's components comes from
        self.pinned: dict[str, int] | None = None  # ... and at the pin
        self.log: list[str] = []

    def assert_pinned(self, pipe) -> None:
        for slot in PINNED:
            ours = getattr(pipe, slot).state_dict()
            want = getattr(self.alternatives[self.pinned[slot]], slot).state_dict()
            assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in ours), slot

    # -- the steps ---------------------------------------------------------------------
    def change(self) -> None:
        slot, seed = self.rng.choice(PINNED), self.rng.choice(SEEDS)
        shutil.rmtree(self.base / slot)
        getattr(self.alternatives[seed], slot).save_pretrained(self.base / slot)
        self.now[slot] = seed
        self.log.append(f"base {slot} from seed {seed}")

    def ingest(self, repin: bool = False) -> None:
        self.log.append(f"ingest remix repin={repin}")
        changed = self.pinned is not None and self.pinned != self.now
        before = store_state(self.store.home)
        try:
            self.store.ingest(self.remix, "remix", repin=repin)
        except PinChangedError:
            assert changed and not repin
            assert store_state(self.store.home) == before
            return
        assert not changed or repin, "a changed source taken without --repin"
        if self.pinned is None or repin:
            self.pinned = dict(self.now)

    def repin(self) -> None:
        self.ingest(repin=True)

    def load(self) -> None:
        if self.pinned is not None:
            self.log.append("load remix")
            pipe = compstore.ModularPipeline.from_pretrained("remix", store=self.store)
            pipe.load_components(torch_dtype=torch.float32)
            self.assert_pinned(pipe)

    def export_flat(self) -> None:
        if self.pinned is not None:
            self.log.append("export remix --flatten")
            dest = self.tmp / f"flat-{len(self.log)}"
            self.store.export("remix", dest, flatten=True)
            self.assert_pinned(load_theirs(dest))  # plain diffusers, from the flat copy

    def ingest_base(self) -> None:
        self.log.append("ingest base")
        self.store.ingest(self.base, "base")

    def rm_base(self) -> None:
        if self.store.has_ref("base"):
            self.log.append("rm base")
            self.store.rm("base")

    def gc(self) -> None:
        self.log.append("gc")
        self.store.gc()


@pytest.mark.parametrize("seed", range(3))
def test_random_changes_repins_and_collections_keep_pins_exact(repos, alternatives, tmp_path, seed):
    run = Sequence(repos, alternatives, tmp_path, seed)
    steps = [run.change] * 2 + [run.ingest] * 2 + [run.repin, run.load, run.export_flat, run.ingest_base,
                                                   run.rm_base, run.gc]
    def verified(i):
        assert run.store.verify().ok

    run_random_steps(run.rng, steps, 25, run.log, verified, f"seed {seed}, ")
