"""What a command checks of a user's Dask cluster (``--cluster``/``--scheduler ADDRESS``):
that a scheduler answers with workers, that they run this process's code, and, while its
tasks wait, that some worker can still run them. Dask alone keeps tasks no worker can run
pending for ever: a command whose workers all left (or every worker offering the ``GPU``
resource its tasks ask for) waited without end (2026-12-05)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from actstore.cluster import SCHEDULER_TIMEOUT
from actstore.errors import ActstoreError, first_line
from actstore.worker_code import CODE_PACKAGES, SAME_CODE_FIX, source_digest

if TYPE_CHECKING:
    from distributed import Client

# Seconds a command waits while its scheduler has no worker able to run its tasks before it
# gives up; ACTSTORE_WORKER_GRACE overrides it. Long enough for a worker restarted by hand
# or by a supervisor (a worker process imports torch and the model in 5-20 s), short enough
# that a user finds out within the minute that the cluster lost its workers.
WORKER_GRACE = 60.0
GRACE_ENV = "ACTSTORE_WORKER_GRACE"
CODE_CHECK_TIMEOUT = 30.0   # seconds the workers get to say which code they run
WORKER_POLL_SECONDS = 1.0   # how often a waiting command asks its scheduler for its workers


class ClusterChanged(ActstoreError):
    """A user's cluster changed under a running command so that it stops (what its tasks
    recorded stays, to resume)."""


class NoAbleWorker(ClusterChanged):
    """The scheduler has had no worker able to run a command's tasks for the grace period."""


class OtherCodeJoined(ClusterChanged):
    """A worker that runs other code than the command joined its scheduler mid-run."""


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
    time resets the clock. A worker that joins a user's cluster is checked as the ones at
    the start were (:func:`check_worker_code`): within about a second, so a task it took
    may have begun; a worker restarted at a checked address is another process, so it is
    checked too (:func:`_workers`). If the grace ends after workers left, the line says
    so: a worker handed a task its code cannot load leaves, and only its log says why.
    :meth:`check` is cheap between polls: call it at every wake-up."""

    def __init__(self, client, store: str, what: str, *, resource: str | None = None,
                 kept: str = "what they recorded is kept",
                 rerun: str = "rerun the same command to resume"):
        # kept: what a stopped run leaves; rerun: how to go on, once workers are back (no
        # worker) or once every worker runs this code (other code: no wait would help)
        self.client, self.store, self.what, self.resource, self.kept, self.rerun = (
            client, store, what, resource, kept, rerun)
        self.grace = worker_grace()
        self.since: float | None = None     # when the scheduler was first seen without one
        self.next_poll = 0.0
        self.since_clock: float | None = None  # the scheduler's clock at the first poll
        self.processes: dict[str, str] | None = None   # worker address: its process

    def able_workers(self) -> int | None:
        """Workers that can run the tasks now; None if the scheduler cannot say (lost:
        the futures' cancellation reports that)."""
        if getattr(self.client, "status", None) != "running":
            return None
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
            if self.processes is None or set(workers) != set(self.processes):
                # the first poll, or workers came or went (a restart takes seconds: its
                # absence is seen); not every poll, each is a line in the scheduler's log
                clock, self.processes = _workers(self.client)
                if self.since_clock is None:
                    self.since_clock = clock
            self._check_joined(self.processes)
        except ActstoreError:
            raise
        except Exception:  # noqa: BLE001 - a scheduler going away: not this check's to say
            return None
        return sum(1 for w in workers.values()
                   if not self.resource or (w.get("resources") or {}).get(self.resource, 0) > 0)

    def _check_joined(self, processes: dict[str, str]) -> None:
        """Only on a user's cluster, whose workers were checked at the start (a local
        cluster's workers are this process's own, from the same files)."""
        same = _SAME_CODE.get(scheduler_address(self.client))
        joined = set() if same is None else {
            address for address, process in processes.items() if process not in same}
        if not joined:
            return
        try:
            check_worker_code(self.client, f"store {self.store}, while its {self.what} ran",
                              joined,
                              fix=f"{SAME_CODE_FIX}; {self.kept}: {self.rerun}")
        except ActstoreError as exc:
            raise OtherCodeJoined(*exc.args) from None

    def check(self) -> None:
        """Raise :class:`NoAbleWorker` once the grace period has passed without a worker,
        :class:`OtherCodeJoined` if a worker with other code joined."""
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
                f"{offering} for {self.grace:g} s while its {self.what} waited"
                f"{self._left()}; {self.kept}: {self.rerun} once workers are back "
                f"(${GRACE_ENV} sets the wait)")

    def _left(self) -> str:
        """How many workers the scheduler removed since the first poll, from its event
        log (one that came and went between two polls counts too); '' if none or if it
        cannot say."""
        try:
            events = self.client.get_events("all")
        except Exception:  # noqa: BLE001 - the scheduler going away: the line says the rest
            return ""
        gone = [msg.get("worker") for at, msg in events
                if self.since_clock is not None and at >= self.since_clock
                and isinstance(msg, dict) and msg.get("action") == "remove-worker"]
        if not gone:
            return ""
        named = ", ".join(sorted({str(w) for w in gone})[:3])
        return (f", and {len(gone)} worker{'s' if len(gone) > 1 else ''} left it meanwhile "
                f"({named}): {'their logs say' if len(gone) > 1 else 'its log says'} why "
                "(killed, out of memory, or handed a task its actstore cannot load, as an "
                "older one)")


NOTHING_WRITTEN = f"{SAME_CODE_FIX}; nothing was written"


def check_worker_code(client: Client, where: str, workers: Collection[str] | None = None,
                      fix: str = NOTHING_WRITTEN) -> None:
    """Refuse a cluster with a worker that runs other code than this process: another
    version of a package in :data:`CODE_PACKAGES` or other actstore or flows source (a ``dask
    worker`` started from another checkout or environment may write a store differently).
    One line naming the worker, the package and both versions; ``where`` names the
    option (``--cluster ADDRESS``); ``workers``: these addresses only (default all).
    Distributed's own version report for the packages, and :func:`source_digest` run on
    each worker for the source of both packages."""
    versions = client.get_versions(packages=list(CODE_PACKAGES))
    here = versions["client"]["packages"]
    for address, info in sorted(versions["workers"].items()):
        if workers is not None and address not in workers:
            continue
        theirs = (info or {}).get("packages") or {}
        for package in CODE_PACKAGES:
            if theirs.get(package) != here.get(package):
                raise ActstoreError(
                    f"{where}: Dask worker {address} has {package} "
                    f"{theirs.get(package) or 'not installed'}, this process "
                    f"{here.get(package) or 'not installed'}; {fix}")
    processes = _workers(client)[1]
    mine, folder = source_digest()
    asked = None if workers is None else list(workers)
    def digest_or_failure():
        """source_digest on the worker, its failure returned, not raised: raised, an
        unreadable file of its actstore (an OSError) looked like a worker gone in the call
        and was skipped, never refused. Sent by value (a nested function), so a worker
        whose actstore lacks source_digest says so too."""
        try:
            from actstore.worker_code import source_digest as digest

            return digest()
        except Exception as exc:  # noqa: BLE001 - whatever it is, the refusal names it
            return "failed", f"{type(exc).__name__}: {exc}"
    digests = client.run(digest_or_failure, workers=asked, on_error="return")
    # an exception here is the call's (a worker that left since it was listed: checked
    # again if it comes back); the worker's own failure comes back as a value
    gone = {address for address, got in digests.items() if isinstance(got, BaseException)}
    for address, got in sorted(digests.items()):
        if address in gone:
            continue
        if got[0] == "failed":      # an actstore without source_digest, or unreadable
            theirs = f"an actstore that cannot say ({got[1]})"
        elif tuple(got)[0] != mine:
            theirs = f"source sha256 {got[0][:12]} of {got[1]}"
        else:
            continue
        raise ActstoreError(f"{where}: Dask worker {address} runs other actstore code than "
                            f"this process ({theirs}; here {mine[:12]} of {folder}); {fix}")
    _SAME_CODE.setdefault(scheduler_address(client), set()).update(
        processes[address] for address in set(digests) - gone if address in processes)


# Worker processes found to run this process's code, per scheduler address: each is checked
# once per process (at the start, then as it joins), not again by every later wait.
_SAME_CODE: dict[str, set[str]] = {}


def _workers(client) -> tuple[float | None, dict[str, str]]:
    """The scheduler's clock and, per worker address, the worker's process: the id each
    worker process draws at start (distributed's ``server_id``, a uuid, which
    ``scheduler_info`` leaves out), not its address: a worker killed and restarted at its
    address with other code looked like the one checked, and one lacking the class of a
    result it fetched retried the fetch while the command waited without end (2026-12-06).
    Asked of the scheduler by value (it need not have actstore; each call is a line in its
    log); if it cannot run it, addresses stand for processes and the clock is unknown."""
    def worker_processes(dask_scheduler):
        import time as clock

        return clock.time(), {address: str(ws.server_id)
                              for address, ws in dask_scheduler.workers.items()}
    try:
        return client.run_on_scheduler(worker_processes)
    except Exception:  # noqa: BLE001 - a scheduler refusing code from here: by address
        workers = client.scheduler_info(n_workers=-1)["workers"]
        return None, {address: address for address in workers}


def scheduler_address(client: Client) -> str:
    return str(getattr(getattr(client, "scheduler", None), "address", "") or "")


def check_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT) -> dict:
    """Workers of the scheduler at ``address`` (count, and how many offer a GPU resource),
    or a one-line error within about ``2 × timeout`` seconds if no scheduler answers (a
    server of another kind can keep distributed's handshake waiting far longer, so the
    wait is bounded here, in a daemon thread that is abandoned if it hangs), or if a
    worker runs other code (:func:`check_worker_code`, given CODE_CHECK_TIMEOUT more)."""
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
                try:
                    check_worker_code(client, f"--cluster {address}")
                    answer["code"] = None
                except ActstoreError as exc:
                    answer["code"] = exc
                except Exception as exc:  # noqa: BLE001 - a worker gone or not answering
                    answer["code"] = ActstoreError(
                        f"--cluster {address}: its workers did not say which code they run "
                        f"({first_line(exc, 160)}); rerun once they answer")
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, it is not a scheduler
            answer["error"] = f"no Dask scheduler answered ({first_line(exc, 160)})"

    thread = threading.Thread(target=ask, daemon=True, name="actstore-check-scheduler")
    thread.start()
    thread.join(2 * timeout + 1)
    if "workers" not in answer:
        why = answer.get("error", f"no Dask scheduler answered within {2 * timeout + 1:g} s")
        raise ActstoreError(f"--cluster {address}: {why}; {hint}")
    thread.join(CODE_CHECK_TIMEOUT)
    if "code" not in answer:
        raise ActstoreError(f"--cluster {address}: its workers did not say which code they "
                            f"run within {CODE_CHECK_TIMEOUT:g} s; rerun once they answer")
    if answer["code"] is not None:
        raise answer["code"]
    workers = answer["workers"]
    return {"address": address, "workers": len(workers),
            "gpu_workers": sum(1 for w in workers if w.get("resources", {}).get("GPU"))}
