"""An S3 API whose every request is counted: moto's server in a process of its own, each
request it answers logged with its response's size.

What an analyst pays on an object store is requests (each a round trip, tens of
milliseconds on a real one) and bytes, so the readers' bounds are checked by counting what a
real server received and sent, not by estimating from the code. The server runs in its own
process (in the caller's it would share the GIL), wraps moto's WSGI application to log one
line per request before sending the response (so a client never holds a response whose line
is not logged yet), and :meth:`CountedS3.counting` returns the requests between two points:
each point is a request of its own (a HEAD of a bucket that does not exist) that the count
waits to see in the log, so nothing is missed or counted twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import quote

SYNC = "actstore-count-sync-"


@dataclass
class Requests:
    """The requests one call made: ``(method, key, query, status, body bytes)`` in the
    order they were answered."""

    lines: list[tuple[str, str, str, int, int]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        """Bytes of the responses' bodies."""
        return sum(line[4] for line in self.lines)

    def __len__(self) -> int:
        return len(self.lines)

    def kinds(self) -> Counter:
        """LIST, GET (whole object), GET-range (status 206), HEAD, PUT, DELETE, ... counts."""
        return Counter(kind_of(*line[:4]) for line in self.lines)

    def keys(self, kind: str | None = None) -> list[str]:
        return [line[1] for line in self.lines if kind is None or kind_of(*line[:4]) == kind]

    def summary(self) -> str:
        return " ".join(f"{k} {n}" for k, n in sorted(self.kinds().items())) or "none"


def kind_of(method: str, key: str, query: str, status: int) -> str:
    if method == "GET" and ("list-type" in query or key.count("/") == 0):
        return "LIST"
    if method == "GET" and status == 206:
        return "GET-range"
    return method


class CountedS3:
    """A moto S3 server process and its request log."""

    def __init__(self, attach: str | None = None) -> None:
        """A new server, or (``attach``: another process's :attr:`address`) its counts."""
        self.proc = None
        if attach:
            self.endpoint, self.log_path = attach.split(" ")
        else:
            log = tempfile.NamedTemporaryFile(prefix="counted-s3-", suffix=".log", delete=False)
            log.close()
            self.proc = subprocess.Popen([sys.executable, __file__, log.name],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            port = int(self.proc.stdout.readline() or 0)
            self.endpoint, self.log_path = f"http://127.0.0.1:{port}", log.name
            if not port:
                raise RuntimeError("the counted S3 server did not start")
        self._read = os.path.getsize(self.log_path)

    @property
    def address(self) -> str:
        """What another process passes to ``CountedS3(attach=...)`` to count here too."""
        return f"{self.endpoint} {self.log_path}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing at this server (any key is accepted)."""
        return {"AWS_ACCESS_KEY_ID": "counted", "AWS_SECRET_ACCESS_KEY": "counted-secret",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def _sync(self) -> list[tuple[str, str, str, int, int]]:
        """Every request logged since the last sync (its own sync request excluded)."""
        import requests

        token = SYNC + uuid.uuid4().hex[:12]
        requests.head(f"{self.endpoint}/{token}", timeout=30)
        deadline = time.monotonic() + 30
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(self._read)
                text = f.read().decode("utf-8", "replace")
            end = text.find(f" {token} ")
            if end >= 0:
                end = text.index("\n", end) + 1
                self._read += len(text[:end].encode())
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the S3 server did not log its sync request in 30 s")
            time.sleep(0.01)
        out = []
        for line in text[:end].splitlines():
            method, path, query, status, size = line.split(" ")
            if not path.startswith(SYNC):
                out.append((method, path, query, int(status), int(size)))
        return out

    @contextmanager
    def counting(self):
        """``with server.counting() as reqs: ...``: reqs holds the block's requests after it."""
        self._sync()
        reqs = Requests()
        try:
            yield reqs
        finally:
            reqs.lines.extend(self._sync())

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.stdin.close()   # the server's signal to end
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log_path)


def _serve(log_path: str) -> None:
    """moto's application, each request logged (method, key, query, status, body bytes)
    before its response is sent; prints the port, serves until standard input closes."""
    import threading

    from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                               create_backend_app)
    from werkzeug.serving import make_server

    app, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()
    log = open(log_path, "a", encoding="utf-8")

    def counted(environ, start_response):
        status: list[str] = []

        def start(code, headers, exc_info=None):
            status.append(code.split(" ", 1)[0])
            return start_response(code, headers, exc_info)
        body = app(environ, start)
        try:
            parts = list(body)
        finally:
            getattr(body, "close", lambda: None)()
        query = "&".join(sorted(environ.get("QUERY_STRING", "").split("&"))) or "-"
        with lock:
            log.write(f"{environ['REQUEST_METHOD']} {quote(environ['PATH_INFO'].lstrip('/'))} "
                      f"{query.replace(' ', '%20')} {status[0]} {sum(map(len, parts))}\n")
            log.flush()
        return parts

    server = make_server("127.0.0.1", 0, counted, threaded=True,
                         request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    _serve(sys.argv[1])
