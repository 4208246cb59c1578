"""Probe runs in the store: fit the grid for a target, save weights and scores, read them back.

Layout, one group per run (``<target>-<UTC time>-<random>``)::

    probes/<run_id>/                      attrs: target, kind, models, layers, steps, solver,
                                            n_folds, lambdas, labels provenance, created
      <model>/<layer>/{weights (step, channel), bias (step,), lam (step,), cv_score (step, λ)}
      scores/                             Dataset: mean, median, ci_low, ci_high (metric,
                                            model, layer, step), per_image (metric, model,
                                            layer, step, image), emergence_low/_high (metric,
                                            model, layer): bootstrap intervals, see
                                            :mod:`actstore.probe.uncertainty`

A run's attributes are written last, in one PUT: a run without them is invisible, and is
removed by a later run once its writer is gone. Emergence (score and emergence_step per
target, metric, model, layer, with the runs' bootstrap intervals) is computed from each
target's latest run when read.
Weights are plain Zarr arrays (no pickle), so the interventions flow and notebooks read
them with nothing but zarr.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import json

import numpy as np
import xarray as xr

import actstore
from actstore.arguments import check_name
from actstore.probe.scheduler import Scheduler, check_client_code
from actstore.store import commit, io, labelsets
from actstore.store import core as st
from actstore.store import layout as lay
from actstore.probe.choice import check_in_every_model, select, views_of
from actstore.probe.emergence import emergence_steps
from actstore.probe.settings import ProbeSettings
from actstore.probe.targets import image_column, load_targets
from actstore.errors import ActstoreError, InputError
from actstore.probe.uncertainty import score_intervals
from actstore.progress import Progress
from actstore.runtime import small_pages, task_threads

if TYPE_CHECKING:   # fitting imports the grid (torch): the readers here load without it
    from actstore.probe.grid import LayerSource

PROBES = lay.PROBES
EMERGENCE_INTERVALS = ("ci_low", "ci_high", "emergence_low", "emergence_high")


def run_probes(store: str, target: str, settings: ProbeSettings | None = None, *,
               scheduler: Scheduler = None, progress: bool = True, **options: Any) -> str:
    """Fit and score the whole grid for ``target``; returns the new run id.

    ``settings`` (default :class:`ProbeSettings`), with any of its fields given as keyword
    ``options`` on top (``layers=[...]``, ``steps=[...]``, ``label_spearman=True``...).
    ``scheduler``: what ``dask.compute`` takes (None: dask's default, an active
    ``distributed.Client`` if there is one; ``"threads"``, ``"sync"``, a Client). Labels
    for ``target`` must be in the store (:func:`actstore.write_labels`)."""
    settings = (settings or ProbeSettings()).with_options(**options)
    check_client_code(scheduler)      # a user's workers run this code, before any task
    with task_threads(), small_pages():   # parallelism comes from Dask's threads
        return _run_probes(store, target, settings, scheduler, progress)


def _run_probes(store: str, target: str, s: ProbeSettings, scheduler, progress: bool) -> str:
    models, layers, steps = (None if v is None else list(v) for v in (s.models, s.layers,
                                                                     s.steps))
    views = views_of(store, models)
    common = [la for la in views[0].layers if all(la in v.points for v in views[1:])]
    check_in_every_model(store, layers, common, views)
    layers = select(layers, common, "layer", store)
    grids = {la: tuple(views[0].layer_shapes[la][:2]) for la in layers}
    attrs, split, per_layer = load_targets(store, target, grids)
    per_layer = {la: replace(src, grids=tuple(sorted(set(grids.values()))))
                 for la, src in per_layer.items()}
    if not split.test.any():       # before anything is written
        raise ActstoreError(f"store {store}: no test-split images to score probes on; make a "
                            "store whose prompt table marks some rows split=test")
    steps = np.asarray(select(steps, list(range(views[0].n_steps)), "step", store), int)
    commit.collect(store, PROBES, lambda name: lay.RUN_KEY in (
        io.node_attrs(store, lay.run_path(name)) or {}))   # runs killed earlier
    labelsets.collect(store, [])      # label versions superseded long ago, of any target
    # their partial files went with them, and a marked run has none: only probes/ itself
    # is swept, so a run's cost does not grow with the runs a store keeps
    io.sweep_partials(store, PROBES, recursive=False)
    run_id = commit.new_id(target)
    token = commit.begin(store, lay.run_path(run_id))
    try:
        try:
            _fit_and_commit(store, run_id, target, attrs, split, per_layer, views, layers,
                            steps, s, scheduler, progress, token)
        except BaseException as exc:
            io.remove(store, lay.run_path(run_id))   # a failed run leaves nothing
            if isinstance(exc, Exception) and not isinstance(exc, ActstoreError):
                # a read failed: were the labels removed under it?
                labelsets.check_readable(store, target, _labels_read(per_layer),
                                         _rerun(target))
            raise
        # committed and checked: readers may hold it already, so whatever stops this now
        # leaves it whole (a leftover mark goes with the next run's clean-up)
        commit.end(store, lay.run_path(run_id))
        return run_id
    finally:
        commit.release(token)


def _fit_and_commit(store, run_id, target, attrs, split, per_layer, views, layers, steps,
                    s: ProbeSettings, scheduler, progress, token: str) -> None:
    from actstore.probe.grid import metric_names, probe_layer
    n_folds, label_spearman = s.n_folds, s.label_spearman
    names = metric_names(attrs["kind"], label_spearman)
    scores = np.full((len(names), len(views), len(layers), len(steps),
                      int(split.test.sum())), np.nan, np.float32)
    bar = Progress(len(views) * len(layers), 1, f"probe {target}", enabled=progress,
                   unit="layer")
    test_ids = None
    for i, view in enumerate(views):
        for j, layer in enumerate(layers):
            src = replace(per_layer[layer], activation=st.layer_path(view.model, layer))
            fit, per_image, order = probe_layer(src, split, steps, n_folds=n_folds,
                                                scheduler=scheduler,
                                                label_spearman=label_spearman)
            _write_fit(store, run_id, view.model, layer, fit)
            scores[:, i, j] = per_image.transpose(0, 2, 1)  # (metric, step, image)
            test_ids = order
            bar.step(1)
    bar.close()
    ids = image_column(store, "image_id")     # every model is complete: store order
    ds = xr.Dataset(
        {"per_image": (("metric", "model", "layer", "step", "image"), scores)},
        coords={"metric": names, "model": [v.model for v in views], "layer": layers,
                "step": steps, "image": ids[test_ids]})
    ds["mean"] = ds["per_image"].mean("image")
    ds["median"] = ds["per_image"].median("image")
    ds = ds.merge(score_intervals(ds["per_image"]))
    io.write_dataset(store, lay.run_scores_path(run_id), ds)
    for view in views:
        io.put_group(store, f"{lay.run_path(run_id)}/{view.model}")
    io.put_group(store, PROBES)
    # every read is done: were the labels removed under it, or the run itself?
    labelsets.check_readable(store, target, _labels_read(per_layer), _rerun(target))
    _check_mine(store, run_id, token)
    io.put_group(store, lay.run_path(run_id), {   # the marker, last
        "target": target, "kind": attrs["kind"], "models": [v.model for v in views],
        "layers": layers, "steps": steps.tolist(), "n_folds": n_folds,
        "labels": {**{k: attrs.get(k) for k in ("provider", "normalization", "mean", "std",
                                                "created")},
                   "version": labelsets.version_of(_labels_read(per_layer))},
        "actstore_version": actstore.__version__, "created": commit.utc_now()})
    _check_mine(store, run_id, token)   # a removal that began before the marker landed


def _labels_read(per_layer: dict[str, LayerSource]) -> str:
    return next(iter(per_layer.values())).labels_created   # the label version's path


def _rerun(target: str) -> str:
    return f"actstore probe --target {target}"


def _check_mine(store: str, run_id: str, token: str) -> None:
    commit.ensure_mine(store, lay.run_path(run_id), token, f"probe run {run_id}",
                       "actstore probe")


def _write_fit(store: str, run_id: str, model: str, layer: str, fit) -> None:
    path = lay.run_layer_path(run_id, model, layer)
    arrays = {"weights": (fit.weights, ["step", "channel"]), "bias": (fit.bias, ["step"]),
              "lam": (fit.lam, ["step"]), "cv_score": (fit.cv_score.reshape(
                  fit.cv_score.shape[0], -1), ["step", "lambda"])}
    for name, (values, dims) in arrays.items():
        values = np.asarray(values, np.float32)
        arr = st.create_array(store, f"{path}/{name}", shape=values.shape,
                              chunks=values.shape, dtype="float32", dims=dims)
        arr[...] = values
    io.put_group(store, path, {"solver": fit.solver,
                               "lambdas": np.asarray(fit.lambdas).tolist(),
                               "ridge_fallback_steps": list(fit.ridge_fallback_steps)})


def list_runs(store: str) -> dict[str, dict]:
    """Complete probe runs (their attributes are written last) by run id."""
    return io.marked_children(store, PROBES, lay.run_path, lay.RUN_KEY, read=st.listed)


def latest_run(store: str, target: str, runs: dict[str, dict] | None = None) -> str | None:
    """The target's newest complete run (among ``runs``, a :func:`list_runs` already made)."""
    runs = list_runs(store) if runs is None else runs
    check_name(target, "target", f"store {store}", (a["target"] for a in runs.values()))
    runs = {r: a for r, a in runs.items() if a["target"] == target}
    return max(runs, key=lambda r: (runs[r]["created"], r)) if runs else None


def get_run(store: str, run_id: str) -> dict:
    """One complete run's attributes: its own marker read (every run's, only to name them
    when it is not there), with the store's root in the same round of requests, so a store
    of a newer schema is refused as the listings refuse it, at no extra round trip."""
    if not isinstance(run_id, str):   # latest_run's None: the target has no run
        targets = sorted({a["target"] for a in list_runs(store).values()})
        raise ActstoreError(f"store {store}: probe run {run_id!r} is no run id (latest_run "
                            "gives None for a target without a complete run; targets with "
                            f"runs: {', '.join(targets) or 'none'}); run `actstore probe` "
                            "first")
    root, attrs = io.nodes_attrs(store, ["", lay.run_path(run_id)]) if "/" not in run_id \
        else (io.node_attrs(store, ""), None)
    st.root_of(store, root)
    if attrs and lay.RUN_KEY in attrs:
        return attrs
    runs = list_runs(store)
    if run_id not in runs:
        raise InputError(f"store {store}: no probe run {run_id!r} (has: "
                         f"{', '.join(runs) or 'none'}); run `actstore probe` first")
    return runs[run_id]


def load_probe(store: str, run_id: str, layer: str, model: str = "trained") -> dict:
    """A run's probe for one layer: weights (step, C), bias, λ (relative: sklearn's α is
    λ·tr(S)/C, S the centred XᵀX of the train tokens; :mod:`.solvers`), steps, kind."""
    attrs = get_run(store, run_id)
    if layer not in attrs["layers"] or model not in attrs["models"]:
        raise ActstoreError(f"probe run {run_id}: has no probe for model {model!r}, layer "
                            f"{layer!r}; it has models {', '.join(attrs['models'])} and "
                            f"layers {', '.join(attrs['layers'])}")
    sub = io.try_group(store, lay.run_layer_path(run_id, model, layer))
    if sub is None:
        raise missing_probe(store, run_id, attrs["target"], model, layer)
    arrays = {}
    for name in ("weights", "bias", "lam"):
        try:
            arrays[name] = sub[name][...]
        except io.NOT_FOUND:        # zarr's KeyError naming the bare array, before
            raise missing_probe(store, run_id, attrs["target"], model, layer, name) from None
    return {**arrays, "steps": list(attrs["steps"]), "kind": attrs["kind"],
            "target": attrs["target"], "solver": sub.attrs["solver"]}


def missing_probe(store: str, run_id: str, target: str, model: str, layer: str,
                  array: str | None = None) -> InputError:
    """A probe the run's attributes list but whose group (or one of its ``array``\ s) is
    gone (a damaged store): one line, where readers met a TypeError or zarr's not-found
    error. An InputError: every process finds it alike, so a planning worker that meets it
    is not named."""
    path = lay.run_layer_path(run_id, model, layer)
    node = f"group {path}" if array is None else f"array {path}/{array}"
    return _damaged(store, run_id, target, f"has no probe for model {model!r}, layer "
                                           f"{layer!r} (no {node}")


def _damaged(store: str, run_id: str, target: str, what: str, latest: bool = False
             ) -> InputError:
    """A complete run missing a node it lists: said with the way out, a new run (the only
    one for readers of a target's ``latest`` run: emergence, the figures)."""
    then = (": the emergence table and figures read a target's latest run" if latest
            else " and use that run, or another run of the target")
    return InputError(f"store {store}: probe run {run_id} {what}: the store is damaged); "
                      f"fit it again (`actstore probe --target {target}`){then}")


# what a reader of a run's scores needs (the intervals, runs before 2026-12-06 lack)
SCORE_NODES = ("mean", "metric", "model", "layer", "step")
PER_IMAGE_NODES = ("per_image", "median", "image")


def _run_scores(store: str, run_id: str, target: str, needed: tuple[str, ...],
                latest: bool = False) -> xr.Dataset:
    """A run's scores group, opened, with the ``needed`` arrays there, and the intervals
    all or none: an array gone from a damaged store was xarray's KeyError naming the bare
    variable (or a silent figure without bands), a group gone zarr's not-found error."""
    path = lay.run_scores_path(run_id)
    try:
        ds = io.open_dataset(store, path)
    except io.NOT_FOUND:
        raise _damaged(store, run_id, target, f"has no scores (no group {path}",
                       latest) from None
    has_intervals = any(v in ds.variables for v in EMERGENCE_INTERVALS)
    for name in needed + (EMERGENCE_INTERVALS if has_intervals else ()):
        if name not in ds.variables:
            raise _damaged(store, run_id, target, f"has no scores {name!r} (no array "
                                                  f"{path}/{name}", latest)
    return ds


def _plain_strings(ds: xr.Dataset) -> xr.Dataset:
    """Zarr v3 strings come back as numpy StringDType, which xarray cannot yet mix with
    numbers in ``where``/``concat``; plain object arrays of ``str`` can."""
    return ds.assign_coords({name: np.array([str(v) for v in c.values.tolist()], dtype=object)
                             for name, c in ds.coords.items()
                             if c.dtype.kind in "TUO" and c.ndim == 1})


def open_scores(store: str, run_id: str) -> xr.Dataset:
    """One probe run's test scores over (metric, model, layer, step): ``per_image`` (with
    ``image``), their ``mean`` and ``median``, the mean's 95% bootstrap ``ci_low``/``ci_high``
    and ``emergence_low``/``emergence_high`` (per layer)."""
    run = get_run(store, run_id)
    stored = _run_scores(store, run_id, run["target"], SCORE_NODES + PER_IMAGE_NODES)
    # runs stored before 2026-12-06 may repeat a fit or hold steps out of order (emergence)
    ds = stored.drop_duplicates(["model", "layer", "step"])
    if not ds.indexes["step"].is_monotonic_increasing:
        ds = _in_step_order(ds, stored)
    ds.attrs.update(store=io.canonical(store), run=run_id, target=run["target"], kind=run["kind"])
    return _plain_strings(ds)


def emergence(store: str) -> xr.Dataset:
    """Emergence from each target's latest run, computed when read: it is small, always
    agrees with the committed runs, and needs no rewrite a kill could tear. The runs are
    listed once (before, again for each target's latest run and for its scores: a request
    per run, serially, 1 + 2 × targets times)."""
    parts, used = [], {}
    runs = list_runs(store)   # with the root: a path that holds no store, or a newer schema
    for target in sorted({a["target"] for a in runs.values()}):
        # object-dtype labels (see _plain_strings): concatenating fixed-width string
        # coordinates of different widths would truncate the longer layer names
        used[target] = latest_run(store, target, runs)
        run_scores = _plain_strings(_run_scores(store, used[target], target, SCORE_NODES,
                                                latest=True))
        ds = run_scores
        keep = [v for v in EMERGENCE_INTERVALS if v in ds]   # runs before intervals: none
        ds = ds[["mean", *keep]].load().rename(mean="score")
        # a run stored before 2026-12-06 with a model, layer or step named twice holds the
        # same fit twice, and broke this table for every target: read each once
        ds = ds.drop_duplicates(["model", "layer", "step"])
        if not ds.indexes["step"].is_monotonic_increasing:
            ds = _in_step_order(ds, run_scores)
        # per run, before the join pads runs of fewer steps with NaN at the others' last
        ds["emergence_step"] = emergence_steps(ds["score"])
        parts.append(ds.expand_dims(target=[target]))
    if not parts:
        raise ActstoreError(f"store {store}: no probe runs yet; run `actstore probe`")
    table = xr.concat(parts, dim="target", join="outer")
    # which run each target's rows come from; JSON, as netCDF attributes hold no mappings
    table.attrs.update(store=io.canonical(store), runs=json.dumps(used, sort_keys=True))
    return table


def _in_step_order(ds: xr.Dataset, run_scores: xr.Dataset) -> xr.Dataset:
    """A run stored with its steps out of order (`--steps 3 1 0`, let through before
    2026-12-06) had its emergence intervals bootstrapped against the last step given, not
    the last step: sorted, and those intervals drawn again from its per-image scores (the
    same seeded draws, so a run in order gets them to the bit)."""
    per_image = run_scores["per_image"].load().drop_duplicates(["model", "layer", "step"])
    redone = score_intervals(per_image.sortby("step"))
    ds = ds.sortby("step")
    for name in ("emergence_low", "emergence_high"):
        if name in ds:
            ds[name] = redone[name]
    return ds


def open_emergence(store: str) -> xr.Dataset:
    """The emergence table of each target's latest probe run, over (target, metric, model,
    layer[, step]): ``score`` (mean test score over test images), its 95% bootstrap interval
    ``ci_low``/``ci_high``, and ``emergence_step`` (the first step reaching 90% of the last
    step's score, for RMSE at most last / 0.9; NaN if undefined) with its interval ``emergence_low``/``emergence_high``.
    Metrics are ``<metric>_token`` and ``<metric>_label`` (scored at the layer's token grid
    and at label resolution): ``dice`` for binary targets; ``rmse``, ``pearson``,
    ``spearman`` (``spearman_label`` only with ``label_spearman``) for continuous ones. One
    run's per-image scores: ``actstore.probe.runs.open_scores(store, run_id)``."""
    return _plain_strings(emergence(store))
