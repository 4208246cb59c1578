"""Choosing where, when and how hard to edit, on images that are then never reported.

A sweep splits the store's test images in two disjoint sets in store order: the first
``validation`` images and the next ``evaluation`` ones. On the validation images it runs
the grid capture kind × edited steps × strength, every cell with its equal-size random
control and the other-targets control, and picks the setting with the largest *specific*
effect (the smallest of: gain over the original, margin over the random edit, margin over
the other targets; see :func:`actstore.intervene.scores.effects`). That one setting is
then run on the evaluation images, and only that experiment's numbers are the result:
choosing a setting on the images it is reported on would overstate it, as the authors'
checkpoint selection on their test set did.

Only settings whose median relative edit size ‖Δh‖/‖h‖ on the validation images is at
most ``max_edit_size`` can be chosen: larger ones are run and recorded (``over_cap``) so
the dose-response shows them, but an effect that needs an edit large enough to degrade
the image is the image breaking, not the model following the probe. If no setting is under the cap
the sweep records "none under the cap" (with the smallest size it tried) and evaluates
nothing, like a grid whose every edit blew the model up: the cells are kept, the main job
goes on to its other targets, and the table says why there is no result.

Every cell is an ordinary intervention experiment in the store (resumable); the sweep's
own record, ``sweeps/<sweep_id>``, lists the cells, the two image sets, the choice and
the evaluation experiment (its id and how it is written: :mod:`.sweeprecords`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import actstore
from actstore.errors import ActstoreError, InputError
from actstore.generation.models import LoadedModel
from actstore.generation.pointnames import UNET_KINDS, kind_of, site_of
from actstore.intervene.inputs import load_store_model
from actstore.intervene.plan import check_request, user_targets
from actstore.intervene.run import run_interventions
from actstore.intervene.settings import InterventionSettings, SweepSettings
from actstore.intervene.sweeprecords import (headline, latest_sweep, list_sweeps,  # noqa: F401
                                             same_labels, settings_json, sweep_id_of,
                                             write_sweep)
from actstore.probe.runs import get_run
from actstore.store.view import StoreView


def split_images(store: str, validation: int, evaluation: int,
                 model_variant: str) -> tuple[list[str], list[str]]:
    """The first ``validation`` test images, and the ``evaluation`` ones after them."""
    view = StoreView(store, model=model_variant, complete_only=False)
    table = view.images
    test = [str(i) for i, s in zip(table["image"].values, table["split"].values)
            if s == "test"]
    if len(test) < validation + evaluation:
        raise ActstoreError(f"store {store}: has {len(test)} test images, a sweep needs "
                            f"{validation} validation + {evaluation} evaluation; lower "
                            "--validation/--evaluation")
    return test[:validation], test[validation:validation + evaluation]


def fit_split(store: str, settings: SweepSettings) -> SweepSettings:
    """The settings with validation + evaluation shrunk, in proportion, to the store's test
    images when it has fewer (the main job on another prompt table); unchanged otherwise."""
    table = StoreView(store, model=settings.base.model_variant, complete_only=False).images
    n = int((table["split"].values == "test").sum())
    v, e = settings.validation, settings.evaluation
    if n >= v + e:
        return settings
    if n < 2:
        raise ActstoreError(f"store {store}: has {n} test images; a sweep needs at least 2 "
                            "(one to choose on, one to report on)")
    v = min(n - 1, max(1, round(n * v / (v + e))))
    return replace(settings, validation=v, evaluation=n - v)


def kind_layers(run: dict, kind: str, prefix: str | tuple[str, ...]) -> list[str]:
    """The probe run's capture points of one kind whose site starts with ``prefix`` (or
    with any of several)."""
    if kind not in UNET_KINDS:
        raise ActstoreError(f"--kinds {kind}: only points inside the denoising loop can be "
                            f"edited ({', '.join(UNET_KINDS)})")
    prefix = prefix if isinstance(prefix, str) else tuple(prefix)
    return [name for name in dict.fromkeys(run["layers"])    # each once: see grid_cells
            if kind_of(name) == kind and site_of(name).startswith(prefix)]


def _sites_text(prefix: str | tuple[str, ...]) -> str:
    return ", ".join(f"{p}*" for p in ([prefix] if isinstance(prefix, str) else prefix))


def grid_cells(run: dict, settings: SweepSettings) -> list[dict]:
    """(kind, layers, steps) cells the run can serve; kinds it has no probes for are left
    out (listed under ``skipped`` by :func:`run_sweep`). A run stored before 2026-12-06
    may name a step or layer twice (the same fit twice); a cell names each once, or the
    settings would refuse the repeat as if the user had given it."""
    cells = []
    for kind in settings.kinds:
        layers = kind_layers(run, kind, settings.layer_prefix)
        if not layers:
            continue
        for n in settings.step_counts:
            steps = [s for s in dict.fromkeys(run["steps"]) if s < n]
            if steps and all(c["steps"] != steps or c["kind"] != kind for c in cells):
                cells.append({"kind": kind, "layers": layers, "steps": steps})
    return cells


def over_cap(row: dict, max_edit_size: float) -> bool:
    """Is this cell's edit larger than the cap? A cell with no finite size (its edits blew
    the model up) cannot be shown to be under it, so counts as over."""
    size = row["relative_change"]
    return size is None or not math.isfinite(size) or size > max_edit_size


def choose(rows: list[dict], max_edit_size: float = math.inf) -> dict | None:
    """The row with the largest specific effect among those with a median edit size of at
    most ``max_edit_size``; ties go to the smaller edit. Strength 0 (no edit, the curve's
    anchor) is never chosen. None if no such row has a score."""
    ranked = [r for r in rows if r["effect"]["specific"] is not None and r["strength"] > 0
              and not over_cap(r, max_edit_size)]
    if not ranked:
        return None
    return max(ranked, key=lambda r: (r["effect"]["specific"], -r["relative_change"]))


def _why_none(rows: list[dict], cap: float) -> str:
    """The record's note when nothing was chosen: no finite score, or nothing under the cap."""
    if all(r["effect"]["specific"] is None for r in rows if r["strength"] > 0):
        return "every edit of the grid drove the model to non-finite values"
    sized = [r for r in rows if r["strength"] > 0 and r["effect"]["specific"] is not None
             and not over_cap(r, math.inf)]
    low = min(sized, key=lambda r: r["relative_change"]) if sized else None
    return (f"none under the cap: no scored setting has edit size <= {cap:g}" +
            (f" (smallest {low['relative_change']:.3f}: {low['kind']} s={low['strength']:g})"
             if low else "") + "; lower --strength or raise --max-edit-size")


# Runs (or resumes) one cell's experiment: (store, probe run, settings, provenance) ->
# its summary. In this process by default; over Dask workers from flows.intervene.
RunExperiment = Callable[[str, str, InterventionSettings, dict], dict]


@dataclass(frozen=True)
class SweepPlan:
    """A sweep checked against the store before any cell runs (a refusal leaves the store
    as it was, and a fan-out refuses before its cluster starts)."""

    store: str
    settings: SweepSettings
    validation: list[str]
    evaluation: list[str]
    runs: dict[str, dict]
    cells: dict[str, list[dict]]
    out_dir: str | None = None


def plan_sweep(store: str, probe_runs: list[str] | str,
               settings: SweepSettings = SweepSettings(), *,
               out_dir: str | None = None, counts_given: bool = False) -> SweepPlan:
    """Every check that reads only the store: the figure folder, the two image sets, the
    runs (one per target, each read once), each run's cells and, when the step counts were
    typed (``counts_given``), each count against the run's steps."""
    probe_runs = [probe_runs] if isinstance(probe_runs, str) else list(probe_runs)
    if out_dir:
        from actstore.plots.outputs import check_output

        check_output(out_dir, "--out", png=False)
    validation, evaluation = split_images(store, settings.validation, settings.evaluation,
                                          settings.base.model_variant)
    runs = {r: get_run(store, r) for r in probe_runs}
    one_run_per_target(probe_runs, runs)
    if counts_given:
        for run_id, run in runs.items():
            check_step_counts(run_id, run, settings.step_counts)
    cells = {r: planned_cells(r, run, settings) for r, run in runs.items()}  # all, first
    for run_id, run_cells in cells.items():   # each run's edit as its first cell asks it
        maps = user_targets(check_request(store, run_id, validation_settings(
            settings, run_cells[0], validation)))
        if maps is not None and maps.shape[1] < 2:
            raise InputError(f"--targets {settings.base.targets}: one map per image, but a "
                             "sweep's specific effect is the least of the gain and the margins "
                             "over random and over the image's other targets; give two or "
                             "more maps per image ((K, H, W) arrays or <image_id>_<k>.png)")
    return SweepPlan(store, settings, validation, evaluation, runs, cells, out_dir)


def run_sweep(store: str, probe_runs: list[str] | str,
              settings: SweepSettings = SweepSettings(), *, model: LoadedModel | None = None,
              out_dir: str | None = None, progress: bool = True,
              counts_given: bool = False) -> dict:
    """Sweep each probe run's grid on validation images, then evaluate its chosen setting
    on the evaluation images, every experiment in this process; returns ``{target:
    record}`` plus the figures drawn."""
    plan = plan_sweep(store, probe_runs, settings, out_dir=out_dir, counts_given=counts_given)
    model = load_store_model(StoreView(store, model=settings.base.model_variant,
                                       complete_only=False), model, settings.base.device)

    def in_process(uri: str, run_id: str, cell: InterventionSettings, provenance: dict) -> dict:
        return run_interventions(uri, run_id, cell, model=model, progress=progress,
                                 provenance=provenance)
    return sweep_cells(plan, in_process)


def sweep_cells(plan: SweepPlan, run_experiment: RunExperiment) -> dict:
    """Run (or resume) a planned sweep, each experiment by ``run_experiment``: the records
    depend only on the experiments' stored results, so a sweep whose cells ran on Dask
    workers is recorded as one run here."""
    out = {"store": plan.store, "validation_images": plan.validation,
           "evaluation_images": plan.evaluation, "targets": {}}
    for run_id, run in plan.runs.items():
        out["targets"][run["target"]] = _sweep_run(plan, run_id, run, run_experiment)
    if plan.out_dir:
        from actstore.plots.interventions import sweep_figures

        out["figures"] = sweep_figures(plan.store, [r["sweep_id"] for r in
                                                    out["targets"].values()], plan.out_dir)
    return out


def _cell_summary(run_experiment: RunExperiment, plan: SweepPlan, run_id: str,
                  settings: InterventionSettings, provenance: dict) -> dict:
    """A cell's experiment, complete: a sweep is chosen from finished experiments only."""
    summary = run_experiment(plan.store, run_id, settings, provenance)
    if not summary.get("complete"):
        raise ActstoreError(f"store {plan.store}: sweep cell {summary['experiment_id']} is "
                            f"incomplete ({summary.get('blocks_complete')}/"
                            f"{summary.get('blocks')} blocks); rerun the same command to "
                            "resume")
    return summary


def validation_settings(settings: SweepSettings, cell: dict,
                        validation: list[str]) -> InterventionSettings:
    """The experiment a cell runs on the validation images; the plan checks each run's
    first one, so a run its edit cannot serve is refused before any run's cells are
    stored (the settings a cell varies, its layers and steps, come from the run)."""
    return settings.base.with_(layers=tuple(cell["layers"]), steps=tuple(cell["steps"]),
                               strengths=settings.strengths, images=tuple(validation),
                               experiment_id=None)


def check_step_counts(run_id: str, run: dict, counts: tuple[int, ...]) -> None:
    """A count N edits the steps below N: one past a run's last step gave the cell of all
    its steps, recorded as if that had been asked (the main job's fixed counts may exceed a
    short --steps on purpose; a count the user types may not)."""
    top = max(run["steps"]) + 1
    over = [n for n in counts if n > top]
    if over:
        raise ActstoreError(f"--step-counts {over[0]}: probe run {run_id} has steps up to "
                            f"{top - 1}, so its cells edit steps below {top} at most; "
                            f"give counts of at most {top}")


def one_run_per_target(probe_runs: list[str], runs: dict[str, dict]) -> None:
    """A sweep's result is keyed by target: a second run of one target (or one run named
    twice) would be swept and stored, then left out of the result."""
    seen: dict[str, str] = {}
    for run_id in probe_runs:
        target = runs[run_id]["target"]
        if target in seen:
            twice = "is given twice" if seen[target] == run_id else \
                f"and {seen[target]} both probe {target!r}"
            raise ActstoreError(f"--probe-run {run_id} {twice}; a sweep takes one run per "
                                "target")
        seen[target] = run_id


def planned_cells(run_id: str, run: dict, settings: SweepSettings) -> list[dict]:
    """The run's grid cells, or a one-line refusal when it has none: checked for every run
    before the first is swept, so a refusal leaves the store as it was."""
    cells = grid_cells(run, settings)
    if not cells:
        raise ActstoreError(f"probe run {run_id}: has no probes of kind(s) "
                            f"{', '.join(settings.kinds)} at sites "
                            f"{_sites_text(settings.layer_prefix)}; "
                            "fit one on those capture points or choose --kinds among its own")
    return cells


def _sweep_run(plan: SweepPlan, run_id: str, run: dict,
               run_experiment: RunExperiment) -> dict:
    t0 = time.perf_counter()
    store, settings = plan.store, plan.settings
    validation, evaluation, base = plan.validation, plan.evaluation, settings.base
    rows, experiments = [], []
    for cell in plan.cells[run_id]:
        summary = _cell_summary(run_experiment, plan, run_id,
                                validation_settings(settings, cell, validation),
                                {"role": "sweep validation"})
        experiments.append(summary["experiment_id"])
        for row in summary["dose"]:
            rows.append({"kind": cell["kind"], "layers": cell["layers"],
                         "steps": cell["steps"], "strength": row["strength"],
                         "experiment_id": summary["experiment_id"],
                         "relative_change": row["probe"]["edit"]["relative_change"],
                         "token_relative_change":
                             row["probe"]["edit"]["token_relative_change"],
                         "pre": summary["pre"].get("median"),
                         "post": row["probe"]["post"].get("median"),
                         "random": row.get("random", {}).get("post", {}).get("median"),
                         "other": row["probe"]["other_targets"].get("median"),
                         "effect": row["effect"]})
            rows[-1]["over_cap"] = over_cap(rows[-1], settings.max_edit_size)
    best = choose(rows, settings.max_edit_size)
    record = {"probe_run": run_id, "target": run["target"], "kind": run["kind"],
              "settings": settings_json(settings), "max_edit_size": settings.max_edit_size,
              "validation_images": validation, "evaluation_images": evaluation,
              "skipped_kinds": [k for k in settings.kinds
                                if not any(c["kind"] == k for c in plan.cells[run_id])],
              "cells": rows, "experiments": experiments,
              "chosen": best and {k: best[k] for k in ("kind", "layers", "steps", "strength",
                                                       "experiment_id", "effect",
                                                       "relative_change")}}
    sweep_id = sweep_id_of(record)
    if best is None:   # nothing to evaluate: say so in the record rather than fail the job
        same_labels(store, sweep_id, experiments)
        record.update(sweep_id=sweep_id, evaluation=None, result=None,
                      note=_why_none(rows, settings.max_edit_size),
                      seconds=time.perf_counter() - t0, actstore_version=actstore.__version__,
                      created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_sweep(store, sweep_id, record)
        return record
    chosen = base.with_(layers=tuple(best["layers"]), steps=tuple(best["steps"]),
                        strengths=(best["strength"],), images=tuple(evaluation),
                        experiment_id=None)
    final = _cell_summary(run_experiment, plan, run_id, chosen,
                          {"role": "sweep evaluation", "sweep": sweep_id,
                           "validation_images": validation,
                           "max_edit_size": settings.max_edit_size,
                           "chosen_validation_size": best["relative_change"]})
    overlap = set(final["image_ids"]) & set(validation)
    if overlap:   # cannot happen by construction; a record that says otherwise is refused
        raise ActstoreError(f"sweep {sweep_id}: evaluation shares images {sorted(overlap)} "
                            "with validation")
    same_labels(store, sweep_id, [*experiments, final["experiment_id"]])
    record.update(sweep_id=sweep_id, evaluation=final["experiment_id"],
                  result=headline(final), seconds=time.perf_counter() - t0,
                  actstore_version=actstore.__version__,
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_sweep(store, sweep_id, record)
    return record
