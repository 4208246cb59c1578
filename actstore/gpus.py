"""One GPU per local worker process: ``--workers N --device cuda`` on a machine with
several GPUs.

Each worker process is started with its own ``CUDA_VISIBLE_DEVICES`` (one GPU), so its
``cuda`` (``cuda:0``) is a GPU no other worker uses. Before, every worker put its model
on the machine's ``cuda:0``: N workers shared one GPU while the others idled.

Why an environment variable set by the worker's nanny, as dask-cuda's ``LocalCUDACluster``
does, rather than that class itself: the variable is in the worker process from its birth,
before torch is imported or CUDA initialised (a preload setting it later would be too late
for anything imported before it); and ``LocalCUDACluster`` needs pynvml and real GPUs to
start, so its path could never run where there is no GPU, while this one is the same
``LocalCluster`` the CPU runs use, started with per-worker options: its tests start real
worker processes on any machine.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from actstore.errors import ActstoreError

if TYPE_CHECKING:
    from distributed import LocalCluster

VISIBLE = "CUDA_VISIBLE_DEVICES"


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out, as ``CUDA_VISIBLE_DEVICES`` entries (indices or
    UUIDs): the parent's ``CUDA_VISIBLE_DEVICES`` if set (the user's choice of GPUs, and
    how a deployment restricts a job to some), else every device torch counts.

    CUDA reads the list up to its first invalid entry (``-1`` hides every GPU); so do we.
    ``torch.cuda.device_count()`` counts devices without creating a CUDA context in this
    process (which holds no model: the workers do, in processes of their own)."""
    listed = os.environ.get(VISIBLE)
    if listed is None:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    gpus = []
    for entry in (e.strip() for e in listed.split(",")):
        if not entry or entry.startswith("-"):
            break
        gpus.append(entry)
    return gpus


def check_device(device: str | None, available: bool = True) -> str:
    """``device`` (None: auto) as every command takes it, or one line saying why not: a
    name that is none of cpu, cuda[:N], auto, or (``available``) CUDA absent, an index past
    the GPUs. The commands check it before any work, so a bad name is refused at once, not
    by a worker after a local cluster and a Prefect server have started (25 s on 4 cores,
    2026-12-06). Torch is asked only about a CUDA name, and only how many GPUs it sees (no
    CUDA context)."""
    device = str(device or "auto")
    if device in ("auto", "cpu"):
        return device
    if not re.fullmatch(r"cuda(:(0|[1-9]\d*))?", device):   # torch refuses cuda:01
        raise ActstoreError(f"--device {device!r} is not understood; use cpu, cuda[:N] or auto")
    if not available:
        return device
    import torch

    if not torch.cuda.is_available():
        raise ActstoreError(f"--device {device}: CUDA is not available on this machine; "
                            "use --device cpu or auto")
    count, index = torch.cuda.device_count(), _named_index(device)
    if index is not None and index >= count:
        raise ActstoreError(f"--device {device}: this machine has {count} CUDA device(s), "
                            f"cuda:0 to cuda:{count - 1}; use one of them or auto "
                            f"({VISIBLE} renumbers them)")
    return device


def wants_cuda(device: str | None) -> bool:
    """Whether ``device`` puts a model on a GPU: ``cuda[:N]``, or ``auto`` where torch
    sees one. Anything else (cpu, a name :func:`resolve_device` refuses) is left alone."""
    device = str(device or "auto")
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device == "cuda" or device.startswith("cuda:")


def _named_index(device: str | None) -> int | None:
    """N of ``cuda:N``; None for any other device name."""
    index = re.fullmatch(r"cuda:(\d+)", str(device))
    return int(index.group(1)) if index else None


def default_gpu_workers(device: str | None) -> int | None:
    """Local workers for ``device`` when it is a GPU (None otherwise): one per visible GPU,
    since each gets a GPU of its own (a second process on one GPU would hold a second
    model and share its cores); one for ``cuda:N``, N > 0, a GPU no local worker can be
    given (more would be refused for a ``--workers`` nobody gave)."""
    if not wants_cuda(device):
        return None
    return 1 if (_named_index(device) or 0) > 0 else max(1, len(visible_gpus()))


def worker_gpus(device: str | None, workers: int) -> list[str] | None:
    """The GPU of each of ``workers`` local worker processes for ``device``; None on the
    CPU (the workers' environment is then left as it is). One line, before any work, for
    what cannot be done:

    - ``cuda:N`` with N > 0: each worker sees its own GPU as ``cuda:0``, so the index
      names no GPU there; the user picks GPUs with ``CUDA_VISIBLE_DEVICES``.
    - more workers than GPUs: refused, not shared. Each worker holds its own copy of the
      model; two on one GPU double its memory (a mid-run out-of-memory at SD sizes) and
      take turns on its cores, which the command's "one GPU per worker" does not promise.
      Whoever wants that (a small model, CPU-bound writes) starts ``dask worker``
      processes by hand and passes ``--cluster``.
    - no GPU visible.
    """
    if not wants_cuda(device):
        return None
    index = _named_index(device)
    if index:
        raise ActstoreError(f"--device {device} with --workers {workers}: each worker gets "
                            "its own GPU, which it sees as cuda:0; use --device cuda (choose "
                            f"the GPUs with {VISIBLE}, e.g. {VISIBLE}={index},...)")
    gpus = visible_gpus()
    where = (f"{VISIBLE}={os.environ[VISIBLE]!r}" if VISIBLE in os.environ
             else f"torch counts {','.join(gpus) or 'none'}")
    if not gpus:
        raise ActstoreError(f"--device {device} with --workers {workers}: no GPU visible "
                            f"({where}); use --device cpu, or make the GPUs visible")
    if workers > len(gpus):
        raise ActstoreError(f"--workers {workers} --device {device}: {len(gpus)} GPU(s) "
                            f"visible ({where}) and each worker takes one; use --workers "
                            f"{len(gpus)} or fewer, or --device cpu")
    return gpus[:workers]


def start_gpu_workers(gpus: list[str], **options: Any) -> LocalCluster:
    """A started ``distributed.LocalCluster`` of one worker process per entry of ``gpus``,
    each with ``CUDA_VISIBLE_DEVICES`` set to it (on top of ``options["env"]``); the other
    ``options`` are LocalCluster's, as for a CPU run.

    dask-cuda's way: the cluster starts with no workers, then gets one spec per worker. The
    memory limit is what LocalCluster gives each of ``len(gpus)`` workers."""
    from distributed import LocalCluster

    env = dict(options.pop("env", None) or {})
    cluster = LocalCluster(n_workers=0, memory_limit=1 / len(gpus), env=env, **options)
    try:
        spec = cluster.new_spec
        for name, gpu in enumerate(gpus):
            cluster.worker_spec[name] = {
                "cls": spec["cls"], "options": {**spec["options"], "env": {**env, VISIBLE: gpu}}}
        cluster.sync(cluster._correct_state)
    except BaseException:
        cluster.close()
        raise
    return cluster


def check_workers_device(address: str, device: str | None, gpu: bool,
                         timeout: float = 30.0) -> None:
    """``device`` where a user's cluster at ``address`` loads the model: on each worker
    that may take the command's tasks (those offering the ``GPU`` resource if ``gpu``),
    before the command writes anything. With ``--cluster`` the command's own machine is
    asked only the name (it may have no GPU, its workers do); a command that begins its
    run in the store itself (``label``), or on the one worker that plans it (``intervene``,
    ``sweep``), met a worker lacking the device only when that worker loaded its model,
    after the run existed. One line naming the first such worker."""
    if str(device or "auto") in ("auto", "cpu"):
        return
    from distributed import Client

    from actstore.cluster import ON_WORKER

    with Client(address, timeout=timeout) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        able = [w for w, info in workers.items()
                if not gpu or (info.get("resources") or {}).get("GPU", 0) > 0]
        said = client.run(device_refusal, device, workers=able, on_error="return")
    for worker, refusal in sorted(said.items()):
        if isinstance(refusal, tuple):
            raise ActstoreError(f"{refusal[0]} ({ON_WORKER}{worker} ({refusal[1]}))")


def device_refusal(device: str) -> tuple[str, str] | None:
    """On a worker: why it cannot put a model on ``device``, and which process it is
    (host:pid); None if it can."""
    from actstore.cluster import worker_id

    try:
        check_device(device)
    except ActstoreError as exc:
        return str(exc), worker_id()
    return None
