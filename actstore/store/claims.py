"""Creation claims: two creators with different settings never mix one new node.

Deterministic creation lets any number of writers with the *same* settings create a node at
once (they write the same bytes). Writers with *different* settings (another prompt table,
another model config) would interleave their metadata under one marker, so before writing
anything a creator announces itself and looks for rivals, using only what every object
store offers (PUT, LIST, DELETE, with read-after-write and list-after-write consistency):

1. PUT a claim ``<node>/_claims/<id>`` (``id`` sorts by time) holding its settings' hash,
   the settings, and its writer (host, pid, start);
2. LIST the claims; remove those whose writer is gone; ignore those with equal settings;
3. read the node's marker: if it exists now, drop the claim and let the caller compare;
4. no rival left → create, write the marker, then drop the claim; the oldest claim is a
   rival's → drop ours and fail with the difference; the oldest has our settings → wait
   until the rivals' claims are gone (they see that oldest claim and fail, or finish and
   their marker decides), then go to 2.

Two rivals can't both create: the one that listed first missed the other's claim only if
that claim was written after the listing, so the other's listing (later still) shows the
first claim, or, once it is dropped, the first one's marker. Conditional PUT
(``If-None-Match``) would do the same in one request, but the S3 filesystem this store
goes through does not expose it, and a local disk has no such write: this needs nothing
beyond a plain PUT.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from actstore.errors import ActstoreError
from actstore.store import commit, io

CLAIMS = "_claims"
CLAIM_KEY = "claim"
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
    the caller compares). When another live creator with different settings holds the
    node, fails before anything but the claim is written, with one line naming ``what``,
    the differences and ``fix``. The claim is dropped on leaving, whatever happens."""
    cid = commit.new_id("claim")
    token = commit.begin_token()
    mine = f"{claims_path(path)}/{cid}"
    ours = identity_hash(identity)
    try:
        io.put_group(uri, mine, {CLAIM_KEY: {"sha256": ours, "identity": identity,
                                             **commit.writer_info(token)}})
        deadline = time.monotonic() + wait_s
        while True:
            others = _live_claims(uri, path, cid)
            rivals = [c for c in others if c[1].get("sha256") != ours]
            existing = marked()
            if existing is not None or not rivals:
                break
            first = min([*others, (cid, {"sha256": ours})], key=lambda c: c[0])
            lost = first[1]["sha256"] != ours
            if lost or time.monotonic() > deadline:
                raise _refusal(uri, path, (first if lost else rivals[0])[1], identity, what,
                               fix, waited=not lost)
            time.sleep(POLL_S)
        yield existing
    finally:
        commit.release(token)
        io.remove(uri, mine)


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
        if claim is None:      # not yet whole, or just removed
            continue
        if commit.abandoned(claim):
            io.remove(uri, f"{claims_path(path)}/{name}")
        else:
            out.append((name, claim))
    return out


def _refusal(uri: str, path: str, claim: dict, identity: dict, what: str, fix: str, *,
             waited: bool) -> ActstoreError:
    since = time.strftime("%H:%M:%S", time.localtime(float(claim.get("started") or 0)))
    state = (f"is still at it after {WAIT_S:.0f} s (if that writer is gone, remove "
             f"{claims_path(path)}/)") if waited else "started first"
    return ActstoreError(
        f"store {uri}: another writer (host {claim.get('host')}, pid {claim.get('pid')}, "
        f"since {since}) is creating {what} with other settings "
        f"({'; '.join(diff(claim['identity'], identity, theirs='it')[:3])}) and {state}; use {fix}")


def diff(stored: dict, wanted: dict, prefix: str = "", *, theirs: str = "store") -> list[str]:
    """Readable differences of two nested settings dicts ("key: store has A, this run has B")."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, f"{prefix}{key}.", theirs=theirs)
        elif a != b:
            out.append(f"{prefix}{key}: {theirs} has {_short(a)}, this run has {_short(b)}")
    return out


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:21] + "..."
