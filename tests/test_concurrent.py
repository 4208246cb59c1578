"""Different commands overlapping on one store, the overlap placed deterministically: the
deleting command runs to completion between a reader's resolve and its reads (or between
a clean-up's two looks at a prefix). A reader must get a consistent snapshot or a one-line
error, never fill values for data removed under it; a live writer's work is never removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import actstore.probe.runs as runs
from actstore.errors import ActstoreError, Displaced
from actstore.intervene.results import list_interventions, open_intervention
from actstore.intervene.run import run_interventions
from actstore.intervene.settings import InterventionSettings as IS, SweepSettings
from actstore.label.labels import label_path, open_labels, write_labels
from actstore.probe.runs import list_runs, load_probe, open_emergence, open_scores, run_probes
from actstore.store import commit, io, labelsets
from actstore.store import layout as lay
from conftest import IV_LAYERS, IV_STEPS, REPO, PixelLabels
from test_labels import Brightness

LAYER = "up_blocks.3.attentions.0"


class Dimness(Brightness):
    """Other labels for the same targets: what a relabel with another model gives."""

    name = "dimness"

    def __call__(self, images):
        return {t: (1 - v if t != "salient" else v) for t, v in super().__call__(images).items()}


@pytest.fixture()
def store(tmp_path, tiny_store) -> str:
    dst = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, dst)
    write_labels(str(dst), Brightness(), "depth", on_x0=False, progress=False)
    return str(dst)


def _probe(uri: str) -> str:
    return run_probes(uri, "depth", layers=[LAYER], steps=[0, 1], scheduler="sync",
                      progress=False)


def _relabel(uri: str) -> None:
    write_labels(uri, Dimness(), "depth", on_x0=False, overwrite=True, progress=False)


def _relabel_after_resolve(monkeypatch, uri: str) -> None:
    """`label --overwrite` runs to completion right after the probe run resolved its labels."""
    original = runs.load_targets

    def resolve_then_relabel(*args, **kwargs):
        out = original(*args, **kwargs)
        _relabel(uri)
        return out

    monkeypatch.setattr(runs, "load_targets", resolve_then_relabel)


def _run_arrays(uri: str, run_id: str) -> dict[str, np.ndarray]:
    probe = load_probe(uri, run_id, LAYER)
    return {"weights": probe["weights"], "bias": probe["bias"],
            "per_image": open_scores(uri, run_id)["per_image"].values}


# -- label --overwrite while probe reads the labels ---------------------------------------

def test_relabel_during_probe_run_reads_old_version_whole(store, tmp_path, monkeypatch):
    """The run reads the version it resolved, whole: the same run as on a store never
    relabelled (the superseded version is kept for readers that hold it)."""
    alone = tmp_path / "alone.zarr"
    shutil.copytree(store, alone)
    expected = _run_arrays(str(alone), _probe(str(alone)))
    old = label_path(store, "depth")
    _relabel_after_resolve(monkeypatch, store)
    run_id = _probe(store)
    assert label_path(store, "depth") != old          # the relabel did commit meanwhile
    got = _run_arrays(store, run_id)
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    # and its attributes name the version it read, not the one current when it ended
    assert list_runs(store)[run_id]["labels"]["version"] == old.rstrip("/").rsplit("/", 1)[-1]
    monkeypatch.undo()
    later = _probe(store)
    assert list_runs(store)[later]["labels"]["version"] == \
        label_path(store, "depth").rstrip("/").rsplit("/", 1)[-1]


def test_relabel_between_the_probe_runs_label_lookups_reads_one_version(store, tmp_path,
                                                                       monkeypatch):
    """The run takes the target's attributes (kind, grids, provider, mean/std) and its
    arrays from one resolve. Before, it resolved twice: a relabel in between gave a run
    fitted on the new arrays whose record named the old labels' provider and z-score
    beside the new version."""
    alone = tmp_path / "alone.zarr"
    shutil.copytree(store, alone)
    expected = _run_arrays(str(alone), _probe(str(alone)))
    old = label_path(store, "depth")
    resolve, load, armed = labelsets.current, runs.load_targets, []

    def load_targets(*args, **kwargs):
        armed.append(True)
        return load(*args, **kwargs)

    def current_then_relabel(*args, **kwargs):
        out = resolve(*args, **kwargs)
        if armed == [True]:     # right after the run's first look at the labels
            armed.append(False)
            _relabel(store)
        return out

    monkeypatch.setattr(runs, "load_targets", load_targets)
    monkeypatch.setattr(labelsets, "current", current_then_relabel)
    run_id = _probe(store)
    assert armed == [True, False] and label_path(store, "depth") != old   # relabelled
    got = _run_arrays(store, run_id)
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    recorded = list_runs(store)[run_id]["labels"]
    version = old.rstrip("/").rsplit("/", 1)[-1]
    assert recorded["version"] == version
    committed = next(rec["depth"] for _, rec in labelsets._commits(store)
                     if rec.get("depth", {}).get("version") == version)
    assert {k: recorded[k] for k in ("provider", "mean", "std", "created")} == \
        {k: committed[k] for k in ("provider", "mean", "std", "created")}


def test_relabel_removing_version_under_probe_fails_in_one_line(store, monkeypatch):
    """Past the grace period the old version goes: the run fails naming the labels and
    saying to rerun, and stores nothing."""
    monkeypatch.setattr(labelsets, "SUPERSEDED_KEEP_S", 0.0)
    _relabel_after_resolve(monkeypatch, store)
    with pytest.raises(ActstoreError, match=r"labels 'depth' were replaced by a later "
                       r"`actstore label` run .* rerun `actstore probe --target depth`"):
        _probe(store)
    assert list_runs(store) == {}
    assert [n for n in io.list_dir(store, lay.PROBES) if not n.startswith("_")
            and n != io.META] == []


def test_version_removed_by_a_cleanup_whose_clock_runs_ahead_fails_in_one_line(store,
                                                                             monkeypatch):
    """The clean-up that removes the superseded version runs on a host whose clock is two
    days ahead: by the probe run's own clock the version is still kept, so the time check
    passed and the read's zarr ArrayNotFoundError came out ('unexpected', exit 1; with the
    arrays' metadata already open, fill values). Whether the version is still there is
    asked of the store, which no clock can get wrong."""
    import time

    # depth committed with salient: the commit record stays while salient is current
    write_labels(store, Brightness(), ["depth", "salient"], on_x0=False, overwrite=True,
                 progress=False)
    original = runs.load_targets

    def resolve_then_removed(*args, **kwargs):
        out = original(*args, **kwargs)
        _relabel(store)
        labelsets.collect(store, [], now=time.time() + 2 * labelsets.SUPERSEDED_KEEP_S)
        return out

    monkeypatch.setattr(runs, "load_targets", resolve_then_removed)
    with pytest.raises(ActstoreError, match=r"labels 'depth' were replaced by a later "
                       r"`actstore label` run .* rerun `actstore probe --target depth`"):
        _probe(store)
    assert list_runs(store) == {}


def test_notebook_labels_survive_an_overwrite(store):
    """A lazily opened label Dataset keeps reading the labels it opened (before: the
    removed chunks read as the fill value, silently)."""
    ds = open_labels(store, "depth")
    before = open_labels(store, "depth")["full"].values.copy()
    _relabel(store)
    assert not np.array_equal(open_labels(store, "depth")["full"].values, before)
    np.testing.assert_array_equal(ds["full"].values, before)


def test_relabel_from_a_host_whose_clock_runs_behind_becomes_current(store):
    """The labels' current commit was made on a host whose clock runs an hour ahead (its id
    says so); a relabel from here then drew an id that sorted before it, so its labels
    never became current although the run said 'replaced', and were removed a day later
    as superseded. A commit's id now sorts after every commit its run saw."""
    import time

    (cid, record), = labelsets._commits(store)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() + 3600))
    io.put_group(store, lay.label_commit_path(f"c-{stamp}000000-ahead0"),
                 {lay.LABELS_COMMIT_KEY: record})
    io.remove(store, lay.label_commit_path(cid))
    old = label_path(store, "depth")
    summary = write_labels(store, Dimness(), "depth", on_x0=False, overwrite=True,
                           progress=False)
    assert summary["replaced"] and label_path(store, "depth") != old
    assert labelsets.current(store)["depth"]["provider"] == summary["provider"]


def test_show_during_a_relabel_names_one_version_with_its_own_provider(store, monkeypatch):
    """`actstore show` reads the labels once: before, it took the versions from one look
    and the providers from another, so a relabel in between showed the old version beside
    the new labels' provider."""
    from actstore.inventory import describe

    resolve, looked = labelsets.current, []

    def current_then_relabel(*args, **kwargs):
        out = resolve(*args, **kwargs)
        if not looked:
            looked.append(True)
            _relabel(store)
        return out

    monkeypatch.setattr(labelsets, "current", current_then_relabel)
    shown = describe(store)["labels"]["depth"]
    monkeypatch.undo()
    assert looked
    committed = next(rec["depth"] for _, rec in labelsets._commits(store)
                     if rec.get("depth", {}).get("version") == shown["version"])
    assert (shown["provider"], shown["created"]) == (committed["provider"],
                                                     committed["created"])


def test_superseded_version_goes_after_the_grace_period(store, monkeypatch):
    old = label_path(store, "depth")
    _relabel(store)
    assert io.exists(store, io.key(old))               # kept: readers may hold it
    new = label_path(store, "depth")
    monkeypatch.setattr(labelsets, "SUPERSEDED_KEEP_S", 0.0)
    labelsets.collect(store, ["depth"])
    assert not io.exists(store, io.key(old)) and label_path(store, "depth") == new
    records = io.list_dir(store, f"{lay.LABELS}/{lay.COMMITS}")
    assert [c for c in records if c.startswith("c-")] == [labelsets.current(store)["depth"]
                                                           ["commit"]]


@pytest.mark.parametrize("next_run", ["label of another target", "probe run"])
def test_superseded_version_goes_with_a_later_run_of_any_target(store, monkeypatch,
                                                                next_run):
    """A target relabelled once is not kept twice for good: after the grace period the
    next label run of any target, or the next probe run, removes the superseded version
    (before: only a later label run of the same target did). A dead writer's version of
    another target stays, for that target's own run to resume."""
    old = label_path(store, "depth")
    _relabel(store)
    dead = lay.label_version_path("depth", commit.new_id("v"))
    commit.release(commit.begin(store, dead))           # a label run of depth, killed
    monkeypatch.setattr(labelsets, "SUPERSEDED_KEEP_S", 0.0)
    if next_run == "probe run":
        _probe(store)
    else:
        write_labels(store, Brightness(), "shade", on_x0=False, progress=False)
    assert not io.exists(store, io.key(old))
    assert io.exists(store, io.key(lay.pending_path(dead)))
    assert label_path(store, "depth") != old


# -- clean-ups racing a writer's commit ---------------------------------------------------

@pytest.mark.parametrize("finish", ["after_writer_read", "during_marker_read"])
def test_probe_cleanup_keeps_a_run_committed_between_its_looks(tmp_path, monkeypatch, finish):
    """The clean-up looks at a run's writer and at its marker; the writer writes its
    marker, drops its mark and ends in between. Before, a run finishing while another
    probe run started was removed (the clean-up read 'no marker', then 'no writer')."""
    uri = str(tmp_path / "s.zarr")
    path = lay.run_path("depth-live")
    token = commit.begin(uri, path)
    io.put_group(uri, f"{path}/trained")
    done = []

    def finish_now() -> None:
        if not done:
            done.append(True)
            io.put_group(uri, path, {lay.RUN_KEY: "depth"})
            commit.end(uri, path)
            commit.release(token)

    def committed(name: str) -> bool:
        seen = lay.RUN_KEY in (io.node_attrs(uri, lay.run_path(name)) or {})
        if finish == "during_marker_read":
            finish_now()
        return seen

    look = commit.writer_of

    def writer_of(*args):
        info = look(*args)
        if finish == "after_writer_read":
            finish_now()
        return info

    monkeypatch.setattr(commit, "writer_of", writer_of)
    assert commit.collect(uri, lay.PROBES, committed) == []
    assert done and io.node_attrs(uri, path) == {lay.RUN_KEY: "depth"}
    assert io.exists(uri, io.key(f"{path}/trained"))


def test_label_cleanup_keeps_a_version_committed_between_its_two_looks(store, monkeypatch):
    """A label run of the same target cleans up while another commits: the version the
    other committed after the clean-up listed the commits must stay (before: removed, so
    the current labels read as fill values)."""
    paths = labelsets.begin(store, ["depth"])
    io.put_group(store, paths["depth"])
    attrs = dict(labelsets.current(store)["depth"])
    attrs = {"depth": {k: v for k, v in attrs.items() if k not in ("path", "commit",
                                                                   "version")}}
    look = commit.writer_of
    done = []

    def writer_of(uri, path):
        if path == paths["depth"] and not done:   # the other run commits right now
            done.append(True)
            labelsets.commit_set(store, paths, attrs)
            labelsets.release(paths)
        return look(uri, path)

    monkeypatch.setattr(commit, "writer_of", writer_of)
    labelsets.collect(store, ["depth"])
    assert done and label_path(store, "depth") == paths["depth"]
    assert io.exists(store, io.key(paths["depth"]))


# -- a live writer taken for dead ---------------------------------------------------------

def test_probe_run_removed_as_stale_under_it_fails_and_stores_nothing(store, monkeypatch):
    """Another command removes the running probe run's prefix (its writer looked stale):
    the run fails in one line instead of marking a run whose weights read as zeros."""
    write_fit = runs._write_fit

    def fit_then_removed(st, run_id, *args):
        write_fit(st, run_id, *args)
        monkeypatch.setattr(commit, "STALE_AFTER_S", -1.0)
        commit.collect(st, lay.PROBES, lambda name: False)   # another probe run's clean-up
        monkeypatch.setattr(commit, "STALE_AFTER_S", 24 * 3600)

    monkeypatch.setattr(runs, "_write_fit", fit_then_removed)
    with pytest.raises(ActstoreError, match=r"probe run depth-\S+ \(probes/depth-\S+\) was "
                       r"removed while being written.*rerun `actstore probe`"):
        _probe(store)
    assert list_runs(store) == {}


def _cleanup_taking_writers_for_gone(uri: str) -> list[str]:
    """Another probe run's clean-up, to which every unmarked run's writer looks stale."""
    stale = commit.STALE_AFTER_S
    commit.STALE_AFTER_S = -1.0
    try:
        return commit.collect(uri, lay.PROBES, lambda name: lay.RUN_KEY in (
            io.node_attrs(uri, lay.run_path(name)) or {}))
    finally:
        commit.STALE_AFTER_S = stale


def test_renewal_racing_a_removal_does_not_let_the_run_commit(store, monkeypatch):
    """The heartbeat finds the run's mark, then the clean-up removes the run, then the
    heartbeat PUTs the mark again. Before, the run then found its mark and committed over
    removed weights (they read as fill values); now it fails in one line, storing nothing."""
    write_fit, put = runs._write_fit, io.put_group
    removed = []

    def put_after_removal(uri, path, attrs=None):
        if path.endswith(lay.PENDING) and not removed:    # the renewal's PUT
            removed.append(_cleanup_taking_writers_for_gone(uri))
        put(uri, path, attrs)

    def fit_then_beat(st, run_id, *args):
        write_fit(st, run_id, *args)
        monkeypatch.setattr(io, "put_group", put_after_removal)
        commit.renew()                                    # the heartbeat, every 3 h
        monkeypatch.setattr(io, "put_group", put)

    monkeypatch.setattr(runs, "_write_fit", fit_then_beat)
    with pytest.raises(ActstoreError, match=r"probe run depth-\S+ \(probes/depth-\S+\) was "
                       r"removed while being written"):
        _probe(store)
    assert list_runs(store) == {}


COMMITTER = """
import sys
from actstore.store import commit, io
from actstore.store import layout as lay
uri, path = sys.argv[1], sys.argv[2]
token = commit.begin(uri, path)
io.put_group(uri, path + "/trained")
print("writing", flush=True)
sys.stdin.readline()                      # told to finish: as a probe run commits
ok = commit.still_mine(uri, path, token)
if ok:
    io.put_group(uri, path, {lay.RUN_KEY: "depth"})
    ok = commit.still_mine(uri, path, token)
if ok:
    commit.end(uri, path)
else:
    io.remove(uri, path)
print("committed" if ok else "lost", flush=True)
"""


def test_run_committing_between_cleanups_look_and_removal_is_kept(store, monkeypatch):
    """A clean-up takes a live writer for gone (another host, silent for a day) and reads
    no marker; the writer checks its mark, writes its marker, checks again and reports
    success; then the clean-up removes. Before, the whole committed run went after its
    command had succeeded; now the clean-up takes the mark first and then sees the marker."""
    path = lay.run_path("depth-20000101T000000000000-late00")
    proc = subprocess.Popen([sys.executable, "-c", COMMITTER, store, path],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "writing"
    remove, said = io.remove, []

    def writer_finishes_first(uri, p):
        if p.startswith(path) and not said:               # the clean-up's first deletion
            said.append(proc.communicate("\n", timeout=60)[0].strip())
        remove(uri, p)

    monkeypatch.setattr(io, "remove", writer_finishes_first)
    removed = _cleanup_taking_writers_for_gone(store)
    assert proc.returncode == 0 and said, said
    if said == ["committed"]:       # the command succeeded: its run is there, whole
        assert removed == [] and path.rsplit("/", 1)[1] in list_runs(store)
        assert io.exists(store, io.key(f"{path}/trained"))
    else:                           # it failed: nothing of it stays
        assert said == ["lost"] and not io.list_dir(store, path)


def test_probe_run_interrupted_after_its_marker_stays_committed(store, monkeypatch):
    """Ctrl-C once the run's marker is written and checked, while it drops its mark: the
    run is committed (a notebook or an intervene may read it already), so it stays whole
    and the next run drops the leftover mark. Before, the failure path removed it."""
    end = commit.end

    def pressed(uri, path):
        if path.startswith(lay.PROBES):
            raise KeyboardInterrupt
        end(uri, path)

    monkeypatch.setattr(commit, "end", pressed)
    with pytest.raises(KeyboardInterrupt):
        _probe(store)
    monkeypatch.setattr(commit, "end", end)
    (first,) = list_runs(store)
    held = _run_arrays(store, first)
    second = _probe(store)                  # its clean-up drops the committed run's mark
    assert set(list_runs(store)) == {first, second}
    assert not list(Path(store, lay.PROBES).rglob(lay.PENDING))
    for name, values in _run_arrays(store, second).items():
        np.testing.assert_array_equal(held[name], values, err_msg=name)


def test_label_run_removed_as_stale_under_it_fails_before_its_commit(store):
    paths = labelsets.begin(store, ["depth"])
    before = labelsets.current(store)
    io.remove(store, paths["depth"])     # another label run's clean-up took it for dead
    with pytest.raises(ActstoreError, match="label run's version .* was removed while being"):
        labelsets.commit_set(store, paths, {"depth": {"kind": "continuous"}})
    labelsets.release(paths)
    assert labelsets.current(store) == before


def test_label_run_interrupted_in_its_cleanup_leaves_its_version_to_the_next_run(store,
                                                                                  monkeypatch):
    """Ctrl-C while a label run cleans up, its versions already marked: the marks are
    released with the command, so the next run in the same process (a notebook) resumes
    the version. Before, they stayed this process's, renewed by its heartbeat for as long
    as it lived, and the next run wrote another version beside the orphan."""
    sweep = io.sweep_partials

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "sweep_partials", pressed)
    with pytest.raises(KeyboardInterrupt):
        write_labels(store, Brightness(), "shade", on_x0=False, progress=False)
    monkeypatch.setattr(io, "sweep_partials", sweep)
    left = [n for n in io.list_dir(store, lay.label_target_path("shade"))
            if n.startswith(labelsets.VERSION_PREFIX)]
    assert len(left) == 1
    path = lay.label_version_path("shade", left[0])
    assert commit.abandoned(commit.writer_of(store, path))
    assert path not in [p for _, p, _ in commit._MARKS.values()]
    write_labels(store, Brightness(), "shade", on_x0=False, progress=False)
    assert labelsets.current(store)["shade"]["version"] == left[0]     # resumed
    assert not list(Path(store, "labels").rglob("_pending"))


@pytest.mark.parametrize("pid", ["this process's", "unused here"])
def test_writer_on_another_machine_with_this_hostname_is_not_taken_for_dead(tmp_path, pid):
    """Machines can share a hostname (cloud images' 'ubuntu', containers started with the
    host's network, which take its name), and a pid there says nothing here. Before, a
    live run there whose pid was unused here, or equal to this process's (two containers'
    first processes), was removed at once by a clean-up here."""
    uri = str(tmp_path / "s.zarr")
    path = lay.run_path("depth-20000101T000000000000-twin00")
    if pid == "unused here":
        done = subprocess.Popen([sys.executable, "-c", "pass"])
        done.wait()
    here = commit.writer_info("ours")
    there = {**here, "token": "theirs", "machine": f"{here.get('machine')}-elsewhere",
             "pid": os.getpid() if pid == "this process's" else done.pid}
    io.put_group(uri, lay.pending_path(path), {lay.WRITER_KEY: there})
    io.put_group(uri, f"{path}/trained")
    assert not commit.abandoned(commit.writer_of(uri, path))
    assert commit.collect(uri, lay.PROBES, lambda name: False) == []
    assert io.exists(uri, io.key(f"{path}/trained"))
    # a writer of this very machine whose process is gone is still cleaned up
    gone = {**here, "token": "theirs", "pid": there["pid"]}
    io.put_group(uri, lay.pending_path(path), {lay.WRITER_KEY: gone})
    assert commit.collect(uri, lay.PROBES, lambda name: False) == [path.rsplit("/", 1)[1]]


def test_writer_of_this_machine_before_its_reboot_is_gone(tmp_path):
    """A machine that rebooted (a crash, a restart) has no process of its last boot: a
    label job killed that way is resumed by its rerun at once, as before marks named their
    machine, not after a day."""
    uri = str(tmp_path / "s.zarr")
    path = lay.label_version_path("depth", commit.new_id("v"))
    here = commit.writer_info("ours")
    machine_id, boot, pidns = here["machine"].split("/", 2)
    before = {**here, "token": "theirs", "job": "job", "machine": f"{machine_id}/"
              f"{boot[::-1]}/{pidns}"}
    io.put_group(uri, lay.pending_path(path), {lay.WRITER_KEY: before})
    assert commit.abandoned(commit.writer_of(uri, path))
    elsewhere = {**before, "machine": f"{machine_id[::-1]}/{boot[::-1]}/{pidns}"}
    assert not commit.abandoned(elsewhere)      # same name, another machine


def test_a_renewed_mark_is_never_stale(tmp_path):
    """A long run on another host renews its mark; before, it was taken for dead once it
    had started more than a day ago, however alive."""
    uri, path = str(tmp_path / "s.zarr"), lay.run_path("depth-long")
    token = commit.begin(uri, path)
    try:
        uri_, path_, info = commit._MARKS[token]
        info["started"] -= 2 * commit.STALE_AFTER_S          # began two days ago
        io.put_group(uri, lay.pending_path(path), {lay.WRITER_KEY: info})
        assert commit.abandoned(commit.writer_of(uri, path))
        commit.renew()                                       # its heartbeat
        assert not commit.abandoned(commit.writer_of(uri, path))
        assert commit.collect(uri, lay.PROBES, lambda name: False) == []
    finally:
        commit.release(token)


# -- notebook readers while probe runs come and go -----------------------------------------

def test_notebook_scores_stay_put_while_another_probe_run_commits(store):
    """Already safe: a committed run is never removed or rewritten, and emergence is
    computed from the latest run when read."""
    first = _probe(store)
    scores = open_scores(store, first)
    held = open_emergence(store)
    expected = open_scores(store, first)["per_image"].values.copy()
    # a run killed earlier (dead writer) and a new one: the new run's clean-up removes the
    # dead prefix only
    dead = lay.run_path("depth-20000101T000000000000-dead00")
    io.put_group(store, lay.pending_path(dead), {lay.WRITER_KEY: {"host": "x", "started": 0}})
    second = _probe(store)
    assert not io.exists(store, io.key(lay.pending_path(dead)))
    np.testing.assert_array_equal(scores["per_image"].values, expected)
    assert set(list_runs(store)) == {first, second}
    np.testing.assert_array_equal(held["score"].values, open_emergence(store)["score"].values)


# -- label --overwrite while an experiment runs --------------------------------------------

class InvertedPixels(PixelLabels):
    name, spec = "inverted", "inverted-test"

    def __call__(self, images):
        out = super().__call__(images)
        return {**out, "salient": 1 - out["salient"]}


def _experiment(uri: str, model, monkeypatch=None, between_blocks=None) -> dict:
    import actstore.intervene.run as iv

    if between_blocks is not None:
        real, calls = iv._run_block, []

        def block(*args):
            calls.append(1)
            if len(calls) == 2:
                between_blocks()
            return real(*args)

        monkeypatch.setattr(iv, "_run_block", block)
    settings = IS(method="projection", layers=IV_LAYERS, steps=IV_STEPS, n_targets=2,
                  strengths=(1.0,), provider=PixelLabels())
    return run_interventions(uri, _salient_run(uri), settings, model=model, progress=False)


def _salient_run(uri: str) -> str:
    return next(r for r, a in list_runs(uri).items() if a["target"] == "salient")


def test_relabel_between_experiment_blocks_does_not_mix_versions(ivstore, tiny_model,
                                                                  tmp_path, monkeypatch):
    """Every block uses the labels the experiment resolved (before: blocks after the
    relabel made their targets from the new labels, one experiment from two versions)."""
    alone, mixed = str(tmp_path / "alone.zarr"), str(tmp_path / "mixed.zarr")
    shutil.copytree(ivstore["uri"], alone)
    shutil.copytree(ivstore["uri"], mixed)
    ref = _experiment(alone, tiny_model)
    got = _experiment(mixed, tiny_model, monkeypatch, lambda: write_labels(
        mixed, InvertedPixels(), "salient", on_x0=False, overwrite=True, progress=False))
    assert got["complete"] and got["experiment_id"] == ref["experiment_id"]
    a, b = (open_intervention(u, ref["experiment_id"]) for u in (alone, mixed))
    for name in ("target", "original_label", "score_pre", "score_post"):
        np.testing.assert_array_equal(b[name].values, a[name].values, err_msg=name)


def test_relabel_removing_version_under_experiment_fails_in_one_line(ivstore, tiny_model,
                                                                     tmp_path, monkeypatch):
    uri = str(tmp_path / "s.zarr")
    shutil.copytree(ivstore["uri"], uri)
    monkeypatch.setattr(labelsets, "SUPERSEDED_KEEP_S", 0.0)
    with pytest.raises(ActstoreError, match=r"labels 'salient' were replaced .* rerun "
                       r"`actstore intervene`"):
        _experiment(uri, tiny_model, monkeypatch, lambda: write_labels(
            uri, InvertedPixels(), "salient", on_x0=False, overwrite=True, progress=False))
    assert list_interventions(uri) == {}


def test_relabel_between_sweep_cells_records_no_sweep(ivstore, tiny_model, tmp_path,
                                                      monkeypatch):
    """Each cell is an experiment of its own (each pins its labels): a relabel between
    cells would make the sweep compare cells of two label versions. It fails in one line
    and records no sweep; before, the sweep was recorded. The next cell's plan finds the
    probe run fitted on the version replaced (before, the sweep's own check at its end)."""
    import actstore.intervene.sweep as sw

    uri = str(tmp_path / "s.zarr")
    shutil.copytree(ivstore["uri"], uri)
    real, calls = sw.run_interventions, []

    def cell(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            write_labels(uri, InvertedPixels(), "salient", on_x0=False, overwrite=True,
                         progress=False)
        return real(*args, **kwargs)

    monkeypatch.setattr(sw, "run_interventions", cell)
    settings = SweepSettings(kinds=("attn1",), step_counts=(1, 2), strengths=(1.0,),
                             validation=2, evaluation=2,
                             base=IS(n_targets=2, provider=PixelLabels(), batch_size=8))
    with pytest.raises(ActstoreError, match=r"was fitted on labels 'salient' version v-\S+, "
                       r"relabelled since \(now version v-\S+\); run `actstore probe"):
        sw.run_sweep(uri, [_salient_run(uri)], settings, model=tiny_model, progress=False)
    assert calls and sw.list_sweeps(uri) == {}


ADOPTER = """
import sys
from actstore.store import commit, io, labelsets
from actstore.store import layout as lay
uri, path = sys.argv[1], sys.argv[2]
labelsets._TOKENS[path] = commit.begin(uri, path, "job")   # resumes the version
io.put_group(uri, path + "/full")
labelsets.commit_set(uri, {"shade": path}, {"shade": {"kind": "continuous"}})
labelsets.release({"shade": path})
"""


def test_label_run_whose_version_another_run_took_over_leaves_it_whole(store):
    """Two reruns of one killed label job both resume its version; the later mark wins,
    and that run commits. The other then fails its check, and its failure path removed
    the version: the current labels of the run that succeeded, which then read as missing.
    A failed run now removes only versions it still holds, and says it was taken over."""
    paths = labelsets.begin(store, ["shade"], "job")
    subprocess.run([sys.executable, "-c", ADOPTER, store, paths["shade"]], cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, timeout=120)
    assert labelsets.current(store)["shade"]["path"] == paths["shade"]
    try:
        with pytest.raises(Displaced, match="was taken over and committed by another "
                           "writer, which took this run for gone"):
            labelsets.commit_set(store, paths, {"shade": {"kind": "continuous"}})
        labelsets.abort(store, paths)           # as write_labels does on an ActstoreError
    finally:
        labelsets.release(paths)
    assert labelsets.current(store)["shade"]["path"] == paths["shade"]
    assert io.exists(store, io.key(paths["shade"])) and \
        io.exists(store, io.key(f"{paths['shade']}/full"))


def test_label_run_removed_as_stale_during_its_commit_takes_the_commit_back(store,
                                                                           monkeypatch):
    """The clean-up's removal lands while the commit record is being written: the record
    is taken back, so the current labels are never a version without arrays."""
    paths = labelsets.begin(store, ["depth"])
    before = labelsets.current(store)
    put = io.put_group

    def record_then_removed(uri, path, attrs=None):
        put(uri, path, attrs)
        if path.startswith(f"{lay.LABELS}/{lay.COMMITS}/c-"):
            io.remove(store, paths["depth"])

    monkeypatch.setattr(io, "put_group", record_then_removed)
    with pytest.raises(ActstoreError, match="label run's version .* was removed while being"):
        labelsets.commit_set(store, paths, {"depth": {"kind": "continuous"}})
    labelsets.release(paths)
    assert labelsets.current(store) == before


# -- two probe runs of one target, the other one in its own process ------------------------

WRITER = """
import sys
from actstore.store import commit, io
from actstore.store import layout as lay
uri, path = sys.argv[1], sys.argv[2]
commit.begin(uri, path)
io.put_group(uri, path + "/trained")
print("writing", flush=True)
sys.stdin.readline()                      # told to finish
io.put_group(uri, path, {lay.RUN_KEY: "depth"})
commit.end(uri, path)
"""


def _writer(uri: str, path: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, uri, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _cleanup_of_another_probe_run(uri: str) -> None:
    commit.collect(uri, lay.PROBES, lambda name: lay.RUN_KEY in (
        io.node_attrs(uri, lay.run_path(name)) or {}))
    labelsets.collect(uri, [])


@pytest.mark.parametrize("writer", ["probe run", "label run"])
def test_cleanup_right_after_a_live_writers_marker_leaves_its_mark(store, monkeypatch,
                                                                   writer):
    """Another probe run starts just as a run writes its marker (or a label run its commit
    record): its clean-up saw the marker and dropped the leftover mark, though the writer
    was alive and about to check it. Before, the writer then took itself for removed: it
    failed ('was removed while being written') and took its committed work back."""
    put, cleaned = io.put_group, []

    def marker_then_cleanup(uri, path, attrs=None):
        put(uri, path, attrs)
        marker = path.startswith(lay.PROBES) and lay.RUN_KEY in (attrs or {})
        record = path.startswith(f"{lay.LABELS}/{lay.COMMITS}/c-")
        if not cleaned and (marker or record):
            cleaned.append(path)
            _cleanup_of_another_probe_run(uri)

    monkeypatch.setattr(io, "put_group", marker_then_cleanup)
    if writer == "probe run":
        run_id = _probe(store)
        assert cleaned and set(list_runs(store)) == {run_id}
    else:
        old = label_path(store, "depth")
        _relabel(store)
        assert cleaned and label_path(store, "depth") != old
    monkeypatch.undo()
    assert not list(Path(store).rglob(lay.PENDING))


def test_probe_run_keeps_another_process_live_run(store):
    """A probe run of the same target started while another process writes one: the
    clean-up leaves the live run (its pid exists), which then commits whole."""
    path = lay.run_path("depth-20000101T000000000000-live00")
    proc = _writer(store, path)
    try:
        mine = _probe(store)
        assert io.exists(store, io.key(f"{path}/trained"))
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    assert set(list_runs(store)) == {mine, path.rsplit("/", 1)[1]}


def test_probe_cleanup_keeps_a_run_whose_process_committed_and_exited_between_looks(
        store, monkeypatch):
    """The other process commits and exits right after the clean-up read its mark: its pid
    is gone, its marker is there. Before, the clean-up read the marker first and removed
    the run."""
    path = lay.run_path("depth-20000101T000000000000-exit00")
    proc = _writer(store, path)
    look = commit.writer_of

    def writer_of(uri, p):
        info = look(uri, p)
        if p == path and proc.returncode is None:
            proc.communicate("\n", timeout=60)     # commits, drops its mark, exits
        return info

    monkeypatch.setattr(commit, "writer_of", writer_of)
    committed = (lambda name: lay.RUN_KEY in (io.node_attrs(store, lay.run_path(name))
                                              or {}))
    assert commit.collect(store, lay.PROBES, committed) == []
    assert proc.returncode == 0 and path.rsplit("/", 1)[1] in list_runs(store)


# -- materialize adding a capture kind while probe and a notebook read ---------------------

def test_capture_kind_added_during_probe_run_and_open_store(store, tmp_path, monkeypatch,
                                                            tiny_model):
    """Already safe: adding a kind writes new arrays and records only, so a probe run that
    resolved its inputs before equals one made without the addition, and a view opened
    before reads the same activations."""
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.sampling import GenerationConfig
    from actstore.store.view import open_store
    from conftest import DEMO, TINY

    alone = tmp_path / "alone.zarr"
    shutil.copytree(store, alone)
    expected = _run_arrays(str(alone), _probe(str(alone)))
    view = open_store(store)
    held = view[LAYER].isel(step=0, image=slice(0, 4)).values.copy()
    original = runs.load_targets

    def resolve_then_add(*args, **kwargs):
        out = original(*args, **kwargs)
        materialize(tiny_model, DEMO, store, MaterializeSettings(
            gen=GenerationConfig(steps=TINY["steps"]), batch_size=TINY["batch_size"],
            block_size=TINY["block_size"]).with_options(kinds=("attn1", "resnet")),
            progress=False)
        return out

    monkeypatch.setattr(runs, "load_targets", resolve_then_add)
    got = _run_arrays(store, _probe(store))
    assert "resnet" in open_store(store).kinds          # the kind was added meanwhile
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    np.testing.assert_array_equal(view[LAYER].isel(step=0, image=slice(0, 4)).values, held)
