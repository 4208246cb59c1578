"""What a command checks of a user's Dask cluster (``--cluster``/``--scheduler ADDRESS``):
that a scheduler answers with workers, and, while its tasks wait, that some worker can
still run them. Dask alone keeps tasks no worker can run pending for ever: a command whose
workers all left (or every worker offering the ``GPU`` resource its tasks ask for) waited
without end (2026-12-05)."""

from __future__ import annotations

import os
import threading
import time

from actstore.cluster import SCHEDULER_TIMEOUT
from actstore.errors import ActstoreError

# Seconds a command waits while its scheduler has no worker able to run its tasks before it
# gives up; ACTSTORE_WORKER_GRACE overrides it. Long enough for a worker restarted by hand
# or by a supervisor (a worker process imports torch and the model in 5-20 s), short enough
# that a user finds out within the minute that the cluster lost its workers.
WORKER_GRACE = 60.0
GRACE_ENV = "ACTSTORE_WORKER_GRACE"
WORKER_POLL_SECONDS = 1.0   # how often a waiting command asks its scheduler for its workers
WAKE_SECONDS = 0.25         # how often a waiting probe grid looks at its futures


class NoAbleWorker(ActstoreError):
    """The scheduler has had no worker able to run a command's tasks for the grace period."""


def worker_grace() -> float:
    """The grace period: $ACTSTORE_WORKER_GRACE seconds, else :data:`WORKER_GRACE`."""
    raw = os.environ.get(GRACE_ENV)
    if not raw:
        return WORKER_GRACE
    try:
        grace = float(raw)
    except ValueError:
        grace = -1.0
    if not grace >= 0:
        raise ActstoreError(f"{GRACE_ENV}={raw}: not a number of seconds; set it to how long "
                            "a command waits for a worker (default 60) or unset it")
    return grace


class WorkerWatch:
    """Notices that a client's scheduler has had no worker able to run its tasks (none at
    all, or none offering ``resource``) for :func:`worker_grace` seconds; a worker back in
    time resets the clock. :meth:`check` is cheap between polls: call it at every wake-up."""

    def __init__(self, client, store: str, what: str, *, resource: str | None = None,
                 kept: str = "what they recorded is kept: rerun the same command once "
                             "workers are back to resume"):
        self.client, self.store, self.what, self.resource, self.kept = (
            client, store, what, resource, kept)
        self.grace = worker_grace()
        self.since: float | None = None     # when the scheduler was first seen without one
        self.next_poll = 0.0

    def able_workers(self) -> int | None:
        """Workers that can run the tasks now; None if the scheduler cannot say (lost:
        the futures' cancellation reports that)."""
        if getattr(self.client, "status", None) != "running":
            return None
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        except Exception:  # noqa: BLE001 - a scheduler going away: not this check's to say
            return None
        return sum(1 for w in workers
                   if not self.resource or (w.get("resources") or {}).get(self.resource, 0) > 0)

    def check(self) -> None:
        """Raise :class:`NoAbleWorker` once the grace period has passed without a worker."""
        now = time.monotonic()
        if now < self.next_poll:
            return
        self.next_poll = now + WORKER_POLL_SECONDS
        able = self.able_workers()
        if able is None:
            return
        if able:
            self.since = None
            return
        if self.since is None:
            self.since = now
        if now - self.since >= self.grace:
            offering = f" offering the {self.resource} resource" if self.resource else ""
            address = getattr(getattr(self.client, "scheduler", None), "address", "?")
            raise NoAbleWorker(
                f"store {self.store}: the Dask scheduler {address} has had no worker"
                f"{offering} for {self.grace:g} s while its {self.what} waited; {self.kept} "
                f"(${GRACE_ENV} sets the wait)")


def compute(*graphs, scheduler=None, store: str = "", what: str = "probe tasks") -> tuple:
    """``dask.compute(*graphs, scheduler=scheduler)``, watched on a distributed scheduler:
    tasks no worker can run end in :class:`NoAbleWorker` after the grace period (and are
    cancelled) instead of waiting for ever."""
    import sys

    import dask

    distributed = sys.modules.get("distributed")
    if distributed is None or not isinstance(scheduler, distributed.Client):
        return dask.compute(*graphs, scheduler=scheduler)
    futures = scheduler.compute(list(graphs))
    watch = WorkerWatch(scheduler, store, what, kept="nothing of this run was kept: rerun "
                        "it once workers are back")
    try:
        while not all(f.done() for f in futures):
            if any(f.status == "error" for f in futures):
                break
            time.sleep(WAKE_SECONDS)
            watch.check()
        return tuple(scheduler.gather(futures))
    except BaseException:
        scheduler.cancel(futures)
        raise


def check_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT) -> dict:
    """Workers of the scheduler at ``address`` (count, and how many offer a GPU resource),
    or a one-line error within about ``2 × timeout`` seconds if no scheduler answers (a
    server of another kind can keep distributed's handshake waiting far longer, so the
    wait is bounded here, in a daemon thread that is abandoned if it hangs)."""
    hint = (f"start one with `dask scheduler` and its workers with `dask worker {address}`, "
            "or use --workers N for a local cluster")
    if "://" not in address and ":" not in address:
        raise ActstoreError(f"--cluster {address}: not a scheduler address; use "
                            "tcp://HOST:PORT (what `dask scheduler` prints)")
    answer: dict = {}

    def ask() -> None:
        from distributed import Client

        try:
            with Client(address, timeout=timeout) as client:
                try:
                    client.wait_for_workers(1, timeout=timeout)
                except TimeoutError:
                    answer["error"] = (f"the scheduler answers but has no workers after "
                                       f"{timeout:g} s")
                    return
                answer["workers"] = list(client.scheduler_info(n_workers=-1)["workers"].values())
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, it is not a scheduler
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            answer["error"] = f"no Dask scheduler answered ({why[:160]})"

    thread = threading.Thread(target=ask, daemon=True, name="actstore-check-scheduler")
    thread.start()
    thread.join(2 * timeout + 1)
    if "workers" not in answer:
        why = answer.get("error", f"no Dask scheduler answered within {2 * timeout + 1:g} s")
        raise ActstoreError(f"--cluster {address}: {why}; {hint}")
    workers = answer["workers"]
    return {"address": address, "workers": len(workers),
            "gpu_workers": sum(1 for w in workers if w.get("resources", {}).get("GPU"))}
