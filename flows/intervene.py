"""Prefect flows: an intervention experiment and its figure; a sweep and its figures.

Thin: tasks call library functions and pass a store URI, run and experiment ids, the
settings object and summaries.
"""

from __future__ import annotations

from prefect import flow, task

from actstore.intervene.run import run_interventions
from actstore.intervene.settings import InterventionSettings, SweepSettings
from actstore.intervene.sweep import run_sweep
from actstore.plots.interventions import intervention_grid, sweep_figures


@task(name="interventions")
def interventions_task(store: str, probe_run: str, settings: InterventionSettings) -> dict:
    return run_interventions(store, probe_run, settings)


@task(name="intervention-grid")
def intervention_grid_task(store: str, experiment_id: str, out_png: str) -> str:
    return intervention_grid(store, experiment_id, out_png)


@task(name="sweep")
def sweep_task(store: str, probe_runs: list[str], settings: SweepSettings,
               out_dir: str | None = None, progress: bool = True) -> dict:
    return run_sweep(store, probe_runs, settings, out_dir=out_dir, progress=progress)


@task(name="sweep-figures")
def sweep_figures_task(store: str, sweep_ids: list[str], out_dir: str) -> list[str]:
    return sweep_figures(store, sweep_ids, out_dir)


@flow(name="intervene")
def intervene_flow(store: str, probe_run: str,
                   settings: InterventionSettings = InterventionSettings(),
                   figure: str | None = None) -> dict:
    """Run (or resume) one experiment; draw its grid to ``figure`` once it is complete."""
    summary = interventions_task(store, probe_run, settings)
    if figure and summary["complete"]:
        summary["figure"] = intervention_grid_task(store, summary["experiment_id"], figure)
    return summary


@flow(name="sweep")
def sweep_flow(store: str, probe_runs: list[str], settings: SweepSettings = SweepSettings(),
               out_dir: str | None = None) -> dict:
    """Choose a setting per probe run on validation images, report it on other images."""
    return sweep_task(store, probe_runs, settings, out_dir)
