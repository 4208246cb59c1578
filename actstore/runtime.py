"""How many CPU threads actstore's numeric work uses (torch, BLAS, Dask), and how its
memory comes from the system (huge pages, glibc's malloc thresholds).

torch and BLAS: an explicit count, else $ACTSTORE_THREADS, else $OMP_NUM_THREADS, else one
core fewer than the machine has. Why not every core: OpenMP and OpenBLAS regions wait for
all their threads, so when any other process holds a core (a training run, a Prefect
server, a second worker) every op waits for a descheduled thread. Measured on 2 cores
beside one busy process: a toy UNet call took 9.1 s with 2 threads and 0.31 s with 1; a
small probe grid took 30.5 s with 2 BLAS threads and 3.4 s with 1.

Dask is the exception: its worker threads run independent tasks, each with single-threaded
BLAS (:func:`task_threads`), so nothing waits on a busy core and every core can work
(an explicit count or $ACTSTORE_THREADS still wins). Nesting a multi-threaded BLAS inside
many Dask threads would oversubscribe the machine cores × cores times.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

from actstore.errors import ActstoreError

# glibc's malloc thresholds for processes that run torch. Dask's nanny sets
# MALLOC_TRIM_THRESHOLD_=65536 in every worker, which switches off glibc's adaptive mmap
# threshold: every tensor over 128 KiB torch allocates becomes a fresh mmap whose pages fault
# in again, and a toy worker spent 1.65x the CPU per image of the same region run in process
# (19.6 vs 11.9 CPU-s for 16 images, 2026-12-04; bench_scaling.py: 1.56x the regions' speed).
# These fix the thresholds where glibc's adaptive mode ends up (mmap only above 32 MiB, keep
# up to 64 MiB free): 9.5-9.8 CPU-s in process against 10.1-10.4 with glibc's defaults. Set
# at run time (mallopt) by the process that loads a model, so workers started by hand with
# Dask's environment get them too.
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt's parameter numbers (malloc.h)
_TUNED: list[bool] = []


def env_threads() -> int | None:
    """$ACTSTORE_THREADS, else $OMP_NUM_THREADS's outermost level, as a thread count (None:
    neither set). OpenMP's nested form ('4,2') and a garbled ACTSTORE_THREADS failed as
    'unexpected ValueError: invalid literal for int()', exit 1, once a model loaded: ours
    is refused in one line naming it, OpenMP's read as OpenMP does (or left to it)."""
    own = os.environ.get("ACTSTORE_THREADS", "").strip()
    if own:
        if not own.isdigit() or int(own) < 1:
            raise ActstoreError(f"ACTSTORE_THREADS={own!r}: must be a whole number >= 1 (torch "
                                "CPU threads); set it so, or unset it for the default")
        return int(own)
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(omp) if omp.isdigit() and int(omp) >= 1 else None


def default_threads(threads: int | None = None) -> int:
    if threads is None:
        threads = env_threads() or (os.cpu_count() or 2) - 1
    return max(1, int(threads))


def configure_cpu_threads(threads: int | None = None) -> int:
    """Set torch's CPU thread count by the policy; returns it."""
    import torch

    torch.set_num_threads(default_threads(threads))
    return torch.get_num_threads()


def dask_threads(threads: int | None = None) -> int:
    """Worker threads for a local Dask cluster: every core unless told otherwise."""
    if threads is None and not os.environ.get("ACTSTORE_THREADS"):
        return os.cpu_count() or 1
    return default_threads(threads)


@contextmanager
def task_threads() -> Iterator[int]:
    """Single-threaded torch and BLAS while Dask runs many tasks side by side."""
    with numeric_threads(1) as n:
        yield n


@contextmanager
def numeric_threads(threads: int | None = None) -> Iterator[int]:
    """torch and BLAS limited to the policy's count for the duration (numpy-heavy work)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    n = configure_cpu_threads(threads)
    try:
        with threadpool_limits(n):
            yield n
    finally:
        torch.set_num_threads(before)


@contextmanager
def small_pages() -> Iterator[None]:
    """numpy's fresh arrays on ordinary 4 kB pages for the duration. numpy asks the kernel
    for transparent huge pages on arrays of 4 MB and more; where the kernel defragments on
    such a request (``defrag`` = madvise, as on the 2026-12-05 benchmark machine) a first
    touch may compact memory synchronously, and a probe run makes hundreds of block-sized
    temporaries (fold-ordered copies, token reshapes, upcasts) from two threads: a toy
    probe run's CPU time, threads scheduler, 4 rounds: depth 1.95-2.43 → 1.44-1.59 s,
    salient 4.36-4.74 → 4.04-4.17 s (benchmarks/README.md). A no-op where numpy has no
    such switch."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:   # pragma: no cover  (numpy without the switch)
        yield
        return
    before = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(before)


def tune_malloc() -> bool:
    """Set this process's malloc thresholds (see MALLOC_MMAP_THRESHOLD) once, before it loads
    a model; False where the C library has no ``mallopt`` (not glibc), which changes nothing
    but speed."""
    if not _TUNED:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            return False
        _TUNED.append(bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD))
                      and bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)))
    return _TUNED[0]


# What a signal raises, as a library's error names it once it has made one of it.
SIGNAL_ERRORS = ("KeyboardInterrupt", "TerminationSignal")


def stopped_by_signal(exc: BaseException) -> bool:
    """Whether ``exc`` is what became of a signal (Ctrl-C, SIGTERM) rather than a failure:
    a KeyboardInterrupt, Prefect's ``TerminationSignal`` (its flow engine's own SIGTERM
    handler raises it while a flow runs), or an error a library made of either. Other
    BaseExceptions (asyncio's CancelledError in a failure's context) are no signal.

    pydantic-core turned a TerminationSignal landing in its serialization into a
    ``PydanticSerializationError`` naming it in its text alone (no cause): a backgrounded
    `materialize --workers 2` then said 'unexpected error', exit 1, after waiting for its
    workers' tasks, in 1 of 5 SIGTERMs (2026-12-07). A KeyboardInterrupt becomes the same
    error there, naming KeyboardInterrupt."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in SIGNAL_ERRORS or isinstance(exc, KeyboardInterrupt) \
                or any(name in str(exc) for name in SIGNAL_ERRORS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
