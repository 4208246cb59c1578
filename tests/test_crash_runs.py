"""Crash consistency of label sets and probe runs with the kill placed: stop a run at a
chosen write (the faulty filesystem: nothing after it reaches storage, as after kill -9),
check what a reader sees, rerun, and compare the whole store with an uninterrupted run,
array by array and attribute by attribute (tests/storecheck.py)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import faults
from actstore.generation.materialize import MaterializeSettings, materialize
from actstore.generation.sampling import GenerationConfig
from actstore.label.labels import list_targets, open_labels, write_labels
from actstore.probe.runs import list_runs, load_probe, run_probes
from actstore.store import labelsets
from conftest import DEMO
from storecheck import assert_same_store, snapshot
from test_labels import Brightness

LAYER = "up_blocks.3.attentions.0"
TARGETS = ["depth", "salient"]


def _label(uri: str) -> None:
    """An overwrite of 'depth' that adds 'salient': one label set of two targets."""
    write_labels(uri, Brightness(), TARGETS, overwrite=True, progress=False)


def _probe(uri: str) -> str:
    return run_probes(uri, "depth", layers=[LAYER], steps=[0, 1], scheduler="threads",
                      progress=False)


def _at(log: list[str], pattern: str, nth: int = 1) -> int:
    """The 1-based index of the ``nth`` write matching ``pattern`` in a run's write log."""
    hits = [i for i, line in enumerate(log, 1) if re.search(pattern, line)]
    assert len(hits) >= nth, f"no write #{nth} matching {pattern!r}"
    return hits[nth - 1]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model) -> str:
    """A complete store (16 images, 2 steps) whose 'depth' labels the runs overwrite."""
    uri = str(tmp_path_factory.mktemp("runs") / "base.zarr")
    materialize(tiny_model, DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=2), batch_size=4, block_size=4),
                progress=False)
    write_labels(uri, Brightness(), ["depth"], on_x0=False, progress=False)
    return uri


def _reference(tmp_path_factory, base: str, run) -> tuple[str, list[str]]:
    faults.register()
    path = tmp_path_factory.mktemp("ref") / "s.zarr"
    shutil.copytree(base, path)
    faults.FaultyFileSystem.reset()
    run(faults.url(path))
    return str(path), list(faults.FaultyFileSystem.log)


@pytest.fixture(scope="module")
def label_ref(tmp_path_factory, base):
    return _reference(tmp_path_factory, base, _label)


@pytest.fixture(scope="module")
def probe_ref(tmp_path_factory, base):
    return _reference(tmp_path_factory, base, _probe)


def _crash(tmp_path, base: str, run, n: int) -> str:
    path = tmp_path / "s.zarr"
    shutil.copytree(base, path)
    faults.FaultyFileSystem.reset(faults.Plan("crash", n))
    with pytest.raises(Exception) as info:
        run(faults.url(path))
    assert faults.FaultyFileSystem.stopped, f"write {n} was never reached: {info.value!r}"
    faults.FaultyFileSystem.reset()
    return str(path)


# Write points of the label set: each version's writer mark, array metadata, the raw
# labels, the normalize-and-pool pass, the x0 pass, a version's attributes, the commit
# record (the set becomes visible with it), and after it the writer marks' removal.
LABEL_POINTS = [("_pending/zarr.json", 1), ("_pending/zarr.json", 2), ("/full/zarr.json", 1),
                ("/full/c", 1), ("/full/c", 5), ("/r8/c", 1), ("/x0/c", 3),
                (r"salient/v-[^/]+/zarr.json", 1), ("_commits/zarr.json", 1),
                ("_commits/c-", 1), ("rm .*_pending", 1), ("rm .*_pending", 2)]


@pytest.mark.parametrize("pattern,nth", LABEL_POINTS)
def test_label_set_crash_at_write_then_rerun_is_identical(pattern, nth, tmp_path, base,
                                                          label_ref):
    ref, log = label_ref
    n = _at(log, pattern, nth)
    committed = n > _at(log, "_commits/c-")
    path = _crash(tmp_path, base, _label, n)
    # All or nothing: both new targets, or the old 'depth' alone, unchanged.
    want = ref if committed else base
    assert sorted(list_targets(path)) == sorted(list_targets(want))
    for t in list_targets(path):
        for name, arr in open_labels(want, t).data_vars.items():
            np.testing.assert_array_equal(open_labels(path, t)[name].values, arr.values)
            assert open_labels(path, t)[name].attrs == arr.attrs
    _label(faults.url(path))
    # a committed crashed run's version is superseded by the rerun's, and kept a day for
    # readers that resolved it: compare the stores once that day is over
    for uri in (path, ref):
        labelsets.collect(uri, TARGETS, now=time.time() + labelsets.SUPERSEDED_KEEP_S)
    assert_same_store(path, ref)


# Write points of a probe run: its writer mark, a layer's fit arrays, the layer group, the
# scores, the run's attributes (its marker: the run becomes visible with it), then the
# writer mark's removal (the run is visible; the next run removes the leftover mark).
PROBE_POINTS = [("_pending/zarr.json", 1), ("/weights/c", 1), (LAYER + "/zarr.json", 1),
                ("/scores/metric/", 1), ("/scores/zarr.json", 1), (r"probes/[^/]+/zarr.json", 1),
                ("rm .*_pending", 1)]


@pytest.mark.parametrize("pattern,nth", PROBE_POINTS)
def test_probe_run_crash_at_write_then_rerun_is_identical(pattern, nth, tmp_path, base,
                                                          probe_ref):
    ref, log = probe_ref
    n = _at(log, pattern, nth)
    path = _crash(tmp_path, base, _probe, n)
    (ref_run,) = list_runs(ref)
    if n <= _at(log, r"probes/[^/]+/zarr.json"):
        assert not list_runs(path)          # an unmarked run is invisible, then collected
        _probe(faults.url(path))
        assert_same_store(path, ref)
        return
    (run,) = list_runs(path)                # visible and whole; only its writer mark is left
    np.testing.assert_array_equal(load_probe(path, run, LAYER)["weights"],
                                  load_probe(ref, ref_run, LAYER)["weights"])
    assert snapshot(path, skip=(f"probes/{run}/_pending",)) == snapshot(ref)
    again = _probe(faults.url(path))
    assert not list(Path(path, "probes").rglob("_pending"))
    assert snapshot(path, skip=(f"probes/{again}",)) == snapshot(ref)
