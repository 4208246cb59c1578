"""Storage access for every store path: the one place that knows URLs, fsspec and zarr stores.

Every write here is one object written whole: zarr's LocalStore writes each key to a
temporary file and renames it, an object store's PUT replaces an object atomically. Nothing
relies on renaming a directory (object stores have none) or on a cached listing (a reader
must see blocks finished after it opened the store), so a key is either absent or whole,
on a laptop disk and on S3 alike. See ``docs/store-format.md`` for the commit protocol
built on these primitives.

Where a URI leads, and with which credentials, is :mod:`actstore.store.locations`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from actstore.store.locations import (  # noqa: F401 - the storage API's one import
    NO_LISTING_CACHE, Location, as_uri, canonical, location, protocol_of,
    set_protocol_options, set_storage_options)

if TYPE_CHECKING:
    import xarray as xr

META = "zarr.json"
NOT_FOUND = (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ArrayNotFoundError,
             zarr.errors.NodeTypeValidationError, KeyError)
def key(path: str, name: str = META) -> str:
    return f"{path.strip('/')}/{name}" if path.strip("/") else name


# -- a writer's right to write --------------------------------------------------------

_GUARD: ContextVar[Callable[[], None] | None] = ContextVar("actstore_write_guard",
                                                           default=None)


@contextmanager
def guarded(check: Callable[[], None]) -> Iterator[None]:
    """Run ``check`` before every write and removal this thread makes in the ``with``
    body (it raises to stop them): a creator calls it with the look at its claim, so no
    creation write, however the creation is written, lands once the claim is lost. Nested,
    the enclosing checks run too: a run adding several capture kinds holds a claim on
    each, and writes nothing once any of them is lost."""
    outer = _GUARD.get()
    token = _GUARD.set(check if outer is None else _both(outer, check))
    try:
        yield
    finally:
        _GUARD.reset(token)


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def check() -> None:
        first()
        second()
    return check


def guard() -> None:
    """The check of the enclosing :func:`guarded`, if any: for writes made through zarr
    (an array's chunks) rather than through this module."""
    check = _GUARD.get()
    if check is not None:
        check()


# -- raw keys -------------------------------------------------------------------------

def get_bytes(uri: str, k: str) -> bytes | None:
    try:
        buf = sync(location(uri).reader.get(k, prototype=default_buffer_prototype()))
    except FileNotFoundError:   # a local store whose folder does not exist
        return None
    return None if buf is None else buf.to_bytes()


def put_bytes(uri: str, k: str, data: bytes) -> None:
    """One object, written whole (the unit every commit in the store is made of)."""
    guard()
    buf = default_buffer_prototype().buffer.from_bytes(data)
    sync(location(uri).store.set(k, buf))


def exists(uri: str, k: str) -> bool:
    try:
        return bool(sync(location(uri).reader.exists(k)))
    except FileNotFoundError:
        return False


def list_dir(uri: str, path: str) -> list[str]:
    """Names directly under ``path`` (objects and prefixes), fresh from the store; the
    temporary files of local writes in flight (or killed) are not part of a store."""
    async def names() -> list[str]:
        return [n.rstrip("/") async for n in location(uri).reader.list_dir(path.strip("/"))
                if not n.endswith(".partial")]
    try:
        return sorted(set(sync(names())))
    except FileNotFoundError:
        return []


def list_keys(uri: str, path: str) -> list[str]:
    """Every key under ``path`` (relative to it), fresh from the store, in one recursive
    listing: one request per 1000 keys on an object store, where listing the folder and
    then asking for each entry's object costs a round trip per entry (a store's block
    records: hundreds). Temporary files of local writes are left out, as in
    :func:`list_dir`."""
    prefix = path.strip("/") + "/"
    loc = location(uri)
    if loc.protocol == "file":
        return _walk(loc.full(path.strip("/")))

    async def keys() -> list[str]:
        return [k[len(prefix):] async for k in loc.reader.list_prefix(prefix)
                if k.startswith(prefix) and not k.endswith(".partial")]
    try:
        return sorted(sync(keys()))
    except FileNotFoundError:
        return []


def _walk(top: str) -> list[str]:
    """:func:`list_keys` on a local disk by ``os.walk``, which passes over a folder removed
    while it walks (a kind's block records undone, a version collected): zarr's local
    listing (``Path.rglob``) raises then, and every key, committed ones too, would look
    absent."""
    keys = []
    for folder, _, files in os.walk(top):
        below = os.path.relpath(folder, top).replace(os.sep, "/")
        keys += [name if below == "." else f"{below}/{name}" for name in files
                 if not name.endswith(".partial")]
    return sorted(keys)


def delete(uri: str, k: str) -> None:
    """Delete one key (nothing there is fine)."""
    guard()
    try:
        sync(location(uri).store.delete(k))
    except FileNotFoundError:
        pass


def remove(uri: str, path: str) -> None:
    """Delete every key under ``path`` (nothing there is fine)."""
    guard()
    loc = location(uri)
    try:
        sync(loc.store.delete_dir(path.strip("/")))
    except FileNotFoundError:
        pass
    if loc.protocol == "file":   # a local disk keeps emptied folders: drop them too
        parts = path.strip("/").split("/")
        for i in range(len(parts) - 1, 0, -1):
            folder = os.path.join(loc.root, *parts[:i])
            try:
                os.rmdir(folder)
            except OSError:   # not empty (or gone): its ancestors are not empty either
                break


# A local write (zarr's LocalStore) goes to ``<key>.<uuid>.partial`` and is renamed over the
# key; a kill in between leaves the temporary file. One object is written in seconds, so a
# temporary file untouched for an hour belongs to a writer that is gone.
PARTIAL_STALE_S = 3600.0


def sweep_partials(uri: str, path: str = "", *, recursive: bool = True,
                   older_than: float = PARTIAL_STALE_S) -> int:
    """Remove the temporary files killed local writes left under ``path`` (in it alone
    unless ``recursive``); returns how many. Called by the next writer of a node (object
    stores have no such files)."""
    loc = location(uri)
    if loc.protocol != "file":
        return 0
    cutoff, removed = time.time() - older_than, 0
    walk = os.walk(os.path.join(loc.root, path.strip("/")))
    for folder, _, files in (walk if recursive else [next(walk, ("", [], []))]):
        for name in files:
            if name.endswith(".partial"):
                full = os.path.join(folder, name)
                try:
                    if os.stat(full).st_mtime < cutoff:
                        os.remove(full)
                        removed += 1
                except FileNotFoundError:   # its writer finished or another sweep won
                    pass
    return removed


def store_nonempty(uri: str) -> bool:
    loc = location(uri)
    try:
        if not loc.fs.exists(loc.root):
            return False
        return bool(loc.fs.ls(loc.root, detail=False))
    except FileNotFoundError:
        return False


# -- zarr nodes -----------------------------------------------------------------------

def get_json(uri: str, path: str) -> dict | None:
    """A node's ``zarr.json`` document, or None when absent (or not yet whole)."""
    data = get_bytes(uri, key(path))
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def nodes_attrs(uri: str, paths: list[str]) -> list[dict | None]:
    """:func:`node_attrs` of many nodes in one round of concurrent requests: a reader
    listing a store's probe runs, label commits or experiments waits for one round trip,
    not one per node (each is a request to an object store)."""
    reader = location(uri).reader

    async def one(path: str) -> dict | None:
        try:
            buf = await reader.get(key(path), prototype=default_buffer_prototype())
        except FileNotFoundError:
            return None
        try:
            return None if buf is None else dict(json.loads(buf.to_bytes()).get("attributes")
                                                 or {})
        except ValueError:   # not yet whole
            return None

    async def every() -> list[dict | None]:
        return list(await asyncio.gather(*(one(p) for p in paths)))
    return sync(every()) if paths else []


def marked_children(uri: str, folder: str, path_of: Callable[[str], str], marker: str,
                    read: Callable[[str, list[str]], list] | None = None) -> dict[str, dict]:
    """Entries of ``folder`` whose node (at ``path_of(name)``) carries ``marker`` in its
    attributes, by name: what exists once written whole, since every creation writes its
    marker last. One listing and one round of concurrent reads, however many entries;
    ``read`` (default :func:`nodes_attrs`) may add the store's root to that round
    (:func:`actstore.store.core.listed`)."""
    names = list_dir(uri, folder)
    attrs = (read or nodes_attrs)(uri, [path_of(n) for n in names])
    return {name: a for name, a in zip(names, attrs) if a and marker in a}


def node_attrs(uri: str, path: str) -> dict | None:
    """A node's attributes, or None if there is no node at ``path``."""
    doc = get_json(uri, path)
    return None if doc is None else dict(doc.get("attributes") or {})


def group_metadata(attrs: dict | None = None) -> bytes:
    """The bytes zarr itself writes for a group with ``attrs``."""
    mem = MemoryStore()
    zarr.create_group(store=mem, attributes=attrs or {}, zarr_format=3)
    return mem._store_dict[META].to_bytes()


def put_group(uri: str, path: str, attrs: dict | None = None) -> None:
    """Write a group's metadata (one object); with attributes it is a commit marker."""
    put_bytes(uri, key(path), group_metadata(attrs))


def array_metadata(**spec: Any) -> bytes:
    """The bytes zarr writes for an array created with ``spec`` (zarr.create_array's args)."""
    mem = MemoryStore()
    zarr.create_array(store=mem, zarr_format=3, **spec)
    return mem._store_dict[META].to_bytes()


def put_array(uri: str, path: str, **spec: Any) -> zarr.Array:
    """Write an array's metadata only, never its parents' (zarr would write parent groups
    concurrently, racing other writers' markers): parents are written by the caller, in
    the order the commit protocol needs. Rewriting identical metadata is harmless, so
    creation can be redone by a rerun or by several workers at once."""
    put_bytes(uri, key(path), array_metadata(**spec))
    return open_array(uri, path, mode="r+")


def _for(uri: str, mode: str) -> Store:
    loc = location(uri)
    return loc.reader if mode == "r" else loc.store


def open_array(uri: str, path: str, mode: str = "r") -> zarr.Array:
    return zarr.open_array(store=_for(uri, mode), path=path, mode=mode, zarr_format=3)


def open_group(uri: str, path: str = "", mode: str = "r") -> zarr.Group:
    return zarr.open_group(store=_for(uri, mode), path=path or None, mode=mode,
                           zarr_format=3)


def try_group(uri: str, path: str = "") -> zarr.Group | None:
    """The group at ``path``, or None if there is none (the not-found cases, written once)."""
    try:
        return open_group(uri, path)
    except NOT_FOUND:
        return None


def open_dataset(uri: str, path: str, **kwargs: Any) -> xr.Dataset:
    """``xr.open_zarr`` on the same store object (same options, no listing cache).

    A node's bookkeeping folders (``_claims``: on a local disk an emptied one stays) are
    not zarr nodes, and zarr warns about each while xarray lists the group's members:
    readers are spared that note."""
    import warnings

    import xarray as xr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at (.*/)?_\w+ is not recognized",
                                category=UserWarning)
        return xr.open_zarr(location(uri).reader, group=path or None, consolidated=False,
                            zarr_format=3, **kwargs)


def write_dataset(uri: str, path: str, ds: xr.Dataset) -> None:
    """Write a small xarray Dataset under ``path`` without touching any parent node.

    It is written to memory first and copied key by key, the group's own metadata last,
    so a kill leaves no readable group (and xarray never writes parent groups that could
    race a commit marker)."""
    import warnings

    mem = MemoryStore()
    with warnings.catch_warnings():  # zarr's note that its v3 string dtype may change
        warnings.filterwarnings("ignore", message=".*string.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        ds.to_zarr(mem, mode="w", consolidated=False, zarr_format=3)
    items = sorted(mem._store_dict.items(), key=lambda kv: kv[0] == META)
    for name, buf in items:
        put_bytes(uri, f"{path.strip('/')}/{name}", buf.to_bytes())
