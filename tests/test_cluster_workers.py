"""A user's cluster whose workers come and go: ``dask scheduler`` and ``dask worker``
subprocesses started here, workers killed with SIGKILL (no nanny to restart them) while a
``--cluster`` command runs. With no worker able to run its tasks for the grace period
(``ACTSTORE_WORKER_GRACE``), the command ends in one line, exit 2, its recorded blocks kept,
and a rerun once a worker is back completes the store; a worker replaced within the grace
period lets the run finish. The probe grid on such a scheduler does the same."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from actstore.store.core import completed_blocks
from conftest import DEMO, REPO, tree_digest
from test_cli import api, run  # noqa: F401 - api: a fixture
from test_cluster_env import _free_port

GRACE = 6          # seconds without an able worker before a command gives up (the tests')
STEPS = ["--steps", "60", "--batch-size", "4", "--block-size", "4", "--no-x0"]


class UserCluster:
    """A scheduler and workers as a user starts them, each worker killable on its own."""

    def __init__(self, tmp_path: Path):
        self.dask = str(Path(sys.executable).parent / "dask")
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.env = {**os.environ, "PYTHONPATH": str(REPO),
                    "PREFECT_HOME": str(tmp_path / "workers")}
        self.log = open(tmp_path / "cluster.log", "w")
        self.procs: list[subprocess.Popen] = []
        self._start("scheduler", "--host", "127.0.0.1", "--port",
                    self.address.rsplit(":", 1)[1], "--no-dashboard")

    def _start(self, *argv: str, env: dict | None = None, prefix: tuple = ()
               ) -> subprocess.Popen:
        proc = subprocess.Popen([*prefix, self.dask, *argv], env=env or self.env,
                                stdout=self.log, stderr=self.log)
        self.procs.append(proc)
        return proc

    def worker(self, *options: str, env: dict | None = None, prefix: tuple = ()
               ) -> subprocess.Popen:
        """One worker process without a nanny: SIGKILL ends it for good. ``prefix``: a
        command that execs the worker (another mount namespace, say)."""
        return self._start("worker", self.address, "--nthreads", "1", "--no-nanny",
                           "--no-dashboard", *options, env=env, prefix=prefix)

    def wait_for(self, n: int, timeout: float = 120) -> None:
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            client.wait_for_workers(n, timeout=timeout)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.log.close()


@pytest.fixture()
def user_cluster(tmp_path):
    cluster = UserCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


def start_materialize(api: str, store: Path, address: str, grace: float = GRACE,
                      images: str = "0:8") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "materialize", "--model", "tiny-random",
         "--prompts", DEMO, "--store", str(store), *STEPS, "--images", images,
         "--cluster", address],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": api,
             "ACTSTORE_WORKER_GRACE": str(grace)})


def wait_until(ready, cli: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ready():
        if time.time() > deadline or cli.poll() is not None:
            cli.kill()
            pytest.fail(f"{what} never happened: {cli.communicate()[1][-2000:]}")
        time.sleep(0.1)


def finish(cli: subprocess.Popen, timeout: float) -> tuple[str, str, float]:
    """The command's output and how long it took to end from now (killed if it hangs)."""
    t0 = time.time()
    try:
        out, err = cli.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        cli.kill()
        out, err = cli.communicate()
        pytest.fail(f"the command still waited {timeout:g} s after its workers left: "
                    f"{err[-1500:]}")
    return out, err, time.time() - t0


def lines_of(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]


def test_the_only_worker_killed_mid_run_ends_the_command_then_a_rerun_resumes(
        tmp_path, user_cluster, api):
    store = tmp_path / "s.zarr"
    worker = user_cluster.worker()
    user_cluster.wait_for(1)
    cli = start_materialize(api, store, user_cluster.address)
    wait_until(lambda: store.exists() and completed_blocks(str(store), "trained"), cli,
               "a first recorded block")
    worker.send_signal(signal.SIGKILL)
    recorded = completed_blocks(str(store), "trained")
    out, err, took = finish(cli, GRACE + 60)
    assert took < GRACE + 20, took
    lines = lines_of(err)
    assert cli.returncode == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("actstore materialize: error: ")
    assert f"the Dask scheduler {user_cluster.address} has had no worker" in lines[0]
    assert "what they recorded is kept" in lines[0] and "rerun the same command" in lines[0]
    at_exit = tree_digest(store)
    time.sleep(2)
    assert tree_digest(store) == at_exit                 # nothing written after the line
    assert completed_blocks(str(store), "trained") == recorded
    # a worker back: the same command does the rest
    user_cluster.worker()
    user_cluster.wait_for(1)
    again = run("materialize", "--model", "tiny-random", "--prompts", DEMO, "--store",
                str(store), *STEPS, "--images", "0:8", "--cluster", user_cluster.address, api=api,
                timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(1 blocks already stored)" in again.stdout, again.stdout
    assert completed_blocks(str(store), "trained") == {(0, 4), (4, 8)}


def test_the_gpu_worker_killed_mid_run_ends_the_command(tmp_path, user_cluster, api):
    """A worker without the GPU resource stays: it cannot run tasks that ask for one."""
    from distributed import Client

    from test_interrupt import inside

    store = tmp_path / "s.zarr"
    gpu = user_cluster.worker("--resources", "GPU=1")
    user_cluster.worker()
    user_cluster.wait_for(2)
    cli = start_materialize(api, store, user_cluster.address)
    with Client(user_cluster.address, timeout=30) as client:
        wait_until(lambda: any(client.run(inside("generate")).values()), cli,
                   "a region running")
        gpu.send_signal(signal.SIGKILL)
        out, err, took = finish(cli, GRACE + 60)
        assert len(client.scheduler_info()["workers"]) == 1   # the other worker stayed
    assert took < GRACE + 20, took
    lines = lines_of(err)
    assert cli.returncode == 2 and len(lines) == 1, err[-3000:]
    assert "has had no worker offering the GPU resource" in lines[0], lines[0]


def test_a_worker_replaced_within_the_grace_period_lets_the_run_finish(tmp_path,
                                                                       user_cluster, api):
    store = tmp_path / "s.zarr"
    worker = user_cluster.worker()
    user_cluster.wait_for(1)
    cli = start_materialize(api, store, user_cluster.address, grace=60)
    wait_until(lambda: store.exists() and completed_blocks(str(store), "trained"), cli,
               "a first recorded block")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    time.sleep(3)                      # the scheduler has had no worker for a while
    user_cluster.worker()
    out, err, _ = finish(cli, 300)
    assert cli.returncode == 0, err[-3000:]
    assert "complete (trained 8/16 images)" in out or "INCOMPLETE (trained 8/16" in out, out
    assert completed_blocks(str(store), "trained") == {(0, 4), (4, 8)}


def test_the_probe_grid_on_a_scheduler_whose_worker_left_ends_in_one_error(
        monkeypatch, user_cluster, explore_store, tmp_path):
    """``run_probes`` on a user's scheduler (``probe --scheduler ADDRESS``) whose only
    worker was killed: an error after the grace period, no probe run left in the store."""
    import shutil

    from distributed import Client

    from actstore.errors import ActstoreError
    from actstore.probe.runs import run_probes
    from conftest import EXPLORE_LAYERS

    monkeypatch.setenv("ACTSTORE_WORKER_GRACE", str(GRACE))
    store = tmp_path / "s.zarr"
    shutil.copytree(explore_store, store)
    before = tree_digest(store)
    worker = user_cluster.worker()
    user_cluster.wait_for(1)
    outcome: list = []
    with Client(user_cluster.address, timeout=30) as client:
        worker.send_signal(signal.SIGKILL)
        deadline = time.time() + 30
        while client.scheduler_info()["workers"] and time.time() < deadline:
            time.sleep(0.1)

        def probe() -> None:
            try:
                outcome.append(run_probes(str(store), "salient", layers=EXPLORE_LAYERS[:1],
                                          steps=[0], scheduler=client, progress=False))
            except Exception as exc:  # noqa: BLE001 - the test looks at what it was
                outcome.append(exc)
        t0 = time.time()
        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(GRACE + 30)
        took = time.time() - t0
    thread.join(30)        # the client closed: a hung compute ends now
    assert took < GRACE + 20, "the probe grid still waited for a worker"
    assert len(outcome) == 1 and isinstance(outcome[0], ActstoreError), outcome
    assert f"the Dask scheduler {user_cluster.address} has had no worker" in str(outcome[0])
    assert tree_digest(store) == before
