"""Crash consistency with the kill placed: stop materialize at chosen writes, rerun, and
compare the whole store with an uninterrupted run, object by object and attribute by
attribute (tests/storecheck.py); concurrent starts on one new store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import faults
from actstore.errors import ActstoreError
from actstore.generation.materialize import MaterializeSettings, materialize
from actstore.generation.sampling import GenerationConfig
from actstore.store.view import open_store
from conftest import DEMO, REPO
from conftest import IV_LAYERS, PixelLabels
from storecheck import assert_same_store, snapshot

# a store resumed after a kill reads without notes from zarr (its bookkeeping folders
# are not zarr nodes): any UserWarning fails these tests
pytestmark = pytest.mark.filterwarnings("error::UserWarning")

# 6 images in blocks of 4: a whole block and a short last one; 2 steps keep a run ~3 s.
SMALL = {"steps": 2, "block_size": 4, "batch_size": 4}
# Where creation can be stopped, by key pattern and which match (1-based; -1: the last of
# an uninterrupted run), in the order the writes happen. Patterns, not write numbers: a
# change in how many writes a stage makes, or the order of a block's shards (its writer
# threads), can't move a point onto another stage.
ROOT, VARIANT = r"\.zarr/", r"\.zarr/models/trained/"
CLAIM = "_claims/claim-[^/]+"
POINTS = {
    "root-claim-choosing": (ROOT + CLAIM + r"/zarr\.json$", 1),
    "root-claim-ticket": (ROOT + CLAIM + r"/zarr\.json$", 2),
    "image-table-first": (ROOT + "images/", 1),
    "image-table-middle": (ROOT + "images/", 4),
    "image-table-group": (ROOT + r"images/zarr\.json$", 1),
    "root-marker": (ROOT + r"zarr\.json$", 1),
    "root-claim-removed": (ROOT + CLAIM + "$", 1),
    "variant-claim-choosing": (VARIANT + CLAIM + r"/zarr\.json$", 1),
    "variant-claim-ticket": (VARIANT + CLAIM + r"/zarr\.json$", 2),
    "step-coordinates": (VARIANT + "timestep/", 1),
    "step-coordinates-last": (VARIANT + "sigma/c", 1),
    "array-metadata-first": (VARIANT + r"layers/[^/]+/activation/zarr\.json$", 1),
    "array-metadata-last": (VARIANT + r"layers/[^/]+/activation/zarr\.json$", -1),
    "layer-metadata-first": (VARIANT + r"layers/[^/]+/zarr\.json$", 1),
    "layer-metadata-last": (VARIANT + r"layers/[^/]+/zarr\.json$", -1),
    "layers-group": (VARIANT + r"layers/zarr\.json$", 1),
    "block-records-group": (VARIANT + r"_blocks/zarr\.json$", 1),
    "models-group": (r"\.zarr/models/zarr\.json$", 1),
    "variant-marker": (VARIANT + r"zarr\.json$", 1),
    "variant-claim-removed": (VARIANT + CLAIM + "$", 1),
    "first-data-shard": (VARIANT + r"layers/[^/]+/activation/c\.0\.", 1),
    "first-block-last-shard": (VARIANT + r"(layers/[^/]+/activation|_image)/c\.0\.", -1),
    "first-block-record": (VARIANT + r"_blocks/[^/]+/zarr\.json$", 1),
    "second-block-shard": (VARIANT + r"layers/[^/]+/activation/c\.1\.", 1),
    "last-block-record": (VARIANT + r"_blocks/[^/]+/zarr\.json$", -1),
}


def _nth(log: list[str], pattern: str, nth: int) -> int:
    """``nth`` as a positive index among the writes of ``log`` matching ``pattern``."""
    hits = [line for line in log if line.startswith(("put", "open", "rm"))
            and re.search(pattern, line.split(" ", 1)[1])]
    assert hits and nth <= len(hits), f"no write #{nth} matching {pattern!r}"
    return len(hits) if nth == -1 else nth


def _deletes(log: list[str]) -> list[str]:
    """Deletes other than of creation claims (creation itself never deletes)."""
    return [line for line in log if line.startswith("rm") and "/_claims/" not in line]


@pytest.fixture(scope="module")
def six(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tables") / "six.csv"
    path.write_text("".join(Path(DEMO).read_text().splitlines(keepends=True)[:7]))
    return str(path)


def _run(model, table: str, uri: str, **kwargs) -> dict:
    return materialize(model, table, uri,
                       MaterializeSettings(gen=GenerationConfig(steps=SMALL["steps"]),
                                           batch_size=SMALL["batch_size"],
                                           block_size=SMALL["block_size"]),
                       progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, six):
    """An uninterrupted run on the faulty filesystem, with its write log."""
    faults.register()
    path = tmp_path_factory.mktemp("crash") / "ref.zarr"
    faults.FaultyFileSystem.reset()
    _run(tiny_model, six, faults.url(path))
    log = list(faults.FaultyFileSystem.log)
    assert not _deletes(log)
    return str(path), log


def _reader_sees_only_whole_blocks(uri: str, ref: str) -> None:
    """After a crash, a reader either gets a one-line 'being created' error or only
    complete blocks, each identical to the reference."""
    try:
        view = open_store(uri)
    except ActstoreError as exc:
        assert any(m in str(exc) for m in ("being created", "does not exist",
                                           "has no model 'trained' (has: none)")), str(exc)
        return
    want = open_store(ref)
    for layer in (view.layers[0], view.layers[-1]):
        got = view[layer].values
        np.testing.assert_array_equal(got, want[layer].isel(image=view.image_index).values)
    assert len(view.images["image"]) == len(view.image_index)


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_write_then_rerun_is_identical(point, tmp_path, tiny_model, six, reference):
    ref, log = reference
    pattern, nth = POINTS[point]
    n = _nth(log, pattern, nth)
    uri = faults.url(tmp_path / "s.zarr")
    faults.FaultyFileSystem.reset(faults.Plan("crash", n, pattern))
    with pytest.raises(Exception) as info:
        _run(tiny_model, six, uri)
    assert faults.FaultyFileSystem.stopped, f"{point} was never reached: {info.value!r}"
    assert re.search(pattern, faults.FaultyFileSystem.stopped_at)
    faults.FaultyFileSystem.reset()
    _reader_sees_only_whole_blocks(str(tmp_path / "s.zarr"), ref)
    _run(tiny_model, six, uri)
    assert not _deletes(faults.FaultyFileSystem.log)
    assert_same_store(str(tmp_path / "s.zarr"), ref)


def test_full_disk_then_rerun_is_identical(tmp_path, tiny_model, six, reference):
    """ENOSPC in the middle of creating the variant; after 'freeing space' the rerun must
    not report success over a broken store."""
    ref, _ = reference
    uri = faults.url(tmp_path / "s.zarr")
    faults.FaultyFileSystem.reset(faults.Plan("enospc", 3, r"/layers/"))
    with pytest.raises(OSError, match="No space left"):
        _run(tiny_model, six, uri)
    faults.FaultyFileSystem.reset()
    with pytest.raises(ActstoreError, match="being created"):
        open_store(str(tmp_path / "s.zarr"))
    out = _run(tiny_model, six, uri)
    assert out["blocks_written"] == 2
    assert_same_store(str(tmp_path / "s.zarr"), ref)


def test_crash_then_rerun_of_other_region_still_finishes_creation(tmp_path, tiny_model, six,
                                                                  reference):
    """A worker killed while creating the variant; another worker (other region) must
    finish the creation, not skip it."""
    ref, _ = reference
    uri = faults.url(tmp_path / "s.zarr")
    pattern, nth = POINTS["layer-metadata-first"]
    faults.FaultyFileSystem.reset(faults.Plan("crash", nth, pattern))
    with pytest.raises(faults.Crash):
        _run(tiny_model, six, uri, images="0:4")
    faults.FaultyFileSystem.reset()
    _run(tiny_model, six, uri, images="4:6")
    _run(tiny_model, six, uri, images="0:4")
    assert_same_store(str(tmp_path / "s.zarr"), ref)


def test_simultaneous_starts_on_a_new_store(tmp_path, tiny_model, six, reference):
    """Four workers start on one new store at the same instant, ten rounds: every one
    succeeds and the store equals a serial run (zarr's own parent-group writes used to
    raise ContainsGroupError here)."""
    from actstore.store import core as st
    from actstore.generation.prompts import load_prompts, prompts_fingerprint

    ref, _ = reference
    table = load_prompts(six)
    sha = prompts_fingerprint(table)
    for round_ in range(10):
        uri = str(tmp_path / f"r{round_}.zarr")
        barrier, errors = threading.Barrier(4), []

        def start():
            try:
                barrier.wait()
                st.create_or_check_root(uri, table, sha, SMALL["block_size"])
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert snapshot(uri) == {k: v for k, v in snapshot(ref).items()
                                 if k.startswith(("images/", "zarr.json"))}


def test_four_processes_start_together(tmp_path, reference, six):
    """Real processes through the command line, one region each, all at once."""
    ref, _ = reference
    uri = str(tmp_path / "four.zarr")
    args = ["--model", "tiny-random", "--prompts", six, "--steps", str(SMALL["steps"]),
            "--batch-size", str(SMALL["batch_size"]), "--block-size", str(SMALL["block_size"])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "--no-prefect", "--quiet",
                               "materialize", "--store", uri, *args, *region], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for region in (["--images", "0:4"], ["--images", "4:6"], [], ["--images", "0:4"])]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    assert_same_store(uri, ref)


@pytest.mark.parametrize("point", ["layer-metadata-first"])
def test_kill_minus_9_at_write_then_rerun_is_identical(point, tmp_path, reference, six):
    """The same with a real SIGKILL of the command-line process at that write."""
    pattern, nth = POINTS[point]
    ref, _ = reference
    path = tmp_path / "k.zarr"
    args = ["materialize", "--store", faults.url(path), "--model", "tiny-random",
            "--prompts", six, "--steps", str(SMALL["steps"]),
            "--batch-size", str(SMALL["batch_size"]), "--block-size", str(SMALL["block_size"])]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "faults", "--no-prefect", "--quiet", *args]
    killed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**env, "ACTSTORE_FAULT": f"kill:{nth}:{pattern}"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_store(str(path), ref)


@pytest.fixture(scope="module")
def experiment_ref(tmp_path_factory, ivstore, tiny_model):
    """An uninterrupted intervention experiment on a copy of the probed store."""
    import shutil

    from actstore.intervene.run import run_interventions

    faults.register()
    path = tmp_path_factory.mktemp("exp") / "ref.zarr"
    shutil.copytree(ivstore["uri"], path)
    faults.FaultyFileSystem.reset()
    from actstore.intervene.settings import InterventionSettings

    kw = dict(settings=InterventionSettings(layers=IV_LAYERS, steps=[0], images="12:16",
                                            n_targets=1, provider=PixelLabels()),
              model=tiny_model, progress=False)
    out = run_interventions(faults.url(path), ivstore["runs"]["salient"], **kw)
    return str(path), out["experiment_id"], list(faults.FaultyFileSystem.log), kw


# An experiment's creation: its arrays' metadata and the image ids, positions, strengths
# and arms, its block records' group and the parent group, then its settings marker
# (visible from there), the blocks and their records, and the summary (the last write).
EXP = r"\.zarr/interventions/[^/]+/"
EXP_POINTS = {"image-ids": (EXP + "image_id/c", 1),
              "array-metadata": (EXP + r"strength/zarr\.json$", 1),
              "marker": (EXP + r"zarr\.json$", 1),
              "first-output-shard": (EXP + "output/c", 1),
              "summary": (".*", -1)}


@pytest.mark.parametrize("point", EXP_POINTS)
def test_experiment_crash_at_write_then_rerun_is_identical(point, tmp_path, ivstore,
                                                           experiment_ref):
    import shutil

    from actstore.intervene.results import list_interventions
    from actstore.intervene.run import run_interventions

    ref, exp, log, kw = experiment_ref
    pattern, nth = EXP_POINTS[point]
    n = _nth(log, pattern, nth)
    path = tmp_path / "s.zarr"
    shutil.copytree(ivstore["uri"], path)
    faults.FaultyFileSystem.reset(faults.Plan("crash", n, pattern))
    with pytest.raises(Exception):
        run_interventions(faults.url(path), ivstore["runs"]["salient"], **kw)
    assert faults.FaultyFileSystem.stopped
    assert re.search(pattern, faults.FaultyFileSystem.stopped_at)
    faults.FaultyFileSystem.reset()
    assert exp not in list_interventions(str(path))
    run_interventions(faults.url(path), ivstore["runs"]["salient"], **kw)
    assert_same_store(str(path), ref)


def test_late_creation_by_a_second_run_keeps_the_summary(tmp_path, experiment_ref):
    """Two runs of one experiment: the second found it missing, and redoes the creation
    (its settings marker included) after the first run has finished and summarized. The
    summary survives and the store equals the uninterrupted run."""
    import shutil

    from actstore.intervene.results import (existing_settings, list_interventions,
                                            open_intervention, write_experiment)

    ref, exp, _, _ = experiment_ref
    path = tmp_path / "s.zarr"
    shutil.copytree(ref, path)
    before = list_interventions(str(path))[exp]
    ds = open_intervention(str(path), exp)
    write_experiment(str(path), exp, settings=existing_settings(str(path), exp),
                     image_ids=[str(i) for i in ds["image"].values],
                     positions=ds["position"].values,
                     n_targets=ds.sizes["k"], hw=(ds.sizes["y"], ds.sizes["x"]))
    assert list_interventions(str(path))[exp] == before
    assert_same_store(str(path), ref)
