"""Capturing a block of images: hooks on the run's capture points fill host buffers.

Where the points are and what they are named: :mod:`actstore.generation.points`. The paper's
main object is ``attn1``: the output of ``<block>.attentions.<j>.transformer_blocks.0.attn1``,
the self-attention result *before* the residual add, exactly where the paper's authors
hooked ``to_out``; a layer is named by its ``<block>.attentions.<j>`` prefix, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from actstore.errors import ActstoreError
from actstore.generation.points import (ATTN1_SUFFIX, CapturePoint, block_of, capture_points,
                                        decode_until, hooks, self_attention_layers,
                                        token_grid)

if TYPE_CHECKING:
    import pandas as pd

    from actstore.generation.models import LoadedModel
    from actstore.generation.sampling import GenerationConfig
    from actstore.progress import Progress

__all__ = ["ATTN1_SUFFIX", "CapturePoint", "CapturedBlock", "LayerInfo", "StepCapture",
           "attn1_hooks", "attn1_module", "block_of", "capture_block", "capture_points",
           "hooks", "self_attention_layers", "token_grid"]

LayerInfo = CapturePoint   # the name stores and older callers use for an attn1 point


def attn1_module(unet: torch.nn.Module, layer: str) -> torch.nn.Module:
    return unet.get_submodule(layer + ATTN1_SUFFIX)


def attn1_hooks(unet: torch.nn.Module, layers: list[str],
                fn: Callable[[str, torch.Tensor], torch.Tensor | None]
                ) -> AbstractContextManager[None]:
    """:func:`~actstore.generation.points.hooks` under its first name: any UNet capture
    point's name works, attn1 layers as before."""
    return hooks(unet, layers, fn)


class StepCapture:
    """Collects, for a block of images, every capture point's conditional-half output at
    each step (UNet points through :func:`hooks`, VAE points through :meth:`decode`).

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

    def decode(self, model: LoadedModel, latents: torch.Tensor, batch_size: int) -> None:
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


@dataclass
class CapturedBlock:
    """One block of images generated with its capture points hooked, held on the host.

    ``activations``/``uncond`` map point names to (n, steps, h, w, C) arrays; VAE points
    are filled, the finiteness check made and x0 images decoded by ``finish`` (returns
    ``{"x0_image": ...}`` or ``{}``), which the store writer runs while the next block
    generates (on a second core, or queued behind the UNet on a GPU).
    """

    ids: list[str]
    final: np.ndarray
    activations: dict[str, np.ndarray]
    uncond: dict[str, np.ndarray] | None
    finish: Callable[[], dict[str, np.ndarray]]


def capture_block(model: LoadedModel, rows: pd.DataFrame, gen: GenerationConfig,
                  points: list[CapturePoint], *, batch_size: int,
                  store_dtype: str = "float16", keep_uncond: bool = False, x0: bool = True,
                  vae_source: str = "latent", bar: Progress | None = None) -> CapturedBlock:
    """Generate ``rows`` (image_id, prompt, seed) in batches, capturing ``points``.

    The vae points decode, at every step, the latent after that step's update (the paper's
    "partially denoised latent"; at the last step the final image's latent) or, with
    ``vae_source="x0"``, the step's prediction of the clean latent.
    """
    from actstore.generation.sampling import decode_images, generate

    n = len(rows)
    ids = rows["image_id"].astype(str).tolist()
    capture = StepCapture(points, n, gen.steps, ids, np.dtype(store_dtype), keep_uncond)
    f = model.vae_scale_factor
    latent_shape = (n, gen.steps, model.unet.config.in_channels, gen.height // f,
                    gen.width // f)
    x0_latents = torch.empty(latent_shape) if x0 else None
    vae_latents = torch.empty(latent_shape) if len(capture.unet_points) < len(points) else None
    final = np.empty((n, gen.height, gen.width, 3), np.uint8)
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        capture.set_batch(lo, ids[lo:hi])

        def on_start(i: int) -> None:
            capture.step = i

        def on_end(i: int, latents, x0_step) -> None:
            if x0_latents is not None:
                x0_latents[lo:hi, i] = x0_step.to("cpu", torch.float32)
            if vae_latents is not None:
                source = x0_step if vae_source == "x0" else latents
                vae_latents[lo:hi, i] = source.to("cpu", torch.float32)
            if bar is not None:
                bar.step(hi - lo)

        with hooks(model, capture.unet_points, capture):
            final[lo:hi] = generate(model, rows["prompt"].iloc[lo:hi].tolist(),
                                    rows["seed"].iloc[lo:hi].tolist(), gen, on_step_start=on_start,
                                    on_step_end=on_end)

    def finish() -> dict[str, np.ndarray]:
        if vae_latents is not None:
            capture.decode(model, vae_latents, batch_size)
        capture.check_finite()
        if x0_latents is None:
            return {}
        flat = x0_latents.reshape(n * gen.steps, *x0_latents.shape[2:])
        images = np.concatenate([decode_images(model, flat[k:k + batch_size].to(model.device))
                                 for k in range(0, len(flat), batch_size)])
        return {"x0_image": images.reshape(n, gen.steps, *images.shape[1:])}

    return CapturedBlock(ids, final, {name: buf[0] for name, buf in capture.buffers.items()},
                         {name: buf[1] for name, buf in capture.buffers.items()
                          if buf.shape[0] == 2} if keep_uncond else None, finish)
