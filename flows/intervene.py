"""Prefect flow: an intervention experiment on a store, then its figure.

Thin: tasks call library functions and pass a store URI, an experiment id and summaries.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from actstore.plots.interventions import intervention_grid
from actstore.intervene.run import run_interventions


@task(name="interventions")
def interventions_task(store: str, probe_run: str, **kwargs) -> dict:
    return run_interventions(store, probe_run, **kwargs)


@task(name="intervention-grid")
def intervention_grid_task(store: str, experiment_id: str, out_png: str) -> str:
    return intervention_grid(store, experiment_id, out_png)


@flow(name="intervene")
def intervene_flow(store: str, probe_run: str, target: str | None = None,
                   method: str = "projection", layers: list[str] | None = None,
                   steps: list[int] | None = None, images: str | list[str] | None = None,
                   n_targets: int = 5, seed: int = 0, provider: Any = None,
                   targets: str = "shift", target_units: str = "normalized",
                   margin: float = 4.0, lr: float = 5e-3, iterations: int = 128,
                   model_variant: str = "trained", experiment_id: str | None = None,
                   device: str = "cpu", figure: str | None = None) -> dict:
    """Run (or resume) one experiment; draw its grid to ``figure`` once it is complete.

    ``provider`` is a label-provider spec, or (from Python) a provider object."""
    summary = interventions_task(
        store, probe_run, target=target, method=method, layers=layers, steps=steps,
        images=images, n_targets=n_targets, seed=seed, provider=provider, targets=targets,
        target_units=target_units, margin=margin, lr=lr, iterations=iterations,
        model_variant=model_variant, experiment_id=experiment_id, device=device)
    if figure and summary["complete"]:
        summary["figure"] = intervention_grid_task(store, summary["experiment_id"], figure)
    return summary
