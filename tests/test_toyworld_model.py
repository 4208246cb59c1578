"""The toy LDM goes through the same loader as a real SD v1.x folder and exposes SD's 16
self-attention layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from actstore.toyworld import model as M
from actstore.toyworld.tokenizer import build_tokenizer, check_word_level
from actstore.toyworld.vocab import WORDS

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "models" / "toy-ldm"

# tokens per self-attention layer for 16x16 latents (SD: 64x64 latents -> 4096 ... 64)
EXPECTED_TOKENS = [256, 256, 64, 64, 16, 16, 4, 16, 16, 16, 64, 64, 64, 256, 256, 256]


def test_tokenizer_is_word_level(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    check_word_level(tok, WORDS)
    ids = tok("a red sphere in front of a blue cube , light from the left")["input_ids"]
    assert len(ids) == 16 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    """The committed toy model, or an untrained one with the same layout if absent."""
    if (TOY / "model_index.json").exists():
        return TOY
    d = tmp_path_factory.mktemp("toy")
    tok = build_tokenizer(d / "tok")
    return M.save_pipeline(M.make_vae(), M.make_text_encoder(tok), tok, M.make_unet(), d / "m")


def test_loads_like_sd_and_captures_16_layers(toy_dir):
    pipe = M.load_pipeline(toy_dir)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LMSDiscreteScheduler"
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    check_word_level(pipe.tokenizer, WORDS)
    mods = dict(pipe.unet.named_modules())
    captured: dict[str, tuple] = {}
    hooks = []

    def hook_for(name):
        def hook(module, inputs, output):
            captured.setdefault(name, tuple(output.shape))  # returns None: output untouched
        return hook

    for name in M.SELF_ATTN_LAYERS:
        lin = mods[f"{name}.transformer_blocks.0.attn1"].to_out[0]
        hooks.append(lin.register_forward_hook(hook_for(name)))
    try:
        out = pipe(["a red sphere , light from the left"], num_inference_steps=2,
                   guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                   output_type="np")
    finally:
        for h in hooks:
            h.remove()
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    assert list(captured) == list(M.SELF_ATTN_LAYERS)
    assert [s[1] for s in captured.values()] == EXPECTED_TOKENS
    assert all(s[0] == 2 for s in captured.values())  # CFG batch [uncond, cond]


def test_committed_model_size_and_format():
    if not (TOY / "model_index.json").exists():
        pytest.skip("toy model not trained yet")
    files = [p for p in TOY.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert (TOY / "vae" / "diffusion_pytorch_model.safetensors").exists()


def test_warm_start_from_an_exported_folder(toy_dir, tmp_path):
    """``train --init-from <model folder>``: the folder's VAE becomes the run's finished VAE
    and its (EMA) UNet and text encoder start both the live and the EMA copies."""
    import json

    from safetensors.torch import load_file

    from actstore.toyworld.train import inherit

    init = inherit(tmp_path, toy_dir)
    cfg = json.loads((toy_dir / "vae" / "config.json").read_text())
    assert init["vae_frozen"] and init["scaling_factor"] == cfg["scaling_factor"]
    pipe = M.load_pipeline(toy_dir)
    ck = load_file(str(init["unet_ckpt"]))
    for pre in ("unet.", "ema_unet."):
        for k, v in pipe.unet.state_dict().items():
            assert torch.equal(ck[pre + k], v), pre + k
    for pre in ("text_encoder.", "ema_text_encoder."):
        for k, v in pipe.text_encoder.state_dict().items():
            assert torch.equal(ck[pre + k], v), pre + k
    vae = load_file(str(tmp_path / "ckpt" / "vae.safetensors"))
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(vae["vae." + k], v), k
