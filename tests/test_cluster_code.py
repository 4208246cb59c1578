"""A user's cluster with a worker that runs other code than the command: a ``dask worker``
subprocess whose PYTHONPATH puts a changed copy of actstore first (another checkout), or
another numcodecs install (another environment). The command refuses the cluster in one
line naming that worker, the package and both versions, exit 2, before anything is
written; a worker running the same code beside it is accepted (test_cluster_workers)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import DEMO, REPO, tree_digest
from test_cli import api, one_line, run  # noqa: F401 - api: a fixture
from test_cluster_workers import UserCluster, user_cluster  # noqa: F401 - a fixture


def changed_actstore(tmp_path: Path) -> Path:
    """A folder holding a copy of actstore with one file changed (a comment)."""
    alt = tmp_path / "other-checkout"
    shutil.copytree(REPO / "actstore", alt / "actstore",
                    ignore=shutil.ignore_patterns("__pycache__"))
    codecs = alt / "actstore" / "store" / "codecs.py"
    codecs.write_text(codecs.read_text() + "\n# changed in another checkout\n")
    return alt


def changed_flows(tmp_path: Path) -> Path:
    """A folder holding another checkout's actstore and flows (the tasks a worker runs),
    only a file of flows changed."""
    alt = tmp_path / "other-flows"
    for package in ("actstore", "flows"):
        shutil.copytree(REPO / package, alt / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    tasks = alt / "flows" / "materialize.py"
    tasks.write_text(tasks.read_text() + "\n# changed in another checkout\n")
    return alt


def digest_in(cwd: Path, pythonpath: Path) -> str:
    """source_digest as a fresh Python started in ``cwd`` (on its import path first, as a
    notebook's working folder is) with ``pythonpath`` before the checkout computes it."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, ''); from actstore.worker_code "
         "import source_digest; print(source_digest()[0])"],
        cwd=cwd, env={**os.environ, "PYTHONPATH": f"{pythonpath}{os.pathsep}{REPO}"},
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_the_source_digest_ignores_a_notebook_s_flows_and_hidden_files(tmp_path):
    """A project's own ``flows`` package in a notebook's working folder, a notebook's
    checkpoint copy and an editor's dangling lock file inside the package are not the
    code a task runs: with them the digest equals a clean copy's (before, the first two
    changed it, refusing every worker of a cluster with the same code, and the lock file
    made it fail)."""
    checkout = tmp_path / "checkout"
    for package in ("actstore", "flows"):
        shutil.copytree(REPO / package, checkout / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    clean = digest_in(tmp_path, checkout)
    project = tmp_path / "project"
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "__init__.py").write_text("# a project's own Prefect flows\n")
    (checkout / "actstore" / ".ipynb_checkpoints").mkdir()
    (checkout / "actstore" / ".ipynb_checkpoints" / "kinds-checkpoint.py").write_text("x = 1\n")
    (checkout / "flows" / ".#cli.py").symlink_to("user@host.1234:1700000000")
    assert digest_in(project, checkout) == clean
    (checkout / "flows" / "cli.py").write_text((checkout / "flows" / "cli.py").read_text() + "#\n")
    assert digest_in(project, checkout) != clean


def other_numcodecs(tmp_path: Path) -> Path:
    """A folder whose installed-package record says numcodecs 0.0.1."""
    site = tmp_path / "other-env"
    info = site / "numcodecs-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: numcodecs\nVersion: 0.0.1\n")
    return site


def start_pair(cluster: UserCluster, first_on_path: Path) -> str:
    """A worker with this checkout's code and one with ``first_on_path`` before it; the
    second one's address."""
    from distributed import Client

    cluster.worker()
    cluster.worker(env={**cluster.env, "PYTHONPATH": f"{first_on_path}{os.pathsep}{REPO}"})
    cluster.wait_for(2)
    with Client(cluster.address, timeout=30) as client:
        paths = client.run(lambda: __import__("sys").path[:3])
    (other,) = [w for w, path in paths.items() if str(first_on_path) in path]
    return other


def materialize_refused(tmp_path: Path, user_cluster: UserCluster, api, other: str,
                        folder: str) -> None:
    """materialize --cluster refuses worker ``other``, whose code comes from ``folder``, in
    one line naming both, exit 2, nothing stored."""
    store = tmp_path / "s.zarr"
    res = run("materialize", "--model", "tiny-random", "--prompts", DEMO, "--store",
              str(store), "--steps", "2", "--images", "0:4", "--cluster",
              user_cluster.address, api=api, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_line(res.stderr)
    assert f"--cluster {user_cluster.address}: Dask worker {other} runs other actstore " \
           "code than this process" in line, line
    assert folder in line and "nothing was written" in line
    assert not store.exists()


def test_a_worker_with_other_actstore_source_is_refused_naming_it(tmp_path, user_cluster,
                                                                  api, explore_store):
    from distributed import Client

    from actstore.errors import ActstoreError
    from actstore.probe.runs import run_probes
    from conftest import EXPLORE_LAYERS

    other = start_pair(user_cluster, changed_actstore(tmp_path))
    materialize_refused(tmp_path, user_cluster, api, other, "other-checkout")
    # the probe grid on the same scheduler (``probe --scheduler ADDRESS``)
    probed = tmp_path / "p.zarr"
    shutil.copytree(explore_store, probed)
    before = tree_digest(probed)
    with Client(user_cluster.address, timeout=30) as client, \
            pytest.raises(ActstoreError, match=f"Dask worker {other} runs other actstore"):
        run_probes(str(probed), "salient", layers=EXPLORE_LAYERS[:1], steps=[0],
                   scheduler=client, progress=False)
    assert tree_digest(probed) == before


def test_a_worker_with_other_flows_source_is_refused_naming_it(tmp_path, user_cluster, api):
    """The tasks a worker runs are defined in flows/: a worker whose flows differ (its
    actstore the same) may write a store differently, and is refused like one whose
    actstore differs."""
    other = start_pair(user_cluster, changed_flows(tmp_path))
    materialize_refused(tmp_path, user_cluster, api, other, "other-flows")


def test_a_worker_with_another_numcodecs_is_refused_naming_both_versions(
        tmp_path, user_cluster, api, tiny_store):
    import numcodecs

    from importlib.metadata import version

    other = start_pair(user_cluster, other_numcodecs(tmp_path))
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    before = tree_digest(store)
    res = run("label", "--store", str(store), "--provider", "toyworld", "--target", "depth",
              "--cluster", user_cluster.address, api=api, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_line(res.stderr)
    assert f"Dask worker {other} has numcodecs 0.0.1, this process " \
           f"{version('numcodecs')}" in line, line
    assert numcodecs.__version__ == version("numcodecs")
    assert tree_digest(store) == before


def test_a_worker_with_other_code_joining_mid_run_stops_the_command(tmp_path, user_cluster,
                                                                    api):
    """Checked as it joins (about a second), not only at the start: one line naming it,
    exit 2, and nothing is written after the line."""
    import time

    from distributed import Client

    from test_cluster_workers import finish, lines_of, start_materialize, wait_until
    from test_interrupt import inside

    user_cluster.worker()
    user_cluster.wait_for(1)
    store = tmp_path / "s.zarr"
    cli = start_materialize(api, store, user_cluster.address)
    with Client(user_cluster.address, timeout=30) as client:
        wait_until(lambda: any(client.run(inside("generate")).values()), cli,
                   "a region running")
        (first,) = client.scheduler_info()["workers"]
        site = other_numcodecs(tmp_path)
        user_cluster.worker(env={**user_cluster.env, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"})
        client.wait_for_workers(2, timeout=60)
        (joined,) = set(client.scheduler_info()["workers"]) - {first}
        out, err, took = finish(cli, 120)
    lines = lines_of(err)
    assert cli.returncode == 2 and len(lines) == 1, err[-3000:]
    assert f"Dask worker {joined} has numcodecs 0.0.1" in lines[0], lines[0]
    assert "rerun the same command" in lines[0]
    at_exit = tree_digest(store)
    time.sleep(3)
    assert tree_digest(store) == at_exit


def test_a_worker_whose_actstore_cannot_be_read_is_refused(tmp_path, user_cluster):
    """A worker whose source_digest fails reading a file of its actstore (an OSError: a
    file it may not read, here one that reads as an I/O error) was taken for a worker gone
    in the call and skipped, so the check passed and its code ran unchecked; it is now
    refused as one whose code cannot be told, naming it and the error."""
    from distributed import Client

    from actstore.cluster_checks import check_worker_code
    from actstore.errors import ActstoreError

    alt = tmp_path / "unreadable"
    shutil.copytree(REPO / "actstore", alt / "actstore",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (alt / "actstore" / "unreadable.py").symlink_to("/proc/self/mem")   # read: EIO
    other = start_pair(user_cluster, alt)
    with Client(user_cluster.address, timeout=30) as client, \
            pytest.raises(ActstoreError) as refused:
        check_worker_code(client, f"--cluster {user_cluster.address}")
    line = str(refused.value)
    assert "\n" not in line and f"Dask worker {other} runs other actstore code" in line, line
    assert "cannot say (OSError: [Errno 5]" in line, line
