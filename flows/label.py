"""Prefect flow: write probe targets (labels) into a store, in this process or fanned out
over a Dask cluster.

Thin: tasks call library functions and hand each other the store URI, a label job (image
ids, version paths, settings: kilobytes) and block lists, never arrays. With ``workers``
(a local cluster of that many processes) or ``cluster`` (a running scheduler) each pass's
missing image blocks run as concurrent task runs on Dask through prefect-dask's
``DaskTaskRunner``, the path materialize fans out on; every worker process loads the label
model once. This process checks the input, begins the run's versions and commits them, so
it holds their writer marks; a block group that fails is retried, and a rerun of a killed
run resumes from its recorded blocks (:mod:`actstore.label.blocks`).
"""

from __future__ import annotations

import time
from collections import Counter

from prefect import flow, task

from actstore.cluster import names_worker, portable, spread
from actstore.errors import ActstoreError
from actstore.label import blocks
from actstore.label.labels import (abort_labels, check_labels, commit_labels, prepare_labels,
                                   write_labels)
from actstore.label.providers import LabelProvider, describe_provider
from actstore.label.settings import LabelSettings
from actstore.progress import Progress, progress_topic, relaying
from actstore.store import labelsets
from actstore.worker_code import checks_code
from flows.fanout import (REGION_RETRIES, BlocksFailed, Site, dask_address, gather, on_gpus,
                          relayed_bar, retry_unless_bad_input)

# How often this process looks at the run's marks while a pass runs on the workers (two
# small reads per version). The workers check before each block's writes but can't put
# back the mark this process holds; see _marks_kept.
MARK_CHECK_S = 10.0


@task(name="label")
def label_task(store: str, provider: str, target: str | list[str],
               settings: LabelSettings = LabelSettings()) -> dict:
    """Several targets in one task: the provider runs once over the images for all of them."""
    return write_labels(store, provider, target, settings)


@task(name="label-blocks", retries=REGION_RETRIES, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_bad_input)
@checks_code
@names_worker
def label_blocks_task(job: blocks.LabelJob, stage: str, blks: list, constants: dict | None,
                      topic: str | None = None) -> dict:
    name = f"{stage}{blks[0][0]}:{blks[-1][1]}"
    return {**blocks.run_blocks(job, stage, [tuple(b) for b in blks], constants,
                                bar=relaying(topic, name)), "group": name}


def _run_pass(job: blocks.LabelJob, stage: str, groups: list, constants: dict | None,
              gpu: bool, progress: bool, code: tuple[str, ...] | None) -> list[dict]:
    """Every block group of one pass at once; Dask runs as many as it has workers (or
    GPUs: one group at a time on each worker offering a ``GPU`` resource)."""
    topic = progress_topic(progress)
    with on_gpus(gpu):
        futures = [label_blocks_task.submit(job, stage, g, constants, topic, code=code)
                   for g in groups]
    per_image = 1 if stage == blocks.PASS1 else job.n_steps   # final images, x0 per step
    bar = Progress(sum(b - a for g in groups for a, b in g), per_image,
                   f"label {stage.strip('_')} ({len(groups)} groups)", enabled=progress,
                   unit="image" if stage == blocks.PASS1 else "img-step")
    with relayed_bar(bar, futures, topic) as relayed:
        return gather(futures, job.store, "label block groups",
                      lambda d: relayed.finish(d["group"], d["images"] * per_image, 0, 0),
                      gpu=gpu, on_wait=_marks_kept(job))


def _marks_kept(job: blocks.LabelJob):
    """This process's look at the run's marks every MARK_CHECK_S while the workers label.

    A displaced run's heartbeat can put its mark back over this run's (the last PUT
    wins); the mark then names a writer with no birth record, and a clean-up or a rerun
    of the job judges the version by this run's birth record, which gives its start, not
    its last renewal: a run begun more than a day ago (STALE_AFTER_S) looks gone, and its
    version was removed under its live workers (tests/test_label_driver_marks.py). Only
    this process can put the mark back (it holds the mark's writer and its renewals);
    before, it did so at its next control step or heartbeat, hours into a long pass. The
    same look stops the command in one line as soon as another writer took the run
    over, instead of at the next block a worker starts."""
    last = [time.monotonic()]

    def look() -> None:
        if time.monotonic() - last[0] >= MARK_CHECK_S:
            last[0] = time.monotonic()
            job.check_owned()
    return look


@flow(name="label-blocks")
def label_blocks_flow(job: blocks.LabelJob, workers: int, gpu: bool, progress: bool,
                      code: tuple[str, ...] | None = None) -> dict:
    """Both passes over the blocks not yet recorded; the z-score constants in between;
    each task first checks that its worker runs ``code`` (the command's, on a user's
    cluster)."""
    resumed, constants, by_worker = {}, None, Counter()
    for stage in (blocks.PASS1, blocks.PASS2):
        todo = blocks.pending(job, stage)
        resumed[stage.strip("_")] = len(job.blocks) - len(todo)
        if stage == blocks.PASS2:
            constants = blocks.stats(job)
        if todo:
            done = _run_pass(job, stage, spread(todo, workers), constants, gpu,
                             progress, code)
            by_worker.update(d["worker"] for d in done)
    return {"constants": constants, "blocks_resumed": resumed,
            "groups_by_worker": dict(by_worker)}


def fan_out_labels(store: str, prov: LabelProvider, target: str | list[str] | tuple[str, ...],
                   settings: LabelSettings, *,
                   address: str, workers: int, gpu: bool, progress: bool,
                   code: tuple[str, ...] | None = None) -> dict:
    """``prov``: :func:`describe_provider`'s, for the run's identity and input check; the
    workers load the model (each once, by ``prov.spec``)."""
    from prefect_dask import DaskTaskRunner

    job = prepare_labels(store, prov, target, settings)
    try:
        run = label_blocks_flow.with_options(task_runner=DaskTaskRunner(address=address))(
            job, workers, gpu, progress, code)
        out = commit_labels(job, prov, run.pop("constants"))
    except BlocksFailed:
        raise
    except ActstoreError:
        abort_labels(job)
        raise
    finally:
        labelsets.release(job.paths)
    for summary in out.values():
        summary.update(workers=workers, blocks=len(job.blocks), **run)
    return out


@flow(name="label")
def label_flow(store: str, provider: str, target: str | list[str],
               settings: LabelSettings = LabelSettings(), *, workers: int | None = None,
               cluster: str | None = None, site: Site | None = None,
               progress: bool = True) -> dict:
    """Label the store's final images (and per-step x0 images) for one or several targets,
    in this process or over ``workers`` local processes / the scheduler at ``cluster`` /
    the open ``site`` of a caller's (the main job's, which checked its workers' device)."""
    if not (workers or cluster or site):
        return label_task(store, provider, target, settings)
    prov = describe_provider(provider, settings.device)   # a bad one before the cluster
    check_labels(portable(store), prov, target, settings)   # and a bad target or store
    with dask_address(workers, cluster, settings.device, site) as (address, n, gpu, code):
        out = fan_out_labels(portable(store), prov, target, settings, address=address,
                             workers=n, gpu=gpu, progress=progress, code=code)
    return out[target] if isinstance(target, str) else out
