"""Two runs adding one capture kind to an existing store with other settings (the vae kind
with another ``--vae-source``) take turns through a creation claim on the kind, as
creators of a store or a variant do: the one behind stops in one line, exit 2, writing
nothing, and the store is the winner's, array by array and attribute by attribute. Every
run is a real ``actstore materialize`` process; the one frozen or killed mid-add stops
itself right after a chosen write (tests/faults.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import faults
from conftest import REPO
from storecheck import assert_same_store
from test_creation_takeover import _files, _kill
from test_label_takeover import _wait_stopped
from test_resume import ARGS

ENV = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
VAE = "models/trained/layers/vae/"
FIRST_ARRAY = VAE + r"[^/]+/activation/zarr\.json$"      # mid-add: after the claim, no marker
# (vae source, region) of the two rivals: each adds vae on its own half of the images
A, B = ("latent", "0:8"), ("x0", "8:16")


def _cmd(uri: str, who: tuple[str, str], kinds: str) -> list[str]:
    return ["--no-prefect", "--quiet", "materialize", "--store", uri, *ARGS,
            "--capture", kinds, "--vae-source", who[0], "--images", who[1]]


def _start(uri: str, who: tuple[str, str], fault: str | None = None,
           kinds: str = "attn1,vae") -> subprocess.Popen:
    module = ["-m", "faults", *_cmd(faults.url(uri), who, kinds)] if fault else \
        ["-m", "flows.cli", *_cmd(uri, who, kinds)]
    return subprocess.Popen([sys.executable, *module], cwd=REPO, text=True,
                            env={**ENV, **({"ACTSTORE_FAULT": fault} if fault else {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _copy(tiny_store: str, dst: Path) -> str:
    shutil.copytree(tiny_store, dst)
    return str(dst)


@pytest.fixture(scope="module")
def alone(tiny_store, tmp_path_factory) -> dict:
    """Each rival's add, uninterrupted and without the other, on a copy of the store."""
    out = {}
    for who in (A, B):
        uri = _copy(tiny_store, tmp_path_factory.mktemp("alone") / "s.zarr")
        proc = _start(uri, who)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        out[who] = uri
    return out


def _refused(proc: subprocess.Popen | subprocess.CompletedProcess, err: str) -> None:
    """Exit 2, one line naming the kind and the other vae source."""
    err = err.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err[-2000:]
    assert "capture kind 'vae' of model 'trained'" in err and "vae_source" in err, err


@pytest.mark.parametrize("kinds", ["attn1,vae", "attn1,resnet,vae"])
def test_rival_with_other_vae_source_beside_a_frozen_add_stops_writing_nothing(
        kinds, tiny_store, alone, tmp_path):
    """The first run freezes mid-add (its vae arrays' metadata begun, no marker); a second
    run adds vae with another source on other images. Before, it found no marker, added
    the kind with its source and wrote its blocks (exit 0), and the first, woken, wrote
    its marker over the second's: a kind saying 'latent' over blocks decoded from x0.
    A rival also adding resnet, which nobody else adds, creates none of it either."""
    uri = _copy(tiny_store, tmp_path / "s.zarr")
    a = _start(uri, A, f"stop:1:{FIRST_ARRAY}")
    try:
        _wait_stopped(a)
        before = _files(Path(uri))
        b = _start(uri, B, kinds=kinds)
        _, err = b.communicate(timeout=600)
        _refused(b, err)
        assert "is creating capture kind 'vae'" in err and f"pid {a.pid}" in err, err
        assert _files(Path(uri)) == before
        os.kill(a.pid, signal.SIGCONT)
        _, err = a.communicate(timeout=600)
        assert a.returncode == 0, err[-2000:]
    finally:
        _kill(a)
    assert_same_store(uri, alone[A])


def test_rivals_started_together_leave_the_winners_store(tiny_store, alone, tmp_path):
    """Both start at once: one adds the kind, the other stops in one line (refused in
    line behind the winner's claim, or by the winner's marker), and the store equals the
    winner's add alone. Before, both found no marker and both exited 0."""
    uri = _copy(tiny_store, tmp_path / "s.zarr")
    procs = {who: _start(uri, who) for who in (A, B)}
    try:
        errs = {who: p.communicate(timeout=600)[1] for who, p in procs.items()}
    finally:
        for p in procs.values():
            _kill(p)
    winners = [who for who, p in procs.items() if p.returncode == 0]
    assert len(winners) == 1, {who: (p.returncode, errs[who][-500:])
                               for who, p in procs.items()}
    [loser] = [who for who in procs if who != winners[0]]
    _refused(procs[loser], errs[loser])
    assert_same_store(uri, alone[winners[0]])


def test_add_killed_midway_then_a_rerun_with_other_settings_redoes_it(tiny_store, alone,
                                                                       tmp_path):
    """A run killed mid-add leaves its claim and some vae metadata; a rerun with the other
    source removes the dead claim, redoes the add with its own settings and finishes: the
    store equals the rerun's add alone, no claim left."""
    uri = _copy(tiny_store, tmp_path / "s.zarr")
    a = _start(uri, A, f"kill:1:{FIRST_ARRAY}")
    a.communicate(timeout=600)
    assert a.returncode == -signal.SIGKILL
    b = _start(uri, B)
    _, err = b.communicate(timeout=600)
    assert b.returncode == 0, err[-2000:]
    assert_same_store(uri, alone[B])


def test_add_killed_after_its_marker_leaves_no_claim_behind(tiny_store, alone, tmp_path):
    """Killed between the kind's marker and the removal of its claim: the next run (the
    same add) finds the kind made, removes the dead writer's claim and finishes the
    blocks; the store equals the add alone, no claim left."""
    uri = _copy(tiny_store, tmp_path / "s.zarr")
    a = _start(uri, A, r"stop:1:models/trained/captures/vae/zarr\.json$")
    try:
        _wait_stopped(a)
        assert list(Path(uri, "models/trained/captures/vae/_claims").iterdir())
    finally:
        _kill(a)
    rerun = _start(uri, A)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-2000:]
    assert_same_store(uri, alone[A])
