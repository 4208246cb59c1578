"""A worker killed and restarted at a checked address with other code, while a command waits
on a user's cluster. Before, the watch of joining workers knew checked workers by address,
so it never looked at the restarted one: a worker whose actstore lacks the class of a
result it fetches from another worker (a fit's statistics) retried the fetch and the
command waited without end; a worker whose actstore lacks a grid function left the cluster
on being handed a task, and the command ended after the grace with "has had no worker",
which named no cause. Real ``dask scheduler`` / ``dask worker --no-nanny`` subprocesses;
the restart happens between the command's start-up check and its wait, the task pinned to
the restarted worker (``dask.annotate(workers=...)``) so that it, not the other one, meets
the result it cannot load. Last, the wait for the results, which was not watched."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import dask
import pytest

from actstore.probe import grid
from actstore.probe import stats as ps
from actstore.probe.scheduler import check_client_code, compute, task_code
from conftest import REPO
from test_cluster_code import changed_actstore
from test_cluster_env import _free_port
from test_cluster_workers import UserCluster, user_cluster  # noqa: F401

HANG = 90      # seconds: the fixed watch answers within 50 (a departed worker's check waits
               # 30 s to connect); before, it waited for ever


def without(tmp_path: Path, name: str) -> Path:
    """A copy of actstore in which ``name`` is called ``name``V0 everywhere, as in an
    older checkout: it imports and runs, but a pickle naming ``name`` cannot be loaded."""
    alt = changed_actstore(tmp_path)
    for path in (alt / "actstore").rglob("*.py"):
        text = path.read_text()
        if name in text:
            path.write_text(re.sub(rf"\b{name}\b", f"{name}V0", text))
    return alt


def start_at(cluster: UserCluster, listen: str, alt: Path):
    """A worker at ``listen`` with ``alt`` first on its path (another checkout's code)."""
    return cluster.worker("--listen-address", listen,
                          env={**cluster.env, "PYTHONPATH": f"{alt}{os.pathsep}{REPO}"})


def kill(worker) -> None:
    worker.send_signal(signal.SIGKILL)
    worker.wait()


def run(graph, client) -> BaseException | None:
    """``compute(graph)`` on ``client`` within HANG seconds: its error (None if none)."""
    ended: dict = {}

    def go() -> None:
        try:
            compute(graph, scheduler=client, store="s.zarr")
            ended["error"] = None
        except BaseException as exc:  # noqa: BLE001 - what the command would say
            ended["error"] = exc
    thread = threading.Thread(target=go, daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(HANG)
    if "error" not in ended:
        client.close()
        pytest.fail(f"the wait still went on after {time.monotonic() - t0:.0f} s")
    return ended["error"]


def test_a_worker_restarted_lacking_a_fetched_class_stops_the_command_in_one_line(
        tmp_path, user_cluster):
    """Fold statistics computed on the other worker, then a step's slice of them on the
    restarted one, whose copy of actstore has no FoldStats: it cannot load them."""
    from distributed import Client

    user_cluster.worker()
    listen = f"tcp://127.0.0.1:{_free_port()}"
    worker = user_cluster.worker("--listen-address", listen)
    user_cluster.wait_for(2)
    with Client(user_cluster.address, timeout=30) as client:
        check_client_code(client)                 # the command's start-up check
        (other,) = set(client.scheduler_info()["workers"]) - {listen}
        kill(worker)
        start_at(user_cluster, listen, without(tmp_path, "FoldStats"))
        user_cluster.wait_for(2)
        with dask.annotate(workers=[other]):
            stats = dask.delayed(ps.FoldStats)((None,) * 5)
        with dask.annotate(workers=[listen]):
            step = grid._task(grid._step_stats, task_code(client))(stats, 0)
        error = run(step, client)
    line = str(error)
    assert "\n" not in line, line
    assert type(error).__name__ == "OtherCodeJoined", repr(error)
    assert f"Dask worker {listen} runs other actstore code than this process" in line, line
    assert line.endswith("nothing of this run was kept: rerun it"), line


def test_a_worker_restarted_lacking_a_grid_function_is_said_to_have_left(
        tmp_path, user_cluster, monkeypatch):
    """The only worker restarted with an actstore without ``_step_stats`` while the task
    waits: handed it, the worker cannot load it and leaves (distributed 2026.8 fails in its
    connection, not in the task). The command names it if the watch checked it before it
    left; else (the check's call to it fails to connect: it is skipped) once the grace ends
    it says that a worker left and where to look, not only that there was none."""
    from distributed import Client

    monkeypatch.setenv("ACTSTORE_WORKER_GRACE", "8")
    listen = f"tcp://127.0.0.1:{_free_port()}"
    worker = user_cluster.worker("--listen-address", listen)
    user_cluster.wait_for(1)
    alt = without(tmp_path, "_step_stats")
    with Client(user_cluster.address, timeout=30) as client:
        check_client_code(client)
        kill(worker)
        threading.Timer(2, start_at, (user_cluster, listen, alt)).start()  # the task waits
        error = run(grid._task(grid._step_stats, task_code(client))(None, 0), client)
    line = str(error)
    assert "\n" not in line, line
    if type(error).__name__ == "OtherCodeJoined":   # the watch looked at it before it left
        assert f"Dask worker {listen} runs other actstore code" in line, line
        return
    assert type(error).__name__ == "NoAbleWorker", repr(error)
    assert "has had no worker for 8 s" in line, line
    assert "1 worker left it meanwhile" in line, line
    assert "its log says why" in line, line


def test_the_only_worker_lost_while_a_result_comes_back_ends_in_one_line(
        user_cluster, monkeypatch):
    """The task done, its result on the way here (5 s to serialize), the only worker killed:
    Dask runs the task again, with no worker to. Before, the wait for the results was not
    watched and went on for ever."""
    from distributed import Client

    monkeypatch.setenv("ACTSTORE_WORKER_GRACE", "3")
    worker = user_cluster.worker()
    user_cluster.wait_for(1)

    class Slow:                       # defined here: sent by value, the worker needs no copy
        def __reduce__(self):
            time.sleep(5)
            return int, (0,)
    with Client(user_cluster.address, timeout=30) as client:
        outcome: list = []
        threading.Thread(target=lambda: outcome.append(run(dask.delayed(Slow)(), client)),
                         daemon=True).start()
        deadline = time.monotonic() + 60
        while not client.run_on_scheduler(lambda dask_scheduler: any(
                ts.state == "memory" for ts in dask_scheduler.tasks.values())):
            assert time.monotonic() < deadline, "the task never finished"
            time.sleep(0.1)
        time.sleep(1.5)               # the result is being serialized on its worker
        kill(worker)
        deadline = time.monotonic() + HANG + 5
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.2)
    assert outcome, "the wait for the result went on"
    line = str(outcome[0])
    assert type(outcome[0]).__name__ == "NoAbleWorker", repr(outcome[0])
    assert "has had no worker for 3 s" in line and "1 worker left it meanwhile" in line, line
