"""Materialize on many workers: block-aligned regions, and one model per worker process.

A worker process (a Dask worker, one per GPU or per group of cores) runs region after
region; loading the model is the costly part of a region's start (SD v1.4: seconds and
4 GB), so each process keeps the model it loaded last and reuses it while the model's
settings stay the same. One region runs at a time per process: forward hooks live on the
shared UNet, so two regions on one model object would capture each other's activations.
"""

from __future__ import annotations

import math

from actstore.cluster import MODEL_LOCK as _LOCK
from actstore.cluster import local_dask, shared, worker_id
from actstore.generation.materialize import MaterializeSettings, materialize, prepare
from actstore.generation.models import LoadedModel, apply_control, load_model
from actstore.progress import relayed

_LOADS: list[tuple] = []               # every load this process made, for the tests' count


def shared_model(model: str, settings: MaterializeSettings) -> LoadedModel:
    """This process's model for ``settings``: loaded on first use, then reused."""
    return store_model(model, dtype=settings.dtype, device=settings.device,
                       variant=settings.control or "trained")


def store_model(ref: str, *, dtype: str, device: str, variant: str) -> LoadedModel:
    """This process's model ``ref`` in ``variant`` (trained or randomized): one per process,
    shared by materialize regions and intervention blocks alike."""
    key = (ref, dtype, device, variant)

    def load() -> LoadedModel:
        _LOADS.append(key)
        return load_model(ref, dtype=dtype, device=device)

    with _LOCK:
        return apply_control(shared("model", key, load),
                             None if variant == "trained" else variant)


def model_loads() -> int:
    """How many times this process loaded a model (``Client.run`` asks each worker)."""
    return len(_LOADS)


@local_dask
def plan_regions(model: str, prompts: str, store: str, settings: MaterializeSettings, *,
                 images: str | None = None, workers: int = 1, per_worker: int = 4) -> dict:
    """Create the store and variant (once), then cut its missing blocks into regions.

    About ``per_worker`` regions per worker: enough that a slow or lost worker delays the
    run by a fraction of its share, few enough that each region keeps its writer busy
    behind the UNet for several blocks. Regions never straddle a completed block, so a
    rerun only schedules what is missing.
    """
    with _LOCK:
        plan = prepare(shared_model(model, settings), prompts, store, settings, images=images)
    pending = [tuple(b) for b in plan.pop("pending")]
    per_region = max(1, math.ceil(len(pending) / max(1, workers * per_worker)))
    runs: list[list[tuple[int, int]]] = []
    for blk in pending:  # contiguous runs of missing blocks
        if runs and runs[-1][-1][1] == blk[0]:
            runs[-1].append(blk)
        else:
            runs.append([blk])
    regions = [f"{run[i][0]}:{run[min(i + per_region, len(run)) - 1][1]}"
               for run in runs for i in range(0, len(run), per_region)]
    return {**plan, "pending_images": sum(b - a for a, b in pending), "regions": regions,
            "worker": worker_id()}


@local_dask
def materialize_region(model: str, prompts: str, store: str, settings: MaterializeSettings,
                       *, images: str, progress: bool = False,
                       topic: str | None = None) -> dict:
    """Fill one region with this process's shared model; resumes from recorded blocks.
    ``topic``: where its progress goes on a Dask worker (:func:`actstore.progress.relayed`)."""
    relay = relayed(topic, images) if topic else None
    with _LOCK:
        summary = materialize(shared_model(model, settings), prompts, store, settings,
                              images=images, progress=progress, relay=relay)
    return {**summary, "region": images, "worker": worker_id()}
