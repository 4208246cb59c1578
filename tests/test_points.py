"""Capture points: module paths and shapes of every kind, the token view, hooks that edit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore.errors import ActstoreError
from actstore.generation.points import (KINDS, capture_points, decode_until, hooks, kind_of,
                                        module_of, parse_kinds)
from test_store import SD_LAYERS

SITES = SD_LAYERS   # the 16 Transformer2D sites of an SD v1.x UNet
RESNETS = ([f"down_blocks.{b}.resnets.{j}" for b in range(4) for j in range(2)]
           + [f"mid_block.resnets.{j}" for j in range(2)]
           + [f"up_blocks.{b}.resnets.{j}" for b in range(4) for j in range(3)])
# SD v1.4 (Rombach et al.'s config, the paper's table): channels per UNet block, and the
# token grid's downsampling from the latent: ×1, ×2, ×4, ×8 going down, back up.
SD14_CHANNELS = {"down_blocks.0": 320, "down_blocks.1": 640, "down_blocks.2": 1280,
                 "down_blocks.3": 1280, "mid_block": 1280, "up_blocks.0": 1280,
                 "up_blocks.1": 1280, "up_blocks.2": 640, "up_blocks.3": 320}
SD14_DOWNSAMPLE = {"down_blocks.0": 1, "down_blocks.1": 2, "down_blocks.2": 4,
                   "down_blocks.3": 8, "mid_block": 8, "up_blocks.0": 8, "up_blocks.1": 4,
                   "up_blocks.2": 2, "up_blocks.3": 1}


def keeper(store: dict):
    """A hook callback keeping the first output seen at each point (a copy)."""
    def keep(name: str, tokens: torch.Tensor) -> None:
        store.setdefault(name, tokens.clone())
    return keep


def _block(site: str) -> str:
    return site.split(".attentions")[0].split(".resnets")[0]


def expected_points(latent: int, channels: dict, downsample: dict, vae_channels: int) -> dict:
    """name → (kind, module, (h, w, C)) written out from the architecture, not from torch."""
    out = {}
    for s in SITES:
        side = latent // downsample[_block(s)]
        c = channels[_block(s)]
        out[s] = ("attn1", f"unet.{s}.transformer_blocks.0.attn1", (side, side, c))
        out[f"attn2/{s}"] = ("attn2", f"unet.{s}.transformer_blocks.0.attn2", (side, side, c))
        out[f"block/{s}"] = ("block", f"unet.{s}", (side, side, c))
    for r in RESNETS:
        side = latent // downsample[_block(r)]
        out[f"resnet/{r}"] = ("resnet", f"unet.{r}", (side, side, channels[_block(r)]))
    out["vae/decoder.mid_block.attentions.0"] = (
        "vae", "vae.decoder.mid_block.attentions.0.to_out.0", (latent, latent, vae_channels))
    return out


def check_points(model, latent: int, expected: dict) -> None:
    points = capture_points(model, KINDS, latent_h=latent, latent_w=latent)
    assert [p.name for p in points] == sorted(expected, key=lambda n: (
        KINDS.index(expected[n][0]), list(expected).index(n)))
    assert len([p for p in points if p.kind == "attn1"]) == 16
    assert len([p for p in points if p.kind == "block"]) == 16
    assert len([p for p in points if p.kind == "resnet"]) == 22
    for p in points:
        assert (p.kind, p.module, p.shape) == expected[p.name], p.name
        assert module_of(p.name) == p.module and kind_of(p.name) == p.kind
        assert p.attrs()["module"] == p.module and p.attrs()["layer"] == p.name


def test_tiny_random_points(tiny_model):
    # tiny-random: UNet channels (32, 64, 64, 64), VAE 16 channels at the bottom
    channels = dict(zip(SD14_CHANNELS, (32, 64, 64, 64, 64, 64, 64, 64, 32)))
    check_points(tiny_model, 8, expected_points(8, channels, SD14_DOWNSAMPLE, 16))


def test_sd14_architecture_points():
    """SD v1.4's real configs with random weights, at 64 px (8×8 latent)."""
    from actstore.generation.models import load_model
    from sd14 import sd14_folder

    model = load_model(sd14_folder(), device="cpu")
    check_points(model, 8, expected_points(8, SD14_CHANNELS, SD14_DOWNSAMPLE, 512))


def test_parse_kinds_and_names():
    assert parse_kinds("block, attn1") == ("attn1", "block")
    assert parse_kinds(None) == ("attn1",)
    with pytest.raises(ActstoreError, match="unknown kind 'conv'.*attn1,attn2,block,resnet,vae"):
        parse_kinds("attn1,conv")
    with pytest.raises(ActstoreError, match="no kind given"):
        parse_kinds(",")
    with pytest.raises(ActstoreError, match="not a capture point name"):
        kind_of("attn1/mid_block.attentions.0")
    assert module_of("resnet/mid_block.resnets.1") == "unet.mid_block.resnets.1"


def test_token_view_matches_native_layout(tiny_model):
    """tokens[b, y·W + x, c] == output[b, c, y, x], checked with a raw torch hook."""
    from actstore.generation.sampling import GenerationConfig, generate

    names = ["block/up_blocks.2.attentions.1", "resnet/down_blocks.3.resnets.0"]
    raw, seen = {}, {}

    def raw_hook(name):
        def hook(_module, _args, out):
            raw.setdefault(name, (out[0] if isinstance(out, tuple) else out).clone())
        return hook

    handles = [tiny_model.unet.get_submodule(module_of(n)[5:]).register_forward_hook(
        raw_hook(n)) for n in names]
    try:
        with hooks(tiny_model, names, keeper(seen)):
            generate(tiny_model, ["a red ball"], [1], GenerationConfig(steps=1))
    finally:
        for h in handles:
            h.remove()
    for n in names:
        b, c, h, w = raw[n].shape
        assert seen[n].shape == (b, h * w, c)
        for y, x in [(0, 0), (h - 1, 0), (0, w - 1), (h // 2, w - 1)]:
            torch.testing.assert_close(seen[n][:, y * w + x], raw[n][:, :, y, x],
                                       rtol=0, atol=0)


def test_hooks_leave_generation_bitwise_unchanged(tiny_model):
    """Capturing every point of every kind (copying each output) changes no pixel."""
    from actstore.generation.sampling import GenerationConfig, generate

    gen = GenerationConfig(steps=3)
    args = (["a red ball", "two blue cubes"], [3, 4], gen)
    plain = generate(tiny_model, *args)
    points = capture_points(tiny_model, KINDS)
    kept = []
    with hooks(tiny_model, points, lambda n, t: kept.append(t.float().sum())):
        captured = generate(tiny_model, *args)
    assert len(kept) > len(points)          # every UNet point, every step, and the VAE's
    assert np.array_equal(plain, captured)


def test_returned_tensor_replaces_output(tiny_model):
    """An edit of a residual-stream (4-D) point reaches the image; an identity edit does not."""
    from actstore.generation.sampling import GenerationConfig, generate

    gen = GenerationConfig(steps=2)
    args = (["a red ball"], [5], gen)
    plain = generate(tiny_model, *args)
    name = "block/up_blocks.1.attentions.0"
    with hooks(tiny_model, [name], lambda n, t: t.clone()):
        same = generate(tiny_model, *args)
    with hooks(tiny_model, [name], lambda n, t: torch.zeros_like(t)):
        zeroed = generate(tiny_model, *args)
    assert np.array_equal(plain, same)
    assert not np.array_equal(plain, zeroed)


def test_decode_until_equals_full_decode(tiny_model):
    """The truncated VAE decode sees the same mid-block attention as a full decode."""
    from actstore.generation.sampling import decode_images

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    name = "vae/decoder.mid_block.attentions.0"
    full, early = {}, {}
    with hooks(tiny_model, [name], keeper(full)):
        decode_images(tiny_model, latents)
    decode_until(tiny_model, latents, [name], keeper(early))
    assert early[name].shape == (2, 64, 16)
    torch.testing.assert_close(early[name], full[name], rtol=0, atol=0)


def test_vae_point_needs_the_whole_model(tiny_model):
    with pytest.raises(ActstoreError, match="no 'vae' component"):
        with hooks(tiny_model.unet, ["vae/decoder.mid_block.attentions.0"], lambda n, t: None):
            pass
