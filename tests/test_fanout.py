"""Fan-out materialize on a real multi-process Dask cluster (started here, no network):
the store equals a serial run array for array, each worker process loads the model once,
a worker killed with SIGKILL mid-run costs nothing, and a scheduler that does not answer
is a one-line error within seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from actstore.generation.materialize import MaterializeSettings
from actstore.generation.sampling import GenerationConfig
from actstore.store.core import completed_blocks
from conftest import DEMO, REPO, TINY, store_arrays, tree_digest

# The reference store's settings (conftest.tiny_store), so arrays must match exactly.
SETTINGS = MaterializeSettings(gen=GenerationConfig(steps=TINY["steps"]),
                               batch_size=TINY["batch_size"], block_size=TINY["block_size"],
                               device="cpu")


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, one task each: what `--workers 2` starts."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as lc, Client(lc) as client:
        yield client


def _assert_same(uri: str, ref: str) -> None:
    got, want = store_arrays(uri), store_arrays(ref)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_fan_out_equals_serial_and_loads_the_model_once_per_worker(prefect_harness, cluster,
                                                                    tiny_store, tmp_path):
    from actstore.generation.regions import model_loads
    from flows.materialize import materialize_flow

    uri = str(tmp_path / "fan.zarr")
    address = cluster.scheduler.address
    summary = materialize_flow("tiny-random", DEMO, uri, SETTINGS, cluster=address,
                               progress=False)
    _assert_same(uri, tiny_store)
    assert summary["regions"] == 4 and summary["blocks_written"] == 4
    assert summary["complete"] == {"trained": {"complete": 16, "images": 16}}
    assert summary["status"] == f"store {uri}: complete (trained 16/16 images)"
    ran = Counter(summary["regions_by_worker"])
    loads = cluster.run(model_loads)        # {worker address: loads in that process}
    assert sum(ran.values()) == 4 and max(ran.values()) >= 2  # some process reused its model
    assert set(loads.values()) <= {0, 1}                     # ... and no process loaded twice
    # Workers as Dask starts them (its MALLOC_TRIM_THRESHOLD_) tune glibc as they load the
    # model: those that loaded serve 1 MiB from the heap, any that did not still mmap it.
    mmapped = cluster.run(lambda: _mmapped())
    assert {w: not m for w, m in mmapped.items()} == {w: n == 1 for w, n in loads.items()}
    # The randomized control on the same workers: one more load each, permuted once.
    randomized = replace(SETTINGS, control="randomized")
    control = materialize_flow("tiny-random", DEMO, uri, randomized, cluster=address,
                               progress=False)
    assert control["model"] == "randomized"
    assert set(cluster.run(model_loads).values()) <= {1, 2}
    serial = str(tmp_path / "serial.zarr")
    materialize_flow("tiny-random", DEMO, serial, randomized, progress=False)
    np.testing.assert_array_equal(store_arrays(uri, "randomized")["final_image"],
                                  store_arrays(serial, "randomized")["final_image"])
    again = materialize_flow("tiny-random", DEMO, uri, SETTINGS, cluster=address,
                             progress=False)
    assert again["regions"] == 0 and again["blocks_written"] == 0  # complete: nothing to do


def test_a_worker_killed_mid_run_costs_nothing(prefect_harness, cluster, tiny_store,
                                               tmp_path):
    from flows.materialize import materialize_flow

    uri = str(tmp_path / "killed.zarr")
    pids = cluster.run(os.getpid)           # {worker address: pid}
    killed: list[int] = []

    def kill_a_busy_worker() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if os.path.exists(uri) and completed_blocks(uri, "trained"):
                busy = [w for w, keys in cluster.processing().items() if keys]
                if busy:
                    killed.append(pids[busy[0]])
                    os.kill(pids[busy[0]], signal.SIGKILL)
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_a_busy_worker)
    watcher.start()
    summary = materialize_flow("tiny-random", DEMO, uri, SETTINGS,
                               cluster=cluster.scheduler.address, progress=False)
    watcher.join()
    assert killed, "no worker was busy after the first block: nothing was tested"
    assert summary["complete"] == {"trained": {"complete": 16, "images": 16}}
    _assert_same(uri, tiny_store)
    cluster.wait_for_workers(2, timeout=120)  # the nanny restarted the killed process


def _silent_port() -> socket.socket:
    """A listening socket that never speaks: connections hang instead of failing."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_a_scheduler_that_does_not_answer_is_one_line_within_seconds(tiny_store, tmp_path):
    from actstore.cluster import SCHEDULER_TIMEOUT
    from actstore.cluster_checks import check_scheduler
    from actstore.errors import ActstoreError

    silent = _silent_port()
    quiet, refused = (f"tcp://127.0.0.1:{port}"
                      for port in (silent.getsockname()[1], _closed_port()))
    before = tree_digest(tiny_store)
    try:
        t0 = time.perf_counter()
        with pytest.raises(ActstoreError, match="no Dask scheduler answered"):
            check_scheduler(quiet)
        # bounded: distributed alone waits on a server that never speaks far longer
        assert time.perf_counter() - t0 < 2 * SCHEDULER_TIMEOUT + 5
        for store, address in ((str(tmp_path / "new.zarr"), refused), (tiny_store, quiet)):
            proc = subprocess.run(
                [sys.executable, "-m", "flows.cli", "--quiet", "materialize", "--store", store,
                 "--model", "tiny-random", "--prompts", "demo", "--steps", str(TINY["steps"]),
                 "--cluster", address],
                capture_output=True, text=True, timeout=300, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)})
            assert proc.returncode == 2, proc.stderr[-2000:]
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(
                f"actstore materialize: error: --cluster {address}: "), lines
    finally:
        silent.close()
    assert not (tmp_path / "new.zarr").exists()
    assert tree_digest(tiny_store) == before


def _mmapped(nbytes: int = 1 << 20) -> bool:
    """Does glibc serve a malloc of ``nbytes`` with a fresh mmap (its own count, mallinfo2)?"""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    before = libc.mallinfo2().hblkhd
    ptr = libc.malloc(ctypes.c_size_t(nbytes))
    grew = libc.mallinfo2().hblkhd - before >= nbytes
    libc.free(ctypes.c_void_p(ptr))
    return grew


def test_tune_malloc_undoes_dasks_trim_threshold_in_a_fresh_process():
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in every worker, which makes glibc mmap
    every allocation over 128 KiB (torch paid a page fault per large tensor: 1.65x the CPU
    per image, benchmarks/bench_scaling.py). A fresh interpreter with that variable mmaps a
    1 MiB block; after tune_malloc it takes it from the heap, and 64 MiB is still mmapped."""
    code = ("import sys; sys.path.insert(0, 'tests'); from test_fanout import _mmapped; "
            "from actstore.runtime import tune_malloc; "
            "print(_mmapped(), tune_malloc(), _mmapped(), _mmapped(64 << 20))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "False", "True"]


def test_only_a_closing_workers_heartbeat_race_is_kept_off_the_console():
    """The race Dask logs as an error while a local worker closes after a successful run
    (a traceback on a --quiet command's stderr) is dropped; from a running worker, or any
    other message from a closing one, it stays."""
    import logging

    from actstore.cluster import closing_race

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg,
                                 None, None)

    race = record("Failed to communicate with scheduler during heartbeat.")
    assert closing_race(race, "closing") and closing_race(race, "closed")
    assert not closing_race(race, "running")
    assert closing_race(record("Scheduler was unaware of this worker; shutting down."),
                        "closing")
    assert not closing_race(record("Compute Failed"), "closing")


def test_the_wait_looks_at_its_marks_while_tasks_keep_finishing():
    """``finished``'s ``on_wait`` (a label run's look at its marks) must run even when no
    quarter second passes without a task finishing (many workers, small groups): before,
    it ran only in such a silence, so a pass of quick tasks never looked. Real futures of
    a one-thread pool, one finishing every 50 ms."""
    from concurrent.futures import ThreadPoolExecutor

    from flows.fanout import finished

    looks = []
    with ThreadPoolExecutor(1) as pool:
        futures = [pool.submit(time.sleep, 0.05) for _ in range(20)]
        done = list(finished(futures, on_wait=lambda: looks.append(time.monotonic())))
    assert sorted(map(id, done)) == sorted(map(id, futures))
    assert len(looks) >= len(futures)
