"""Capturing a block of images: hooks on the run's capture points fill host buffers.

Where the points are and what they are named: :mod:`actstore.generation.points`. The paper's
main object is ``attn1``: the output of ``<block>.attentions.<j>.transformer_blocks.0.attn1``,
the self-attention result *before* the residual add, exactly where the paper's authors
hooked ``to_out``; a layer is named by its ``<block>.attentions.<j>`` prefix, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from actstore.errors import ActstoreError
from actstore.generation.points import (ATTN1_SUFFIX, CapturePoint, block_of, capture_points,
                                        decode_until, hooks, self_attention_layers,
                                        token_grid)

__all__ = ["ATTN1_SUFFIX", "CapturePoint", "LayerInfo", "StepCapture", "attn1_hooks",
           "attn1_module", "block_of", "capture_points", "hooks", "self_attention_layers",
           "token_grid"]

LayerInfo = CapturePoint   # the name stores and older callers use for an attn1 point


def attn1_module(unet: torch.nn.Module, layer: str) -> torch.nn.Module:
    return unet.get_submodule(layer + ATTN1_SUFFIX)


def attn1_hooks(unet, layers: list[str], fn: Callable[[str, torch.Tensor], torch.Tensor | None]):
    """:func:`~actstore.generation.points.hooks` under its first name: any UNet capture
    point's name works, attn1 layers as before."""
    return hooks(unet, layers, fn)


class StepCapture:
    """Collects, for a block of images, every layer's conditional-half output at each step.

    The UNet sees the CFG batch ``[uncond..., cond...]``; only the conditional half (the
    one the paper probes) is kept unless ``keep_uncond``. Each output is copied straight
    into the block's host buffer (one copy, cast included), so the device never holds more
    than one step's activations. Finiteness is checked on the host copy by
    :meth:`check_finite`, off the UNet's critical path and after the cast, so a value that
    overflows the store dtype is caught as well as a NaN from the model.
    """

    def __init__(self, layers: list[CapturePoint], n_images: int, n_steps: int,
                 image_ids: list[str], dtype: np.dtype = np.float16, keep_uncond: bool = False):
        self.layers = {info.name: info for info in layers}
        self.block_ids = list(image_ids)
        self.image_ids = list(image_ids)
        self.offset = 0
        self.keep_uncond = keep_uncond
        self.step = 0
        self.buffers = {
            name: np.empty((2 if keep_uncond and info.cfg else 1, n_images, n_steps,
                            info.height, info.width, info.channels), dtype=dtype)
            for name, info in self.layers.items()}
        self.nbytes = sum(b.nbytes for b in self.buffers.values())

    @property
    def unet_points(self) -> list[str]:
        """The points hooked during denoising (the others are captured by :meth:`decode`)."""
        return [name for name, info in self.layers.items() if info.cfg]

    def __call__(self, layer: str, output: torch.Tensor) -> None:
        """A :func:`hooks` callback: ``output`` is the CFG batch as tokens (2n, T, C)."""
        info = self.layers[layer]
        n, lo = len(self.image_ids), self.offset
        halves = [output[n:]] + ([output[:n]] if self.keep_uncond else [])
        for k, half in enumerate(halves):
            dest = torch.from_numpy(self.buffers[layer][k, lo:lo + n, self.step])
            dest.copy_(half.detach().reshape(n, info.height, info.width, info.channels))
        return None

    def decode(self, model, latents: torch.Tensor, batch_size: int) -> None:
        """Capture the VAE points by decoding ``latents`` (n, steps, C, h, w): each image's
        latent at every step, ``batch_size`` latents per decoder call."""
        names = [name for name, info in self.layers.items() if not info.cfg]
        if not names:
            return
        n, steps = latents.shape[:2]
        flat = latents.reshape(n * steps, *latents.shape[2:])
        for k in range(0, len(flat), batch_size):
            rows = np.arange(k, min(k + batch_size, len(flat)))

            def keep(name: str, tokens: torch.Tensor, rows=rows) -> None:
                info = self.layers[name]
                data = tokens.detach().reshape(len(rows), info.height, info.width,
                                               info.channels).to("cpu", torch.float32).numpy()
                self.buffers[name][0, rows // steps, rows % steps] = data

            decode_until(model, flat[rows[0]:rows[-1] + 1].to(model.device), names, keep)

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
