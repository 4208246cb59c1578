"""The code a Dask worker process runs, as a fingerprint a writing task compares with its
command's before it touches a store.

The command checks a user's workers before it submits (:mod:`actstore.cluster_checks`) and
each one that joins while it waits, but the scheduler hands a joining worker a queued task
the moment it registers, before any check from outside can ask it (within the watch's
second, a region can start and write), and a worker killed and restarted at the same
address with other code looks like the one checked. A precondition run by the task itself,
on the worker, has neither gap: whatever worker a task lands on, it compares its own
process's code with the command's before it writes a byte."""

from __future__ import annotations

import functools
import hashlib
import inspect
from pathlib import Path
from typing import Callable, Optional, TypeVar

from actstore.cluster import dask_worker_name
from actstore.errors import ActstoreError

# Packages whose versions decide the bytes a worker stores: the activations (torch, diffusers,
# transformers' text encoder), their encoding (numpy, zarr, numcodecs), the probe statistics
# (scipy's BLAS), and actstore itself (whose version string stays 0.1.0 from commit to commit:
# its source is compared too, see source_digest).
CODE_PACKAGES = ("actstore", "numpy", "scipy", "torch", "diffusers", "transformers", "zarr",
                 "numcodecs")
# What a refusal of a worker with other code tells the user to do, in every such line.
SAME_CODE_FIX = ("every worker must run this process's actstore and libraries, which decide "
                 "what is stored: stop it, or start it from the same checkout and environment")
SOURCE = "actstore-source"      # the fingerprint's entry for source_digest
T = TypeVar("T")


@functools.cache
def source_digest() -> tuple[str, str]:
    """sha256 of the actstore and flows packages this process runs (each ``.py`` file's
    package-relative path and its bytes, in path order) and the folders they come from;
    once per process (106 files: 3 ms). Both: the tasks a worker runs are defined in
    ``flows`` and call ``actstore``, so a checkout with either changed may write a store
    differently. The source, not a version or a commit id: the version string is the same
    for every commit, and a worker's copy (an older checkout, a copy on its PYTHONPATH, an
    installed wheel) has no git history to ask; package data (the catalog schema),
    bytecode, and hidden or editor files (a notebook's ``.ipynb_checkpoints``, an editor's
    ``.#name.py`` lock) decide nothing a store holds. ``flows`` is the folder beside
    ``actstore`` (a checkout and a wheel install both put it there), not whatever ``flows``
    the import path finds first: a notebook's working folder often holds a project's own
    ``flows`` package, which would refuse every worker of a cluster with the same code."""
    folders = [Path(__file__).resolve().parent]
    if (folders[0].parent / "flows" / "__init__.py").is_file():
        folders.append(folders[0].parent / "flows")
    digest = hashlib.sha256()
    for root in folders:
        for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
            relative = path.relative_to(root)
            if any(part.startswith(".") for part in relative.parts) or not path.is_file():
                continue
            data = path.read_bytes()
            name = f"{root.name}/{relative.as_posix()}"
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest(), ", ".join(str(root) for root in folders)


@functools.cache
def code_fingerprint() -> tuple[str, ...]:
    """This process's code as ``name==version`` strings: each of :data:`CODE_PACKAGES` as
    its installed-package record says (what distributed's ``get_versions`` reports, which
    the start-up check compares) and the source digest of actstore and flows. Plain
    strings: a task's argument survives any serialization Prefect or Dask gives it.
    Computed once per process; a task then compares about 200 bytes."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    return (f"{SOURCE}=={source_digest()[0]}",
            *(f"{name}=={installed(name)}" for name in CODE_PACKAGES))


class OtherWorkerCode(ActstoreError):
    """A task landed on a worker whose code is not its command's and refused to run."""


def require_same_code(expected: Optional[tuple[str, ...]]) -> None:
    """Raise :class:`OtherWorkerCode` naming this worker, the package and both versions if
    this process's :func:`code_fingerprint` is not ``expected`` (the command's); ``None``:
    no check (the command's own process, or a local cluster it started from its own
    files)."""
    if expected is None:
        return
    mine = code_fingerprint()
    if tuple(expected) == mine:
        return
    where = dask_worker_name() or "this process"
    for want, have in zip(expected, mine):
        if want == have:
            continue
        name, theirs = want.split("==", 1)
        ours = have.split("==", 1)[1]
        if name == SOURCE:
            raise OtherWorkerCode(
                f"Dask worker {where} runs other actstore code than the command (source "
                f"sha256 {ours[:12]} of {source_digest()[1]}; the command's {theirs[:12]})")
        raise OtherWorkerCode(f"Dask worker {where} has {name} {ours}, the command {theirs}")
    raise OtherWorkerCode(f"Dask worker {where} cannot compare its code with the command's "
                          f"({len(mine)} entries, the command {len(expected)})")


def checks_code(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` as a task that takes the command's fingerprint as keyword ``code`` and calls
    :func:`require_same_code` with it before anything else: every task that writes a
    store (materialize, label and intervene on a user's cluster) is refused on a worker
    with other code, whenever it joined. Its signature shows ``code``, so Prefect binds it
    like any other parameter."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, code: Optional[tuple[str, ...]] = None, **kwargs):
        require_same_code(code)
        return fn(*args, **kwargs)
    run.__signature__ = signature.replace(parameters=[
        *signature.parameters.values(),
        inspect.Parameter("code", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Optional[tuple[str, ...]])])
    return run
