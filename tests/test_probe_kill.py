"""A probe run whose writer is killed (SIGKILL, in its own process, through the command
line) in mid-write is invisible to readers, and the next probe run, from another process,
removes everything it left; the runs that were there stay as they were."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import faults
from actstore.probe.runs import list_runs, run_probes
from conftest import IV_LAYERS, IV_STEPS, REPO, tree_digest


@pytest.mark.parametrize("where", ["/weights/c", "/scores/metric/"])
def test_killed_probe_run_is_invisible_then_collected(tmp_path, ivstore, where):
    path = tmp_path / "s.zarr"
    shutil.copytree(ivstore["uri"], path)
    before = set(list_runs(str(path)))
    kept = tree_digest(path)
    cmd = [sys.executable, "-m", "faults", "--no-prefect", "--quiet", "probe", "--store",
           faults.url(path), "--target", "depth", "--layers", *IV_LAYERS, "--steps",
           *map(str, IV_STEPS), "--scheduler", "sync"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
           "ACTSTORE_FAULT": f"kill:1:{where}"}
    killed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = {p.name for p in Path(path, "probes").iterdir() if p.is_dir()} - before
    assert len(left) == 1, left                         # the killed run's prefix ...
    (dead,) = left
    assert (path / "probes" / dead / "_pending").is_dir()   # ... marked with its writer
    assert set(list_runs(str(path))) == before          # and invisible to readers
    new = run_probes(str(path), "salient", layers=IV_LAYERS, steps=IV_STEPS,
                     scheduler="threads", progress=False)
    assert not (path / "probes" / dead).exists()        # collected by the next run
    assert set(list_runs(str(path))) == before | {new}
    assert not list(Path(path, "probes").rglob("_pending"))
    now = tree_digest(path)
    assert {k: now.get(k) for k in kept if k.startswith("probes/")} == \
        {k: v for k, v in kept.items() if k.startswith("probes/")}
