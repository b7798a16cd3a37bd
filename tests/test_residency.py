"""The residency pool's logic, on a machine without a GPU.

The target is the `meta` device and the copier counts bytes: what is resident, what
is uploaded, from where, eviction and reports are the same logic as on CUDA. The
CUDA path itself (and images after switches on a GPU) are checked on a GPU machine.
"""

import gc
import types

import numpy as np
import pytest
import torch

import compstore
from compstore import ResidencyPool, to_device
from compstore.loader.residency import POOL, STORE_KEYS, store_record
from compstore.store.reports import human


class CountingCopier:
    def __init__(self):
        self.bytes = 0

    def __call__(self, t, device):
        self.bytes += t.numel() * t.element_size()
        return t.to(device)


def fake_offload(hosts, tensors):  # a meta tensor has no bytes to copy back; the pinned tier keeps its place
    assert [(h.shape, h.dtype) for h in hosts] == [(t.shape, t.dtype) for t in tensors]


def load(store, name):
    return compstore.DiffusionPipeline.from_pretrained(name, store=store)


def pinned_tensor_bytes(pool):
    """Bytes of the tensors the pinned tier holds (its slabs hold these and more)."""
    return sum(t.numel() * t.element_size() for t in pool._tier.tensors())


def model_bytes(pipe):
    return sum(t.numel() * t.element_size() for n in ("unet", "vae", "text_encoder")
               for t in list(getattr(pipe, n).parameters()) + list(getattr(pipe, n).buffers()))


def same_storage(x, y) -> bool:
    return x.untyped_storage()._cdata == y.untyped_storage()._cdata


def unkeyed_bytes(pipe):
    """Bytes of tensors the pool has no address for (store tensors have their blob's,
    buffers a model computes itself, e.g. CLIP's position_ids, their template's)."""
    total = 0
    for n in ("unet", "vae", "text_encoder"):
        m = getattr(pipe, n)
        keys = getattr(m, STORE_KEYS)
        total += sum(t.numel() * t.element_size() for name, t in
                     list(m.named_parameters()) + list(m.named_buffers()) if name not in keys)
    return total


@pytest.fixture
def published_family_store(store, family, tmp_path):
    """A and B as the Hub has such repos: names the libraries rename on load."""
    import diffusers

    from conftest import publish_as_the_hub_has_it

    for name in "AB":
        publish_as_the_hub_has_it(diffusers.DiffusionPipeline.from_pretrained(family[name]),
                                  tmp_path / name)
        store.ingest(tmp_path / name, name)
    return store


@pytest.mark.parametrize("layout", ["as saved", "as published"])
def test_switch_uploads_only_the_delta(request, layout):
    family_store = request.getfixturevalue("family_store" if layout == "as saved" else
                                           "published_family_store")
    copier = CountingCopier()
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    a = load(family_store, "A")
    first = to_device(a, "meta", pool=pool)
    # Identical tensors inside A (all-ones norm weights, ...) are one blob: uploaded once.
    assert first.bytes_uploaded == copier.bytes > 0
    assert first.bytes_uploaded + first.bytes_reused == model_bytes(a)
    b = load(family_store, "B")
    second = to_device(b, "meta", pool=pool)
    # What moved is exactly the tensor payload B does not share with A: even a
    # buffer a model computes itself (CLIP's position_ids) is shared, by its bytes.
    assert unkeyed_bytes(b) == 0
    assert second.bytes_uploaded == family_store.diff("A", "B").delta_bytes
    per = {c.component: c for c in second.components}
    assert per["vae"].bytes_from_store == 0 and per["vae"].bytes_reused > 0
    assert per["text_encoder"].bytes_from_store == 0 and per["text_encoder"].bytes_reused > 0
    assert per["unet"].bytes_from_store > 0
    # Live pipelines share storage for identical tensors.
    assert same_storage(a.vae.encoder.conv_in.weight, b.vae.encoder.conv_in.weight)
    assert not same_storage(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert compstore.last_transfer() is second
    lines = str(second).splitlines()  # what `print(compstore.last_transfer())` shows
    assert lines[0].startswith(f"meta: reused {human(second.bytes_reused)}, uploaded "
                               f"{human(second.bytes_uploaded)} (0 B from the pinned tier) in ")
    assert [line.split()[0] for line in lines[1:]] == [c.component for c in second.components]
    unet = per["unet"]
    assert (f"  unet          reused {human(unet.bytes_reused)}, uploaded {human(unet.bytes_from_store)} "
            "(0 B from the pinned tier)") in lines


def test_a_b_a_within_budget_moves_nothing(family_store):
    copier = CountingCopier()
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    to_device(load(family_store, "A"), "meta", pool=pool)  # A is dropped right away
    gc.collect()
    to_device(load(family_store, "B"), "meta", pool=pool)
    gc.collect()
    a2 = load(family_store, "A")
    again = to_device(a2, "meta", pool=pool)
    assert again.bytes_uploaded == unkeyed_bytes(a2) and again.bytes_reused > 0


@pytest.mark.parametrize("how", ["pipe.to", "to_device(pipe.unet)"])
def test_a_compiled_unet_is_shared_as_the_unet_it_compiles(family_store, how):
    """`pipe.unet = torch.compile(pipe.unet)` before the move, as services do: the
    wrapper holds the UNet's tensors under `_orig_mod.` names. A -> B -> A, each UNet
    compiled: B uploads its delta, the second A nothing; the wrapper sees the moved
    tensors. (Until 2026-12-07 a compiled UNet was uploaded whole at every switch.)"""
    copier = CountingCopier()
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)

    def switch(name):
        pipe = load(family_store, name)
        pipe.unet = torch.compile(pipe.unet)  # lazy: nothing compiles before a call
        if how == "pipe.to":
            to_device(pipe, "meta", pool=pool)
        else:
            for slot in ("vae", "text_encoder"):
                to_device(getattr(pipe, slot), "meta", pool=pool)
            to_device(pipe.unet, "meta", pool=pool)
        assert {t.device.type for t in pipe.unet.parameters()} == {"meta"}
        return pipe, copier.bytes

    a, after_a = switch("A")
    b, after_b = switch("B")
    assert after_b - after_a == family_store.diff("A", "B").delta_bytes
    del a, b
    gc.collect()
    _, after_a_again = switch("A")
    assert after_a_again == after_b


def test_a_compiled_models_own_to_goes_through_the_pool(family_store):
    """`pipe.unet = torch.compile(pipe.unet)`, then `pipe.unet.to(device)`: the
    wrapper's `.to()` is the UNet's routed one, and returns the wrapper. Until
    2026-12-07 it was torch's own: the whole UNet copied, nothing shared, no report
    (/tmp/explore/compile_to.py, an exploratory script). A compiled module that is
    not the store's moves as torch moves it."""
    from compstore import last_transfer, pool_for

    def unet_bytes(pipe):
        return sum(t.numel() * t.element_size() for t in pipe.unet.parameters())

    pipes = []
    for _ in range(2):
        pipe = load(family_store, "A")
        pipe.unet = torch.compile(pipe.unet)
        before = last_transfer()
        assert pipe.unet.to("meta") is pipe.unet
        report = last_transfer()
        assert report is not before and {t.device.type for t in pipe.unet.parameters()} == {"meta"}
        assert report.bytes_reused + report.bytes_uploaded == unet_bytes(pipe)
        pipes.append(pipe)
    assert report.bytes_uploaded == 0  # the second UNet is the first's tensors
    plain = torch.compile(torch.nn.Linear(2, 2))
    assert plain.to("meta") is plain and plain.weight.device.type == "meta" and last_transfer() is report
    pipes[1].unet.half()  # a cast of the wrapper is the model's: its tensors are no longer the store's
    assert pipes[1].unet.conv_in.weight.dtype == torch.float16
    assert all(record.version == -1 for record in getattr(pipes[1].unet._orig_mod, STORE_KEYS).values())
    del pipes, pipe
    gc.collect()
    pool_for("meta").trim(0)


def test_channels_last_lets_the_replaced_pool_tensors_go_and_is_kept_by_a_move(family_store):
    """diffusers' recipe: `pipe.to("cuda")`, then `pipe.unet.to(memory_format=
    torch.channels_last)`. The 4-D conv weights become new tensors (torch keeps the
    parameter and its version counter, and sets its data): the pool no longer counts
    the old ones as in use (budget 0: evicted at once), and the new ones are never
    served as the store's; the rest stays shared. A model converted before its move
    keeps its layout, and the pool keeps none of it (the uploader's side of it:
    test_uploader_copies_every_byte)."""
    copier = CountingCopier()
    pool = ResidencyPool("meta", budget_bytes=0, copier=copier)
    a = load(family_store, "A")
    to_device(a, "meta", pool=pool)
    convs = {name for name, t in a.unet.named_parameters() if t.dim() == 4}
    conv_bytes = sum(t.numel() * t.element_size() for name, t in a.unet.named_parameters() if name in convs)
    resident = pool.resident_bytes
    a.unet.to(memory_format=torch.channels_last)
    assert a.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert resident - pool.resident_bytes == conv_bytes  # only the replaced ones went
    keys = getattr(a.unet, STORE_KEYS)
    assert all(keys[name][2] == -1 for name in convs)
    assert all(keys[name][2] != -1 for name in keys if name not in convs)
    again = to_device(a.unet, "meta", pool=pool)  # still on the device: nothing moves
    assert again.bytes_uploaded == 0 and a.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # Converted before its move, past the routing (torch's own Module.to): its version
    # counters still match, but channels-last copies are not the store's layout.
    b = load(family_store, "B")
    torch.nn.Module.to(b.unet, memory_format=torch.channels_last)
    to_device(b, "meta", pool=pool)
    assert b.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(e.tensor.is_contiguous() for e in pool._resident.values())


def test_switches_within_budget_keep_no_bookkeeping_of_dropped_pipelines(family_store):
    """A service that switches among pipelines its budget holds never evicts; the
    pool still counts down what dropped pipelines used at each switch's settle,
    instead of queueing one set of entries per dropped module for ever (until
    2026-12-07: three more per switch of the tiny family, never freed)."""
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    pipe = None
    for i in range(12):
        pipe = None  # the service drops the pipeline it served, then loads the next
        pipe = load(family_store, "ABC"[i % 3])
        to_device(pipe, "meta", pool=pool)
        assert len(pool._gone) == 0
        modules = (pipe.unet, pipe.vae, pipe.text_encoder)
        # a resident entry counts exactly the live modules that use it (identical bytes, a
        # zero bias say, serve several): the dropped ones are counted down
        assert all(e.users == sum(e in pool._uses[m] for m in modules) for e in pool._resident.values())
        assert pool.idle_bytes > 0 or i == 0  # what the dropped ones alone used is idle, kept
        del modules


def test_eviction_respects_budget_and_never_touches_live_tensors(family_store):
    pool = ResidencyPool("meta", budget_bytes=0, copier=CountingCopier())
    a = load(family_store, "A")
    to_device(a, "meta", pool=pool)
    assert pool.resident_bytes == pool.resident_bytes - pool.idle_bytes  # all live, all kept
    live = pool.resident_bytes
    del a
    gc.collect()
    b = load(family_store, "B")
    to_device(b, "meta", pool=pool)
    assert pool.idle_bytes == 0  # budget 0: A's tensors B does not use are gone
    assert pool.resident_bytes < live + model_bytes(b)
    again = to_device(load(family_store, "A"), "meta", pool=pool)
    assert again.bytes_from_store > 0 and again.bytes_reused > 0  # A's UNet came back, VAE shared


@pytest.mark.parametrize("how", ["to_device", "device load"])
def test_a_budget_of_0_still_lets_the_next_pipeline_reuse_what_it_shares(family_store, how):
    """A is dropped before B loads, and nothing idle may stay: B's VAE and text
    encoder are still A's tensors, reused, since the budget is settled once B's
    load or move ends, not after each of its models. Only B's delta moves, and
    nothing idle stays after it."""
    pool = ResidencyPool("meta", budget_bytes=0, copier=CountingCopier())

    def switch(ref):
        if how == "to_device":
            pipe = load(family_store, ref)
            return pipe, to_device(pipe, "meta", pool=pool)
        pipe = compstore.DiffusionPipeline.from_pretrained(ref, store=family_store, pool=pool)
        return pipe, pool.last_report

    a, _ = switch("A")
    del a
    gc.collect()
    b, report = switch("B")
    moved = {c.component: c.bytes_from_pinned + c.bytes_from_store for c in report.components}
    assert moved["vae"] == 0 and moved["unet"] == family_store.diff("A", "B").delta_bytes > 0
    assert pool.idle_bytes == 0  # A's UNet went at the end


def test_pinned_tier_serves_evicted_tensors(family_store):
    copier = CountingCopier()
    pool = ResidencyPool("meta", budget_bytes=0, pinned_budget_bytes=1 << 40, copier=copier,
                         offloader=fake_offload)
    to_device(load(family_store, "A"), "meta", pool=pool)
    gc.collect()
    to_device(load(family_store, "B"), "meta", pool=pool)
    gc.collect()
    assert pool.pinned_bytes > 0
    a2 = load(family_store, "A")
    again = to_device(a2, "meta", pool=pool)
    assert again.bytes_from_pinned > 0
    assert sum(c.bytes_from_store for c in again.components) == unkeyed_bytes(a2)


def test_a_pipeline_staged_on_the_host_moves_from_the_pinned_tier(family_store):
    """`pool.stage(pipe)`: a service loads the next pipeline on the host and stages
    what the device lacks of it while the current one runs; the move then uploads
    that from the pinned tier, nothing from the store but the tensors no store blob
    addresses, and the weights are B's."""
    def state(pipe):
        return {f"{slot}.{name}": t.clone() for slot in ("unet", "vae", "text_encoder")
                for name, t in getattr(pipe, slot).state_dict().items()}

    want = state(load(family_store, "B"))
    plain = ResidencyPool("cpu", budget_bytes=1 << 40)
    a_plain = load(family_store, "A")
    to_device(a_plain, "cpu", pool=plain)
    unstaged = to_device(load(family_store, "B"), "cpu", pool=plain)

    pool = ResidencyPool("cpu", budget_bytes=1 << 40, pinned_budget_bytes=1 << 40)
    a = load(family_store, "A")
    to_device(a, "cpu", pool=pool)
    b = load(family_store, "B")
    staged = pool.stage(b)
    assert staged == unstaged.bytes_from_store - unkeyed_bytes(b) == family_store.diff("A", "B").delta_bytes
    assert pool.stage(b) == 0  # staged already
    report = to_device(b, "cpu", pool=pool)
    assert report.bytes_from_pinned == staged and report.bytes_from_store == unkeyed_bytes(b)
    assert pool.pinned_bytes == 0 and pool.stage(b) == 0  # all of it resident now
    got = state(b)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    edited = load(family_store, "C")  # a weight changed since the load is not the store's: not staged
    ours = a.unet.state_dict()
    name = next(k for k, v in edited.unet.state_dict().items() if not torch.equal(v, ours[k]))  # C's own
    weight = edited.unet.get_parameter(name)
    with torch.no_grad():
        weight.add_(1.0)
    before = pool.stage(load(family_store, "C"))
    pool.pinned_budget_bytes = 0  # (empties the tier)
    pool.pinned_budget_bytes = 1 << 40
    assert pool.stage(edited) == before - weight.numel() * weight.element_size() > 0


def staging_held_up(pool, pipe):
    """`pool.stage(pipe)` in a thread, its copy held up until `go_on` is set; returns
    (the thread, `go_on`, the list its result goes into) once the copy is waiting."""
    import threading

    copying, go_on, staged = threading.Event(), threading.Event(), []
    real = pool._copy_on_host

    def slow_copy(hosts, tensors):
        copying.set()
        assert go_on.wait(30)
        real(hosts, tensors)

    pool._copy_on_host = slow_copy
    stager = threading.Thread(target=lambda: staged.append(pool.stage(pipe)))
    stager.start()
    assert copying.wait(30)
    return stager, go_on, staged


def test_a_move_in_another_thread_does_not_wait_for_a_staging_copy(family_store):
    """`stage` copies outside the pool's lock: a service staging the next pipeline in
    a background thread does not hold up the loads and moves of its other threads.
    What another thread moved meanwhile (here: B itself, loaded again) is resident,
    and not kept in the tier as well."""
    import threading

    pool = ResidencyPool("cpu", budget_bytes=1 << 40, pinned_budget_bytes=1 << 40)
    to_device(load(family_store, "A"), "cpu", pool=pool)
    b, b_again = load(family_store, "B"), load(family_store, "B")
    stager, go_on, staged = staging_held_up(pool, b)
    moved = []
    mover = threading.Thread(target=lambda: moved.append(to_device(b_again, "cpu", pool=pool)))
    mover.start()
    mover.join(30)
    done_while_copying = not mover.is_alive()
    go_on.set()
    stager.join(30)
    delta = family_store.diff("A", "B").delta_bytes
    assert done_while_copying and moved[0].bytes_from_store == delta  # not staged yet: from the store
    assert staged == [0] and pool.pinned_bytes == 0  # resident now: the staged copies went back
    assert to_device(b, "cpu", pool=pool).bytes_uploaded == 0


def test_a_weight_edited_while_it_is_staged_is_not_kept_as_the_stores(family_store):
    """An in-place edit of a tensor during its staging copy: the tier may hold a torn
    or edited copy, which must not be served as the store's bytes."""
    pool = ResidencyPool("cpu", budget_bytes=1 << 40, pinned_budget_bytes=1 << 40)
    to_device(load(family_store, "A"), "cpu", pool=pool)
    b = load(family_store, "B")
    weight = b.unet.conv_in.weight
    stager, go_on, staged = staging_held_up(pool, b)
    with torch.no_grad():
        weight.mul_(2.0)
    go_on.set()
    stager.join(30)
    assert staged == [family_store.diff("A", "B").delta_bytes - weight.nbytes]
    report = to_device(b, "cpu", pool=pool)  # (the edited weight: private, where it is on a CPU target)
    assert report.bytes_from_pinned == report.bytes_uploaded == staged[0]
    again = load(family_store, "B")
    moved = to_device(again, "cpu", pool=pool)  # the store's conv_in: neither resident nor pinned
    assert moved.bytes_from_store == weight.nbytes and moved.bytes_from_pinned == 0
    assert torch.equal(again.unet.conv_in.weight * 2.0, b.unet.conv_in.weight)


def test_staging_warns_when_the_tier_is_off_and_refuses_what_is_not_a_pipeline(family_store, caplog):
    off = ResidencyPool("cpu", budget_bytes=1 << 40)  # no pinned budget (the default): nothing staged
    with caplog.at_level("WARNING", logger="compstore"):
        assert off.stage(load(family_store, "B")) == 0 and off.pinned_bytes == 0
    assert "pinned tier of the cpu pool is off" in caplog.text and "COMPSTORE_PINNED_BUDGET" in caplog.text
    pool = ResidencyPool("cpu", budget_bytes=1 << 40, pinned_budget_bytes=1 << 30)
    for wrong in ("B", None, [load(family_store, "B").unet]):
        with pytest.raises(compstore.CompstoreError, match="expected a pipeline or a module"):
            pool.stage(wrong)
    assert pool.pinned_bytes == 0 and pool.resident_bytes == 0


def test_trim_evicts_idle_tensors_into_the_pinned_tier_and_never_live_ones(family_store):
    pool = ResidencyPool("meta", budget_bytes=1 << 40, pinned_budget_bytes=1 << 40,
                         copier=CountingCopier(), offloader=fake_offload)
    to_device(load(family_store, "A"), "meta", pool=pool)
    gc.collect()
    b = load(family_store, "B")
    to_device(b, "meta", pool=pool)
    idle, live = pool.idle_bytes, pool.resident_bytes - pool.idle_bytes
    assert idle > 0
    assert pool.trim() == idle and pool.idle_bytes == 0 and pool.resident_bytes == live
    assert pinned_tensor_bytes(pool) == idle <= pool.pinned_bytes  # A's UNet waits in host memory
    assert pool.trim() == 0
    again = to_device(load(family_store, "A"), "meta", pool=pool)
    assert again.bytes_from_pinned == idle


class OutOfMemoryWhileIdle(CountingCopier):
    """A device that is full while the pool holds more than `limit` idle bytes
    (something else grew into the rest of it)."""

    def __init__(self, limit: int = 0):
        super().__init__()
        self.pool, self.limit, self.refusals = None, limit, 0

    def __call__(self, t, device):
        if self.pool.idle_bytes > self.limit:
            self.refusals += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().__call__(t, device)


@pytest.mark.parametrize("warm_process", [True, False], ids=["clone", "fresh build"])
def test_an_upload_out_of_memory_evicts_idle_tensors_and_tries_again(family_store, warm_process):
    from compstore.loader import warm

    copier = OutOfMemoryWhileIdle()
    pool = copier.pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    load_to = lambda ref: compstore.DiffusionPipeline.from_pretrained(ref, store=family_store, pool=pool)  # noqa: E731
    load_to("A")
    gc.collect()
    assert pool.idle_bytes > 0
    if not warm_process:
        warm.clear_caches()  # C is built anew: its upload starts in the background and fails there
    before = copier.bytes
    c = load_to("C")
    assert copier.refusals >= 1 and pool.idle_bytes == 0
    assert pool.last_report.bytes_uploaded == copier.bytes - before
    assert pool.last_report.bytes_uploaded >= family_store.diff("A", "C").delta_bytes
    assert {t.device.type for t in c.unet.parameters()} == {"meta"}


def test_out_of_memory_evicts_about_what_the_upload_needs_first(family_store):
    copier = OutOfMemoryWhileIdle(limit=1 << 40)
    pool = copier.pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    to_device(load(family_store, "A"), "meta", pool=pool)
    gc.collect()
    unet = load(family_store, "C").unet  # two thirds of it A's
    delta = family_store.diff("A", "C").delta_bytes
    shared = sum(c["shared_bytes"] for c in family_store.diff("A", "C").components if c["slot"] == "unet")
    copier.limit = pool.idle_bytes - shared - 1  # full unless a byte is freed
    report = to_device(unet, "meta", pool=pool)
    assert copier.refusals == 1 and report.bytes_from_store == delta
    assert pool.idle_bytes > 0  # A's VAE and text encoder, say: not everything was evicted


def test_an_upload_out_of_memory_with_nothing_idle_is_raised(family_store):
    copier = OutOfMemoryWhileIdle()
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    copier.pool = types.SimpleNamespace(idle_bytes=1)  # full whatever the pool frees
    with pytest.raises(torch.OutOfMemoryError):
        to_device(load(family_store, "A"), "meta", pool=pool)


def test_the_pinned_tier_counts_its_bytes_and_keeps_to_its_budget(family_store):
    """The tier's byte count is kept as tensors come and go (not summed again per
    entry): it always equals the slabs the tier's tensors are in, and never exceeds
    the budget."""
    def held(pool):
        slabs = {id(kept.slab): kept.slab.memory.numel() for kept in pool._tier._entries.values()}
        assert pinned_tensor_bytes(pool) <= sum(slabs.values())
        return sum(slabs.values())

    for budget in (model_bytes(load(family_store, "A")) // 3, 1 << 40):  # drops oldest / keeps all
        pool = ResidencyPool("meta", budget_bytes=0, pinned_budget_bytes=budget, copier=CountingCopier(),
                             offloader=fake_offload)
        to_device(load(family_store, "A"), "meta", pool=pool)
        gc.collect()
        to_device(load(family_store, "B"), "meta", pool=pool)  # evicts A's tensors B lacks
        gc.collect()
        assert 0 < pool.pinned_bytes == held(pool) <= budget
        again = to_device(load(family_store, "A"), "meta", pool=pool)
        assert pool.pinned_bytes == held(pool) <= budget
    assert again.bytes_from_pinned > 0  # with room for all, A came back from the tier


def test_tensors_changed_in_place_are_never_served_as_the_stores(family_store):
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    a = load(family_store, "A")
    with torch.no_grad():
        a.vae.decoder.conv_out.weight.add_(1.0)  # edited on the host before the move
    first = to_device(a, "meta", pool=pool)
    b = load(family_store, "B")
    second = to_device(b, "meta", pool=pool)
    nbytes = b.vae.decoder.conv_out.weight.numel() * 4
    vae = next(c for c in second.components if c.component == "vae")
    assert vae.bytes_from_store == nbytes  # B's pristine tensor was uploaded, not A's edit
    assert first.bytes_uploaded > 0
    with torch.no_grad():
        b.unet.conv_in.weight.mul_(2.0)  # edited on the device (fuse_lora: the test below)
    b2 = load(family_store, "B")
    third = to_device(b2, "meta", pool=pool)
    unet = next(x for x in third.components if x.component == "unet")
    assert unet.bytes_from_store == b2.unet.conv_in.weight.numel() * 4  # re-uploaded, not shared
    assert not same_storage(b2.unet.conv_in.weight, b.unet.conv_in.weight)
    assert same_storage(b2.unet.conv_out.weight, b.unet.conv_out.weight)


def lora_wrapped(module) -> dict[str, torch.Tensor]:
    """Copies of the base-layer weights that a peft LoRA wraps in `module`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: layer.get_base_layer().weight.detach().clone()
            for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)}


@pytest.mark.parametrize("how", ["pipe.fuse_lora", "unet.fuse_lora", "fused, unfused, unloaded",
                                 "fused and unloaded on the host, then moved"])
def test_a_fused_lora_is_never_served_as_the_stores_tensors(family_store, family, how):
    # peft merges through `weight.data += delta`, which no version counter sees.
    import diffusers
    from peft import LoraConfig
    from test_loader import image

    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    on_host = how == "fused and unloaded on the host, then moved"
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=None if on_host else pool)
    torch.manual_seed(0)
    a.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                  init_lora_weights=False))  # random: the merge changes the weights
    stored = lora_wrapped(a.unet)
    (a.unet if how == "unet.fuse_lora" else a).fuse_lora(**({} if how == "unet.fuse_lora" else
                                                            {"components": ["unet"]}))
    fused = lora_wrapped(a.unet)
    assert all(not torch.equal(fused[n], stored[n]) for n in stored)
    if how == "fused, unfused, unloaded":
        a.unfuse_lora(components=["unet"])
    if how != "pipe.fuse_lora" and how != "unet.fuse_lora":
        a.unload_lora_weights()  # the base layers back in place, under their stored names
    if on_host:
        to_device(a, "cpu", pool=pool)  # the fused tensors enter the pool as private copies
    a2 = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    wrapped = {name.replace(".base_layer", ""): t for name, t in stored.items()}
    mine = dict(a2.unet.named_modules())
    for name, t in wrapped.items():
        assert torch.equal(mine[name].weight, t), name  # the store's bytes, not the fused ones
    if not on_host:  # the merge went into copies of a's own: the pool kept the store's tensors
        assert pool.last_report.bytes_from_store == 0
    reference = diffusers.StableDiffusionPipeline.from_pretrained(family["A"])
    np.testing.assert_array_equal(image(a2), image(reference))


@pytest.mark.parametrize("then", ["fused", "fused and unfused"])
def test_a_lora_fused_into_one_pipeline_is_not_seen_by_the_others(family_store, family, then):
    """`fuse_lora` merges into the base weights in place. Through a pool, those are
    tensors other live pipelines share: until 2026-12-07 the merge reached them too
    (a service fusing a LoRA into one of its pipelines changed the images of the
    others). Now the fused layers get copies of their own first; the pool keeps the
    store's, which the others and later loads go on sharing."""
    import diffusers
    from peft import LoraConfig
    from test_loader import image

    def with_lora(pipe):
        torch.manual_seed(0)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                         init_lora_weights=False))  # random: the merge changes the weights
        pipe.fuse_lora(components=["unet"])
        if then == "fused and unfused":
            pipe.unfuse_lora(components=["unet"])
        return pipe

    def q_weight(pipe):  # a layer the LoRA wraps
        layer = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
        return getattr(layer, "base_layer", layer).weight

    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    other = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    assert same_storage(q_weight(a), q_weight(other))
    with_lora(a)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(family["A"])
    np.testing.assert_array_equal(image(other), image(reference))
    np.testing.assert_array_equal(image(a), image(with_lora(reference)))
    a3 = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    assert pool.last_report.bytes_uploaded == 0  # the store's tensors stayed in the pool
    assert same_storage(q_weight(a3), q_weight(other)) and not same_storage(q_weight(a), q_weight(a3))


@pytest.mark.parametrize("part", ["whole", "one layer", "a submodule's"])
def test_a_state_dict_loaded_into_one_pipeline_is_not_seen_by_the_others(family_store, family, part):
    """`pipe.unet.load_state_dict(my_weights)` copies into the UNet's tensors in place.
    Through a pool those are shared with other live pipelines: until 2026-12-07 the
    copy reached them too, and the next load uploaded the UNet again (5,686,288 bytes
    of the tiny A's; /tmp/explore/hostshare.py, an exploratory script). Now the
    loaded weights go into copies of the pipeline's own, and only those. The same for
    a submodule's own `load_state_dict` (`pipe.unet.conv_in.load_state_dict(...)`),
    which until 2026-12-07 still wrote into the shared tensors."""
    import diffusers
    from test_loader import image

    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    other = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    def shared_names():
        theirs = other.unet.state_dict()
        return {name for name, t in a.unet.state_dict().items() if t.numel() and same_storage(t, theirs[name])}

    torch.manual_seed(0)
    mine = {k: v + 0.01 * torch.randn_like(v) for k, v in a.unet.state_dict().items()
            if part == "whole" or k.startswith("conv_in.")}
    shared = shared_names()
    assert {"conv_in.weight", "conv_in.bias"} <= shared

    def load(unet):
        if part == "a submodule's":
            unet.conv_in.load_state_dict({k.removeprefix("conv_in."): v for k, v in mine.items()})
        else:
            unet.load_state_dict(mine, strict=part == "whole")

    load(a.unet)
    assert shared - shared_names() == shared & set(mine)  # copies of only what it loaded
    reference = diffusers.StableDiffusionPipeline.from_pretrained(family["A"])
    np.testing.assert_array_equal(image(other), image(reference))
    load(reference.unet)
    np.testing.assert_array_equal(image(a), image(reference))
    compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    assert pool.last_report.bytes_uploaded == 0  # the store's tensors stayed in the pool


def test_a_state_dict_loaded_under_a_lora_is_not_seen_by_the_others(family_store):
    """With a LoRA loaded, the weights of the layers it wraps go by their wrapped names
    in the model's state dict (`to_q.base_layer.weight`); a `load_state_dict` under
    those names copies into copies of the model's own too. (Until 2026-12-07 only the
    stored names, `to_q.weight`, were looked for, and the load wrote into the tensors
    the other live pipelines share.)"""
    from peft import LoraConfig

    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    a, other = (compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool) for _ in range(2))
    a.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    wrapped = next(k for k in a.unet.state_dict() if k.endswith("to_q.base_layer.weight"))
    stored = wrapped.replace(".base_layer", "")
    want = other.unet.get_parameter(stored).detach().clone()
    assert same_storage(a.unet.get_parameter(wrapped), other.unet.get_parameter(stored))
    a.unet.load_state_dict({wrapped: want + 1.0}, strict=False)
    assert torch.equal(a.unet.get_parameter(wrapped), want + 1.0)
    assert torch.equal(other.unet.get_parameter(stored), want)  # the other pipeline's: unchanged
    compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    assert pool.last_report.bytes_uploaded == 0  # the store's tensors stayed in the pool


def test_an_unfused_lora_leaves_the_layers_it_wraps_shared(family_store, family):
    """A service's usual day: one base, a LoRA per request, loaded and unloaded, never
    fused. peft renames each layer it wraps (`to_q.weight` -> `to_q.base_layer.weight`),
    but those weights are still the store's: a move shares them and uploads only the
    LoRA's own tensors, and a cast while the LoRA is loaded marks them as not the
    store's. (Until 2026-12-07 they were private under the LoRA: uploaded at every
    move, 491,520 bytes of the tiny UNet's 5.7 MB, then again for a plain A.)"""
    import diffusers
    from peft import LoraConfig
    from test_loader import image

    def add_lora(pipe):
        torch.manual_seed(0)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                         init_lora_weights=False))  # random: it changes the image

    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)  # A resident
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store)  # on the host
    add_lora(a)
    lora_bytes = sum(t.numel() * t.element_size() for n, t in a.unet.named_parameters() if "lora_" in n)
    for _ in range(2):  # a move, then another, as an offload hook's or a user's round trip
        to_device(a, "cpu", pool=pool)  # (a CPU target leaves private host tensors in place)
        assert pool.last_report.bytes_reused == model_bytes(a) - lora_bytes
    reference = diffusers.StableDiffusionPipeline.from_pretrained(family["A"])
    add_lora(reference)
    np.testing.assert_array_equal(image(a), image(reference))
    a.unload_lora_weights()
    np.testing.assert_array_equal(image(a), image(diffusers.StableDiffusionPipeline.from_pretrained(family["A"])))

    c = compstore.DiffusionPipeline.from_pretrained("A", store=family_store)
    add_lora(c)
    c.unet.half()
    keys = getattr(c.unet, STORE_KEYS)
    assert keys and all(record[2] == -1 for record in keys.values())  # every tensor cast, wrapped or not


def ip_adapter_state_dict(unet) -> dict:
    """A random IP-Adapter for `unet`, in the layout `load_ip_adapter` reads from a file
    (diffusers' own tests build theirs the same way)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection

    torch.manual_seed(3)
    cross, key_id, channels = {}, 1, unet.config.block_out_channels
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):  # self-attention: no image tokens
            continue
        block = name.split(".")[0]
        hidden = (channels[-1] if block == "mid_block" else
                  channels[::-1 if block == "up_blocks" else 1][int(name.split(".")[1])])
        layer = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=unet.config.cross_attention_dim)
        cross[f"{key_id}.to_k_ip.weight"] = layer.to_k_ip[0].weight.detach()
        cross[f"{key_id}.to_v_ip.weight"] = layer.to_v_ip[0].weight.detach()
        key_id += 2
    dim = unet.config.cross_attention_dim
    proj = ImageProjection(cross_attention_dim=dim, image_embed_dim=dim, num_image_text_embeds=4).state_dict()
    return {"ip_adapter": cross, "image_proj": {"proj.weight": proj["image_embeds.weight"],
                                                "proj.bias": proj["image_embeds.bias"],
                                                "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]}}


def test_an_ip_adapter_moves_with_its_pipeline_and_leaves_the_others_as_stored(family_store, family):
    """An IP-Adapter (what `pipe.load_ip_adapter` loads into the UNet: new attention
    processors with weights of their own, and an image projection) in a pipeline whose
    UNet is shared through the pool: the pipeline moves, uploading only the adapter;
    the other pipelines, and the first after `unload_ip_adapter`, give diffusers'
    images and share the store's tensors."""
    import diffusers
    from test_loader import image

    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    other = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    adapter = ip_adapter_state_dict(a.unet)
    adapter_bytes = sum(t.numel() * t.element_size() for part in adapter.values() for t in part.values())
    a.unet._load_ip_adapter_weights([adapter])  # load_ip_adapter's step once it has read the file
    to_device(a, "cpu", pool=pool)
    assert pool.last_report.bytes_reused == model_bytes(other)
    assert model_bytes(a) == model_bytes(other) + adapter_bytes

    embeds = [torch.randn(2, 1, a.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))]

    def with_image(pipe):
        return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np", height=32, width=32, ip_adapter_image_embeds=embeds).images

    reference = diffusers.StableDiffusionPipeline.from_pretrained(family["A"])
    plain = image(reference)
    reference.unet._load_ip_adapter_weights([adapter])
    np.testing.assert_array_equal(with_image(a), with_image(reference))
    np.testing.assert_array_equal(image(other), plain)
    a.unload_ip_adapter()
    np.testing.assert_array_equal(image(a), plain)
    to_device(a, "cpu", pool=pool)
    assert pool.last_report.bytes_uploaded == 0 and pool.last_report.bytes_reused == model_bytes(other)


def two_controlnets(store, family, tmp_path):
    """Ingest two ControlNets made from A's UNet as cn1 and cn2; return
    `pipeline(cls, where, **kwargs)`, which builds A's ControlNet pipeline with both
    through `cls` (compstore or diffusers), `where(i)` naming each one's source."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(family["A"] / "unet")
    for i in (1, 2):
        torch.manual_seed(i)
        diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(
            tmp_path / f"cn{i}")
        store.ingest(tmp_path / f"cn{i}", f"cn{i}")

    def pipeline(cls, where, **kwargs):
        controlnets = [cls.ControlNetModel.from_pretrained(str(where(i)), **kwargs) for i in (1, 2)]
        return cls.StableDiffusionControlNetPipeline.from_pretrained(str(where("A")), controlnet=controlnets,
                                                                     **kwargs)
    return pipeline


def test_controlnets_passed_as_a_list_are_shared_each_with_its_own_records(family_store, family, tmp_path):
    """`controlnet=[canny, depth]`: diffusers wraps the list in a MultiControlNetModel,
    which no store record covers. Each ControlNet in it is the store's and moves
    with its own records: a second pipeline with the same two uploads none of them
    (until 2026-12-07 they were private copies, uploaded at every move)."""
    import diffusers

    pipeline = two_controlnets(family_store, family, tmp_path)
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    first = pipeline(compstore, lambda i: f"cn{i}" if i != "A" else "A", store=family_store)
    to_device(first, "meta", pool=pool)
    second = pipeline(compstore, lambda i: f"cn{i}" if i != "A" else "A", store=family_store)
    moved = {c.component: c for c in to_device(second, "meta", pool=pool).components}
    assert pool.last_report.bytes_uploaded == 0
    for i in (0, 1):
        net = second.controlnet.nets[i]
        assert moved[f"controlnet.nets.{i}"].bytes_reused == sum(t.nbytes for t in net.state_dict().values())
        assert pool.keys_used_by(net)  # in use while `second` lives: never evicted under it

    on_host = ResidencyPool("cpu", budget_bytes=1 << 40)
    ours = pipeline(compstore, lambda i: f"cn{i}" if i != "A" else "A", store=family_store)
    to_device(ours, "cpu", pool=on_host)
    ours.controlnet.to("cpu")  # the wrapper's own move (an offload hook's) goes through the pool too
    moved = compstore.last_transfer()
    assert [c.component for c in moved.components] == ["nets.0", "nets.1", ""]
    assert moved.bytes_reused == sum(t.nbytes for t in ours.controlnet.state_dict().values())
    reference = pipeline(diffusers, lambda i: tmp_path / f"cn{i}" if i != "A" else family["A"])
    image = torch.zeros(1, 3, 32, 32)

    def run(pipe):
        return pipe("a cat", image=[image, image], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np", height=32, width=32).images

    np.testing.assert_array_equal(run(ours), run(reference))
    resident = on_host.resident_bytes
    ours.controlnet._hf_hook = object()  # accelerate's model offload hooks the slot's module, the wrapper
    ours.controlnet.to("meta")  # its offload: the ControlNets' memory is given back at once, not kept idle
    assert on_host.resident_bytes < resident


def test_a_state_dict_loaded_into_a_wrapper_of_controlnets_is_not_seen_by_the_others(family_store, family,
                                                                                      tmp_path):
    """`pipe.controlnet.load_state_dict(...)` of a MultiControlNetModel writes into the
    ControlNets it wraps: into copies of their own, as a model's `load_state_dict`
    does, not into the tensors another pipeline's ControlNets share. (Until
    2026-12-07 the wrapper's went past the copy-on-write of the models inside it.)"""
    pipeline = two_controlnets(family_store, family, tmp_path)
    on_host = ResidencyPool("cpu", budget_bytes=1 << 40)
    ours, theirs = (pipeline(compstore, lambda i: f"cn{i}" if i != "A" else "A", store=family_store)
                    for _ in range(2))
    to_device(ours, "cpu", pool=on_host)
    to_device(theirs, "cpu", pool=on_host)
    want = {k: v.clone() for k, v in theirs.controlnet.state_dict().items()}
    mine = {k: v + 1.0 for k, v in want.items() if k.startswith("nets.1.controlnet_cond_embedding.")}

    def shared_names():
        kept = theirs.controlnet.state_dict()
        return {k for k, t in ours.controlnet.state_dict().items() if t.numel() and same_storage(t, kept[k])}

    shared = shared_names()
    assert mine and set(mine) <= shared
    ours.controlnet.load_state_dict(mine, strict=False)
    got, kept = ours.controlnet.state_dict(), theirs.controlnet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in mine.items())
    assert all(torch.equal(kept[k], v) for k, v in want.items())  # the other pipeline's: unchanged
    assert shared - shared_names() == set(mine)  # copies of only what it loaded


def test_a_moved_module_is_still_the_stores_on_its_next_move(family_store):
    # A move binds new tensors, whose version counters are not the loaded ones: the
    # store record must follow them, or the next move (pipe.to("cpu") then "cuda",
    # an offload hook at every forward) makes private copies and shares nothing.
    first = ResidencyPool("cpu", budget_bytes=1 << 40)
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=first)  # built, moved
    second = ResidencyPool("cpu", budget_bytes=1 << 40)  # stands for another device
    moved = to_device(a, "cpu", pool=second)
    # Pooled under the store's keys (identical tensors within A once), CLIP's computed
    # position_ids under its bytes' address: nothing left private.
    assert moved.bytes_from_store + moved.bytes_reused == model_bytes(a)
    a2 = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=second)
    assert second.last_report.bytes_uploaded == 0
    assert same_storage(a2.unet.conv_in.weight, a.unet.conv_in.weight)


@pytest.mark.parametrize("how", [".to(dtype)", ".half() and .float()"])
def test_a_cast_is_never_the_stores_and_releases_the_pools_tensors(family_store, family, how):
    # fp32 -> fp16 -> fp32 loses bits, and `.to(dtype)` keeps each parameter's version
    # counter: the cast tensors must lose their store record, or a later move would
    # pool them as the store's. SDXL casts its VAE to fp32 and back at every fp16 run.
    import diffusers
    from test_loader import image

    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    stored = a.vae.decoder.conv_out.weight.detach().clone()
    if how == ".to(dtype)":
        a.vae.to(torch.float16)
        a.vae.to(torch.float32)
    else:
        a.vae.half()
        a.vae.float()
    assert not torch.equal(a.vae.decoder.conv_out.weight, stored)
    assert pool.keys_used_by(a.vae) == set()  # idle now
    assert {key for key in pool._resident if key[:2] in {v[:2] for v in getattr(a.unet, STORE_KEYS).values()}} \
        == pool.keys_used_by(a.unet)
    second = ResidencyPool("cpu", budget_bytes=1 << 40)  # stands for another device
    to_device(a, "cpu", pool=second)
    a2 = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=second)
    assert torch.equal(a2.vae.decoder.conv_out.weight, stored)  # the store's, not the cast's
    reference = diffusers.StableDiffusionPipeline.from_pretrained(family["A"])
    np.testing.assert_array_equal(image(a2), image(reference))


def test_a_move_with_the_dtype_it_has_keeps_the_stores_tensors(family_store):
    # pipe.to(device, dtype) casts, then moves: a dtype the tensors already have is no
    # cast, and must not make them private.
    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    a.to("cpu", torch.float32)
    a.to(device="cpu", dtype=torch.float32)
    for m in (a.unet, a.vae, a.text_encoder):
        keys = getattr(m, STORE_KEYS)
        assert all(t._version == keys[n][2] for n, t in m.state_dict(keep_vars=True).items() if n in keys)
    assert {key for key in pool._resident if key[:2] in {v[:2] for v in getattr(a.vae, STORE_KEYS).values()}} \
        == pool.keys_used_by(a.vae)


def test_a_textual_inversion_resizes_the_embedding_and_it_moves_as_a_new_tensor(family_store, family):
    """`load_textual_inversion` adds a token and `resize_token_embeddings`: a new
    embedding tensor, whose version counter (0) matched the loaded one's. Until
    2026-12-07 the next move took it for the store's and failed: "shape '[520, 32]' is
    invalid for input of size 32000"."""
    import diffusers
    from test_loader import image

    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)  # A resident

    def with_new_token(pipe):
        pipe.tokenizer.add_tokens(["<cat-toy>"])
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        # the learned embedding, set as diffusers' load_textual_inversion sets it: through
        # `.data`, which leaves the new tensor's version counter at 0
        pipe.text_encoder.get_input_embeddings().weight.data[-1] = 0.5
        return pipe

    a = with_new_token(compstore.DiffusionPipeline.from_pretrained("A", store=family_store))
    embedding = a.text_encoder.get_input_embeddings().weight
    moved = to_device(a, "cpu", pool=pool)
    assert moved.bytes_reused == model_bytes(a) - embedding.numel() * embedding.element_size()
    reference = with_new_token(diffusers.StableDiffusionPipeline.from_pretrained(family["A"]))
    np.testing.assert_array_equal(image(a, "a <cat-toy>"), image(reference, "a <cat-toy>"))


@pytest.mark.parametrize("how", ["moved", "loaded onto the device"])
def test_no_two_weights_of_a_model_on_the_device_share_memory_and_it_saves(family_store, tmp_path, how):
    """Models share the pool's tensors; within one model, two weights of the same bytes
    (the tiny family's norm weights of ones) are copies, as a CPU load and diffusers
    give them. Until 2026-12-07 they were one device tensor: an in-place edit of one
    changed the other, and `save_pretrained` refused ("Some tensors share memory")."""
    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    b = compstore.DiffusionPipeline.from_pretrained("B", store=family_store)
    if how == "moved":
        to_device(b, "cpu", pool=pool)
    else:
        b = compstore.DiffusionPipeline.from_pretrained("B", store=family_store, pool=pool)
    assert same_storage(a.vae.encoder.conv_in.weight, b.vae.encoder.conv_in.weight)  # shared across models
    for model in (b.unet, b.vae, b.text_encoder):
        tensors = [*model.parameters(), *model.buffers()]
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    ones = [p for p in b.unet.parameters() if p.dim() == 1 and bool((p == 1).all())]
    assert len(ones) > 1
    with torch.no_grad():
        ones[0].add_(1)
    assert bool((ones[1] == 1).all())
    with torch.no_grad():
        ones[0].sub_(1)
    b.save_pretrained(tmp_path / "B")
    family_store.ingest(tmp_path / "B", "B-saved")
    assert family_store.diff("B", "B-saved").delta_bytes == 0


@pytest.mark.parametrize("then", ["trim", "move again"])
def test_a_pool_tensor_a_module_replaced_becomes_idle(family_store, then):
    """A textual inversion loaded onto a pipeline already on the device replaces its
    embedding (`resize_token_embeddings`), past any move or cast. Until 2026-12-07 the
    pool counted the old embedding in use for as long as the pipeline lived: never
    evicted, a second embedding on the device. `trim()` and the next move see it go."""
    pool = ResidencyPool("cpu", budget_bytes=0)  # idle tensors go at once
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    old = a.text_encoder.get_input_embeddings().weight
    old_bytes, resident = old.numel() * old.element_size(), pool.resident_bytes
    used = pool.keys_used_by(a.text_encoder)
    assert pool.idle_bytes == 0 and old.untyped_storage().data_ptr() in {
        pool._resident[key].tensor.untyped_storage().data_ptr() for key in used}
    a.tokenizer.add_tokens(["<cat-toy>"])
    a.text_encoder.resize_token_embeddings(len(a.tokenizer))
    del old
    if then == "trim":
        pool.trim()
    else:
        a.to("cpu")  # on the pool's device already: a move that moves nothing
    assert pool.resident_bytes == resident - old_bytes
    assert len(pool.keys_used_by(a.text_encoder)) == len(used) - 1  # the new embedding: private
    b = compstore.DiffusionPipeline.from_pretrained("B", store=family_store, pool=pool)  # A's encoder
    moved = {c.component: c for c in pool.last_report.components}
    assert moved["text_encoder"].bytes_from_store == old_bytes  # evicted, so uploaded again
    reference = compstore.DiffusionPipeline.from_pretrained("B", store=family_store)
    assert torch.equal(b.text_encoder.get_input_embeddings().weight,
                       reference.text_encoder.get_input_embeddings().weight)


def test_a_tensor_put_in_the_place_of_a_stored_one_is_not_the_stores(family_store):
    """`load_state_dict(assign=True)` binds the tensors given; a new tensor's version
    counter (0) is the one a freshly loaded tensor has. Until 2026-12-07 a move took
    it for the store's and served the stored bytes in its place."""
    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)  # A resident
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store)
    mine = torch.full_like(a.unet.conv_in.weight, 0.25)
    a.unet.load_state_dict({"conv_in.weight": mine}, strict=False, assign=True)
    assert mine._version == 0
    to_device(a, "cpu", pool=pool)
    assert torch.equal(a.unet.conv_in.weight, mine)
    assert pool.last_report.bytes_reused == model_bytes(a) - mine.numel() * mine.element_size()


def test_loads_and_moves_under_inference_mode(family_store, family):
    """A service loads where it serves, under `torch.inference_mode()`. Until
    2026-12-07 every compstore load there failed ("Inference tensors do not track
    version counter"; through a pool, "Inplace update to inference tensor outside
    InferenceMode is not allowed"). Loads, moves and casts make normal tensors; a
    tensor a conversion past the routing made there is an inference tensor, never
    the store's."""
    import diffusers
    from test_loader import image

    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    with torch.inference_mode():
        b = compstore.DiffusionPipeline.from_pretrained("B", store=family_store, pool=pool)
        a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
        shared = pool.last_report.bytes_reused
        assert shared > 0 and not any(t.is_inference() for t in a.unet.parameters())
        on_host = compstore.DiffusionPipeline.from_pretrained("A", store=family_store)
        assert to_device(on_host, "cpu", pool=pool).bytes_uploaded == 0
        c = compstore.DiffusionPipeline.from_pretrained("C", store=family_store)
        assert to_device(c, "cpu", pool=pool).bytes_from_store > 0  # C's delta, uploaded here
        unet = compstore.UNet2DConditionModel.from_pretrained("A", subfolder="unet", store=family_store)
        unet.to(torch.float16)
        unet.to("cpu")
        torch.nn.Module.half(on_host.unet.conv_in)  # past the routing: inference tensors
        on_host.unet.conv_in.weight.mul_(2.0)  # an edit no version counter sees
        edited = on_host.unet.conv_in.weight.clone()
        assert on_host.unet.conv_in.weight.is_inference()
        moved = to_device(on_host, "cpu", pool=pool)
        assert torch.equal(on_host.unet.conv_in.weight, edited)
        fp16 = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool,
                                                           torch_dtype=torch.float16)
        assert torch.equal(fp16.unet.conv_in.weight, a.unet.conv_in.weight.half())  # not the edit
        assert moved.bytes_reused == model_bytes(on_host) - on_host.unet.conv_in.weight.nbytes \
            - on_host.unet.conv_in.bias.nbytes
        reference = diffusers.StableDiffusionPipeline.from_pretrained(family["A"])
        np.testing.assert_array_equal(image(a), image(reference))
    assert unet.conv_in.weight.dtype == torch.float16 and b.unet.conv_in.weight.device.type == "cpu"


@pytest.mark.parametrize("loaded", ["on the host", "through a pool"])
@pytest.mark.parametrize("how", ["deep copy", "pickle"])
def test_a_copy_of_an_edited_model_keeps_its_edits_through_a_move(family_store, how, loaded):
    """A deep copy's or an unpickled model's tensors are clones, at version 0, the
    version a freshly loaded tensor has: until 2026-12-07 a move of a copy of an
    edited model served the store's bytes in place of its edit, and pickling failed
    (`torch.save(pipe.unet)`, a pipeline sent to another process: "cannot pickle
    'weakref.ReferenceType' object"; a pipeline loaded through a pool could not even
    be deep-copied: "cannot pickle '_queue.SimpleQueue' object"). The copy's tensors
    are its own, as they are in a copy of a diffusers model; it still moves and
    casts through its own routing, and a copy keeps its pool (pickled: the same
    device's pool where it is unpickled)."""
    import copy
    import pickle

    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)  # A resident
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store,
                                                    pool=pool if loaded == "through a pool" else None)
    with torch.no_grad():
        a.unet.conv_in.weight.mul_(2.0)
    edited = a.unet.conv_in.weight.detach().clone()
    twin = copy.deepcopy(a) if how == "deep copy" else pickle.loads(pickle.dumps(a))
    if loaded == "through a pool":
        assert getattr(twin, POOL) is (pool if how == "deep copy" else compstore.pool_for("cpu"))
    to_device(twin, "cpu", pool=pool)
    assert pool.last_report.bytes_reused == 0  # its tensors are its own, as a diffusers copy's
    assert torch.equal(twin.unet.conv_in.weight, edited)
    twin.unet.to(torch.float16)  # routed on the copy, not on `a`
    assert twin.unet.conv_in.weight.dtype == torch.float16 and a.unet.conv_in.weight.dtype == torch.float32


def test_private_copies_for_weight_editors(family_store):
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    a = load(family_store, "A")
    to_device(a, "meta", pool=pool)
    b = load(family_store, "A")
    report = to_device(b, "meta", pool=pool, private=True)
    assert report.bytes_reused == 0 and report.bytes_uploaded == model_bytes(b)
    assert not same_storage(b.vae.encoder.conv_in.weight, a.vae.encoder.conv_in.weight)


def test_tied_weights_stay_tied_after_a_move(store, tmp_path):
    from transformers import T5Config, T5EncoderModel

    T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=8, num_layers=1,
                            num_heads=2)).save_pretrained(tmp_path / "t5")
    model = compstore.load_component(str(tmp_path / "t5"), store=store)
    to_device(model, "meta", pool=ResidencyPool("meta", copier=CountingCopier()))
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert model.shared.weight.device.type == "meta"


def test_pipe_to_goes_through_the_pool(family_store, monkeypatch):
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    monkeypatch.setitem(compstore.loader.residency._POOLS, "meta", pool)
    a, b = load(family_store, "A"), load(family_store, "B")
    a.to("meta")
    b.to("meta")
    assert compstore.last_transfer().bytes_uploaded == (
        family_store.diff("A", "B").delta_bytes + unkeyed_bytes(b))
    assert b.unet.device.type == "meta"


def test_a_device_without_its_index_is_the_current_one(monkeypatch):
    # torch.device("cuda") != torch.device("cuda:0"), the device its tensors report:
    # a pool must hold the index, and "cuda" and "cuda:1" must be one pool.
    from compstore.loader import residency

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setenv("COMPSTORE_VRAM_BUDGET", "0")
    monkeypatch.setattr(residency, "_POOLS", {})
    assert residency.canonical_device("cuda") == torch.device("cuda", 1)
    assert residency.canonical_device("cuda:0") == torch.device("cuda", 0)
    assert residency.canonical_device("cpu") == torch.device("cpu")
    assert ResidencyPool("cuda").device == torch.device("cuda", 1)
    assert residency.pool_for("cuda") is residency.pool_for("cuda:1")
    assert residency.pool_for("cuda:0") is not residency.pool_for("cuda")


def test_to_device_refuses_a_pool_on_another_device():
    with pytest.raises(compstore.CompstoreError, match="the pool is on meta, not cpu"):
        to_device(torch.nn.Linear(2, 2), "cpu", pool=ResidencyPool("meta"))


# -- the real upload path (no injected copier), on a CPU target ---------------------
@pytest.mark.parametrize("staged", [False, True])
def test_uploader_copies_every_byte(staged):
    from compstore.loader.upload import Uploader

    torch.manual_seed(0)
    srcs = [torch.randn(1000), torch.randn(7, 3).half(), torch.empty(0), torch.tensor(3.5),
            torch.rand(4096) > 0.5, torch.randint(0, 255, (2500,), dtype=torch.uint8),
            torch.randn(300, 5).t(),  # not contiguous: uploaded contiguous
            torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last),  # kept channels-last,
            torch.randn(4, 3, 2, 5, 5).to(memory_format=torch.channels_last_3d)]  # as torch's .to keeps it
    up = Uploader("cpu", readers=3, staging_bytes=1000, staged=staged)  # many ring turns
    outs = up.upload(srcs)
    up.close()
    for s, o in zip(srcs, outs):
        assert o.shape == s.shape and o.dtype == s.dtype and torch.equal(o, s)
        assert o.numel() == 0 or o.data_ptr() != s.data_ptr()
    assert outs[-3].is_contiguous()
    assert outs[-2].stride() == srcs[-2].stride() and outs[-1].stride() == srcs[-1].stride()


@pytest.mark.parametrize("staged", [False, True])
def test_uploader_copies_a_piece_of_many_tensors_in_one_call(staged, monkeypatch):
    """A reader thread lets go of the GIL in each copy; beside a thread running
    Python it then waits a switch interval to get it back. So the copies of one
    staging buffer (or one CPU piece) are one call, however many tensors it holds:
    here 200 tensors in two buffers, filled and emptied in two calls each."""
    from compstore.loader import upload

    calls = []
    foreach = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda d, s, **kw: (calls.append(len(d)), foreach(d, s, **kw)))
    monkeypatch.setattr(torch.Tensor, "copy_", lambda *a, **kw: pytest.fail("a copy per tensor"))
    srcs = [torch.full((250,), i, dtype=torch.int32) for i in range(200)]  # 1,000 bytes each
    monkeypatch.setattr(upload, "PIECE_BYTES", 100_000)
    up = upload.Uploader("cpu", readers=2, staging_bytes=100_000, staged=staged)
    outs = up.upload(srcs)
    up.close()
    assert all(torch.equal(o, s) for o, s in zip(outs, srcs))
    assert calls == ([100] * 4 if staged else [100] * 2)


class FakeStreams:
    """Stand-ins for torch's CUDA streams and events that log what is asked of them,
    so that the CUDA ordering of uploads is checked on a CPU target (the copies
    themselves run on the CPU). Tensors of 5 elements count as pageable, the rest
    as pinned."""

    class Stream:
        def __init__(self, log, name):
            self.log, self.name = log, name

        def wait_stream(self, other):
            self.log.append((self.name, "wait_stream", other.name))

        def wait_event(self, event):
            self.log.append((self.name, "wait_event", event.n))

        def synchronize(self):
            self.log.append((self.name, "synchronize"))

    def __init__(self, monkeypatch):
        from contextlib import nullcontext

        self.log, self.events = [], 0
        self.current = self.Stream(self.log, "default")
        log, streams = self.log, self

        class Event:
            def __init__(self):
                streams.events += 1
                self.n = streams.events

            def record(self, stream):
                log.append((stream.name, "record", self.n))

            def query(self):
                return False

            def synchronize(self):
                log.append(("host", "synchronize", self.n))

        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
        self.streamed = []  # (stream, tensor) of each `record_stream`
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: t.numel() != 5)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: self.streamed.append((stream.name, t)))

    def uploader(self, **kwargs):
        from compstore.loader.upload import Uploader

        up = Uploader("cpu", **kwargs)
        up._stream = self.Stream(self.log, "side")  # what a CUDA target has
        up._back = self.Stream(self.log, "back")
        return up


def test_a_pinned_batch_uploaded_without_waiting_is_ordered_on_the_device(monkeypatch):
    """The CUDA protocol of `Uploader.upload(wait=False)`: a batch of pinned tensors
    is only queued, the caller's stream waits for its event, the host does not;
    another thread's stream is ordered after it, and `wait()` waits on the host.
    A batch with anything to stage is always waited for."""
    fake = FakeStreams(monkeypatch)
    up = fake.uploader(readers=2, staging_bytes=64, staged=True)
    pinned = [torch.randn(1000), torch.arange(7)]
    outs = up.upload(pinned, wait=False)
    assert all(torch.equal(o, s) for o, s in zip(outs, pinned))
    assert fake.log == [("side", "wait_stream", "default"), ("side", "record", 1), ("default", "wait_event", 1)]
    fake.log.clear()
    fake.current = fake.Stream(fake.log, "another thread's")
    up.order_after_running()
    assert fake.log == [("another thread's", "wait_event", 1)]
    fake.log.clear()
    up.wait()
    assert fake.log == [("host", "synchronize", 1)] and not up._in_flight
    fake.log.clear()
    mixed = [torch.randn(1000), torch.randn(5)]  # the second one needs the staging ring
    outs = up.upload(mixed, wait=False)
    assert all(torch.equal(o, s) for o, s in zip(outs, mixed))
    assert ("side", "synchronize") in fake.log and not up._in_flight
    up.close()


def test_a_load_returns_after_its_pinned_tier_copies_ran_behind_its_python(family_store, family, monkeypatch):
    """An eviction into the pinned tier is one batch of copies queued on the
    copy-back stream, after the caller's stream; the host waits for none of it,
    and the evicted device memory is held for that stream (`record_stream`). A
    switch whose delta waits in the tier has its uploads wait for those copies on
    the device, queues them (`wait=False`) and builds the rest of the pipeline
    meanwhile; it returns only after waiting for them on the host. The images
    equal plain diffusers'."""
    import diffusers
    import numpy as np
    from test_loader import image

    fake = FakeStreams(monkeypatch)
    pool = ResidencyPool("cpu", budget_bytes=0, pinned_budget_bytes=1 << 40, uploader=fake.uploader())
    load = lambda name: compstore.DiffusionPipeline.from_pretrained(name, store=family_store, pool=pool)  # noqa: E731
    b = load("B")
    del b
    gc.collect()
    fake.log.clear()
    a = load("A")  # B's UNet tensors go to the pinned tier
    assert pool.pinned_bytes > 0
    back = [entry for entry in fake.log if entry[0] == "back"]
    assert [entry[:2] for entry in back] == [("back", "wait_stream"), ("back", "record")]  # one batch
    assert back[0][2] == "default"
    copied = back[1][2]
    assert not any(entry[1] == "synchronize" for entry in fake.log if copied in entry or entry[0] == "back")
    assert [name for name, _ in fake.streamed] == ["back"] * len(pool._tier.tensors()) != []
    fake.log.clear()
    b = load("B")
    assert compstore.last_transfer().bytes_from_pinned == family_store.diff("A", "B").delta_bytes > 0
    assert fake.log[0] == ("default", "wait_event", copied)  # the uploads from the tier after the copies back
    queued = [entry[2] for entry in fake.log if entry[1] == "record"]
    assert len(queued) == 1  # one batch: the UNet's tensors from the pinned tier
    assert fake.log.index(("default", "wait_event", *queued)) == 3  # right after it was queued
    assert fake.log[-1] == ("host", "synchronize", *queued)  # the load's last word
    np.testing.assert_array_equal(image(b), image(diffusers.StableDiffusionPipeline.from_pretrained(family["B"])))
    del a


def test_cpu_target_switches_through_the_real_uploader_and_images_match_diffusers(family_store, family):
    """A -> B -> A through the default uploader (CPU memory as the device): bytes
    moved are B's delta, then nothing; images equal plain diffusers' every time."""
    import diffusers
    import numpy as np
    from test_loader import image, mapped_pack_ranges

    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    a = load(family_store, "A")
    first = to_device(a, "cpu", pool=pool)
    assert first.bytes_uploaded + first.bytes_reused == model_bytes(a) - unkeyed_bytes(a)
    ranges = mapped_pack_ranges(family_store)
    assert ranges and not any(lo <= p.data_ptr() < hi for p in a.unet.parameters() for lo, hi in ranges)
    b = load(family_store, "B")
    second = to_device(b, "cpu", pool=pool)
    assert second.bytes_uploaded == family_store.diff("A", "B").delta_bytes
    assert same_storage(a.vae.decoder.conv_out.weight, b.vae.decoder.conv_out.weight)
    theirs = {n: diffusers.StableDiffusionPipeline.from_pretrained(family[n]) for n in "AB"}
    np.testing.assert_array_equal(image(b), image(theirs["B"]))
    del a
    gc.collect()
    a2 = load(family_store, "A")
    third = to_device(a2, "cpu", pool=pool)
    assert third.bytes_uploaded == 0 and third.bytes_reused > 0
    np.testing.assert_array_equal(image(a2), image(theirs["A"]))


def test_a_components_to_goes_through_the_pool(family_store, monkeypatch):
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    monkeypatch.setitem(compstore.loader.residency._POOLS, "meta", pool)
    a, b = load(family_store, "A"), load(family_store, "B")
    a.vae.to("meta")
    report = compstore.last_transfer()
    assert report.bytes_uploaded > 0 and b.vae.encoder.conv_in.weight.device.type == "cpu"
    b.vae.to("meta", None)  # as diffusers' pipelines call it; B's VAE is A's: nothing moves
    assert compstore.last_transfer().bytes_uploaded == 0
    assert same_storage(a.vae.encoder.conv_in.weight, b.vae.encoder.conv_in.weight)
    b.to("meta")  # the pipeline's move: one report, its modules' .to do not route again
    per = {c.component for c in compstore.last_transfer().components}
    assert per >= {"unet", "vae", "text_encoder"}


def test_a_device_load_uploads_in_the_background_while_it_builds(family_store):
    import threading

    from compstore.loader import warm

    warm.clear_caches()  # every model freshly built: each one's upload is prefetched
    threads = set()

    class ThreadNoting(CountingCopier):
        def __call__(self, t, device):
            threads.add(threading.current_thread().name)
            return super().__call__(t, device)

    copier = ThreadNoting()
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    report = compstore.last_transfer()
    assert any(name.startswith("compstore-prefetch") for name in threads)
    # Each byte uploaded once (prefetched ones are taken by the move, not uploaded again),
    # and every uploaded tensor is a pool entry (CLIP's computed position_ids too).
    assert report.bytes_uploaded == copier.bytes == pool.resident_bytes > 0
    assert not pool._prefetched
    assert a.unet.conv_in.weight.device.type == "meta"
    warm.clear_caches()


def test_a_load_that_fails_after_prefetching_drops_the_uploads(family_store, monkeypatch):
    from compstore.loader import component, warm

    warm.clear_caches()
    copier = CountingCopier()
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)

    def broken(*args, **kwargs):
        raise RuntimeError("constructor failed")

    monkeypatch.setattr(component, "_instantiate", broken)  # after the prefetch, before the move
    with pytest.raises(RuntimeError, match="constructor failed"):
        compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    assert copier.bytes > 0  # the first model's upload had started
    assert not pool._prefetched and pool.resident_bytes == 0
    warm.clear_caches()


def test_tokenizers_load_while_the_models_upload_and_a_failure_drops_the_uploads(family_store, monkeypatch):
    """Models are built first (each starting its upload), tokenizers and schedulers
    load next, and only then do the moves take the uploads: the uploads run on
    behind that Python work. A small part that fails still leaves the pool empty."""
    from compstore.loader import pipeline, warm

    warm.clear_caches()
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    under_way = []
    real = pipeline.small_part

    def noting(*args):
        under_way.append(len(pool._prefetched))
        return real(*args)

    monkeypatch.setattr(pipeline, "small_part", noting)
    compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    assert under_way and min(under_way) > 0 and not pool._prefetched

    def broken(*args):
        raise RuntimeError("tokenizer failed")

    warm.clear_caches()
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    monkeypatch.setattr(pipeline, "small_part", broken)
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    assert pool.copier.bytes > 0 and not pool._prefetched and pool.resident_bytes == 0
    warm.clear_caches()


def test_the_same_bytes_in_another_shape_are_served_in_that_shape():
    """Pool keys are bytes and dtype: a (4, 4) linear weight and a (4, 4, 1, 1) conv
    with the same values share one device tensor, each module seeing its own shape."""
    weight = torch.arange(16, dtype=torch.float32)
    linear, conv = torch.nn.Linear(4, 4, bias=False), torch.nn.Conv2d(4, 4, 1, bias=False)
    linear.weight.data = weight.view(4, 4).clone()
    conv.weight.data = weight.view(4, 4, 1, 1).clone()
    for m in (linear, conv):
        setattr(m, STORE_KEYS, {"weight": store_record(("same-blob", 64), m.weight)})
    copier = CountingCopier()
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    pool.move(linear)
    second = pool.move(conv)
    assert second.bytes_reused == 64 and copier.bytes == 64
    assert linear.weight.shape == (4, 4) and conv.weight.shape == (4, 4, 1, 1)


def test_a_module_built_on_served_tensors_gets_them_in_its_own_shape():
    """`serve` (how a template clone is born on the device) applies the same rule:
    the resident (4, 4) weight is handed out as a (4, 4, 1, 1) view."""
    linear = torch.nn.Linear(4, 4, bias=False)
    setattr(linear, STORE_KEYS, {"weight": store_record(("same-blob", 64), linear.weight)})
    copier = CountingCopier()
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    pool.move(linear)

    def host(indices):
        raise AssertionError(f"resident tensors were read from the host: {indices}")

    data, placement = pool.serve([("same-blob", 64)], [torch.empty(4, 4, 1, 1, device="meta")], host)
    assert data[0].shape == (4, 4, 1, 1) and same_storage(data[0], linear.weight)
    assert placement.transfer.bytes_reused == 64 and copier.bytes == 64


def test_served_tensors_are_not_evicted_before_their_module_claims_them():
    """Between `serve` and `claim` (the clone is being built) another thread's move
    may evict: the placement itself uses the served tensors until then."""
    pool = ResidencyPool("meta", budget_bytes=0, copier=CountingCopier())
    blobs = [("blob-a", 64), ("blob-b", 64)]
    likes = [torch.empty(4, 4, device="meta"), torch.empty(16, device="meta")]
    data, placement = pool.serve(blobs, likes, lambda indices: [torch.ones(4, 4), torch.ones(16)])
    other = torch.nn.Linear(2, 2, bias=False)
    setattr(other, STORE_KEYS, {"weight": store_record(("blob-c", 16), other.weight)})
    pool.move(other)  # evicts every idle tensor (budget 0)
    assert pool.resident_bytes == 64 + 64 + 16
    module = torch.nn.Module()
    module.a, module.b = torch.nn.Parameter(data[0]), torch.nn.Parameter(data[1])
    pool.claim(module, placement)
    del placement
    pool.move(other)
    assert pool.resident_bytes == 64 + 64 + 16  # the module uses them now
    del module
    gc.collect()
    pool.release(other)  # evicts again: nothing uses blob-a, blob-b or blob-c any more
    assert pool.resident_bytes == 0


def shared_linear() -> torch.nn.Linear:
    """A store-loaded stand-in: a 64-byte weight recorded as the blob "shared-blob"."""
    m = torch.nn.Linear(4, 4, bias=False)
    m.weight.data = torch.ones(4, 4)
    setattr(m, STORE_KEYS, {"weight": store_record(("shared-blob", 64), m.weight)})
    return m


def test_each_user_counts_once_and_a_released_user_dying_counts_nothing_more():
    """A tensor is in use while any module using it lives: moving a module twice, or
    releasing it and then dropping it, must not count it twice, or a live module's
    tensor could be evicted (counted down too far) or never be (counted too few)."""
    pool = ResidencyPool("meta", budget_bytes=0, copier=CountingCopier())
    first, second = shared_linear(), shared_linear()
    pool.move(first)
    pool.move(first)  # again: still one user
    pool.move(second)
    (key,) = pool._resident
    assert pool._resident[key].users == 2 and pool.keys_used_by(first) == pool.keys_used_by(second) == {key}
    pool.release(first)
    assert pool._resident[key].users == 1 and pool.keys_used_by(first) == set()
    del first
    gc.collect()
    assert pool.resident_bytes == 64 and pool.idle_bytes == 0  # second still uses it: kept at budget 0
    assert pool._resident[key].users == 1
    pool.move(second)
    del second
    gc.collect()
    assert pool.idle_bytes == 64 and pool.trim() == 64 and pool.resident_bytes == 0


def test_a_user_dying_while_another_thread_holds_the_pool_takes_no_lock():
    """The last reference to a module may drop in any thread, e.g. the background
    upload thread, which holds the upload lock the pool's holder may wait for: the
    module's death only queues its entries, counted down by the next pool call."""
    import threading
    import time

    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    module = shared_linear()
    pool.move(module)
    held, done = threading.Event(), threading.Event()

    def hold():
        with pool._lock:
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    try:
        t0 = time.monotonic()
        del module
        gc.collect()
        assert time.monotonic() - t0 < 5  # a finalizer taking the pool's lock would wait 10 s
    finally:
        done.set()
        holder.join()
    assert pool.idle_bytes == 64  # counted down on the next call


def test_a_dropped_pipeline_is_freed_at_del_and_its_tensors_go_idle_at_once(family_store):
    """No reference cycle keeps a store-loaded pipeline alive: its modules (and their
    device tensors) go when the last reference does, not at the next full collection."""
    import weakref

    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    a = load(family_store, "A")
    to_device(a, "meta", pool=pool)
    refs = [weakref.ref(m) for m in (a, a.unet, a.vae, a.text_encoder, a.scheduler)]
    gc.disable()
    try:
        del a
        assert all(r() is None for r in refs)
        assert pool.idle_bytes == pool.resident_bytes > 0
    finally:
        gc.enable()


def test_a_chained_move_of_a_pipeline_just_loaded(family_store, family, monkeypatch):
    """`from_pretrained(...).to("cuda")`, diffusers' own idiom: nothing but the call
    holds the pipeline. Until 2026-12-07 it failed ("type object 'NoneType' has no
    attribute 'to'"): the routed `.to` held the pipeline weakly, and it was gone by
    the time the call ran; so did `load_component(...).half()`."""
    import diffusers

    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    monkeypatch.setitem(compstore.loader.residency._POOLS, "meta", pool)
    pipe = compstore.DiffusionPipeline.from_pretrained("A", store=family_store).to("meta")
    assert {t.device.type for t in pipe.unet.parameters()} == {"meta"}
    moved = compstore.last_transfer()  # the pool's report: it moved every tensor
    assert moved.device == "meta" and moved.bytes_uploaded + moved.bytes_reused == model_bytes(pipe) > 0
    unet = compstore.load_component("B", "unet", store=family_store).to("meta")
    assert compstore.last_transfer().bytes_uploaded == family_store.diff("A", "B").delta_bytes
    half = compstore.load_component("A", "vae", store=family_store).half()
    assert {t.dtype for t in half.parameters()} == {torch.float16} and unet.device.type == "meta"
    # A plain diffusers pipeline of the same class moves as diffusers moves it: not through the pool.
    before = compstore.last_transfer()
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(family["A"]).to("meta")
    assert compstore.last_transfer() is before and theirs.unet.device.type == "meta"


def test_a_deep_copy_of_a_component_moves_itself(family_store, monkeypatch):
    import copy

    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    monkeypatch.setitem(compstore.loader.residency._POOLS, "meta", pool)
    a = load(family_store, "A")
    twin = copy.deepcopy(a.vae)
    twin.to("meta")
    assert {t.device.type for t in twin.parameters()} == {"meta"}
    assert {t.device.type for t in a.vae.parameters()} == {"cpu"}


def test_switches_within_the_budget_run_no_full_collection(family_store, monkeypatch):
    """Eviction needs no `gc.collect()` (a full collection: ~0.4 s in a process with two
    SDXL-size pipelines): dropped pipelines are freed by reference counting."""
    pool = ResidencyPool("meta", budget_bytes=0, pinned_budget_bytes=1 << 40, copier=CountingCopier(),
                         offloader=fake_offload)
    to_device(load(family_store, "A"), "meta", pool=pool)
    collections = []
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or 0)
    b = load(family_store, "B")
    to_device(b, "meta", pool=pool)  # evicts A's UNet, idle since A was dropped
    assert pool.idle_bytes == 0 and pool.pinned_bytes > 0 and collections == []
