"""Reruns of one killed label job that overlap: at most one may resume the killed run's
version. The killed run is made in this process (its marks released: its writer is gone);
the reruns are real `write_labels` calls, one or both in subprocesses.
"""

from __future__ import annotations

import os
import socket
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from actstore.errors import ActstoreError
from actstore.label.labels import write_labels
from actstore.store import claims, commit, io, labelsets
from conftest import REPO
from test_labels import Brightness, full_digest

TARGET = "shade"
TESTS = str(Path(__file__).parent)
RERUN = """
import sys
import time
sys.path.insert(0, sys.argv[2])
from actstore.errors import ActstoreError
from actstore.label.labels import write_labels
from test_labels import Brightness
try:
    write_labels(sys.argv[1], Brightness(), "shade", on_x0=False, progress=False)
except ActstoreError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""
KILLED = """
import os, sys
sys.path.insert(0, sys.argv[2])
from actstore.label import blocks
from actstore.label.labels import prepare_labels
from actstore.label.settings import LabelSettings
from test_labels import Brightness
prov = Brightness()
job = prepare_labels(sys.argv[1], prov, "shade", LabelSettings(on_x0=False))
blocks.run_blocks(job, blocks.PASS1, job.blocks[:1], prov=prov)
print(job.paths["shade"], flush=True)
os._exit(9)
"""


class Reshade(Brightness):
    """The same job (name, provenance, targets, options) labelling other values: what a
    label model that is not bitwise deterministic (GPU kernels) gives on a rerun. Makes a
    rerun's writes into another run's committed version visible in its arrays."""

    def __call__(self, images):
        out = super().__call__(images)
        return {**out, TARGET: out[TARGET] ** 2}


def _killed(uri: str) -> str:
    """A label run of the job killed after its first pass-1 block (a real process that
    exits without a word): its version path."""
    out = subprocess.run([sys.executable, "-c", KILLED, uri, TESTS], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 9, out.stderr
    return out.stdout.strip()


def _rerun(uri: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RERUN, uri, TESTS], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                            stderr=subprocess.PIPE, **popen)


def _arrays(uri: str, path: str) -> dict[str, np.ndarray]:
    group = io.open_group(uri, path)
    return {name: np.asarray(arr[...]) for name, arr in group.arrays()}


def assert_committed_once(uri: str, version: str, expected: dict[str, np.ndarray]) -> None:
    """The job's version is current, named by one commit, and equal array by array to an
    uninterrupted run's."""
    assert labelsets.current(uri)[TARGET]["path"] == version
    assert len([1 for _, rec in labelsets._commits(uri) if TARGET in rec]) == 1
    got = _arrays(uri, version)
    assert sorted(got) == sorted(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)


@pytest.fixture()
def stores(tmp_path, tiny_store) -> tuple[str, dict[str, np.ndarray]]:
    """A copy of the reference store and the arrays of an uninterrupted run of the job."""
    alone = str(tmp_path / "alone.zarr")
    shutil.copytree(tiny_store, alone)
    write_labels(alone, Brightness(), TARGET, on_x0=False, progress=False)
    uri = str(tmp_path / "s.zarr")
    shutil.copytree(tiny_store, uri)
    return uri, _arrays(alone, labelsets.current(alone)[TARGET]["path"])


def test_rerun_that_chose_to_resume_after_another_committed_writes_nothing(stores,
                                                                          monkeypatch):
    """Two reruns both find the killed run's version to resume; the other one (a real
    subprocess) resumes it and commits before this one marks it. Before, this one then
    marked the committed version as its own, redid every block into it and committed it
    again: the current labels were rewritten under their readers (here with other values).
    Now it stops before writing anything there, with one line."""
    uri, expected = stores
    version = _killed(uri)
    adoptable, placed = labelsets._adoptable, []

    def other_rerun_commits_first(*args):
        out = adoptable(*args)
        if not placed:
            placed.append(out)
            other = _rerun(uri)
            assert other.wait(timeout=300) == 0, other.stderr.read()
        return out

    monkeypatch.setattr(labelsets, "_adoptable", other_rerun_commits_first)
    assert labelsets.current(uri).get(TARGET) is None
    failure = None
    try:
        write_labels(uri, Reshade(), TARGET, on_x0=False, progress=False)
    except ActstoreError as e:
        failure = str(e)
    assert placed == [version.rsplit("/", 1)[-1]]     # this run chose to resume it
    after = labelsets.current(uri)[TARGET]["path"]
    assert after == version
    got = _arrays(uri, version)
    assert sorted(got) == sorted(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    assert io.list_dir(uri, claims.claims_path(version)) == []     # the turns left nothing
    assert failure is not None and "\n" not in failure
    assert "another `actstore label` run of the same job" in failure
    assert "taken for gone" not in failure


def test_two_reruns_started_together_commit_one_version_equal_to_an_uninterrupted_run(
        stores):
    """Two reruns of the killed job in their own processes, started at the same moment:
    one resumes and commits the killed run's version, equal array by array to an
    uninterrupted run's; the other fails with one line and stores nothing."""
    uri, expected = stores
    version = _killed(uri)
    runs = [_rerun(uri), _rerun(uri)]
    codes = [r.wait(timeout=300) for r in runs]
    errors = [r.stderr.read().strip() for r in runs]
    assert sorted(codes) == [0, 2], errors
    loser = errors[codes.index(2)]
    assert len(loser.splitlines()) == 1 and "taken for gone" not in loser
    assert "another `actstore label` run of the same job" in loser or \
        "already has labels 'shade'" in loser
    commits = [rec for _, rec in labelsets._commits(uri) if TARGET in rec]
    assert len(commits) == 1 and labelsets.current(uri)[TARGET]["path"] == version
    got = _arrays(uri, version)
    assert sorted(got) == sorted(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    assert io.list_dir(uri, claims.claims_path(version)) == []
    before = full_digest(Path(uri) / version)
    with pytest.raises(ActstoreError, match="already has labels 'shade'"):
        write_labels(uri, Brightness(), TARGET, on_x0=False, progress=False)
    assert full_digest(Path(uri) / version) == before


def test_resume_is_exclusive_on_s3(bucket, monkeypatch):
    """The same turns on a real S3 API (moto's server): of two resumers that both chose the
    dead run's version, the one whose turn comes second finds the other's live mark and
    fails in one line, holding no mark and leaving no claim; the other commits it."""
    uri = f"s3://{bucket}/resume.zarr"
    killed = labelsets.begin(uri, ["depth"], "job")
    io.put_group(uri, f"{killed['depth']}/full")
    labelsets.release(killed)                         # its writer is gone
    adoptable, won = labelsets._adoptable, {}

    def other_resumes_first(*args):
        out = adoptable(*args)
        if not won:
            won["paths"] = {}
            won["paths"] = labelsets.begin(uri, ["depth"], "job")
        return out

    monkeypatch.setattr(labelsets, "_adoptable", other_resumes_first)
    with pytest.raises(ActstoreError, match=r"another `actstore label` run of the same job "
                       r"\(host \S+, pid \d+\) is writing the version this run would resume"):
        labelsets.begin(uri, ["depth"], "job")
    path = killed["depth"]
    assert won["paths"] == killed and commit.still_mine(uri, path, labelsets._TOKENS[path])
    assert io.list_dir(uri, claims.claims_path(path)) == []
    labelsets.commit_set(uri, won["paths"], {"depth": {"kind": "continuous"}})
    labelsets.release(won["paths"])
    assert labelsets.current(uri)["depth"]["path"] == path
    assert io.exists(uri, io.key(f"{path}/full"))


def test_rerun_whose_turn_comes_second_waits_then_fails_in_one_line(stores, monkeypatch):
    """Both reruns chose the version and both hold a claim on it at once: this one (first
    in line) marks it while the other (a real subprocess) waits its turn; the other then
    finds it taken and fails in one line, having written nothing, and this run commits the
    version equal to an uninterrupted run's."""
    uri, expected = stores
    version = _killed(uri)
    start, other = commit.begin, []

    def mark_once_the_other_waits(store, path, job=None):
        if path == version and not other:
            other.append(_rerun(uri))
            deadline = time.monotonic() + 120
            while len(io.list_dir(uri, claims.claims_path(version))) < 2:   # ours, theirs
                assert time.monotonic() < deadline and other[0].poll() is None, \
                    other[0].stderr.read() if other[0].poll() is not None else "no claim"
                time.sleep(0.05)
        return start(store, path, job)

    monkeypatch.setattr(commit, "begin", mark_once_the_other_waits)
    write_labels(uri, Brightness(), TARGET, on_x0=False, progress=False)
    assert other and other[0].wait(timeout=300) == 2
    loser = other[0].stderr.read().strip()
    assert len(loser.splitlines()) == 1 and "taken for gone" not in loser
    # what it finds in its turn: this run's live mark, or (polling later) its commit
    assert f"another `actstore label` run of the same job (host {socket.gethostname()}, " \
           f"pid {os.getpid()}) is writing the version this run would resume ({version})" \
        in loser or "another `actstore label` run of the same job resumed and committed " \
        f"the version this run was to resume ({version}); its labels are current" in loser
    assert_committed_once(uri, version, expected)
    assert io.list_dir(uri, claims.claims_path(version)) == []
