"""Prefect flow: the probe grid for a labelled target, and its figures.

Tasks call library functions and hand each other store URIs, target names and run ids.
"""

from __future__ import annotations

from prefect import flow, task

from actstore.plots.figures import probe_figures
from actstore.probe.runs import run_probes


@task(name="probe-grid")
def probe_task(store: str, target: str, *, models: list[str] | None = None,
               layers: list[str] | None = None, steps: list[int] | None = None,
               scheduler: str | None = None, label_spearman: bool = False) -> str:
    from actstore.cluster import dask_scheduler

    with dask_scheduler(scheduler) as sched:
        return run_probes(store, target, models=models, layers=layers, steps=steps,
                          scheduler=sched, label_spearman=label_spearman)


@task(name="probe-figures")
def figures_task(store: str, target: str, out_dir: str) -> list[str]:
    return probe_figures(store, target, out_dir)


@flow(name="probe")
def probe_flow(store: str, target: str, *, models: list[str] | None = None,
               layers: list[str] | None = None, steps: list[int] | None = None,
               scheduler: str | None = None, figures: str | None = None,
               label_spearman: bool = False) -> dict:
    """Fit the grid for ``target`` (labels must exist) and optionally draw its figures."""
    run_id = probe_task(store, target, models=models, layers=layers, steps=steps,
                        scheduler=scheduler, label_spearman=label_spearman)
    out = {"store": store, "target": target, "run_id": run_id}
    if figures:
        out["figures"] = figures_task(store, target, figures)
    return out
