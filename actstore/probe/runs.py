"""Probe runs in the store: fit the grid for a target, save weights and scores, read them back.

Layout, one group per run (``<target>-<UTC timestamp>``)::

    probes/<run_id>/                      attrs: target, kind, models, layers, steps, solver,
                                            n_folds, lambdas, labels provenance, created
      <model>/<layer>/{weights (step, channel), bias (step,), lam (step,), cv_score (step, λ)}
      scores/                             Dataset: mean, median (metric, model, layer, step),
                                            per_image (metric, model, layer, step, image)
    emergence/                            Dataset: score (target, metric, model, layer, step)
                                            and emergence_step (target, metric, model, layer),
                                            from each target's latest run

Weights are plain Zarr arrays (no pickle), so the interventions flow and notebooks read
them with nothing but zarr.
"""

from __future__ import annotations

import time

import numpy as np
import xarray as xr
import zarr

import actstore
from actstore.store import core as st
from actstore.store.view import StoreView
from actstore.probe.emergence import emergence_steps
from actstore.errors import ActstoreError
from actstore.probe.grid import Targets, fit_layer, metric_names, score_layer
from actstore.label.labels import list_targets, open_labels
from actstore.progress import Progress
from actstore.runtime import task_threads

PROBES = "probes"
EMERGENCE = "emergence"


def _views(store: str, models: list[str] | None) -> list[StoreView]:
    have = st.model_variants(store)
    models = models or have
    views = []
    for m in models:
        if m not in have:
            raise ActstoreError(f"store {store}: has no model {m!r} (has: {', '.join(have)}); "
                                "materialize it first or drop it from --models")
        view = StoreView(store, m)
        missing = [f"{a}:{b}" for a, b in st.blocks_of(view.root_attrs["n_images"],
                                                        view.block_size)
                   if not view.complete[a:b].all()]
        if missing:
            raise ActstoreError(f"store {store}: model {m!r} is incomplete (missing image blocks "
                                f"{', '.join(missing[:5])}); finish `actstore materialize` first")
        views.append(view)
    return views


def _select(requested, available: list, what: str, store: str) -> list:
    if not requested:
        return list(available)
    bad = [r for r in requested if r not in available]
    if bad:
        raise ActstoreError(f"store {store}: no {what} {bad[0]!r}; available: "
                            f"{', '.join(map(str, available))}")
    return list(requested)


def load_targets(store: str, target: str) -> tuple[dict, dict[str, Targets]]:
    """The target's attributes and, per layer, its labels at that layer's token grid."""
    targets = list_targets(store)
    if target not in targets:
        raise ActstoreError(f"store {store}: no target {target!r} (has: "
                            f"{', '.join(targets) or 'none'}); add it with `actstore label`")
    attrs = targets[target]
    ds = open_labels(store, target)
    split = ds["split"].values
    train, test = split == "train", split == "test"
    full = ds["full"].values
    if attrs["kind"] == "binary":
        full = (full > 0.5).astype(np.float32)
    per_layer = {}
    for layer, res in attrs["layer_arrays"].items():
        tokens = ds[res].values
        if attrs["kind"] == "binary":
            tokens = (tokens > 0.5).astype(np.float32)
        per_layer[layer] = Targets(attrs["kind"], tokens, full, train, test)
    return attrs, per_layer


def run_probes(store: str, target: str, *, models: list[str] | None = None,
               layers: list[str] | None = None, steps: list[int] | None = None,
               n_folds: int = 5, scheduler=None, progress: bool = True) -> str:
    """Fit and score the whole grid for ``target``; returns the new run id."""
    with task_threads():   # parallelism comes from Dask's threads
        return _run_probes(store, target, models, layers, steps, n_folds, scheduler, progress)


def _run_probes(store, target, models, layers, steps, n_folds, scheduler, progress) -> str:
    attrs, per_layer = load_targets(store, target)
    views = _views(store, models)
    layers = _select(layers, views[0].layers, "layer", store)
    steps = np.asarray(_select(steps, list(range(views[0].n_steps)), "step", store), int)
    run_id = f"{target}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    group = zarr.open_group(store, path=f"{PROBES}/{run_id}", mode="w-")
    names = metric_names(attrs["kind"])
    scores = np.full((len(names), len(views), len(layers), len(steps),
                      int(per_layer[layers[0]].test.sum())), np.nan, np.float32)
    bar = Progress(len(views) * len(layers), 1, f"probe {target}", enabled=progress)
    test_ids = None
    for i, view in enumerate(views):
        for j, layer in enumerate(layers):
            fit = fit_layer(view, layer, per_layer[layer], steps, n_folds, scheduler=scheduler)
            _write_fit(group, view.model, layer, fit)
            per_image, order = score_layer(view, layer, per_layer[layer], steps, fit, scheduler)
            scores[:, i, j] = per_image.transpose(0, 2, 1)  # (metric, step, image)
            test_ids = order
            bar.step(1)
    bar.close()
    ids = views[0].images["image"].values
    pos = {p: k for k, p in enumerate(views[0].image_index)}
    ds = xr.Dataset(
        {"per_image": (("metric", "model", "layer", "step", "image"), scores)},
        coords={"metric": names, "model": [v.model for v in views], "layer": layers,
                "step": steps, "image": [ids[pos[p]] for p in test_ids]})
    ds["mean"] = ds["per_image"].mean("image")
    ds["median"] = ds["per_image"].median("image")
    _to_zarr(ds, store, f"{PROBES}/{run_id}/scores")
    group.attrs.update({"target": target, "kind": attrs["kind"],
                        "models": [v.model for v in views], "layers": layers,
                        "steps": steps.tolist(), "n_folds": n_folds,
                        "labels": {k: attrs.get(k) for k in ("provider", "normalization",
                                                             "mean", "std", "created")},
                        "actstore_version": actstore.__version__,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    update_emergence(store)
    return run_id


def _to_zarr(ds: xr.Dataset, store: str, group: str) -> None:
    """Small derived datasets, rewritten whole. zarr warns that its v3 string dtype may
    change; these coordinates are plain labels that any reader can decode."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*string.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        ds.to_zarr(store, group=group, mode="w", consolidated=False, zarr_format=3)


def _write_fit(group: zarr.Group, model: str, layer: str, fit) -> None:
    sub = group.require_group(f"{model}/{layer}")
    arrays = {"weights": (fit.weights, ["step", "channel"]), "bias": (fit.bias, ["step"]),
              "lam": (fit.lam, ["step"]), "cv_score": (fit.cv_score.reshape(
                  fit.cv_score.shape[0], -1), ["step", "lambda"])}
    for name, (values, dims) in arrays.items():
        values = np.asarray(values, np.float32)
        sub.create_array(name, data=values, dimension_names=dims)
    sub.attrs.update({"solver": fit.solver, "lambdas": np.asarray(fit.lambdas).tolist(),
                      "ridge_fallback_steps": list(fit.ridge_fallback_steps)})


def list_runs(store: str) -> dict[str, dict]:
    """Complete probe runs (their attributes are written last) by run id."""
    try:
        group = zarr.open_group(store, path=PROBES, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return {}
    return {name: dict(sub.attrs) for name, sub in sorted(group.groups())
            if "target" in sub.attrs}


def latest_run(store: str, target: str) -> str | None:
    runs = [r for r, a in list_runs(store).items() if a["target"] == target]
    return max(runs, key=lambda r: list_runs(store)[r]["created"]) if runs else None


def get_run(store: str, run_id: str) -> dict:
    runs = list_runs(store)
    if run_id not in runs:
        raise ActstoreError(f"store {store}: no probe run {run_id!r} (has: "
                            f"{', '.join(runs) or 'none'}); run `actstore probe` first")
    return runs[run_id]


def load_probe(store: str, run_id: str, layer: str, model: str = "trained") -> dict:
    """A run's probe for one layer: weights (step, C), bias, λ, steps, kind."""
    attrs = get_run(store, run_id)
    if layer not in attrs["layers"] or model not in attrs["models"]:
        raise ActstoreError(f"probe run {run_id}: has no probe for model {model!r}, layer "
                            f"{layer!r}; it has layers {', '.join(attrs['layers'])}")
    sub = zarr.open_group(store, path=f"{PROBES}/{run_id}/{model}/{layer}", mode="r")
    return {"weights": sub["weights"][...], "bias": sub["bias"][...], "lam": sub["lam"][...],
            "steps": list(attrs["steps"]), "kind": attrs["kind"], "target": attrs["target"],
            "solver": sub.attrs["solver"]}


def _plain_strings(ds: xr.Dataset) -> xr.Dataset:
    """Zarr v3 strings come back as numpy StringDType, which xarray cannot yet mix with
    numbers in ``where``/``concat``; plain object arrays of ``str`` can."""
    return ds.assign_coords({name: np.array([str(v) for v in c.values.tolist()], dtype=object)
                             for name, c in ds.coords.items()
                             if c.dtype.kind in "TUO" and c.ndim == 1})


def open_scores(store: str, run_id: str) -> xr.Dataset:
    get_run(store, run_id)
    return _plain_strings(xr.open_zarr(store, group=f"{PROBES}/{run_id}/scores",
                                       consolidated=False))


def update_emergence(store: str) -> xr.Dataset:
    """Rebuild ``emergence/`` from each target's latest run (small: written whole)."""
    parts = []
    for target in sorted({a["target"] for a in list_runs(store).values()}):
        # object-dtype labels (see _plain_strings): concatenating fixed-width string
        # coordinates of different widths would truncate the longer layer names
        ds = open_scores(store, latest_run(store, target))["mean"].load()
        parts.append(ds.expand_dims(target=[target]))
    if not parts:
        raise ActstoreError(f"store {store}: no probe runs yet; run `actstore probe`")
    score = xr.concat(parts, dim="target", join="outer").rename("score")
    out = xr.Dataset({"score": score, "emergence_step": emergence_steps(score)})
    _to_zarr(out, store, EMERGENCE)
    return out


def open_emergence(store: str) -> xr.Dataset:
    return _plain_strings(xr.open_zarr(store, group=EMERGENCE, consolidated=False))
