"""compstore.DiffusionPipeline.from_pretrained is equivalent to diffusers' on the same folders."""

import diffusers
import numpy as np
import pytest
import torch

import compstore
from compstore import CompstoreError, RefNotFoundError


def config_of(module) -> dict:
    c = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    c.pop("_name_or_path", None)
    return c


def assert_same_pipeline(ours, theirs, slots=("unet", "vae", "text_encoder")):
    assert type(ours) is type(theirs)
    for slot in slots:
        a, b = getattr(ours, slot), getattr(theirs, slot)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), slot
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, (slot, k)
            assert torch.equal(sa[k], sb[k]), (slot, k)
        assert config_of(a) == config_of(b), slot
        assert a.training is b.training is False
    assert type(ours.scheduler) is type(theirs.scheduler)
    assert dict(ours.scheduler.config) == dict(theirs.scheduler.config)
    assert ours.tokenizer("a cat").input_ids == theirs.tokenizer("a cat").input_ids


def image(pipe, prompt: str = "a cat") -> np.ndarray:
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np", height=32, width=32).images


CASES = {
    "fp32": ("A", {}),
    "dtype=fp16": ("A", {"dtype": torch.float16}),
    "torch_dtype=fp16": ("A", {"torch_dtype": torch.float16}),
    "variant=fp16": ("D", {"variant": "fp16"}),
    "variant=fp16,dtype=fp32": ("D", {"variant": "fp16", "dtype": torch.float32}),
    "sharded": ("C", {}),
    "per-slot dtype": ("A", {"dtype": {"unet": torch.float16, "default": torch.float32}}),
    # a slot the dict leaves out loads as float32, though D's text encoder config says float16
    "per-slot dtype, no default": ("D", {"dtype": {"vae": torch.float16}}),
    # "auto": not a torch.dtype, so float32 for the pipeline (with diffusers' warning) ...
    "dtype=auto": ("D", {"dtype": "auto"}),
    # ... but per slot each library decides: transformers' "auto" is the config's float16
    "per-slot auto": ("D", {"dtype": {"text_encoder": "auto", "unet": torch.float16}}),
    "default auto": ("D", {"torch_dtype": {"default": "auto"}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_weights_config_and_image_as_diffusers(case, family_store, family):
    name, kwargs = CASES[case]
    ours = compstore.DiffusionPipeline.from_pretrained(name, store=family_store, **kwargs)
    theirs = diffusers.DiffusionPipeline.from_pretrained(family[name], **kwargs)
    assert_same_pipeline(ours, theirs)
    assert ours.config._name_or_path == name
    dtypes = {ours.unet.dtype, ours.text_encoder.dtype, ours.vae.dtype}
    if dtypes == {torch.float32}:  # mixed-dtype pipelines fail in diffusers as well
        np.testing.assert_array_equal(image(ours), image(theirs))


def test_fp16_pipeline_runs_the_same_on_cpu(family_store, family):
    ours = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, dtype=torch.float16)
    theirs = diffusers.DiffusionPipeline.from_pretrained(family["A"], dtype=torch.float16)
    np.testing.assert_array_equal(image(ours), image(theirs))


def test_component_passed_as_kwarg_and_none_to_skip(family_store, family):
    vae_b = compstore.load_component("B", "vae", store=family_store)
    unet_b = compstore.load_component("B", "unet", store=family_store)
    ours = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, unet=unet_b, vae=vae_b)
    assert ours.unet is unet_b and ours.vae is vae_b
    theirs = diffusers.DiffusionPipeline.from_pretrained(family["B"])
    assert_same_pipeline(ours, theirs, slots=("unet", "vae", "text_encoder"))
    np.testing.assert_array_equal(image(ours), image(theirs))
    no_vae = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, vae=None)
    assert no_vae.vae is None


def mapped_pack_ranges(store) -> list[tuple[int, int]]:
    """Address ranges where this process maps the store's pack files (/proc/self/maps)."""
    packs_dir = str(store.home / "objects" / "packs")
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith(packs_dir):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.parametrize("private", [False, True])
def test_weights_are_zero_copy_views_of_the_store_and_never_alias(family_store, private):
    """Each blob a load binds is a view of the store's pack once; another tensor of
    the same bytes (the tiny family's norm weights of ones, in the UNet and the VAE
    alike) is a copy. No two weights share memory, as in diffusers: an in-place edit
    of one never changes another (until 2026-12-07 it did, private=True too)."""
    from compstore.loader.residency import STORE_KEYS

    pipe = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, private=private)
    ranges = mapped_pack_ranges(family_store)
    params = [(getattr(m, STORE_KEYS)[name][:2], p) for m in (pipe.unet, pipe.vae, pipe.text_encoder)
              for name, p in m.named_parameters()]
    viewed: dict[tuple, int] = {}
    for blob, p in params:
        viewed[blob] = viewed.get(blob, 0) + any(lo <= p.data_ptr() < hi for lo, hi in ranges)
    assert len(viewed) < len(params)  # some blobs are bound more than once
    assert set(viewed.values()) == {1}  # ... and each is viewed in place exactly once
    assert len({p.data_ptr() for _, p in params}) == len(params)
    unet_norm = pipe.unet.down_blocks[0].resnets[0].norm1.weight
    vae_norm = pipe.vae.decoder.up_blocks[1].resnets[1].norm1.weight
    assert torch.equal(unet_norm, vae_norm)
    with torch.no_grad():
        vae_norm.mul_(2.0)
    assert torch.equal(unet_norm, torch.ones_like(unet_norm))


def test_in_place_edits_never_reach_the_store(family_store):
    pipe = compstore.DiffusionPipeline.from_pretrained("A", store=family_store)
    w = pipe.unet.conv_in.weight
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)  # like fuse_lora: an in-place change of a loaded weight
    assert family_store.verify().ok
    again = compstore.load_component("A", "unet", store=family_store)
    assert torch.equal(again.conv_in.weight, before)
    assert torch.equal(pipe.unet.conv_in.weight, before + 1.0)


def test_load_component_matches_diffusers_and_transformers(family_store, family):
    from transformers import CLIPTextModel

    unet = compstore.load_component("C", "unet", store=family_store, dtype=torch.float16)
    ref = diffusers.UNet2DConditionModel.from_pretrained(family["C"] / "unet", torch_dtype=torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), ref.state_dict().values()))
    te = compstore.load_component("D", "text_encoder", store=family_store, variant="fp16")
    ref_te = CLIPTextModel.from_pretrained(family["D"] / "text_encoder", variant="fp16")
    assert te.dtype == ref_te.dtype == torch.float16
    assert all(torch.equal(a, b) for a, b in zip(te.state_dict().values(), ref_te.state_dict().values()))


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_sd15_layout_with_a_safety_checker_loads_as_diffusers(store, tmp_path, caplog, dtype):
    """SD 1.5's model_index names its safety checker by a diffusers pipeline module,
    ["stable_diffusion", "StableDiffusionSafetyChecker"]: it is built from the store
    too (it was left to diffusers, which found no weights in the skeleton), and
    diffusers' "cannot verify" warning, with the module printed whole, is not shown."""
    import logging

    from compstore.loader.synthetic import tiny_sd15_layout

    folder = tmp_path / "sd15"
    tiny_sd15_layout(seed=0).save_pretrained(folder)
    theirs = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=dtype)
    with caplog.at_level(logging.WARNING):
        ours = compstore.DiffusionPipeline.from_pretrained(str(folder), store=store, dtype=dtype)
    assert "non-standard module" not in caplog.text
    assert_same_pipeline(ours, theirs, slots=("unet", "vae", "text_encoder", "safety_checker"))
    assert type(ours.feature_extractor) is type(theirs.feature_extractor)
    assert ours.feature_extractor.to_dict() == theirs.feature_extractor.to_dict()
    assert np.array_equal(image(ours), image(theirs))


def test_single_component_ref_and_local_folder(store, family):
    vae = compstore.load_component(str(family["A"] / "vae"), store=store)
    assert type(vae).__name__ == "AutoencoderKL"
    pipe = compstore.DiffusionPipeline.from_pretrained(str(family["B"]), store=store)
    assert pipe.config._name_or_path == str(family["B"])
    assert str(family["B"]) in {r["name"] for r in store.ls()}


def test_unknown_names_give_clear_errors(store, tmp_path):
    from conftest import store_state

    before = store_state(store.home)
    with pytest.raises(RefNotFoundError, match="no ref named 'nope'"):
        compstore.DiffusionPipeline.from_pretrained("nope", store=store)
    with pytest.raises(RefNotFoundError, match="no ref named 'org/model'"):  # offline in tests
        compstore.DiffusionPipeline.from_pretrained("org/model", store=store)
    # A mistyped folder is named as one (until 2026-12-07: "no ref named './my-pipe'").
    for path in ("./my-pipe", str(tmp_path / "not-here"), "~/not-here", "models/sd/base"):
        with pytest.raises(RefNotFoundError, match=f"no folder '{path}', and no ref of that name in store"):
            compstore.DiffusionPipeline.from_pretrained(path, store=store)
    with pytest.raises(RefNotFoundError, match="no folder './my-vae'"):
        compstore.load_component("./my-vae", store=store)
    assert store_state(store.home) == before


def test_unsupported_device_map_is_a_clear_error(family_store):
    with pytest.raises(CompstoreError, match="device_map='balanced' is not supported yet"):
        compstore.DiffusionPipeline.from_pretrained("A", store=family_store, device_map="balanced")


def test_a_model_folder_with_config_but_no_weights_is_refused_as_diffusers_refuses_it(store, family, tmp_path):
    """It loaded a randomly initialised UNet, with a warning, where diffusers raises."""
    import shutil

    folder = tmp_path / "no-weights"
    shutil.copytree(family["A"], folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError):
        diffusers.DiffusionPipeline.from_pretrained(folder)
    from conftest import store_state

    before = store_state(store.home)
    with pytest.raises(compstore.WeightsNotFoundError, match="config.json but no weights for UNet2DConditionModel"):
        compstore.DiffusionPipeline.from_pretrained(folder, store=store)
    with pytest.raises(OSError):  # as diffusers' own error is
        compstore.load_component(str(folder), "unet", store=store)
    assert store_state(store.home) == before  # refused before the folder is ingested
    assert type(compstore.load_component(str(folder), "vae", store=store)).__name__ == "AutoencoderKL"


def test_low_cpu_mem_usage_false_with_a_device_map_is_refused_as_diffusers_refuses_it(store, family):
    from conftest import store_state

    kwargs = {"device_map": "cpu", "low_cpu_mem_usage": False}
    with pytest.raises(ValueError) as theirs:
        diffusers.DiffusionPipeline.from_pretrained(family["A"], **kwargs)
    before = store_state(store.home)
    with pytest.raises(ValueError) as ours:  # a folder: refused before it is ingested
        compstore.DiffusionPipeline.from_pretrained(family["A"], store=store, **kwargs)
    assert str(ours.value) == str(theirs.value)
    assert store_state(store.home) == before


def test_load_component_with_dtype_auto_is_as_its_library_decides(family_store):
    """transformers: the config's dtype (D's text encoder says float16); diffusers: not a
    torch.dtype, so float32."""
    assert compstore.load_component("D", "text_encoder", store=family_store, dtype="auto").dtype == torch.float16
    assert compstore.load_component("D", "unet", store=family_store, dtype="auto").dtype == torch.float32


@pytest.mark.parametrize("kwargs", [{"dtype": "float17"}, {"torch_dtype": "Auto"}, {"dtype": 16},
                                    {"dtype": {"unet": "torch.half-ish"}}])
def test_a_dtype_that_names_no_torch_dtype_is_a_clear_error_before_any_ingest(store, family, kwargs):
    """Plain diffusers ignores such a value and loads float32; compstore says so
    before the folder is ingested on the way."""
    bad = next(iter(kwargs.values()))
    bad = bad["unet"] if isinstance(bad, dict) else bad
    for load in (lambda: compstore.DiffusionPipeline.from_pretrained(str(family["A"]), store=store, **kwargs),
                 lambda: compstore.load_component(str(family["A"] / "unet"), store=store, **kwargs)):
        with pytest.raises(CompstoreError, match=rf"^dtype={bad!r} is not a torch dtype: pass one such as"):
            load()
    assert store.ls() == []


def test_a_dtype_may_be_given_by_name(family_store):
    pipe = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, dtype="float16")
    assert pipe.unet.dtype == torch.float16
    pipe = compstore.DiffusionPipeline.from_pretrained(
        "A", store=family_store, torch_dtype={"unet": "torch.bfloat16", "default": "float16"})
    assert (pipe.unet.dtype, pipe.vae.dtype) == (torch.bfloat16, torch.float16)
    assert compstore.load_component("A", "vae", store=family_store, dtype="bfloat16").dtype == torch.bfloat16


def test_use_safetensors_false_and_missing_slot(family_store):
    from conftest import store_state

    before = store_state(family_store.home)
    with pytest.raises(CompstoreError, match="pickle checkpoints are never loaded"):
        compstore.DiffusionPipeline.from_pretrained("A", store=family_store, use_safetensors=False)
    with pytest.raises(compstore.ComponentNotFoundError, match="no component in slot 'transformer'"):
        compstore.load_component("A", "transformer", store=family_store)
    assert store_state(family_store.home) == before


def test_load_component_takes_diffusers_arguments(family_store):
    """`subfolder` as diffusers names the slot; arguments about fetching files are
    accepted and ignored; `use_safetensors=False` and unknown ones are refused,
    before anything is ingested."""
    from conftest import store_state

    sub = compstore.load_component("A", subfolder="vae", store=family_store, cache_dir="/nowhere",
                                   low_cpu_mem_usage=True, force_download=True)
    slot = compstore.load_component("A", "vae", store=family_store)
    assert all(torch.equal(a, b) for a, b in zip(sub.state_dict().values(), slot.state_dict().values()))
    before = store_state(family_store.home)
    with pytest.raises(CompstoreError, match="slot='unet' and subfolder='vae' disagree"):
        compstore.load_component("A", "unet", subfolder="vae", store=family_store)
    with pytest.raises(CompstoreError, match="pickle checkpoints are never loaded"):
        compstore.load_component("A", "vae", store=family_store, use_safetensors=False)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['output_loading_info'\]"):
        compstore.load_component("A", "vae", store=family_store, output_loading_info=True)
    assert store_state(family_store.home) == before


def test_load_component_onto_a_device_goes_through_its_pool(family_store):
    from compstore import ResidencyPool
    from test_residency import CountingCopier

    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    vae = compstore.load_component("A", "vae", store=family_store, pool=pool)
    assert {p.device.type for p in vae.parameters()} == {"meta"}
    first = compstore.last_transfer()
    assert first.bytes_uploaded > 0
    compstore.load_component("B", "vae", store=family_store, pool=pool)  # B's VAE is A's
    again = compstore.last_transfer()
    assert again.bytes_uploaded == 0 and again.bytes_reused == first.bytes_uploaded + first.bytes_reused


DTYPES = [None, torch.float16, torch.bfloat16, torch.float32, "auto", {"unet": torch.float16},
          {"default": torch.bfloat16}, {"text_encoder": torch.float16, "default": torch.float32},
          {"text_encoder": "auto"}, {"default": "auto"}, {"unet": "auto", "default": torch.float16}]


@pytest.mark.parametrize("seed", range(3))
def test_random_load_arguments_give_what_diffusers_gives(family_store, family, seed):
    """Random combinations of member, dtype (plain, per slot, "auto"), variant,
    use_safetensors, low_cpu_mem_usage, device_map and skipped slots: compstore and
    diffusers both refuse, or both load the same pipeline. (Dtype *names*, which
    compstore takes and diffusers ignores, are left out: README.)"""
    import random

    rng = random.Random(seed)
    for draw in range(8):
        name, kwargs = rng.choice("ABCD"), {}
        if (dtype := rng.choice(DTYPES)) is not None:
            kwargs[rng.choice(["dtype", "torch_dtype"])] = dtype
        if rng.random() < 0.4:
            kwargs["variant"] = rng.choice(["fp16", "bf16"])
        if rng.random() < 0.3:
            kwargs["use_safetensors"] = rng.choice([True, None])
        if rng.random() < 0.3:
            kwargs["low_cpu_mem_usage"] = rng.choice([True, False])
        if rng.random() < 0.3:
            kwargs["device_map"] = "cpu"
        if rng.random() < 0.3:
            kwargs[rng.choice(["text_encoder", "safety_checker", "feature_extractor"])] = None
        label = f"seed {seed} draw {draw}: {name} {kwargs}"
        outcomes = []
        for load in (lambda: compstore.DiffusionPipeline.from_pretrained(name, store=family_store, **kwargs),
                     lambda: diffusers.DiffusionPipeline.from_pretrained(family[name], **kwargs)):
            try:
                outcomes.append(load())
            except Exception as e:  # noqa: BLE001 (the outcome is compared, not the error)
                outcomes.append(e)
        ours, theirs = outcomes
        assert isinstance(ours, Exception) == isinstance(theirs, Exception), (label, ours, theirs)
        if not isinstance(ours, Exception):
            slots = tuple(s for s in ("unet", "vae", "text_encoder") if getattr(theirs, s, None) is not None)
            assert all(getattr(ours, s, None) is None for s in {"unet", "vae", "text_encoder"} - set(slots))
            assert_same_pipeline(ours, theirs, slots=slots)
