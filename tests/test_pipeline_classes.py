"""Pipelines beyond SD/SDXL/Flux load from the store as diffusers loads them.

Each pipeline is built tiny from its constructor (configs after diffusers' own
fast tests), saved with save_pretrained, then loaded by diffusers and by compstore
from the same folder in fp32, fp16 and bf16: same classes, configs, tensors (names,
dtypes, bytes), buffers, tokenizers and schedulers. What each one adds: SD3 three
text encoders with T5; Wan a UMT5 encoder, a video VAE and `_keep_in_fp32_modules`;
LTX and PixArt-Sigma T5 with video / DiT transformers; Kandinsky 2.2 a `movq` and
no text encoder; the SDXL refiner a `null` text encoder slot; ControlNet and
AnimateDiff an extra model slot (`controlnet`, `motion_adapter`); the upscaler a
second scheduler (`low_res_scheduler`)."""

import diffusers
import pytest
import torch
import transformers

import compstore
from compstore.loader import synthetic as syn


def clip(tok, projection=False):
    config = transformers.CLIPTextConfig(**syn.TINY_CLIP, hidden_act="gelu", projection_dim=32)
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(config)


def umt5(tok):
    return transformers.UMT5EncoderModel(transformers.UMT5Config(**syn.TINY_T5))


def t5(tok):
    return transformers.T5EncoderModel(transformers.T5Config(**syn.TINY_T5))


def sd3(tok):
    return diffusers.StableDiffusion3Pipeline(
        transformer=diffusers.SD3Transformer2DModel(
            sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
            pooled_projection_dim=64, out_channels=4),
        text_encoder=clip(tok, True), text_encoder_2=clip(tok, True), text_encoder_3=t5(tok),
        tokenizer=tok["clip"], tokenizer_2=tok["clip"], tokenizer_3=tok["t5"],
        vae=diffusers.AutoencoderKL(**syn.TINY_FLUX_VAE), scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def wan(tok):
    return diffusers.WanPipeline(
        vae=diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                       temperal_downsample=[False, True, True]),
        text_encoder=umt5(tok), tokenizer=tok["t5"],
        transformer=diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
            out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
        transformer_2=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0))


def ltx(tok):
    return diffusers.LTXPipeline(
        transformer=diffusers.LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
            attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=32),
        vae=diffusers.AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8, 8, 8, 8), spatio_temporal_scaling=(True, True, False, False),
            layers_per_block=(1, 1, 1, 1, 1), patch_size=1, patch_size_t=1, encoder_causal=True,
            decoder_causal=False,
            # the decoder has its own sizes, full-size by default (a 900 MB VAE)
            decoder_block_out_channels=(8, 8, 8, 8), decoder_layers_per_block=(1, 1, 1, 1, 1),
            decoder_spatio_temporal_scaling=(True, True, False, False)),
        text_encoder=t5(tok), tokenizer=tok["t5"], scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def pixart_sigma(tok):
    return diffusers.PixArtSigmaPipeline(
        transformer=diffusers.PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8),
        vae=diffusers.AutoencoderKL(**syn.TINY_VAE), text_encoder=t5(tok), tokenizer=tok["t5"],
        scheduler=diffusers.DDIMScheduler())


def kandinsky22(tok):
    return diffusers.KandinskyV22Pipeline(
        unet=diffusers.UNet2DConditionModel(
            in_channels=4, out_channels=8, addition_embed_type="image", block_out_channels=(32, 64),
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", layers_per_block=1, encoder_hid_dim=32,
            encoder_hid_dim_type="image_proj", cross_attention_dim=64, attention_head_dim=4,
            resnet_time_scale_shift="scale_shift"),
        movq=diffusers.VQModel(
            block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
            up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
            layers_per_block=1, norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12, vq_embed_dim=4),
        scheduler=diffusers.DDIMScheduler())


def sdxl_refiner(tok):
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=diffusers.AutoencoderKL(**syn.TINY_VAE), text_encoder=None, tokenizer=None,
        text_encoder_2=clip(tok, True), tokenizer_2=tok["clip"],
        unet=diffusers.UNet2DConditionModel(**syn.TINY_SDXL_UNET), scheduler=diffusers.EulerDiscreteScheduler(),
        requires_aesthetics_score=True)


def sd_controlnet(tok):
    return diffusers.StableDiffusionControlNetPipeline(
        vae=diffusers.AutoencoderKL(**syn.TINY_VAE), text_encoder=clip(tok), tokenizer=tok["clip"],
        unet=diffusers.UNet2DConditionModel(**syn.TINY_UNET),
        controlnet=diffusers.ControlNetModel(
            block_out_channels=(32, 64), layers_per_block=2, in_channels=4, cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            conditioning_embedding_out_channels=(16, 32)),
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def sd_upscale(tok):
    return diffusers.StableDiffusionUpscalePipeline(
        vae=diffusers.AutoencoderKL(**syn.TINY_VAE), text_encoder=clip(tok), tokenizer=tok["clip"],
        unet=diffusers.UNet2DConditionModel(**{**syn.TINY_UNET, "in_channels": 7}),
        low_res_scheduler=diffusers.DDPMScheduler(), scheduler=diffusers.DDIMScheduler(prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350)


def animatediff(tok):
    return diffusers.AnimateDiffPipeline(
        vae=diffusers.AutoencoderKL(**syn.TINY_VAE), text_encoder=clip(tok), tokenizer=tok["clip"],
        unet=diffusers.UNet2DConditionModel(**{**syn.TINY_UNET, "norm_num_groups": 2}),
        motion_adapter=diffusers.MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2,
                                               motion_norm_num_groups=2, motion_num_attention_heads=4),
        scheduler=diffusers.DDIMScheduler())


PIPELINES = [sd3, wan, ltx, pixart_sigma, kandinsky22, sdxl_refiner, sd_controlnet, sd_upscale, animatediff]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    syn.write_tiny_clip_tokenizer(root / "tok-clip")
    syn.write_tiny_t5_tokenizer(root / "tok-t5")
    tok = {"clip": transformers.CLIPTokenizer.from_pretrained(root / "tok-clip"),
           "t5": transformers.T5TokenizerFast.from_pretrained(root / "tok-t5")}
    out = {}
    for build in PIPELINES:
        torch.manual_seed(0)
        out[build.__name__] = root / build.__name__
        build(tok).save_pretrained(out[build.__name__])
    return out


def config_of(obj) -> dict:
    config = obj.config.to_dict() if hasattr(obj.config, "to_dict") else dict(obj.config)
    config.pop("_name_or_path", None)
    return config


def assert_same_component(slot, ours, theirs):
    assert type(ours) is type(theirs), slot
    if isinstance(theirs, torch.nn.Module):
        mine, their = dict(ours.state_dict()), theirs.state_dict()
        mine.update(ours.named_buffers())  # non-persistent buffers too (rotary tables ...)
        their.update(theirs.named_buffers())
        assert mine.keys() == their.keys(), slot
        for name, t in their.items():
            assert (mine[name].dtype, mine[name].device) == (t.dtype, t.device), (slot, name)
            assert torch.equal(mine[name], t), (slot, name)
        assert ours.training is theirs.training is False, slot
    if hasattr(theirs, "config"):
        assert config_of(ours) == config_of(theirs), slot
    if "Tokenizer" in type(theirs).__name__:
        assert ours("a photo of a cat").input_ids == theirs("a photo of a cat").input_ids, slot


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", [build.__name__ for build in PIPELINES])
def test_pipeline_loads_as_diffusers_loads_it(folders, store, name, dtype):
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours = compstore.DiffusionPipeline.from_pretrained(folders[name], store=store, **kwargs)
    theirs = diffusers.DiffusionPipeline.from_pretrained(folders[name], **kwargs)
    assert type(ours) is type(theirs)
    assert config_of(ours) == config_of(theirs)
    for slot in theirs.components:
        assert_same_component(slot, getattr(ours, slot), getattr(theirs, slot))


def assert_same_pipeline(ours, theirs):
    assert type(ours) is type(theirs)
    assert config_of(ours) == config_of(theirs)
    for slot in theirs.components:
        assert_same_component(slot, getattr(ours, slot), getattr(theirs, slot))


@pytest.mark.parametrize("name", ["StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                                  "AutoPipelineForText2Image", "AutoPipelineForImage2Image",
                                  "AutoPipelineForInpainting"])
def test_code_that_names_its_class_loads_into_that_class_as_diffusers(family_store, family, name):
    """`from compstore import StableDiffusionImg2ImgPipeline` (or an AutoPipelineFor*):
    a text-to-image pipeline loads into the class named, or the one diffusers picks."""
    ours = getattr(compstore, name).from_pretrained("A", store=family_store, dtype=torch.float16)
    assert_same_pipeline(ours, getattr(diffusers, name).from_pretrained(family["A"], dtype=torch.float16))
    assert ours.config._name_or_path == "A"
    # isinstance against the name imported asks diffusers' class, as code written for it expects
    assert isinstance(ours, getattr(compstore, name)) is isinstance(ours, getattr(diffusers, name))
    assert isinstance(ours, compstore.DiffusionPipeline)
    assert not isinstance(ours, compstore.StableDiffusionXLPipeline)


def test_sdxl_base_as_img2img_and_the_refiner_as_text_to_image(folders, store, tmp_path, caplog):
    """A class that takes fewer models than the pipeline has (StableDiffusionPipeline
    of an SDXL folder: no `text_encoder_2`) gets only those, as diffusers loads only those."""
    syn.tiny_sdxl_pipeline().save_pretrained(tmp_path / "base")
    for name, folder in (("StableDiffusionXLImg2ImgPipeline", tmp_path / "base"),
                         ("AutoPipelineForText2Image", folders["sdxl_refiner"]),
                         ("StableDiffusionPipeline", tmp_path / "base")):
        ours = getattr(compstore, name).from_pretrained(folder, store=store)
        assert_same_pipeline(ours, getattr(diffusers, name).from_pretrained(folder))
    assert "are not expected by" not in caplog.text  # no model built only to be dropped


def test_a_class_the_pipeline_cannot_fill_is_refused_before_anything_loads(family_store, family):
    from conftest import store_state

    before = store_state(family_store.home)
    for name_or_path in ("A", family["B"]):  # a ref; a folder the store has not ingested
        with pytest.raises(compstore.ComponentNotFoundError, match=r"needs \['text_encoder_2', "
                           r"'tokenizer_2', 'transformer'\].*load it as compstore.DiffusionPipeline"):
            compstore.FluxPipeline.from_pretrained(name_or_path, store=family_store)
    assert store_state(family_store.home) == before
    with pytest.raises(ValueError):  # as diffusers refuses it
        diffusers.FluxPipeline.from_pretrained(family["A"])


def test_names_that_are_no_diffusers_pipeline_or_model_class_are_attribute_errors():
    for name in ("NoSuchPipeline", "AutoPipelineForNothing", "NoSuchModel", "CLIPTokenizer", "lower"):
        assert not hasattr(compstore, name)
    with pytest.raises(AttributeError, match="a model: compstore.<its diffusers class> or compstore.load_component"):
        compstore.pipeline_class("UNet2DConditionModel")
    assert compstore.pipeline_class("DiffusionPipeline") is compstore.DiffusionPipeline
    assert compstore.StableDiffusionPipeline is compstore.StableDiffusionPipeline  # one stand-in per class


def test_a_stand_in_constructs_and_answers_as_diffusers_class_does():
    """Code that imports a class from compstore also builds pipelines and models with it,
    and reads its class attributes: those are diffusers' class's (`download` excepted:
    it fills the Hugging Face cache, not the store)."""
    pipe = syn.tiny_sd_pipeline()
    built = compstore.StableDiffusionPipeline(**pipe.components)
    assert type(built) is diffusers.StableDiffusionPipeline and built.unet is pipe.unet
    vae = compstore.AutoencoderKL.from_config(pipe.vae.config)
    assert type(vae) is type(compstore.AutoencoderKL(**syn.TINY_VAE)) is diffusers.AutoencoderKL
    assert compstore.StableDiffusionXLPipeline._optional_components == diffusers.StableDiffusionXLPipeline._optional_components
    assert compstore.StableDiffusionPipeline.load_config == diffusers.StableDiffusionPipeline.load_config
    with pytest.raises(AttributeError, match="use compstore.Store\\(\\).pull"):
        compstore.DiffusionPipeline.download("org/A")
    assert not hasattr(compstore.AutoencoderTiny, "from_single_file")  # diffusers' has none either
    with pytest.raises(TypeError):  # diffusers' own refusal of a missing component
        compstore.StableDiffusionPipeline(unet=pipe.unet)


def test_a_named_class_loads_onto_a_device_through_its_pool(family_store):
    """Switching A -> B as img2img pipelines moves only B's delta, as DiffusionPipeline loads do."""
    from compstore import ResidencyPool
    from test_residency import CountingCopier

    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    a = compstore.StableDiffusionImg2ImgPipeline.from_pretrained("A", store=family_store, pool=pool)
    b = compstore.AutoPipelineForImage2Image.from_pretrained("B", store=family_store, pool=pool)
    assert type(a) is type(b) is diffusers.StableDiffusionImg2ImgPipeline
    moved = {c.component: c.bytes_from_pinned + c.bytes_from_store for c in pool.last_report.components}
    assert moved == {"unet": family_store.diff("A", "B").delta_bytes, "vae": 0, "text_encoder": 0}
    assert b.vae.decoder.conv_out.weight.device.type == "meta"


@pytest.mark.parametrize("name,slot", [("AutoencoderKL", "vae"), ("UNet2DConditionModel", "unet")])
def test_code_that_names_a_model_class_loads_it_as_diffusers(family_store, family, name, slot):
    """`from compstore import AutoencoderKL`: `from_pretrained` is load_component's,
    from a folder or a ref, for the class named."""
    theirs = getattr(diffusers, name).from_pretrained(family["A"], subfolder=slot, dtype=torch.float16)
    for where in (family["A"], "A"):
        ours = getattr(compstore, name).from_pretrained(where, subfolder=slot, store=family_store,
                                                         dtype=torch.float16)
        assert_same_component(slot, ours, theirs)
        assert isinstance(ours, getattr(compstore, name)) and not isinstance(ours, compstore.AutoencoderTiny)


@pytest.mark.parametrize("dtype", [None, torch.float16, "auto"])
def test_code_that_names_a_transformers_model_class_loads_it_as_transformers(family_store, family, dtype):
    """`from compstore import CLIPTextModel`: `from_pretrained(..., subfolder=...)` as
    transformers' own, from a folder or a ref; a model of another class is refused."""
    kw = {} if dtype is None else {"dtype": dtype}
    theirs = transformers.CLIPTextModel.from_pretrained(family["A"], subfolder="text_encoder", **kw)
    for where in (family["A"], "A"):
        ours = compstore.CLIPTextModel.from_pretrained(where, subfolder="text_encoder", store=family_store, **kw)
        assert_same_component("text_encoder", ours, theirs)
        assert isinstance(ours, compstore.CLIPTextModel) and not isinstance(ours, compstore.T5EncoderModel)
    from conftest import store_state

    before = store_state(family_store.home)
    for where in ("A", family["B"]):  # a ref, and a folder: refused before it is ingested
        with pytest.raises(compstore.ComponentNotFoundError,
                           match="holds CLIPTextModel, not CLIPTextModelWithProjection"):
            compstore.CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder",
                                                                  store=family_store)
    assert store_state(family_store.home) == before


def test_a_model_of_another_class_is_refused_before_its_folder_is_ingested(family_store, family):
    from conftest import store_state

    before = store_state(family_store.home)
    for where, slot, message in ((family["B"], "unet", "B/unet holds UNet2DConditionModel, not AutoencoderKL: "
                                  "load it with compstore.UNet2DConditionModel.from_pretrained or"),
                                 ("A", "text_encoder", "A/text_encoder holds CLIPTextModel, not AutoencoderKL: "
                                  "load it with compstore.CLIPTextModel.from_pretrained or")):
        with pytest.raises(compstore.ComponentNotFoundError, match=message):
            compstore.AutoencoderKL.from_pretrained(where, subfolder=slot, store=family_store)
    assert store_state(family_store.home) == before


def test_from_pipe_shares_the_models_and_moves_through_the_pool(family_store, family):
    """`compstore.AutoPipelineForImage2Image.from_pipe(pipe)`: diffusers' from_pipe,
    the same class and models; moving it to a device reuses what `pipe` uploaded."""
    from compstore import ResidencyPool
    from test_residency import CountingCopier

    pool = ResidencyPool("meta", budget_bytes=1 << 40, copier=CountingCopier())
    text2image = compstore.DiffusionPipeline.from_pretrained("A", store=family_store, dtype=torch.float16,
                                                             pool=pool)
    theirs = diffusers.AutoPipelineForImage2Image.from_pipe(text2image, dtype=torch.float16)
    ours = compstore.AutoPipelineForImage2Image.from_pipe(text2image, dtype=torch.float16)
    assert type(ours) is type(theirs) is diffusers.StableDiffusionImg2ImgPipeline
    assert ours.unet is text2image.unet and ours.vae is text2image.vae
    first = pool.last_report
    ours.to("meta")
    assert pool.last_report is not first and {c.component for c in pool.last_report.components} == {
        "unet", "vae", "text_encoder"}
    assert all(c.bytes_from_pinned + c.bytes_from_store == 0 for c in pool.last_report.components)
    assert ours.unet.conv_in.weight.device.type == "meta"
