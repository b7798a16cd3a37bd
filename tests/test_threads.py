"""Loads and moves from several threads (docs/gpu-residency.md, "Threads")."""

import contextlib
import sys
import threading

import torch

import compstore
from compstore import ResidencyPool, Store
from compstore.loader import loading, warm
from test_residency import load


def test_loads_from_several_threads_share_one_pool_safely(family_store):
    """An inference service may load pipelines from worker threads through the
    process-wide pool (each thread with its own `Store`: a sqlite connection belongs
    to its thread). The pool's bookkeeping and the template cache stay consistent,
    and every pipeline holds the weights a sequential load holds."""
    def weights(pipe):
        return {f"{slot}.{name}": t for slot in ("unet", "vae", "text_encoder")
                for name, t in getattr(pipe, slot).state_dict().items()}

    warm.clear_caches()
    want = {ref: weights(load(family_store, ref)) for ref in "AB"}
    # No idle budget: every move evicts (to the pinned tier) what no live pipeline
    # uses, and templates are dropped between loads, so fresh builds upload in the
    # background: every path of the pool runs in every thread.
    pool = ResidencyPool("cpu", budget_bytes=0, pinned_budget_bytes=1 << 40)
    errors, loaded = [], []

    def worker(refs):
        try:
            with Store(family_store.home) as mine:
                for ref in refs:
                    pipe = compstore.DiffusionPipeline.from_pretrained(ref, store=mine, pool=pool)
                    loaded.append((ref, weights(pipe)))
                    del pipe
                    warm.clear_caches()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        threads = [threading.Thread(target=worker, args=(refs,)) for refs in ("ABAB", "BABA", "AABB")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    assert len(loaded) == 12
    for ref, got in loaded:
        assert got.keys() == want[ref].keys()
        assert all(torch.equal(got[name], want[ref][name]) for name in got), ref
    assert pool.resident_bytes == sum(e.nbytes for e in pool._resident.values())
    assert not pool._prefetched
    warm.clear_caches()


def test_an_ingest_goes_on_while_another_thread_loads(family_store, family):
    """Loads take turns, but only for building and assembling: a thread ingesting a
    folder (or downloading) on its way to a load is not held up by a load in progress."""
    done = threading.Event()
    result = {}

    def other():
        with Store(family_store.home) as mine:  # a sqlite connection belongs to its thread
            result["pipe"] = compstore.DiffusionPipeline.from_pretrained(str(family["C"]), store=mine)
        done.set()

    with loading.exclusive_load():  # a load in progress in this thread
        thread = threading.Thread(target=other)
        thread.start()
        for _ in range(600):  # the other thread's ingest finishes meanwhile ...
            with Store(family_store.home) as look:
                if look.has_ref(str(family["C"].resolve())):
                    break
            thread.join(0.1)
        else:
            raise AssertionError("the ingest did not finish while a load was in progress")
        assert not done.wait(0.5)  # ... and its load waits for this one
    thread.join(120)
    assert done.is_set() and result["pipe"].unet is not None


def test_other_libraries_loads_take_turns_under_exclusive_load():
    """While a load builds a model, accelerate's init_empty_weights (compstore's, as
    diffusers' and transformers' own) puts every thread's new parameters on meta. A
    model built in another thread meanwhile comes out on meta; under
    `compstore.exclusive_load()` it waits for the load, and comes out real."""
    from accelerate import init_empty_weights

    built = {}

    def build(name, turns):
        with turns():
            built[name] = torch.nn.Linear(4, 4)

    bare = threading.Thread(target=build, args=("bare", contextlib.nullcontext))
    taking_turns = threading.Thread(target=build, args=("turns", compstore.exclusive_load))
    with compstore.exclusive_load(), init_empty_weights():  # what a load holds while it builds
        bare.start()
        bare.join(30)
        taking_turns.start()
        taking_turns.join(0.5)
        assert "turns" not in built  # it waits for the load
    taking_turns.join(30)
    assert built["bare"].weight.device.type == "meta"
    assert built["turns"].weight.device.type == "cpu"
