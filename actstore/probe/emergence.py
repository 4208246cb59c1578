"""Emergence: when, during denoising, does a layer come to encode a target?

**Emergence step** of a (target, metric, model, layer) curve: the first denoising step
whose test score reaches 90% of the score at the last probed step — for RMSE (lower is
better), the first step whose RMSE is at most the final RMSE / 0.9. Undefined (NaN) when
the final score gives no meaningful bar (a non-positive correlation or Dice), as for a
control that never learns the target. The fraction is a parameter, stored with the result.
Its bootstrap interval over test images comes from :mod:`actstore.probe.uncertainty`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xarray as xr

from actstore.generation.pointnames import KINDS, kind_of

EMERGENCE_FRACTION = 0.9
LOWER_IS_BETTER = ("rmse",)


def higher_is_better(metric: str) -> bool:
    return not metric.startswith(LOWER_IS_BETTER)


def primary_metric(kind_or_metrics: Iterable[object]) -> str:
    """The headline metric: Dice for masks, RMSE for continuous maps (as the paper)."""
    names = [str(m) for m in kind_or_metrics]
    for m in ("dice_label", "rmse_label"):
        if m in names:
            return m
    return names[0]


def emergence_steps(score: xr.DataArray, frac: float = EMERGENCE_FRACTION) -> xr.DataArray:
    """First step reaching the bar, per every dimension but ``step`` (NaN if undefined)."""
    final = score.isel(step=-1)
    higher = xr.DataArray([higher_is_better(str(m)) for m in score["metric"].values],
                          dims="metric", coords={"metric": score["metric"]})
    reached = xr.where(higher, score >= frac * final, score <= final / frac)
    valid = (final > 0) & final.notnull()
    first = reached.argmax("step")
    steps = score["step"].values
    out = xr.DataArray(steps[first.values].astype(float), dims=first.dims, coords=first.coords)
    out = out.where(valid & reached.any("step"))
    out.attrs["fraction"] = frac
    return out.rename("emergence_step")


def layer_kinds(layers: Iterable[object]) -> np.ndarray:
    """The capture kind of each layer name (attn1, block, resnet, ...)."""
    return np.array([kind_of(str(la)) for la in layers])


def target_scores(score: xr.DataArray, target: str) -> xr.DataArray:
    """One target's scores without the metrics, steps and layers only other targets' runs
    have: the table joins each target's latest run, and a run on fewer steps or layers is
    padded with NaN there (its last step is its own last probed step, not the table's)."""
    sub = score.sel(target=target)
    for dim in ("metric", "step", "layer"):
        sub = sub.dropna(dim, how="all")
    return sub


def lead_model(models: Iterable[object]) -> str:
    """The model a target's best layer is chosen on: the trained one, or a run's first
    model where it has none (a run of the randomized control alone)."""
    models = [str(m) for m in models]
    return "trained" if "trained" in models else models[0]


def summary_table(emergence: xr.Dataset) -> list[dict]:
    """Per target and capture kind: best layer, final-step score trained vs randomized,
    emergence step. A model the target's latest run lacks has no key in its rows; a run of
    the control alone picks its best layer and emergence step on the control."""
    rows = []
    score = emergence["score"]
    for target in [str(t) for t in score["target"].values]:
        sub = target_scores(score, target)
        kinds = layer_kinds(sub["layer"].values)
        metric = primary_metric(sub["metric"].values)
        curve = sub.sel(metric=metric)
        final = curve.isel(step=-1)
        # the table's model axis is every run's: a model this target's run lacks is NaN
        # here (its column read 'nan', or, for the trained model, no best layer at all)
        models = [str(m) for m in final["model"].values
                  if bool(sub.sel(model=m).notnull().any())]
        lead = lead_model(models)   # the best layer's model
        for kind in [k for k in KINDS if k in kinds]:
            mine = final.sel(model=lead).isel(layer=np.flatnonzero(kinds == kind))
            best = str((mine.idxmax("layer") if higher_is_better(metric)
                        else mine.idxmin("layer")).values)
            row = {"target": str(target), "kind": kind, "metric": metric, "best_layer": best}
            for model in ("trained", "randomized"):
                if model in models:
                    row[model] = float(final.sel(model=model, layer=best))
            for name in ("emergence_step", "emergence_low", "emergence_high"):
                if name not in emergence:
                    continue
                step = emergence[name].sel(target=target, metric=metric, layer=best)
                step = step.sel(model=lead) if "model" in step.dims else step
                row[name] = None if np.isnan(step.values) else int(step.values)
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    width = max([28] + [len(r["best_layer"]) for r in rows])
    head = f"{'target':10s} {'kind':6s} {'metric':11s} {'best layer':{width}s} " \
           f"{'trained':>8s} {'random':>8s} {'emerges@ [95% CI]':>17s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        trained, rnd = (f"{r[m]:8.3f}" if m in r else f"{'-':>8s}"
                        for m in ("trained", "randomized"))
        em = "-" if r["emergence_step"] is None else str(r["emergence_step"])
        if r["emergence_step"] is not None and r.get("emergence_low") is not None:
            em += f" [{r['emergence_low']}-{r['emergence_high']}]"
        lines.append(f"{r['target']:10s} {r['kind']:6s} {r['metric']:11s} "
                     f"{r['best_layer']:{width}s} {trained} {rnd} {em:>17s}")
    return "\n".join(lines)
