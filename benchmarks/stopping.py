"""A benchmark stopped by SIGTERM (a batch scheduler's stop, ``timeout``, a closed session)
ends as a command does: at once, in one line, the results it printed so far standing.

Before, ``bench_scaling.py`` signalled with its process group while a flow ran printed
dozens of lines of Prefect client tracebacks: Prefect's engine turns SIGTERM into
TerminationSignal and reports the crash to its server, which the same signal had stopped
(httpx ConnectError, then 'Error logging to API' as its log worker drained at exit); and
signalled alone, it left Prefect's test-harness server running.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path


def run(main: Callable[[], None], name: str, scratch: list[Path]) -> None:
    """``main()`` in the commands' process settings, SIGTERM ending it in one line
    (``scratch``: folders to remove then)."""
    from flows.cli_env import quiet_libraries

    quiet_libraries()   # as a command: no note from the workers' semaphore tracker after
    stop = partial(_terminated, name, scratch)   # the last line, nor of Dask's busy port
    signal.signal(signal.SIGTERM, stop)
    try:
        main()
    except BaseException as exc:
        if _by_sigterm(exc):
            stop(signal.SIGTERM)
        raise


def _terminated(name: str, scratch: list[Path], signum: int, frame=None) -> None:
    """Exits at once (``os._exit``): a clean exit would drain Prefect's log and event
    workers into a server the same signal may have stopped. The commands' temporary
    server and Dask's workers end with this process."""
    print(f"{name}: stopped by signal {signum}; the results above are complete, the "
          "section in progress is not", file=sys.stderr, flush=True)
    for folder in scratch:
        shutil.rmtree(folder, ignore_errors=True)
    os._exit(128 + signum)


def _by_sigterm(exc: BaseException | None) -> bool:
    """Did this come from a SIGTERM? With the server gone, the crash report's ConnectError
    reaches here, the TerminationSignal in its context."""
    from prefect.exceptions import TerminationSignal

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TerminationSignal):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
