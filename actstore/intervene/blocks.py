"""An intervention experiment as block tasks any worker process can do: what a Dask
fan-out (``actstore intervene --workers N | --cluster ADDRESS``) is made of.

Each task names the experiment by what defines it (store, probe run, settings,
provenance), never by arrays: a worker checks the experiment once and keeps it, with the
store's model and the label model, for every block group it gets (one model per process,
shared with materialize regions: :func:`actstore.generation.regions.store_model`). Blocks
are recorded as the serial run records them, so a retried or rerun task does only the
missing ones, and the store ends up as the serial run leaves it, byte for byte.
"""

from __future__ import annotations

import json

from actstore.cluster import MODEL_LOCK, local_dask, shared, spread, worker_id
from actstore.errors import ActstoreError
from actstore.generation.regions import store_model
from actstore.intervene.inputs import store_model_ref
from actstore.intervene.plan import plan_interventions
from actstore.intervene.run import (Experiment, begin_experiment, finish_experiment,
                                    run_blocks)
from actstore.intervene.settings import InterventionSettings
from actstore.progress import relaying


def check_portable(settings: InterventionSettings) -> None:
    """Workers load the label model from its spec: a provider object stays in this process."""
    if settings.provider is not None and not isinstance(settings.provider, str):
        raise ActstoreError("--workers/--cluster: each worker loads the label model from its "
                            "spec, so pass the provider as a spec (toyworld, "
                            "hf-depth:FOLDER, ...) or run without fan-out")


def shared_experiment(store: str, probe_run: str, settings: InterventionSettings, *,
                      experiment_id: str | None = None,
                      provenance: dict | None = None) -> Experiment:
    """This process's checked experiment (its plan, label model and the store's model),
    kept for every task of the run with ``experiment_id``; None plans afresh (a run's
    first task: the store may have changed since the last run)."""
    key = (store, probe_run, settings, json.dumps(provenance, sort_keys=True), experiment_id)

    def load() -> Experiment:
        plan = plan_interventions(store, probe_run, settings, provenance=provenance)
        if experiment_id is not None and plan.experiment_id != experiment_id:
            raise ActstoreError(f"store {store}: experiment {experiment_id} now plans as "
                                f"{plan.experiment_id} (the store changed during the run); "
                                "rerun the command")
        ref, dtype, variant = store_model_ref(plan.view)
        model = store_model(ref, dtype=dtype, device=settings.device, variant=variant)
        return begin_experiment(plan, model)

    with MODEL_LOCK:
        if experiment_id is None:
            exp = load()
            return shared("experiment", key[:-1] + (exp.plan.experiment_id,), lambda: exp)
        return shared("experiment", key, load)


@local_dask
def plan_blocks(store: str, probe_run: str, settings: InterventionSettings, *,
                workers: int, provenance: dict | None = None) -> dict:
    """Check and create the experiment (on one worker, which keeps it), then cut its
    missing blocks into contiguous groups, about four per worker."""
    exp = shared_experiment(store, probe_run, settings, provenance=provenance)
    todo = exp.pending()
    return {"experiment_id": exp.plan.experiment_id, "groups": spread(todo, workers),
            "blocks": len(exp.blocks), "pending_images": sum(hi - lo for *_, lo, hi in todo),
            "per_image": exp.per_image, "steps": exp.gen.steps, "worker": worker_id()}


@local_dask
def run_block_group(store: str, probe_run: str, settings: InterventionSettings,
                    group: list, *, experiment_id: str, provenance: dict | None = None,
                    topic: str | None = None) -> dict:
    """Generate, score and record one group of blocks with this process's model; blocks
    already recorded (a retry, a rerun) are skipped. ``topic``: where its progress goes
    on a Dask worker (:func:`actstore.progress.relayed`)."""
    exp = shared_experiment(store, probe_run, settings, experiment_id=experiment_id,
                            provenance=provenance)
    pending = set(exp.pending())
    todo = [tuple(blk) for blk in group if tuple(blk) in pending]
    name = f"{group[0][0]}:{group[-1][1]}"
    with MODEL_LOCK:
        run_blocks(exp, todo, relaying(topic, name))
    return {"images": sum(hi - lo for *_, lo, hi in group), "blocks_written": len(todo),
            "group": name, "worker": worker_id()}


@local_dask
def finish_blocks(store: str, probe_run: str, settings: InterventionSettings, *,
                  experiment_id: str, written: int, provenance: dict | None = None) -> dict:
    """The summary once every block is recorded (see :func:`finish_experiment`)."""
    exp = shared_experiment(store, probe_run, settings, experiment_id=experiment_id,
                            provenance=provenance)
    return finish_experiment(exp, written)
