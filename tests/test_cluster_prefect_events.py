"""Workers a user started by hand outlive the commands that use them, and each command's
temporary Prefect API dies with it. A worker process keeps one Prefect events client for
its life, bound to the API of the first command whose task it ran (Prefect keys that
client by its type alone), so every later command's task events went to that dead API:
a 3 KB ERROR line and a 7 s failed connect each, a backlog that grew by a few events per
task (15 minutes behind after an hour of a soak run), and a worker that, told to stop,
drained it for minutes (2026-12-06). Real processes: ``dask scheduler``, ``dask worker``
and two ``actstore materialize --cluster`` commands, each with its temporary API."""

from __future__ import annotations

import signal
import time

from conftest import DEMO
from test_cli import run
from test_cluster_env import killable_scheduler  # noqa: F401 - a fixture

SMALL = ["--steps", "2", "--batch-size", "4", "--block-size", "4", "--images", "0:8"]
STALE = "Unable to connect to"


def test_a_later_commands_task_events_do_not_go_to_an_earlier_commands_api(
        tmp_path, killable_scheduler):  # noqa: F811 - the fixture imported above
    from distributed import Client

    address, _, worker = killable_scheduler
    with Client(address, timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
    for name in ("a", "b"):
        res = run("materialize", "--model", "tiny-random", "--prompts", DEMO, "--store",
                  str(tmp_path / f"{name}.zarr"), *SMALL, "--cluster", address,
                  "--quiet", timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "trained: 8 images generated" in res.stdout, res.stdout
    time.sleep(10)                  # a stale client fails its first connect within ~7 s
    log = (tmp_path / "cluster.log").read_text()
    stale = [line[:160] for line in log.splitlines() if STALE in line]
    assert not stale, f"{len(stale)} events sent to a dead Prefect API, e.g. {stale[:2]}"
    t0 = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)
    assert time.monotonic() - t0 < 20, "the worker took its time to stop"
    assert STALE not in (tmp_path / "cluster.log").read_text()
