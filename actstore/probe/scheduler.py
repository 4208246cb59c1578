"""The probe grid on the Dask scheduler its caller hands over (``--scheduler ADDRESS``, a
``distributed.Client`` in Python, or one of dask's local schedulers): on a user's cluster
its workers' code is checked before any task and by each task, and its ``dask.compute`` is
watched (:class:`actstore.cluster_checks.WorkerWatch`), so tasks no worker can run end in
one line instead of waiting for ever."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, TypeAlias

from actstore.cluster import ON_WORKER, worker_note
from actstore.cluster_checks import WorkerWatch, check_worker_code, scheduler_address
from actstore.errors import first_line
from actstore.worker_code import SAME_CODE_FIX, OtherWorkerCode, code_fingerprint

if TYPE_CHECKING:
    from distributed import Client

WAKE_SECONDS = 0.25         # how often a waiting probe grid looks at its futures
# what dask.compute(scheduler=...) takes here: None (its default), a Client, "threads"...
Scheduler: TypeAlias = "Client | str | None"


def compute(*graphs: Any, scheduler: Scheduler = None, store: str = "",
            what: str = "probe tasks") -> tuple:
    """``dask.compute(*graphs, scheduler=scheduler)``, watched on a distributed scheduler:
    tasks no worker can run end in :class:`~actstore.cluster_checks.NoAbleWorker` after the
    grace period (and are cancelled) instead of waiting for ever."""
    import dask

    if not _is_client(scheduler):
        return dask.compute(*graphs, scheduler=scheduler)
    watch = WorkerWatch(scheduler, store, what, kept="nothing of this run was kept",
                        rerun="rerun it")
    watch.check()         # its clock starts before a worker can take a task and leave
    futures = scheduler.compute(list(graphs))
    try:
        while not all(f.done() for f in futures):
            if any(f.status == "error" for f in futures):
                break
            time.sleep(WAKE_SECONDS)
            watch.check()
        return tuple(_gathered(scheduler, futures, watch))
    except BaseException as exc:
        scheduler.cancel(futures)
        said = _other_code(exc)
        if said is None:
            raise
        raise OtherWorkerCode(
            f"store {store}: {said}; it refused one of the {what} before computing "
            f"anything; {SAME_CODE_FIX}; nothing of this run was kept") from None


def _gathered(client, futures: list, watch: WorkerWatch) -> list:
    """``client.gather(futures)`` in a thread while ``watch`` looks at the workers: done
    futures' results still live on their workers, and one lost before its result came here
    makes Dask run the task again, which with no worker left waited for ever. Not in slices
    of a timeout: each would restart a transfer longer than the slice."""
    out: dict = {}

    def gather() -> None:
        try:
            out["results"] = client.gather(futures)
        except BaseException as exc:  # noqa: BLE001 - raised by the caller, in its thread
            out["error"] = exc
    thread = threading.Thread(target=gather, daemon=True, name="actstore-gather")
    thread.start()
    while thread.is_alive():
        thread.join(WAKE_SECONDS)
        if thread.is_alive():
            watch.check()          # raising, the caller cancels the futures: gather ends
    if "error" in out:
        raise out["error"]
    return out["results"]


OLDER_CODE = "unexpected keyword argument 'code'"


def _other_code(exc: BaseException) -> str | None:
    """What a task's failure says of its worker's code: its refusal
    (:class:`OtherWorkerCode`), or the TypeError of a worker whose actstore predates the
    check (its grid functions take no ``code``), which is no bug to retry or report as a
    crash; None for any other failure."""
    if isinstance(exc, OtherWorkerCode):
        return exc.args[0]
    if not (isinstance(exc, TypeError) and OLDER_CODE in str(exc)):
        return None
    on = worker_note(exc)
    where = on[len(ON_WORKER):] if on else "(unknown address)"
    return (f"Dask worker {where} runs older actstore code than the command (its task took "
            f"no code fingerprint: {first_line(exc, 120)})")


def _is_client(scheduler) -> bool:
    """Is ``scheduler`` a distributed Client (not a dask local scheduler's name)? Without
    importing distributed where no one has."""
    import sys

    distributed = sys.modules.get("distributed")
    return distributed is not None and isinstance(scheduler, distributed.Client)


def _users_cluster(scheduler) -> bool:
    """Is ``scheduler`` a Client of a cluster whose workers may run other code? Not dask's
    local schedulers nor an in-process cluster: they run this process's code."""
    return _is_client(scheduler) and not scheduler_address(scheduler).startswith("inproc://")


def check_client_code(scheduler: Scheduler) -> None:
    """:func:`check_worker_code` for a distributed ``scheduler`` a caller handed over (the
    probe grid's ``--scheduler ADDRESS``, a Client in Python), if it is a user's cluster."""
    if _users_cluster(scheduler):
        check_worker_code(scheduler, f"dask scheduler {scheduler_address(scheduler)}")


def task_code(scheduler: Scheduler) -> tuple[str, ...] | None:
    """The code the probe grid's tasks must find on their workers
    (:func:`actstore.worker_code.checks_code`): this process's on a user's cluster, where a
    worker restarted at a checked address, or one that joined and took a task within the
    watch's second, may run other code; None elsewhere (nothing to check)."""
    return code_fingerprint() if _users_cluster(scheduler) else None
