"""Tiny synthetic pipeline families with random weights, for tests, the demo and benchmarks.

No network: every model is built from a config, the CLIP tokenizer from a small
hand-written byte-level vocabulary. The family mirrors what people keep on disk:

    A  a base pipeline
    B  a fine-tune of A: same VAE and text encoder, different UNet
    C  A with a third of its UNet tensors changed, UNet saved in shards
    D  A plus fp16 variant files beside the fp32 ones
"""

from __future__ import annotations

import os
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


def write_tiny_clip_tokenizer(folder: str | os.PathLike) -> None:
    """A byte-level BPE vocabulary (every byte, with and without `</w>`) and a few merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for tok in chars + [c + "</w>" for c in chars] + ["lo", "low</w>", "er</w>", "at</w>", "cat</w>"]:
        vocab.setdefault(tok, len(vocab))
    merges = [("l", "o"), ("lo", "w</w>"), ("e", "r</w>"), ("a", "t</w>"), ("c", "at</w>")]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.save_pretrained(folder)


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
