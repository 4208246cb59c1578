"""Label targets as immutable versions made visible by one commit record per label run.

A label run writes each target into a fresh version ``labels/<target>/<version>/`` and
then commits the whole set with one PUT of ``labels/_commits/<id>/zarr.json``, whose
attributes name every target of the set with its attributes and version. A target's
current labels are those of the newest commit naming it, so a multi-target run becomes
visible all at once or not at all, an overwrite replaces the old labels in one step
(readers never see a half-written target), and no rename is needed anywhere.

Stores written before commit records (schema 1) hold a target's arrays and attributes
directly in ``labels/<target>/``; those are read as they are until overwritten.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

from actstore.errors import ActstoreError
from actstore.store import claims, commit, io
from actstore.store import layout as lay

VERSION_PREFIX = "v-"
# A superseded version stays this long after the commit that replaced it: a command that
# resolved it before (a probe run, an experiment, a notebook) reads it whole until then.
SUPERSEDED_KEEP_S = 24 * 3600


def current(store: str) -> dict[str, dict]:
    """Every visible target → its attributes, with ``path``: the group holding its arrays."""
    out: dict[str, dict] = {}
    names = [n for n in io.list_dir(store, lay.LABELS)
             if not n.startswith(("_", ".")) and n != io.META]
    for name, attrs in zip(names, io.nodes_attrs(
            store, [lay.label_target_path(n) for n in names])):
        if attrs and lay.LABEL_TARGET_KEY in attrs:   # schema 1
            out[name] = {**attrs, "path": lay.label_target_path(name)}
    for cid, record in _commits(store):
        for target, attrs in record.items():
            out[target] = {**attrs, "commit": cid,
                           "path": lay.label_version_path(target, attrs["version"])}
    return out


def _commits(store: str) -> list[tuple[str, dict]]:
    """(commit id, {target: attrs}) oldest first (ids sort by time)."""
    commits = io.marked_children(store, f"{lay.LABELS}/{lay.COMMITS}", lay.label_commit_path,
                                 lay.LABELS_COMMIT_KEY)
    return sorted((cid, attrs[lay.LABELS_COMMIT_KEY]) for cid, attrs in commits.items())


def begin(store: str, targets: list[str], job: str | None = None,
          fresh: Callable[[], object] | None = None) -> dict[str, str]:
    """A version path per target, each marked as being written by this process: the
    versions a dead run of the same ``job`` left (to resume), else fresh ones.

    Resuming is exclusive: reruns of one killed job that overlap take turns through a
    bakery claim on the version (:mod:`actstore.store.claims`), and each looks again in its
    turn, so one marks it and every other fails in one line before writing anything there
    (before, both resumed it, and the one marking last rewrote the version the other had
    committed). ``fresh`` is called (to fail) before a fresh version is marked, after the
    look for one to resume. Other versions of these targets left by dead writers are
    removed."""
    resumed = _adoptable(store, targets, job) if job else None
    if not resumed and fresh is not None:
        fresh()
    version = resumed or commit.new_id("v")
    paths = {t: lay.label_version_path(t, version) for t in targets}
    marked: dict[str, str] = {}
    try:
        if resumed:
            _resume(store, paths, job, marked)
        else:
            _mark(store, paths, job, marked)
        check_owned(store, tokens(paths))   # taken over already: the clean-up is not ours to do
        collect(store, targets)
        io.sweep_partials(store, lay.LABELS)
    except BaseException:   # the marks this call made are this failed run's, for the next
        release(marked)     # run to resume or remove (held, the heartbeat renewed them)
        raise
    return paths


def _mark(store: str, paths: dict[str, str], job: str | None, marked: dict) -> None:
    for t, path in paths.items():
        _TOKENS[path] = commit.begin(store, path, job)
        marked[t] = path


def _resume(store: str, paths: dict[str, str], job: str, marked: dict) -> None:
    """Mark the versions a dead run of ``job`` left, in this run's turn among the reruns
    that chose them too, unless one took them before (its mark lives, or it committed)."""
    first = next(iter(paths.values()))
    version = first.rsplit("/", 1)[-1]
    with claims.creating(store, first, {"resume": version, "job": job},
                         lambda: _taken(store, paths, job), what=f"label version {version}",
                         fix="one `actstore label` run per job") as taken:
        if taken is not None:
            raise ActstoreError(_taken_message(store, first, taken))
        _mark(store, paths, job, marked)
        for path in paths.values():
            commit.take_over(store, path, _TOKENS[path])
        # the writer taken for gone may have been alive and committed since the look above
        # (it checks its mark before its record): then this run writes nothing there
        commits = _commits(store)
        if any(_named(p.rsplit("/", 1)[-1], t, commits) for t, p in paths.items()):
            raise ActstoreError(_taken_message(store, first, {"committed": True}))


def _taken(store: str, paths: dict[str, str], job: str) -> dict | None:
    """None while every version is still a dead ``job`` run's to resume; else what took
    them: a live writer's mark, ``{"committed": True}`` or ``{}`` (removed meanwhile)."""
    commits = _commits(store)
    for t, path in paths.items():
        writer = commit.owner_of(store, path)
        if writer and not commit.abandoned(writer):
            return writer
        if _named(path.rsplit("/", 1)[-1], t, commits):
            return {"committed": True}
        if not writer or writer.get("job") != job:   # its mark goes first on removal
            return {}
    return None


def _taken_message(store: str, path: str, taken: dict) -> str:
    """The one line a rerun fails with when another run of its job resumed first (or the
    version went meanwhile)."""
    head = f"store {store}: "
    if taken.get("committed"):
        return (head + f"another `actstore label` run of the same job resumed and committed "
                f"the version this run was to resume ({path}); its labels are current, "
                "nothing was written")
    if not taken.get("pid"):
        return (head + f"the version this run was to resume ({path}) was removed meanwhile "
                "by another command; nothing was written, rerun `actstore label`")
    return (head + f"another `actstore label` run of the same job (host {taken.get('host')}, "
            f"pid {taken.get('pid')}) is writing the version this run would resume ({path}); "
            "nothing was written: its labels become current when it ends (rerun "
            "`actstore label` if it fails)")


def _adoptable(store: str, targets: list[str], job: str) -> str | None:
    """An uncommitted version of every target whose dead writer ran ``job``; fails in one
    line if a live writer runs ``job`` there now."""
    commits = _commits(store)
    for name in io.list_dir(store, lay.label_target_path(targets[0])):
        if not name.startswith(VERSION_PREFIX) or _named(name, targets[0], commits):
            continue
        paths = {t: lay.label_version_path(t, name) for t in targets}
        writers = [commit.owner_of(store, p) for p in paths.values()]
        if not all(w and w.get("job") == job for w in writers):
            continue
        live = [w for w in writers if not commit.abandoned(w)]
        if live:    # the same job running now: a second version would only repeat it
            raise ActstoreError(_taken_message(store, paths[targets[0]], live[0]))
        return name
    return None


_TOKENS: dict[str, str] = {}


def tokens(paths: dict[str, str]) -> dict[str, str]:
    """Version path → this process's token on it: what any process (a Dask worker doing a
    block) needs to check that the run still owns its versions (:func:`check_owned`)."""
    return {p: _TOKENS[p] for p in paths.values() if p in _TOKENS}


def check_owned(store: str, owned: dict[str, str], mine: str | None = None) -> None:
    """Fail with one line (:class:`~actstore.errors.Displaced`) unless every version of
    ``owned`` (path → token) is still this run's: another command may have taken the run
    for gone and removed its versions, or a rerun of its job taken them over and committed
    them. Called before each block's writes and each control step; ``mine``: this run's
    own commit record, which does not count."""
    for path, token in owned.items():
        target, version = path.split("/")[-2:]
        commit.ensure_mine(store, path, token, "this label run's version", "actstore label",
                           partial(_committed_now, store, target, version, mine))


def release(paths: dict[str, str]) -> None:
    """This process stops writing these versions (committed, removed, or crashed)."""
    for path in paths.values():
        commit.release(_TOKENS.pop(path, ""))


def abort(store: str, paths: dict[str, str]) -> None:
    """Remove uncommitted versions this run still holds (a failed run leaves the store as
    it was). One whose mark another run took over is that run's (two reruns of a killed
    job both resume its version; the later mark wins and may have committed it)."""
    for path in paths.values():
        if path not in _TOKENS or commit.still_mine(store, path, _TOKENS[path]):
            io.remove(store, path)


def commit_set(store: str, paths: dict[str, str], attrs: dict[str, dict]) -> str:
    """Make every target of ``paths`` visible at once: one PUT of the commit record."""
    check_owned(store, tokens(paths))   # a run that took this one over may have committed them
    for t, path in paths.items():
        io.put_group(store, path, attrs[t])     # plain zarr readers see the attrs there too
        if lay.LABEL_TARGET_KEY not in (io.node_attrs(store, lay.label_target_path(t)) or {}):
            io.put_group(store, lay.label_target_path(t))
    io.put_group(store, f"{lay.LABELS}/{lay.COMMITS}")
    io.put_group(store, lay.LABELS)
    check_owned(store, tokens(paths))
    # after every commit seen: the newest commit is current, so one drawn by a clock that
    # runs behind another host's would otherwise never be
    cid = commit.new_id("c", max((c for c, _ in _commits(store)), default=None))
    record = {t: {**attrs[t], "version": path.rsplit("/", 1)[-1]} for t, path in paths.items()}
    io.put_group(store, lay.label_commit_path(cid), {lay.LABELS_COMMIT_KEY: record})
    try:
        check_owned(store, tokens(paths), cid)   # a removal that began before the record landed
    except ActstoreError:
        io.remove(store, lay.label_commit_path(cid))
        raise
    for path in paths.values():
        commit.end(store, path)
    collect(store, list(paths))
    return cid


def collect(store: str, targets: list[str], now: float | None = None) -> None:
    """Remove what no reader can reach any more: versions of ``targets`` from dead
    writers, versions and schema-1 arrays of every target superseded more than
    :data:`SUPERSEDED_KEEP_S` ago, and commit records that name only such versions. A
    reader that resolved a version before a newer commit keeps reading it whole until then
    (:func:`check_readable` tells a reader that took longer).

    Superseded versions go whatever target the calling run is for, so a target relabelled
    once is not kept twice for good; a dead writer's version stays for its own target's
    next run, which may resume it."""
    commits = _commits(store)
    since = _superseded_since(commits)
    now = time.time() if now is None else now
    for t in sorted(set(targets) | set(since)):
        dead_too = t in targets
        named = since.get(t, {})
        for name in io.list_dir(store, lay.label_target_path(t)):
            path = lay.label_version_path(t, name)
            if name.startswith(VERSION_PREFIX):
                if name in named:
                    if named[name] is None:   # current: a leftover mark of a gone writer
                        commit.drop_leftover_mark(store, path, commit.writer_of(store, path))
                    elif now - named[name] >= SUPERSEDED_KEEP_S:
                        io.delete(store, io.key(path))   # first: see check_readable
                        io.remove(store, path)
                # the writer, then the commits afresh: a run commits before it drops its
                # mark, so a version committed since the listing above is seen here
                elif dead_too and commit.abandoned(commit.owner_of(store, path)):
                    committed = partial(_committed_now, store, t, name)
                    if not committed():
                        commit.remove_unmarked(store, path, committed)
            elif name != io.META and named and now - _first_commit(
                    t, commits) >= SUPERSEDED_KEEP_S:   # schema-1 arrays, superseded
                io.remove(store, path)
        if named and lay.LABEL_TARGET_KEY in (
                io.node_attrs(store, lay.label_target_path(t)) or {}):
            io.put_group(store, lay.label_target_path(t))
    for cid, record in commits:
        if all(since[t][a["version"]] is not None and now - since[t][a["version"]]
               >= SUPERSEDED_KEEP_S for t, a in record.items()):
            io.remove(store, lay.label_commit_path(cid))


def _committed_now(store: str, target: str, version: str, but: str | None = None) -> bool:
    """Is ``version`` named by a commit (other than ``but``), read afresh (not from a
    listing made before)?"""
    return _named(version, target, [(c, r) for c, r in _commits(store) if c != but])


def version_of(path: str) -> str | None:
    """The label version a path read (None for labels written before versions)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name if name.startswith(VERSION_PREFIX) else None


def commit_time(cid: str) -> float:
    """When a commit (or version) id was drawn, from the id itself (seconds, UTC)."""
    return commit.id_ns(cid) / 1e9


def _superseded_since(commits: list[tuple[str, dict]]) -> dict[str, dict[str, float | None]]:
    """target → committed version → when a newer commit replaced it (None: current)."""
    out: dict[str, dict[str, float | None]] = {}
    for cid, record in commits:
        for t, attrs in record.items():
            versions = out.setdefault(t, {})
            for v, when in versions.items():
                if when is None:
                    versions[v] = commit_time(cid)
            versions[attrs["version"]] = None
    return out


def _first_commit(target: str, commits: list[tuple[str, dict]]) -> float:
    return min(commit_time(cid) for cid, rec in commits if target in rec)


def check_readable(store: str, target: str, path: str, command: str) -> None:
    """Fail with one line if the label version at ``path`` (resolved when a command
    started) may have been removed while the command read it: a zarr reader gets the fill
    value for a missing chunk, so such reads are indistinguishable from labels. Call after
    the last read and before the result's marker.

    A version's removal deletes its ``zarr.json`` before any array, so finding it after the
    last read proves every read came before the removal, whatever the clocks of the hosts
    that relabelled, removed and read say (a clean-up whose clock runs ahead removes a
    version the reader's clock still counts as kept)."""
    commits = _commits(store)
    version = path.rsplit("/", 1)[-1]
    if version.startswith(VERSION_PREFIX):
        when = _superseded_since(commits).get(target, {}).get(version, 0.0)
        if not io.exists(store, io.key(path)):
            when = 0.0
    else:   # schema-1 arrays, superseded by the target's first commit
        when = _first_commit(target, commits) if any(target in r for _, r in commits) else None
    if when is None or time.time() - when < SUPERSEDED_KEEP_S:
        return
    raise ActstoreError(f"store {store}: labels {target!r} were replaced by a later "
                        f"`actstore label` run and the version this command read ({path}) "
                        f"removed while it ran; nothing was stored, rerun `{command}`")


def _named(version: str, target: str, commits: list[tuple[str, dict]]) -> bool:
    return any(target in rec and rec[target]["version"] == version for _, rec in commits)
