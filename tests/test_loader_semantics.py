"""Tied weights, fp32 modules, missing and unexpected keys: as transformers/diffusers do."""

import json
import logging
import struct

import diffusers
import numpy as np
import pytest
import torch
from transformers import T5Config, T5EncoderModel

import compstore
from conftest import same_state


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny T5 encoder: `encoder.embed_tokens` is tied to `shared`, `wo` stays fp32."""
    folder = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                            num_heads=4)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_tied_weights_and_fp32_modules_like_transformers(t5_folder, store, dtype):
    kw = {} if dtype is None else {"dtype": dtype}
    ours = compstore.load_component(str(t5_folder), store=store, **kw)
    theirs = T5EncoderModel.from_pretrained(t5_folder, **kw)
    same_state(ours, theirs)
    assert ours.encoder.embed_tokens.weight.data_ptr() == ours.shared.weight.data_ptr()
    wo = ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    assert wo == theirs.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    ids = torch.tensor([[5, 6, 7, 1]])
    assert torch.equal(ours(ids).last_hidden_state, theirs(ids).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_diffusers_fp32_modules_stay_fp32_in_any_dtype_like_diffusers(store, tmp_path, dtype):
    """diffusers 0.42 keeps a model's `_keep_in_fp32_modules` in fp32 for every dtype,
    bf16 included (Wan's `scale_shift_table`, Flux3's `norm_q`), not for fp16 only."""
    torch.manual_seed(0)
    diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1,
        rope_max_seq_len=32).save_pretrained(tmp_path / "transformer")
    ours = compstore.load_component(str(tmp_path / "transformer"), store=store, dtype=dtype)
    theirs = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "transformer", dtype=dtype)
    same_state(ours, theirs)
    assert ours.scale_shift_table.dtype == torch.float32
    assert ours.proj_out.weight.dtype == dtype


def edit_safetensors(path, drop=None, add=None):
    """Rewrite a safetensors file without tensor `drop`, or with an extra tensor `add`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    meta = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    if drop:
        tensors.pop(drop)
    if add:
        tensors[add] = torch.zeros(3)
    save_file(tensors, path, metadata=meta.get("__metadata__"))


def test_unexpected_keys_are_ignored_with_a_warning(t5_folder, store, tmp_path, caplog):
    import shutil

    folder = tmp_path / "t5x"
    shutil.copytree(t5_folder, folder)
    edit_safetensors(folder / "model.safetensors", add="extra.weight")
    with caplog.at_level(logging.WARNING, logger="compstore"):
        ours = compstore.load_component(str(folder), store=store)
    assert "extra.weight" in caplog.text
    same_state(ours, T5EncoderModel.from_pretrained(folder))


def test_missing_keys_transformers_initialises_and_warns(t5_folder, store, tmp_path, caplog):
    import shutil

    folder = tmp_path / "t5m"
    shutil.copytree(t5_folder, folder)
    missing = "encoder.final_layer_norm.weight"
    edit_safetensors(folder / "model.safetensors", drop=missing)
    with caplog.at_level(logging.WARNING, logger="compstore"):
        ours = compstore.load_component(str(folder), store=store)
    assert "newly initialized" in caplog.text and missing in caplog.text
    theirs = T5EncoderModel.from_pretrained(folder)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert torch.equal(ours.state_dict()[missing], theirs.state_dict()[missing])  # ones, as T5 inits


def test_missing_keys_diffusers_initialises_and_warns(family, store, tmp_path, caplog):
    import shutil

    folder = tmp_path / "vae"
    shutil.copytree(family["A"] / "vae", folder)
    missing = "decoder.conv_out.bias"
    edit_safetensors(folder / "diffusion_pytorch_model.safetensors", drop=missing)
    theirs = diffusers.AutoencoderKL.from_pretrained(folder)  # diffusers 0.42 warns, goes on
    with caplog.at_level(logging.WARNING, logger="compstore"):
        ours = compstore.load_component(str(folder), store=store)
    assert "newly initialized" in caplog.text and missing in caplog.text
    sa, sb = ours.state_dict(), theirs.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k != missing)
    assert sa[missing].shape == sb[missing].shape and sa[missing].device.type == "cpu"


def test_binding_assigns_as_load_state_dict_and_defers_to_it_for_custom_loading():
    """`_bind` assigns store tensors directly when every module loads the default way,
    with the result `load_state_dict(assign=True)` gives; a module with a load hook
    (or its own `_load_from_state_dict`) goes through `load_state_dict` itself."""
    from compstore.loader.component import _bind

    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        m[2].weight.requires_grad_(False)
        return m

    sd = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in model().state_dict().items()}
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    plain_sd = {k: torch.randn_like(v) for k, v in plain.state_dict().items()}
    want = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    for m in (plain, want):
        m[2].weight.requires_grad_(False)  # kept, as load_state_dict keeps it
    want.load_state_dict(dict(plain_sd), assign=True)
    _bind(plain, dict(plain_sd), torch.nn.Sequential, "plain")  # the direct path
    for (name, a), (_, b) in zip(plain.named_parameters(), want.named_parameters()):
        assert a is plain_sd[name] or a.data_ptr() == plain_sd[name].data_ptr(), name
        assert type(a) is type(b) and a.requires_grad == b.requires_grad and torch.equal(a, b), name

    seen = []
    hooked = model()  # BatchNorm1d has its own _load_from_state_dict; add a hook too
    hooked[0].register_load_state_dict_pre_hook(lambda module, sd, prefix, *rest: seen.append(prefix))
    _bind(hooked, dict(sd), torch.nn.Sequential, "hooked")
    assert seen == ["0."]  # load_state_dict ran, with its hooks
    assert not hooked[2].weight.requires_grad
    for name, t in hooked.state_dict().items():
        assert torch.equal(t, sd[name]), name


def test_binding_takes_an_old_checkpoints_one_element_scalar_as_load_state_dict_does():
    from compstore.loader.component import _bind

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1.0))

    mine, theirs = Scaled(), Scaled()
    theirs.load_state_dict({"scale": torch.tensor([3.0])}, assign=True)
    _bind(mine, {"scale": torch.tensor([3.0])}, Scaled, "scaled")
    assert mine.scale.shape == theirs.scale.shape == () and mine.scale.item() == 3.0


def test_an_old_checkpoints_one_element_scalars_load_as_scalars_built_and_cloned(store, tmp_path):
    """GLIGEN's gates are 0-dim parameters; an old checkpoint stores them as (1,). The
    first load binds them as load_state_dict would, and so must every later one, which
    clones the template (the store view is (1,), the template's tensor is ())."""
    from safetensors.torch import load_file, save_file

    from compstore.loader import warm

    warm.clear_caches()
    folder = tmp_path / "gligen"
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=8,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        attention_type="gated").save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    gates = [name for name, t in tensors.items() if t.dim() == 0]
    assert gates
    save_file({name: t.reshape(1) + 0.5 if name in gates else t for name, t in tensors.items()}, weights)
    for load in ("built", "cloned"):
        unet = compstore.load_component(str(folder), store=store)
        for name in gates:
            t = unet.get_parameter(name)
            assert t.shape == () and t.item() == 0.5, (load, name)
    warm.clear_caches()


def test_tied_names_the_checkpoint_both_has_are_tied_as_transformers_decides(t5_folder, store, tmp_path,
                                                                           caplog):
    """Both names of a tied pair stored: transformers compares the bytes (5.23 ties
    equal ones, leaves different ones untied with a warning), so those models are
    bound for real, not from meta stand-ins, and get no template; the library's
    warnings come once."""
    import shutil

    from safetensors.torch import load_file, save_file

    from compstore.loader import warm

    tensors = load_file(t5_folder / "model.safetensors")
    for name, embed in (("differ", tensors["shared.weight"] + 1), ("equal", tensors["shared.weight"])):
        warm.clear_caches()
        folder = tmp_path / name
        shutil.copytree(t5_folder, folder)
        save_file(dict(tensors, **{"encoder.embed_tokens.weight": embed.clone(), "extra.weight": torch.zeros(3)}),
                  folder / "model.safetensors", metadata={"format": "pt"})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ours = compstore.load_component(str(folder), store=store)
        assert caplog.text.count("extra.weight") == 1, name  # compstore's unexpected-keys warning
        assert not warm._TEMPLATES
        theirs = T5EncoderModel.from_pretrained(folder)
        same_state(ours, theirs)
        tied = theirs.encoder.embed_tokens.weight is theirs.shared.weight
        assert (ours.encoder.embed_tokens.weight is ours.shared.weight) == tied
        assert torch.equal(ours.encoder.embed_tokens.weight, embed)


def test_a_tied_pair_stored_under_its_target_name_only_ties_to_the_stored_bytes(t5_folder, store, tmp_path):
    """A checkpoint written by another tool may keep the tie's target name and drop
    the source: transformers ties the pair to the stored tensor, never to a newly
    initialised one."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "target-only"
    shutil.copytree(t5_folder, folder)
    tensors = load_file(t5_folder / "model.safetensors")
    embed = tensors.pop("shared.weight")
    save_file(dict(tensors, **{"encoder.embed_tokens.weight": embed}), folder / "model.safetensors",
              metadata={"format": "pt"})
    theirs = T5EncoderModel.from_pretrained(folder)
    for load in ("built", "cloned"):
        ours = compstore.load_component(str(folder), store=store)
        same_state(ours, theirs)
        assert torch.equal(ours.shared.weight, embed) and ours.shared.weight is ours.encoder.embed_tokens.weight


def test_a_variant_no_model_has_is_refused_as_diffusers_refuses_it(family_store, family):
    """diffusers raises a ValueError rather than loading the default weights; so does
    compstore (`VariantNotFoundError` is a ValueError), and one model without the
    variant is refused as transformers/diffusers refuse it (an OSError there)."""
    with pytest.raises(ValueError, match="no such modeling files"):
        diffusers.DiffusionPipeline.from_pretrained(family["A"], variant="fp16")
    with pytest.raises(compstore.VariantNotFoundError,
                       match=r"A has no 'fp16' weights \(its weights come as: default\)"):
        compstore.DiffusionPipeline.from_pretrained("A", store=family_store, variant="fp16")
    with pytest.raises(OSError):
        diffusers.UNet2DConditionModel.from_pretrained(family["A"] / "unet", variant="fp16")
    with pytest.raises(compstore.VariantNotFoundError, match="slot 'unet' has no 'fp16' weights"):
        compstore.load_component("A", "unet", store=family_store, variant="fp16")


def test_a_variant_some_models_lack_loads_their_default_weights_as_diffusers(store, family, tmp_path,
                                                                            caplog):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(family["D"], mixed)
    (mixed / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    theirs = diffusers.DiffusionPipeline.from_pretrained(mixed, variant="fp16")
    with caplog.at_level(logging.WARNING, logger="compstore"):
        ours = compstore.DiffusionPipeline.from_pretrained(str(mixed), store=store, variant="fp16")
    assert "vae: no 'fp16' variant stored, loading the default weights" in caplog.text
    for slot in ("unet", "vae", "text_encoder"):
        same_state(getattr(ours, slot), getattr(theirs, slot))
    assert ours.text_encoder.dtype == torch.float16 and ours.vae.dtype == torch.float32


def test_a_pipeline_as_published_loads_as_diffusers(store, tmp_path, caplog):
    """Names the libraries rename on load bind as they bind them: in a first build, a
    second load of it (the template) and another pipeline of the same architecture
    (a sibling); nothing is left newly initialised, and the images are diffusers'."""
    from compstore.loader.synthetic import tiny_sd_pipeline
    from conftest import publish_as_the_hub_has_it
    from test_loader import image

    from transformers import CLIPTextModel

    for seed in (0, 100):
        publish_as_the_hub_has_it(tiny_sd_pipeline(seed), tmp_path / f"sd{seed}")
    _, info = CLIPTextModel.from_pretrained(tmp_path / "sd0" / "text_encoder", output_loading_info=True)
    for seed in (0, 0, 100):
        theirs = diffusers.DiffusionPipeline.from_pretrained(tmp_path / f"sd{seed}")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ours = compstore.DiffusionPipeline.from_pretrained(str(tmp_path / f"sd{seed}"), store=store)
        assert "newly initialized" not in caplog.text
        # The old position_ids buffer: transformers 5.17 and 5.23 ignore it, 5.0 reports it; as it does.
        assert ("were not used" in caplog.text) <= bool(info["unexpected_keys"])
        for slot in ("unet", "vae", "text_encoder"):
            same_state(getattr(ours, slot), getattr(theirs, slot))
        assert np.array_equal(image(ours), image(theirs))
    te = compstore.load_component(str(tmp_path / "sd100"), "text_encoder", store=store)
    same_state(te, CLIPTextModel.from_pretrained(tmp_path / "sd100" / "text_encoder"))


def test_a_checkpoint_transformers_must_convert_is_refused_clearly(store, tmp_path):
    """Mixtral's per-expert weights are fused into new tensors on load: compstore does
    not make tensors, and says so rather than binding nothing (random experts)."""
    from transformers import MixtralConfig, MixtralModel

    MixtralModel(MixtralConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                               num_experts_per_tok=1)).save_pretrained(tmp_path / "moe")
    with pytest.raises(compstore.CompstoreError, match=r"transformers converts the stored tensor "
                       r"'layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight'.*own from_pretrained"):
        compstore.load_component(str(tmp_path / "moe"), store=store)


def test_transformers_internals_of_another_release_are_a_clear_error(store, tmp_path, monkeypatch):
    """compstore renames through transformers' `rename_source_key`; where another
    release's differs, a checkpoint that needs renaming is refused with the version
    named, not bound to nothing."""
    import transformers.core_model_loading as loading
    from compstore.loader.synthetic import tiny_sd_pipeline
    from conftest import publish_as_the_hub_has_it

    publish_as_the_hub_has_it(tiny_sd_pipeline(0), tmp_path / "sd")

    def other_release(source_key, weight_renamings):  # not the signature compstore calls
        return source_key, None

    monkeypatch.setattr(loading, "rename_source_key", other_release)
    compstore.loader.warm.clear_caches()  # a template from an earlier test would skip the renaming
    with pytest.raises(compstore.CompstoreError, match=r"CLIPTextModel: its stored names need "
                       r"transformers' renaming on load, and transformers 5\.\d+\.\d+'s internals"):
        compstore.load_component(str(tmp_path / "sd"), "text_encoder", store=store)
    compstore.load_component(str(tmp_path / "sd"), "unet", store=store)  # its names need nothing


def qwen2_5_vl():
    """Qwen-Image's text encoder, tiny; published (Qwen2.5-VL-7B) as `model.layers...`, `visual...`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                  fullatt_block_indexes=[1])
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    return model, [("model.language_model.", "model."), ("model.visual.", "visual.")]


def mistral3():
    """FLUX.2's text encoder, tiny; published (Mistral Small 3.1) as `language_model.model...`."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=128, head_dim=8)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, head_dim=8, image_size=32, patch_size=8)
    model = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision))
    return model, [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                   ("model.vision_tower.", "vision_tower."),
                   ("model.multi_modal_projector.", "multi_modal_projector.")]


@pytest.mark.parametrize("build", [qwen2_5_vl, mistral3])
def test_recent_text_encoders_as_published_bind_every_weight_as_transformers(store, tmp_path, build):
    """Vision-language text encoders of recent pipelines are published in names that
    transformers 5 loads under others (`model.layers` -> `model.language_model.layers`):
    every weight binds, as transformers binds it, none is left random."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model, published_as = build()
    folder = tmp_path / "text_encoder"
    model.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    published = {}
    for name, tensor in model.state_dict().items():
        now, then = next(((now, then) for now, then in published_as if name.startswith(now)), ("", ""))
        published[then + name[len(now):]] = tensor.clone()
    assert published.keys() != model.state_dict().keys()  # the names differ from the model's
    save_file(published, folder / "model.safetensors", metadata={"format": "pt"})
    ours = compstore.load_component(str(folder), store=store)
    same_state(ours, type(model).from_pretrained(folder))
    same_state(ours, model)


def test_auto_model_loads_the_class_the_index_or_config_names_as_diffusers_does(family_store, family):
    """`compstore.AutoModel.from_pretrained(ref, subfolder=...)`, diffusers' AutoModel as
    model cards call it: the class model_index.json names for the slot (a transformers
    one too), or, for a model folder alone, the class its config names. Before
    2026-12-07 `compstore.AutoModel` was an AttributeError."""
    folder = str(family["A"])
    for slot in ("unet", "vae", "text_encoder"):
        ours = compstore.AutoModel.from_pretrained(folder, subfolder=slot, store=family_store, dtype=torch.float16)
        theirs = diffusers.AutoModel.from_pretrained(folder, subfolder=slot, dtype=torch.float16)
        assert type(ours) is type(theirs)
        same_state(ours, theirs)
        assert ours._diffusers_load_id == theirs._diffusers_load_id == f"{folder}|{slot}|null|null"
    alone = compstore.AutoModel.from_pretrained(folder + "/vae", store=family_store)
    assert type(alone) is diffusers.AutoencoderKL
    same_state(alone, diffusers.AutoModel.from_pretrained(folder + "/vae"))
    assert compstore.AutoModel.load_config == diffusers.AutoModel.load_config  # the rest is diffusers'
