"""Every task of the probe grid names the Dask worker an error met it on (``names_worker``):
the fit, merge, solve and logistic tasks as much as the block tasks. A worker started
elsewhere has its own memory, libraries and environment, so "MemoryError" in a merge of
fold statistics, or a failed solve, is a fact about that worker, and the user reading the
command's line has to know which one. Before, only the three tasks that read the store
named theirs. A real ``dask scheduler`` and ``dask worker --no-nanny``; each task is handed
an input it fails on, where it runs."""

from __future__ import annotations

import numpy as np

from actstore.cluster import ON_WORKER, worker_note
from actstore.probe import grid
from actstore.probe.scheduler import compute, task_code
from test_cluster_env import _free_port
from test_cluster_workers import user_cluster  # noqa: F401

# (task, arguments it fails on): what each does first with its input raises
FAILING = {
    "_merged": (grid._merged, ([1, 2],)),
    "_solve_ridge": (grid._solve_ridge, (None, np.ones(3))),
    "_sample_steps": (grid._sample_steps, (None, slice(0, 1))),
    "_step_stats": (grid._step_stats, (None, 0)),
    "_logistic_cells": (grid._logistic_cells, (None, 5, None, None, slice(0, 1))),
    "_logistic_fit": (grid._logistic_fit, (None, np.arange(2))),
}


def test_every_grid_task_names_its_worker(user_cluster):  # noqa: F811
    from distributed import Client

    address = f"tcp://127.0.0.1:{_free_port()}"
    user_cluster.worker("--listen-address", address)
    user_cluster.wait_for(1)
    unnamed = {}
    with Client(user_cluster.address, timeout=30) as client:
        code = task_code(client)
        assert code is not None          # a user's cluster: the tasks check their code too
        for name, (task, args) in FAILING.items():
            try:
                compute(grid._task(task, code)(*args), scheduler=client, store="s.zarr")
            except Exception as exc:  # noqa: BLE001 - whatever the input made it raise
                note = worker_note(exc)
                if not (note or "").startswith(f"{ON_WORKER}{address} ("):
                    unnamed[name] = (type(exc).__name__, note)
            else:
                unnamed[name] = "no error"
    assert unnamed == {}
