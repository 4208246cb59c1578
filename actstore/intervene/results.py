"""Intervention experiments in the store: layout, block records, reading back.

One group per experiment; ``k`` indexes an image's targets, ``strength`` the dose and
``arm`` the edit (``probe``) or its equal-size random-direction control (``random``)::

    interventions/<experiment_id>/     attrs.settings (at creation: what a rerun must match)
      image_id, position   (image,)                the experiment's images, store order
      strength (strength,) f32, arm (arm,) str     the dose and arm coordinates
      offset               (image, k, 2) int32     target shift (dy, dx) px; 0 for user targets
      target               (image, k, H, W) f32    label-resolution target, normalized units
      original_label       (image, H, W) f32       label model on the store's final image
      score_pre            (image, k) f32          Dice (binary) or RMSE (continuous) vs target
      output               (image, k, strength, arm, H, W, 3) u8   the intervened image
      new_label            (image, k, strength, arm, H, W) f32     label model on it
      score_post           (image, k, strength, arm) f32           new label vs target
      score_other          (image, k, strength, arm) f32           vs the image's *other* targets
      edit_stats           (image, k, strength, arm, stat) f32     probe RMS error before/after,
                                                   ‖Δa‖/‖a‖ overall and per token (median)
      edit_size            (image, k, strength, arm, layer, step, measure) f32   per edit site
      _blocks/<a>-<b>/                             completion records per store image block
      _summary/                                    attrs.actstore_intervention: the summary

Every per-image array is chunked one image per chunk, so a block's writes never share a
chunk with another block's, and a block becomes visible only once its record exists
(written last, atomically, like materialize's). An experiment without its summary record
is incomplete: rerunning the same command fills the missing blocks. The summary is a
record of its own, not an attribute of the group, so a concurrent run of the same
experiment that (re)writes the group's creation marker can never drop it.
"""

from __future__ import annotations


import numpy as np
import xarray as xr
import zarr

from actstore.arguments import check_flag
from actstore.store import commit, io
from actstore.store import core as st
from actstore.store import layout as lay
from actstore.errors import ActstoreError
from actstore.store.layout import SIZE_MEASURES, STAT_NAMES

INTERVENTIONS = lay.INTERVENTIONS
SUMMARY_KEY = lay.SUMMARY_KEY


def group_path(experiment_id: str) -> str:
    return lay.experiment_path(experiment_id)


def existing_settings(store: str, experiment_id: str) -> dict | None:
    """The settings an experiment was created with, or None if it doesn't exist yet."""
    return (io.node_attrs(store, group_path(experiment_id)) or {}).get(lay.SETTINGS_KEY)


def create_experiment(store: str, experiment_id: str, *, settings: dict, image_ids: list[str],
                      positions: np.ndarray, n_targets: int, hw: tuple[int, int]) -> zarr.Group:
    """Make the experiment's arrays unless it exists (a resumed or concurrent run).

    ``settings`` is the plan's record: its strengths, arms, layers and steps size the
    arrays. Contents first (array metadata, the coordinates, the block records' group), the
    settings attribute last: an experiment without it is invisible and is created again,
    whole, by the next run."""
    io.sweep_partials(store, INTERVENTIONS, recursive=False)
    io.sweep_partials(store, group_path(experiment_id))
    if existing_settings(store, experiment_id) is None:
        write_experiment(store, experiment_id, settings=settings, image_ids=image_ids,
                         positions=positions, n_targets=n_targets, hw=hw)
    return io.open_group(store, group_path(experiment_id))


def write_experiment(store: str, experiment_id: str, *, settings: dict, image_ids: list[str],
                     positions: np.ndarray, n_targets: int, hw: tuple[int, int]) -> None:
    """The creation itself: deterministic, so a second run of the same experiment that
    found it missing may redo it at any moment, even after the first run finished."""
    path = group_path(experiment_id)
    n, k, (h, w) = len(image_ids), n_targets, hw
    dose = (len(settings["strengths"]), len(settings["arms"]))
    sites = (len(settings["layers"]), len(settings["steps"]))
    per = ["image", "k", "strength", "arm"]
    specs = {
        "image_id": ((n,), str, ["image"]),
        "position": ((n,), "int64", ["image"]),
        "strength": (dose[:1], "float32", ["strength"]),
        "arm": (dose[1:], str, ["arm"]),
        "offset": ((n, k, 2), "int32", ["image", "k", "axis"]),
        "target": ((n, k, h, w), "float32", ["image", "k", "y", "x"]),
        "original_label": ((n, h, w), "float32", ["image", "y", "x"]),
        "score_pre": ((n, k), "float32", ["image", "k"]),
        "output": ((n, k, *dose, h, w, 3), "uint8", per + ["y", "x", "rgb"]),
        "new_label": ((n, k, *dose, h, w), "float32", per + ["y", "x"]),
        "score_post": ((n, k, *dose), "float32", per),
        "score_other": ((n, k, *dose), "float32", per),
        "edit_stats": ((n, k, *dose, len(STAT_NAMES)), "float32", per + ["stat"]),
        "edit_size": ((n, k, *dose, *sites, len(SIZE_MEASURES)), "float32",
                      per + ["layer", "step", "measure"]),
    }
    values = {"image_id": np.asarray(image_ids, dtype=str), "position": positions,
              "strength": np.asarray(settings["strengths"], np.float32),
              "arm": np.asarray(settings["arms"], dtype=str)}
    for name, (shape, dtype, dims) in specs.items():
        per_image = dims[0] == "image" and len(shape) > 1   # one image per chunk
        chunks = (1,) + shape[1:] if per_image else tuple(max(s, 1) for s in shape)
        arr = st.create_array(store, f"{path}/{name}", shape=shape, chunks=chunks,
                              dtype=dtype, dims=dims, codec="zstd" if len(shape) > 2 else None)
        if name in values:
            arr[:] = values[name]
    io.put_group(store, lay.blocks_path(path))
    io.put_group(store, lay.INTERVENTIONS)
    io.put_group(store, path, {lay.SETTINGS_KEY: settings})   # the creation marker, last


def completed_blocks(store: str, experiment_id: str) -> set[tuple[int, int]]:
    return commit.completed_blocks_at(store, group_path(experiment_id))


def write_summary(store: str, experiment_id: str, summary: dict) -> None:
    """Written last: its presence is what makes an experiment complete (one PUT of a
    record of its own, which no other write of the experiment ever touches)."""
    io.put_group(store, lay.experiment_summary_path(experiment_id),
                 {lay.SUMMARY_KEY: summary})


def list_interventions(store: str) -> dict[str, dict]:
    """Complete experiments' summaries by experiment id (stores before version 0.2 kept
    the summary in the group's attributes)."""
    out = {}
    names = io.list_dir(store, INTERVENTIONS)
    paths = [p for n in names for p in (lay.experiment_summary_path(n), group_path(n))]
    attrs = iter(st.listed(store, paths))
    for name in names:
        for found in (next(attrs) or {}, next(attrs) or {}):
            if SUMMARY_KEY in found:
                out[name] = found[SUMMARY_KEY]
                break
    return out


def open_intervention(store: str, experiment_id: str, complete_only: bool = True) -> xr.Dataset:
    """An experiment as a Dataset indexed by image id and target index ``k``; by default
    only the images whose block is recorded (a running experiment shows what is done)."""
    check_flag(complete_only, "complete_only", f"store {store}: experiment {experiment_id}")
    settings = existing_settings(store, experiment_id)
    if settings is None:
        have = ", ".join(list_interventions(store)) or "none"
        raise ActstoreError(f"store {store}: no intervention experiment {experiment_id!r} "
                            f"(complete ones: {have}); run `actstore intervene`")
    ds = io.open_dataset(store, group_path(experiment_id))
    ids = np.array([str(v) for v in ds["image_id"].values.tolist()])
    arms = [str(v) for v in ds["arm"].values.tolist()]
    ds = ds.drop_vars(["image_id", "arm"]).assign_coords(
        image=ids, k=np.arange(ds.sizes["k"]), strength=ds["strength"].values, arm=arms,
        stat=list(STAT_NAMES), layer=settings["layers"], step=settings["steps"],
        measure=list(SIZE_MEASURES))
    if complete_only:
        pos = ds["position"].values
        done = np.zeros(len(pos), bool)
        for a, b in completed_blocks(store, experiment_id):
            done |= (pos >= a) & (pos < b)
        ds = ds.isel(image=np.flatnonzero(done))
    # where it came from, as open_scores and the views say it: combined with another
    # experiment's tables, the settings alone did not tell them apart
    ds.attrs.update(store=io.canonical(store), experiment=experiment_id, settings=settings)
    return ds

