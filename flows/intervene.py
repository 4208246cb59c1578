"""Prefect flows: an intervention experiment and its figure; a sweep and its figures.

Thin: tasks call library functions and pass a store URI, run and experiment ids, the
settings object and summaries. With ``workers`` (a local cluster of that many processes)
or ``cluster`` (a running scheduler's address) the experiment's image blocks run as
concurrent task runs on Dask through prefect-dask's ``DaskTaskRunner``, as materialize's
regions do: one worker checks and creates the experiment, block groups go to every
worker (each keeps the store's model and the label model for all the groups it gets), a
failed group is retried and resumes from its recorded blocks. A sweep fanned out runs each
of its experiments (every cell, then the evaluation) that way, one after another on one
cluster, and records the sweep in the command's process (:func:`fanned_out`).
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

from prefect import flow, task

from actstore.cluster import names_worker, portable
from actstore.intervene import blocks
from actstore.intervene.plan import check_request
from actstore.intervene.run import run_interventions
from actstore.intervene.settings import InterventionSettings, SweepSettings
from actstore.intervene.sweep import plan_sweep, run_sweep, sweep_cells
from actstore.plots.interventions import intervention_grid, sweep_figures
from actstore.progress import Progress, progress_topic
from actstore.worker_code import checks_code
from flows.fanout import (REGION_RETRIES, Site, dask_address, gather, on_gpus, relayed_bar,
                          result_of, retry_unless_bad_input)


@task(name="interventions")
def interventions_task(store: str, probe_run: str, settings: InterventionSettings) -> dict:
    return run_interventions(store, probe_run, settings)


@task(name="intervene-plan", retries=REGION_RETRIES, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input)
@checks_code
@names_worker
def plan_blocks_task(store: str, probe_run: str, settings: InterventionSettings,
                     workers: int, provenance: dict | None = None) -> dict:
    return blocks.plan_blocks(store, probe_run, settings, workers=workers,
                              provenance=provenance)


@task(name="intervene-blocks", retries=REGION_RETRIES, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input)
@checks_code
@names_worker
def block_group_task(store: str, probe_run: str, settings: InterventionSettings, group: list,
                     *, experiment_id: str, provenance: dict | None = None,
                     topic: str | None = None) -> dict:
    return blocks.run_block_group(store, probe_run, settings, group,
                                  experiment_id=experiment_id, provenance=provenance,
                                  topic=topic)


@task(name="intervene-summary", retries=REGION_RETRIES, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input)
@checks_code
@names_worker
def finish_blocks_task(store: str, probe_run: str, settings: InterventionSettings, *,
                       experiment_id: str, written: int,
                       provenance: dict | None = None) -> dict:
    return blocks.finish_blocks(store, probe_run, settings, experiment_id=experiment_id,
                                written=written, provenance=provenance)


@flow(name="intervene-blocks")
def intervene_blocks_flow(store: str, probe_run: str, settings: InterventionSettings, *,
                          workers: int, gpu: bool, progress: bool,
                          code: tuple[str, ...] | None = None,
                          provenance: dict | None = None) -> dict:
    """Plan on one worker, then every block group at once; Dask runs as many as it has
    workers (or GPUs); the summary once all are recorded; each task first checks that its
    worker runs ``code`` (the command's, on a user's cluster). ``provenance``: stored with
    the experiment (a sweep cell's role)."""
    t0 = time.perf_counter()
    with on_gpus(gpu):
        plan = result_of(plan_blocks_task.submit(store, probe_run, settings, workers,
                                                 provenance, code=code),
                         store, "planning task", gpu)
        eid = plan["experiment_id"]
        topic = progress_topic(progress)
        futures = [block_group_task.submit(store, probe_run, settings, g, experiment_id=eid,
                                           provenance=provenance, code=code, topic=topic)
                   for g in plan["groups"]]
    bar = Progress(plan["pending_images"] * plan["per_image"], plan["steps"],
                   f"intervene {eid} ({len(futures)} groups, {workers} workers)",
                   enabled=progress)
    with relayed_bar(bar, futures, topic) as relayed:
        done = gather(futures, store, "intervention block groups",
                      lambda d: relayed.finish(
                          d["group"], d["images"] * plan["per_image"] * plan["steps"], 0, 0),
                      gpu=gpu)
    with on_gpus(gpu):
        summary = result_of(finish_blocks_task.submit(
            store, probe_run, settings, experiment_id=eid,
            written=sum(d["blocks_written"] for d in done), provenance=provenance,
            code=code), store,
            "summary task", gpu)
    return {**summary, "seconds": time.perf_counter() - t0, "workers": workers,
            "groups": len(futures), "groups_by_worker": dict(Counter(d["worker"] for d in done))}


@task(name="intervention-grid")
def intervention_grid_task(store: str, experiment_id: str, out_png: str) -> str:
    return intervention_grid(store, experiment_id, out_png)


@task(name="sweep")
def sweep_task(store: str, probe_runs: list[str], settings: SweepSettings, *,
               out_dir: str | None = None, progress: bool = True) -> dict:
    return run_sweep(store, probe_runs, settings, out_dir=out_dir, progress=progress)


@task(name="sweep-figures")
def sweep_figures_task(store: str, sweep_ids: list[str], out_dir: str) -> list[str]:
    return sweep_figures(store, sweep_ids, out_dir)


@flow(name="intervene")
def intervene_flow(store: str, probe_run: str,
                   settings: InterventionSettings = InterventionSettings(), *,
                   figure: str | None = None, workers: int | None = None,
                   cluster: str | None = None, progress: bool = True) -> dict:
    """Run (or resume) one experiment, in this process or over ``workers`` local processes
    / the scheduler at ``cluster``; draw its grid to ``figure`` once it is complete."""
    if workers or cluster:
        blocks.check_portable(settings)
        check_request(store, probe_run, settings)   # a typo: refused here, at once
        with fanned_out(workers, cluster, settings.device, progress) as run_experiment:
            summary = run_experiment(store, probe_run, settings, None)
    else:
        summary = interventions_task(store, probe_run, settings)
    if figure and summary["complete"]:
        summary["figure"] = intervention_grid_task(store, summary["experiment_id"], figure)
    return summary


@flow(name="sweep")
def sweep_flow(store: str, probe_runs: list[str], settings: SweepSettings = SweepSettings(),
               out_dir: str | None = None, *, workers: int | None = None,
               cluster: str | None = None, site: Site | None = None,
               progress: bool = True) -> dict:
    """Choose a setting per probe run on validation images, report it on other images; in
    this process, or each cell's experiment fanned out as ``intervene``'s is, over one
    cluster for the whole sweep (checked before it starts; ``site``: a caller's open one,
    the main job's)."""
    if not (workers or cluster or site):
        return sweep_task(store, probe_runs, settings, out_dir=out_dir, progress=progress)
    blocks.check_portable(settings.base)
    plan = plan_sweep(store, probe_runs, settings, out_dir=out_dir)
    with fanned_out(workers, cluster, settings.base.device, progress,
                    site) as run_experiment:
        return {**sweep_cells(plan, run_experiment), "workers": run_experiment.workers}


@contextmanager
def fanned_out(workers: int | None, cluster: str | None, device: str | None,
               progress: bool, site: Site | None = None) -> Iterator[Callable[..., dict]]:
    """A function running (or resuming) one experiment's blocks on ``workers`` local
    processes or the scheduler at ``cluster`` (or a caller's open ``site``), as
    :func:`intervene_blocks_flow`: (store, probe run, settings, provenance) -> its summary.
    One cluster serves every experiment run through it (a sweep's cells), so each worker
    loads the model once for them all."""
    from prefect_dask import DaskTaskRunner

    with dask_address(workers, cluster, device, site) as (address, n, gpu, code):
        def run(store: str, probe_run: str, settings: InterventionSettings,
                provenance: dict | None) -> dict:
            return intervene_blocks_flow.with_options(
                task_runner=DaskTaskRunner(address=address))(
                portable(store), probe_run, settings, workers=n, gpu=gpu, progress=progress,
                code=code, provenance=provenance)
        run.workers = n
        yield run
