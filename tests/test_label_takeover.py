"""A label run wrongly taken for gone (alive but frozen: SIGSTOPped, its host partitioned
longer than the staleness window) whose version a rerun of the same job took over: once it
runs again it stops in one line at its next block or control step, writing and removing
nothing more. Both runs are real processes; the frozen one stops itself with SIGSTOP at a
chosen point, and its mark is rewritten to look 25 hours silent, as a writer on another
host whose heartbeats stopped reaching the store looks.
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

from actstore.errors import ActstoreError, Displaced
from actstore.store import commit, io, labelsets
from actstore.store import layout as lay
from conftest import REPO
from test_label_resume import (TARGET, TESTS, assert_committed_once,  # noqa: F401
                               stores)

RUN = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from actstore.errors import ActstoreError
from actstore.label import blocks
from actstore.label.labels import write_labels
from test_labels import Brightness

class Frozen(Brightness):
    '''Stops its own process in its provider call number `at` (0: never).'''

    def __init__(self, at):
        super().__init__()
        self.at = at

    def __call__(self, images):
        if self.calls + 1 == self.at:
            os.kill(os.getpid(), signal.SIGSTOP)
        return super().__call__(images)

where = sys.argv[3]
if where == "commit":      # every block recorded, about to drop staging and commit
    drop = blocks.drop_staging

    def frozen_drop(job):
        os.kill(os.getpid(), signal.SIGSTOP)
        drop(job)

    blocks.drop_staging = frozen_drop
try:
    write_labels(sys.argv[1], Frozen(int(where) if where.isdigit() else 0), "shade",
                 on_x0=False, progress=False)
except ActstoreError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


BEGUN = """
import sys
sys.path.insert(0, sys.argv[2])
from actstore.store import labelsets
paths = labelsets.begin(sys.argv[1], ["depth"], "job")
print(paths["depth"], flush=True)
sys.stdin.readline()
labelsets.commit_set(sys.argv[1], paths, {"depth": {"kind": "continuous"}})
"""


def _run(uri: str, where: str) -> subprocess.Popen:
    """A label run of the job; ``where``: '' (never frozen), a provider call number to
    freeze in (pass 1: one call per block), or 'commit'."""
    return subprocess.Popen([sys.executable, "-c", RUN, uri, TESTS, where], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                            stderr=subprocess.PIPE)


def _wait_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        assert time.monotonic() < deadline, "the run did not stop itself"
        time.sleep(0.05)


def _look_silent(uri: str, path: str, hours: float = 25) -> None:
    """The frozen run's mark as a store sees a writer not heard from for ``hours``."""
    info = commit.writer_of(uri, path)
    then = time.time() - hours * 3600
    io.put_group(uri, lay.pending_path(path), {lay.WRITER_KEY: {**info, "started": then,
                                                                "seen": then}})


def _files(root: Path) -> dict[str, tuple]:
    """Every file under the store's labels with its bytes' hash and modification time:
    'nothing written, nothing removed' made checkable."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted((root / lay.LABELS).rglob("*")) if p.is_file()}


def _attrs(uri: str, path: str) -> dict:
    group = io.open_group(uri, path)
    out = {name: dict(arr.attrs) for name, arr in group.arrays()}
    out[""] = {k: v for k, v in group.attrs.items() if k != "created"}
    return out


@pytest.mark.parametrize("frozen_at, other", [
    ("2", "commits"),        # A frozen in its second block; B resumes and commits
    ("2", "frozen"),         # ... B is itself frozen in its first block when A wakes
    ("commit", "commits"),   # A frozen after its blocks, before dropping staging
])
def test_run_taken_over_while_frozen_stops_in_one_line_writing_nothing(
        stores, tmp_path, frozen_at, other):
    uri, expected = stores
    alone = str(tmp_path / "alone.zarr")
    reference = _attrs(alone, labelsets.current(alone)[TARGET]["path"])
    procs = [_run(uri, frozen_at)]
    try:
        a = procs[0]
        _wait_stopped(a)
        [name] = [n for n in io.list_dir(uri, lay.label_target_path(TARGET))
                  if n.startswith(labelsets.VERSION_PREFIX)]
        version = lay.label_version_path(TARGET, name)
        mark_a = commit.writer_of(uri, version)
        assert mark_a["pid"] == a.pid
        _look_silent(uri, version)
        procs.append(_run(uri, "1" if other == "frozen" else ""))
        b = procs[1]
        if other == "frozen":
            _wait_stopped(b)
            assert commit.writer_of(uri, version)["pid"] == b.pid   # B took it over
        else:
            assert b.wait(timeout=300) == 0, b.stderr.read()
        before = _files(Path(uri))
        os.kill(a.pid, signal.SIGCONT)
        code, failure = a.wait(timeout=300), a.stderr.read().strip()
        after = _files(Path(uri))
        assert {k: v for k, v in after.items() if before.get(k) != v} == {}, failure
        assert [k for k in before if k not in after] == [], failure
        assert code == 2 and len(failure.splitlines()) == 1, failure
        assert "taken over" in failure and version in failure, failure
        if other == "frozen":
            assert f"pid {b.pid}" in failure, failure
        if other == "frozen":
            os.kill(b.pid, signal.SIGCONT)
            assert b.wait(timeout=300) == 0, b.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    assert_committed_once(uri, version, expected)
    assert _attrs(uri, version) == reference
    # no staging, records, marks (A's birth record included) or claims left in the version
    assert [n for n in io.list_dir(uri, version) if n.startswith("_")] == []


def test_heartbeat_of_a_run_taken_over_putting_its_mark_back_takes_nothing_back(tmp_path):
    """A frozen run's heartbeat that read its mark before the take-over puts its mark back
    over the resumer's (a mark is one object; the last PUT wins). Before, that gave the
    version back to the frozen run (its birth record was still there) and the resumer
    failed at its commit ('was removed while being written'): the one run meant to finish
    the job was the one stopped. Now the take-over removes the old birth records, so the
    old run owns nothing and the resumer (a real subprocess) commits."""
    uri = str(tmp_path / "s.zarr")
    mine = labelsets.begin(uri, ["depth"], "job")
    path, token = mine["depth"], labelsets._TOKENS[mine["depth"]]
    info = commit.writer_of(uri, path)
    _look_silent(uri, path)
    other = subprocess.Popen([sys.executable, "-c", BEGUN, uri, TESTS], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert other.stdout.readline().strip() == path, other.stderr.read()   # resumed it
        # this run's heartbeat, which read its mark before the take-over, lands now
        io.put_group(uri, lay.pending_path(path), {lay.WRITER_KEY: {**info,
                                                                   "seen": time.time()}})
        assert not commit.still_mine(uri, path, token)
        with pytest.raises(Displaced, match=r"^store .*: this label run's version "
                           rf"\({path}\) was taken over by another writer, which took this "
                           "run for gone"):
            labelsets.check_owned(uri, {path: token})
        commit.renew()                        # its next beat puts nothing back
        _, err = other.communicate("\n", timeout=120)
        assert other.returncode == 0, err
    finally:
        labelsets.release(mine)
        if other.poll() is None:
            os.kill(other.pid, signal.SIGKILL)
            other.wait()
    assert labelsets.current(uri)["depth"]["path"] == path
    assert io.list_dir(uri, lay.pending_path(path)) == []


def test_block_task_on_a_dask_worker_of_a_run_taken_over_writes_nothing(stores):
    """A fanned-out run's block tasks run in worker processes, which hold no mark: they
    check the run's tokens the job carries. This run (its marks held here) labels a block,
    looks 25 hours silent, a rerun of its job (a real subprocess) takes over and commits;
    its next block task, on a real Dask worker process, stops with one line and writes
    nothing (before, it went on, and failed with a zarr error on the staging the rerun
    had dropped)."""
    from distributed import Client, LocalCluster

    from actstore.label import blocks
    from actstore.label.labels import prepare_labels
    from actstore.label.settings import LabelSettings
    from test_labels import Brightness

    uri, expected = stores
    job = prepare_labels(uri, Brightness(), TARGET, LabelSettings(on_x0=False))
    version = job.paths[TARGET]
    try:
        blocks.run_blocks(job, blocks.PASS1, job.blocks[:1], prov=Brightness())
        _look_silent(uri, version)
        rerun = _run(uri, "")
        assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
        before = _files(Path(uri))
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                          dashboard_address=None) as lc, Client(lc) as client:
            task = client.submit(blocks.run_blocks, job, blocks.PASS1, job.blocks[1:2],
                                 prov=Brightness())
            with pytest.raises(Displaced, match=rf"^store .*: this label run's version "
                               rf"\({version}\) was taken over and committed by another "
                               "writer, which took this run for gone") as failure:
                task.result(timeout=120)
        assert "\n" not in str(failure.value)
        assert _files(Path(uri)) == before
    finally:
        labelsets.release(job.paths)
    assert_committed_once(uri, version, expected)


DISPLACED = """
import sys
sys.path.insert(0, sys.argv[2])
from actstore.errors import Displaced
from actstore.store import commit, labelsets
paths = labelsets.begin(sys.argv[1], ["depth"], "job")
print(paths["depth"], flush=True)
print(commit.writer_of(sys.argv[1], paths["depth"])["pid"], flush=True)
sys.stdin.readline()
try:
    labelsets.check_owned(sys.argv[1], labelsets.tokens(paths))
except Displaced as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def test_mark_a_displaced_run_put_back_does_not_let_a_clean_up_remove_the_live_rerun(
        tmp_path):
    """A run taken over whose heartbeat put its mark back (above) then stops (Displaced) and
    exits: its mark, naming a process now gone, sits on the version the rerun is writing.
    Before, the next label run of the target (another job) took that mark for the
    version's writer, found it gone and removed the version under the live rerun, which
    then failed at its commit ('was removed while being written'), and a rerun of the job
    took the live rerun for gone and the version over. Now a mark whose writer has no birth
    record is judged by the writer whose birth record is there (the rerun, alive), so the
    version is kept, the second rerun fails in one line, and the rerun commits. A and B
    are real processes; the clean-up and the second rerun run here."""
    uri = str(tmp_path / "s.zarr")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    try:
        a = subprocess.Popen([sys.executable, "-c", DISPLACED, uri, TESTS], cwd=REPO, env=env,
                             text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        procs.append(a)
        path = a.stdout.readline().strip()
        assert path, a.stderr.read()
        info = commit.writer_of(uri, path)
        _look_silent(uri, path)                  # A frozen for 25 hours, as others see it
        b = subprocess.Popen([sys.executable, "-c", BEGUN, uri, TESTS], cwd=REPO, env=env,
                             text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        procs.append(b)
        assert b.stdout.readline().strip() == path, b.stderr.read()   # B took it over
        # A wakes: its heartbeat, which read its mark before the take-over, lands now ...
        io.put_group(uri, lay.pending_path(path), {lay.WRITER_KEY: {**info,
                                                                   "seen": time.time()}})
        _, err = a.communicate("\n", timeout=120)   # ... and it stops at its next check
        assert a.returncode == 2 and "taken over" in err, err
        # the next label run of the target (another job) cleans up dead writers' versions
        other = labelsets.begin(uri, ["depth"], "another job")
        labelsets.abort(uri, other)
        labelsets.release(other)
        assert io.list_dir(uri, path), "B's version removed"
        # nor does a rerun of the job take B, alive, for gone and the version over
        with pytest.raises(ActstoreError, match=rf"another `actstore label` run of the same "
                           rf"job \(host .*, pid {b.pid}\) is writing the version"):
            labelsets.begin(uri, ["depth"], "job")
        _, err = b.communicate("\n", timeout=120)
        assert b.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    assert labelsets.current(uri)["depth"]["path"] == path
    assert io.list_dir(uri, lay.pending_path(path)) == []


def test_ownership_checks_grow_with_the_targets_not_their_square(tmp_path, tiny_store,
                                                                 monkeypatch):
    """Each check reads a version's mark and birth record: on S3, small GETs of tens of ms.
    Before, pass 2 checked every version before writing each target's arrays, so a run of
    n targets made n*(n+1) checks a block (110 at 10 targets); now a target's step checks
    its own version: 2n a block in each pass. The run is real (3 targets); the checks are
    counted by the birth-record reads they make, each let through to the store."""
    import shutil

    from actstore.label import blocks
    from actstore.label.labels import write_labels
    from test_labels import Brightness

    uri = str(tmp_path / "s.zarr")
    shutil.copytree(tiny_store, uri)
    checks, per_block = [0], {}
    through = io.exists      # a check asks first for its birth record: one read each

    def exists(uri_, key):
        checks[0] += f"/{lay.PENDING}/" in key and key.endswith(io.META)
        return through(uri_, key)
    monkeypatch.setattr(io, "exists", exists)
    for stage in ("raw_block", "final_block"):
        def counted(job, *args, _step=getattr(blocks, stage), _stage=stage):
            before = checks[0]
            _step(job, *args)
            per_block.setdefault(_stage, set()).add(checks[0] - before)
        monkeypatch.setattr(blocks, stage, counted)
    targets = ["depth", "salient", "shade"]
    write_labels(uri, Brightness(), targets, on_x0=False, progress=False)
    assert per_block == {"raw_block": {2 * len(targets)}, "final_block": {2 * len(targets)}}
    assert set(labelsets.current(uri)) == set(targets)


def test_a_run_finding_a_displaced_runs_mark_over_its_own_puts_its_own_back(tmp_path):
    """Until the run that took over puts its mark back, a clean-up judges the version by
    its birth record, which names its start, not its last renewal: a run begun more than a
    day ago looks gone. Before, its mark came back only with its next heartbeat (up to 3
    hours); now its next ownership check (each block step) puts it back."""
    uri = str(tmp_path / "s.zarr")
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    mine = labelsets.begin(uri, ["depth"], "job")
    path = mine["depth"]
    try:
        info = commit.writer_of(uri, path)
        # a displaced run's heartbeat put its mark back, then that run exited
        io.put_group(uri, lay.pending_path(path), {lay.WRITER_KEY: {
            **info, "token": "displaced", "pid": done.pid, "seen": time.time()}})
        labelsets.check_owned(uri, labelsets.tokens(mine))
        assert commit.writer_of(uri, path)["token"] == info["token"]
        assert not commit.abandoned(commit.writer_of(uri, path))
    finally:
        labelsets.abort(uri, mine)
        labelsets.release(mine)
