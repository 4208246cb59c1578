"""Prefect flow: the probe grid for a labelled target, and its figures.

Tasks call library functions and hand each other store URIs, target names, the settings
object and run ids.
"""

from __future__ import annotations

from prefect import flow, task

from actstore.plots.figures import probe_figures
from actstore.probe.runs import run_probes
from actstore.probe.settings import ProbeSettings


@task(name="probe-grid")
def probe_task(store: str, target: str, settings: ProbeSettings = ProbeSettings(), *,
               scheduler: str | None = None) -> str:
    from actstore.cluster import dask_scheduler

    with dask_scheduler(scheduler) as sched:
        return run_probes(store, target, settings, scheduler=sched)


@task(name="probe-figures")
def figures_task(store: str, target: str, out_dir: str) -> list[str]:
    return probe_figures(store, target, out_dir)


@flow(name="probe")
def probe_flow(store: str, target: str, settings: ProbeSettings = ProbeSettings(), *,
               scheduler: str | None = None, figures: str | None = None) -> dict:
    """Fit the grid for ``target`` (labels must exist) and optionally draw its figures;
    the grid runs on the Dask ``scheduler`` given (default: a local cluster)."""
    run_id = probe_task(store, target, settings, scheduler=scheduler)
    out = {"store": store, "target": target, "run_id": run_id}
    if figures:
        out["figures"] = figures_task(store, target, figures)
    return out
