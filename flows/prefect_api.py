"""The Prefect API a command's flows report to, and how much of Prefect's logging shows.

Without a configured server (``PREFECT_API_URL``) Prefect starts a temporary one in a
subprocess and stops it at exit, but a ``kill -9`` of the command runs no exit code, so
every killed command left a uvicorn server behind. Here the command starts that temporary
server itself, from its main thread, through :mod:`flows.parent_watch`, so the server dies
with the command however the command ends, and stops it when its flows are done. It is
registered as Prefect's default temporary server, so Prefect's own code reuses it instead
of spawning an unguarded one. A configured ``PREFECT_API_URL`` is used as is.
"""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

import prefect
from prefect.logging.handlers import APILogHandler
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
                              get_current_settings, temporary_settings)

STARTUP_TIMEOUT = 120  # seconds; a loaded 2-core machine has needed 30+


class GuardedServer(SubprocessASGIServer):
    """Prefect's temporary server, started through a parent watch (same uvicorn command),
    in a session of its own: a terminal's Ctrl-C goes to the whole foreground process
    group, and a server stopped by it left the interrupted command retrying its last
    reports for minutes; this process stops it (or its parent watch does)."""

    def _run_uvicorn_command(self) -> subprocess.Popen:
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1",
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        return subprocess.Popen(
            [sys.executable, "-m", "flows.parent_watch", str(os.getpid()), "uvicorn",
             "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, start_new_session=True)


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Run the body against the configured API, else a guarded temporary server.

    The server is stopped when the body ends, after Prefect's log and event workers have
    sent what they hold. Yields the API URL."""
    configured = PREFECT_API_URL.value()
    if configured or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        yield configured
        return
    existing = SubprocessASGIServer._instances.get(None)
    if existing is not None and existing.running:   # this process already has one
        with temporary_settings(updates={PREFECT_API_URL: existing.api_url}):
            yield existing.api_url
        return
    SubprocessASGIServer._instances.pop(None, None)
    server = GuardedServer()    # registered under the default key: Prefect reuses it
    api_handlers = _handlers(APILogHandler)
    for h in api_handlers:
        h.addFilter(_while_server_up)
    try:
        server.start(timeout=STARTUP_TIMEOUT)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}) as settings:
            try:
                with _watched(server, settings):
                    yield server.api_url
            except Exception as exc:
                if isinstance(exc, PrefectApiLost):
                    raise
                if _ended(server):
                    raise PrefectApiLost(server.api_url) from exc
                raise
            finally:
                _forget() if _ended(server) else _drain()
    finally:
        server.stop()
        for h in api_handlers:
            h.removeFilter(_while_server_up)
        _unsilence()


WATCH_INTERVAL = 0.25   # seconds between looks at the temporary server's process


@contextmanager
def _watched(server: SubprocessASGIServer, settings) -> Iterator[None]:
    """While the body runs, a thread looks at the server process; once it has ended, the
    run's ``settings`` (what its requests read, in every thread) allow no more retries of
    a failed request, and what would say each failed send is silenced. Prefect's retries
    of a refused request (5, 62 s of back-off) said the loss a minute late (2026-12-06);
    a live server keeps them. The command's waits for its tasks look too
    (:func:`check_api`)."""
    done = threading.Event()

    def look() -> None:
        while not done.wait(WATCH_INTERVAL):
            if _ended(server):
                settings.client.max_retries = 0
                _silence()
                return
    thread = threading.Thread(target=look, daemon=True, name="actstore-prefect-watch")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def check_api() -> None:
    """Raise :class:`PrefectApiLost` if this process's temporary server has ended: called
    by a command's waits for its tasks, which ask the API nothing and would wait for a
    task's next report to fail (20-60 s with ``--workers 2``, its workers logging each
    failed send of their events meanwhile, 2026-12-07)."""
    if server_gone():
        raise PrefectApiLost(SubprocessASGIServer._instances[None].api_url)


class PrefectApiLost(Exception):
    """The temporary server a command started ended while its flows ran (killed, out of
    memory): said as such, with its URL (:func:`flows.cli_report.failure_line`). Before
    (2026-12-06) the command waited out Prefect's retries, then printed 'Connection
    refused; check the path and rerun', as if a file were missing, after a minute of
    Prefect's failed attempts to send it the run's events (now seconds:
    :func:`_watched`)."""

    def __init__(self, api: str):
        super().__init__(f"the Prefect API at {api} stopped answering during the run")
        self.api = api


def _ended(server: SubprocessASGIServer) -> bool:
    process = server.server_process
    return process is not None and process.poll() is not None


def server_gone() -> bool:
    """Whether the temporary server this process started has ended under it."""
    server = SubprocessASGIServer._instances.get(None)
    return isinstance(server, GuardedServer) and server.running and _ended(server)


# Who logs each failed send to a dead API: the events client (a warning, then an error
# with the whole event, 7 s apart, for every event queued) and Prefect's services.
SEND_LOGGERS = ("prefect.events.clients", "prefect._internal.concurrency", "EventsWorker",
                "APILogWorker")


def _while_server_up(record: logging.LogRecord) -> bool:
    """False once the temporary server is gone, what would say each failed send to it
    silenced from then on (:func:`_silence`)."""
    if not server_gone():
        return True
    _silence()
    return False


# What :func:`_silence` changed, as it was: process-wide settings, put back when the
# server's context ends (:func:`_unsilence`), or a library caller's later runs in the same
# process, against a live API, would fail to send in silence.
_BEFORE_SILENCE: dict[str, bool] = {}
# the server watcher's thread and a failed send's log filter may silence at once: the
# second must not take the first one's "disabled" for the state before
_SILENCE_LOCK = threading.Lock()


def _silence() -> None:
    """This process's API is gone, so what would say every failed send to it is off
    until its context ends, and again at exit (:func:`_unsilence`): the loggers of
    :data:`SEND_LOGGERS` and the failed sends of run logs Prefect prints unless
    ``logging.raiseExceptions`` is off (``APILogWorker._handle_batch``)."""
    with _SILENCE_LOCK:
        if not _BEFORE_SILENCE:
            _BEFORE_SILENCE.update({name: logging.getLogger(name).disabled
                                    for name in SEND_LOGGERS},
                                   raiseExceptions=logging.raiseExceptions)
        logging.raiseExceptions = False
        for name in SEND_LOGGERS:
            logging.getLogger(name).disabled = True


def _unsilence() -> None:
    """Put back what :func:`_silence` changed, if it did. A send in flight to the dead API
    still fails when Prefect drains its services at exit (an event 7 s later): silenced
    again then, by a hook that runs before those drains (threading's exit hooks run last
    registered first)."""
    with _SILENCE_LOCK:
        if _BEFORE_SILENCE:
            threading._register_atexit(_silence)   # noqa: SLF001 - Prefect's drains use it
            logging.raiseExceptions = _BEFORE_SILENCE.pop("raiseExceptions")
            for name, disabled in _BEFORE_SILENCE.items():
                logging.getLogger(name).disabled = disabled
            _BEFORE_SILENCE.clear()


def _handlers(kind: type) -> list[logging.Handler]:
    loggers = [logging.root, *logging.root.manager.loggerDict.values()]
    return [h for lg in loggers for h in getattr(lg, "handlers", []) if type(h) is kind]


def _forget() -> None:
    """Drop the run logs and events held for an API that is gone: sending them would wait
    7 s an event and log each failure."""
    from prefect.logging.handlers import APILogWorker

    from flows.fanout import drop_events_clients, stop_services

    _silence()
    drop_events_clients(None)
    stop_services(list(APILogWorker._instances.values()))


def _drain() -> None:
    """Send buffered run logs and events before the server goes (as Prefect's test
    harness does), so stopping it raises no connection errors."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:        # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


class _ConsoleFilter(logging.Filter):
    """Below ``level``: dropped. Flow and task failures: dropped unless ``debug``, because
    the command reports the error itself, in one line."""

    def __init__(self, level: int, debug: bool):
        super().__init__()
        self.level, self.debug = level, debug

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return False
        if record.name.startswith(SEND_LOGGERS) and not _while_server_up(record):
            return False    # the command says in one line that its API went
        run_log = record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))
        return self.debug or not (run_log and record.levelno >= logging.ERROR)


# Prefect's console handler in processes this one starts (local Dask workers): their task
# runs log to the stderr they inherit, past this process's filter. Prefect reads this
# override when a worker configures its logging.
WORKER_CONSOLE = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"


def worker_console_level(*, verbose: bool, debug: bool) -> str | None:
    """What a local worker prints: everything with ``verbose`` (None: Prefect's default),
    warnings and its tracebacks with ``debug``, else nothing, since this process reports
    any failure in one line and the run's logs are all in the Prefect UI."""
    return None if verbose else "WARNING" if debug else "CRITICAL"


@contextmanager
def console_logging(*, verbose: bool, debug: bool) -> Iterator[None]:
    """INFO lines (Prefect's run states, Dask's cluster chatter) only when ``verbose``.

    Filters the console handlers Prefect installs on the root logger, and sets the level
    of the workers' (:func:`worker_console_level`); the API handler, and so the run's logs
    in the Prefect UI, keep everything."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # `import prefect` is lazy: configure now, then filter
    filt = _ConsoleFilter(logging.DEBUG if verbose or debug else logging.WARNING, debug)
    handlers = [h for name in ("", "prefect", "prefect._internal")
                for h in logging.getLogger(name).handlers
                if isinstance(h, logging.StreamHandler)]
    for h in handlers:
        h.addFilter(filt)
    saved = os.environ.get(WORKER_CONSOLE)
    level = worker_console_level(verbose=verbose, debug=debug)
    if level is not None:
        os.environ[WORKER_CONSOLE] = level
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(filt)
        if saved is None:
            os.environ.pop(WORKER_CONSOLE, None)
        else:
            os.environ[WORKER_CONSOLE] = saved


@contextmanager
def flow_mode(*, verbose: bool, debug: bool) -> Iterator[None]:
    """A command's flows: Prefect's API, console logs cut to warnings unless ``verbose``."""
    with console_logging(verbose=verbose, debug=debug), prefect_api():
        yield
