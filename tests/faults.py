"""A fault-injecting filesystem: the N-th write of a key pattern crashes, fails or kills.

``faulty:///abs/path`` is the local disk seen as an object store: every write is one whole
object (``pipe_file``), ``mv``/rename is refused outright (object stores have none, so a
code path that renames fails every test run on it), and a plan decides where writing
stops:

- ``crash``: the N-th matching write and every write or delete after it raise
  :class:`Crash`, so nothing past that point reaches storage, exactly as after kill -9,
  while the test process goes on (cleanup handlers run, but can change nothing);
- ``enospc``: the same with ``OSError(ENOSPC)``, a disk that filled up;
- ``kill``: the process SIGKILLs itself at that write (for runs in a subprocess; the plan
  comes from ``ACTSTORE_FAULT=mode:N:regex`` there, see :func:`main`);
- ``stop``: the process SIGSTOPs itself right after that write landed (a writer frozen
  between two writes, for a test to wake with SIGCONT); later writes go on as usual.

Writes are counted per pattern in :attr:`FaultyFileSystem.log`, so a test can first record
an uninterrupted run's write sequence and then stop a run at any chosen point of it.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "faulty"


class Crash(Exception):
    """Storage stopped accepting writes (the simulated kill point was passed)."""


@dataclass
class Plan:
    mode: str          # crash | enospc | kill
    n: int             # 1-based index among writes matching ``pattern``
    pattern: str = ".*"


class FaultyFileSystem(LocalFileSystem):
    protocol = PROTOCOL
    plan: Plan | None = None
    log: list[str] = []        # every write/delete key, in order
    stopped = False
    stopped_at: str | None = None   # the write the plan stopped at
    _freeze_after: str | None = None   # ``stop``: the write after which to freeze
    _seen = 0
    _lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        return super()._strip_protocol(path)

    @classmethod
    def reset(cls, plan: Plan | None = None) -> None:
        with cls._lock:
            cls.plan, cls.log, cls.stopped, cls._seen = plan, [], False, 0
            cls.stopped_at = cls._freeze_after = None

    def _write_point(self, path: str, what: str) -> None:
        cls = type(self)
        with cls._lock:
            cls.log.append(f"{what} {path}")
            if cls.stopped:
                raise self._error()
            plan = cls.plan
            if plan is None or not re.search(plan.pattern, path):
                return
            cls._seen += 1
            if cls._seen < plan.n or (plan.mode == "stop" and cls._seen > plan.n):
                return
            if plan.mode == "stop":
                cls._freeze_after = path
                return
            if plan.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            cls.stopped, cls.stopped_at = True, path
            raise self._error()

    def _error(self) -> Exception:
        mode = type(self).plan.mode if type(self).plan else "crash"
        if mode == "enospc":
            return OSError(errno.ENOSPC, "No space left on device (injected)")
        return Crash("storage stopped at the planned write")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "auto_mkdir": True})

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        self._write_point(path, "put")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:   # whole or (when the plan stops us) not at all
            f.write(value)
        if type(self)._freeze_after == path:
            type(self)._freeze_after = None
            os.kill(os.getpid(), signal.SIGSTOP)

    def open(self, path, mode="rb", **kwargs):
        if any(c in mode for c in "wax+"):
            self._write_point(self._strip_protocol(path), "open")
        return super().open(path, mode=mode, **kwargs)

    def rm_file(self, path):
        self._write_point(self._strip_protocol(path), "rm")
        return super().rm_file(path)

    def rm(self, path, recursive=False, maxdepth=None):
        for p in ([path] if isinstance(path, str) else path):
            self._write_point(self._strip_protocol(p), "rm")
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)

    def mv(self, *args, **kwargs):
        raise AssertionError("rename used on an object-store-like filesystem")

    rename = move = mv


def register() -> None:
    fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)


def url(path) -> str:
    return f"{PROTOCOL}://{os.path.abspath(path)}"


def main() -> None:
    """``python -m faults ARGS...``: the actstore CLI on a faulty filesystem, with the plan
    from ``ACTSTORE_FAULT`` (``mode:N:regex``)."""
    register()
    spec = os.environ.get("ACTSTORE_FAULT")
    if spec:
        mode, n, pattern = spec.split(":", 2)
        FaultyFileSystem.reset(Plan(mode, int(n), pattern))
    from flows.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
