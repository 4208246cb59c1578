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


def _thp_eligible(a) -> bool | None:
    """Whether the kernel may back array ``a`` with huge pages (its mapping's THPeligible)."""
    addr = a.__array_interface__["data"][0] + a.nbytes // 2   # past an unaligned head
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= addr < hi:
                for rest in lines[i + 1:]:
                    if rest.startswith("THPeligible:"):
                        return rest.split()[1] == "1"
    return None


def test_small_pages_turn_numpy_huge_page_advice_off_and_restore_it():
    import numpy as np
    from numpy._core.multiarray import _set_madvise_hugepage

    from actstore.runtime import small_pages
    before = _set_madvise_hugepage(True)
    try:
        with small_pages():
            assert _set_madvise_hugepage(False) is False   # numpy's switch is off inside
            a = np.ones(16 << 20)
            assert _thp_eligible(a) in (False, None)
        assert _set_madvise_hugepage(True) is True         # and on again after
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
        if "[madvise]" in mode:     # advice is what makes a mapping eligible
            assert _thp_eligible(np.ones(16 << 20)) is True
    finally:
        _set_madvise_hugepage(before)


def test_thread_variables_a_command_meets(tmp_path):
    """OpenMP's nested form OMP_NUM_THREADS=4,2 and a garbled ACTSTORE_THREADS failed the
    command as 'unexpected ValueError: invalid literal for int()', exit 1, after its model
    loaded. OpenMP's is read as OpenMP reads it (its outer level) and the command runs;
    ours is one line naming it, exit 2, before anything is written."""
    from conftest import DEMO, cli

    store = tmp_path / "s.zarr"
    made = ["materialize", "--model", "tiny-random", "--prompts", DEMO, "--store", str(store),
            "--steps", "2", "--images", "0:4", "--no-x0"]
    bad = cli(*made, env={"ACTSTORE_THREADS": "two"})
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("actstore")]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert "ACTSTORE_THREADS='two': must be a whole number >= 1" in lines[0]
    assert not store.exists()
    assert cli(*made, env={"OMP_NUM_THREADS": "1,1"}).returncode == 0
    assert store.is_dir()
