"""Where Dask work runs: an existing cluster (``--scheduler ADDRESS``) or a local one."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from actstore.runtime import dask_threads


@contextmanager
def dask_scheduler(address: str | None = None):
    """Yield something ``dask.compute(scheduler=...)`` accepts.

    ``None`` starts a local in-process cluster (threads, so tasks share the zarr reader and
    nothing is serialized) with a thread per core (tasks use single-threaded BLAS);
    ``"threads"``/``"sync"`` use dask's plain schedulers (tests, debugging); anything else
    is a distributed scheduler address.
    """
    if address in ("threads", "sync", "synchronous"):
        yield address
        return
    from distributed import Client, LocalCluster

    if address:
        with Client(address) as client:
            yield client
        return
    with LocalCluster(processes=False, n_workers=1, threads_per_worker=dask_threads(),
                      dashboard_address=None, silence_logs=logging.WARNING) as cluster, \
            Client(cluster) as client:
        yield client
