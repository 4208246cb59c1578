"""Reading labels from a notebook: `open_labels(...).x0` and `.r<h>` answer with an array
or fail, never with an attribute value, and `label_array` names the arrays a target has."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import actstore
from actstore.errors import ActstoreError
from actstore.label.labels import label_array, label_path, list_targets, write_labels
from test_labels import Brightness, _npz


@pytest.fixture()
def store(tmp_path, tiny_store) -> str:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, dst)
    return str(dst)


def _typed_names(ds) -> set[str]:
    """Attribute names a user could type as a data variable: full, x0, r<h>[x<w>]."""
    return {k for k in ds.attrs if k in ("full", "x0") or re.fullmatch(r"r\d+(x\d+)?", k)}


def test_x0_of_labels_without_x0_fails_instead_of_reading_the_attribute(store, tmp_path):
    """A target labelled by an `array:` file has no x0 labels: `open_labels(u, "mask").x0`
    gave False (xarray fell back to attrs["x0"]) where an analyst expected an array."""
    ids = list(actstore.open_store(store).images["image"].values)
    mask = (np.random.default_rng(0).random((len(ids), 64, 64)) > 0.5).astype(np.float32)
    write_labels(store, f"array:{_npz(tmp_path, ids, {'mask': mask})}", "mask", progress=False)
    ds = actstore.open_labels(store, "mask")
    assert "x0" not in ds.data_vars
    with pytest.raises((AttributeError, KeyError)):
        ds.x0
    assert ds.attrs["has_x0"] is False and "image id" in ds.attrs["x0_note"]
    assert not _typed_names(ds), _typed_names(ds)
    # the stored attributes stay as they were, and so do their readers
    stored = json.loads(Path(store, label_path(store, "mask"), "zarr.json").read_text())
    assert stored["attributes"]["x0"] is False and "has_x0" not in stored["attributes"]
    assert list_targets(store)["mask"]["x0"] is False


def test_x0_of_labels_with_x0_is_the_array(store):
    write_labels(store, Brightness(), "depth", progress=False)
    ds = actstore.open_labels(store, "depth")
    assert ds.x0.dims == ("image", "step", "y", "x") and ds.attrs["has_x0"] is True
    assert not _typed_names(ds), _typed_names(ds)


def test_a_grid_the_store_lacks_is_refused_naming_the_arrays_it_has(store):
    """`label_array(u, t, "r64")` on a store whose smallest layer grid is 8×8 raised zarr's
    'No array found in store ... at path labels/depth/v-.../r64'; '' and '../' reached other
    nodes of the store."""
    write_labels(store, Brightness(), ["depth", "salient"], on_x0=False, progress=False)
    ds = actstore.open_labels(store, "depth")
    assert sorted(ds.data_vars) == ["full", "r1", "r2", "r4", "r8"]   # what the store has
    for name in ("r64", "x0", "", "../salient", "r8/../full"):
        with pytest.raises(ActstoreError) as exc:
            label_array(store, "depth", name)
        assert str(exc.value) == (f"store {store}: labels 'depth' have no array {name!r}; "
                                  "they have full, r1, r2, r4, r8")
    np.testing.assert_array_equal(label_array(store, "depth", "r8")[:], ds.r8.values)
