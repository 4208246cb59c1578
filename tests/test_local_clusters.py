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
