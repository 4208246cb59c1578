"""The probe grid on a user's cluster (``actstore probe --scheduler ADDRESS``) whose only
worker is killed once the grid's first tasks ran and restarted at its address with other
code. The command stores what the tasks return, so they must compute nothing there: one
line naming the worker and what differs, exit 2, no probe run left. Two checks race to
say it: the grid's tasks themselves (handed to the worker as it registers) and the watch
of joining workers, which knows the restarted worker for another process (before
2026-12-06 it knew addresses, so only the tasks could see it); either line will do. A
worker whose actstore predates the check (its grid functions take no ``code``) fails
each task with a TypeError, said as older code, or the watch says its source differs.
Real ``dask scheduler`` / ``dask worker --no-nanny`` subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from actstore.probe.runs import list_runs
from conftest import REPO
from test_cluster_code import changed_actstore, other_numcodecs
from test_cluster_env import _free_port
from test_cluster_workers import (UserCluster, finish, lines_of, user_cluster,  # noqa: F401
                                  wait_until)


def older_grid(tmp_path: Path) -> Path:
    """A copy of actstore whose probe grid's tasks take no ``code``, as before the check."""
    alt = changed_actstore(tmp_path)
    grid = alt / "actstore" / "probe" / "grid.py"
    grid.write_text(grid.read_text().replace("@checks_code\n", ""))
    return alt


def restart_during_probe(tmp_path: Path, cluster: UserCluster, explore_store: str,
                         first_on_path: Path) -> tuple[str, Path, set]:
    """``probe --scheduler`` on a copy of the explore store; its only worker killed once a
    fit task finished and restarted at its address with ``first_on_path`` first on its
    PYTHONPATH. Its one-line error (exit 2, naming the worker), the store, its runs before."""
    from distributed import Client

    store = tmp_path / "s.zarr"
    shutil.copytree(explore_store, store)
    runs = set(list_runs(str(store)))
    listen = ("--listen-address", f"tcp://127.0.0.1:{_free_port()}")
    worker = cluster.worker(*listen)
    cluster.wait_for(1)
    cli = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--no-prefect", "--quiet", "probe", "--store",
         str(store), "--target", "salient", "--scheduler", cluster.address],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "ACTSTORE_WORKER_GRACE": "60"})
    with Client(cluster.address, timeout=30) as client:
        # a fit task's duration is known once one finished (a lambda: sent by value)
        wait_until(lambda: client.run_on_scheduler(lambda dask_scheduler: any(
            "fit_block" in name and prefix.duration_average >= 0
            for name, prefix in dask_scheduler.task_prefixes.items())), cli,
            "a first probe task done")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    cluster.worker(*listen, env={**cluster.env,
                                 "PYTHONPATH": f"{first_on_path}{os.pathsep}{REPO}"})
    out, err, _ = finish(cli, 180)
    lines = lines_of(err)
    assert cli.returncode == 2 and len(lines) == 1, (out[-1000:], err[-3000:])
    assert lines[0].startswith("actstore probe: error: "), lines[0]
    assert f"Dask worker {listen[1]} " in lines[0], lines[0]
    assert "nothing of this run was kept" in lines[0], lines[0]
    return lines[0], store, runs


def no_run_left(store: Path, runs: set) -> None:
    assert set(list_runs(str(store))) == runs
    assert {p.name for p in (store / "probes").iterdir() if p.is_dir()} == runs


def test_a_worker_restarted_with_other_code_computes_no_probe(tmp_path, user_cluster,
                                                               explore_store):
    """Before, the grid went on on the restarted worker and the run was stored (exit 0)."""
    line, store, runs = restart_during_probe(tmp_path, user_cluster, explore_store,
                                        other_numcodecs(tmp_path))
    assert "has numcodecs 0.0.1, " in line, line
    assert (f"the command {version('numcodecs')}" in line        # the task's check
            or f"this process {version('numcodecs')}" in line), line    # the watch's
    no_run_left(store, runs)


def test_a_worker_restarted_with_older_code_is_named_in_one_line(tmp_path, user_cluster,
                                                                 explore_store):
    """Its TypeError (``unexpected keyword argument 'code'``) is what the older code says,
    not a crash of this one: before, it ended the command with an unexpected error."""
    line, store, runs = restart_during_probe(tmp_path, user_cluster, explore_store,
                                        older_grid(tmp_path))
    assert ("runs older actstore code than the command" in line       # the task's TypeError
            and "unexpected keyword argument 'code'" in line
            or "runs other actstore code than this process" in line), line   # the watch's
    no_run_left(store, runs)
