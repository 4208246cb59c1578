"""A user's cluster whose workers' environment differs from the submitting shell's: the
shell has the object store's credentials, a worker started elsewhere has none. The error a
worker meets reaches the user in one line that names that worker (what it says, no
credentials, is false of the shell the user is looking at), exit 2, and the bucket stays
empty. Real servers: moto's S3 server, a Prefect API, worker processes of a
``LocalCluster`` started without the AWS variables."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from conftest import DEMO, REPO, S3_SECRET, tree_digest
from test_cli import api, one_line, run  # noqa: F401 - api: a fixture

pytestmark = pytest.mark.usefixtures("s3_server")
SMALL = ["--steps", "2", "--batch-size", "4", "--block-size", "4", "--images", "0:8"]


@pytest.fixture()
def bare_cluster(monkeypatch, tmp_path):
    """A running cluster whose worker processes have no credentials at all."""
    from distributed import LocalCluster

    with monkeypatch.context() as env:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.delenv(k)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        env.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
    with cluster:
        yield cluster


def test_a_workers_missing_credentials_name_the_worker(bucket, bare_cluster, api):
    uri = f"s3://{bucket}/s.zarr"
    (worker,) = bare_cluster.scheduler_info["workers"]
    res = run("materialize", "--model", "tiny-random", "--prompts", DEMO, "--store", uri,
              *SMALL, "--cluster", bare_cluster.scheduler_address, api=api, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    line = one_line("\n".join(ln for ln in res.stderr.splitlines() if "%|" not in ln))
    assert "no credentials found" in line
    assert f"on Dask worker {worker}" in line, line
    assert S3_SECRET not in res.stdout + res.stderr
    assert fsspec.filesystem("s3", skip_instance_cache=True).find(bucket) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def killable_scheduler(tmp_path):
    """A ``dask scheduler`` and one ``dask worker`` as a user starts them (subprocesses),
    the scheduler's process handed to the test to kill; both stopped afterwards."""
    dask = str(Path(sys.executable).parent / "dask")
    address = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "workers")}
    log = open(tmp_path / "cluster.log", "w")
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port",
                               address.rsplit(":", 1)[1], "--no-dashboard"],
                              env=env, stdout=log, stderr=log)]
    procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1",
                                   "--no-dashboard"], env=env, stdout=log, stderr=log))
    try:
        yield address, *procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        log.close()


def test_a_scheduler_lost_mid_run_is_one_line_saying_so(tmp_path, killable_scheduler, api):
    """The scheduler dies while a region runs (a restart, a lost head node): the command
    ends within seconds with one line that says the scheduler was lost and a rerun
    resumes, exit 2; its recorded blocks stay, and the worker's region stops too."""
    from distributed import Client

    from test_interrupt import inside

    address, scheduler, worker = killable_scheduler
    store = tmp_path / "s.zarr"
    with Client(address, timeout=30) as client:
        client.wait_for_workers(1, timeout=30)
        cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "materialize", "--model",
                                "tiny-random", "--prompts", DEMO, "--store", str(store),
                                "--steps", "400", "--batch-size", "4", "--block-size", "4",
                                "--images", "0:8", "--cluster", address],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                               "PREFECT_API_URL": api})
        try:
            deadline = time.time() + 120
            while not any(client.run(inside("generate")).values()):
                if time.time() > deadline or cli.poll() is not None:
                    cli.kill()
                    pytest.fail(f"no region started: {cli.communicate()[1][-2000:]}")
                time.sleep(0.2)
            scheduler.kill()
            out, err = cli.communicate(timeout=40)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.communicate()
    at_exit, deadline = tree_digest(store), time.time() + 30
    while worker.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and cli.returncode == 2, err[-3000:]
    assert f"lost the Dask scheduler {address}" in lines[0]
    assert "rerun the same command" in lines[0]
    # the worker's region stops at its next step, writing nothing after the command's line
    assert worker.poll() is not None, "the worker ran on 30 s after losing its scheduler"
    now = tree_digest(store)
    assert sorted(k for k in at_exit.keys() | now.keys() if at_exit.get(k) != now.get(k)) == []


def test_a_probe_workers_missing_credentials_name_the_worker(bucket, bare_cluster,
                                                             explore_store):
    """The probe grid on a user's cluster (``probe --scheduler ADDRESS``): its block tasks
    read the store where they run, and a worker without credentials is named."""
    from distributed import Client

    from actstore.errors import ActstoreError
    from actstore.probe.runs import run_probes
    from conftest import EXPLORE_LAYERS

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(explore_store, f"{bucket}/s.zarr", recursive=True)
    before = sorted(fs.find(bucket))
    (worker,) = bare_cluster.scheduler_info["workers"]
    with Client(bare_cluster) as client, pytest.raises(ActstoreError) as info:
        run_probes(f"s3://{bucket}/s.zarr", "salient", layers=EXPLORE_LAYERS[:1], steps=[0],
                   scheduler=client, progress=False)
    assert "no credentials found" in str(info.value)
    assert f"on Dask worker {worker}" in str(info.value), str(info.value)
    assert sorted(fs.find(bucket)) == before
