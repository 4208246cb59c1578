"""Creation claims: two creators with different settings never mix one new node.

Deterministic creation lets any number of writers with the *same* settings create a node
(they write the same bytes). Writers with *different* settings (another prompt table,
another model config) would interleave their metadata under one marker, so before writing
anything creators take turns, using only what every object store offers (PUT, LIST,
DELETE, with read-after-write and list-after-write consistency). The turns are Lamport's
bakery: a claim object per creator is its register.

1. PUT the claim's birth record ``<node>/_claims/<id>/born`` (written once), then a claim
   ``<node>/_claims/<id>`` marked *choosing*, holding its settings' hash, the settings and
   its writer (host, pid, start);
2. LIST the claims (removing those whose writer is gone) and PUT ours again with a ticket
   one above the highest ticket seen;
3. repeatedly: read the node's marker — if it exists, drop the claim and let the caller
   compare; wait while any other claim is still choosing; the claims with a lower
   (ticket, id) are ahead: none → our turn, create and write the marker, then drop the
   claim; the first ahead has other settings → it creates before us, so drop ours and fail
   with the difference; the first ahead has our settings → wait for its marker.

A creator another one took for gone (its claim removed: :func:`_held`) stops at its next
write, whatever it creates, through :func:`actstore.store.io.guarded`. Claims have no
heartbeat: a creation is metadata and the image table (seconds; minutes on a slow object
store), and the longest wait in line :data:`WAIT_S`, far below the staleness window, and a
claim on this host is judged by its pid, not its age; a creator frozen or cut off longer
than the window would miss its beats anyway, and a beat racing the removal would put the
claim back (hence the birth record).

Why tickets and not the ids' time order: an id is drawn before its PUT lands, so a creator
that listed before a slower rival's claim appeared may create while that rival's id is
older; a third creator ranking by ids would then give way to the wrong one. A ticket is
drawn after seeing every claim already written, so a creator that is ahead of another was
seen by it, or was still choosing when it looked (then both wait until the choice is made,
and the ids break equal tickets the same way for everyone). Conditional PUT
(``If-None-Match``) would do the same in one request, but the S3 filesystem this store goes
through does not expose it, and a local disk has no such write: this needs only plain PUTs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

from actstore.errors import ActstoreError, Displaced
from actstore.store import commit, io

CLAIMS = "_claims"
CLAIM_KEY = "claim"
BORN = "born"       # <claim>/born: the claim's birth record, written once (see _held)
WAIT_S = 120.0      # how long an older creator waits for a newer rival to give way
POLL_S = 0.2


def claims_path(path: str) -> str:
    return f"{path.strip('/')}/{CLAIMS}" if path.strip("/") else CLAIMS


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@contextmanager
def creating(uri: str, path: str, identity: dict, marked: Callable[[], dict | None], *,
             what: str, fix: str, wait_s: float = WAIT_S) -> Iterator[dict | None]:
    """Hold a claim on creating ``path`` with ``identity`` for the ``with`` body.

    Yields None when this writer must create the node (writing the marker last, inside
    the body), or the marker's identity when the node exists already (create nothing;
    the caller compares). When another live creator with different settings is ahead,
    fails before anything but the claim is written, with one line naming ``what``, the
    differences and ``fix``. Every write and removal of the body first checks that the
    claim is still held (:func:`_held`), so a creator taken for gone while it lived stops
    there (:class:`Displaced`) instead of writing into what a rerun created. The claim is
    dropped on leaving, whatever happens."""
    cid = commit.new_id("claim")
    token = commit.begin_token()
    mine = f"{claims_path(path)}/{cid}"
    ours = identity_hash(identity)
    claim = {"sha256": ours, "identity": identity, **commit.writer_info(token)}
    held = partial(_held, uri, mine, what)
    try:
        # the birth record before the claim: a claim PUT that lands after a rerun removed
        # this claim (its creator frozen in between) brings the claim back, never this
        io.put_group(uri, f"{mine}/{BORN}", {CLAIM_KEY: claim})
        io.put_group(uri, mine, {CLAIM_KEY: {**claim, "choosing": True}})
        tickets = [_ticket(c) for _, c in _live_claims(uri, path, cid)]
        ticket = 1 + max(tickets, default=0)
        io.put_group(uri, mine, {CLAIM_KEY: {**claim, "ticket": ticket}})
        deadline = time.monotonic() + wait_s
        while True:
            others = _live_claims(uri, path, cid)
            existing = marked()
            if existing is not None:
                break
            held()
            # A claim still choosing may yet take a place ahead of ours: wait for it.
            waiting = [c for _, c in others if c.get("choosing")]
            if not waiting:
                ahead = sorted((_ticket(c), name, c) for name, c in others
                               if (_ticket(c), name) < (ticket, cid))
                if not ahead:
                    break
                waiting = [ahead[0][2]]
                if waiting[0].get("sha256") != ours:
                    raise _refusal(uri, path, waiting[0], identity, what, fix, waited=None)
            if time.monotonic() > deadline:
                raise _refusal(uri, path, waiting[0], identity, what, fix, waited=wait_s)
            time.sleep(POLL_S)
        with io.guarded(held):
            yield existing
    finally:
        commit.release(token)
        io.remove(uri, mine)


def _held(uri: str, mine: str, what: str) -> None:
    """Fail with one line (:class:`Displaced`) unless this creator's claim ``mine`` is still
    there. A rerun removes the claim of a creator it takes for gone (on another host: not
    seen for :data:`~actstore.store.commit.STALE_AFTER_S`) and creates the node itself; the
    creator, only frozen or cut off, must then write nothing more into it: the rerun's
    metadata may be another config's, and its blocks are already being written. Asked of
    the birth record, which nothing but this creator's first PUT writes.

    Checked, not enforced: a creator frozen between this look and the write it guards
    still lands that one write (as :func:`~actstore.store.commit.ensure_mine`)."""
    if not io.exists(uri, io.key(f"{mine}/{BORN}")):
        raise Displaced(
            f"store {uri}: this run was taken for gone while creating {what} (its claim "
            f"{mine} was removed by another writer, which found it not seen for "
            f"{commit.STALE_AFTER_S / 3600:g} h: stopped, or its host cut off from the "
            "store) and that writer creates it instead; this run stopped and wrote nothing "
            "more: rerun it to go on with what that writer made (other settings are then "
            "refused, naming the differences)")


def _ticket(claim: dict) -> int:
    """A claim's place in line; claims written without one (older writers) go first."""
    return int(claim.get("ticket") or 0)


def sweep(uri: str, path: str) -> None:
    """Remove claims left on a finished node by creators that died after its marker."""
    if io.list_dir(uri, claims_path(path)):
        _live_claims(uri, path, "")


def _live_claims(uri: str, path: str, cid: str) -> list[tuple[str, dict]]:
    """Other claims whose writer lives; dead writers' claims are removed on the way."""
    out = []
    for name in io.list_dir(uri, claims_path(path)):
        if name == cid or name == io.META:
            continue
        attrs = io.node_attrs(uri, f"{claims_path(path)}/{name}")
        claim = (attrs or {}).get(CLAIM_KEY)
        if claim is None:      # not yet whole, just removed, or its creator died between
            born = (io.node_attrs(uri, f"{claims_path(path)}/{name}/{BORN}") or {}).get(
                CLAIM_KEY)
            if born is not None and commit.abandoned(born):   # ... its first two PUTs
                io.remove(uri, f"{claims_path(path)}/{name}")
            continue
        if commit.abandoned(claim):
            io.remove(uri, f"{claims_path(path)}/{name}")
        else:
            out.append((name, claim))
    return out


def _refusal(uri: str, path: str, claim: dict, identity: dict, what: str, fix: str, *,
             waited: float | None) -> ActstoreError:
    """The one-line refusal: a rival ahead (``waited`` None), or the wait of ``waited`` s
    for the creator ahead ran out."""
    since = time.strftime("%H:%M:%S", time.localtime(float(claim.get("started") or 0)))
    who = f"another writer (host {claim.get('host')}, pid {claim.get('pid')}, since {since})"
    if waited is not None:
        gone = f"if that writer is gone, remove {claims_path(path)}/ and rerun"
        differences = diff(claim.get("identity") or {}, identity, theirs="it")[:3]
        settings = (f"with other settings ({'; '.join(differences)})" if differences
                    else "with the same settings")
        return ActstoreError(f"store {uri}: {who} is still creating {what} {settings} after "
                             f"{waited:.0f} s; {gone}")
    return ActstoreError(
        f"store {uri}: {who} is creating {what} with other settings "
        f"({'; '.join(diff(claim['identity'], identity, theirs='it')[:3])}) and started "
        f"first; use {fix}")


def diff(stored: dict, wanted: dict, prefix: str = "", *, theirs: str = "store") -> list[str]:
    """Readable differences of two nested settings dicts ("key: store has A, this run has B"),
    in the dicts' own order: a fingerprint puts the weights first, and a line quoting the
    first few must not leave them out for settings that sort before them."""
    out = []
    for key in dict.fromkeys([*stored, *wanted]):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, f"{prefix}{key}.", theirs=theirs)
        elif a != b:
            out.append(f"{prefix}{key}: {theirs} has {_short(a)}, this run has {_short(b)}")
    return out


def _short(value) -> str:
    """A value as JSON, cut to about 24 characters; a cut string keeps its closing quote
    (``"94feb32c694f528b93d1…"``: the cut lost it, and the line read unbalanced)."""
    text = json.dumps(value)
    if len(text) <= 24:
        return text
    if isinstance(value, str):
        return json.dumps(value[:20])[:-1] + '…"'
    return text[:22] + "…"
