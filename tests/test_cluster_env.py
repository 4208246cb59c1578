"""A user's cluster whose workers' environment differs from the submitting shell's: the
shell has the object store's credentials, a worker started elsewhere has none. The error a
worker meets reaches the user in one line that names that worker (what it says, no
credentials, is false of the shell the user is looking at), exit 2, and the bucket stays
empty. Real servers: moto's S3 server, a Prefect API, worker processes of a
``LocalCluster`` started without the AWS variables."""

from __future__ import annotations

import logging

import fsspec
import pytest

from conftest import DEMO, S3_SECRET
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

