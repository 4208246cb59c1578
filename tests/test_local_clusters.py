"""The local Dask clusters the commands start for themselves (``--workers N``, and the
threads of an in-process run) open no fixed port: two commands at once on one machine,
or a user's own dashboard on distributed's default 8787, must not meet."""

from __future__ import annotations

import socket
import warnings

import pytest

DASHBOARD_PORT = 8787   # distributed's default for a scheduler's HTTP server


@pytest.fixture
def port_8787_taken():
    """8787 held, as by a user's dashboard or another command's cluster (if another test
    process holds it already, it is taken all the same)."""
    sock = socket.socket()
    try:
        sock.bind(("", DASHBOARD_PORT))
        sock.listen()
    except OSError:
        pass
    yield
    sock.close()


@pytest.mark.parametrize("start", ["workers", "in-process"])
def test_a_local_cluster_does_not_ask_for_the_dashboard_port(port_8787_taken, start):
    """Before, each asked for 8787 (``dashboard_address=None`` still starts the scheduler's
    HTTP server there) and the second got distributed's 'Port 8787 is already in use'
    warning, in a notebook's output or the suite's warnings."""
    from distributed import Client

    from actstore.cluster import dask_scheduler, local_workers

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if start == "workers":
            with local_workers(1) as address, Client(address) as client:
                assert client.submit(sum, [1, 2]).result() == 3
        else:
            with dask_scheduler(None) as client:
                assert client.submit(sum, [1, 2]).result() == 3
    said = [str(w.message) for w in seen if str(DASHBOARD_PORT) in str(w.message)]
    assert said == []


@pytest.mark.parametrize("signal_error", ["KeyboardInterrupt", "TerminationSignal"])
def test_a_signal_stops_local_workers_without_waiting_for_their_task(tmp_path, signal_error):
    """SIGTERM inside a Prefect flow arrives as Prefect's ``TerminationSignal`` (a
    BaseException, not a KeyboardInterrupt): local workers were then closed as after a
    finished run, waiting for the task each ran, and a backgrounded `materialize --workers
    2` took 13-17 s to stop on SIGTERM (2026-12-07). Any signal kills them at once."""
    import signal
    import time

    from distributed import Client
    from prefect.exceptions import TerminationSignal

    from actstore.cluster import local_workers

    started = tmp_path / "started"
    error = KeyboardInterrupt() if signal_error == "KeyboardInterrupt" \
        else TerminationSignal(signal.SIGTERM)

    def long_task(marker=str(started)):
        import pathlib
        import time as t
        pathlib.Path(marker).touch()
        t.sleep(120)

    with pytest.raises(type(error)):
        with local_workers(1) as address, Client(address) as client:
            client.submit(long_task, pure=False)
            while not started.exists():
                time.sleep(0.1)
            t0 = time.monotonic()
            raise error
    assert time.monotonic() - t0 < 30     # not the task's 120 s, nor the workers' 60 s grace


def test_what_a_library_made_of_a_signal_is_a_signal():
    """Checked on the error pydantic-core really makes of a TerminationSignal raised in its
    serialization, as Prefect's SIGTERM handler raised it in a run of `materialize`."""
    import asyncio
    import signal

    import pydantic
    from prefect.exceptions import TerminationSignal

    from actstore.runtime import stopped_by_signal

    for raised in (TerminationSignal(signal.SIGTERM), KeyboardInterrupt()):
        class Run(pydantic.BaseModel):
            x: int = 0

            @pydantic.field_serializer("x")
            def _x(self, value: int, raised=raised) -> int:
                raise raised

        with pytest.raises(Exception) as made:
            Run().model_dump_json()
        assert type(made.value).__name__ == "PydanticSerializationError"
        assert stopped_by_signal(made.value), made.value
    assert stopped_by_signal(KeyboardInterrupt()) and stopped_by_signal(TerminationSignal(15))
    try:
        try:
            raise TerminationSignal(15)
        except BaseException as exc:
            raise RuntimeError("a task failed") from exc
    except RuntimeError as chained:
        assert stopped_by_signal(chained)
    assert not stopped_by_signal(RuntimeError("a task failed"))
    assert not stopped_by_signal(ValueError("a bad value"))
    try:
        try:
            raise asyncio.CancelledError()
        except BaseException:
            raise OSError("a worker failed while its comm was cancelled")
    except OSError as failure:
        assert not stopped_by_signal(failure)
