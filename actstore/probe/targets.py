"""A probe run's target as the grid reads it: the label version's attributes, the store's
train/test split and, per layer, where the labels are (:class:`LayerSource`), resolved once
so a relabel during the run cannot pair one version's attributes with another's arrays."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from actstore.cluster import portable
from actstore.errors import ActstoreError
from actstore.label.labels import resolution_name
from actstore.store import core as st
from actstore.store import io, labelsets

if TYPE_CHECKING:   # fitting imports the grid (torch): the readers load without it
    from actstore.probe.grid import LayerSource, Split


def load_targets(store: str, target: str, grids: dict[str, tuple[int, int]] | None = None
                 ) -> tuple[dict, Split, dict[str, LayerSource]]:
    """The target's attributes, its train/test split, and per layer where its labels are
    (the label version's own path, so a relabelled target is a new source). ``grids``:
    (h, w) of layers that may postdate the labels (capture kinds added since), which use
    the labels pooled to their grid if the target has it."""
    from actstore.probe.grid import LayerSource, Split
    root = st.read_root_attrs(store)
    # one resolve for the attributes and the arrays: a relabel between two would pair one
    # version's kind, grids and z-score with another's arrays
    targets = labelsets.current(store)
    if target not in targets:
        raise ActstoreError(f"store {store}: no target {target!r} (has: "
                            f"{', '.join(sorted(targets)) or 'none'}); add it with "
                            "`actstore label`")
    attrs = targets[target]
    split = image_column(store, "split")
    blocks = tuple(st.blocks_of(root["n_images"], root["block_size"]))
    base = attrs["path"]   # this label version's arrays
    arrays = dict(attrs["layer_arrays"])
    pooled = set(io.list_dir(store, base))
    for layer, (h, w) in (grids or {}).items():
        res = arrays.setdefault(layer, resolution_name(h, w))
        if res not in pooled:
            raise ActstoreError(f"store {store}: labels {target!r} have no {res} grid for "
                                f"{layer} (captured after labelling); relabel with "
                                "`actstore label --overwrite`")
    # the grid's tasks open the store where they run: a relative path, on a user's
    # cluster, named the workers' folder (FileNotFoundError there until 2026-12-06)
    uri = portable(store)
    sources = {layer: LayerSource(uri, "", f"{base}/{res}", f"{base}/full", attrs["kind"],
                                  base)
               for layer, res in arrays.items()}
    return attrs, Split(split == "train", split == "test", blocks), sources


def image_column(store: str, name: str) -> np.ndarray:
    """A column of the image table as plain ``str`` (zarr returns numpy's StringDType), read
    directly: opening the table through xarray cost seconds per run."""
    values = io.open_array(store, f"images/{name}")[...]
    return np.array([str(v) for v in values.tolist()])
