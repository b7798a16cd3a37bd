"""Random sequences of pushes and fetches between two nodes and a file:// remote, with
ingests, removals and collections on both sides in between.

After each push the remote got exactly the blob bytes it lacked; after each fetch
the node got exactly those it lacked; after each step every local ref's files are
those of the folder it was made from, payloads verify, and every remote ref can be
fetched by a third node and exported byte for byte.
"""

import random
import shutil

import pytest

from compstore import Store
from compstore.store.remote import Remote
from compstore.store.remote_sync import _closure, document_blob_keys, snapshot_document
from conftest import recorded_sha256, run_random_steps, tree_sha256


def reached(store: Store, ref: str) -> dict[str, int]:
    """Blob key -> size of everything a local ref reaches (pins included)."""
    docs = _closure(store.resolve(ref), lambda s: snapshot_document(store, s))
    return {k: int(k.split(":")[1]) for k in set().union(*(document_blob_keys(d) for d in docs.values()))}


def held(store: Store) -> set[str]:
    return {f"{x}:{n}" for x, n in store.db.execute("SELECT xxh3, size FROM blobs")}


class Sequence:
    def __init__(self, family, tmp_path, seed: int):
        self.family, self.tmp, self.rng = family, tmp_path, random.Random(seed)
        self.url = (tmp_path / "remote").as_uri()
        self.nodes = {}
        for name in ("n1", "n2"):
            self.nodes[name] = Store(tmp_path / name)
            self.nodes[name].remote_add("fleet", self.url)
        self.remote = Remote(self.url)  # made by the first push
        self.pushed = False
        self.files_of: dict[str, dict[str, str]] = {}  # snapshot id -> its folder's files
        self.log: list[str] = []

    def node(self) -> tuple[str, Store]:
        name = self.rng.choice(sorted(self.nodes))
        return name, self.nodes[name]

    def ref_of(self, store: Store) -> str | None:
        refs = sorted(r["name"] for r in store.ls())
        return self.rng.choice(refs) if refs else None

    # -- the steps ---------------------------------------------------------------------
    def ingest(self) -> None:
        (node, store), member = self.node(), self.rng.choice("ABCD")
        ref = member + self.rng.choice(["", "", "-2"])
        result = store.ingest(self.family[member], ref)
        self.files_of[result.snapshot] = tree_sha256(self.family[member])
        self.log.append(f"{node}: ingest {member} as {ref}")

    def push(self) -> None:
        node, store = self.node()
        ref = self.ref_of(store)
        if ref is None:
            return
        present = self.remote.blob_index() if self.pushed else {}
        lacking = {k: n for k, n in reached(store, ref).items() if k not in present}
        result = store.push(ref)
        self.pushed = True
        self.log.append(f"{node}: push {ref}")
        assert result.uploaded_bytes == sum(lacking.values()) and result.blobs_uploaded == len(lacking)
        assert self.remote.get_ref(ref) == store.resolve(ref)

    def fetch(self) -> None:
        (node, store), refs = self.node(), sorted(self.remote.refs()) if self.pushed else []
        if not refs:
            return
        ref = self.rng.choice(refs)
        name = ref if self.rng.random() < 0.5 else f"{ref}-from-fleet"
        have = held(store)
        result = store.fetch(ref, name=name)
        self.log.append(f"{node}: fetch {ref} as {name}")
        lacking = {k: n for k, n in reached(store, name).items() if k not in have}
        assert result.downloaded_bytes == sum(lacking.values()), (result, sum(lacking.values()))
        assert store.resolve(name) == self.remote.get_ref(ref)

    def rm(self) -> None:
        node, store = self.node()
        ref = self.ref_of(store)
        if ref is not None:
            store.rm(ref)
            self.log.append(f"{node}: rm {ref}")

    def gc(self) -> None:
        node, store = self.node()
        store.gc()
        self.log.append(f"{node}: gc")

    def remote_rm(self) -> None:
        refs = sorted(self.remote.refs()) if self.pushed else []
        if refs:
            ref = self.rng.choice(refs)
            self.remote.delete_ref(ref)
            self.log.append(f"remote: rm {ref}")

    def remote_gc(self) -> None:
        if not self.pushed:
            return
        self.remote.gc(grace_s=0)  # nothing runs beside it here
        self.log.append("remote: gc")

    # -- checks ------------------------------------------------------------------------
    def check(self, fetch_all: bool) -> None:
        for store in self.nodes.values():
            for ref in (r["name"] for r in store.ls()):
                assert recorded_sha256(store, ref) == self.files_of[store.resolve(ref)], ref
            assert store.verify().ok
        if fetch_all and self.pushed:
            third = Store(self.tmp / "n3")
            third.remote_add("fleet", self.url)
            for ref, snapshot in self.remote.refs().items():
                third.fetch(ref)
                third.export(ref, self.tmp / "export")
                assert tree_sha256(self.tmp / "export") == self.files_of[snapshot], ref
                shutil.rmtree(self.tmp / "export")
            third.close()
            shutil.rmtree(self.tmp / "n3")


@pytest.mark.parametrize("seed", range(3))
def test_random_pushes_and_fetches_move_only_what_is_lacking(family, tmp_path, seed):
    run = Sequence(family, tmp_path, seed)
    steps = ([run.ingest] * 2 + [run.push] * 3 + [run.fetch] * 3
             + [run.rm, run.gc, run.remote_rm, run.remote_gc])
    run_random_steps(run.rng, steps, 40, run.log, lambda i: run.check(fetch_all=i % 10 == 9),
                     f"seed {seed}, ")
