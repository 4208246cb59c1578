"""Prefect flow: materialize a store (trained model or its randomized control), in this
process or fanned out over a Dask cluster.

Thin by design: each task calls one library function and tasks exchange store URIs,
settings and small summaries, never arrays or models. With ``workers`` (a local cluster of
that many processes) or ``cluster`` (an existing scheduler's address), the store's missing
blocks are cut into block-aligned regions that run as concurrent task runs on Dask through
prefect-dask's ``DaskTaskRunner``; each worker process loads the model once and keeps it
for every region it gets. Workers that offer a ``GPU`` resource
(``dask worker ADDRESS --nthreads 1 --resources GPU=1``) get one region at a time each.
A region that fails is retried and resumes from its recorded blocks, unless it failed on
bad input (which fails the same way every time); a lost worker's region is rerun by Dask
on another.
"""

from __future__ import annotations

import time
from collections import Counter

from prefect import flow, task

from actstore.cluster import names_worker, portable
from actstore.generation.materialize import MaterializeSettings, completion, format_completion
from actstore.generation.regions import materialize_region, plan_regions
from actstore.plots.figures import sample_grid
from actstore.progress import Progress, progress_topic
from actstore.worker_code import checks_code
from flows.fanout import (REGION_RETRIES, dask_address, gather, on_gpus, relayed_bar,
                          result_of, retry_unless_bad_input)


@task(name="materialize-region", retries=REGION_RETRIES, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input)
@checks_code
@names_worker
def region_task(model: str, prompts: str, store: str, settings: MaterializeSettings, *,
                images: str | None, progress: bool = False, topic: str | None = None) -> dict:
    return materialize_region(model, prompts, store, settings, images=images,
                              progress=progress, topic=topic)


@task(name="plan-regions", retries=REGION_RETRIES, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input)
@checks_code
@names_worker
def plan_task(model: str, prompts: str, store: str, settings: MaterializeSettings, *,
              images: str | None, workers: int) -> dict:
    return plan_regions(model, prompts, store, settings, images=images, workers=workers)


@task(name="sample-grid")
def sample_grid_task(store: str, variant: str, out_png: str) -> str:
    return sample_grid(store, variant, out_png)


@task(name="store-completion")
def completion_task(store: str) -> dict:
    return completion(store)


@flow(name="materialize-regions")
def regions_flow(model: str, prompts: str, store: str, settings: MaterializeSettings, *,
                 images: str | None, workers: int, gpu: bool, progress: bool,
                 code: tuple[str, ...] | None = None) -> dict:
    """Plan on one worker (which creates the store and keeps the model), then every region
    at once; Dask runs as many as it has workers (or GPUs); each task first checks that
    its worker runs ``code`` (the command's, on a user's cluster)."""
    with on_gpus(gpu):
        plan = result_of(plan_task.submit(model, prompts, store, settings, images=images,
                                          workers=workers, code=code),
                         store, "planning task", gpu)
        topic = progress_topic(progress)
        futures = [region_task.submit(model, prompts, store, settings, images=region,
                                      code=code, topic=topic)
                   for region in plan["regions"]]
    steps = settings.gen.steps
    bar = Progress(plan["pending_images"], steps, f"materialize {plan['model']} "
                   f"({len(futures)} regions, {workers} workers)", enabled=progress)
    t0 = time.perf_counter()
    with relayed_bar(bar, futures, topic) as relayed:

        def done(summary: dict) -> None:
            # the region's images, generated or found recorded by another writer meanwhile
            # (two commands on one new store both plan every block): else the bar ended at
            # 25% or 0% above a 'complete' line
            start, stop = (int(i) for i in summary["region"].split(":"))
            relayed.finish(summary["region"], (stop - start) * steps, stop - start,
                           summary["bytes"])
        summaries = gather(futures, store, "regions", done, gpu=gpu)
    blocks, added = (sum(s[key] for s in summaries) for key in ("blocks_written",
                                                                 "blocks_added_to"))
    return {"store": store, "model": plan["model"], "blocks_written": blocks,
            "blocks_added_to": added, "blocks_skipped": plan["blocks"] - blocks - added,
            "images": sum(s["images"] for s in summaries),
            "regenerated_and_checked": sum(s["regenerated_and_checked"] for s in summaries),
            "bytes": sum(s["bytes"] for s in summaries),
            "seconds": time.perf_counter() - t0,
            "regions": len(futures),
            "regions_by_worker": dict(Counter(s["worker"] for s in summaries))}


def fill_store(model: str, prompts: str, store: str, settings: MaterializeSettings, *,
               images: str | None, address: str | None, workers: int, gpu: bool,
               progress: bool, code: tuple[str, ...] | None = None) -> dict:
    """One variant, in this process (``address`` None) or fanned out over a scheduler."""
    if address is None:
        return region_task(model, prompts, store, settings, images=images, progress=progress)
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=address)
    return regions_flow.with_options(task_runner=runner)(
        model, prompts, store, settings, images=images, workers=workers, gpu=gpu,
        progress=progress, code=code)


@flow(name="materialize")
def materialize_flow(model: str, prompts: str, store: str,
                     settings: MaterializeSettings = MaterializeSettings(), *,
                     images: str | None = None, workers: int | None = None,
                     cluster: str | None = None, grid_png: str | None = None,
                     progress: bool = True) -> dict:
    """Fill ``store`` (or the region ``images`` = "A:B" of it), say whether it is complete,
    and draw a sample grid.

    ``settings.gen.guidance`` defaults to SD's 7.5; a caller with a catalog model passes
    the model's own (``catalog.resolve_guidance``: the CLI does, and the deployments say 3
    for toy-ldm). Relative paths are taken from this process's folder (a deployment's
    working directory), also on workers started elsewhere."""
    model, prompts, store = portable(model, named=True), portable(prompts), portable(store)
    with dask_address(workers, cluster, settings.device) as (address, n, gpu, code):
        summary = fill_store(model, prompts, store, settings, images=images, address=address,
                             workers=n, gpu=gpu, progress=progress, code=code)
    if grid_png:
        summary["grid_png"] = sample_grid_task(store, summary["model"], grid_png)
    summary["complete"] = completion_task(store)
    summary["status"] = format_completion(store, summary["complete"])
    return summary
