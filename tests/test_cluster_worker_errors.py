"""An operating-system error met on a user's Dask worker names that worker: a ``dask
worker`` subprocess in its own mount namespace sees the store's folder read-only while the
submitting shell can write it, so "Read-only file system" alone would be false of the
shell the user reads it in. The task is still retried (not bad input), the command's line
is one, exit 2, and nothing is stored."""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from actstore.store.core import completed_blocks
from conftest import DEMO, tree_digest
from test_cli import api, one_line, run  # noqa: F401 - api: a fixture
from test_cluster_workers import user_cluster  # noqa: F401 - a fixture
from test_fanout_cli import refusal, run_counts

SMALL = ["--steps", "2", "--batch-size", "4", "--block-size", "4"]


def read_only_for(folder: Path) -> tuple:
    """A command prefix that runs the rest in a mount namespace where ``folder`` is
    read-only (the test's process and the scheduler see it writable)."""
    prefix = ("unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"',
              str(folder))
    probe = subprocess.run([*prefix, "touch", str(folder / "probe")], capture_output=True)
    if not shutil.which("unshare") or b"Read-only file system" not in probe.stderr:
        pytest.skip(f"no private read-only mount here: {probe.stderr[-300:]!r}")
    return prefix


def test_a_worker_that_cannot_write_the_store_is_named_in_the_line(tmp_path, user_cluster,
                                                                   api):
    from distributed import Client

    shared = tmp_path / "shared"
    shared.mkdir()
    user_cluster.worker(prefix=read_only_for(shared))
    user_cluster.wait_for(1)
    with Client(user_cluster.address, timeout=30) as client:
        (worker,) = client.scheduler_info()["workers"]
    store = shared / "s.zarr"

    def materialize(images: str) -> subprocess.CompletedProcess:
        return run("materialize", "--model", "tiny-random", "--prompts", DEMO,
                   "--store", str(store), *SMALL, "--images", images, "--cluster",
                   user_cluster.address, api=api, timeout=300)
    # a new store: the planning task, which creates it, fails on the worker
    since = datetime.now(timezone.utc)
    res = materialize("0:4")
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_line(res.stderr)
    assert "Read-only file system" in line and f"(on Dask worker {worker} (" in line, line
    assert run_counts("plan-regions", since) == [3]        # retried, as before
    assert not store.exists()
    # a store made here: its regions fail on the worker, after their retries
    made = run("--no-prefect", "--quiet", "materialize", "--model", "tiny-random",
               "--prompts", DEMO, "--store", str(store), *SMALL, "--images", "0:4")
    assert made.returncode == 0, made.stderr[-2000:]
    before = tree_digest(store)
    res = materialize("4:8")
    assert res.returncode == 2, res.stderr[-3000:]
    line = refusal(res.stderr)
    assert "Read-only file system" in line and f"on Dask worker {worker} (" in line, line
    assert tree_digest(store) == before
    assert completed_blocks(str(store), "trained") == {(0, 4)}
