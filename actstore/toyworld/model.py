"""Component factories for the toy latent diffusion model.

The toy model is deliberately a *shrunken SD v1.x*, not a different architecture: the
UNet keeps SD's block topology (so the 16 self-attention modules have SD's exact module
names and the capture code cannot tell the difference), the scheduler uses SD's betas,
and the folder is a standard diffusers ``StableDiffusionPipeline`` layout. Only widths,
resolution (64x64 pixels, 16x16x4 latents) and the text encoder/tokenizer are small.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import (AutoencoderKL, LMSDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                num_train_timesteps=1000)

# 16 self-attention modules of SD v1.x, in forward order.
SELF_ATTN_LAYERS: tuple[str, ...] = (
    *(f"down_blocks.{b}.attentions.{j}" for b in range(3) for j in range(2)),
    "mid_block.attentions.0",
    *(f"up_blocks.{b}.attentions.{j}" for b in (1, 2, 3) for j in range(3)),
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    cross_attention_dim=64,
    attention_head_dim=4,  # diffusers' SD-legacy meaning: number of heads
    norm_num_groups=32,
)

TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, projection_dim=64, hidden_act="quick_gelu")


def make_vae(scaling_factor: float = 1.0) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG, scaling_factor=scaling_factor)


def make_unet() -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def make_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """Tiny CLIP text tower; eos id drives the pooled output, so it must match the tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    return CLIPTextModel(cfg)


def make_scheduler() -> LMSDiscreteScheduler:
    from diffusers import LMSDiscreteScheduler

    return LMSDiscreteScheduler(**SD_BETAS, steps_offset=1)


def alphas_cumprod() -> torch.Tensor:
    """DDPM cumulative alphas for SD's scaled-linear betas (training noise schedule)."""
    betas = torch.linspace(SD_BETAS["beta_start"] ** 0.5, SD_BETAS["beta_end"] ** 0.5,
                           SD_BETAS["num_train_timesteps"], dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def assemble_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                      unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                  unet: UNet2DConditionModel, out_dir: str | Path) -> Path:
    """Write a standard SD folder (safetensors weights) loadable by from_pretrained."""
    out = Path(out_dir)
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def load_pipeline(path: str | Path) -> StableDiffusionPipeline:
    """Load exactly as real SD folders are loaded (local files only, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        str(path), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
