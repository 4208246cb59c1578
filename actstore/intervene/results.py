"""Intervention experiments in the store: layout, block records, reading back.

One group per experiment::

    interventions/<experiment_id>/     attrs.settings (at creation: what a rerun must match)
      image_id, position   (image,)                the experiment's images, store order
      offset               (image, k, 2) int32     target shift (dy, dx) px; 0 for user targets
      target               (image, k, H, W) f32    label-resolution target, normalized units
      output               (image, k, H, W, 3) u8  the intervened image
      new_label            (image, k, H, W) f32    label model on the intervened image
      original_label       (image, H, W) f32       label model on the store's final image
      score_pre, score_post (image, k) f32         Dice (binary) or RMSE (continuous) vs target
      score_other          (image, k) f32          new label vs the image's *other* targets
      edit_stats           (image, k, stat) f32    probe RMS error before/after edit, ‖Δa‖/‖a‖
      _blocks/<a>-<b>/                             completion records per store image block
      _summary/                                    attrs.actstore_intervention: the summary

Every array is chunked one image per chunk, so a block's writes never share a chunk with
another block's, and a block becomes visible only once its record exists (written last,
atomically, like materialize's). An experiment without its summary record is incomplete:
rerunning the same command fills the missing blocks. The summary is a record of its own,
not an attribute of the group, so a concurrent run of the same experiment that (re)writes
the group's creation marker can never drop it.
"""

from __future__ import annotations


import numpy as np
import xarray as xr
import zarr

from actstore.store import commit, io
from actstore.store import core as st
from actstore.store import layout as lay
from actstore.errors import ActstoreError
from actstore.intervene.edits import STAT_NAMES

INTERVENTIONS = lay.INTERVENTIONS
SUMMARY_KEY = lay.SUMMARY_KEY


def group_path(experiment_id: str) -> str:
    return lay.experiment_path(experiment_id)


def existing_settings(store: str, experiment_id: str) -> dict | None:
    """The settings an experiment was created with, or None if it doesn't exist yet."""
    return (io.node_attrs(store, group_path(experiment_id)) or {}).get(lay.SETTINGS_KEY)


def create_experiment(store: str, experiment_id: str, settings: dict, image_ids: list[str],
                      positions: np.ndarray, n_targets: int, hw: tuple[int, int]) -> zarr.Group:
    """Make the experiment's arrays unless it exists (a resumed or concurrent run).

    Contents first (array metadata, the image ids and positions, the block records'
    group), the settings attribute last: an experiment without it is invisible and is
    created again, whole, by the next run."""
    io.sweep_partials(store, INTERVENTIONS, recursive=False)
    io.sweep_partials(store, group_path(experiment_id))
    if existing_settings(store, experiment_id) is None:
        write_experiment(store, experiment_id, settings, image_ids, positions, n_targets, hw)
    return io.open_group(store, group_path(experiment_id))


def write_experiment(store: str, experiment_id: str, settings: dict, image_ids: list[str],
                     positions: np.ndarray, n_targets: int, hw: tuple[int, int]) -> None:
    """The creation itself: deterministic, so a second run of the same experiment that
    found it missing may redo it at any moment, even after the first run finished."""
    path = group_path(experiment_id)
    n, k, (h, w) = len(image_ids), n_targets, hw
    specs = {
        "image_id": ((n,), str, ["image"]),
        "position": ((n,), "int64", ["image"]),
        "offset": ((n, k, 2), "int32", ["image", "k", "axis"]),
        "target": ((n, k, h, w), "float32", ["image", "k", "y", "x"]),
        "output": ((n, k, h, w, 3), "uint8", ["image", "k", "y", "x", "rgb"]),
        "new_label": ((n, k, h, w), "float32", ["image", "k", "y", "x"]),
        "original_label": ((n, h, w), "float32", ["image", "y", "x"]),
        "score_pre": ((n, k), "float32", ["image", "k"]),
        "score_post": ((n, k), "float32", ["image", "k"]),
        "score_other": ((n, k), "float32", ["image", "k"]),
        "edit_stats": ((n, k, len(STAT_NAMES)), "float32", ["image", "k", "stat"]),
    }
    values = {"image_id": np.asarray(image_ids, dtype=str), "position": positions}
    for name, (shape, dtype, dims) in specs.items():
        chunks = (max(n, 1),) if len(shape) == 1 else (1,) + shape[1:]
        arr = st.create_array(store, f"{path}/{name}", shape=shape, chunks=chunks,
                              dtype=dtype, dims=dims,
                              codec="zstd" if len(shape) > 2 else None)
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
    for name in io.list_dir(store, INTERVENTIONS):
        for path in (lay.experiment_summary_path(name), group_path(name)):
            attrs = io.node_attrs(store, path) or {}
            if SUMMARY_KEY in attrs:
                out[name] = attrs[SUMMARY_KEY]
                break
    return out


def open_intervention(store: str, experiment_id: str, complete_only: bool = True) -> xr.Dataset:
    """An experiment as a Dataset indexed by image id and target index ``k``; by default
    only the images whose block is recorded (a running experiment shows what is done)."""
    settings = existing_settings(store, experiment_id)
    if settings is None:
        have = ", ".join(list_interventions(store)) or "none"
        raise ActstoreError(f"store {store}: no intervention experiment {experiment_id!r} "
                            f"(complete ones: {have}); run `actstore intervene`")
    ds = io.open_dataset(store, group_path(experiment_id))
    ids = np.array([str(v) for v in ds["image_id"].values.tolist()])
    ds = ds.drop_vars("image_id").assign_coords(image=ids, k=np.arange(ds.sizes["k"]),
                                                stat=list(STAT_NAMES))
    if complete_only:
        pos = ds["position"].values
        done = np.zeros(len(pos), bool)
        for a, b in completed_blocks(store, experiment_id):
            done |= (pos >= a) & (pos < b)
        ds = ds.isel(image=np.flatnonzero(done))
    ds.attrs.update(settings=settings)
    return ds


def format_interventions(rows: list[dict]) -> str:
    """Pre/post medians per experiment: does the output follow the edited representation?"""
    lines = [f"{'intervention':24s} {'metric':6s} {'n':>4s} {'pre':>7s} {'post':>7s} "
             f"{'improved':>8s} {'non-finite':>10s}"]
    for r in rows:  # post and improved are over the edits that kept the UNet finite
        post = r["post"].get("median", float("nan"))
        improved = r["improved_fraction"]
        lines.append(f"{r['target'] + ' ' + r['method']:24s} {r['metric']:6s} "
                     f"{r['interventions']:4d} {r['pre']['median']:7.3f} {post:7.3f} "
                     f"{'n/a' if improved is None else format(improved, '.0%'):>8s} "
                     f"{r['non_finite']:10d}")
    return "\n".join(lines)
