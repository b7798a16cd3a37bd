"""Single-file checkpoints: `compstore.<Pipeline>.from_single_file` converts with
diffusers once, stores the converted pipeline deduplicated, and loads it as
diffusers' `from_single_file` loads the file.

The checkpoints are the tiny family's pipelines written in the original (LDM)
layout model sites publish (`synthetic.save_as_single_file`)."""

import json
import shutil

import diffusers
import pytest
import torch
from click.testing import CliRunner

import compstore
from compstore.cli.main import cli
from compstore.loader import synthetic as syn
from conftest import same_state, store_state

MODELS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Single-file checkpoints of family members: A (fp32 and fp16), B (fp32), and A
    with an fp16 UNet beside an fp32 VAE and text encoder."""
    root = tmp_path_factory.mktemp("single-file")
    a, b = syn.tiny_sd_pipeline(seed=0), syn.tiny_sd_pipeline(seed=100)
    b = type(a)(**{**a.components, "unet": b.unet})
    mixed = root / "A-mixed.safetensors"
    syn.save_as_single_file(a, mixed)
    from safetensors.torch import load_file, save_file

    state = load_file(mixed)
    save_file({k: v.half() if k.startswith("model.diffusion_model.") else v for k, v in state.items()},
              mixed, metadata={"format": "pt"})
    return {"A": syn.save_as_single_file(a, root / "A.safetensors"),
            "A16": syn.save_as_single_file(a, root / "A16.safetensors", dtype=torch.float16),
            "B": syn.save_as_single_file(b, root / "B.safetensors"), "A-mixed": mixed}


def assert_same_pipeline(ours, theirs):
    assert type(ours) is type(theirs)
    for slot in MODELS:
        same_state(getattr(ours, slot), getattr(theirs, slot))
    assert dict(ours.scheduler.config) == dict(theirs.scheduler.config)
    assert ours.tokenizer.get_vocab() == theirs.tokenizer.get_vocab()
    assert ours.safety_checker is theirs.safety_checker is None


@pytest.mark.parametrize("name", ["A", "A16", "A-mixed"])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_from_single_file_loads_what_diffusers_converts(family_store, family, checkpoints, name, dtype):
    """Tensors (names, dtypes, bytes), scheduler and tokenizer as diffusers'
    `from_single_file` of the same file gives them, with no dtype (float32, as
    diffusers upcasts) and in fp16; the config from a ref, or from a folder."""
    kw = {} if dtype is None else {"dtype": dtype}
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(checkpoints[name]), config=str(family["A"]), **kw)
    for config in ("A", family["A"]):
        ours = compstore.StableDiffusionPipeline.from_single_file(checkpoints[name], config=config,
                                                                  store=family_store, **kw)
        assert_same_pipeline(ours, theirs)
    assert {p.device.type for p in ours.unet.parameters()} == {"cpu"}


@pytest.mark.parametrize("name,twin", [("B", "B"), ("A16", "D")])
def test_a_converted_checkpoint_is_the_tensors_of_the_repo_it_shares_them_with(family_store, checkpoints,
                                                                                name, twin):
    """B's checkpoint, converted, is B's components: nothing but a provenance file is
    written. A's fp16 checkpoint is stored in fp16 (diffusers would convert it to
    float32), as D's fp16 variant."""
    r = compstore.ingest_single_file(checkpoints[name], "StableDiffusionPipeline", config="A", store=family_store)
    assert r.status == "converted" and r.written_bytes < 1024 and r.ref == str(checkpoints[name])
    mine = {c["slot"]: c["component_id"] for c in family_store.components_of(r.snapshot)}
    variant = "fp16" if twin == "D" else ""
    theirs = {c["slot"]: c["component_id"] for c in family_store.components_of(family_store.resolve(twin))
              if c["variant"] == variant or c["slot"] not in MODELS}
    assert mine == theirs
    made = json.loads(family_store.read_file(r.snapshot, "compstore_single_file.json"))
    assert made == {"checkpoint": f"{name}.safetensors", "sha256": r.sha256, "config": "A",
                    "config_snapshot": family_store.resolve("A"), "pipeline_class": "StableDiffusionPipeline"}


def test_a_mixed_checkpoint_stores_each_model_in_its_own_dtype(family_store, checkpoints):
    r = compstore.ingest_single_file(checkpoints["A-mixed"], "StableDiffusionPipeline", config="A",
                                     store=family_store)
    dtypes = {c["slot"]: {t.dtype for t in family_store.tensor_locations(c["component_id"])}
              for c in family_store.components_of(r.snapshot) if c["slot"] in MODELS}
    assert dtypes == {"unet": {"F16"}, "vae": {"F32"}, "text_encoder": {"F32"}}


def test_a_second_call_converts_nothing_until_the_file_or_config_changes(family_store, family, checkpoints,
                                                                        tmp_path, monkeypatch):
    path = tmp_path / "finetune.safetensors"
    path.write_bytes(checkpoints["A"].read_bytes())
    first = compstore.ingest_single_file(path, "StableDiffusionPipeline", config="A", store=family_store)
    calls = []
    real = diffusers.StableDiffusionPipeline.from_single_file.__func__
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_single_file",
                        classmethod(lambda cls, *a, **k: calls.append(a) or real(cls, *a, **k)))
    again = compstore.ingest_single_file(path, "StableDiffusionPipeline", config="A", store=family_store)
    assert (again.status, again.snapshot, again.written_bytes, calls) == ("unchanged", first.snapshot, 0, [])
    pipe = compstore.StableDiffusionPipeline.from_single_file(path, config="A", store=family_store)
    assert calls == [] and list(pipe.unet.config.block_out_channels) == [32, 64]

    path.write_bytes(checkpoints["B"].read_bytes())  # another fine-tune saved over it
    changed = compstore.ingest_single_file(path, "StableDiffusionPipeline", config="A", store=family_store)
    assert changed.status == "converted" and len(calls) == 1
    assert family_store.resolve(str(path)) == changed.snapshot != first.snapshot
    same_state(compstore.StableDiffusionPipeline.from_pretrained(str(path), store=family_store).unet,
               compstore.StableDiffusionPipeline.from_pretrained("B", store=family_store).unet)
    other_config = compstore.ingest_single_file(path, "StableDiffusionPipeline", config=family["A"],
                                                store=family_store)
    assert other_config.status == "converted" and len(calls) == 2
    other_folder = compstore.ingest_single_file(path, "StableDiffusionPipeline", config=family["B"],
                                                store=family_store)
    assert other_folder.status == "converted" and len(calls) == 3


def test_the_inferred_config_is_taken_from_the_store_offline(family_store, checkpoints):
    """No `config`: the repo diffusers infers from the checkpoint's tensors
    (SD 1.5's), from the store's ref of that name, without the network."""
    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    family_store.tag(repo, family_store.resolve("A"))
    r = compstore.ingest_single_file(checkpoints["B"], "StableDiffusionPipeline", name="b-single",
                                     store=family_store)
    assert (r.config, r.ref, r.written_bytes < 1024) == (repo, "b-single", True)


def test_a_single_file_pipeline_switches_through_the_pool_as_any_other(family_store, checkpoints):
    from compstore import ResidencyPool
    from test_residency import CountingCopier

    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    compstore.StableDiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    b = compstore.StableDiffusionPipeline.from_single_file(checkpoints["B"], config="A", store=family_store,
                                                           pool=pool)
    moved = {c.component: c.bytes_from_pinned + c.bytes_from_store for c in pool.last_report.components}
    assert moved == {"unet": family_store.diff("A", "B").delta_bytes, "vae": 0, "text_encoder": 0}
    assert b.unet.conv_in.weight.device.type == "meta"


def test_bad_single_files_are_refused_and_leave_the_store_as_it_was(family_store, checkpoints, tmp_path):
    before = store_state(family_store.home)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04 not loaded")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(checkpoints["A"].read_bytes()[:100])
    unrelated = tmp_path / "unrelated.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(checkpoints["A"])
    save_file({**state, "model.diffusion_model.out.2.weight": torch.zeros(3)}, unrelated)  # not this UNet's
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("model.")}, unet_only)
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    gguf = tmp_path / "flux1-dev-Q4_K_S.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    unknown = tmp_path / "unknown.safetensors"  # diffusers reads a value to tell which model it is
    save_file({"control_layers.14.adaLN_modulation.0.weight": torch.zeros(2),
               "control_noise_refiner.0.before_proj.weight": torch.ones(2)}, unknown)
    cases = [
        (tmp_path / "missing.safetensors", compstore.InvalidInputError, "no such file"),
        (pickle, compstore.PickleRefusedError, "never loads pickle checkpoints"),
        ("https://huggingface.co/org/B/blob/main/model.ckpt", compstore.PickleRefusedError, "never loads pickle"),
        (gguf, compstore.InvalidInputError, r"a GGUF checkpoint \(\.gguf\) holds one model, not a StableDiffusionPipeline: "
         r"load it with its model class, .*GGUFQuantizationConfig"),  # refused before it is read (tests/test_quantized_files.py)
        ("https://huggingface.co/org/B/blob/main/flux1-dev-Q4_K_S.gguf", compstore.InvalidInputError,
         r"a GGUF checkpoint \(\.gguf\) holds one model"),
        ("https://example.com/model.safetensors", compstore.InvalidInputError, "or the URL of one on the Hub"),
        (truncated, compstore.InvalidInputError, "truncated.safetensors"),
        (unrelated, compstore.InvalidInputError, "could not convert it with config 'A'"),
        (unet_only, compstore.InvalidInputError, "Failed to load CLIPTextModel. .* loads with its class"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            compstore.StableDiffusionPipeline.from_single_file(path, config="A", store=family_store)
    # a quantization config that cannot load: refused before the conversion is stored
    with pytest.raises(ValueError, match="must be an instance of `PipelineQuantizationConfig`"):
        compstore.StableDiffusionPipeline.from_single_file(checkpoints["A"], config="A", store=family_store,
                                                           quantization_config={"quant_method": "torchao"})
    with pytest.raises(compstore.CompstoreError, match="a GGUF quantization config loads a GGUF checkpoint \\(.gguf\\), and this file is not one"):
        compstore.UNet2DConditionModel.from_single_file(
            checkpoints["A"], config="A", subfolder="unet", store=family_store,
            quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.bfloat16))
    with pytest.raises(compstore.InvalidInputError, match="empty.safetensors: holds no tensors"):
        compstore.StableDiffusionPipeline.from_single_file(empty, config="A", store=family_store)
    with pytest.raises(compstore.InvalidInputError, match="could not tell which pipeline .* pass config="):
        compstore.StableDiffusionPipeline.from_single_file(unknown, store=family_store)  # no config
    with pytest.raises(compstore.CompstoreError, match="call it on the class"):
        compstore.DiffusionPipeline.from_single_file(checkpoints["A"], config="A", store=family_store)
    with pytest.raises(compstore.CompstoreError, match="not a diffusers pipeline or model class that loads single"):
        compstore.ingest_single_file(checkpoints["A"], "DDIMScheduler", config="A", store=family_store)
    with pytest.raises(compstore.InvalidInputError, match="neither a store ref, a folder nor a Hub repo id"):
        compstore.ingest_single_file(checkpoints["A"], "StableDiffusionPipeline", config="no such ref",
                                     store=family_store)
    with pytest.raises(compstore.CompstoreError, match="subfolder='unet': a pipeline's checkpoint holds all"):
        compstore.StableDiffusionPipeline.from_single_file(checkpoints["A"], config="A", subfolder="unet",
                                                           store=family_store)
    with pytest.raises(compstore.InvalidInputError, match="invalid ref name"):
        compstore.ingest_single_file(checkpoints["A"], "StableDiffusionPipeline", config="A", name=" A ",
                                     store=family_store)
    assert store_state(family_store.home) == before


def test_cli_ingest_single_file(family_store, checkpoints):
    args = ["--store", str(family_store.home), "ingest-single-file", str(checkpoints["B"]),
            "--class", "StableDiffusionPipeline", "--config", "A", "--json"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    doc = json.loads(first.output[first.output.index("{"):])
    assert set(doc) == {"ref", "snapshot", "status", "checkpoint", "sha256", "config", "seconds",
                        "written_bytes", "reused_bytes"}
    assert doc["status"] == "converted" and doc["ref"] == str(checkpoints["B"])
    again = CliRunner().invoke(cli, args[:-1])
    assert again.exit_code == 0 and "unchanged, the store holds this file's conversion" in again.output
    bad = CliRunner().invoke(cli, args[:4] + ["--class", "Nope"])
    assert bad.exit_code == 1 and "'Nope' is not a diffusers pipeline or model class" in bad.output


def test_an_sdxl_checkpoint_is_the_tensors_of_its_diffusers_repo(store, tmp_path):
    """SDXL's layout: two text encoders, the second OpenCLIP's (q, k, v in one
    `in_proj`, its projection transposed); converted, it is the diffusers folder's
    components, and loads as diffusers' from_single_file loads it."""
    import transformers

    base = syn.tiny_sdxl_pipeline(seed=0)
    torch.manual_seed(5)  # diffusers tells SDXL's two encoders apart by their widths
    wide = transformers.CLIPTextConfig(**{**syn.TINY_CLIP, "hidden_size": 48, "num_hidden_layers": 10},
                                       hidden_act="gelu", projection_dim=32)  # 10: SDXL, diffusers infers
    text_encoder_2 = transformers.CLIPTextModelWithProjection(wide)
    torch.manual_seed(6)
    unet = diffusers.UNet2DConditionModel(**{**syn.TINY_SDXL_UNET, "cross_attention_dim": 32 + 48})
    pipe = type(base)(**{**base.components, "text_encoder_2": text_encoder_2, "unet": unet})
    pipe.save_pretrained(tmp_path / "sdxl")
    store.ingest(tmp_path / "sdxl", "sdxl")
    shutil.copytree(tmp_path / "sdxl", tmp_path / "sdxl-fp32")  # its text encoders' configs say float32
    checkpoint = syn.save_as_single_file(pipe, tmp_path / "sdxl.safetensors", dtype=torch.float16)
    pipe.to(torch.float16).save_pretrained(tmp_path / "sdxl", variant="fp16")
    store.ingest(tmp_path / "sdxl", "sdxl")

    r = compstore.ingest_single_file(checkpoint, "StableDiffusionXLPipeline", config="sdxl", store=store)
    assert r.written_bytes < 1024
    mine = {c["slot"]: c["component_id"] for c in store.components_of(r.snapshot)}
    assert mine == {c["slot"]: c["component_id"] for c in store.components_of(store.resolve("sdxl"))
                    if c["variant"] == "fp16" or c["slot"] not in MODELS + ("text_encoder_2",)}
    store.tag("stabilityai/stable-diffusion-xl-base-1.0", store.resolve("sdxl"))  # no config: SDXL base's
    inferred = compstore.ingest_single_file(checkpoint, "StableDiffusionXLPipeline", name="inferred", store=store)
    assert (inferred.config, inferred.snapshot != r.snapshot, inferred.written_bytes < 1024) == (
        "stabilityai/stable-diffusion-xl-base-1.0", True, True)  # another provenance file, the same components
    for config, kw in ((tmp_path / "sdxl-fp32", {}), (tmp_path / "sdxl", {"dtype": torch.float16})):
        theirs = diffusers.StableDiffusionXLPipeline.from_single_file(str(checkpoint), config=str(config), **kw)
        ours = compstore.StableDiffusionXLPipeline.from_single_file(checkpoint, config=config, store=store, **kw)
        assert type(ours) is type(theirs)
        for slot in MODELS + ("text_encoder_2",):
            same_state(getattr(ours, slot), getattr(theirs, slot))


def test_an_unchanged_file_is_not_read_again(family_store, checkpoints, tmp_path, monkeypatch):
    """As a folder's files: while the checkpoint's stat (inode, size, mtime, ctime) is
    as when it was last hashed, its sha256 is taken from the catalog."""
    import time

    from compstore.loader import single_file
    from compstore.store import stat_cache

    path = tmp_path / "finetune.safetensors"
    path.write_bytes(checkpoints["B"].read_bytes())
    hashed = []
    real = single_file.file_sha256
    monkeypatch.setattr(single_file, "file_sha256", lambda p: hashed.append(p) or real(p))

    def call():
        return compstore.ingest_single_file(path, "StableDiffusionPipeline", config="A", store=family_store)

    first = call()  # just written: its timestamps are not trusted yet
    time.sleep(stat_cache.SETTLED_NS / 1e9 + 0.05)
    assert [call().status, call().status, len(hashed)] == ["unchanged", "unchanged", 2]
    assert family_store.recorded_file_sha256(str(path), path, time.time_ns()) == first.sha256
    path.write_bytes(checkpoints["B"].read_bytes())  # the same bytes, written again: read again
    time.sleep(stat_cache.SETTLED_NS / 1e9 + 0.05)
    assert call().status == "unchanged" and len(hashed) == 3
    path.write_bytes(checkpoints["A"].read_bytes())  # a changed file, never taken for the old one
    assert call().status == "converted" and len(hashed) == 4
    family_store.rm(str(path))
    assert family_store.recorded_file_sha256(str(path), path, time.time_ns()) is None


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_a_model_class_loads_its_part_of_a_checkpoint_as_diffusers(family_store, family, checkpoints, tmp_path,
                                                                   monkeypatch, dtype):
    """`compstore.AutoencoderKL.from_single_file`: the VAE of a whole checkpoint
    (`subfolder="vae"` of a pipeline config), or of a VAE-only file as VAEs are
    published (no prefix), stored as a model folder: A's VAE component itself."""
    from safetensors.torch import load_file, save_file

    from compstore.loader import single_file

    vae_only = tmp_path / "vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v for k, v in load_file(checkpoints["A"]).items()
               if k.startswith("first_stage_model.")}, vae_only)
    kw = {} if dtype is None else {"dtype": dtype}
    a_vae = next(c["component_id"] for c in family_store.components_of(family_store.resolve("A")) if c["slot"] == "vae")
    for path in (checkpoints["A"], vae_only):
        theirs = diffusers.AutoencoderKL.from_single_file(str(path), config=str(family["A"]), subfolder="vae", **kw)
        ours = compstore.AutoencoderKL.from_single_file(path, config="A", subfolder="vae", store=family_store,
                                                        name=f"vae-of-{path.stem}", **kw)
        assert type(ours) is type(theirs)
        same_state(ours, theirs)
        snapshot = family_store.resolve(f"vae-of-{path.stem}")
        assert [c["component_id"] for c in family_store.components_of(snapshot)] == [a_vae]
    made = json.loads(family_store.read_file(snapshot, "compstore_single_file.json"))
    assert (made["model_class"], made["subfolder"]) == ("AutoencoderKL", "vae")
    # the file's UNet and the file's pipeline: each a ref of its own, each converted once
    converted = []
    real = single_file._convert
    monkeypatch.setattr(single_file, "_convert", lambda *a: converted.append(a[0]) or real(*a))
    for _ in range(2):
        unet = compstore.UNet2DConditionModel.from_single_file(checkpoints["B"], config="A", subfolder="unet",
                                                               store=family_store)
        pipe = compstore.StableDiffusionPipeline.from_single_file(checkpoints["B"], config="A", store=family_store)
    assert converted == [diffusers.UNet2DConditionModel, diffusers.StableDiffusionPipeline]
    assert family_store.has_ref(f"{checkpoints['B']}#UNet2DConditionModel") and family_store.has_ref(str(checkpoints["B"]))
    same_state(unet, compstore.load_component("B", "unet", store=family_store, dtype=torch.float32))
    same_state(pipe.unet, unet)


def test_a_model_class_takes_its_default_subfolder_as_diffusers_does(family_store, checkpoints):
    family_store.tag("stable-diffusion-v1-5/stable-diffusion-v1-5", family_store.resolve("A"))
    r = compstore.ingest_single_file(checkpoints["A"], "AutoencoderKL", name="vae", store=family_store)
    made = json.loads(family_store.read_file(r.snapshot, "compstore_single_file.json"))
    assert (r.config, made["subfolder"], r.written_bytes < 1024) == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "vae", True)
    again = compstore.ingest_single_file(checkpoints["A"], "AutoencoderKL", name="vae", store=family_store,
                                         config="stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="vae")
    assert (again.status, again.snapshot) == ("unchanged", r.snapshot)
    with pytest.raises(compstore.InvalidInputError, match="UNet2DConditionModel.from_single_file could not convert"):
        # the ref holds a VAE converted with this very file, config and subfolder: not a UNet's
        compstore.ingest_single_file(checkpoints["A"], "UNet2DConditionModel", name="vae", store=family_store,
                                     config="stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="vae")


def test_a_read_only_store_loads_held_conversions_and_refuses_new_ones(family_store, checkpoints):
    from compstore import ReadOnlyStoreError, Store

    compstore.ingest_single_file(checkpoints["B"], "StableDiffusionPipeline", config="A", store=family_store)
    before = store_state(family_store.home)
    with Store(family_store.home, read_only=True) as ro:
        pipe = compstore.StableDiffusionPipeline.from_single_file(checkpoints["B"], config="A", store=ro)
        same_state(pipe.unet, compstore.load_component("B", "unet", store=family_store, dtype=torch.float32))
        with pytest.raises(ReadOnlyStoreError):
            compstore.StableDiffusionPipeline.from_single_file(checkpoints["A"], config="A", store=ro)
    assert store_state(family_store.home) == before


def test_a_unet_only_file_loads_as_the_refusal_of_its_pipeline_says(family_store, checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in load_file(checkpoints["B"]).items() if k.startswith("model.")}, unet_only)
    with pytest.raises(compstore.InvalidInputError, match=r"loads with its class \(unet = compstore.UNet2DCondition"
                       r"Model.from_single_file\(path, config=<ref>\)\), .* compstore.StableDiffusionPipeline"
                       r".from_pretrained\(<ref>, unet=unet\)"):
        compstore.StableDiffusionPipeline.from_single_file(unet_only, config="A", store=family_store)
    unet = compstore.UNet2DConditionModel.from_single_file(unet_only, config="A", subfolder="unet",
                                                           store=family_store)
    pipe = compstore.DiffusionPipeline.from_pretrained("A", unet=unet, store=family_store)
    same_state(pipe.unet, compstore.load_component("B", "unet", store=family_store))


@pytest.fixture
def hub(monkeypatch, family, checkpoints, tmp_path):
    """org/B as the Hub would serve it with B's single-file checkpoint at its root."""
    from hub_emulator import HubEmulator
    from conftest import use_hub

    repo = tmp_path / "org-B"
    shutil.copytree(family["B"], repo)
    shutil.copy(checkpoints["B"], repo / "b.safetensors")
    hub = HubEmulator()
    hub.add_repo("org/B", repo)
    use_hub(monkeypatch, hub)
    yield hub
    hub.close()


def test_a_hub_url_is_fetched_and_converted_once(family_store, family, checkpoints, hub, monkeypatch):
    """`from_single_file("https://huggingface.co/org/B/blob/main/b.safetensors")`, as
    model cards write it: the file is pulled into the store (metadata first), converted
    once; later calls download nothing and convert nothing, and without the Hub the
    store's pull of it loads."""
    from compstore.loader import single_file

    url = "https://huggingface.co/org/B/blob/main/b.safetensors"
    converted = []
    real = single_file._convert
    monkeypatch.setattr(single_file, "_convert", lambda *a: converted.append(a[0]) or real(*a))
    first = compstore.ingest_single_file(url, "StableDiffusionPipeline", config="A", store=family_store)
    commit = hub.repos["org/B"].refs["main"]
    assert (first.status, first.ref, first.checkpoint) == ("converted", f"org/B/b.safetensors@{commit}",
                                                           f"org/B/b.safetensors@{commit}")
    assert hub.served_files == ["b.safetensors"] and first.written_bytes < 1024
    hub.reset_counts()
    ours = compstore.StableDiffusionPipeline.from_single_file(url, config="A", store=family_store)
    assert hub.served_files == [] and converted == [diffusers.StableDiffusionPipeline]
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(checkpoints["B"]), config=str(family["A"]))
    assert_same_pipeline(ours, theirs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = compstore.ingest_single_file(url, "StableDiffusionPipeline", config="A", store=family_store)
    assert (offline.status, offline.ref) == ("unchanged", first.ref)
    by_revision = compstore.ingest_single_file("https://huggingface.co/org/B/b.safetensors", "StableDiffusionPipeline",
                                               config="A", store=family_store, revision=commit[:10])
    assert (by_revision.status, by_revision.ref) == ("unchanged", first.ref)  # revision= names the commit
    with pytest.raises(compstore.RefNotFoundError):  # never another commit than the one asked for
        compstore.ingest_single_file("https://huggingface.co/org/B/b.safetensors", "StableDiffusionPipeline",
                                     config="A", store=family_store, revision="0123456789")
    with pytest.raises(compstore.RefNotFoundError):
        compstore.ingest_single_file("https://huggingface.co/org/B/blob/main/other.safetensors",
                                     "StableDiffusionPipeline", config="A", store=family_store)


def test_a_hub_url_at_a_tag_is_found_offline_at_that_tag_only(family_store, checkpoints, hub, monkeypatch,
                                                               tmp_path):
    """A checkpoint URL at a tag (`.../blob/v1/b.safetensors`) and main moved on since:
    offline, the URL at the tag gets the tag's commit, and at main main's (until
    2026-12-07 the tag's was a RefNotFoundError, and main's could be any commit's)."""
    import shutil

    folder = tmp_path / "tag-repo"
    folder.mkdir()
    shutil.copy(checkpoints["B"], folder / "b.safetensors")
    tagged = hub.add_repo("org/T", folder)
    shutil.copy(checkpoints["A"], folder / "b.safetensors")  # main's b.safetensors: A's weights now
    main = hub.add_repo("org/T", folder)
    hub.repos["org/T"].refs.update({"v1": tagged, "main": main})
    at = {rev: f"https://huggingface.co/org/T/blob/{rev}/b.safetensors" for rev in ("v1", "main")}
    online = {rev: compstore.ingest_single_file(url, "StableDiffusionPipeline", config="A", store=family_store)
              for rev, url in at.items()}
    assert online["v1"].ref == f"org/T/b.safetensors@{tagged}" != online["main"].ref
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for rev, url in at.items():
        offline = compstore.ingest_single_file(url, "StableDiffusionPipeline", config="A", store=family_store)
        assert (offline.status, offline.ref) == ("unchanged", online[rev].ref), rev


def test_two_processes_converting_one_file_at_once_leave_one_sound_conversion(family_store, checkpoints):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "compstore", "--store", str(family_store.home), "ingest-single-file",
           str(checkpoints["B"]), "--class", "StableDiffusionPipeline", "--config", "A", "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    snapshots = {json.loads(out[out.index("{"):])["snapshot"] for out, _ in outs}
    assert snapshots == {family_store.resolve(str(checkpoints["B"]))}
    assert family_store.verify().ok and not list((family_store.home / "tmp").iterdir())


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The tiny Flux family (A; B = A with another transformer) and B's transformer
    as one file in the diffusers layout, as many Flux fine-tunes are published."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("flux")
    folders = syn.switch_family("flux", "tiny", root / "family")
    state = diffusers.FluxTransformer2DModel.from_pretrained(folders["B"] / "transformer").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, root / "flux-b.safetensors")
    return folders, root / "flux-b.safetensors"


def test_a_flux_transformer_file_is_the_stored_transformer_it_equals(flux, tmp_path):
    """A transformer-only file is refused as a pipeline with advice that works: it
    loads with its model class, the config a pipeline ref or folder, its folder there
    the class's ("transformer", as diffusers infers it), and converted it is B's
    transformer component, under 1 KB written. The pipeline takes it passed in."""
    folders, path = flux
    store = compstore.Store(tmp_path / "store")
    store.ingest(folders["A"], "A")
    store.ingest(folders["B"], "B")
    before = store_state(store.home)
    with pytest.raises(compstore.InvalidInputError, match=r"\(transformer = compstore.FluxTransformer2DModel."
                       r"from_single_file\(path, config=<ref>\)\), .* compstore.FluxPipeline.from_pretrained"
                       r"\(<ref>, transformer=transformer\)"):
        compstore.FluxPipeline.from_single_file(path, config="A", store=store)
    assert store_state(store.home) == before
    theirs = diffusers.FluxTransformer2DModel.from_single_file(str(path), config=str(folders["A"]),
                                                               subfolder="transformer")
    for config in ("A", folders["A"], folders["A"] / "transformer"):  # a model's own folder: no subfolder
        name = f"flux-b from {config}"
        r = compstore.ingest_single_file(path, "FluxTransformer2DModel", config=config, name=name, store=store)
        assert (r.status, r.written_bytes < 1024) == ("converted", True)  # configs, provenance: no tensor
        made = json.loads(store.read_file(r.snapshot, "compstore_single_file.json"))
        assert (made["model_class"], made.get("subfolder")) == (
            "FluxTransformer2DModel", None if str(config).endswith("transformer") else "transformer")
        [component] = store.components_of(r.snapshot)
        assert component["component_id"] == next(c["component_id"] for c in store.components_of(
            store.resolve("B")) if c["slot"] == "transformer")
        ours = compstore.FluxTransformer2DModel.from_single_file(path, config=config, store=store, name=name)
        same_state(ours, theirs)
    pipe = compstore.FluxPipeline.from_pretrained("A", transformer=ours, store=store)
    same_state(pipe.transformer, compstore.load_component("B", "transformer", store=store))
    same_state(pipe.vae, compstore.load_component("A", "vae", store=store))


@pytest.mark.parametrize("configs, subfolder, missing", [
    (("A", "A"), "unet", "unet/config.json"),      # the family has no UNet: its ref, its folder
    ((None, "A/transformer"), "vae", "vae/config.json"),  # a model's folder holds no other model
    (("tokenizer-only", "A/tokenizer"), None, "config.json"),  # neither a model's folder nor a pipeline
])
def test_a_model_config_without_the_models_config_is_refused_before_any_conversion(
        flux, tmp_path, monkeypatch, configs, subfolder, missing):
    from compstore.loader import single_file

    folders, path = flux
    store = compstore.Store(tmp_path / "store")
    store.ingest(folders["A"], "A")
    store.ingest(folders["A"] / "tokenizer", "tokenizer-only")
    before = store_state(store.home)
    monkeypatch.setattr(single_file, "_convert", lambda *a: pytest.fail("converted"))
    ref, folder = configs
    for config in ([ref] if ref else []) + [folders["A"].parent / folder]:
        with pytest.raises(compstore.InvalidInputError, match=f"has no {missing}"):
            compstore.FluxTransformer2DModel.from_single_file(path, config=config, subfolder=subfolder,
                                                              store=store)
    assert store_state(store.home) == before


@pytest.fixture
def no_vae(checkpoints, tmp_path):
    """B's checkpoint without its VAE, as some checkpoints are published."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in load_file(checkpoints["B"]).items() if not k.startswith("first_stage_model.")},
              path)
    return path


def test_a_checkpoint_lacking_a_model_converts_with_it_passed_in_as_diffusers_does(
        family_store, family, checkpoints, no_vae, monkeypatch):
    """A model the file lacks, passed in, is left out of the conversion (recorded as
    `without`) and the pipeline equals diffusers'. A later call passing it converts
    nothing; one that does not is refused, as diffusers refuses it, leaving the store
    as it was. A whole file with a model passed in is converted whole, and that
    conversion serves calls without it."""
    from compstore.loader import single_file

    vae = compstore.load_component("A", "vae", store=family_store, dtype=torch.float32)
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(no_vae), config=str(family["A"]), vae=vae)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    ours = compstore.StableDiffusionPipeline.from_single_file(no_vae, config="A", vae=vae, store=family_store,
                                                              scheduler=scheduler)
    assert_same_pipeline(ours, type(theirs)(**{**theirs.components, "scheduler": scheduler}))
    assert ours.vae is vae and ours.scheduler is scheduler
    made = json.loads(family_store.read_file(family_store.resolve(str(no_vae)), "compstore_single_file.json"))
    assert made["without"] == ["vae"]  # a scheduler is never the checkpoint's: converted all the same
    converted = []
    real = single_file._convert
    monkeypatch.setattr(single_file, "_convert", lambda *a: converted.append(a[1].name) or real(*a))
    compstore.StableDiffusionPipeline.from_single_file(no_vae, config="A", vae=vae, store=family_store)
    assert converted == []
    before = store_state(family_store.home)
    with pytest.raises(compstore.InvalidInputError, match="Failed to load AutoencoderKL.*Pass the models it lacks"):
        compstore.StableDiffusionPipeline.from_single_file(no_vae, config="A", store=family_store)
    assert store_state(family_store.home) == before
    whole = compstore.StableDiffusionPipeline.from_single_file(checkpoints["B"], config="A", vae=vae,
                                                               safety_checker=None, store=family_store)
    assert whole.vae is vae and converted == [no_vae.name, "B.safetensors"]  # whole at the first try
    snapshot = family_store.resolve(str(checkpoints["B"]))
    assert "without" not in json.loads(family_store.read_file(snapshot, "compstore_single_file.json"))
    same_state(compstore.StableDiffusionPipeline.from_single_file(checkpoints["B"], config="A",
                                                                  store=family_store).vae, vae)
    assert converted == [no_vae.name, "B.safetensors"]


@pytest.mark.parametrize("cls, may_lack, message", [
    ("StableDiffusionPipeline", ["vea"], "StableDiffusionPipeline has no slot 'vea': its slots are"),
    ("AutoencoderKL", ["vae"], "a model class's checkpoint is one model"),
])
def test_may_lack_naming_no_slot_of_a_pipeline_is_refused(family_store, no_vae, cls, may_lack, message):
    before = store_state(family_store.home)
    with pytest.raises(compstore.CompstoreError, match=message):
        compstore.ingest_single_file(no_vae, cls, config="A", may_lack=may_lack, store=family_store)
    assert store_state(family_store.home) == before


def test_cli_may_lack(family_store, no_vae):
    run = lambda *extra: CliRunner().invoke(cli, [  # noqa: E731
        "--store", str(family_store.home), "ingest-single-file", str(no_vae), "--class",
        "StableDiffusionPipeline", "--config", "A", "--json", *extra])
    refused = run()
    assert refused.exit_code == 2 and "Pass the models it lacks" in refused.output  # bad input
    done = run("--may-lack", "vae", "--may-lack", "safety_checker")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["status"] == "converted"
    made = json.loads(family_store.read_file(family_store.resolve(str(no_vae)), "compstore_single_file.json"))
    assert made["without"] == ["safety_checker", "vae"]


def test_a_cached_single_file_is_adopted_and_its_url_then_downloads_nothing(
        family_store, family, checkpoints, hub, tmp_path):
    """What diffusers' `from_single_file(url)` leaves in a Hugging Face cache (the file
    alone, at its revision's root) is adopted as `repo@commit` (it was skipped: "not
    a diffusers pipeline or component"), not as `repo`; the same URL through compstore
    then downloads nothing and converts to diffusers' pipeline, offline too; and
    `reclaim` frees the cache once the store rebuilds the file."""
    from huggingface_hub import scan_cache_dir
    from hub_emulator import huggingface_hub_default_endpoint

    url = "https://huggingface.co/org/B/blob/main/b.safetensors"
    cache = tmp_path / "hf-cache"
    with huggingface_hub_default_endpoint(hub.url):
        theirs = diffusers.StableDiffusionPipeline.from_single_file(url, config=str(family["A"]), cache_dir=cache)
    report = family_store.adopt(cache)
    commit = hub.repos["org/B"].refs["main"]
    assert [(a["ref"], a["whole"], a["single_files"]) for a in report.adopted] == [(f"org/B@{commit}", False, True)]
    assert not report.skipped and not family_store.has_ref("org/B")
    hub.served_files.clear()
    ours = compstore.StableDiffusionPipeline.from_single_file(url, config="A", store=family_store)
    assert hub.served_files == []  # the listing, and no file: the store holds it
    assert_same_pipeline(ours, theirs)
    offline = compstore.StableDiffusionPipeline.from_single_file(url, config="A", store=family_store,
                                                                 local_files_only=True)
    assert_same_pipeline(offline, theirs)
    r = CliRunner().invoke(cli, ["--store", str(family_store.home), "adopt", "--cache-dir", str(cache),
                                 "--reclaim"])
    assert r.exit_code == 0 and f"org/B@{commit}" in r.output and "single files" in r.output, r.output
    assert all(not repo.revisions for repo in scan_cache_dir(cache).repos)
