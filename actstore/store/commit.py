"""The commit protocol's primitives: completion records, writers in progress, clean-up.

A store never renames anything. What a command makes becomes visible through one object
written after all of its contents (a *marker*): a group's ``zarr.json`` carrying a marker
attribute, or a small record group such as ``_blocks/<a>-<b>``. A reader filters on
markers, so a kill leaves nothing it can see; a rerun either redoes an unmarked creation
(every content write is deterministic and idempotent) or writes under a fresh id.

Contents written under a fresh id (label versions, probe runs) that never got their marker
are garbage once their writer is gone: each such prefix holds a ``_pending`` group naming
its writer (host, pid, start time), and the next writer of the same kind removes those
whose process is dead (same host) or that were not seen for :data:`STALE_AFTER_S` (a live
writer renews its marks every :data:`HEARTBEAT_S`).
"""

from __future__ import annotations

import calendar
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from actstore.errors import Displaced
from actstore.store import io
from actstore.store import layout as lay

STALE_AFTER_S = 24 * 3600   # a writer on another host is presumed dead after a day


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_last_ns = 0


def new_id(prefix: str, after: str | None = None) -> str:
    """``<prefix>-<UTC time to the microsecond>-<random>``: sorts by time (strictly within
    a process, and after the id ``after``: an order other hosts' clocks can't upset),
    unique across concurrent writers."""
    global _last_ns
    ns = _last_ns = max(time.time_ns(), _last_ns + 1000)
    if after:   # not kept for later ids: one host's fast clock must not date them all
        ns = max(ns, id_ns(after) + 1000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 10**9))
    return f"{prefix}-{stamp}{ns // 1000 % 10**6:06d}-{uuid.uuid4().hex[:6]}"


def id_ns(id_: str) -> int:
    """When an id of :func:`new_id` was drawn, from the id itself (ns, UTC)."""
    stamp = id_.split("-")[1]
    return (calendar.timegm(time.strptime(stamp[:15], "%Y%m%dT%H%M%S")) * 10**6
            + int(stamp[15:21])) * 1000


# -- completion records of image blocks -------------------------------------------------

def write_block_record(uri: str, group: str, start: int, stop: int, record: dict) -> None:
    """Record a finished block: one PUT of an empty group's ``zarr.json`` (the record in
    its attributes), written after every shard of the block."""
    io.put_group(uri, lay.block_record_path(group, start, stop), {lay.BLOCK_KEY: record})


def block_record(uri: str, group: str, start: int, stop: int) -> dict:
    """A block's completion record ({} if the block is not recorded)."""
    attrs = io.node_attrs(uri, lay.block_record_path(group, start, stop)) or {}
    return dict(attrs.get(lay.BLOCK_KEY) or {})


def completed_blocks_at(uri: str, group: str) -> set[tuple[int, int]]:
    """The (start, stop) blocks recorded complete under ``<group>/_blocks``; listed fresh.

    A block is recorded when its record's key ``_blocks/<a>-<b>/zarr.json`` exists, so one
    recursive listing of ``_blocks/`` finds them all: on S3 one request per 1000 blocks
    (before, a listing and then a HEAD per block, 160 round trips for a variant of 640
    images, at every open of a view)."""
    done = set()
    for k in io.list_keys(uri, lay.blocks_path(group)):
        name, _, leaf = k.partition("/")
        blk = lay.parse_block_name(name)
        if blk is not None and leaf == io.META:
            done.add(blk)
    return done


# -- writers in progress ----------------------------------------------------------------

# Writes in progress in this process: a pending group of this pid whose token is not here
# was left by a run of this process that failed or crashed, so it is garbage too.
_ACTIVE: set[str] = set()


def _machine() -> str:
    """``<machine id>/<boot id>/<pid namespace>``: where this process's pid means something
    (this boot of this machine, this container's pid namespace). A hostname alone is not
    that: machines share one (cloud images' 'ubuntu'; containers started with the host's
    network take its name). '' where the system tells no boot (not Linux); the machine id
    may be '' (containers often have none)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    try:
        with open("/etc/machine-id") as f:
            machine = f.read().strip()
    except OSError:
        machine = ""
    return f"{machine}/{boot}/{pidns}"


MACHINE = _machine()


def _elsewhere(info: dict) -> bool | None:
    """Is a writer of this hostname on another machine (True), on this machine's earlier
    boot (None: gone), or here (False: its pid says)? Marks of earlier versions name no
    machine and are taken for here."""
    theirs = info.get("machine", MACHINE)
    if theirs == MACHINE:
        return False
    mine, boot = MACHINE.split("/", 2)[:2] if MACHINE else ("", "")
    parts = theirs.split("/", 2)
    if len(parts) == 3 and mine and parts[0] == mine and parts[1] != boot:
        return None   # this machine has rebooted since
    return True


def writer_info(token: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "started": time.time(), **({"machine": MACHINE} if MACHINE else {})}


def begin_token() -> str:
    """A token for a write this process is doing now (until :func:`release`)."""
    token = uuid.uuid4().hex
    _ACTIVE.add(token)
    return token


# A writer renews its marks (``seen``) this often, so a run of any length on another host
# never looks older than STALE_AFTER_S while its process lives.
HEARTBEAT_S = STALE_AFTER_S / 8
_MARKS: dict[str, tuple[str, str, dict]] = {}   # token → (uri, path, writer info)
_MARKS_LOCK = threading.Lock()
_heart: list[threading.Thread] = []


def renew() -> None:
    """PUT this process's marks again with ``seen`` = now. A removal may land between the
    look and the PUT, which then brings the mark back; the writer still finds out before its
    marker (:func:`still_mine` also asks for the birth record, which no renewal writes)."""
    for token in list(_MARKS):
        try:
            if still_mine(*_MARKS[token][:2], token):
                _remark(token)
        except Exception:   # storage away for a moment, or released: the next beat tries
            pass


def _remark(token: str) -> None:
    """PUT this process's mark of ``token`` with ``seen`` = now."""
    with _MARKS_LOCK:
        if token in _MARKS:
            uri, path, info = _MARKS[token]
            io.put_group(uri, lay.pending_path(path),
                         {lay.WRITER_KEY: {**info, "seen": time.time()}})


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        renew()


def begin(uri: str, path: str, job: str | None = None) -> str:
    """Say who writes under ``path`` until its marker exists (for later clean-up), and
    for which ``job`` (a rerun of the same job may resume there once the writer is gone);
    returns the token to :func:`release` when this process stops writing there."""
    token = begin_token()
    info = {**writer_info(token), **({"job": job} if job else {})}
    try:   # the mark first: a clean-up sees a live writer from the first write on
        io.put_group(uri, lay.pending_path(path), {lay.WRITER_KEY: info})
        io.put_group(uri, _birth(path, token), {lay.WRITER_KEY: info})   # see owner_of
    except BaseException:   # a mark half-written by a live token would never be collected
        release(token)
        raise
    with _MARKS_LOCK:
        _MARKS[token] = (uri, path, info)
        if not _heart:
            _heart.append(threading.Thread(target=_beat, name="actstore-marks", daemon=True))
            _heart[0].start()
    return token


def release(token: str) -> None:
    """This process no longer writes under that path (committed, failed or crashed)."""
    _ACTIVE.discard(token)
    with _MARKS_LOCK:
        _MARKS.pop(token, None)


def _birth(path: str, token: str) -> str:
    """Written once by :func:`begin` beside the mark and never again: a renewal racing a
    removal can bring the mark back, not this."""
    return f"{lay.pending_path(path)}/{token}"


def end(uri: str, path: str) -> None:
    with _MARKS_LOCK:   # no renewal may bring the mark back
        for token in [t for t, (u, p, _) in _MARKS.items() if (u, p) == (uri, path)]:
            del _MARKS[token]
        io.remove(uri, lay.pending_path(path))


def abandoned(info: dict | None, now: float | None = None) -> bool:
    """Is the writer that left ``info`` gone? Unknown writers count as gone."""
    if not info:
        return True
    now = time.time() if now is None else now
    if now - float(info.get("seen", info.get("started", 0))) > STALE_AFTER_S:
        return True
    if info.get("host") != socket.gethostname():
        return False
    where = _elsewhere(info)
    if where is None:
        return True
    if where:
        return False   # its pid means nothing here
    if info.get("pid") == os.getpid():
        return info.get("token") not in _ACTIVE
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError):
        return False
    return False


def writer_of(uri: str, path: str) -> dict | None:
    attrs = io.node_attrs(uri, lay.pending_path(path))
    return None if attrs is None else attrs.get(lay.WRITER_KEY)


def owner_of(uri: str, path: str) -> dict | None:
    """The writer whose liveness keeps ``path`` from removal or resumption: its mark's, or,
    where that one looks gone but has no birth record (a writer taken over whose heartbeat
    put its mark back, :func:`take_over`, and which exited since), a live writer whose
    birth record is there (its next check, :func:`ensure_mine`, or renewal puts its
    mark back). Judged by the mark alone, a clean-up removed the version under the live run that took
    it over, and a rerun of its job took that run for gone. A mark between a new writer's
    two PUTs (no birth record yet) is that live writer's: it counts as before."""
    mark = writer_of(uri, path)
    theirs = (mark or {}).get("token")
    if not theirs or not abandoned(mark) or io.exists(uri, io.key(_birth(path, theirs))):
        return mark
    for name in io.list_dir(uri, lay.pending_path(path)):
        born = name != io.META and io.node_attrs(uri, _birth(path, name))
        if born and born.get(lay.WRITER_KEY) and not abandoned(born[lay.WRITER_KEY]):
            return born[lay.WRITER_KEY]
    return mark


def collect(uri: str, parent: str, committed: Callable[[str], bool]) -> list[str]:
    """Remove each ``parent/<name>`` that is not committed and whose writer is gone; drop
    leftover ``_pending`` groups of committed ones whose writer is gone. Returns the names
    removed."""
    removed = []
    for name in io.list_dir(uri, parent):
        if name.startswith(("_", ".")) or name == io.META:
            continue
        path = f"{parent}/{name}"
        # the writer and its liveness first, then the marker: a writer writes its marker
        # before it drops its mark or exits, so one that finished meanwhile is seen done
        writer = writer_of(uri, path)
        if committed(name):
            drop_leftover_mark(uri, path, writer)
        elif abandoned(writer) and remove_unmarked(uri, path, lambda: committed(name)):
            removed.append(name)
    return removed


def drop_leftover_mark(uri: str, path: str, writer: dict | None) -> None:
    """Drop the mark ``writer`` (read before the marker; None: no mark) left on a committed
    prefix, once that writer is gone: a live one checks its mark after its marker and would
    take itself for removed."""
    if writer is not None and abandoned(writer):
        end(uri, path)


def remove_unmarked(uri: str, path: str, committed: Callable[[], bool]) -> bool:
    """Remove an uncommitted prefix whose writer was taken for gone: its mark first, then,
    unless its marker landed meanwhile, the rest. A writer checks its mark after its marker,
    so either it sees the mark gone (and fails, storing nothing) or this sees its marker
    (and keeps the run); before, a writer that looked stale could check, mark and return
    between the clean-up's look at its marker and the removal of its whole run."""
    io.remove(uri, lay.pending_path(path))
    if committed():
        return False
    io.remove(uri, path)
    return True


def still_mine(uri: str, path: str, token: str) -> bool:
    """Is this process's mark on ``path`` still there? Another command removes a prefix
    whose writer it takes for gone (a writer on another host after
    :data:`STALE_AFTER_S`); a writer checks before its marker, so it never makes visible
    a prefix whose contents were removed under it."""
    return _held(uri, path, token) is not None


def _held(uri: str, path: str, token: str) -> bool | None:
    """None: ``path`` is no longer this writer's; True: it is, under its own mark; False:
    it is, under the mark of a writer with no birth record, a displaced writer's put back
    by a heartbeat that read its mark before the take-over (:func:`take_over`), which
    counts for nobody. (Between a rerun's mark and its birth record, two PUTs before it
    writes anything, the writer it takes over from still passes.)"""
    if not io.exists(uri, io.key(_birth(path, token))):
        return None
    theirs = (writer_of(uri, path) or {}).get("token")
    if theirs == token:
        return True
    return False if theirs and not io.exists(uri, io.key(_birth(path, theirs))) else None


def ensure_mine(uri: str, path: str, token: str, what: str, command: str,
                done: Callable[[], bool] | None = None) -> None:
    """Fail with one line (:class:`Displaced`) unless this process's mark on ``path`` is
    still its own: called before each step that writes or removes there. A writer taken for
    gone while it lived (frozen, or its host cut off, longer than :data:`STALE_AFTER_S`) may
    have had its prefix removed, or taken over by a rerun (:func:`take_over`); either way it
    must write nothing more. ``done``: is ``path`` committed (by the one that took over)?

    Checked, not enforced: a writer frozen between this check and the write it guards for
    longer than the staleness window still lands that one write. Closing that needs a
    conditional PUT on the mark's version (S3's ``If-Match``), which neither zarr's chunk
    writes nor s3fs expose, nor a local disk."""
    held = _held(uri, path, token)
    if held is False and token in _MARKS:   # put its mark back now, not at the next beat:
        _remark(token)   # until then a clean-up judges the prefix by the birth records
    if held is not None:
        return
    info = writer_of(uri, path) or {}
    other = info if info.get("token") not in (None, token) else None
    rival = other or any(n not in (token, io.META)     # its mark put back over the rival's
                         for n in io.list_dir(uri, lay.pending_path(path)))
    if not rival and not (done is not None and done()):
        raise Displaced(lost_mark(uri, path, what, command))
    who = f" (host {other.get('host')}, pid {other.get('pid')})" if other else ""
    by, then = ((f"taken over by another writer{who}", f"that writer finishes it (if it "
                 f"fails, rerun `{command}`)") if rival else
                ("taken over and committed by another writer", "that writer's result is "
                 "current"))
    raise Displaced(f"store {uri}: {what} ({path}) was {by}, which took this run for gone "
                    f"(not seen for {STALE_AFTER_S / 3600:g} h: stopped, or its host cut off "
                    f"from the store); this run stopped and wrote nothing more there: {then}")


def take_over(uri: str, path: str, token: str) -> None:
    """Remove the birth records of the writers this one (token ``token``, just marked)
    replaces, taken for gone: one that was only frozen checks its mark before its next
    write (:func:`ensure_mine`), and a heartbeat of its that read its mark before this
    one's landed may still put it back, but never its birth record."""
    for name in io.list_dir(uri, lay.pending_path(path)):
        if name not in (token, io.META):
            io.remove(uri, f"{lay.pending_path(path)}/{name}")


def lost_mark(uri: str, path: str, what: str, command: str) -> str:
    """The one line a writer whose prefix was removed under it fails with."""
    return (f"store {uri}: {what} ({path}) was removed while being written, by another "
            f"command that took its writer for gone (on another host: not seen for "
            f"{STALE_AFTER_S / 3600:g} h); nothing was stored, rerun `{command}`")
