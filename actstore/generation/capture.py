"""Forward hooks on every self-attention layer: the capture points shared by store and edits.

The captured tensor is the output of ``<block>.attentions.<j>.transformer_blocks.0.attn1``,
i.e. the self-attention result *before* the residual add, exactly where the paper's authors
hooked ``to_out``. A layer is named by its ``<block>.attentions.<j>`` prefix, as in the paper.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from actstore.errors import ActstoreError

ATTN1_SUFFIX = ".transformer_blocks.0.attn1"
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


@dataclass(frozen=True)
class LayerInfo:
    """Where a layer sits and what it outputs: one token grid of ``channels`` per image."""

    name: str
    block: str
    height: int
    width: int
    channels: int

    @property
    def resolution(self) -> int:
        return self.height


def self_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Layer names in the UNet's data-flow order (encoder, middle, decoder)."""
    names = [n[: -len(ATTN1_SUFFIX)] for n, _ in unet.named_modules()
             if n.endswith(ATTN1_SUFFIX)]

    def key(name: str):
        parts = name.split(".")
        nums = [int(p) for p in parts if p.isdigit()]
        return (_BLOCK_ORDER.get(parts[0], 3), nums)

    return sorted(names, key=key)


def block_of(layer: str) -> str:
    match = re.match(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)", layer)
    return match.group(1) if match else layer.split(".")[0]


def attn1_module(unet: torch.nn.Module, layer: str) -> torch.nn.Module:
    return unet.get_submodule(layer + ATTN1_SUFFIX)


def token_grid(n_tokens: int, latent_h: int, latent_w: int) -> tuple[int, int]:
    """Recover the (h, w) token grid from a token count, given the latent aspect ratio."""
    factor = math.sqrt(latent_h * latent_w / n_tokens)
    h, w = round(latent_h / factor), round(latent_w / factor)
    if h * w != n_tokens:
        raise ValueError(f"{n_tokens} tokens do not tile a {latent_h}x{latent_w} latent")
    return h, w


@contextmanager
def attn1_hooks(unet: torch.nn.Module, layers: list[str],
                fn: Callable[[str, torch.Tensor], torch.Tensor | None]):
    """Call ``fn(layer, output)`` on each listed layer's attn1 output; a returned tensor
    replaces the output (how interventions edit), ``None`` leaves it untouched."""
    handles = []
    for layer in layers:
        def hook(_module, _args, output, _layer=layer):
            return fn(_layer, output)
        handles.append(attn1_module(unet, layer).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def probe_layout(unet: torch.nn.Module, latent_h: int, latent_w: int,
                 cross_dim: int) -> list[LayerInfo]:
    """Run the UNet once on zeros to learn each layer's token grid and channel count.

    Cheaper to trust than arithmetic on block configs, and works for any SD-like topology.
    """
    layers = self_attention_layers(unet)
    shapes: dict[str, tuple[int, int]] = {}

    def record(layer: str, out: torch.Tensor) -> None:
        shapes[layer] = (out.shape[1], out.shape[2])

    p = next(unet.parameters())
    sample = torch.zeros(1, unet.config.in_channels, latent_h, latent_w,
                         device=p.device, dtype=p.dtype)
    context = torch.zeros(1, 1, cross_dim, device=p.device, dtype=p.dtype)
    with torch.no_grad(), attn1_hooks(unet, layers, record):
        unet(sample, torch.tensor(1, device=p.device), encoder_hidden_states=context)
    infos = []
    for layer in layers:
        n_tokens, channels = shapes[layer]
        h, w = token_grid(n_tokens, latent_h, latent_w)
        infos.append(LayerInfo(layer, block_of(layer), h, w, channels))
    return infos


class StepCapture:
    """Collects, for a block of images, every layer's conditional-half output at each step.

    The UNet sees the CFG batch ``[uncond..., cond...]``; only the conditional half (the
    one the paper probes) is kept unless ``keep_uncond``. Each output is copied straight
    into the block's host buffer (one copy, cast included), so the device never holds more
    than one step's activations. Finiteness is checked on the host copy by
    :meth:`check_finite`, off the UNet's critical path and after the cast, so a value that
    overflows the store dtype is caught as well as a NaN from the model.
    """

    def __init__(self, layers: list[LayerInfo], n_images: int, n_steps: int,
                 image_ids: list[str], dtype: np.dtype = np.float16, keep_uncond: bool = False):
        self.layers = {info.name: info for info in layers}
        self.block_ids = list(image_ids)
        self.image_ids = list(image_ids)
        self.offset = 0
        self.keep_uncond = keep_uncond
        self.step = 0
        halves = 2 if keep_uncond else 1
        self.buffers = {
            name: np.empty((halves, n_images, n_steps, info.height, info.width, info.channels),
                           dtype=dtype) for name, info in self.layers.items()}
        self.nbytes = sum(b.nbytes for b in self.buffers.values())

    def __call__(self, layer: str, output: torch.Tensor) -> None:
        info = self.layers[layer]
        n, lo = len(self.image_ids), self.offset
        halves = [output[n:]] + ([output[:n]] if self.keep_uncond else [])
        for k, half in enumerate(halves):
            dest = torch.from_numpy(self.buffers[layer][k, lo:lo + n, self.step])
            dest.copy_(half.detach().reshape(n, info.height, info.width, info.channels))
        return None

    def set_batch(self, offset: int, image_ids: list[str]) -> None:
        """The next UNet calls carry these images, stored from buffer row ``offset`` on."""
        self.offset = offset
        self.image_ids = list(image_ids)

    def check_finite(self) -> None:
        """Raise naming where the first NaN or infinity appeared: the earliest step, then
        the first layer in data-flow order, then the first image."""
        first = None  # (step, layer order, half, image, layer)
        for order, (layer, buf) in enumerate(self.buffers.items()):
            finite = np.isfinite(buf).reshape(buf.shape[:3] + (-1,)).all(axis=-1)
            if not finite.all():
                half, image, step = np.nonzero(~finite)
                k = np.lexsort((image, half, step))[0]
                found = (int(step[k]), order, int(half[k]), int(image[k]), layer)
                first = found if first is None else min(first, found)
        if first is not None:
            step, _, half, image, layer = first
            which = "conditional" if half == 0 else "unconditional"
            raise ActstoreError(
                f"non-finite activation in image {self.block_ids[image]!r}, step {step}, "
                f"layer {layer} ({which} half; NaN/inf, or beyond the store dtype's range); "
                "try --dtype float32, --store-dtype float32, or check the model weights")
