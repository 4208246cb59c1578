"""Checks the command line makes before any work starts, each failing in one line.

Numbers are checked by argparse (``type=``) so ``--steps 0`` never reaches a store; URLs and
a ``--scheduler`` address are checked before a model is loaded or a flow starts, because
finding out after minutes of work (or a 30 s connect timeout) is the costly way.
"""

from __future__ import annotations

import argparse
import difflib
import re
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from actstore.errors import ActstoreError

if TYPE_CHECKING:
    from actstore.catalog import Catalog
    from actstore.generation.materialize import MaterializeSettings

SCHEDULER_TIMEOUT = 5.0  # seconds to open a TCP connection to --scheduler
LOCAL_SCHEDULERS = ("threads", "sync", "synchronous")
STORE_HELP = "store URI (a folder, s3://...) or catalog store name"  # what store_uri takes


def check_table_and_region(prompts: str, images: str | None, store: str | None = None,
                           block_size: int | None = None) -> None:
    """A bad prompt table, or an ``--images`` region that is malformed, outside it or (with
    ``store``) not aligned to its blocks, fails here, before a Prefect server, a worker or
    a model starts: with --workers 2 it was found by the planning task, after ~30 s of
    start-up, and named that worker (2026-12-05, 2026-12-06)."""
    from actstore.generation.materialize import check_store_location
    from actstore.generation.prompts import load_prompts

    check_store_location(store, load_prompts(prompts), block_size, images)


@contextmanager
def store_under_out(out: str) -> Iterator[None]:
    """The main job's store is under ``--out``: a store's refusal that says to use a new
    ``--store`` says so of ``--out``."""
    try:
        yield
    except ActstoreError as exc:
        said = re.sub(r"a new --store( path)?", f"a new --out (or remove {out} to start "
                      "again)", str(exc))
        if said == str(exc):
            raise
        raise ActstoreError(said) from exc


def check_url(uri: str, option: str) -> None:
    """A protocol fsspec does not know (or whose package is missing) fails here, by name."""
    import fsspec
    from fsspec.core import split_protocol

    protocol = split_protocol(str(uri))[0]
    if protocol is None or protocol in ("file", "local"):
        return
    try:
        with warnings.catch_warnings():   # e.g. fsspec's note on s3fs versions: not ours
            warnings.simplefilter("ignore")
            fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ActstoreError(f"{option} {uri}: unknown URL protocol '{protocol}://'; use a "
                            "local path or an fsspec URL (s3://, gs://, memory://, ...)"
                            ) from None
    except ImportError as exc:
        raise ActstoreError(f"{option} {uri}: protocol '{protocol}://' needs a package that "
                            f"is not installed ({' '.join(str(exc).split())[:160]})") from None


def check_scheduler(address: str | None, timeout: float = SCHEDULER_TIMEOUT) -> None:
    """Refuse an unreachable ``--scheduler`` within seconds (TCP/TLS addresses)."""
    if not address or address in LOCAL_SCHEDULERS:
        return
    meant = difflib.get_close_matches(address, LOCAL_SCHEDULERS, n=1, cutoff=0.8)
    if meant:   # a bare 'thread' was looked up as a host, and said to need a scheduler
        raise ActstoreError(f"--scheduler {address}: did you mean {meant[0]!r}? (a "
                            f"scheduler address is tcp://HOST:PORT; {', '.join(LOCAL_SCHEDULERS)}"
                            " run in this process)")
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme not in ("tcp", "tls"):
        return                      # inproc://, ucx://: distributed checks those itself
    try:
        host, port = parsed.hostname, parsed.port or 8786
    except ValueError:
        raise ActstoreError(f"--scheduler {address}: bad port; write tcp://HOST:PORT"
                            ) from None
    if not host:
        raise ActstoreError(f"--scheduler {address}: no host; write tcp://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ActstoreError(f"--scheduler {address}: no Dask scheduler reachable at "
                            f"{host}:{port} ({reason}); start one (`dask scheduler`) or "
                            "leave out --scheduler for a local cluster") from None


def store_uri(args: argparse.Namespace, catalog: Catalog | None) -> str:
    """``--store``: a catalog store name resolved to its URI, its protocol checked, and an
    object store's first request made (a wrong endpoint, option or bucket is said before
    a Prefect server starts: label's took 40 s to say it)."""
    from actstore.catalog import resolve_store
    from actstore.store.access import OBJECT_STORES
    from actstore.store.locations import location, protocol_of

    store = resolve_store(catalog, args.store)["uri"]
    check_url(store, "--store")
    if protocol_of(store) in OBJECT_STORES:
        location(store)
    return store


def check_fan_out(args: argparse.Namespace, what: str, device: str | None = None,
                  in_process: int = 0) -> None:
    """``--workers``/``--cluster`` need Prefect (``what`` runs as its task runs on Dask) and
    only one of them, an unreachable ``--cluster`` fails in one line within seconds, before
    a model loads, and ``--workers`` on ``device`` (the run's, defaults applied) that
    cannot give each worker its own GPU, before anything is written
    (:func:`actstore.gpus.worker_gpus`). ``in_process``: a ``--workers`` count the command
    runs in its own process, not on a cluster (the main job's 1)."""
    from flows.fanout import BOTH_SITES

    if args.no_prefect and (args.workers or args.cluster):
        raise ActstoreError(f"--workers/--cluster run {what} as Prefect task runs on Dask; "
                            "drop --no-prefect")
    if args.workers and args.cluster:
        raise ActstoreError(BOTH_SITES)
    if device is not None:   # on a user's cluster its workers' CUDA counts, not this machine's
        workers = None if args.workers == in_process else args.workers
        check_device(device, workers, here=not args.cluster)
    if args.cluster:
        from actstore.cluster_checks import check_scheduler as check_cluster

        check_cluster(args.cluster)


def check_device(device: str | None, workers: int | None, here: bool = True) -> None:
    """``--device`` and ``--workers`` local workers on it, before a cluster, a server or a
    store starts: a name no device has first, then what workers need of the GPUs (their
    count, named by CUDA_VISIBLE_DEVICES), then (``here``: the model loads on this machine
    or its local workers) whether this machine has the device. With ``--cluster`` the
    workers load it, so a client without CUDA may send work to GPU workers."""
    from actstore.gpus import check_device as check, worker_gpus

    check(device, available=False)
    if workers:
        worker_gpus(device, workers)
    if here:
        check(device)


# Options naming where a command draws its figures: (option, a PNG file rather than a folder)
FIGURE_OUTPUTS = {"grid": ("--grid", True), "figure": ("--figure", True),
                  "figures": ("--figures", False), "out": ("--out", False)}


# main's --out holds its store too: 'figures are written to a local path' (2026-12-07) hid
# that the job's store can go to an object store only through the standalone commands.
MAIN_OUT_LOCAL = ("the main job keeps its store, figures and report in a local folder; give "
                  "one, or put a store on an object store with the standalone commands "
                  "(actstore materialize --store s3://..., then label, probe, sweep)")


def check_figure_outputs(args: argparse.Namespace) -> None:
    """Every figure path the command was given, checked before any work (see
    :func:`actstore.plots.outputs.check_output`): figures are drawn last."""
    from actstore.plots.outputs import check_output

    for attr, (option, png) in FIGURE_OUTPUTS.items():
        value = getattr(args, attr, None)
        if value and args.command == "main" and attr == "out":
            check_output(value, option, png=png, local=MAIN_OUT_LOCAL)
        elif value:
            check_output(value, option, png=png)


def catalog_vae_source(name: str, store: str, settings: MaterializeSettings) -> None:
    """A catalog store's vae_source without the vae kind was refused in the words for an
    option ('... or drop --vae-source') to a user who gave none: say where it comes from."""
    from actstore.generation.capture_plan import plan_capture

    try:
        plan_capture(store, settings.control or "trained", settings.cap.kinds,
                     settings.cap.vae_source)
    except ActstoreError as exc:
        if not str(exc).startswith("--vae-source"):
            raise
        said = str(exc).split(": ", 1)[1].rsplit(" or drop --vae-source", 1)[0]
        raise ActstoreError(f"catalog store {name!r} sets vae_source "
                            f"{settings.cap.vae_source}: {said}, or remove its vae_source (or "
                            "pass --vae-source latent)") from None
