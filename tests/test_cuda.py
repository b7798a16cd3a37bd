"""The CUDA path of the residency pool: run wherever a GPU is present, skipped elsewhere.

    pytest tests/test_cuda.py      # on a GPU machine
"""

import gc

import numpy as np
import pytest
import torch

import compstore
from compstore import ResidencyPool, to_device
from test_quantized_files import flux_bfl, flux_gguf  # noqa: F401  (fixtures: tiny Flux GGUF, BFL files)
from test_modular import repos  # noqa: F401  (a fixture: tiny modular SDXL repos)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_staged_uploader_copies_every_byte_to_the_gpu():
    from compstore.loader.upload import Uploader

    torch.manual_seed(0)
    srcs = [torch.randn(3_000_001), torch.randn(7, 3).half(), torch.empty(0), torch.tensor(2.0),
            torch.rand(4096) > 0.5, torch.randn(1000).pin_memory()]
    up = Uploader("cuda", readers=3, staging_bytes=1 << 20)  # many turns of the ring
    outs = up.upload(srcs)
    up.close()
    for s, o in zip(srcs, outs):
        assert o.device.type == "cuda" and o.dtype == s.dtype and torch.equal(o.cpu(), s)


def test_switches_on_the_gpu_move_only_the_delta_and_images_match_diffusers(family_store, family):
    import diffusers
    from test_loader import image

    pool = ResidencyPool("cuda", budget_bytes=1 << 34, pinned_budget_bytes=1 << 30)
    load = lambda n: compstore.DiffusionPipeline.from_pretrained(n, store=family_store)  # noqa: E731
    a = load("A")
    to_device(a, "cuda", pool=pool)
    b = load("B")
    second = to_device(b, "cuda", pool=pool)
    assert second.bytes_uploaded == family_store.diff("A", "B").delta_bytes
    del a
    gc.collect()
    a2 = load("A")
    third = to_device(a2, "cuda", pool=pool)
    assert third.bytes_uploaded == 0  # CLIP's computed position_ids too: kept by its bytes' address
    for name, pipe in (("B", b), ("A", a2)):
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(family[name]).to("cuda")
        np.testing.assert_array_equal(image(pipe), image(theirs))


def test_loads_under_inference_mode_on_the_gpu(family_store, family):
    """A service's request handler under `torch.inference_mode()`: loads onto the GPU
    through a pool with a pinned tier (the uploader's threads write the tensors the
    load allocates), A -> B -> A, and the images diffusers makes there."""
    import diffusers
    from test_loader import image

    pool = ResidencyPool("cuda", budget_bytes=0, pinned_budget_bytes=1 << 30)  # evicted: via the tier
    load = lambda n: compstore.DiffusionPipeline.from_pretrained(n, store=family_store, device_map="cuda",  # noqa: E731
                                                                 pool=pool)
    with torch.inference_mode():
        a = load("A")
        del a
        gc.collect()
        b = load("B")
        a = load("A")
        assert pool.last_report.bytes_from_pinned > 0 and not any(t.is_inference() for t in a.unet.parameters())
        for name, pipe in (("B", b), ("A", a)):
            theirs = diffusers.StableDiffusionPipeline.from_pretrained(family[name]).to("cuda")
            np.testing.assert_array_equal(image(pipe), image(theirs))


def test_pinned_tier_on_the_gpu(family_store):
    budget = 1 << 30
    pool = ResidencyPool("cuda", budget_bytes=0, pinned_budget_bytes=budget)
    load = lambda n: compstore.DiffusionPipeline.from_pretrained(n, store=family_store)  # noqa: E731
    to_device(load("B"), "cuda", pool=pool)  # its staging buffers are pinned by now
    gc.collect()
    torch.cuda.synchronize()
    torch.empty(1, pin_memory=True)  # an allocation settles the pinned blocks freed before
    pinned_before = torch.cuda.host_memory_stats()["active_bytes.current"]
    a = load("A")
    to_device(a, "cuda", pool=pool)  # evicts B's UNet into the tier
    assert 0 < pool.pinned_bytes <= budget
    assert all(t.is_pinned() for t in pool._tier.tensors())
    # What the tier pins is its slabs, no more (one pinned allocation per tensor would
    # be rounded up to a power of two each, over the tensors' bytes).
    assert 0 < torch.cuda.host_memory_stats()["active_bytes.current"] - pinned_before <= pool.pinned_bytes
    again = to_device(load("B"), "cuda", pool=pool)
    assert again.bytes_from_pinned > 0


def test_copies_back_still_running_are_waited_for_on_the_device(family_store):
    """An eviction's copies into the pinned tier run on a stream of their own, not
    waited for on the host. Held back here behind a busy stream, the memory they
    read is not handed to the next upload before they have read it, and an upload
    from the tier waits for them: A's UNet comes back equal to the store's."""
    pool = ResidencyPool("cuda", budget_bytes=1 << 40, pinned_budget_bytes=1 << 30)
    load = lambda n: compstore.DiffusionPipeline.from_pretrained(n, store=family_store)  # noqa: E731
    reference = {k: v.clone() for k, v in load("A").unet.state_dict().items()}
    to_device(load("A"), "cuda", pool=pool)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 30)  # the current stream busy for ~0.5 s: the copies back queue behind it
    assert pool.trim() > 0
    to_device(load("B"), "cuda", pool=pool)  # B's UNet from the store, into new device memory
    a = load("A")
    assert to_device(a, "cuda", pool=pool).bytes_from_pinned > 0
    state = a.unet.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in reference.items())


@pytest.mark.parametrize("on_side_stream", [False, True])
def test_a_switch_from_the_pinned_tier_gives_diffusers_images(family_store, family, on_side_stream):
    """B's delta comes back from the pinned tier in copies the load does not wait
    for until its end (`Uploader.upload(wait=False)`); B's image, made right after
    the load, on the default stream or on a stream of the user's, equals plain
    diffusers'."""
    import diffusers
    from compstore.loader import warm
    from test_loader import image

    warm.clear_caches()
    pool = ResidencyPool("cuda", budget_bytes=0, pinned_budget_bytes=1 << 30)
    load = lambda n: compstore.DiffusionPipeline.from_pretrained(n, store=family_store, pool=pool)  # noqa: E731
    b = load("B")
    del b
    gc.collect()
    a = load("A")  # B's UNet tensors go to the pinned tier
    stream = torch.cuda.Stream() if on_side_stream else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        b = load("B")
        assert compstore.last_transfer().bytes_from_pinned == family_store.diff("A", "B").delta_bytes
        mine = image(b)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(family["B"]).to("cuda")
    np.testing.assert_array_equal(mine, image(theirs))
    del a


def test_a_pipeline_staged_on_the_host_moves_to_the_gpu_from_pinned_memory(family_store, family):
    """`pool.stage(b)` copies B's delta into page-locked slabs; `b.to("cuda")` then
    uploads it from there (no store reads) and B's image equals diffusers'."""
    import diffusers
    from test_loader import image

    pool = ResidencyPool("cuda", budget_bytes=1 << 34, pinned_budget_bytes=1 << 30)
    load = lambda n: compstore.DiffusionPipeline.from_pretrained(n, store=family_store)  # noqa: E731
    a = load("A")
    to_device(a, "cuda", pool=pool)
    b = load("B")
    staged = pool.stage(b)
    assert staged == family_store.diff("A", "B").delta_bytes
    assert all(t.is_pinned() for t in pool._tier.tensors())
    report = to_device(b, "cuda", pool=pool)
    assert report.bytes_from_pinned == staged and report.bytes_from_store == 0
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(family["B"]).to("cuda")
    np.testing.assert_array_equal(image(b), image(theirs))
    del a


def test_device_map_cuda_and_pipe_to(family_store):
    pipe = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, device_map="cuda")
    assert pipe.unet.device.type == "cuda"
    assert compstore.last_transfer().bytes_uploaded > 0
    # "cuda" and "cuda:<current>" are one device: moving there again copies nothing,
    # not even the tensors that are not the store's.
    for again in ("cuda", f"cuda:{torch.cuda.current_device()}"):
        pipe.to(again)
        assert compstore.last_transfer().bytes_uploaded == 0, again


def test_device_loads_through_a_pool_clone_resident_components(family_store, family):
    import diffusers
    from compstore.loader import warm
    from test_loader import image

    warm.clear_caches()
    pool = ResidencyPool("cuda", budget_bytes=1 << 34)
    load = lambda n: compstore.DiffusionPipeline.from_pretrained(n, store=family_store, pool=pool)  # noqa: E731
    a = load("A")
    b = load("B")
    assert pool.last_report.bytes_uploaded == family_store.diff("A", "B").delta_bytes
    del a
    gc.collect()
    a2 = load("A")  # every component cloned from its template, on the resident tensors
    assert pool.last_report.bytes_uploaded == 0  # nothing at all: CLIP's position_ids is resident too
    assert all(t.device.type == "cuda" for t in a2.unet.parameters())
    for name, pipe in (("B", b), ("A", a2)):
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(family[name]).to("cuda")
        np.testing.assert_array_equal(image(pipe), image(theirs))


def test_model_cpu_offload_gives_the_device_memory_back_and_images_match(family_store, family):
    import diffusers
    from compstore.loader.residency import STORE_KEYS
    from test_loader import image

    pool = compstore.pool_for("cuda")
    pool.trim()  # earlier tests' idle tensors
    pipe = compstore.DiffusionPipeline.from_pretrained("A", store=family_store)
    unet_blobs = {v[:2] for v in getattr(pipe.unet, STORE_KEYS).values()}
    pipe.enable_model_cpu_offload()
    mine = image(pipe)
    # Each model was uploaded through the pool for its forward and moved back by its
    # offload hook: nothing of it stays on the device, live or idle.
    assert pool.resident_bytes - pool.idle_bytes == 0
    assert not any(key[:2] in unet_blobs for key in pool._resident)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(family["A"])
    theirs.enable_model_cpu_offload()
    np.testing.assert_array_equal(mine, image(theirs))


def test_pipe_to_cpu_after_cuda_releases_the_pool_tensors(family_store):
    pool = compstore.pool_for("cuda")
    pipe = compstore.DiffusionPipeline.from_pretrained("A", store=family_store)  # on the CPU
    pipe.to("cuda")
    assert pool.resident_bytes - pool.idle_bytes > 0
    pipe.to("cpu")
    assert pool.resident_bytes - pool.idle_bytes == 0  # idle, within the budget
    assert pipe.unet.device.type == "cpu"


def test_pipe_to_cpu_and_back_reuses_the_resident_tensors(family_store):
    # The store record of each tensor follows it through moves (and `.to("cpu")`
    # keeps a parameter's version counter), so the way back shares the idle tensors.
    pipe = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, device_map="cuda")
    pipe.to("cpu")
    pipe.to("cuda")
    assert compstore.last_transfer().bytes_uploaded == 77 * 8  # CLIP's position_ids only


def test_a_move_to_a_device_index_goes_through_the_pool(family_store):
    """`pipe.to(0)` and `unet.to(0)`, which torch and diffusers take for the current
    accelerator: until 2026-12-07 an int bypassed the pool and uploaded everything."""
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, device_map="cuda")
    b = compstore.DiffusionPipeline.from_pretrained("B", store=family_store)
    b.to(0)
    assert compstore.last_transfer().bytes_uploaded == family_store.diff("A", "B").delta_bytes
    b.to("cpu")
    b.unet.to(0)  # its tensors are idle in the pool, within the budget
    assert compstore.last_transfer().bytes_uploaded == 0 < compstore.last_transfer().bytes_reused
    assert b.unet.device == a.unet.device == torch.device("cuda", torch.cuda.current_device())
    chained = compstore.DiffusionPipeline.from_pretrained("B", store=family_store).to("cuda")  # diffusers' idiom
    assert chained.unet.device.type == "cuda" and compstore.last_transfer().bytes_uploaded <= 77 * 8  # B is resident


def test_a_pipeline_on_the_gpu_saves_what_the_store_holds(family_store, tmp_path):
    """Within a model on the GPU, weights of the same bytes are copies: `save_pretrained`
    refused pool-shared ones ("Some tensors share memory") until 2026-12-07."""
    compstore.DiffusionPipeline.from_pretrained("A", store=family_store, device_map="cuda")
    b = compstore.DiffusionPipeline.from_pretrained("B", store=family_store, device_map="cuda")
    b.save_pretrained(tmp_path / "B")
    family_store.ingest(tmp_path / "B", "B-saved")
    assert family_store.diff("B", "B-saved").delta_bytes == 0


def test_a_compiled_unets_own_to_shares_the_resident_tensors(family_store):
    """`pipe.unet = torch.compile(pipe.unet); pipe.unet.to("cuda")`, the wrapper's own
    `.to()`: through the pool since 2026-12-07 (it copied the whole UNet past it)."""
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, device_map="cuda")
    b = compstore.DiffusionPipeline.from_pretrained("A", store=family_store)
    b.unet = torch.compile(b.unet)
    assert b.unet.to("cuda") is b.unet
    report = compstore.last_transfer()
    assert report.bytes_uploaded == 0 < report.bytes_reused
    assert b.unet.conv_in.weight.device.type == a.unet.conv_in.weight.device.type == "cuda"


def test_a_state_dict_loaded_on_the_gpu_is_not_seen_by_the_others(family_store, family):
    """`load_state_dict` into one of two pipelines sharing a UNet on the GPU copies into
    copies of its own (since 2026-12-07: into the shared tensors before)."""
    import diffusers
    from test_loader import image

    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, device_map="cuda")
    other = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, device_map="cuda")
    torch.manual_seed(0)
    mine = {k: v + 0.01 * torch.randn_like(v) for k, v in a.unet.state_dict().items()}
    a.unet.load_state_dict(mine)
    conv = {k: v + 1.0 for k, v in a.vae.decoder.conv_out.state_dict().items()}
    a.vae.decoder.conv_out.load_state_dict(conv)  # a submodule's own (since 2026-12-07)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(family["A"]).to("cuda")
    np.testing.assert_array_equal(image(other), image(reference))
    reference.unet.load_state_dict(mine)
    reference.vae.decoder.conv_out.load_state_dict(conv)
    np.testing.assert_array_equal(image(a), image(reference))


def test_load_component_with_device_map_puts_the_model_on_the_gpu(family_store, family):
    import diffusers

    vae = compstore.load_component("B", "vae", store=family_store, device_map="cuda")
    theirs = diffusers.AutoencoderKL.from_pretrained(family["B"] / "vae").to("cuda")
    assert {t.device.type for t in [*vae.parameters(), *vae.buffers()]} == {"cuda"}
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), theirs.state_dict().values()))
    assert compstore.last_transfer().device.startswith("cuda")


def test_a_modular_remix_on_the_gpu_uploads_only_its_delta_and_images_match(repos, store, monkeypatch):
    """The remix re-publishes base's VAE and text encoders: with base on the GPU, the
    remix's `pipe.to("cuda")` reuses them and uploads only the UNet tensors base lacks;
    both pipelines give diffusers' images."""
    from compstore.loader import residency
    from test_modular import MODELS, image, load_theirs

    monkeypatch.setattr(residency, "_POOLS", {})  # a fresh pool, default budgets
    for name in ("base", "remix"):
        store.ingest(repos / name, name)
    pipes, moved = {}, {}
    for name in ("base", "remix"):
        pipes[name] = compstore.ModularPipeline.from_pretrained(name, store=store)
        pipes[name].load_components(torch_dtype=torch.float32)
        pipes[name].to("cuda")
        moved[name] = {c.component: c for c in compstore.last_transfer().components}
        assert set(moved[name]) == set(MODELS)
    assert all(moved["base"][slot].bytes_from_store > 0 for slot in MODELS)
    remix = moved["remix"]
    assert sum(c.bytes_from_store for c in remix.values()) == store.diff("base", "remix").delta_bytes
    for slot in ("vae", "text_encoder", "text_encoder_2"):
        assert remix[slot].bytes_from_store == remix[slot].bytes_from_pinned == 0, slot
        base = moved["base"][slot]
        assert remix[slot].bytes_reused == base.bytes_reused + base.bytes_from_store, slot
    for name, pipe in pipes.items():
        theirs = load_theirs(repos / name)
        theirs.to("cuda")
        np.testing.assert_array_equal(image(pipe), image(theirs))


def test_random_switch_sequences_on_the_gpu_match_diffusers(family_store, family):
    """tests/test_switch_sequences.py's random steps (loads, components passed, drops,
    casts there and back, in-place edits, trims) through a GPU pool with a pinned
    tier, each checked against plain diffusers on the GPU."""
    from test_switch_sequences import run

    run(family_store, family, seed=0, device="cuda")


def test_a_quantized_unet_on_the_gpu_moves_with_its_own_to_and_images_match(family_store, family):
    """torchao int8 UNet (compstore/loader/quantized.py) with `device_map="cuda"`: the pool
    moves it with its own `.to()`, the VAE and text encoder through the pool; the image
    is diffusers' own quantized pipeline's."""
    import diffusers
    from test_loader import image

    pytest.importorskip("torchao")  # carried to the GPU machine by scripts/gpu-wheels.sh
    from torchao.quantization import Int8WeightOnlyConfig

    def config():
        return diffusers.PipelineQuantizationConfig(
            quant_mapping={"unet": diffusers.TorchAoConfig(Int8WeightOnlyConfig())})

    pool = ResidencyPool("cuda", budget_bytes=1 << 34)  # its own: earlier tests left A resident in the default
    ours = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, dtype=torch.bfloat16,
                                                       quantization_config=config(), device_map="cuda", pool=pool)
    moved = {c.component: c for c in pool.last_report.components}
    assert moved["unet"].bytes_from_store > 0 and moved["vae"].bytes_from_store > 0
    assert not pool._uses.get(ours.unet)  # moved by its own .to(), nothing of it pooled
    assert type(ours.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight).__name__ == "Int8Tensor"
    assert {t.device.type for t in ours.unet.state_dict().values()} == {"cuda"}
    theirs = diffusers.DiffusionPipeline.from_pretrained(family["A"], dtype=torch.bfloat16,
                                                         quantization_config=config()).to("cuda")
    np.testing.assert_array_equal(image(ours), image(theirs))


def test_a_bitsandbytes_4_bit_unet_loads_on_the_gpu_as_diffusers_loads_it(family_store, family):
    """diffusers' bitsandbytes quantizer needs a GPU: the UNet in nf4, placed on the GPU
    as it loads (its device map), left there by the pool; the image is diffusers'."""
    import diffusers
    from test_loader import image

    pytest.importorskip("bitsandbytes")  # carried to the GPU machine by scripts/gpu-wheels.sh

    def config():
        return diffusers.PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit", components_to_quantize=["unet"],
            quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                          "bnb_4bit_compute_dtype": torch.float16})

    ours = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, dtype=torch.float16,
                                                       quantization_config=config(), device_map="cuda")
    assert ours.unet.is_loaded_in_4bit
    assert {p.device.type for p in ours.unet.parameters()} == {"cuda"}
    theirs = diffusers.DiffusionPipeline.from_pretrained(family["A"], dtype=torch.float16,
                                                         quantization_config=config()).to("cuda")
    a, b = ours.unet.state_dict(), theirs.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(image(ours), image(theirs))


def test_a_unet_saved_4_bit_with_bitsandbytes_loads_on_the_gpu_as_diffusers_loads_it(family, store, tmp_path):
    """A pipeline folder whose UNet was saved in nf4 (as quantized repos publish it):
    from the store, the same quantized UNet on the GPU and the same image as diffusers'
    load of the folder."""
    import shutil

    import diffusers
    from test_loader import image

    pytest.importorskip("bitsandbytes")
    folder = tmp_path / "A-nf4"
    shutil.copytree(family["A"], folder)
    nf4 = diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.float16)
    unet = diffusers.UNet2DConditionModel.from_pretrained(family["A"], subfolder="unet", quantization_config=nf4,
                                                          dtype=torch.float16)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    ours = compstore.DiffusionPipeline.from_pretrained(str(folder), store=store, dtype=torch.float16,
                                                       device_map="cuda")
    theirs = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.float16).to("cuda")
    assert ours.unet.is_loaded_in_4bit and ours.unet.hf_quantizer.pre_quantized
    assert {p.device.type for p in ours.unet.parameters()} == {"cuda"}
    a, b = ours.unet.state_dict(), theirs.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(image(ours), image(theirs))


def test_a_gguf_transformer_on_the_gpu_moves_with_its_own_to_and_images_match(flux_gguf, tmp_path):
    """A transformer from a GGUF file, in a pipeline moved to the GPU: the pool moves it
    with diffusers' own `.to()` (its bytes and GGUF types kept), and the image is that
    of diffusers' pipeline with diffusers' load of the file, moved there too."""
    import diffusers
    from diffusers import GGUFQuantizationConfig
    from test_quantized_files import image, same_gguf_model, theirs

    folders, path, types = flux_gguf
    store = compstore.Store(tmp_path / "store")
    store.ingest(folders["A"], "A")
    config = GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
    transformer = compstore.FluxTransformer2DModel.from_single_file(path, config="A", quantization_config=config,
                                                                    store=store)
    ours = compstore.FluxPipeline.from_pretrained("A", transformer=transformer, dtype=torch.bfloat16, store=store)
    ours.to("cuda")
    reference = theirs(flux_gguf, torch.bfloat16)
    plain = diffusers.FluxPipeline.from_pretrained(folders["A"], transformer=reference, dtype=torch.bfloat16)
    plain.to("cuda")
    assert {p.device.type for p in ours.transformer.parameters()} == {"cuda"}
    same_gguf_model(ours.transformer, plain.transformer)
    np.testing.assert_array_equal(image(ours), image(plain))


@pytest.mark.parametrize("scheme", ["fp8r", "nvfp4"])
def test_a_bfl_transformer_on_the_gpu_moves_with_its_own_to_and_images_match(flux_bfl, tmp_path, scheme):
    """A transformer from a BFL file (on an H100, fp8r runs `torch._scaled_mm`): the pool
    moves it with diffusers' own `.to()`, weights and scales, and the image is that of
    diffusers' pipeline with diffusers' load of the file, moved there too."""
    import diffusers
    from test_quantized_files import bfl_theirs, image, same_bfl_model

    folders, files = flux_bfl
    store = compstore.Store(tmp_path / "store")
    store.ingest(folders["A"], "A")
    config = diffusers.BFLQuantizationConfig(compute_dtype=torch.bfloat16)
    transformer = compstore.FluxTransformer2DModel.from_single_file(files[scheme], config="A",
                                                                    quantization_config=config, store=store)
    ours = compstore.FluxPipeline.from_pretrained("A", transformer=transformer, dtype=torch.bfloat16, store=store)
    ours.to("cuda")
    reference = bfl_theirs(flux_bfl, scheme, torch.bfloat16)
    plain = diffusers.FluxPipeline.from_pretrained(folders["A"], transformer=reference, dtype=torch.bfloat16)
    plain.to("cuda")
    assert {t.device.type for t in ours.transformer.state_dict().values()} == {"cuda"}
    same_bfl_model(ours.transformer, plain.transformer)
    np.testing.assert_array_equal(image(ours), image(plain))
