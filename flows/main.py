"""The main job: everything actstore does, end to end, on one model and prompt set.

materialize (trained) → materialize (randomized control) → labels → probe grid per target
→ emergence table and figures → the toy reader on every step's x0 image → the causal
test: a sweep per causal target chooses where, when and how hard to edit on validation
test images, and reports that setting on other test images beside its equal-size random
and other-target controls → ``report.html``, one page of it all. Each stage is a task
calling a library function, or the flow its standalone command runs; only store URIs,
target names, run ids and settings pass between them. With a Dask cluster (``--workers
N``, N > 1, or ``--cluster ADDRESS``) the heavy stages (materialize, labels, the probe
grid, the sweeps' experiments) fan out over it as those commands fan them out, one
cluster for the whole job. Rerunning the job resumes: stored blocks, labels, probe runs
and intervention experiments are kept and skipped.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from prefect import flow, task

from actstore.cluster import default_workers, portable
from actstore.probe.emergence import format_table, summary_table
from actstore.errors import ActstoreError
from actstore.label.providers import describe_provider
from actstore.intervene.tables import format_cells, format_sweeps
from actstore.label.labels import list_targets
from actstore.label.settings import LabelSettings
from actstore.plots.report import write_report
from actstore.toyworld.naming import format_naming
from actstore.probe.runs import latest_run, open_emergence
from actstore.intervene.settings import InterventionSettings, SweepSettings
from actstore.intervene.sweep import fit_split
from flows.intervene import sweep_figures_task, sweep_flow
from actstore.generation.fingerprint import check_stored_settings
from actstore.generation.materialize import CaptureConfig, MaterializeSettings
from actstore.plots.figures import kind_comparison
from flows.label import label_flow
from flows.fanout import Site, dask_address
from flows.materialize import fill_store, sample_grid_task
from flows.probe import figures_task, probe_task

TARGETS = ("salient", "depth", "shading")
INTERVENE = ("salient", "depth")  # the paper's causal tests
# The main job's causal test per target, small enough for its time budget on 2 cores:
# the residual stream after each decoder attention block (capture kind ``block``) against
# the paper's attn1, on 3 validation images, reported on 8 others. On the toy model the
# block outputs drive the image and attn1's hardly do; salient peaks near strength 3, depth
# moves more only at strength 10, which is over the default edit-size cap (0.3) and so is
# run and shown, never chosen (docs/results.md, models/toy-ldm/README.md).
MAIN_SWEEPS = {
    "salient": SweepSettings(kinds=("attn1", "block"), step_counts=(5,),
                             strengths=(1.0, 3.0, 10.0), validation=3, evaluation=8,
                             base=InterventionSettings(n_targets=2)),
    "depth": SweepSettings(kinds=("attn1", "block"), step_counts=(7,), strengths=(3.0, 10.0),
                           validation=3, evaluation=8, base=InterventionSettings(n_targets=2)),
}
# Blocks of 8 images, generated 8 at a time: the toy model's main job on a CPU. Captured:
# attn1 (the paper's) and the kinds its 10-minute budget affords, for the capture-kind
# comparison (capture-kinds.png, the summary's kind column); costs: docs/capture-points.md.
MAIN_MATERIALIZE = MaterializeSettings(batch_size=8, block_size=8,
                                       cap=CaptureConfig(kinds=("attn1", "block", "vae")))


# The variants the job materializes: the trained model, then the paper's control.
CONTROLS = (None, "randomized")


def main_store(out: str) -> str:
    return str(Path(out) / "store.zarr")


def check_rerun(out: str, model: str, settings: MaterializeSettings) -> None:
    """A rerun into an ``out`` whose store holds variants made with other settings is
    refused before a cluster starts (:func:`check_stored_settings`)."""
    for control in CONTROLS:
        check_stored_settings(main_store(out), model, replace(settings, control=control))


@task(name="summary")
def summary_task(store: str, out_dir: str) -> dict:
    rows = summary_table(open_emergence(store))
    table = format_table(rows)
    Path(out_dir, "summary.json").write_text(json.dumps(rows, indent=1))
    figure = kind_comparison(store, str(Path(out_dir, "capture-kinds.png")))
    return {"rows": rows, "table": table, "figure": figure}


@task(name="tables")
def tables_task(out_dir: str, table: str, sweeps: dict | None) -> None:
    """Every table the job prints in summary.txt (the causal test's too, not the probe
    table alone), and the sweeps' records as stored in causal.json."""
    Path(out_dir, "summary.txt").write_text(table + "\n")
    if sweeps:
        Path(out_dir, "causal.json").write_text(json.dumps(sweeps, indent=1))


@task(name="report")
def report_task(store: str, out_dir: str, notes: list[str]) -> str:
    return write_report(out_dir, store, notes=notes, title=f"actstore main job: {out_dir}")


def _with_report(result: dict, out_dir: Path) -> dict:
    """The page is written whatever part of the job ran; absent parts are listed on it."""
    notes = [result["note"]] if "note" in result else []
    result["report"] = report_task(result["store"], str(out_dir), notes)
    return result


@task(name="naming")
def naming_task(store: str, out_dir: str) -> dict:
    """The toy reader on every step's x0 image, beside the emergence curves (toy world only:
    the reader knows its vocabulary and nothing else)."""
    from actstore.label.providers import REPO_ROOT
    from actstore.plots.naming import naming_curves
    from actstore.toyworld.naming import reader_per_step

    try:
        naming = reader_per_step(store, str(REPO_ROOT / "models" / "toy-reader"))
    except ActstoreError as exc:
        return {"note": f"reader per step skipped: {exc}"}
    Path(out_dir, "naming.json").write_text(json.dumps(naming, indent=1))
    return {**naming, "figure": naming_curves(store, naming, str(Path(out_dir, "naming.png")))}


def _provider_available(provider: str) -> str | None:
    """None if the label provider loads, else why not (the job then stops after storing);
    its folder read, not loaded a first time in this process only to be checked."""
    try:
        describe_provider(provider)
    except ActstoreError as exc:
        return str(exc)
    return None


@flow(name="main-job")
def main_flow(model: str, prompts: str, *, out: str = "runs/main", images: str | None = None,
              settings: MaterializeSettings = MAIN_MATERIALIZE, workers: int | None = None,
              cluster: str | None = None, provider: str = "toyworld",
              targets: tuple[str, ...] = TARGETS, control: bool = True,
              sweeps: dict[str, SweepSettings] | None = None) -> dict:
    """Materialize ``model`` (and its control) on ``prompts``, label, probe, summarize.

    With more than one of ``workers`` (default: as many as pay off,
    :func:`actstore.cluster.default_workers`: one on 2 cores, one per visible GPU) or a
    running scheduler at ``cluster``, one Dask cluster serves the whole job: materialize's
    regions, the label block groups, the probe grid's graph and every sweep experiment's
    block groups run on it, its worker processes started once for the job; with one,
    every stage runs in this process.
    ``settings.gen.guidance`` defaults to SD's 7.5; ``actstore main`` passes the model's
    catalog guidance (3 for toy-ldm). ``sweeps``: the causal test's settings per target
    (default :data:`MAIN_SWEEPS`; ``{}`` skips it)."""
    sweeps = MAIN_SWEEPS if sweeps is None else sweeps
    # the sweeps generate on the device the store was made on (--device cuda: the GPU; a
    # --device cpu store on the CPU, not on InterventionSettings' auto)
    sweeps = {t: replace(s, base=s.base.with_(device=settings.device))
              for t, s in sweeps.items()}
    if workers is None and not cluster:
        workers = default_workers(settings.device)
    local = workers if workers and workers > 1 else None   # one worker: this process
    # a cluster's workers are asked for the device before the store is made
    with dask_address(local, cluster, settings.device) as site:
        result = _stages(model, prompts, Path(out), images, settings, provider, targets,
                         control, sweeps, site)
    return _with_report(result, Path(out))


def _stages(model: str, prompts: str, out_dir: Path, images: str | None,
            settings: MaterializeSettings, provider: str, targets: tuple[str, ...],
            control: bool, sweeps: dict[str, SweepSettings], site: Site) -> dict:
    """Every stage up to the report, the fanned-out ones on ``site`` (its address None:
    in this process)."""
    store = main_store(str(out_dir))   # made with the store: bad input leaves no folder
    result = {"store": store, "figures": [], "workers": site.workers}
    fan = site if site.address else None
    # as a worker started in another folder finds them
    model_at, prompts_at, store_at = (model, prompts, store) if fan is None else \
        (portable(model, named=True), portable(prompts), portable(store))
    made = [fill_store(model_at, prompts_at, store_at, replace(settings, control=variant),
                       images=images, progress=True, **site._asdict())
            for variant in (CONTROLS if control else CONTROLS[:1])]
    for summary in made:
        result[summary["model"]] = summary
        result["figures"].append(sample_grid_task(
            store, summary["model"], str(out_dir / f"samples-{summary['model']}.png")))
    if images:
        result["note"] = "--images covers part of the table: labels and probes need it all"
        return result
    why_not = _provider_available(provider)
    if why_not:
        result["note"] = f"labels and probes skipped: {why_not}"
        return result
    have = list_targets(store)
    missing = [t for t in targets if t not in have]
    if missing:                     # one pass of the label model for every missing target
        result["labels"] = label_flow(store, provider, missing,
                                      LabelSettings(device=settings.device), site=fan)
    for target in targets:
        if _needs_probe(store, target):
            probe_task(store_at, target, scheduler=site.address)
        result["figures"] += figures_task(store, target, str(out_dir))
    summary = summary_task(store, str(out_dir))
    result["summary"] = summary["rows"]
    result["table"] = summary["table"]
    result["figures"].append(summary["figure"])
    if provider == "toyworld":
        naming = naming_task(store, str(out_dir))
        result["naming"] = naming
        if "figure" in naming:
            result["figures"].append(naming["figure"])
            result["table"] += "\n\n" + format_naming(naming)
    causal = [t for t in INTERVENE if t in targets and t in sweeps]
    if causal:
        found = {}
        for t in causal:
            found.update(sweep_flow(store, [latest_run(store, t)], fit_split(store, sweeps[t]),
                                    site=fan)["targets"])
        result["figures"] += sweep_figures_task(
            store, [rec["sweep_id"] for rec in found.values()], str(out_dir))
        result["interventions"] = found
        result["table"] += "\n\n" + format_cells(found) + "\n\n" + format_sweeps(found)
    tables_task(str(out_dir), result["table"], result.get("interventions"))
    return result


def _needs_probe(store: str, target: str) -> bool:
    """No run yet, or the latest predates capture points added since (a rerun with more
    capture kinds probes them)."""
    from actstore.probe.runs import get_run
    from actstore.store.view import open_store

    run = latest_run(store, target)
    return run is None or bool(set(open_store(store).layers) - set(get_run(store, run)["layers"]))
