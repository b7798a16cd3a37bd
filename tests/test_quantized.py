"""`quantization_config=`: the stored weights quantized as the library quantizes a
file's while it loads them (compstore/loader/quantized.py).

torchao's int8 weight-only quantization runs on CPU, so it stands for every backend
here: bitsandbytes goes through the same quantizer hooks, but diffusers' needs a GPU.
Each load is compared with the library's own `from_pretrained(..., quantization_config=)`
of the same folder: module and tensor types, dtypes, values, configs, images. A model
saved quantized is compared with the library's `from_pretrained` of its folder."""

import logging

import diffusers
import pytest
import torch
import transformers

import compstore
from compstore.loader.residency import STORE_KEYS

from torchao.quantization import Int8WeightOnlyConfig  # a test dependency: CI fails without it


def int8(library=diffusers):
    return library.TorchAoConfig(Int8WeightOnlyConfig())


def plain(t: torch.Tensor) -> torch.Tensor:
    return t.dequantize() if hasattr(t, "qdata") else t


def same_quantized(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert any(type(t).__name__ == "Int8Tensor" for t in a.values())  # quantized, as theirs is
    for name in a:
        assert (type(a[name]), a[name].dtype) == (type(b[name]), b[name].dtype), name
        assert torch.equal(plain(a[name]), plain(b[name])), name
    assert getattr(ours, "is_quantized", None) == getattr(theirs, "is_quantized", None)


def test_a_model_loads_quantized_as_its_library_quantizes_it(family_store, family):
    """diffusers' UNet and transformers' CLIP text encoder, from the store and by their
    own library from the folder: the same quantized modules. The store gains nothing,
    and each load is a model of its own (quantized tensors are never the store's)."""
    from conftest import store_state

    before = store_state(family_store.home)
    unet = compstore.UNet2DConditionModel.from_pretrained("A", subfolder="unet", quantization_config=int8(),
                                                          store=family_store)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(family["A"], subfolder="unet",
                                                            quantization_config=int8())
    same_quantized(unet, theirs)
    assert unet.hf_quantizer.quantization_config.quant_method == theirs.hf_quantizer.quantization_config.quant_method
    assert {**theirs.config, "_name_or_path": "A/unet"} == dict(unet.config)
    assert not getattr(unet, STORE_KEYS, None)  # no tensor of it is the store's
    x = torch.randn(1, 4, 32, 32, dtype=torch.bfloat16)
    text = torch.randn(1, 77, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(unet(x, 10, text).sample, theirs(x, 10, text).sample)

    te = compstore.load_component("A", "text_encoder", quantization_config=int8(transformers), store=family_store)
    theirs_te = transformers.CLIPTextModel.from_pretrained(family["A"] / "text_encoder",
                                                           quantization_config=int8(transformers))
    same_quantized(te, theirs_te)
    assert te.name_or_path == "A/text_encoder"

    again = compstore.UNet2DConditionModel.from_pretrained("A", subfolder="unet", quantization_config=int8(),
                                                           store=family_store)
    assert again.conv_in.weight.data_ptr() != unet.conv_in.weight.data_ptr()
    plain_unet = compstore.UNet2DConditionModel.from_pretrained("A", subfolder="unet", store=family_store)
    assert type(plain_unet.conv_in.weight) is torch.nn.Parameter  # the plain load is unchanged by it
    assert getattr(plain_unet, STORE_KEYS)
    assert store_state(family_store.home) == before


def test_a_pipeline_quantizes_the_slots_its_config_names_as_diffusers_does(family_store, family, caplog):
    """`PipelineQuantizationConfig(quant_mapping=...)`: the UNet and the text encoder
    quantized, the VAE bound to the store as ever; the same image as diffusers'; a slot
    the pipeline lacks warned of as diffusers warns."""
    mapping = {"unet": int8(), "text_encoder": int8(transformers), "transformer": int8()}
    config = diffusers.PipelineQuantizationConfig(quant_mapping=mapping)
    with caplog.at_level(logging.WARNING):
        pipe = compstore.DiffusionPipeline.from_pretrained("A", quantization_config=config, dtype=torch.bfloat16,
                                                           store=family_store)
    assert "{'transformer'} will be ignored" in caplog.text
    theirs = diffusers.DiffusionPipeline.from_pretrained(
        family["A"], dtype=torch.bfloat16,
        quantization_config=diffusers.PipelineQuantizationConfig(quant_mapping=mapping))
    assert pipe.quantization_config is config
    same_quantized(pipe.unet, theirs.unet)
    same_quantized(pipe.text_encoder, theirs.text_encoder)
    assert getattr(pipe.vae, STORE_KEYS)  # not named: loaded from the store, shared as any
    assert all(type(t) is torch.nn.Parameter for t in pipe.vae.parameters())

    def image(p):
        return p("low cat", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    assert (image(pipe) == image(theirs)).all()


def test_a_quantized_model_moves_with_its_own_to_and_no_pool_entry(family_store, family):
    """A pool moves a quantized model (one compstore quantized, or one passed in) with
    the model's own `.to()`: a copy of an Int8Tensor's bytes is not the tensor. The
    others go through the pool as ever. The target is `meta`: the pool's logic
    without a GPU (tests/test_residency.py)."""
    from test_residency import CountingCopier

    config = diffusers.PipelineQuantizationConfig(quant_mapping={"unet": int8()})
    pipe = compstore.DiffusionPipeline.from_pretrained("A", quantization_config=config, dtype=torch.bfloat16,
                                                       store=family_store)
    passed = diffusers.UNet2DConditionModel.from_pretrained(family["B"], subfolder="unet",
                                                            quantization_config=int8())
    other = compstore.DiffusionPipeline.from_pretrained("B", unet=passed, dtype=torch.bfloat16,
                                                        store=family_store)
    copier = CountingCopier()
    pool = compstore.ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    uploaded = 0
    for p in (pipe, other):
        report = compstore.to_device(p, "meta", pool=pool)
        moved = {c.component: c for c in report.components}
        assert moved["unet"].bytes_from_store > 0 and moved["unet"].bytes_reused == 0
        assert {t.device.type for t in p.unet.state_dict().values()} == {"meta"}
        assert type(p.unet.conv_in.weight) is torch.nn.Parameter  # torchao quantizes linear layers only
        assert type(p.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight).__name__ == "Int8Tensor"
        assert not pool._uses.get(p.unet)  # the pool holds nothing of it
        assert moved["vae"].bytes_from_store + moved["vae"].bytes_reused > 0
        uploaded += sum(c.bytes_from_store for c in report.components if c.component != "unet")
    assert copier.bytes == uploaded  # the UNets' bytes never went through the pool's copier


def test_quantize_after_the_load_leaves_the_pipelines_sharing_its_weights_as_stored(family_store, family):
    """torchao's recipe, `quantize_(pipe.unet, ...)` on a pipeline already loaded: it
    gives the linear layers new, quantized weights. Through a pool, where another
    pipeline shares the UNet's tensors, that one keeps the store's weights and images,
    the quantized one gives diffusers' quantized images, and a later load finds the
    whole UNet still resident."""
    import numpy as np
    from test_loader import image
    from torchao.quantization import quantize_

    pool = compstore.ResidencyPool("cpu", budget_bytes=1 << 40)
    a = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    other = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    quantize_(a.unet, Int8WeightOnlyConfig())
    compstore.to_device(a, "cpu", pool=pool)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(family["A"])
    stored = image(reference)
    quantize_(reference.unet, Int8WeightOnlyConfig())
    assert not np.array_equal(image(reference), stored)  # the quantization shows in the image
    np.testing.assert_array_equal(image(a), image(reference))
    np.testing.assert_array_equal(image(other), stored)
    del a
    later = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, pool=pool)
    assert pool.last_report.bytes_uploaded == 0
    np.testing.assert_array_equal(image(later), stored)


def test_a_quantization_config_of_the_wrong_kind_is_refused_before_anything_is_stored(store, family):
    """A pipeline's must be a PipelineQuantizationConfig (diffusers' ValueError, word for
    word), and raised before the folder is ingested; a model's must be a config."""
    from conftest import store_state

    before = store_state(store.home)
    with pytest.raises(ValueError, match="must be an instance of `PipelineQuantizationConfig`"):
        compstore.DiffusionPipeline.from_pretrained(str(family["A"]), quantization_config=int8(), store=store)
    with pytest.raises(ValueError, match="must be an instance of `PipelineQuantizationConfig`"):
        diffusers.DiffusionPipeline.from_pretrained(family["A"], quantization_config=int8())
    assert store_state(store.home) == before
    store.ingest(family["A"], "A")
    with pytest.raises(compstore.CompstoreError, match="'int8' is not a quantization config"):
        compstore.load_component("A", "unet", quantization_config="int8", store=store)


def test_a_modular_pipelines_load_components_quantizes_the_models_it_names(store, tmp_path):
    """`load_components(quantization_config={"unet": ...})`, one config per name as
    diffusers' modular pipelines take it: that model quantized as diffusers quantizes it."""
    from compstore.loader.synthetic import tiny_sdxl_pipeline
    from test_modular import image, save_modular

    save_modular(tiny_sdxl_pipeline(seed=0), tmp_path / "base")
    ours = compstore.ModularPipeline.from_pretrained(str(tmp_path / "base"), store=store)
    ours.load_components(torch_dtype=torch.bfloat16, quantization_config={"unet": int8()})
    theirs = diffusers.ModularPipeline.from_pretrained(str(tmp_path / "base"))
    theirs.load_components(torch_dtype=torch.bfloat16, quantization_config={"unet": int8()})
    same_quantized(ours.unet, theirs.unet)
    assert getattr(ours.vae, STORE_KEYS)
    assert (image(ours) == image(theirs)).all()


def same_8_bit(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Two bitsandbytes 8-bit CLIP text encoders: the same Int8Params, bytes and outputs."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert "Int8Params" in {type(p).__name__ for p in ours.parameters()}
    for name in a:
        assert (type(a[name]), a[name].dtype) == (type(b[name]), b[name].dtype) and torch.equal(a[name], b[name])
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(ours(ids).last_hidden_state, theirs(ids).last_hidden_state)


def test_a_text_encoder_loads_8_bit_with_bitsandbytes_as_transformers_loads_it(family_store, family):
    """bitsandbytes, the other common backend, through transformers (whose 8-bit path
    runs on CPU; diffusers' needs a GPU: tests/test_cuda.py): the same Int8Params, the
    same outputs. Run where bitsandbytes is installed (`pip install bitsandbytes`;
    scripts/gpu-wheels.sh carries it to the GPU machine): it is not a test dependency,
    because diffusers imports it at every start once installed (0.65 s here)."""
    pytest.importorskip("bitsandbytes")

    def config():
        return transformers.BitsAndBytesConfig(load_in_8bit=True)

    ours = compstore.CLIPTextModel.from_pretrained("A", subfolder="text_encoder", quantization_config=config(),
                                                   store=family_store)
    theirs = transformers.CLIPTextModel.from_pretrained(family["A"] / "text_encoder", quantization_config=config())
    same_8_bit(ours, theirs)


@pytest.fixture(scope="module")
def saved_int8(family, tmp_path_factory):
    """Family member A with its UNet and text encoder saved quantized by their own
    libraries (torchao int8, safetensors: the tensor subclasses flattened, described in
    the files' metadata), as a quantized repo publishes them."""
    import shutil

    folder = tmp_path_factory.mktemp("saved") / "A-int8"
    shutil.copytree(family["A"], folder)
    unet = diffusers.UNet2DConditionModel.from_pretrained(family["A"], subfolder="unet", quantization_config=int8(),
                                                          dtype=torch.bfloat16)
    te = transformers.CLIPTextModel.from_pretrained(family["A"] / "text_encoder",
                                                    quantization_config=int8(transformers), dtype=torch.bfloat16)
    for slot, model in (("unet", unet), ("text_encoder", te)):
        shutil.rmtree(folder / slot)
        model.save_pretrained(folder / slot, safe_serialization=True)
    return folder


def test_a_model_saved_quantized_loads_as_its_library_loads_it(store, saved_int8):
    """A pipeline folder whose UNet and text encoder were saved quantized: the same
    quantized modules and image as diffusers' load of the folder, the files stored as
    published, and each load a model of its own, which a pool moves whole."""
    from click.testing import CliRunner
    from conftest import recorded_sha256, tree_sha256
    from test_loader import image
    from test_residency import CountingCopier

    from compstore.cli import cli

    pipe = compstore.DiffusionPipeline.from_pretrained(str(saved_int8), dtype=torch.bfloat16, store=store)
    theirs = diffusers.DiffusionPipeline.from_pretrained(saved_int8, dtype=torch.bfloat16)
    same_quantized(pipe.unet, theirs.unet)
    same_quantized(pipe.text_encoder, theirs.text_encoder)
    assert pipe.unet.hf_quantizer.pre_quantized and pipe.text_encoder.hf_quantizer.pre_quantized
    assert {**theirs.unet.config, "_name_or_path": pipe.unet.config._name_or_path} == dict(pipe.unet.config)
    assert (image(pipe) == image(theirs)).all()
    assert recorded_sha256(store, str(saved_int8.resolve())) == tree_sha256(saved_int8)
    shown = {c["slot"]: c["quant_method"] for c in store.show(str(saved_int8.resolve()))["components"]}
    assert shown == {"unet": "torchao", "text_encoder": "torchao", "vae": None, "scheduler": None,
                     "tokenizer": None}
    text = CliRunner().invoke(cli, ["--store", str(store.home), "show", str(saved_int8.resolve())]).output
    assert "UNet2DConditionModel (torchao)" in text and "AutoencoderKL " in text

    unet = compstore.load_component(str(saved_int8), "unet", store=store)
    same_quantized(unet, theirs.unet)
    assert not getattr(unet, STORE_KEYS, None)
    assert unet.conv_in.weight.data_ptr() != pipe.unet.conv_in.weight.data_ptr()

    copier = CountingCopier()
    pool = compstore.ResidencyPool("meta", budget_bytes=1 << 40, copier=copier)
    moved = {c.component: c for c in compstore.to_device(pipe, "meta", pool=pool).components}
    assert {t.device.type for t in pipe.unet.state_dict().values()} == {"meta"}
    assert moved["unet"].bytes_from_store > 0 and not pool._uses.get(pipe.unet)  # moved whole, unpooled
    assert copier.bytes == moved["vae"].bytes_from_store  # only the VAE went through the pool's copier


def test_a_model_saved_quantized_whose_pieces_are_incomplete_is_refused(store, saved_int8, tmp_path):
    """A saved-quantized UNet file missing one piece of a flattened torchao tensor: a
    one-line error naming it, before the folder is ingested; stored under a ref (an
    ingest takes any well-formed safetensors), the same error at the build."""
    import shutil

    from conftest import store_state
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = tmp_path / "cut"
    shutil.copytree(saved_int8, folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cut = sorted(k for k in tensors if k.endswith("_weight_scale"))[0]
    del tensors[cut]
    save_file(tensors, path, metadata=metadata)
    message = r"unet: stored pieces of torchao tensors with no whole made of them \(.*_weight_qdata"
    before = store_state(store.home)
    with pytest.raises(compstore.CompstoreError, match="cut/" + message):
        compstore.load_component(str(folder), "unet", store=store)
    with pytest.raises(compstore.CompstoreError, match="cut/" + message):
        compstore.DiffusionPipeline.from_pretrained(str(folder), store=store)
    assert store_state(store.home) == before
    store.ingest(folder, "cut")
    with pytest.raises(compstore.CompstoreError, match="cut/" + message):
        compstore.load_component("cut", "unet", store=store)


def test_a_text_encoder_saved_8_bit_with_bitsandbytes_loads_as_transformers_loads_it(store, family, tmp_path):
    """A CLIP text encoder saved 8-bit by bitsandbytes (int8 weights and their SCB
    scales, plain tensors of the file): from the store, the same Int8Params and outputs
    as transformers' load of the folder. Run where bitsandbytes is installed (see the
    test above)."""
    pytest.importorskip("bitsandbytes")

    saved = tmp_path / "te-8bit"
    transformers.CLIPTextModel.from_pretrained(
        family["A"] / "text_encoder",
        quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True)).save_pretrained(saved)
    theirs = transformers.CLIPTextModel.from_pretrained(saved)
    ours = compstore.CLIPTextModel.from_pretrained(str(saved), store=store)
    assert ours.hf_quantizer.pre_quantized
    same_8_bit(ours, theirs)


def test_a_quantized_repo_pulled_after_its_base_fetches_only_its_quantized_models(store, family, saved_int8,
                                                                                 monkeypatch):
    """org/A-int8 re-publishes org/A with its UNet and text encoder saved quantized: its
    pull after A's downloads those two folders' files only, and its load is diffusers'."""
    from conftest import use_hub
    from hub_emulator import HubEmulator
    from test_hub import files_of

    hub = HubEmulator()
    try:
        hub.add_repo("org/A", family["A"])
        hub.add_repo("org/A-int8", saved_int8)
        use_hub(monkeypatch, hub)
        store.pull("org/A")
        hub.reset_counts()
        pipe = compstore.DiffusionPipeline.from_pretrained("org/A-int8", dtype=torch.bfloat16, store=store)
        base = set(files_of(family["A"]).values())
        assert hub.served_bytes == sum(len(b) for b in files_of(saved_int8).values() if b not in base) > 0
    finally:
        hub.close()
    theirs = diffusers.DiffusionPipeline.from_pretrained(saved_int8, dtype=torch.bfloat16)
    same_quantized(pipe.unet, theirs.unet)
    same_quantized(pipe.text_encoder, theirs.text_encoder)


def test_a_config_given_for_a_model_saved_quantized_is_set_aside_as_diffusers_sets_it_aside(store, saved_int8):
    """A quantization config named for a model saved quantized: diffusers loads the
    model as saved and warns of the config; so does compstore, from a folder and from
    a ref, and it checks only the saved config (a GGUF config, which compstore refuses
    for a model saved unquantized, is set aside here as diffusers sets it aside)."""
    from diffusers import GGUFQuantizationConfig

    def gguf():
        return GGUFQuantizationConfig(compute_dtype=torch.bfloat16)

    config = diffusers.PipelineQuantizationConfig(quant_mapping={"unet": gguf()})
    with pytest.warns(UserWarning, match="already has a `quantization_config` attribute"):
        theirs = diffusers.DiffusionPipeline.from_pretrained(saved_int8, dtype=torch.bfloat16,
                                                             quantization_config=config)
    for name in (str(saved_int8), "int8"):  # a folder, then a ref
        with pytest.warns(UserWarning, match="already has a `quantization_config` attribute"):
            ours = compstore.DiffusionPipeline.from_pretrained(name, dtype=torch.bfloat16,
                                                               quantization_config=config, store=store)
        same_quantized(ours.unet, theirs.unet)
        store.ingest(saved_int8, "int8")
    for name in (str(saved_int8), "int8"):
        unet = compstore.load_component(name, "unet", quantization_config=gguf(), store=store)
        same_quantized(unet, theirs.unet)
