"""The thread policy: torch/BLAS one core fewer, Dask every core, nothing left changed."""

from __future__ import annotations

import os

import torch
from threadpoolctl import threadpool_info

from actstore.runtime import dask_threads, default_threads, numeric_threads, task_threads


def test_counts_follow_explicit_env_and_cores(monkeypatch):
    monkeypatch.delenv("ACTSTORE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == max(1, (os.cpu_count() or 2) - 1)
    assert dask_threads() == os.cpu_count()
    assert (default_threads(3), dask_threads(3)) == (3, 3)
    monkeypatch.setenv("ACTSTORE_THREADS", "5")
    assert (default_threads(), dask_threads()) == (5, 5)


def test_task_threads_are_single_and_restored():
    torch.set_num_threads(2)
    with task_threads() as n:
        assert n == 1 and torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    assert torch.get_num_threads() == 2
    with numeric_threads(1):
        pass
    assert torch.get_num_threads() == 2
