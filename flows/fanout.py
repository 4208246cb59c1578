"""What every fan-out flow shares: where its tasks run, how they are retried, and how their
results come back.

Materialize regions, label block groups and intervention block groups all run as
concurrent Prefect task runs on Dask through prefect-dask's ``DaskTaskRunner``: on a local
cluster of ``--workers N`` processes or on the scheduler at ``--cluster ADDRESS``. A task
that fails is retried (it resumes from its recorded blocks) unless it failed on bad input,
which fails the same way every time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple

from prefect.futures import PrefectFuture

from actstore.cluster import local_workers, worker_note
from actstore.cluster_checks import ClusterChanged, WorkerWatch, check_scheduler
from actstore.errors import ActstoreError
from actstore.gpus import check_workers_device
from actstore.progress import Progress, RelayedBar
from actstore.worker_code import SAME_CODE_FIX, OtherWorkerCode, code_fingerprint
from flows.prefect_api import check_api, server_gone

if TYPE_CHECKING:
    from distributed import Client
    from prefect import Task
    from prefect.client.schemas.objects import State, TaskRun

REGION_RETRIES = 2
BOTH_SITES = ("--workers and --cluster: give one (--workers N starts a local cluster; "
              "--cluster ADDRESS uses a running one)")
# How often the command's main thread wakes while its tasks run. Python raises Ctrl-C's
# KeyboardInterrupt only when the main thread runs, and a lock wait with no timeout (as in
# prefect.futures.as_completed) was not always woken by the signal: under load, commands
# with --workers 2 kept waiting for 52-141 s, until a task ended (2026-12-05).
WAKE_SECONDS = 0.25


class BlocksFailed(ActstoreError):
    """Tasks failed for reasons a rerun may not meet again: keep their blocks to resume."""


def retry_unless_bad_input(task: Task, task_run: TaskRun, state: State) -> bool:
    """Bad input (NaN labels, a store made with other weights) comes out the same on every
    try; anything else (a lost worker, a storage error) may not."""
    try:
        state.result()
    except ActstoreError:
        return False
    except BaseException:  # noqa: BLE001 - a lost worker, a storage error: worth a retry
        return True
    return True


class Site(NamedTuple):
    """Where fan-out tasks go, as :func:`dask_address` yields it: the scheduler's address
    (None: this process), its worker count, whether tasks ask for a ``GPU`` resource, and
    the code their writing tasks must find where they run."""
    address: str | None
    workers: int
    gpu: bool
    code: tuple[str, ...] | None


@contextmanager
def dask_address(workers: int | None, cluster: str | None, device: str | None = "cpu",
                 site: Site | None = None) -> Iterator[Site]:
    """The scheduler tasks go to (None: run in this process), its worker count, whether to
    ask for GPUs, and the code its writing tasks must find where they run
    (:func:`actstore.worker_code.checks_code`): this process's on a user's cluster, None
    on a local one, whose workers this process started from its own files, each with a
    GPU of its own if ``device`` is one (:mod:`actstore.gpus`). A user's cluster is first
    asked whether each worker that may take the tasks has ``device``, before the command
    writes anything: a run planned on a worker with it (intervene, sweep) or begun here
    (label) met a worker without it only once that worker's block group started, after
    the run existed in the store. ``site``: one a caller
    holds open across several stages (the main job), yielded as it is, neither started
    nor closed here."""
    if site is not None:
        yield site
        return
    if workers and cluster:
        raise ActstoreError(BOTH_SITES)
    if cluster:
        info = check_scheduler(cluster)
        gpu = info["gpu_workers"] > 0
        check_workers_device(cluster, device, gpu)
        forget_prefect_events(cluster)      # what earlier commands left
        yield Site(cluster, info["workers"], gpu, code_fingerprint())
        forget_prefect_events(cluster, ending=True)
    elif workers:
        # a temporary Prefect API gone: the workers, stopping, would drain their events to it
        with local_workers(workers, device, abandoned=server_gone) as address:
            yield Site(address, workers, False, None)
    else:
        yield Site(None, 1, False, None)


def forget_prefect_events(address: str, ending: bool = False, timeout: float = 5.0) -> None:
    """Drop the Prefect events clients of the workers at ``address`` that send to another
    API than this command's (``ending``: to this command's too, if it is the temporary one
    that ends with it), queued events and all; a task then makes one for its own command's
    API. A worker process keeps one such client for its life, bound to the API of the
    first command whose task it ran (Prefect keys it by type alone), and each command's
    temporary API dies with it: every later command's events went to a dead API, 7 s and a
    3 KB log line each, and a worker told to stop drained that backlog for minutes
    (2026-12-06). A standing API (``PREFECT_API_URL``) keeps its client. Bounded: a
    scheduler that does not answer within ``timeout`` is left alone."""
    import threading

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    server = SubprocessASGIServer._instances.get(None)
    temporary = server is not None and server.running and server.api_url == api
    keep = None if ending and temporary else api

    def drop() -> None:
        from distributed import Client

        try:
            with Client(address, timeout=timeout) as client:
                client.run(drop_events_clients, keep)
        except Exception:  # noqa: BLE001 - a tidy-up: the command's outcome stands
            pass

    thread = threading.Thread(target=drop, daemon=True, name="actstore-prefect-events")
    thread.start()
    thread.join(3 * timeout)


def drop_events_clients(keep: str | None) -> int:
    """On a worker (or in a command whose temporary API died): stop its Prefect events
    clients not bound to the API ``keep``, their queues emptied first; how many events
    were dropped."""
    import sys

    events = sys.modules.get("prefect.events.worker")   # no task yet: nothing to drop
    return stop_services(
        service for service in (list(events.EventsWorker._instances.values()) if events else [])
        if keep is None or getattr(getattr(service, "_client", None), "_api_url", None) != keep)


def stop_services(services: Iterable[Any]) -> int:
    """Stop Prefect's queue services (events, run logs), what they hold dropped unsent;
    how many items were."""
    dropped = 0
    for service in services:
        while True:
            try:
                service._queue.get_nowait()
            except queue.Empty:
                break
            service._queue.task_done()
            dropped += 1
        service._stop()
    return dropped


def on_gpus(gpu: bool) -> AbstractContextManager[None]:
    """Tasks submitted inside ask for one ``GPU`` resource each, if workers offer it
    (``dask worker ADDRESS --nthreads 1 --resources GPU=1``): one task per device."""
    import dask

    return dask.annotate(resources={"GPU": 1}) if gpu else nullcontext()


def finished(futures: list[PrefectFuture], watch: WorkerWatch | None = None,
             on_wait: Callable[[], None] | None = None) -> Iterator[PrefectFuture]:
    """Each of Prefect's task futures as it finishes, waiting in slices of WAKE_SECONDS
    (:func:`prefect.futures.as_completed` waits without a timeout), so a Ctrl-C takes
    effect at once however long the running tasks take, a temporary Prefect server's end
    is said (:func:`flows.prefect_api.check_api`), ``watch`` sees whether the scheduler
    still has a worker able to run them, and ``on_wait`` (a label run's look at
    its marks, which this process holds, at its own pace) runs while they do, however
    often they finish."""
    ends: queue.SimpleQueue = queue.SimpleQueue()
    for future in futures:
        future.add_done_callback(ends.put)
    for _ in futures:
        while True:
            if on_wait is not None:     # also while tasks keep finishing: it keeps its own pace
                on_wait()
            try:
                future = ends.get(timeout=WAKE_SECONDS)
                break
            except queue.Empty:
                _look(watch)
        yield future


def _look(watch: WorkerWatch | None) -> None:
    """Between two slices of waiting for tasks: the tasks' temporary Prefect server gone
    is said at once, and ``watch`` looks at the workers."""
    check_api()
    if watch is not None:
        watch.check()


def fetch(future: PrefectFuture, watch: WorkerWatch | None) -> None:
    """Bring a finished task's final state here, in slices of WAKE_SECONDS while ``watch``
    looks at the workers. Until fetched it lives on the worker that ran the task: a worker
    lost in between makes Dask run the task again, and a plain ``wait()`` then waited for
    ever if no worker was left (a region recorded, its worker killed before the command
    had its result, 2026-12-05)."""
    while True:
        try:
            future.result(timeout=WAKE_SECONDS, raise_on_failure=False)
            return
        except TimeoutError:
            _look(watch)
        except Exception:  # noqa: BLE001 - cancelled, or Dask's own error: said by the caller
            return


class WorkersChanged(BlocksFailed):
    """No worker able to run the tasks for the grace period (every worker left, or every
    one offering the GPU resource the tasks ask for: Dask would keep them pending), or a
    worker running other code joined."""


def dask_client(futures: list) -> Client | None:
    """The Dask client Prefect's ``futures`` went through (None: not Dask's)."""
    return next((getattr(getattr(f, "wrapped_future", None), "client", None)
                 for f in futures), None)


@contextmanager
def relayed_bar(bar: Progress, futures: list, topic: str | None) -> Iterator[RelayedBar]:
    """``bar`` counting ``futures``' tasks as they relay their progress under ``topic``
    (:func:`actstore.progress.relayed`), else only as each ends; closed, with its topic's
    subscription, on leaving."""
    relayed = RelayedBar(bar, dask_client(futures) if topic else None, topic)
    try:
        yield relayed
    finally:
        relayed.close()
        bar.close()


def watch_workers(futures: list, store: str, what: str, gpu: bool) -> WorkerWatch | None:
    """A :class:`WorkerWatch` on the scheduler ``futures`` went to (None: not Dask's)."""
    client = dask_client(futures)
    if client is None:
        return None
    for name in ("distributed.client", "asyncio"):
        logging.getLogger(name).addFilter(_lost_result_noise)
    return WorkerWatch(client, store, what, resource="GPU" if gpu else None)


@contextmanager
def workers_changed() -> Iterator[None]:
    """:class:`ClusterChanged` as :class:`WorkersChanged`: the run's blocks stay to resume."""
    try:
        yield
    except ClusterChanged as exc:
        raise WorkersChanged(*exc.args) from None


class SchedulerLost(BlocksFailed):
    """The client lost the scheduler mid-run (a restart, a lost head node): distributed
    cancels every task future, whose Prefect task runs stay 'running' for ever."""


def check_scheduler_kept(future: PrefectFuture, store: str, what: str) -> None:
    """Raise :class:`SchedulerLost` if ``future``'s Dask task was dropped because this
    client lost its scheduler. Before, a scheduler killed mid-run ended the command with
    Prefect's 'unexpected UnfinishedRun: Run is in RUNNING state, its result is not
    available', exit 1, after a 40-line traceback of distributed's reconnect attempt
    (2026-12-05)."""
    wrapped = getattr(future, "wrapped_future", None)
    if getattr(wrapped, "status", None) != "cancelled":
        return
    try:
        wrapped.result(timeout=1)
        reason = "cancelled"
    except Exception as exc:  # noqa: BLE001 - FutureCancelledError, or what it says now
        reason = getattr(exc, "reason", None) or type(exc).__name__
    address = getattr(getattr(getattr(wrapped, "client", None), "scheduler", None), "address",
                      "") or "(unknown address)"
    # the client, closed while it still tries to reconnect, logs that cancelled attempt as
    # an error with its traceback: the command's one line says what happened
    logging.getLogger("distributed.client").addFilter(_not_cancelled)
    raise SchedulerLost(f"store {store}: lost the Dask scheduler {address} while its {what} "
                        f"ran ({reason}); what they recorded is kept: rerun the same command "
                        "once the scheduler answers to resume")


def _lost_result_noise(record: logging.LogRecord) -> bool:
    """False for what a result lost with its worker logs (Dask's 'Couldn't gather ...,
    rescheduling', then its abandoned fetch's AllExit when the client closes): the command
    says what became of the run in its own line (:func:`fetch`)."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (record.getMessage().startswith("Couldn't gather")
                or type(exc).__name__ == "AllExit")


def _not_cancelled(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def refused(error: BaseException | None, store: str, what: str) -> None:
    """Raise :class:`WorkersChanged` if ``error`` is a task's refusal to run on a worker
    with other code (:class:`OtherWorkerCode`): at once, not after the other tasks, which
    Dask would go on handing that worker; it wrote nothing, what the others recorded
    stays. Not a retry: the worker's code stays what it is."""
    if isinstance(error, OtherWorkerCode):
        raise WorkersChanged(
            f"store {store}: {error.args[0]}; it refused its task ({what}) before writing "
            f"anything; {SAME_CODE_FIX}; what the others recorded is kept: rerun "
            "the same command to resume")


def result_of(future: PrefectFuture, store: str, what: str, gpu: bool = False) -> Any:
    """One task future's result, waited for as :func:`finished` waits (``gpu``: the task
    asks for a GPU resource)."""
    watch = watch_workers([future], store, what, gpu)
    with workers_changed():
        for done in finished([future], watch):
            fetch(done, watch)
            check_scheduler_kept(done, store, what)
            if not done.state.is_completed():
                refused(done.state.result(raise_on_failure=False), store, what)
            return done.result()


def gather(futures: list, store: str, what: str,
           on_done: Callable[[dict], None] = lambda summary: None, *,
           gpu: bool = False, on_wait: Callable[[], None] | None = None) -> list[dict]:
    """Every task's result, in the order they finish (``on_done`` sees each: a progress
    bar; ``gpu``: the tasks ask for a GPU resource; ``on_wait``: see :func:`finished`).
    Bad input raises its own one-line error; other failures, one line saying how many of
    ``what`` failed and that rerunning resumes."""
    done, errors = [], []
    watch = watch_workers(futures, store, what, gpu)
    with workers_changed():
        for future in finished(futures, watch, on_wait):
            fetch(future, watch)
            check_scheduler_kept(future, store, what)
            if future.state.is_completed():
                done.append(future.result())
                on_done(done[-1])
            else:
                errors.append(future.state.result(raise_on_failure=False))
                refused(errors[-1], store, what)
    bad = [e for e in errors if isinstance(e, ActstoreError)]
    if bad:
        raise bad[0]
    if errors:
        on = worker_note(errors[0])
        raise BlocksFailed(f"store {store}: {len(errors)} of {len(futures)} {what} failed "
                           f"after {REGION_RETRIES} retries ({str(errors[0])[:200]}"
                           f"{' ' + on if on else ''}); rerun the same command to resume "
                           "from the recorded blocks")
    return done
