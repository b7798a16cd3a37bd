"""Tiny synthetic pipeline families with random weights, for tests, the demo and benchmarks.

No network: every model is built from a config, the CLIP tokenizer from a small
hand-written byte-level vocabulary. The family mirrors what people keep on disk:

    A  a base pipeline
    B  a fine-tune of A: same VAE and text encoder, different UNet
    C  A with a third of its UNet tensors changed, UNet saved in shards
    D  A plus fp16 variant files beside the fp32 ones
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32,
)
TINY_VAE = dict(
    block_out_channels=[32, 64], in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=32,
    sample_size=32,
)
TINY_CLIP = dict(
    bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
    num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000,
)


CLIP_VOCAB = 49408  # the published CLIP tokenizers' vocabulary (48,894 merges)


def write_tiny_clip_tokenizer(folder: str | os.PathLike, vocab_size: int | None = None,
                              pad_token: str = "<|endoftext|>") -> None:
    """A byte-level BPE vocabulary (every byte, with and without `</w>`) and a few
    merges; with `vocab_size`, random merges up to that size (CLIP_VOCAB: as large,
    and as slow to load, as a published CLIP tokenizer). Written as the published
    SD and SDXL repos hold theirs: vocab.json, merges.txt and two small JSON files,
    no tokenizer.json (transformers builds the fast tokenizer from them, ~0.12 s for
    CLIP's vocabulary on the 2-core VM, against ~0.35 s from a tokenizer.json).
    SDXL's second tokenizer is the same but for `pad_token="!"`."""
    import random

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for tok in chars + [c + "</w>" for c in chars] + ["lo", "low</w>", "er</w>", "at</w>", "cat</w>"]:
        vocab.setdefault(tok, len(vocab))
    merges = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>"), ("a", "t</w>"), ("c", "at</w>")]
    pieces, rng = list(chars), random.Random(0)
    while vocab_size and len(vocab) < vocab_size:
        a, b = rng.choice(pieces), rng.choice(pieces)
        if len(a) + len(b) <= 12 and a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
            pieces.append(a + b)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": pad_token, "unk_token": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
         "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, indent=2))


def tiny_sd_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of a few MB with random weights, on CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    return _sd_pipeline(unet, vae, text_encoder)


def _sd_pipeline(unet, vae, text_encoder):
    """A StableDiffusionPipeline around these models, with the tiny tokenizer and DDIM."""
    import tempfile

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tiny_clip_tokenizer(d)
        tokenizer = CLIPTokenizer.from_pretrained(d)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sd15_layout(seed: int = 0):
    """`tiny_sd_pipeline` as SD 1.5 publishes it: with a safety checker, whose
    model_index entry names a diffusers pipeline module ("stable_diffusion"), and a
    CLIP image processor."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    base = tiny_sd_pipeline(seed)
    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    torch.manual_seed(seed + 3)
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config={**tower, "vocab_size": 1000},
        vision_config={**tower, "image_size": 32, "patch_size": 4}, projection_dim=32))
    return StableDiffusionPipeline(**{**base.components, "safety_checker": checker.eval(),
                                      "feature_extractor": CLIPImageProcessor(crop_size=32, size=32),
                                      "requires_safety_checker": True})


def perturb_fraction(module: torch.nn.Module, fraction: float, seed: int) -> int:
    """Change every k-th parameter so that about `fraction` of them differ; return the count."""
    g = torch.Generator().manual_seed(seed)
    params = [p for _, p in sorted(module.named_parameters())]
    step = max(1, round(1 / fraction))
    changed = 0
    with torch.no_grad():
        for i, p in enumerate(params):
            if i % step == 0:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01)
                changed += 1
    return changed


def build_family(root: str | os.PathLike, names: tuple[str, ...] = ("A", "B", "C", "D")) -> dict[str, Path]:
    """Write the A/B/C/D family under `root`; return name -> folder."""
    root = Path(root)
    out: dict[str, Path] = {}
    base = tiny_sd_pipeline(seed=0)
    if "A" in names:
        out["A"] = root / "A"
        base.save_pretrained(out["A"])
    if "B" in names:
        other = tiny_sd_pipeline(seed=100)  # only its UNet is used
        b = type(base)(**{**base.components, "unet": other.unet})
        out["B"] = root / "B"
        b.save_pretrained(out["B"])
    if "C" in names:
        c = tiny_sd_pipeline(seed=0)
        perturb_fraction(c.unet, 1 / 3, seed=7)
        out["C"] = root / "C"
        c.save_pretrained(out["C"], max_shard_size="1MB")
    if "D" in names:
        out["D"] = root / "D"
        base.save_pretrained(out["D"])
        fp16 = tiny_sd_pipeline(seed=0).to(torch.float16)
        fp16.save_pretrained(out["D"], variant="fp16")
    return out


TINY_SDXL_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=32,
)


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline of a few MB with random weights (two CLIP encoders)."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE)
    clip = CLIPTextConfig(**TINY_CLIP, hidden_act="gelu", projection_dim=32)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(clip)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(clip)
    with tempfile.TemporaryDirectory() as d:
        write_tiny_clip_tokenizer(d)
        tokenizer = CLIPTokenizer.from_pretrained(d)
        tokenizer_2 = CLIPTokenizer.from_pretrained(d)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler,
    )


SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # other fields: diffusers' defaults = SD 1.5
SD15_VAE = dict(
    block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2, sample_size=512,
)
SD15_CLIP = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
)


def sd15_pipeline(seed: int = 0, dtype: torch.dtype = torch.float16):
    """A StableDiffusionPipeline with Stable Diffusion 1.5's shapes and random weights
    (UNet 860M parameters): for benchmarks, where tiny models measure only imports."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET).to(dtype)
    vae = AutoencoderKL(**SD15_VAE).to(dtype)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_CLIP)).to(dtype)
    return _sd_pipeline(unet, vae, text_encoder)


# -- switch-benchmark families: the real architectures, tiny or at published shapes ----
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # stabilityai/stable-diffusion-xl-base-1.0, 2.6B parameters
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_CLIP_G = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    vocab_size=49408, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
)
TINY_FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                 axes_dims_rope=[4, 4, 8])
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=[16, 56, 56])  # black-forest-labs/FLUX.1-dev, 12B
TINY_FLUX_VAE = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                     layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                     use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
FLUX_VAE = dict(SD15_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.1159, scaling_factor=0.3611, sample_size=1024)
TINY_T5 = dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")  # google/t5-v1_1-xxl encoder, 4.7B


def write_tiny_t5_tokenizer(folder: str | os.PathLike) -> None:
    """A small Unigram (sentencepiece-style) vocabulary as a T5 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in ("a", "cat", "dog", "photo", "of")]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                    extra_ids=0, model_max_length=512).save_pretrained(folder)


def _seeded(seed: int, make, dtype: torch.dtype | None = None):
    """`make()` under `seed`, its weights made in `dtype` (the default dtype while it
    runs, then a cast for anything else): a full-size SDXL UNet made in fp32 first
    is 10 GB of host memory, twice what it is saved as."""
    from .component import torch_default_dtype

    torch.manual_seed(seed)
    if dtype is None:
        return make()
    with torch_default_dtype(dtype):
        return torch.nn.Module.to(make(), dtype)  # not diffusers' `to`, which warns of fp32 modules


def switch_family(kind: str, size: str, root: str | os.PathLike,
                  dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """The switch benchmark's family, saved under `root`; returns name -> folder.

    sdxl: A; B = A's VAE and both text encoders, another UNet; C = A with a third of
    its UNet tensors changed. flux: A; B = A's T5, CLIP and VAE, another transformer.
    `size` is "tiny" (a few MB, CPU) or "full" (published shapes: SDXL 6.9 GB and
    FLUX.1-dev 33 GB in 16-bit; needs that much free disk twice, for folders and store;
    its CLIP tokenizers have the published vocabulary size, so they load as slowly as
    the real ones).
    """
    import tempfile

    if size not in ("tiny", "full") or kind not in ("sdxl", "flux"):
        raise ValueError(f"unknown family {kind!r} / size {size!r}: use sdxl|flux and tiny|full")
    with tempfile.TemporaryDirectory(prefix="compstore-tok-") as tok_dir:
        return _switch_family(kind, size == "tiny", Path(root), Path(tok_dir), dtype)


def _switch_family(kind: str, tiny: bool, root: Path, tok_dir: Path, dtype: torch.dtype) -> dict[str, Path]:
    import copy

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # The CLIP tokenizers as published (write_tiny_clip_tokenizer); SDXL's second pads with "!".
    tokenizers = {"tokenizer": tok_dir / "clip", "tokenizer_2": tok_dir / "clip_g"}
    write_tiny_clip_tokenizer(tokenizers["tokenizer"], None if tiny else CLIP_VOCAB)
    clip_tok = CLIPTokenizer.from_pretrained(tokenizers["tokenizer"])
    clip_l = CLIPTextConfig(**(dict(TINY_CLIP, hidden_act="gelu", projection_dim=32) if tiny else SD15_CLIP))
    if kind == "sdxl":
        from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                               UNet2DConditionModel)
        from transformers import CLIPTextModelWithProjection

        write_tiny_clip_tokenizer(tokenizers["tokenizer_2"], None if tiny else CLIP_VOCAB, pad_token="!")
        clip_g = clip_l if tiny else CLIPTextConfig(**SDXL_CLIP_G)
        unet = lambda: UNet2DConditionModel(**(TINY_SDXL_UNET if tiny else SDXL_UNET))  # noqa: E731
        parts = dict(
            unet=_seeded(0, unet, dtype),
            vae=_seeded(1, lambda: AutoencoderKL(**(TINY_VAE if tiny else SDXL_VAE)), dtype),
            text_encoder=_seeded(2, lambda: CLIPTextModel(clip_l), dtype),
            text_encoder_2=_seeded(3, lambda: CLIPTextModelWithProjection(clip_g), dtype),
            tokenizer=clip_tok, tokenizer_2=CLIPTokenizer.from_pretrained(tokenizers["tokenizer_2"]),
            scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                             beta_schedule="scaled_linear",
                                             timestep_spacing="leading", steps_offset=1))
        cls, denoiser, other = StableDiffusionXLPipeline, "unet", _seeded(100, unet, dtype)
    else:
        from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                               FluxTransformer2DModel)
        from transformers import T5Config, T5EncoderModel, T5TokenizerFast

        write_tiny_t5_tokenizer(tok_dir / "t5")
        transformer = lambda: FluxTransformer2DModel(**(TINY_FLUX if tiny else FLUX_DEV))  # noqa: E731
        parts = dict(
            transformer=_seeded(0, transformer, dtype),
            vae=_seeded(1, lambda: AutoencoderKL(**(TINY_FLUX_VAE if tiny else FLUX_VAE)), dtype),
            text_encoder=_seeded(2, lambda: CLIPTextModel(clip_l), dtype),
            text_encoder_2=_seeded(3, lambda: T5EncoderModel(T5Config(**(TINY_T5 if tiny else T5_XXL))), dtype),
            tokenizer=clip_tok, tokenizer_2=T5TokenizerFast.from_pretrained(tok_dir / "t5"),
            scheduler=FlowMatchEulerDiscreteScheduler())
        cls, denoiser, other = FluxPipeline, "transformer", _seeded(100, transformer, dtype)
        del tokenizers["tokenizer_2"]  # T5's, saved as transformers saves it
    out = {"A": root / "A", "B": root / "B"}
    cls(**parts).save_pretrained(out["A"])
    cls(**{**parts, denoiser: other}).save_pretrained(out["B"])
    del other
    if kind == "sdxl":
        changed = copy.deepcopy(parts["unet"])
        perturb_fraction(changed, 1 / 3, seed=7)
        out["C"] = root / "C"
        cls(**{**parts, "unet": changed}).save_pretrained(out["C"])
    for folder in out.values():  # save_pretrained wrote each CLIP tokenizer as a tokenizer.json
        for slot, source in tokenizers.items():
            shutil.rmtree(folder / slot)
            shutil.copytree(source, folder / slot)
    return out


def rename_as_published(folder: str | os.PathLike) -> None:
    """Rewrite a saved SD pipeline's tensor names as SD 1.x/2.x repos publish them,
    names today's libraries rename on load (see loader/names.py): the CLIP text
    encoder's under `text_model.` (with its `position_ids`), and the VAE's attention
    weights as diffusers' deprecated attention blocks named them (query, key,
    value, proj_attn)."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    te = folder / "text_encoder" / "model.safetensors"
    sd = {name if name.startswith("text_model.") else f"text_model.{name}": t  # (transformers 5.0
          for name, t in load_file(te).items()}                                  # saves it so already)
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, te, metadata={"format": "pt"})
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, t in load_file(vae).items():
        for new, was in old.items():
            if ".mid_block.attentions." in name and f".{new}." in name:
                name = name.replace(f".{new}.", f".{was}.")
        renamed[name] = t
    save_file(renamed, vae, metadata={"format": "pt"})


def _ldm_resnet(rest: str) -> str:
    for diffusers_name, ldm_name in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"),
                                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
                                     ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")):
        if rest.startswith(diffusers_name + "."):
            return ldm_name + rest[len(diffusers_name):]
    raise ValueError(f"unexpected UNet resnet tensor {rest!r}")


def _ldm_unet_name(name: str, unet_config: dict) -> str:
    """The original (LDM) name of an SD 1.x UNet tensor's diffusers name."""
    per_down = unet_config["layers_per_block"] + 1  # resnets (+ attention), then a downsampler
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, leaf = name.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"
    part = name.split(".")
    if part[0] == "down_blocks":
        i, kind, j, rest = int(part[1]), part[2], int(part[3]), ".".join(part[4:])
        if kind == "downsamplers":
            return f"input_blocks.{1 + i * per_down + per_down - 1}.0.op.{rest.removeprefix('conv.')}"
        block = f"input_blocks.{1 + i * per_down + j}"
        return f"{block}.0.{_ldm_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if part[0] == "mid_block":
        kind, j, rest = part[1], int(part[2]), ".".join(part[3:])
        return f"middle_block.{2 * j}.{_ldm_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if part[0] == "up_blocks":
        i, kind, j, rest = int(part[1]), part[2], int(part[3]), ".".join(part[4:])
        if kind == "upsamplers":
            attention = "Attn" in unet_config["up_block_types"][i]
            return f"output_blocks.{i * per_down + per_down - 1}.{2 if attention else 1}.{rest}"
        block = f"output_blocks.{i * per_down + j}"
        return f"{block}.0.{_ldm_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    raise ValueError(f"unexpected UNet tensor {name!r}")


def _ldm_vae_name(name: str, n_blocks: int) -> str:
    """The original (LDM) name of a VAE tensor's diffusers name."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    name = (name.replace(".conv_norm_out.", ".norm_out.").replace(".mid_block.resnets.0.", ".mid.block_1.")
            .replace(".mid_block.resnets.1.", ".mid.block_2.").replace(".conv_shortcut.", ".nin_shortcut."))
    if ".mid_block.attentions.0." in name:
        head, rest = name.split(".mid_block.attentions.0.")
        layer, _, leaf = rest.rpartition(".")
        return f"{head}.mid.attn_1.{attention[layer]}.{leaf}"
    part = name.split(".")
    if part[1] in ("down_blocks", "up_blocks"):
        # the decoder's blocks run the other way round in the original
        i = int(part[2]) if part[1] == "down_blocks" else n_blocks - 1 - int(part[2])
        kind, rest = part[3], ".".join(part[5:])
        block = f"{part[0]}.{'down' if part[1] == 'down_blocks' else 'up'}.{i}"
        if kind == "resnets":
            return f"{block}.block.{part[4]}.{rest}"
        return f"{block}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    return name


def _open_clip_state(text_encoder) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's tensors as OpenCLIP names them (SDXL's second
    encoder in original checkpoints): q, k and v as one `in_proj`, the projection
    transposed."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {"positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "text_projection": sd.pop("text_projection.weight").T}
    sd.pop("embeddings.position_ids", None)
    for name, t in sd.items():
        if name.startswith("final_layer_norm."):
            out[name.replace("final_layer_norm.", "ln_final.")] = t
        elif ".self_attn.q_proj." in name:
            leaf = name.rpartition(".")[2]
            qkv = [sd[name.replace(".q_proj.", f".{x}_proj.")] for x in "qkv"]
            out[name.split(".self_attn.")[0].replace("encoder.layers.", "transformer.resblocks.")
                + f".attn.in_proj_{leaf}"] = torch.cat(qkv)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        else:
            out[name.replace("encoder.layers.", "transformer.resblocks.").replace(".layer_norm1.", ".ln_1.")
                .replace(".layer_norm2.", ".ln_2.").replace(".mlp.fc1.", ".mlp.c_fc.")
                .replace(".mlp.fc2.", ".mlp.c_proj.").replace(".self_attn.", ".attn.")] = t
    return out


def save_as_single_file(pipe, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write an SD 1.x or SDXL pipeline as one original-format (LDM) `.safetensors`
    checkpoint, as A1111/ComfyUI users and model sites publish fine-tunes: the UNet
    under `model.diffusion_model.`, the VAE under `first_stage_model.` (its attention
    weights as 1x1 convolutions), the CLIP text encoder under
    `cond_stage_model.transformer.` (SDXL: `conditioner.embedders.0.transformer.`, and
    the second, OpenCLIP, under `conditioner.embedders.1.model.`). diffusers'
    `from_single_file` converts it back to these very tensors (for SDXL, the two text
    encoders need different widths: diffusers tells them apart by it)."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    unet_config = dict(pipe.unet.config)
    for name, t in pipe.unet.state_dict().items():
        state["model.diffusion_model." + _ldm_unet_name(name, unet_config)] = t
    n_blocks = len(pipe.vae.config.block_out_channels)
    for name, t in pipe.vae.state_dict().items():
        ldm = _ldm_vae_name(name, n_blocks)
        state["first_stage_model." + ldm] = t[:, :, None, None] if ".attn_1." in ldm and t.ndim == 2 else t
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    clip = "conditioner.embedders.0.transformer.text_model." if sdxl else "cond_stage_model.transformer.text_model."
    for name, t in pipe.text_encoder.state_dict().items():
        state[clip + name.removeprefix("text_model.")] = t
    if sdxl:
        for name, t in _open_clip_state(pipe.text_encoder_2).items():
            state["conditioner.embedders.1.model." + name] = t
    state = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in state.items()}
    save_file(state, path, metadata={"format": "pt"})
    return Path(path)


def save_as_gguf(state: dict[str, torch.Tensor], path: str | os.PathLike, types: dict[str, str]) -> Path:
    """Write `state` as one GGUF file (llama.cpp's format, as city96's Flux files are
    published): each tensor named in `types` quantized by the gguf package to that
    GGML type ("Q8_0", "Q4_0", "BF16", ...; its rows whole blocks of it), the others as
    F16 where they are float16, else F32."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(os.fspath(path), "compstore-test")
    for name, t in state.items():
        values = t.detach().numpy() if t.dtype == torch.float16 else t.detach().float().numpy()
        if name in types:
            kind = gguf.GGMLQuantizationType[types[name]]
            data = gguf.quants.quantize(values.astype(np.float32), kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def flux_as_original_layout(state: dict[str, torch.Tensor], num_layers: int,
                            num_single_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer's state dict in the original (BFL) layout, as
    FLUX.1's own files and most GGUF files of it hold it: q, k and v fused
    (`qkv`; a single block's with its MLP input in `linear1`), the final norm's scale
    and shift swapped. diffusers' `from_single_file` converts it back to these very
    tensors; it does so at FLUX.1's width (3072) only."""
    out: dict[str, torch.Tensor] = {}
    for embedder, bfl in (("timestep", "time_in"), ("text", "vector_in"), ("guidance", "guidance_in")):
        for i, layer in ((1, "in_layer"), (2, "out_layer")):
            for p in ("weight", "bias"):
                name = f"time_text_embed.{embedder}_embedder.linear_{i}.{p}"
                if name in state:
                    out[f"{bfl}.{layer}.{p}"] = state[name]
    renames = {"context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
    for i in range(num_layers):
        renames.update({f"transformer_blocks.{i}.{a}": f"double_blocks.{i}.{b}" for a, b in (
            ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
            ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"),
            ("ff_context.net.2", "txt_mlp.2"), ("attn.to_out.0", "img_attn.proj"),
            ("attn.to_add_out", "txt_attn.proj"))})
    for i in range(num_single_layers):
        renames.update({f"single_transformer_blocks.{i}.norm.linear": f"single_blocks.{i}.modulation.lin",
                        f"single_transformer_blocks.{i}.proj_out": f"single_blocks.{i}.linear2"})
    for p in ("weight", "bias"):
        for a, b in renames.items():
            out[f"{b}.{p}"] = state[f"{a}.{p}"]
        for i in range(num_layers):
            block = f"transformer_blocks.{i}.attn."
            out[f"double_blocks.{i}.img_attn.qkv.{p}"] = torch.cat([state[f"{block}to_{x}.{p}"] for x in "qkv"])
            out[f"double_blocks.{i}.txt_attn.qkv.{p}"] = torch.cat(
                [state[f"{block}add_{x}_proj.{p}"] for x in "qkv"])
        for i in range(num_single_layers):
            block = f"single_transformer_blocks.{i}."
            out[f"single_blocks.{i}.linear1.{p}"] = torch.cat(
                [state[f"{block}attn.to_{x}.{p}"] for x in "qkv"] + [state[f"{block}proj_mlp.{p}"]])
        scale, shift = state[f"norm_out.linear.{p}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    for i in range(num_layers):
        for a, b in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                     ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[f"double_blocks.{i}.{b}.scale"] = state[f"transformer_blocks.{i}.attn.{a}.weight"]
    for i in range(num_single_layers):
        for a, b in (("norm_q", "query_norm"), ("norm_k", "key_norm")):
            out[f"single_blocks.{i}.norm.{b}.scale"] = state[f"single_transformer_blocks.{i}.attn.{a}.weight"]
    if len(out) != len(state) - 8 * num_layers - 6 * num_single_layers:  # each fused one replaces 4 or 6
        raise ValueError("not a Flux transformer's state dict of that many blocks: tensors were left out")
    return out


def as_bfl_quantized(state: dict[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    """`state` with each Linear weight whose sides are multiples of 16 quantized as Black
    Forest Labs' `fp8r` or `nvfp4` single files hold it, by diffusers' own helpers: the
    weight beside its `weight_scale` (nvfp4: also `weight_scale_2`, and an
    `input_scale` of 1, a calibration these random weights do not have)."""
    from diffusers.quantizers.bfl.utils import quantize_fp8r, quantize_nvfp4

    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not (name.endswith(".weight") and t.ndim == 2 and t.shape[0] % 16 == 0 and t.shape[1] % 16 == 0):
            out[name] = t
            continue
        prefix = name.removesuffix("weight")
        if scheme == "fp8r":
            out[name], out[prefix + "weight_scale"] = quantize_fp8r(t)
        else:
            out[name], out[prefix + "weight_scale"], out[prefix + "weight_scale_2"] = quantize_nvfp4(t)
            out[prefix + "input_scale"] = torch.tensor(1.0)
    return out
