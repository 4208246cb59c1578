"""A worker with other code that the start-up check and the watch of joining workers cannot
stop in time: one that joins and is handed a queued region at once, and one killed and
restarted with other code at the same address (until 2026-12-06 the watch knew addresses;
it knows worker processes now, but a region may start before it looks). Each writing
task compares its worker's code with its command's before it touches the store, so such
a worker writes nothing: the command ends in one line naming it, exit 2, recorded blocks
kept. Real ``dask scheduler`` / ``dask worker --no-nanny`` subprocesses."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from actstore.store.core import completed_blocks
from conftest import REPO, tree_digest
from test_cli import api  # noqa: F401 - a fixture
from test_cluster_code import changed_actstore, other_numcodecs
from test_cluster_env import _free_port
from test_cluster_workers import (UserCluster, finish, lines_of, start_materialize,  # noqa: F401
                                  user_cluster, wait_until)
from test_interrupt import inside

MARK = "written-by-other-code"


def marking_actstore(tmp_path: Path) -> Path:
    """A changed copy of actstore whose regions, once started, write MARK into the store:
    other code that would write to it shows it did."""
    alt = changed_actstore(tmp_path)
    regions = alt / "actstore" / "generation" / "regions.py"
    regions.write_text(regions.read_text() + f'''

_region = materialize_region


def materialize_region(model, prompts, store, settings, **options):
    import pathlib

    pathlib.Path(store, "{MARK}").write_text(worker_id())
    return _region(model, prompts, store, settings, **options)
''')
    return alt


def test_a_worker_with_other_code_joining_writes_nothing_of_the_region_it_is_given(
        tmp_path, user_cluster, api):
    """Four regions, one worker: two wait on the scheduler, and a worker that joins (its
    modules preloaded, as a user's may be) is handed one as it registers, before any check
    from outside asks it. Before, its region ran with its other code (the copy's mark in
    the store) while the watch had not yet looked at it."""
    from distributed import Client

    user_cluster.worker()
    user_cluster.wait_for(1)
    store = tmp_path / "s.zarr"
    cli = start_materialize(api, store, user_cluster.address, grace=60,
                            images="0:16")
    with Client(user_cluster.address, timeout=30) as client:
        wait_until(lambda: any(client.run(inside("generate")).values()), cli,
                   "a region running")
        (first,) = client.scheduler_info()["workers"]
        alt = marking_actstore(tmp_path)
        user_cluster.worker("--preload", "flows.materialize",
                            env={**user_cluster.env, "PYTHONPATH": f"{alt}{os.pathsep}{REPO}"})
        out, err, _ = finish(cli, 180)
        joined = set(client.scheduler_info()["workers"]) - {first}
        time.sleep(5)                  # a region it started would have marked the store
        assert not any(client.run(inside("materialize_region")).values())
    assert len(joined) == 1, joined
    lines = lines_of(err)
    assert cli.returncode == 2 and len(lines) == 1, err[-3000:]
    assert f"Dask worker {joined.pop()}" in lines[0], lines[0]
    assert "runs other actstore code than" in lines[0], lines[0]
    assert not (store / MARK).exists(), "a region ran on the worker with other code"


def test_a_worker_restarted_at_the_same_address_with_other_code_writes_nothing(
        tmp_path, user_cluster, api):
    """The only worker killed after a first recorded block and restarted at its address
    with another numcodecs: before, the run went on there and completed (exit 0). Its
    regions' own check and the watch of joining workers (which knows it for another
    process since 2026-12-06) race to say it; either line will do."""
    listen = ("--listen-address", f"tcp://127.0.0.1:{_free_port()}")
    worker = user_cluster.worker(*listen)
    user_cluster.wait_for(1)
    store = tmp_path / "s.zarr"
    cli = start_materialize(api, store, user_cluster.address, grace=60)
    wait_until(lambda: store.exists() and completed_blocks(str(store), "trained"), cli,
               "a first recorded block")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    recorded, at_kill = completed_blocks(str(store), "trained"), tree_digest(store)
    site = other_numcodecs(tmp_path)
    user_cluster.worker(*listen, env={**user_cluster.env,
                                      "PYTHONPATH": f"{site}{os.pathsep}{REPO}"})
    out, err, _ = finish(cli, 180)
    lines = lines_of(err)
    assert cli.returncode == 2 and len(lines) == 1, err[-3000:]
    assert f"Dask worker {listen[1]} " in lines[0], lines[0]
    from importlib.metadata import version

    assert "has numcodecs 0.0.1, " in lines[0], lines[0]
    assert (f"the command {version('numcodecs')}" in lines[0]            # the region's
            and "what the others recorded is kept" in lines[0]
            or f"this process {version('numcodecs')}" in lines[0]       # the watch's
            and "what they recorded is kept" in lines[0]), lines[0]
    time.sleep(3)
    assert tree_digest(store) == at_kill         # not a byte written after the kill
    assert completed_blocks(str(store), "trained") == recorded
