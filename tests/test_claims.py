"""Rival creators: writers with different settings starting on one new store or model
variant at the same instant (real processes, local disk and S3). Exactly one settings
wins, every other writer fails with one line naming the difference before writing a
block, and the store is exactly what the winner alone would have made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import rivals
from actstore.errors import ActstoreError
from actstore.store import claims, commit, io
from conftest import REPO, tree_digest
from storecheck import snapshot

ROLES = ["a", "b", "a"]   # two with the same settings: they must be able to share


def _solo(tmp_path, role: str, what: str) -> dict:
    uri = str(tmp_path / f"solo-{role}.zarr")
    rivals.create(uri, role, what)
    return snapshot(uri)


def _race(base: str, what: str, rounds: int, tmp_path) -> list[list[dict]]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    t0 = time.time() + 6   # after every process has imported what it needs
    outs = [str(tmp_path / f"out{k}.jsonl") for k in range(len(ROLES))]
    procs = [subprocess.Popen([sys.executable, "-m", "rivals", role, base, str(t0),
                               str(rounds), out, what], cwd=REPO, env=env,
                              stderr=subprocess.PIPE, text=True)
             for role, out in zip(ROLES, outs)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    results = [[json.loads(line) for line in open(out)] for out in outs]
    return [[r[i] for r in results] for i in range(rounds)]


@pytest.mark.parametrize("where,what,rounds", [("local", "model", 3), ("local", "root", 2),
                                                ("s3", "model", 2)])
def test_rival_creators_never_mix(where, what, rounds, tmp_path, request):
    if where == "s3":
        bucket = request.getfixturevalue("bucket")
        base = f"s3://{bucket}/race"
    else:
        base = str(tmp_path / "race")
    solo = {role: _solo(tmp_path, role, what) for role in ("a", "b")}
    # Named by the claim of a rival at work, or by the marker of one that finished first.
    named = ("generation.steps",) if what == "model" else ("prompts_sha256", "prompt table")
    for i, results in enumerate(_race(base, what, rounds, tmp_path)):
        winners = {role for role, r in zip(ROLES, results) if r["ok"]}
        assert len(winners) == 1, (i, results)
        for role, r in zip(ROLES, results):
            if not r["ok"]:
                assert role not in winners, (i, results)   # same settings never lose
                assert "\n" not in r["error"] and any(n in r["error"] for n in named), r
                print(i, r["error"][r["error"].index(": ") + 2:][:60])
        assert snapshot(f"{base}/r{i}.zarr") == solo[winners.pop()], i   # no claim left


def _claim(uri: str, path: str, identity: dict, *, cid: str | None = None,
           turn: dict | None = None, **writer) -> str:
    """Another creator's claim, as its writer leaves it (``turn``: its ticket or choosing)."""
    cid = cid or commit.new_id("claim")
    info = {**commit.writer_info("x"), **writer}
    io.put_group(uri, f"{claims.claims_path(path)}/{cid}",
                 {claims.CLAIM_KEY: {"sha256": claims.identity_hash(identity),
                                     "identity": identity, **info, **(turn or {})}})
    return cid


A, B = {"prompts_sha256": "sha-a"}, {"prompts_sha256": "sha-b"}


def _turns(tmp_path, ahead: list[tuple[dict, dict, str | None]], *,
           finish_after: float = 0.5, wait_s: float = 5.0):
    """Creator ``A`` arrives behind live claims of other hosts (identity, ticket or
    choosing, id); after ``finish_after`` s the first of them writes its marker and drops
    its claim. Returns what ``creating`` yielded, or the error it raised."""
    import threading

    uri, marker = str(tmp_path / "s.zarr"), {}
    names = [_claim(uri, "", who, cid=cid, turn=turn, host="gpu-7", pid=4242)
             for who, turn, cid in ahead]

    def finish():
        marker["identity"] = ahead[0][0]
        io.remove(uri, f"{claims.claims_path('')}/{names[0]}")

    timer = threading.Timer(finish_after, finish)
    timer.start()
    try:
        with claims.creating(uri, "", A, lambda: marker.get("identity"), what="this store",
                             fix="the same settings", wait_s=wait_s) as existing:
            return existing
    except ActstoreError as exc:
        return exc
    finally:
        timer.cancel()


def test_turns_follow_tickets_not_id_times(tmp_path):
    """The race that ranking by ids lost: a rival's id was drawn first, but its claim
    landed after a creator with this one's settings had looked, found nobody and begun
    (so the rival's ticket is the later one). This creator waits for that creator's marker
    and shares it, instead of giving way to the rival's older id."""
    rival_id, sharer_id = commit.new_id("claim"), commit.new_id("claim")
    assert rival_id < sharer_id
    out = _turns(tmp_path, [(A, {"ticket": 1}, sharer_id), (B, {"ticket": 2}, rival_id)])
    assert out == A, out


def test_a_rival_ahead_refuses_at_once_and_a_choosing_one_is_waited_for(tmp_path):
    """The first claim in line is a rival's: refused at once, naming it. A claim still
    choosing its ticket is waited for (it may come first); it never finishing ends in the
    "still creating" refusal, not in creating beside it; a creator with our settings that
    never finishes ends the same way, saying so."""
    out = _turns(tmp_path / "r", [(B, {"ticket": 1}, None), (A, {"ticket": 2}, None)],
                 finish_after=60)
    assert isinstance(out, ActstoreError) and "started first" in str(out), out
    out = _turns(tmp_path / "c", [(B, {"choosing": True}, None)], finish_after=60, wait_s=1)
    msg = str(out)
    assert isinstance(out, ActstoreError) and "is still creating this store with other" in msg
    assert "prompts_sha256: it has \"sha-b\", this run has \"sha-a\"" in msg, msg
    assert "after 1 s; if that writer is gone, remove _claims/" in msg and "\n" not in msg
    out = _turns(tmp_path / "s", [(A, {"ticket": 1}, None)], finish_after=60, wait_s=1)
    assert "is still creating this store with the same settings after 1 s" in str(out), out


def test_a_dead_rivals_claim_does_not_block(tmp_path):
    """A creator killed after its claim (a pid that no longer exists): the next creator
    removes the claim and creates the store as if alone."""
    uri = str(tmp_path / "s.zarr")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _claim(uri, "", {"prompts_sha256": "sha-a dog 0", "block_size": 4}, pid=dead.pid)
    rivals.create(uri, "a", "model")
    assert snapshot(uri) == _solo(tmp_path, "a", "model")


def test_a_live_rival_elsewhere_refuses_in_one_line_and_writes_nothing(tmp_path):
    """A creator on another host claimed the variant first with other settings: this one
    fails at once, naming host and difference, and the store is byte-identical."""
    uri = str(tmp_path / "s.zarr")
    rivals.create(uri, "a", "root")
    _claim(uri, "models/trained", {"generation": {"steps": 5}}, host="gpu-7", pid=4242)
    before = tree_digest(tmp_path / "s.zarr")
    with pytest.raises(ActstoreError) as info:
        rivals.create(uri, "a", "model")
    msg = str(info.value)
    assert "\n" not in msg and "host gpu-7, pid 4242" in msg and "started first" in msg
    assert "generation.steps: it has 5, this run has 2" in msg
    assert tree_digest(tmp_path / "s.zarr") == before


def test_nested_claims_stop_writing_once_the_outer_one_is_lost(tmp_path):
    """A run adding two capture kinds holds a claim on each while it creates them. Taken
    for gone on the first (a rerun removed that claim), it must write nothing more, though
    it still holds the second: before, the inner claim's check replaced the outer's and
    the write landed."""
    from actstore.errors import Displaced

    uri = str(tmp_path / "s.zarr")
    rivals.create(uri, "a", "model")
    first, second = "models/trained/captures/attn2", "models/trained/captures/block"
    with pytest.raises(Displaced, match="taken for gone while creating kind attn2"):
        with claims.creating(uri, first, {"k": 1}, lambda: None, what="kind attn2",
                             fix="-") as one:
            with claims.creating(uri, second, {"k": 2}, lambda: None, what="kind block",
                                 fix="-") as two:
                assert one is None and two is None
                [mine] = [n for n in io.list_dir(uri, claims.claims_path(first))
                          if n != io.META]
                io.remove(uri, f"{claims.claims_path(first)}/{mine}")   # as a rerun does
                io.put_group(uri, second, {"marker": True})
    assert io.node_attrs(uri, second) is None
