"""Where Dask work runs: an existing cluster (``--scheduler``/``--cluster ADDRESS``) or a
local one (threads for the probe grid, worker processes for materialize)."""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
from contextlib import contextmanager
from functools import wraps
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

from actstore.errors import ActstoreError, InputError, first_line
from actstore.runtime import dask_threads, env_threads, stopped_by_signal, tune_malloc

if TYPE_CHECKING:
    from distributed import Client, Worker

# Imported by each local worker as it starts (torch, diffusers, zarr: seconds each), all
# workers at once, instead of one after the other as their first regions arrive.
WORKER_PRELOAD = "actstore.generation.regions"
# Clusters a command starts itself: no dashboard, the scheduler's HTTP server (started even
# so) on a free loopback port, not 8787, which a user's dashboard or another command holds.
LOCAL_CLUSTER = dict(dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                     silence_logs=logging.WARNING)
SCHEDULER_TIMEOUT = 3.0  # seconds a scheduler (and then its first worker) has to answer
# Seconds a local worker process gets to exit once its cluster closes. Dask's nanny gives it
# 4 s, then kills it with a warning; a worker that has run torch and Prefect task runs took
# 2.6-5.8 s to exit on a loaded 2-core machine (2026-12-05).
WORKER_EXIT_TIMEOUT = 60.0
# After Ctrl-C: seconds a worker gets to stop before its nanny kills it (SIGKILL). It is in
# mid-task, and a task never ends that fast, so this is only a wait: at 2.5 s it was 2.1 s
# of every interrupted --workers 2 materialize (2026-12-05). Killing costs nothing: the
# store's block protocol survives kill -9, and a rerun redoes the unfinished blocks.
WORKER_INTERRUPT_TIMEOUT = 0.25
WORKER_GONE_TIMEOUT = 10.0   # then: seconds for the killed processes to be gone (a loaded machine)
T = TypeVar("T")
# Held while a task runs on this process's shared model: forward hooks (capture, edits)
# live on the one UNet, so two tasks on it at once would see each other's activations.
MODEL_LOCK = threading.RLock()
_CACHE_LOCK = threading.RLock()
_SHARED: dict[str, tuple[tuple, object]] = {}


def worker_id() -> str:
    """Which process did a task: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _current_worker():
    """The Dask worker this code runs on; None outside one (or distributed not imported)."""
    worker_module = sys.modules.get("distributed.worker")
    if worker_module is None:
        return None
    try:
        return worker_module.get_worker()
    except ValueError:      # not on a worker
        return None


def dask_worker_name() -> str | None:
    """The address and host:pid of the Dask worker this runs on; None outside one, or on
    the in-process cluster of a probe grid (the user's own process: nothing to name)."""
    worker = _current_worker()
    if worker is None or str(worker.address).startswith("inproc://"):
        return None
    return f"{worker.address} ({worker_id()})"


ON_WORKER = "on Dask worker "


def names_worker(fn: Callable[..., T]) -> Callable[..., T]:
    """A fan-out or probe-grid task whose one-line errors name the Dask worker that met
    them. A worker started elsewhere has its own environment (credentials, model files,
    folders): its "no credentials found" is false of the shell the user reads it in
    (2026-12-05, a ``--cluster`` materialize to S3 with the credentials in the submitting
    shell only), and so is its "Read-only file system" for a folder the shell can write.
    An :class:`ActstoreError` (one line, ours) says it in its message; any other exception
    gets a note (PEP 678 ``add_note``: its type, arguments and message stay as they were,
    so the retry rules and the command's reading of OS errors see the same exception),
    which :func:`worker_note` finds on the submitting side. An :class:`InputError` (what
    the user typed) is true of every process, so it names none."""
    @wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ActstoreError as exc:
            where = None if isinstance(exc, InputError) else dask_worker_name()
            if where and exc.args and f"({ON_WORKER}" not in str(exc.args[0]):
                exc.args = (f"{exc.args[0]} ({ON_WORKER}{where})", *exc.args[1:])
            raise
        except Exception as exc:
            where = dask_worker_name()
            if where and worker_note(exc) is None:
                try:
                    exc.add_note(f"{ON_WORKER}{where}")
                except TypeError:      # __notes__ made something else than a list
                    pass
            raise
    return run


def worker_note(exc: BaseException | None) -> str | None:
    """``on Dask worker ADDRESS (host:pid)`` if :func:`names_worker` noted it on ``exc`` or
    an exception it was raised from, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for note in getattr(exc, "__notes__", None) or ():
            if isinstance(note, str) and note.startswith(ON_WORKER):
                return note
        exc = exc.__cause__ or exc.__context__
    return None


def portable(location: str, *, named: bool = False) -> str:
    """``location`` as a worker process started in another folder finds it: a relative
    local path made absolute from this process's folder (a deployment's working directory,
    a user's shell), ``~`` expanded; URLs unchanged. With ``named`` (a model argument) a
    string that is no existing local path (``tiny-random``, a Hugging Face id) stays a name."""
    if "://" in location:
        return location
    path = os.path.expanduser(location)
    if named and not os.path.exists(path):
        return location
    return os.path.abspath(path)


def connect(address: str, timeout: float = SCHEDULER_TIMEOUT) -> Client:
    """A client of the scheduler at ``address``, or a one-line error naming it within
    seconds (distributed's default waits 30 s, then raises a traceback)."""
    from distributed import Client

    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ActstoreError(f"dask scheduler {address}: no answer within {timeout:g} s "
                            f"({first_line(exc)}); start it (`dask scheduler`) or fix "
                            "--scheduler") from None


@contextmanager
def dask_scheduler(address: str | None = None) -> Iterator[str | Client]:
    """Yield something ``dask.compute(scheduler=...)`` accepts.

    ``None`` starts a local in-process cluster (threads, so tasks share the zarr reader and
    nothing is serialized) with a thread per core (tasks use single-threaded BLAS);
    ``"threads"``/``"sync"`` use dask's plain schedulers (tests, debugging); anything else
    is a distributed scheduler address.
    """
    if address in ("threads", "sync", "synchronous"):
        yield address
        return
    from distributed import Client, LocalCluster

    if address:
        with connect(address) as client:
            yield client
        return
    with LocalCluster(processes=False, n_workers=1, threads_per_worker=dask_threads(),
                      **LOCAL_CLUSTER) as cluster, \
            Client(cluster) as client:
        yield client


def worker_threads(workers: int) -> int:
    """torch threads for each of ``workers`` processes sharing this machine's cores:
    $ACTSTORE_THREADS if set, else its share less one core for its writer thread
    (compression, x0 decoding), at least one; so the processes never wait on each other's
    descheduled OpenMP threads. A garbled $ACTSTORE_THREADS is refused in one line, as the
    commands refuse it (:func:`actstore.runtime.env_threads`), not a bare ``int()``."""
    if os.environ.get("ACTSTORE_THREADS", "").strip():
        return env_threads()
    return max(1, (os.cpu_count() or 1) // max(1, workers) - 1)


@contextmanager
def local_workers(workers: int, device: str | None = "cpu",
                  abandoned: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """A local cluster of ``workers`` processes, one task at a time each; yields its address.

    Processes, not threads: each holds its own model and runs the UNet with its own torch
    threads (:func:`worker_threads`) outside the others' GIL. On a GPU ``device``, each
    process gets a GPU of its own (:mod:`actstore.gpus`). Stopped at once on Ctrl-C or
    SIGTERM (:func:`actstore.runtime.stopped_by_signal`), or on an error once
    ``abandoned()`` (what they report to has ended: exiting, each drained its events to it,
    a failed send every 7 s, for its minute of grace)."""
    if workers < 1:
        raise ActstoreError(f"--workers {workers}: must be at least 1")
    from distributed import LocalCluster

    from actstore.gpus import start_gpu_workers, worker_gpus

    gpus = worker_gpus(device, workers)
    options = dict(threads_per_worker=1, processes=True, **LOCAL_CLUSTER,
                   env={"ACTSTORE_THREADS": str(worker_threads(workers))},
                   preload=[WORKER_PRELOAD, __name__])
    with (start_gpu_workers(gpus, **options) if gpus
          else LocalCluster(n_workers=workers, **options)) as cluster:
        try:
            yield cluster.scheduler_address
        except BaseException as exc:
            if stopped_by_signal(exc) or abandoned():
                _close_workers(cluster, interrupted=True)
            raise
        finally:
            _close_workers(cluster, interrupted=False)   # (closed ones return at once)


def dask_setup(worker: Worker) -> None:
    """Preload hook of :func:`local_workers`' processes: they ignore SIGINT. A terminal's
    Ctrl-C reaches every process of its group, and the command stops its local workers
    itself; interrupted on their own, each printed a KeyboardInterrupt traceback."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # closed with a task running (the command was interrupted): that task's cancellation
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)
    logging.getLogger("distributed.worker").addFilter(
        lambda record: not closing_race(record, worker.status.name))


# What a local worker logs when its last heartbeat crosses the scheduler's removal of it:
# Dask's own comment calls it "a common race condition when the scheduler calls
# remove_worker()". It printed a traceback after 1 in 4 successful `label --workers 2
# --quiet` runs at load 1.4-2.4 (2026-12-05), although nothing failed.
CLOSING_RACE = ("Failed to communicate with scheduler during heartbeat",
                "Scheduler was unaware of this worker")


def closing_race(record: logging.LogRecord, status: str) -> bool:
    """Whether ``record`` is the heartbeat race of a worker that is already closing
    (``status``: the worker's ``Status`` name); the same message from a running worker is a
    lost scheduler and stays on the console."""
    return status != "running" and record.getMessage().startswith(CLOSING_RACE)


def _close_workers(cluster, *, interrupted: bool) -> None:
    """Stop a local cluster's workers, each given WORKER_EXIT_TIMEOUT seconds to exit
    before its nanny kills it; ``interrupted`` (Ctrl-C): killed at once instead, without
    waiting for the task it runs (its completed blocks are stored), and without the nanny's
    warning about it; returns once every worker process is gone, so none outlives the
    command, even where the nanny gave up waiting for a killed one (a loaded machine)."""
    import asyncio

    timeout = WORKER_INTERRUPT_TIMEOUT if interrupted else WORKER_EXIT_TIMEOUT
    nannies = list(cluster.workers.values())
    procs = _worker_processes(nannies)
    if interrupted:
        logging.getLogger("distributed.nanny").setLevel(logging.ERROR)

    async def close_all() -> None:
        await asyncio.gather(*(w.close(timeout=timeout, reason="actstore-done")
                               for w in nannies), return_exceptions=interrupted)
    cluster.sync(close_all)
    if interrupted:
        _kill_and_wait(procs, WORKER_GONE_TIMEOUT)


def _worker_processes(nannies: list) -> list:
    """The worker processes (psutil handles, taken while they run, so a reused pid is never
    signalled) of a local cluster's nannies."""
    import psutil

    procs = []
    for nanny in nannies:
        pid = getattr(getattr(getattr(nanny, "process", None), "process", None), "pid", None)
        if pid:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
    return procs


def _kill_and_wait(procs: list, timeout: float) -> None:
    """SIGKILL whichever of ``procs`` still runs and wait up to ``timeout`` seconds until
    none does (a zombie is gone: its nanny's watcher thread reaps it)."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return
        procs = alive
        time.sleep(0.05)


# A worker that lost its scheduler closes, and waits for its running task first: a region
# then ran to its end and recorded its blocks 30 s after its command had said the scheduler
# was lost (2026-12-05). Not "closing_gracefully": a retired worker's task may still count.
CLOSING = ("closing", "closed", "failed")


class TaskCancelled(ActstoreError):
    """A Dask task whose scheduler let it go (its command was interrupted) stops."""


def stop_if_cancelled() -> None:
    """Raise :class:`TaskCancelled` in a Dask task the scheduler no longer wants: the client
    that submitted it left (a Ctrl-C of a command with ``--cluster ADDRESS``). Distributed
    cannot stop a running task's thread, so without this a region went on generating and
    writing blocks on the user's cluster for its whole length after the command exited
    (33 s and 19 more files for tiny-random at 500 steps, 2026-12-05), and a label group
    labelled and recorded its blocks. A dictionary look-up: called at every denoising step
    (materialize, intervene) and before each block, label-model batch and target's arrays
    of a label group; outside a Dask task it returns at once."""
    worker_module = sys.modules.get("distributed.worker")
    key = getattr(getattr(worker_module, "thread_state", None), "key", None)
    worker = None if key is None else _current_worker()
    if worker is None:
        return
    task = worker.state.tasks.get(key)
    if task is not None and task.state == "cancelled":
        raise TaskCancelled(f"task {key}: cancelled by its scheduler (its command was "
                            "interrupted); its completed blocks are kept")
    if worker.status.name in CLOSING:
        raise TaskCancelled(f"task {key}: its worker {worker.address} is closing (it lost "
                            "its scheduler); its completed blocks are kept")


def default_workers(device: str) -> int:
    """Local worker processes that pay off for materialize: one per two cores on a CPU
    (each process keeps 1.5 cores busy, its UNet and its writer decoding x0 images: on 2
    idle cores 2 processes ran at 1.13x the images/s of 1 and the in-process run at 1.35x,
    bench_scaling.py, 2026-12-04); on GPUs :func:`actstore.gpus.default_gpu_workers`."""
    from actstore.gpus import default_gpu_workers

    gpu_workers = default_gpu_workers(device)
    return max(1, (os.cpu_count() or 1) // 2) if gpu_workers is None else gpu_workers


def shared(slot: str, key: tuple, load: Callable[[], T]) -> T:
    """This process's one object in ``slot`` (a model, a label model, a checked plan) for
    ``key``: loaded on first use and reused by every later task with the same key; a new
    key frees the old object before loading, so a worker never holds two models.

    What lets a Dask worker process load SD once and serve every region or block it gets."""
    with _CACHE_LOCK:
        held = _SHARED.get(slot)
        if held is None or held[0] != key:
            _SHARED.pop(slot, None)
            tune_malloc()
            _SHARED[slot] = (key, load())
        return _SHARED[slot][1]


def spread(items: list, workers: int, per_worker: int = 4) -> list[list]:
    """Contiguous groups of ``items`` (image blocks), about ``per_worker`` per worker: a slow
    or lost worker delays the run by a fraction of its share, and each task still covers
    several blocks."""
    size = max(1, math.ceil(len(items) / max(1, workers * per_worker)))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def local_dask(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` with its Dask computations (an xarray view's coordinates) in its own
    thread. Inside a Dask worker they would go to the cluster by default, and wait for a
    worker thread that may itself be waiting for this process's model: a deadlock."""
    @wraps(fn)
    def run(*args, **kwargs):
        import dask

        with dask.config.set(scheduler="synchronous"):
            return fn(*args, **kwargs)
    return run
