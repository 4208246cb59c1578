"""A creator taken for gone while it lives (frozen with SIGSTOP, or its host cut off from
the store, longer than the staleness window) loses its creation claim to a rerun, which
creates the node; when it runs again it stops in one line at its next creation write,
writing nothing more, so the store stays the rerun's. Both runs are real processes: the
frozen one stops itself right after a chosen write (tests/faults.py ``stop``), and its
claim is rewritten to look 25 hours old, as a creator on another host that stopped
reaching the store looks (a claim on this host is otherwise judged by its live pid).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import faults
from actstore.store import claims, commit, io, labelsets
from actstore.store import layout as lay
from conftest import REPO
from storecheck import assert_same_store
from test_crash import POINTS, SMALL, reference, six  # noqa: F401
from test_label_takeover import _wait_stopped
from test_label_resume import TESTS

ENV = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}


def _args(uri: str, table: str, **over) -> list[str]:
    spec = {**SMALL, **over}
    return ["--no-prefect", "--quiet", "materialize", "--store", uri, "--model", "tiny-random",
            "--prompts", table, "--steps", str(spec["steps"]), "--batch-size",
            str(spec["batch_size"]), "--block-size", str(spec["block_size"])]


def _materialize(uri: str, table: str, **over) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *_args(uri, table, **over)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def _look_gone(uri: str, node: str, hours: float = 25) -> None:
    """Every claim on ``node`` as a store sees a creator not heard from for ``hours``."""
    for name in io.list_dir(uri, claims.claims_path(node)):
        path = f"{claims.claims_path(node)}/{name}"
        claim = (io.node_attrs(uri, path) or {}).get(claims.CLAIM_KEY)
        if claim is not None:
            io.put_group(uri, path, {claims.CLAIM_KEY: {**claim,
                                                        "started": time.time() - hours * 3600}})


def _files(root: Path) -> dict[str, tuple]:
    """Every file of the store with its modification time and its bytes' hash: 'nothing
    written, nothing removed' made checkable."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _wake_stops_writing_nothing(frozen: subprocess.Popen, root: Path) -> None:
    """Wake the frozen run: it stops, exit 2, in one line, and no file of the store at
    ``root`` is written, changed or removed after the wake-up."""
    before = _files(root)
    os.kill(frozen.pid, signal.SIGCONT)
    _, failure = frozen.communicate(timeout=300)
    failure = failure.strip()
    after = _files(root)
    assert {k: v for k, v in after.items() if before.get(k) != v} == {}, failure
    assert [k for k in before if k not in after] == [], failure
    assert frozen.returncode == 2 and len(failure.splitlines()) == 1, failure
    assert "was taken for gone" in failure and "wrote nothing more" in failure, failure


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("point, node, other", [
    ("image-table-middle", "", {}),                      # the rerun has the same settings
    ("image-table-middle", "", {"block_size": 2}),       # ... another block size
    ("array-metadata-first", "models/trained", {"steps": 3}),   # another variant config
])
def test_creator_taken_for_gone_while_frozen_stops_in_one_line_writing_nothing(
        point, node, other, tmp_path, six, reference):  # noqa: F811
    if other:
        alone = tmp_path / "alone.zarr"
        done = _materialize(str(alone), six, **other)
        assert done.returncode == 0, done.stderr[-2000:]
        want = str(alone)
    else:
        want = reference[0]
    path = tmp_path / "s.zarr"
    pattern, nth = POINTS[point]
    a = subprocess.Popen([sys.executable, "-m", "faults", *_args(faults.url(path), six)],
                         cwd=REPO, env={**ENV, "ACTSTORE_FAULT": f"stop:{nth}:{pattern}"},
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_stopped(a)
        _look_gone(str(path), node)
        rerun = _materialize(str(path), six, **other)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        _wake_stops_writing_nothing(a, path)
    finally:
        _kill(a)
    assert_same_store(str(path), want)


KILLED = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from actstore.store import labelsets
labelsets.begin(sys.argv[1], ["depth"], "job")
os.kill(os.getpid(), signal.SIGKILL)
"""

RESUME = """
import sys
sys.path.insert(0, sys.argv[2])
import faults
from actstore.errors import ActstoreError
from actstore.store import labelsets
faults.register()
if sys.argv[3]:
    faults.FaultyFileSystem.reset(faults.Plan("stop", 1, sys.argv[3]))
try:
    paths = labelsets.begin(sys.argv[1], ["depth"], "job")
    labelsets.commit_set(sys.argv[1], paths, {"depth": {"kind": "continuous"}})
except ActstoreError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
print(paths["depth"])
"""


def test_label_rerun_taken_for_gone_while_resuming_writes_nothing(tmp_path):
    """A rerun of a killed label job resumes its version in its turn of a claim on it. One
    frozen right after its mark, before its birth record, is taken for gone (its claim and
    mark look 25 hours old); a second rerun resumes and commits. Before, the first went on
    when woken: wrote its birth record into the committed version and failed only then."""
    uri = str(tmp_path / "s.zarr")
    killed = subprocess.run([sys.executable, "-c", KILLED, uri, TESTS], cwd=REPO, env=ENV)
    assert killed.returncode == -signal.SIGKILL
    [name] = [n for n in io.list_dir(uri, lay.label_target_path("depth"))
              if n.startswith(labelsets.VERSION_PREFIX)]
    version = lay.label_version_path("depth", name)
    a = subprocess.Popen([sys.executable, "-c", RESUME, faults.url(uri), TESTS,
                          r"/_pending/zarr\.json$"], cwd=REPO, env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_stopped(a)
        assert commit.writer_of(uri, version)["pid"] == a.pid
        _look_gone(uri, version)
        mark = commit.writer_of(uri, version)
        io.put_group(uri, lay.pending_path(version), {lay.WRITER_KEY: {
            **mark, "started": time.time() - 25 * 3600}})
        b = subprocess.run([sys.executable, "-c", RESUME, uri, TESTS, ""], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert b.returncode == 0 and b.stdout.strip() == version, b.stderr
        _wake_stops_writing_nothing(a, Path(uri))
    finally:
        _kill(a)
    assert labelsets.current(uri)["depth"]["path"] == version
    assert [n for n in io.list_dir(uri, version) if n.startswith("_")] == []
