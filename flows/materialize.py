"""Prefect flow: materialize a store (trained model or its randomized control).

Thin by design: each task calls one library function and tasks exchange store URIs and
small summaries, never arrays or models.
"""

from __future__ import annotations

from prefect import flow, task

from actstore.catalog import SD_GUIDANCE
from actstore.generation.sampling import GenerationConfig
from actstore.generation.materialize import CaptureConfig, materialize
from actstore.plots.figures import sample_grid


@task(name="materialize-region")
def materialize_region(model: str, prompts: str, store: str, images: str | None,
                       batch_size: int, gen: dict, cap: dict, dtype: str, device: str,
                       control: str | None, block_size: int | None) -> dict:
    return materialize(model, prompts, store, images=images, batch_size=batch_size,
                       gen=GenerationConfig(**gen), cap=CaptureConfig(**cap), dtype=dtype,
                       device=device, control=control, block_size=block_size)


@task(name="sample-grid")
def sample_grid_task(store: str, variant: str, out_png: str) -> str:
    return sample_grid(store, variant, out_png)


@flow(name="materialize")
def materialize_flow(model: str, prompts: str, store: str, images: str | None = None,
                     batch_size: int = 4, steps: int = 15, guidance: float = SD_GUIDANCE,
                     height: int | None = None, width: int | None = None,
                     device: str = "auto", dtype: str = "float32",
                     control: str | None = None, codec: str = "zstd",
                     store_dtype: str = "float16", keep_uncond: bool = False, x0: bool = True,
                     block_size: int | None = None, grid_png: str | None = None) -> dict:
    """Fill ``store`` (or the region ``images`` = "A:B" of it) and draw a sample grid.

    ``guidance`` defaults to SD's 7.5; a caller with a catalog model passes the model's own
    (``catalog.resolve_guidance``: the CLI does, and the nightly deployment says 3 for
    toy-ldm)."""
    gen = {"steps": steps, "guidance": guidance, "height": height, "width": width}
    cap = {"codec": codec, "store_dtype": store_dtype, "keep_uncond": keep_uncond, "x0": x0}
    summary = materialize_region(model, prompts, store, images, batch_size, gen, cap, dtype,
                                 device, control, block_size)
    if grid_png:
        summary["grid_png"] = sample_grid_task(store, summary["model"], grid_png)
    return summary
