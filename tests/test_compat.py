"""Stores of schema 1 (labels written in place, no commit records) stay readable, and
writing into them uses the new protocol; a store of a newer schema is refused."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from actstore.errors import ActstoreError
from actstore.label.labels import label_path, list_targets, open_labels, write_labels
from actstore.store import labelsets
from actstore.store.view import open_store
from test_labels import Brightness


def _as_schema_1(store: str, target: str) -> dict:
    """Rewrite a target as schema 1 kept it: arrays and attributes in labels/<target>/."""
    src = Path(store) / label_path(store, target)
    attrs = dict(zarr.open_group(str(src), mode="r").attrs)
    legacy = Path(store) / "labels" / target
    tmp = Path(store).parent / "legacy-tmp"
    shutil.copytree(src, tmp)
    shutil.rmtree(Path(store) / "labels")
    shutil.copytree(tmp, legacy)
    shutil.rmtree(tmp)
    shutil.rmtree(legacy / "_pending", ignore_errors=True)
    (Path(store) / "labels" / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    meta = Path(store) / "zarr.json"
    root = json.loads(meta.read_text())
    root["attributes"]["actstore"]["schema_version"] = 1
    meta.write_text(json.dumps(root))
    return attrs


def test_schema_1_labels_read_then_overwritten(tmp_path, tiny_store):
    store = str(tmp_path / "old.zarr")
    shutil.copytree(tiny_store, store)
    write_labels(store, Brightness(), "depth", on_x0=False, progress=False)
    want = open_labels(store, "depth")["r8"].values
    attrs = _as_schema_1(store, "depth")
    assert label_path(store, "depth") == "labels/depth"
    assert list_targets(store)["depth"]["provider"] == attrs["provider"]
    np.testing.assert_array_equal(open_labels(store, "depth")["r8"].values, want)
    assert len(open_store(store).image_index) == 16
    with pytest.raises(ActstoreError, match="already has labels 'depth'"):
        write_labels(store, Brightness(), "depth", on_x0=False, progress=False)
    write_labels(store, Brightness(), "depth", overwrite=True, on_x0=False, progress=False)
    assert label_path(store, "depth").startswith("labels/depth/v-")
    np.testing.assert_array_equal(open_labels(store, "depth")["r8"].values, want)
    left = sorted(p.name for p in (Path(store) / "labels" / "depth").iterdir())
    assert "full" in left   # the schema-1 arrays stay a day for readers that resolved them
    labelsets.collect(store, ["depth"], now=time.time() + labelsets.SUPERSEDED_KEEP_S)
    left = sorted(p.name for p in (Path(store) / "labels" / "depth").iterdir())
    assert left == [label_path(store, "depth").rsplit("/", 1)[1], "zarr.json"]


def _newer_schema(src: str, store: Path) -> Path:
    """A copy of ``src`` that says it was written by an actstore of schema 99."""
    shutil.copytree(src, store)
    meta = store / "zarr.json"
    root = json.loads(meta.read_text())
    root["attributes"]["actstore"]["schema_version"] = 99
    meta.write_text(json.dumps(root))
    return store


def test_newer_schema_is_refused_in_one_line(tmp_path, tiny_store):
    store = _newer_schema(tiny_store, tmp_path / "new.zarr")
    with pytest.raises(ActstoreError, match="has store schema 99.*reads schemas 1, 2") as info:
        open_store(str(store))
    assert "\n" not in str(info.value)


def test_newer_schema_emergence_is_refused_in_one_line(tmp_path, explore_store):
    """open_emergence read a store of a newer schema (its probe runs were listed and
    joined as if this actstore knew their layout) where every other reader refuses it."""
    import actstore

    store = _newer_schema(explore_store, tmp_path / "new.zarr")
    with pytest.raises(ActstoreError, match="has store schema 99.*upgrade actstore") as info:
        actstore.open_emergence(str(store))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("call", ["get_run", "open_scores", "load_probe"])
def test_newer_schema_probe_run_is_refused_in_one_line(tmp_path, explore_store, call):
    """get_run, open_scores and load_probe read a run's marker alone, so a store of a newer
    schema was read as if this actstore knew its layout, where the listings refuse it."""
    from actstore.probe import runs

    run = runs.latest_run(explore_store, "depth")
    store = str(_newer_schema(explore_store, tmp_path / "new.zarr"))
    read = {"get_run": lambda: runs.get_run(store, run),
            "open_scores": lambda: runs.open_scores(store, run),
            "load_probe": lambda: runs.load_probe(store, run, runs.get_run(
                explore_store, run)["layers"][0])}[call]
    with pytest.raises(ActstoreError, match="has store schema 99.*upgrade actstore") as info:
        read()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("call", ["list_runs", "latest_run"])
def test_newer_schema_listing_is_refused_in_one_line(tmp_path, explore_store, call):
    """list_runs and latest_run read the root only when no run was found (a mistyped path),
    so a store of a newer schema holding runs was listed as if this actstore knew their
    layout, where open_store, open_emergence and get_run refuse it."""
    from actstore.probe import runs

    store = str(_newer_schema(explore_store, tmp_path / "new.zarr"))
    read = {"list_runs": lambda: runs.list_runs(store),
            "latest_run": lambda: runs.latest_run(store, "depth")}[call]
    with pytest.raises(ActstoreError, match="has store schema 99.*upgrade actstore") as info:
        read()
    assert "\n" not in str(info.value)
