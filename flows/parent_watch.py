"""Run a module as a child that dies with its parent, however the parent ends.

``python -m flows.parent_watch PARENT_PID MODULE ARGS...`` runs ``python -m MODULE ARGS...``
in this process after arranging that it stops when process PARENT_PID is gone: on Linux the
kernel sends SIGTERM the moment the parent dies (``PR_SET_PDEATHSIG``); everywhere, a
daemon thread notices that the parent changed and sends the same SIGTERM, then exits hard
after a grace period. A ``kill -9`` of the parent runs no cleanup code of its own, so this
is the only place a temporary server can learn that nobody needs it any more.

Imports nothing heavy: it is the first thing the child runs.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.5
GRACE_SECONDS = 5.0


def _kernel_notice() -> None:
    """Linux only; elsewhere (or without prctl) the watch thread does the job alone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)  # a server that ignores SIGTERM still goes
    os._exit(1)


def die_with(parent: int) -> None:
    """Stop this process when ``parent`` ends; exit now if it already has."""
    _kernel_notice()
    if os.getppid() != parent:  # the parent died before the notice was armed
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), daemon=True,
                     name="parent-watch").start()


def main(argv: list[str]) -> None:
    parent, module, *rest = argv
    die_with(int(parent))
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
