"""Modular pipelines: pinned cross-repo components, loads equal to diffusers', export --flatten."""

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

import compstore
from compstore import PinChangedError
from compstore.loader.synthetic import tiny_sdxl_pipeline
from conftest import store_state

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


def save_modular(pipe, folder: Path) -> None:
    """Save a classic pipeline, then re-save it as diffusers' modular pipeline."""
    classic = folder.with_name(folder.name + "-classic")
    pipe.save_pretrained(classic)
    modular = diffusers.ModularPipeline.from_pretrained(str(classic))
    modular.load_components(torch_dtype=torch.float32)
    modular.save_pretrained(str(folder), overwrite_modular_index=True)


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """base: a self-contained modular SDXL repo. remix: its own UNet, every other
    component pointing at base (a "modular" repo re-publishing another's parts)."""
    root = tmp_path_factory.mktemp("modular")
    save_modular(tiny_sdxl_pipeline(seed=0), root / "base")
    save_modular(tiny_sdxl_pipeline(seed=50), root / "remix")
    index = json.loads((root / "remix" / "modular_model_index.json").read_text())
    for slot, entry in index.items():
        if slot.startswith("_") or not isinstance(entry, list) or entry[0] is None or slot == "unet":
            continue
        entry[2].update(pretrained_model_name_or_path=str(root / "base"), subfolder=slot)
        shutil.rmtree(root / "remix" / slot)
    (root / "remix" / "modular_model_index.json").write_text(json.dumps(index, indent=2))
    return root


def load_theirs(folder) -> object:
    pipe = diffusers.ModularPipeline.from_pretrained(str(folder))
    pipe.load_components(torch_dtype=torch.float32)
    return pipe


def image(pipe) -> np.ndarray:
    return pipe(prompt="a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                height=32, width=32, output="images", output_type="np")


def assert_same(ours, theirs):
    assert type(ours) is type(theirs)
    assert type(ours).__name__ == "StableDiffusionXLModularPipeline"
    for slot in MODELS:
        a, b = getattr(ours, slot).state_dict(), getattr(theirs, slot).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), slot
    # diffusers' modular loader leaves weights as views of the safetensors mmap at
    # whatever offset the file has; SIMD kernels then sum in another order (~1e-6).
    np.testing.assert_allclose(image(ours), image(theirs), atol=1e-5)
    for slot in MODELS:  # with its weights in aligned memory the image is bitwise equal
        for p in getattr(theirs, slot).parameters():
            p.data = p.data.clone()
    np.testing.assert_array_equal(image(ours), image(theirs))


def test_modular_repo_pins_and_loads_like_diffusers(repos, store):
    r = store.ingest(repos / "remix", "remix")
    assert r.kind == "modular"
    pins = {p["slot"]: p for p in store.show("remix")["pins"]}
    assert set(pins) >= {"vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler"}
    assert "unet" not in pins and pins["vae"]["source"] == str((repos / "base").resolve())

    ours = compstore.ModularPipeline.from_pretrained("remix", store=store)
    ours.load_components(torch_dtype=torch.float32)
    assert_same(ours, load_theirs(repos / "remix"))


def test_a_remix_records_the_pointers_its_index_publishes_as_diffusers_does(repos, store, tmp_path):
    """compstore loads a remix from its skeleton, but the pipeline records what the
    repo's index says, as diffusers' does: the same specs and config entries, the same
    load id on every loaded component (a pinned VAE's names the base repo), so that
    `save_pretrained(..., overwrite_modular_index=False)` re-publishes the pointers and
    `update_components` of an AutoModel keeps its source. Until 2026-12-07 every spec
    named compstore's skeleton folder and models had no load id."""
    import diffusers

    ours = compstore.ModularPipeline.from_pretrained(str(repos / "remix"), store=store)
    theirs = diffusers.ModularPipeline.from_pretrained(str(repos / "remix"))
    for pipe in (ours, theirs):
        pipe.load_components(torch_dtype=torch.float32)
    names = [n for n, spec in theirs._component_specs.items() if spec.default_creation_method == "from_pretrained"]
    assert {n: ours.config[n] for n in names} == {n: theirs.config[n] for n in names}
    loaded = [n for n in names if getattr(theirs, n, None) is not None]
    assert set(loaded) >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert {n: getattr(ours, n)._diffusers_load_id for n in loaded} == \
        {n: getattr(theirs, n)._diffusers_load_id for n in loaded}
    assert ours.vae._diffusers_load_id == f"{repos / 'base'}|vae|null|null"
    for pipe, out in ((ours, tmp_path / "ours"), (theirs, tmp_path / "theirs")):
        pipe.save_pretrained(str(out), overwrite_modular_index=False)
    assert json.loads((tmp_path / "ours" / "modular_model_index.json").read_text()) == \
        json.loads((tmp_path / "theirs" / "modular_model_index.json").read_text())
    for pipe, lib in ((ours, compstore), (theirs, diffusers)):
        pipe.update_components(vae=lib.AutoModel.from_pretrained(str(repos / "base"), subfolder="vae"))
        assert pipe._component_specs["vae"].pretrained_model_name_or_path == str(repos / "base")


def test_a_classic_pipeline_loaded_as_modular_records_its_folder_as_diffusers_does(repos, store):
    """A classic folder (model_index.json) through ModularPipeline: each component's
    spec and load id name the folder given, as diffusers' do, not compstore's skeleton."""
    import diffusers

    folder = str(repos / "base-classic")
    ours = compstore.ModularPipeline.from_pretrained(folder, store=store)
    theirs = diffusers.ModularPipeline.from_pretrained(folder)
    for pipe in (ours, theirs):
        pipe.load_components(torch_dtype=torch.float32)
    loaded = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(theirs, n, None)]
    assert {n: getattr(ours, n)._diffusers_load_id for n in loaded} == \
        {n: getattr(theirs, n)._diffusers_load_id for n in loaded}
    assert ours.unet._diffusers_load_id == f"{folder}|unet|null|null"
    assert {n: ours.config[n] for n in loaded} == {n: theirs.config[n] for n in loaded}


def test_changed_source_is_never_loaded_silently(repos, store, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(repos / "base", base)
    remix = tmp_path / "remix"
    shutil.copytree(repos / "remix", remix)
    index_path = remix / "modular_model_index.json"
    index = json.loads(index_path.read_text())
    for slot, entry in index.items():
        if isinstance(entry, list) and entry[0] is not None and slot != "unet":
            entry[2]["pretrained_model_name_or_path"] = str(base)
    index_path.write_text(json.dumps(index))
    store.ingest(remix, "remix")
    pinned_vae = compstore.load_component(str(base.resolve()), "vae", store=store).state_dict()

    # The pointed-to repo changes its VAE.
    other = tiny_sdxl_pipeline(seed=99)
    other.vae.save_pretrained(base / "vae")
    before = store_state(store.home)
    with pytest.raises(PinChangedError) as e:
        store.ingest(remix, "remix")
    msg = str(e.value)
    assert "'vae'" in msg and "--repin" in msg and "now" in msg and "pinned" in msg
    # "nothing was changed": the folder pointed at was not ingested first (until 2026-12-07
    # it was, under its own ref, before the pins were compared)
    assert store_state(store.home) == before

    ours = compstore.ModularPipeline.from_pretrained("remix", store=store)
    ours.load_components(torch_dtype=torch.float32)
    assert all(torch.equal(v, ours.vae.state_dict()[k]) for k, v in pinned_vae.items())

    store.ingest(remix, "remix", repin=True)
    again = compstore.ModularPipeline.from_pretrained("remix", store=store)
    again.load_components(torch_dtype=torch.float32)
    assert all(torch.equal(v, again.vae.state_dict()[k]) for k, v in other.vae.state_dict().items())


def test_pointer_to_unknown_repo_is_a_clear_error(repos, store, tmp_path):
    from compstore import InvalidInputError

    remix = tmp_path / "remix"
    shutil.copytree(repos / "remix", remix)
    index = json.loads((remix / "modular_model_index.json").read_text())
    index["vae"][2]["pretrained_model_name_or_path"] = "some-org/not-here"
    (remix / "modular_model_index.json").write_text(json.dumps(index))
    before = store_state(store.home)
    with pytest.raises(InvalidInputError, match="neither a local folder nor a ref"):
        store.ingest(remix, "remix")
    assert store_state(store.home) == before


def test_export_flatten_is_self_contained_for_plain_diffusers(repos, store, tmp_path):
    store.ingest(repos / "remix", "remix")
    flat = tmp_path / "flat"
    store.export("remix", flat, flatten=True)
    assert (flat / "vae" / "diffusion_pytorch_model.safetensors").exists()
    index = json.loads((flat / "modular_model_index.json").read_text())
    assert {e[2]["pretrained_model_name_or_path"] for k, e in index.items()
            if isinstance(e, list) and e[0] is not None} == {str(flat.resolve())}
    ours = compstore.ModularPipeline.from_pretrained("remix", store=store)
    ours.load_components(torch_dtype=torch.float32)
    assert_same(ours, load_theirs(flat))


@pytest.mark.parametrize("field,value,message", [
    ("subfolder", 7, "subfolder must be a string"),
    ("revision", ["main"], "revision must be a string"),
    ("subfolder", "../../etc", "leaves the folder"),
    ("pretrained_model_name_or_path", {"a": 1}, "pretrained_model_name_or_path must be a string"),
    ("subfolder", "no-such-folder", "has no subfolder 'no-such-folder'"),
])
def test_bad_modular_entries_are_refused(repos, store, tmp_path, field, value, message):
    from compstore import InvalidInputError

    remix = tmp_path / "remix"
    shutil.copytree(repos / "remix", remix)
    index = json.loads((remix / "modular_model_index.json").read_text())
    index["vae"][2][field] = value
    (remix / "modular_model_index.json").write_text(json.dumps(index))
    before = store_state(store.home)
    with pytest.raises(InvalidInputError, match=message):
        store.ingest(remix, "remix")
    assert store_state(store.home) == before


def test_a_modular_pipelines_to_is_one_move_through_the_pool(repos, store, monkeypatch):
    """`pipe.to(device)` of a store-loaded modular pipeline goes through the device's
    pool as a classic pipeline's does: one report naming every model. The remix
    re-publishes base's VAE and text encoders, so its move after base's uploads
    only its own UNet; a budget of 0 still lets it reuse them."""
    from compstore.loader import residency
    from test_residency import CountingCopier

    pool = residency.ResidencyPool("meta", budget_bytes=0, copier=CountingCopier())
    monkeypatch.setattr(residency, "_POOLS", {"meta": pool})
    for name in ("base", "remix"):
        store.ingest(repos / name, name)

    def moved(name):
        pipe = compstore.ModularPipeline.from_pretrained(name, store=store)
        pipe.load_components(torch_dtype=torch.float32)
        pipe.to("meta")
        report = compstore.last_transfer()
        assert {c.component for c in report.components} == set(MODELS)
        return {c.component: c.bytes_from_store for c in report.components}

    first = moved("base")
    assert all(first[slot] > 0 for slot in MODELS)
    again = moved("remix")  # base's pipeline is gone: its tensors idle, over a budget of 0
    assert again["unet"] > 0 and again["vae"] == 0


def test_a_variant_the_pin_lacks_loads_it_with_a_warning_as_an_own_slot(repos, store, caplog):
    """A pinned model is picked by the rule the repo's own models are: a variant it
    lacks loads its default weights, with the warning (it was loaded silently)."""
    store.ingest(repos / "remix", "remix")
    ours = compstore.ModularPipeline.from_pretrained("remix", store=store)
    with caplog.at_level("WARNING", logger="compstore"):
        ours.load_components(torch_dtype=torch.float32, variant="fp16")
    warned = {r.getMessage().split(":")[0] for r in caplog.records if "no 'fp16' variant" in r.getMessage()}
    assert warned == set(MODELS)  # unet its own, the rest pinned
    theirs = load_theirs(repos / "remix")
    for slot in MODELS:
        a, b = getattr(ours, slot).state_dict(), getattr(theirs, slot).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), slot


def test_load_components_refuses_a_pipeline_quantization_config(repos, store):
    """`load_components` takes one model config per name (tests/test_quantized.py); a
    PipelineQuantizationConfig is not one: refused, nothing loaded."""
    from diffusers.quantizers import PipelineQuantizationConfig

    store.ingest(repos / "remix", "remix")
    pipe = compstore.ModularPipeline.from_pretrained("remix", store=store)
    config = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit",
                                        quant_kwargs={"load_in_4bit": True}, components_to_quantize=["unet"])
    before = store_state(store.home)
    with pytest.raises(compstore.CompstoreError, match="is not a quantization config"):
        pipe.load_components(torch_dtype=torch.float32, quantization_config=config)
    assert pipe.unet is None and store_state(store.home) == before  # nothing was loaded


def test_a_components_id_computed_without_writing_is_the_one_an_ingest_gives(repos, store, family):
    """`refuse_changed_folder_pins` compares pins with ids computed from a folder's
    bytes without ingesting it: they must be the ingest's own, for models in one file,
    in shards, in variants, and for tokenizers and schedulers."""
    from compstore.store.ingest import component_id_unwritten
    from compstore.store.scan import scan_folder

    for folder in (repos / "base", family["C"], family["D"]):
        scan = scan_folder(folder)
        snapshot = store.ingest(folder, folder.name).snapshot
        stored = {(c["slot"], c["variant"]): c["component_id"] for c in store.components_of(snapshot)}
        assert {(c.slot, c.variant): component_id_unwritten(scan, c) for c in scan.components} == stored


def test_a_damaged_pinned_component_heals_when_the_modular_repo_is_ingested_again(repos, store):
    """The modular repo's VAE is the pointed-to folder's: after verify names its damage,
    ingesting the modular repo again (which follows its pointers) heals it."""
    from compstore.store.catalog import blobs_of_snapshot
    from test_damage import blob_rows, flip, problem_blobs

    store.ingest(repos / "remix", "remix")
    vae = next(p["component_id"] for p in store.show("remix")["pins"] if p["slot"] == "vae")
    vae_blobs = {loc.xxh3 for loc in store.tensor_locations(vae)}
    reached = set(blobs_of_snapshot(store.db, store.resolve("remix")))
    blob = max((b for b in blob_rows(store) if b[0] in reached and store.db.execute(
        "SELECT xxh3 FROM blobs WHERE id = ?", [b[0]]).fetchone()[0] in vae_blobs), key=lambda b: b[3])
    damaged = flip(store, blob, 3)
    assert problem_blobs(store) == damaged
    store.ingest(repos / "remix", "remix")  # the heal is the pointed-to folder's ingest's
    assert store.verify().ok
    ours = compstore.ModularPipeline.from_pretrained("remix", store=store)
    ours.load_components(torch_dtype=torch.float32)
    assert_same(ours, load_theirs(repos / "remix"))
