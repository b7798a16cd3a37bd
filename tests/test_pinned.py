"""The pinned tier (compstore/loader/pinned.py) on CPU tensors: what it gives back,
what it holds against its budget, and that a region handed out is never written again."""

import gc

import torch

from compstore import ResidencyPool, to_device
from compstore.loader.pinned import ALIGN, SLAB_BYTES, PinnedTier
from compstore.loader.upload import _copy

MiB = 1 << 20


def counting_copies():
    calls = []

    def copy(hosts, tensors):
        calls.append(len(hosts))
        _copy(hosts, tensors)
    return calls, copy


def test_kept_tensors_come_back_equal_in_one_copy_call():
    torch.manual_seed(0)
    tensors = [torch.randn(1000, 3), torch.randn(7).half(), torch.tensor(2.5, dtype=torch.float64),
               torch.randn(2, 3, 4, 5).bfloat16(),
               torch.rand(33) > 0.5, torch.randint(0, 9, (5, 5), dtype=torch.int64).t()]  # .t(): not contiguous
    calls, copy = counting_copies()
    tier = PinnedTier(64 * MiB, pin=False, copy_back=copy)
    tier.keep([(("k", i), t) for i, t in enumerate(tensors)])
    assert calls == [len(tensors)]
    assert tier.held_bytes == 64 * MiB  # one slab: the largest power of two within the budget
    for i, t in enumerate(tensors):
        host = tier.take(("k", i))
        assert host.dtype == t.dtype and host.shape == t.shape and torch.equal(host, t)
        assert host.is_contiguous()  # a plain buffer for the upload, whatever the source's layout
        assert host.storage_offset() * host.element_size() % ALIGN == 0  # where it starts in its slab
    assert tier.take(("k", 0)) is None and tier.held_bytes == 0  # the slab went back with its last entry


def test_the_tier_keeps_to_its_budget_dropping_its_oldest_entries():
    tier = PinnedTier(4 * MiB, pin=False)
    for i in range(12):  # 12 MiB through a 4 MiB tier, slabs of 4 MiB
        tier.keep([(i, torch.full((MiB // 4,), float(i)))])
        assert tier.held_bytes <= 4 * MiB
    kept = [i for i in range(12) if i in tier]
    assert kept == list(range(12 - len(kept), 12)) and len(kept) >= 2  # the newest stay
    assert all(torch.equal(tier.take(i), torch.full((MiB // 4,), float(i))) for i in kept)


def test_a_lower_budget_drops_the_oldest_entries_at_once():
    pool = ResidencyPool("cpu", budget_bytes=0, pinned_budget_bytes=1 << 30,
                         offloader=lambda hosts, tensors: None)  # the bytes do not matter here
    pool._tier.keep([(i, torch.empty(MiB, dtype=torch.float64)) for i in range(100)])  # 8 MiB each
    assert pool.pinned_bytes == 4 * SLAB_BYTES  # 32 entries a slab, the last one 4
    pool.pinned_budget_bytes = 2 * SLAB_BYTES
    assert pool.pinned_bytes == 2 * SLAB_BYTES and [i for i in range(100) if i in pool._tier] == list(range(64, 100))
    pool.pinned_budget_bytes = 0
    assert pool.pinned_bytes == 0 and not pool._tier.tensors()


def test_a_tensor_over_the_budget_is_not_kept_and_drops_nothing():
    tier = PinnedTier(4 * MiB, pin=False)
    tier.keep([("small", torch.ones(10))])
    tier.keep([("big", torch.ones(MiB + 1))])  # 4 MiB + 4 B: a slab of 8 MiB
    assert "big" not in tier and "small" in tier and tier.held_bytes == 4 * MiB


def test_a_large_tensor_gets_a_power_of_two_slab_that_later_ones_fill():
    tier = PinnedTier(1 << 40, pin=False)
    big = torch.ones(300 * MiB // 4)  # over SLAB_BYTES (256 MiB): a 512 MiB slab
    tier.keep([("big", big), ("after", torch.zeros(10))])
    assert tier.held_bytes == 512 * MiB
    host_big, host_after = tier.take("big"), tier.take("after")
    assert host_after.data_ptr() - host_big.data_ptr() == 300 * MiB  # the same slab, right behind
    assert tier.held_bytes == 0


def test_a_region_handed_out_is_never_written_again():
    """A host tensor taken for an upload may still be copying to the device when
    the next eviction comes: later entries must land elsewhere."""
    tier = PinnedTier(4 * MiB, pin=False)
    tier.keep([("a", torch.full((1000,), 1.0)), ("b", torch.full((1000,), 2.0))])
    a = tier.take("a")
    b = tier.take("b")  # the slab is empty now
    tier.keep([(i, torch.full((MiB // 8,), -1.0)) for i in range(40)])  # 20 MiB through 4 MiB
    assert torch.equal(a, torch.full((1000,), 1.0)) and torch.equal(b, torch.full((1000,), 2.0))


def test_re_keeping_a_key_replaces_its_entry():
    tier = PinnedTier(4 * MiB, pin=False)
    tier.keep([("k", torch.zeros(4))])
    tier.keep([("k", torch.ones(4))])
    assert torch.equal(tier.take("k"), torch.ones(4)) and "k" not in tier and tier.held_bytes == 0


def test_an_eviction_copies_its_tensors_back_in_one_call(family_store):
    """A pool evicting a dropped pipeline's tensors sends them to the tier in one
    batch (one copy and one wait on a GPU, not one per tensor), and they come back
    from there equal to the store's."""
    import compstore

    calls, copy = counting_copies()
    pool = ResidencyPool("cpu", budget_bytes=1 << 40, pinned_budget_bytes=1 << 30, offloader=copy)
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store)
    to_device(a, "cpu", pool=pool)
    reference = {k: v.clone() for k, v in a.unet.state_dict().items()}
    del a
    gc.collect()
    evicted = pool.trim()
    assert evicted > 0 and len(calls) == 1 and calls[0] > 100
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store)
    again = to_device(a, "cpu", pool=pool)
    assert again.bytes_from_pinned == evicted
    state = a.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_an_entry_names_the_copy_back_that_fills_it_until_taken():
    """A copy back may still run when `keep` returns (on a GPU: its event); an
    upload from the tier waits for the events `copies_of` names, each batch once."""
    batches = iter(["first", "second"])

    def queued(hosts, tensors):
        _copy(hosts, tensors)
        return next(batches)

    tier = PinnedTier(4 * MiB, pin=False, copy_back=queued)
    tier.keep([("a", torch.ones(4)), ("b", torch.ones(4))])
    tier.keep([("c", torch.ones(4))])
    assert tier.copies_of(["a", "b", "c", "gone"]) == ["first", "second"]
    assert tier.copies_of(["b"]) == ["first"]
    tier.take("a")
    assert tier.copies_of(["a"]) == []
    plain = PinnedTier(4 * MiB, pin=False)  # the default: copied on return
    plain.keep([("a", torch.ones(4))])
    assert plain.copies_of(["a"]) == [] and torch.equal(plain.take("a"), torch.ones(4))


def test_reserved_regions_count_against_the_budget_until_committed():
    """`reserve` (a staging copy runs outside the pool's lock) takes room no `keep`
    may take meanwhile; `commit` makes entries of the regions still wanted and gives
    the others back."""
    tier = PinnedTier(8 * MiB, pin=False)  # slabs of 8 MiB: one
    reserved = tier.reserve([("a", torch.ones(MiB)), ("b", torch.ones(MiB // 2))])  # 6 MiB
    assert tier.held_bytes == 8 * MiB and "a" not in tier  # not an entry until committed
    tier.keep([("c", torch.ones(MiB))])  # 4 MiB more: no room in a budget of one slab
    assert "c" not in tier and tier.held_bytes == 8 * MiB
    for key, kept, t in reserved:
        _copy([kept.host], [t])
    assert tier.commit(reserved, wanted=lambda key: key != "b") == 4 * MiB  # "b" moved elsewhere meanwhile
    assert torch.equal(tier.take("a"), torch.ones(MiB)) and "b" not in tier
    assert tier.held_bytes == 0  # the last region of the slab went back
