"""The denoising loop, written out so that every step is visible and hookable.

It follows diffusers' ``StableDiffusionPipeline.__call__`` for SD v1.x (same scheduler calls,
same CFG arithmetic) but draws each image's initial latent from its *own* seeded CPU
generator, so an image is the same whatever batch or machine produced it, and it exposes the
scheduler's prediction of the clean latent (x0) at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from actstore.catalog import SD_GUIDANCE
from actstore.cluster import stop_if_cancelled
from actstore.generation.models import LoadedModel

if TYPE_CHECKING:
    from diffusers import LMSDiscreteScheduler


@dataclass(frozen=True)
class GenerationConfig:
    """What determines the images, and so what must match to extend a store."""

    steps: int = 15
    guidance: float = SD_GUIDANCE
    height: int | None = None  # None: the model's native resolution
    width: int | None = None
    scheduler: str = "lms"

    def __post_init__(self):
        """A zero or negative count would create a store that can never be filled."""
        from actstore.errors import ActstoreError

        for name in ("steps", "height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value
                                      or value < 1):
                raise ActstoreError(f"--{name} {value}: must be a whole number >= 1")

    def resolved(self, model: LoadedModel) -> "GenerationConfig":
        return self.at_size(model.native_size)

    def at_size(self, size: int) -> "GenerationConfig":
        """Height and width left unset become ``size`` (the model's native side)."""
        return GenerationConfig(self.steps, self.guidance, self.height or size,
                                self.width or size, self.scheduler)

    def check_size(self, vae_scale_factor: int) -> None:
        """Sizes the UNet's three down-samplings of the latent cannot take, refused."""
        from actstore.errors import InputError

        f = vae_scale_factor
        if self.height % (8 * f) or self.width % (8 * f):
            raise InputError(f"--height/--width {self.height}x{self.width}: must be multiples "
                             f"of {8 * f} for this model")


def make_scheduler(model: LoadedModel, name: str = "lms") -> LMSDiscreteScheduler:
    """A fresh scheduler per batch: LMS keeps per-run state (its derivative history)."""
    from diffusers import LMSDiscreteScheduler

    if name != "lms":
        from actstore.errors import ActstoreError
        raise ActstoreError(f"scheduler {name!r} is not supported; use lms (as the paper)")
    return LMSDiscreteScheduler.from_config(model.scheduler_config)


def initial_latents(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """One CPU generator per image: batching and device never change an image's noise."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def encode_prompts(model: LoadedModel, prompts: list[str]) -> torch.Tensor:
    tok = model.tokenizer(prompts, padding="max_length", truncation=True,
                          max_length=model.tokenizer.model_max_length, return_tensors="pt")
    return model.text_encoder(tok.input_ids.to(model.device))[0]


@torch.no_grad()
def decode_images(model: LoadedModel, latents: torch.Tensor) -> np.ndarray:
    """Latents → uint8 (N, H, W, 3), rounded the way diffusers' image processor does."""
    scale = model.vae.config.scaling_factor
    images = model.vae.decode(latents.to(model.dtype) / scale).sample
    # A blown-up intervention decodes NaN: black pixels, so the uint8 cast is defined (the
    # edit is counted as non-finite where it happened, in the experiment's edit stats).
    images = torch.nan_to_num(images.float() / 2 + 0.5, nan=0.0).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def generate(model: LoadedModel, prompts: list[str], seeds: list[int], config: GenerationConfig,
             *, on_step_start: Callable[[int], None] | None = None,
             on_step_end: StepCallback | None = None) -> np.ndarray:
    """Generate one batch; returns the final images as uint8 (N, H, W, 3).

    ``on_step_start(i)`` runs before the UNet call of step ``i`` (capture uses it to know the
    step); ``on_step_end(i, latents, x0)`` after the scheduler update.
    """
    config = config.resolved(model)
    f = model.vae_scale_factor
    shape = (model.unet.config.in_channels, config.height // f, config.width // f)
    scheduler = make_scheduler(model, config.scheduler)
    scheduler.set_timesteps(config.steps, device=model.device)

    cond = encode_prompts(model, prompts)
    uncond = encode_prompts(model, [""] * len(prompts))
    context = torch.cat([uncond, cond])
    latents = initial_latents(seeds, shape).to(model.device, model.dtype)
    latents = latents * scheduler.init_noise_sigma

    for i, t in enumerate(scheduler.timesteps):
        stop_if_cancelled()     # a Dask task whose command was interrupted ends here
        if on_step_start is not None:
            on_step_start(i)
        latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_uncond, noise_cond = model.unet(latent_in, t,
                                              encoder_hidden_states=context).sample.chunk(2)
        noise = noise_uncond + config.guidance * (noise_cond - noise_uncond)
        out = scheduler.step(noise, t, latents)
        latents = out.prev_sample
        if on_step_end is not None:
            on_step_end(i, latents, out.pred_original_sample)
    return decode_images(model, latents)


def schedule_coords(model: LoadedModel, config: GenerationConfig) -> dict[str, np.ndarray]:
    """Timestep and sigma of each step, stored as coordinates of the ``step`` dimension."""
    scheduler = make_scheduler(model, config.scheduler)
    scheduler.set_timesteps(config.steps)
    return {"timestep": scheduler.timesteps.cpu().numpy().astype(np.float32),
            "sigma": scheduler.sigmas[: config.steps].cpu().numpy().astype(np.float32)}
