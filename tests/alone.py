"""Tests marked ``alone`` run while no other test runs, when the suite runs in parallel
processes (pytest-xdist, as `scripts/test.sh` runs it). What they assert is how soon
something happens (Ctrl-C taking effect within seconds, a progress bar moving while a
task runs, a refusal before any cluster starts): three processes' tests sharing 2 cores
stretched those past their limits (test_interrupt's Ctrl-C pressed again took 25 s against
15, 2026-12-06) while each passed on its own.

Every other test holds a shared lock from its set-up to its tear-down, so the module
fixtures it starts or ends count too; an ``alone`` test holds it exclusively, and keeps it
while the next test of its process is ``alone`` too, so a file of them waits for the
others once. A gate, taken before either, stops tests that would start while an ``alone``
test waits: without it the other processes' stream of shared locks could starve it."""

from __future__ import annotations

import fcntl
import os
import time
import warnings
from pathlib import Path
from typing import IO

import pytest

_lock: IO | None = None   # the lock file while this process holds the lock


def _lock_dir(config: pytest.Config) -> Path:
    """The parallel run's own temporary folder, which its processes share (each is given
    a folder in it as its ``--basetemp``) and pytest removes with old runs."""
    return Path(config.option.basetemp).parent


def _alone(item: pytest.Item | None) -> bool:
    return item is not None and item.get_closest_marker("alone") is not None


# A lock never freed (a process of a test left holding it) must not hang the suite: past
# this, a test runs without it, with a warning.
WAIT_LIMIT_S = 1200


def _flock(f: IO, mode: int) -> bool:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while True:
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                warnings.warn(f"tests/alone.py: waited {WAIT_LIMIT_S} s for {f.name}; "
                              "running without it", stacklevel=2)
                return False
            time.sleep(0.05)


def _take(config: pytest.Config, exclusive: bool) -> None:
    global _lock
    folder = _lock_dir(config)
    with open(folder / "gate", "a") as gate:
        _flock(gate, fcntl.LOCK_EX)
        rw = open(folder / "rw", "a")
        if not _flock(rw, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH):
            rw.close()
            return
    _lock = rw               # the gate was released as its file closed


def _release() -> None:
    global _lock
    if _lock is not None:
        _lock.close()    # closing the last descriptor releases the flock
        _lock = None


# A process forked during a test shares the lock's open file: it closes its descriptor
# (closing does not unlock the test's), or the lock would last as long as the child.
os.register_at_fork(after_in_child=_release)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield                        # one process: nothing runs beside a test
        return
    alone = _alone(item)
    if _lock is None:
        _take(item.config, exclusive=alone)
    try:
        yield
    finally:
        if not (alone and _alone(nextitem)):
            _release()
