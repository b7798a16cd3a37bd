"""Warm loads (compstore/loader/warm.py): a component loaded before is cloned from its
template, tokenizers share their backend until tokens are added, every other small
part is copied, and each load is still a fresh model that no edit of another load
reaches."""

import enum
import gc
import logging
import shutil
import types

import diffusers
import pytest
import torch
from diffusers.configuration_utils import FrozenDict

import compstore
from compstore import CompstoreError, ResidencyPool
from compstore.loader import synthetic, warm
from compstore.loader.residency import STORE_KEYS, named_tensors
from conftest import same_state, store_state
from test_residency import CountingCopier

MODELS = ("unet", "vae", "text_encoder")


@pytest.fixture(autouse=True)
def cold():
    warm.clear_caches()
    yield
    warm.clear_caches()


def load(store, ref="A", **kwargs):
    return compstore.DiffusionPipeline.from_pretrained(ref, store=store, **kwargs)


def tensors(module):
    """Every parameter and buffer once (non-persistent buffers too)."""
    return list(module.parameters()) + list(module.buffers())


def image(pipe):
    return pipe("a photo of a cat", num_inference_steps=2, output_type="np", height=32, width=32,
                generator=torch.Generator().manual_seed(0)).images


def immutable(value) -> bool:
    """Judged here, independently of warm.py's own rule."""
    if isinstance(value, (type(None), bool, int, float, str, bytes, type, torch.dtype,
                          torch.device, enum.Enum, types.FunctionType, FrozenDict)):
        return True
    return isinstance(value, (tuple, frozenset)) and all(immutable(v) for v in value)


def shared_mutables(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Module objects or mutable attributes that two module trees have in common."""
    found = []
    ids_b = {id(m) for m in b.modules()}
    for (name, ma), mb in zip(a.named_modules(), b.modules()):
        if id(ma) in ids_b:
            found.append(name or "<root>")
        for key, value in ma.__dict__.items():
            if key not in ("_parameters", "_buffers") and value is mb.__dict__.get(key) and not immutable(value):
                found.append(f"{name}.{key}")
    return found


def config(m: torch.nn.Module) -> dict:
    return m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)


def test_a_second_load_is_a_clone_sharing_nothing_mutable(family_store):
    first = load(family_store)
    assert len(warm._TEMPLATES) == 3  # unet, vae, text_encoder
    second = load(family_store)
    for slot in MODELS:
        a, b = getattr(first, slot), getattr(second, slot)
        template = next(t.module for t in warm._TEMPLATES.values() if type(t.module) is type(a))
        # The first load is a clone too: the constructed tree stays the template's alone.
        assert shared_mutables(template, a) == [] and all(t.is_meta for t in template.parameters())
        assert shared_mutables(a, b) == [] and shared_mutables(template, b) == [], slot
        same_state(a, b)
        assert repr(a) == repr(b) and config(a) == config(b) and not b.training
        # the same blobs, each record naming its own model's tensor
        assert ({n: r._replace(tensor=None) for n, r in getattr(a, STORE_KEYS).items()}
                == {n: r._replace(tensor=None) for n, r in getattr(b, STORE_KEYS).items()})
        assert all(r.tensor() is t for n, _, _, t in named_tensors(b) if (r := getattr(b, STORE_KEYS).get(n)))
    # CLIP's position_ids is not in the checkpoint: the clone gets its own copy.
    pa, pb = (dict(p.text_encoder.named_buffers())[name] for p in (first, second)
              for name in dict(p.text_encoder.named_buffers()) if name.endswith("position_ids"))
    assert torch.equal(pa, pb) and pa.data_ptr() != pb.data_ptr()
    assert (image(first) == image(second)).all()


def test_edits_to_one_load_never_reach_the_next(family_store):
    from diffusers.models.attention_processor import AttnProcessor

    reference = load(family_store, private=True)  # built anew: what a load must give
    edited = load(family_store)
    edited.unet.set_attn_processor(AttnProcessor())
    edited.unet.fuse_qkv_projections()
    edited.vae.register_forward_hook(lambda *_: None)
    edited.text_encoder.config.output_hidden_states = True
    with torch.no_grad():
        edited.unet.conv_in.weight.add_(1.0)  # in place, on a copy-on-write store view
    fresh = load(family_store)
    assert {type(p).__name__ for p in fresh.unet.attn_processors.values()} == {
        type(p).__name__ for p in reference.unet.attn_processors.values()}
    assert not hasattr(fresh.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1, "to_qkv")
    assert not fresh.vae._forward_hooks and fresh.text_encoder.config.output_hidden_states is False
    for slot in MODELS:
        same_state(getattr(reference, slot), getattr(fresh, slot))
    assert (image(reference) == image(fresh)).all()


def test_tokenizers_share_their_backend_until_tokens_are_added_and_schedulers_are_copied(family_store,
                                                                                        family):
    """Each pipeline's tokenizer is an object of its own sharing one backend (the
    vocabulary), until a textual inversion adds a token to it: then it gets a backend
    of its own, and no other pipeline sees the token. Until 2026-12-07 pipelines
    shared one tokenizer: the token reached the others too, and loading the same
    embedding into another failed ("Token <cat-toy> already in tokenizer vocabulary")."""
    from test_loader import image as image_of

    a, b = load(family_store), load(family_store)
    assert a.tokenizer is not b.tokenizer and a.tokenizer._tokenizer is b.tokenizer._tokenizer
    assert a.scheduler is not b.scheduler and a.scheduler.config == b.scheduler.config
    size = len(a.tokenizer)
    embedding = {"<cat-toy>": torch.full((32,), 0.5)}  # diffusers' format: token -> its vector
    a.load_textual_inversion(embedding)
    assert len(a.tokenizer) == size + 1 and len(b.tokenizer) == size
    assert a.tokenizer._tokenizer is not b.tokenizer._tokenizer
    b.load_textual_inversion(embedding)
    c = load(family_store)
    assert len(c.tokenizer) == size and c.tokenizer._tokenizer is not a.tokenizer._tokenizer
    reference = diffusers.StableDiffusionPipeline.from_pretrained(family["A"])
    reference.load_textual_inversion(embedding)
    for pipe in (a, b):
        assert (image_of(pipe, "a <cat-toy>") == image_of(reference, "a <cat-toy>")).all()


def test_private_load_builds_everything_anew(family_store):
    a = load(family_store, private=True)
    assert not warm._TEMPLATES and not warm._PARTS
    b = load(family_store)
    c = load(family_store, private=True)
    assert c.tokenizer is not b.tokenizer and shared_mutables(b.unet, c.unet) == []
    same_state(a.unet, c.unet)


def test_resident_switch_binds_the_resident_tensors_and_uploads_nothing(family_store):
    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    a = load(family_store, "A", pool=pool)
    want = image(a)
    b = load(family_store, "B", pool=pool)
    del a
    gc.collect()
    a = load(family_store, "A", pool=pool)
    report = compstore.last_transfer()
    assert report is pool.last_report and report.bytes_uploaded == 0 and report.bytes_reused > 0
    # Every tensor is reused, CLIP's computed position_ids too (kept by its bytes' address).
    tensors = {slot: dict(getattr(a, slot).named_parameters()) | dict(getattr(a, slot).named_buffers())
               for slot in MODELS}
    assert all(name in getattr(getattr(a, slot), STORE_KEYS) for slot in MODELS for name in tensors[slot])
    assert report.bytes_reused == sum(t.numel() * t.element_size() for ts in tensors.values() for t in ts.values())
    for slot in MODELS:
        module = getattr(a, slot)
        used, records, shared = pool.keys_used_by(module), getattr(module, STORE_KEYS), []
        for name, t in tensors[slot].items():
            key = (*records[name][:2], str(t.dtype), "cpu")
            assert key in used and pool._resident[key].users >= 1, name  # live: never evicted
            resident = pool._resident[key].tensor
            assert torch.equal(t.flatten(), resident.flatten())
            if t.data_ptr() == resident.data_ptr():
                shared.append(key)
        # one tensor per key is the pool's; others of the same bytes in the model are copies
        assert sorted(shared) == sorted(used)
    assert (image(a) == want).all()
    assert b.vae is not a.vae and b.vae.decoder.conv_out.weight.data_ptr() == a.vae.decoder.conv_out.weight.data_ptr()


def test_a_clone_onto_an_empty_pool_uploads_each_store_byte_once(family_store):
    """A template clone is born on the pool's device: what the pool lacks is read from
    the store and uploaded in the load, and the pipeline's own move moves nothing."""
    first = ResidencyPool("cpu", budget_bytes=1 << 40)
    want = image(load(family_store, "A", pool=first))
    copier = CountingCopier()
    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    a = load(family_store, "A", pool=pool)
    report = pool.last_report
    assert warm._TEMPLATES and report.bytes_from_pinned == 0
    assert report.bytes_from_store == copier.bytes  # reused: identical bytes within a model
    assert report.bytes_from_store + report.bytes_reused == sum(
        t.numel() * t.element_size() for slot in MODELS for t in tensors(getattr(a, slot)))
    for slot in MODELS:
        assert {t.device.type for t in tensors(getattr(a, slot))} == {"meta"}
    again = compstore.to_device(a, "meta", pool=pool)
    assert again.bytes_uploaded == 0 and copier.bytes == report.bytes_from_store
    assert (image(load(family_store, "A", pool=first)) == want).all()  # the template is intact


def test_pinned_tier_feeds_a_clone(family_store):
    pool = ResidencyPool("cpu", budget_bytes=0, pinned_budget_bytes=1 << 40)
    b = load(family_store, "B", pool=pool)
    want = image(b)
    del b
    gc.collect()
    a = load(family_store, "A", pool=pool)  # B's UNet goes idle -> evicted to the pinned tier
    b = load(family_store, "B", pool=pool)
    report = pool.last_report
    unet = next(c for c in report.components if c.component == "unet")
    assert unet.bytes_from_pinned > 0 and unet.bytes_from_store == 0
    assert (image(b) == want).all()
    del a


def test_tied_weights_and_fp32_modules_survive_cloning(store, tmp_path):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                            num_heads=4)).save_pretrained(tmp_path / "t5")
    first = compstore.load_component(str(tmp_path / "t5"), store=store, dtype=torch.float16)
    second = compstore.load_component(str(tmp_path / "t5"), store=store, dtype=torch.float16)
    assert shared_mutables(first, second) == []
    assert second.shared.weight is second.encoder.embed_tokens.weight
    assert second.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    same_state(first, second)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(first(ids).last_hidden_state, second(ids).last_hidden_state)


@pytest.mark.parametrize("make", [
    lambda: diffusers.UNet2DConditionModel(**synthetic.TINY_SDXL_UNET),
    lambda: diffusers.FluxTransformer2DModel(**synthetic.TINY_FLUX),
    lambda: diffusers.AutoencoderKL(**synthetic.TINY_VAE),
], ids=["sdxl-unet", "flux-transformer", "vae"])
def test_clone_module_copies_every_mutable_attribute(make):
    torch.manual_seed(0)
    model = make().eval()
    clone = warm.clone_module(model, lambda _, t: t.detach().clone())
    assert shared_mutables(model, clone) == []
    same_state(model, clone)
    assert repr(model) == repr(clone)


def test_clone_module_keeps_each_parameters_requires_grad_and_buffers_plain():
    """A clone's parameters are Parameters with the original's `requires_grad` (a
    frozen one, as diffusers' GaussianFourierProjection freezes its weight, stays
    frozen); its buffers stay plain tensors."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    model[0].bias.requires_grad_(False)
    clone = warm.clone_module(model, lambda _, t: t.detach().clone())
    assert [(type(p), p.requires_grad) for p in clone.parameters()] == [
        (torch.nn.Parameter, True), (torch.nn.Parameter, False), (torch.nn.Parameter, True),
        (torch.nn.Parameter, True)]
    assert {type(b) for b in clone.buffers()} == {torch.Tensor}


def test_a_newly_initialised_parameter_gets_no_template(family, store, tmp_path, caplog):
    from test_loader_semantics import edit_safetensors

    folder = tmp_path / "vae"
    shutil.copytree(family["A"] / "vae", folder)
    edit_safetensors(folder / "diffusion_pytorch_model.safetensors", drop="decoder.conv_out.bias")
    with caplog.at_level(logging.WARNING, logger="compstore"):
        compstore.load_component(str(folder), store=store)
    assert not warm._TEMPLATES  # each load initialises it anew, as diffusers does


def test_device_map_and_pool_that_disagree_are_refused(family_store):
    before = store_state(family_store.home)
    with pytest.raises(CompstoreError, match="disagree"):
        load(family_store, pool=ResidencyPool("cpu"), device_map="meta")
    with pytest.raises(CompstoreError, match="not supported"):
        load(family_store, device_map="balanced")
    with pytest.raises(CompstoreError, match="device_map='gpu' is not a device"):
        load(family_store, device_map="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(CompstoreError, match="device_map='cuda' is not a device this torch can use"):
            load(family_store, device_map="cuda")
    if torch.cuda.device_count() <= 7:
        with pytest.raises(CompstoreError, match="device_map='cuda:7' is not a device this torch can use"):
            load(family_store, device_map="cuda:7")
    assert store_state(family_store.home) == before


def test_moving_a_pooled_pipeline_elsewhere_releases_its_tensors(family_store):
    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    a = load(family_store, pool=pool)
    assert pool.idle_bytes == 0
    a.to("meta")
    assert pool.idle_bytes == pool.resident_bytes > 0


def unet_bytes(pipe) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(pipe.unet))


def test_a_component_moved_elsewhere_releases_its_tensors_and_an_offloaded_one_frees_them(family_store):
    pool = ResidencyPool("cpu", budget_bytes=1 << 40)
    a = load(family_store, pool=pool)
    before = pool.resident_bytes
    a.unet.to("meta")  # the others stay
    assert 0 < pool.idle_bytes <= unet_bytes(a) and pool.resident_bytes == before
    b = load(family_store, "B", pool=pool)
    idle, grown = pool.idle_bytes, pool.resident_bytes
    b.unet._hf_hook = object()  # what accelerate's model offload attaches
    b.unet.to("meta")  # its offload: the memory is given back at once, not kept idle
    assert pool.idle_bytes <= idle and pool.resident_bytes < grown


def test_to_device_marks_what_it_moved_so_that_a_later_move_releases_it(family_store):
    from compstore.loader.residency import POOL

    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    a = load(family_store)  # on the CPU, no pool
    compstore.to_device(a, "meta", pool=pool)
    assert getattr(a, POOL) is pool and all(getattr(getattr(a, s), POOL) is pool for s in MODELS)
    compstore.to_device(a.unet, "meta", pool=pool)
    assert getattr(a.unet, POOL) is pool


def test_loads_pause_the_garbage_collector_and_restore_it(family_store, monkeypatch):
    from compstore.loader import component
    from compstore.loader.loading import gc_paused

    seen = []
    prepare = component.prepare_model
    monkeypatch.setattr("compstore.loader.pipeline.prepare_model",
                        lambda *a, **k: (seen.append(gc.isenabled()), prepare(*a, **k))[1])
    load(family_store)
    assert seen and not any(seen)  # paused while models are built
    assert gc.isenabled()
    with pytest.raises(compstore.RefNotFoundError):  # a failed load restores it too
        load(family_store, "no-such-ref")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a caller's own pause is left as it was
    finally:
        gc.enable()


class _Marker:
    """A collector-tracked object whose generation a test looks up."""


def _generation_of(obj) -> int | None:
    return next((g for g in range(3) if any(o is obj for o in gc.get_objects(generation=g))), None)


def test_what_a_load_made_joins_the_oldest_generation_and_cycles_still_go():
    """A load's objects (the pipeline, long-lived) skip the young collections, whose
    first one would examine all of them; a failed block is left young; cyclic
    garbage made in the block is still collected."""
    import weakref

    from compstore.loader.loading import gc_paused

    with gc_paused():
        kept = _Marker()
        cycle = _Marker()
        cycle.me = cycle
        gone = weakref.ref(cycle)
        del cycle
    assert gc.isenabled() and _generation_of(kept) == 2
    gc.collect()
    assert gone() is None
    with pytest.raises(ValueError), gc_paused():
        failed = _Marker()
        raise ValueError
    assert gc.isenabled() and _generation_of(failed) == 0


def test_the_few_objects_python_freezes_itself_do_not_stop_the_aging(monkeypatch):
    """CPython 3.12 starts with a few hundred of its own tuples frozen: a load's
    objects still join the oldest generation there."""
    from compstore.loader import loading

    frozen = gc.get_freeze_count
    monkeypatch.setattr(gc, "get_freeze_count", lambda: frozen() + 375)  # as a 3.12 process starts
    with loading.gc_paused():
        kept = _Marker()
    assert _generation_of(kept) == 2


def test_a_load_leaves_the_callers_frozen_objects_frozen():
    """`gc.freeze()` before forking workers keeps the parent's objects out of every
    collection: aging a load's objects must not unfreeze them."""
    from compstore.loader.loading import gc_paused

    before = _Marker()
    gc.freeze()
    try:
        with gc_paused():
            made = _Marker()
        # Still frozen, not thawed into generation 2. (Not checked by the freeze count:
        # reference counting frees frozen objects too, in the full suite other threads'.)
        assert _generation_of(before) is None
        assert _generation_of(made) == 0  # not aged: that would have taken a thaw
    finally:
        gc.unfreeze()


def count_builds(monkeypatch) -> list:
    """Models built from their constructors from now on (a template clone is not)."""
    from compstore.loader import component

    calls = []
    instantiate = component._instantiate

    def counting(make, *args):
        calls.append(make)
        return instantiate(make, *args)

    monkeypatch.setattr(component, "_instantiate", counting)
    return calls


def test_a_fine_tune_of_a_loaded_architecture_is_cloned_not_rebuilt(family_store, monkeypatch):
    reference = load(family_store, "B", private=True)  # built anew: what the load must give
    a = load(family_store, "A")
    builds = count_builds(monkeypatch)
    b = load(family_store, "B")  # never loaded, but its UNet has A's architecture
    assert builds == []
    assert shared_mutables(a.unet, b.unet) == [] and config(b.unet) == config(reference.unet)
    same_state(reference.unet, b.unet)
    assert getattr(b.unet, STORE_KEYS) != getattr(a.unet, STORE_KEYS)  # B's own blobs
    assert b.unet.config._name_or_path == "B/unet"
    assert (a.text_encoder.config.name_or_path, b.text_encoder.config.name_or_path) == (
        "A/text_encoder", "B/text_encoder")  # one template, each clone its own config
    assert (image(b) == image(reference)).all()
    assert (image(a) == image(load(family_store, "A", private=True))).all()
    # B's component now has its own template entry: a third load finds it directly.
    assert sum(type(t.module) is diffusers.UNet2DConditionModel for t in warm._TEMPLATES.values()) == 2


def test_a_different_config_is_built_anew_even_with_the_same_tensors(family_store, pipeline_copy, monkeypatch):
    folder = pipeline_copy("B")
    cfg = folder / "unet" / "config.json"
    cfg.write_text(cfg.read_text().replace('"sample_size": 32', '"sample_size": 48'))
    family_store.ingest(folder, "B48")
    load(family_store, "A")
    builds = count_builds(monkeypatch)
    b48 = load(family_store, "B48")
    assert len(builds) == 1  # the UNet; the VAE and text encoder are A's
    assert b48.unet.config.sample_size == 48  # not the config of A's template


def test_a_template_is_not_lent_where_tied_names_hold_different_bytes(tmp_path):
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=8, num_layers=1,
                                    num_heads=2)).eval()
    names = {name for name, *_ in compstore.loader.residency.named_tensors(model)}
    blobs = {name: (f"h-{name}", 1) for name in names}
    blobs["encoder.embed_tokens.weight"] = blobs["shared.weight"]  # tied: one tensor
    assert warm.adopt(("t5", "T5", "None"), model, blobs, "arch")
    same = warm.sibling(("t5-b", "T5", "None"), "arch", {n: (b[0] + "-b", 1) for n, b in blobs.items()})
    assert same is not None and same.plan is warm.template(("t5", "T5", "None")).plan
    differ = dict(blobs, **{"encoder.embed_tokens.weight": ("other", 1)})
    assert warm.sibling(("t5-c", "T5", "None"), "arch", differ) is None
    assert warm.sibling(("t5-d", "T5", "None"), "another arch", blobs) is None
