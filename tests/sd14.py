"""Stable Diffusion v1.4's real component configs with random weights.

No SD weights can be downloaded here, but the architecture can be built: the loader, the
capture hooks and the store must handle its 320/640/1280 channels, 768-wide cross-attention,
the SD VAE and a CLIP ViT-L/14 text encoder exactly as they would the real checkpoint.
Used by the loading test and by the capture-overhead benchmark.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def sd14_components(seed: int = 0) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel

    from actstore.generation.models import sd_unet, sd_vae

    torch.manual_seed(seed)
    unet = sd_unet((320, 640, 1280, 1280), cross_attention_dim=768, sample_size=64)
    vae = sd_vae((128, 256, 512, 512), layers_per_block=2, sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def sd14_folder(root: str | Path | None = None) -> str:
    """Build (once, cached) a ``save_pretrained`` folder of the SD v1.4 architecture."""
    from actstore.generation.models import save_pipeline_folder

    root = Path(root or os.environ.get("ACTSTORE_CACHE", Path.home() / ".cache" / "actstore"))
    path = root / "sd14-random-v1"
    if not (path / "model_index.json").is_file():
        tmp = root / f".sd14.{os.getpid()}.tmp"
        save_pipeline_folder(tmp, sd14_components())
        os.replace(tmp, path)
    return str(path)
