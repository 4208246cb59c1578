"""Resumability and concurrency, through the real CLI in real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from actstore.store.view import open_store
from actstore.store.core import completed_blocks
from conftest import REPO, TINY, cli, store_arrays

ARGS = ["--model", "tiny-random", "--prompts", "demo", "--steps", str(TINY["steps"]),
        "--batch-size", str(TINY["batch_size"]), "--block-size", str(TINY["block_size"])]


def _popen(store: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "--no-prefect", "--quiet", "materialize",
           "--store", store, *ARGS, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _assert_same(uri: str, ref: str) -> None:
    got, want = store_arrays(uri), store_arrays(ref)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_kill_minus_9_then_resume_is_identical(tmp_path, tiny_store):
    uri = str(tmp_path / "killed.zarr")
    # Kill at several moments: just after a block is recorded (next block mid-generation
    # or mid-write), and again later, then let a final run finish.
    for delay in (0.0, 0.7):
        proc = _popen(uri)
        deadline = time.time() + 300
        start = len(completed_blocks(uri, "trained")) if Path(uri).exists() else 0
        while time.time() < deadline and proc.poll() is None:
            if Path(uri).exists() and len(completed_blocks(uri, "trained")) > start:
                break
            time.sleep(0.05)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        view = open_store(uri)  # readers see whole blocks only, identical to the reference
        n = len(view.image_index)
        assert n % TINY["block_size"] == 0
        if n:
            ref = open_store(tiny_store)["up_blocks.3.attentions.2"].isel(image=view.image_index)
            np.testing.assert_array_equal(view["up_blocks.3.attentions.2"].values, ref.values)
    done = cli("materialize", "--store", uri, *ARGS)
    assert done.returncode == 0, done.stderr
    _assert_same(uri, tiny_store)
    again = cli("materialize", "--store", uri, *ARGS)  # idempotent: nothing left to do
    assert again.returncode == 0 and '"blocks_written": 0' in again.stdout


def test_two_workers_fill_disjoint_regions_concurrently(tmp_path, tiny_store):
    uri = str(tmp_path / "shared.zarr")
    workers = [_popen(uri, "--images", "0:8"), _popen(uri, "--images", "8:16")]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err.decode()[-2000:]
    assert completed_blocks(uri, "trained") == {(0, 4), (4, 8), (8, 12), (12, 16)}
    _assert_same(uri, tiny_store)
